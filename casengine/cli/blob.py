"""``casengine blob``: put, get, stat, rm and ls of raw blobs, by digest."""

from __future__ import annotations

import dataclasses
import sys

import click

from casengine.cli.common import emit_json, engine_from


@click.group()
def blob() -> None:
    """Store and fetch blobs by digest."""


@blob.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--digest", "expected", help="Expected digest; refuse and store nothing on mismatch.")
@click.option("--algorithm", type=click.Choice(["sha256", "sha512"]), default="sha256",
              show_default=True, help="Digest algorithm when --digest is not given.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def put(ctx: click.Context, file: str, expected: str | None, algorithm: str, as_json: bool) -> None:
    """Store FILE (or - for stdin) and print its digest."""
    source = sys.stdin.buffer if file == "-" else file
    with engine_from(ctx) as engine:
        result = engine.ingest(source, digest=expected, algorithm=algorithm)
    if as_json:
        emit_json({"digest": str(result.digest), "size": result.size, "created": result.created})
    else:
        click.echo(str(result.digest))


@blob.command()
@click.argument("digest")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write to this file instead of stdout.")
@click.pass_context
def get(ctx: click.Context, digest: str, output: str) -> None:
    """Write the bytes of DIGEST to stdout or a file."""
    with engine_from(ctx) as engine:
        chunks = engine.read(digest)
        with click.open_file(output, "wb", atomic=output != "-") as out:
            for chunk in chunks:
                out.write(chunk)


@blob.command()
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def stat(ctx: click.Context, digest: str, as_json: bool) -> None:
    """Show what the index knows of DIGEST."""
    with engine_from(ctx) as engine:
        record = engine.stat(digest)
    if as_json:
        emit_json(dataclasses.asdict(record))
    else:
        for name, value in dataclasses.asdict(record).items():
            click.echo(f"{name}: {value}")


@blob.command()
@click.argument("digest")
@click.pass_context
def rm(ctx: click.Context, digest: str) -> None:
    """Delete DIGEST (exit code 3 if it is not stored)."""
    from casengine.errors import BlobNotFound

    with engine_from(ctx) as engine:
        if not engine.delete(digest):
            raise BlobNotFound(digest)


@blob.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool) -> None:
    """List stored blobs: digest and size (logical; with --json also the stored size and
    codec)."""
    with engine_from(ctx) as engine:
        records = engine.list()
        if as_json:
            emit_json([dataclasses.asdict(r) for r in records])
        else:
            for r in records:
                click.echo(f"{r.digest}\t{r.size}")
