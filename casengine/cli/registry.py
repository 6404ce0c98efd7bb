"""``casengine repo``, ``tag``, ``manifest``, ``usage`` and ``quota``: the registry model."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from casengine.cli.common import EXIT_USAGE, emit_json, engine_from

if TYPE_CHECKING:
    from casengine.registry import Registry


@contextmanager
def registry_from(ctx: click.Context, *, create: bool = False) -> Iterator[Registry]:
    from casengine.registry import Registry

    with engine_from(ctx, create=create) as engine:
        yield Registry(engine)


@click.group()
def repo() -> None:
    """Repositories."""


@repo.command("ls")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def repo_ls(ctx: click.Context, prefix: str, as_json: bool) -> None:
    """List repositories (those whose name starts with PREFIX)."""
    with registry_from(ctx) as reg:
        infos = [reg.repository(name) for name in reg.repositories(prefix)]
    if as_json:
        emit_json(infos)
    else:
        for info in infos:
            click.echo(info["name"])


@repo.command("create")
@click.argument("name")
@click.pass_context
def repo_create(ctx: click.Context, name: str) -> None:
    """Create repository NAME (it is fine if it exists)."""
    with registry_from(ctx, create=True) as reg:
        created = reg.create_repository(name)
    click.echo(f"{'created' if created else 'exists'}: {name}")


@repo.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def repo_rm(ctx: click.Context, name: str, yes: bool) -> None:
    """Delete repository NAME with its tags and manifests (blobs stay until GC)."""
    if not yes:
        if not sys.stdin.isatty():  # a script that forgot --yes must not delete unasked
            click.echo(f"casengine: error: not deleting {name}: there is no terminal to ask "
                       "at; pass --yes to delete it", err=True)
            ctx.exit(EXIT_USAGE)
        if not click.confirm(f"delete repository {name} with all its tags and manifests?"):
            click.echo("casengine: not deleted", err=True)
            ctx.exit(1)
    with registry_from(ctx) as reg:
        reg.delete_repository(name)


@click.group()
def tag() -> None:
    """Tags."""


@tag.command("ls")
@click.argument("repository")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON map of tag to digest.")
@click.pass_context
def tag_ls(ctx: click.Context, repository: str, as_json: bool) -> None:
    """List the tags of REPOSITORY with the digests they point at."""
    with registry_from(ctx) as reg:
        tags = reg.tag_map(repository)
    if as_json:
        emit_json(tags)
    else:
        for name, digest in tags.items():
            click.echo(f"{name}\t{digest}")


@tag.command("rm")
@click.argument("reference")
@click.pass_context
def tag_rm(ctx: click.Context, reference: str) -> None:
    """Delete the tag REPO:TAG (the manifest stays)."""
    from casengine.registry import Reference

    ref = Reference.parse(reference)
    if ref.tag is None:
        raise click.BadParameter("want repo:tag", param_hint="REFERENCE")
    with registry_from(ctx) as reg:
        reg.delete_tag(ref.repository, ref.tag)


@click.group()
def manifest() -> None:
    """Manifests."""


@manifest.command("get")
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True,
              help="Print the record (digest, media type, references) instead of the bytes.")
@click.pass_context
def manifest_get(ctx: click.Context, reference: str, as_json: bool) -> None:
    """Print the manifest REPO:TAG or REPO@DIGEST exactly as it was pushed."""
    import dataclasses

    from casengine.registry import Reference

    ref = Reference.parse(reference)
    with registry_from(ctx) as reg:
        data, record = reg.get_manifest(ref.repository, ref.ref)
    if as_json:
        emit_json(dataclasses.asdict(record))
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


@manifest.command("rm")
@click.argument("reference")
@click.pass_context
def manifest_rm(ctx: click.Context, reference: str) -> None:
    """Delete the manifest REPO@DIGEST (or the one REPO:TAG names) with every tag that
    points at it; its blobs stay until GC. An index's child is refused (exit 6)."""
    from casengine.registry import Reference

    ref = Reference.parse(reference)
    with registry_from(ctx) as reg:
        digest = ref.digest or reg.resolve(ref.repository, ref.ref).digest
        reg.delete_manifest(ref.repository, digest)
    click.echo(f"deleted {ref.repository}@{digest}")


@click.command()
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def usage(ctx: click.Context, prefix: str, as_json: bool) -> None:
    """Logical, physical and stored bytes per repository and namespace (under PREFIX)."""
    from casengine.registry import usage as compute
    from casengine.units import format_size

    with registry_from(ctx) as reg:
        report = compute(reg, prefix)
    if as_json:
        emit_json(report.to_json())
        return
    click.echo(f"{'name':40} {'repos':>5} {'logical':>12} {'physical':>12} {'shared':>12} "
               f"{'stored':>12}")
    total = f"(all under {prefix})" if prefix else "(all)"
    for u in [*report.repositories, *report.namespaces, report.total]:
        name = total if u is report.total else u.name
        click.echo(f"{name:40} {u.repositories:5} {format_size(u.logical):>12} "
                   f"{format_size(u.physical):>12} {format_size(u.shared):>12} "
                   f"{format_size(u.stored):>12}")


@click.group()
def quota() -> None:
    """Quotas on logical bytes per namespace prefix."""


@quota.command("set")
@click.argument("prefix")
@click.argument("limit")
@click.pass_context
def quota_set(ctx: click.Context, prefix: str, limit: str) -> None:
    """Limit PREFIX (e.g. team/ or team/app) to LIMIT (e.g. 10G)."""
    from casengine.units import parse_size

    with registry_from(ctx, create=True) as reg:
        reg.quotas.set(prefix, parse_size(limit))


@quota.command("rm")
@click.argument("prefix")
@click.pass_context
def quota_rm(ctx: click.Context, prefix: str) -> None:
    """Remove the quota of PREFIX (exit code 3 if it has none)."""
    from casengine.errors import NotFound

    with registry_from(ctx) as reg:
        if not reg.quotas.set(prefix, None):
            raise NotFound(f"no quota on {prefix!r}")


@quota.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON map.")
@click.pass_context
def quota_ls(ctx: click.Context, as_json: bool) -> None:
    """List quotas and how much of each is used."""
    from casengine.units import format_size

    with registry_from(ctx) as reg:
        limits = reg.quotas.all()
        used = {p: reg.quotas.used(p) for p in limits}
    if as_json:
        emit_json({p: {"limit_bytes": limits[p], "used_bytes": used[p],
                       "over": used[p] > limits[p]} for p in limits})
        return
    for p, limit in limits.items():
        # set below what is stored already: nothing is lost, but pushes are refused
        over = "\tOVER: pushes refused" if used[p] > limit else ""
        click.echo(f"{p}\t{format_size(used[p])} of {format_size(limit)}{over}")
