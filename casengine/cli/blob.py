"""``casengine blob``: put, get, stat, rm and ls of raw blobs, by digest."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

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
    with engine_from(ctx, create=True) as engine:
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
    """Write the bytes of DIGEST to stdout or a file, verified on the way (exit code 5, and
    no file, if the stored bytes are damaged)."""
    from casengine.digest import Hasher, parse_digest
    from casengine.errors import CorruptObject

    expected = parse_digest(digest)
    with engine_from(ctx) as engine:
        chunks = engine.read(expected)
        hasher = Hasher(expected.algorithm)
        with _output(output) as out:
            for chunk in chunks:
                hasher.update(chunk)
                out.write(chunk)
            if hasher.digest() != expected:
                raise CorruptObject(
                    f"the stored bytes of {expected} ({hasher.size} bytes) hash to "
                    f"{hasher.digest()}: the blob is damaged; run 'casengine check'"
                    + (" (what was written to stdout is not the blob)" if output == "-" else ""))


@contextlib.contextmanager
def _output(path: str) -> Iterator[BinaryIO]:
    """stdout for ``-``; else a temporary file beside ``path``, renamed onto it only if the
    block succeeds, so a failed get leaves no file (click's atomic files keep theirs)."""
    if path == "-":
        yield sys.stdout.buffer
        return
    from casengine.errors import BackendError, NotFound

    target = os.path.abspath(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.",
                                   dir=os.path.dirname(target))
    except OSError as exc:
        error = NotFound if isinstance(exc, FileNotFoundError) else BackendError
        raise error(f"cannot write {path}: {exc.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@blob.command()
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def stat(ctx: click.Context, digest: str, as_json: bool) -> None:
    """Show what the index knows of DIGEST."""
    from casengine.digest import parse_digest

    d = parse_digest(digest)  # a typo is a usage error before it is a missing store
    with engine_from(ctx) as engine:
        record = engine.stat(d)
    if as_json:
        emit_json(dataclasses.asdict(record))
    else:
        import datetime

        for name, value in dataclasses.asdict(record).items():
            if name in ("created", "touched"):  # seconds since the epoch, for people
                value = datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat(
                    timespec="seconds")
            click.echo(f"{name}: {value}")


@blob.command()
@click.argument("digest")
@click.option("--force", is_flag=True,
              help="Delete it even if repositories link it (their images break).")
@click.pass_context
def rm(ctx: click.Context, digest: str, force: bool) -> None:
    """Delete DIGEST (exit code 3 if it is not stored, 6 if repositories link it)."""
    from casengine.digest import parse_digest
    from casengine.errors import BlobNotFound, InUse

    d = str(parse_digest(digest))
    with engine_from(ctx) as engine:
        if not force:
            with engine.index.transaction() as txn:
                repos = [k.split(b"\0", 1)[1].decode()
                         for k, _ in txn.scan("linked", f"{d}\0".encode())]
            if repos:
                shown = ", ".join(repos[:3]) + (f" and {len(repos) - 3} more" if len(repos) > 3 else "")
                raise InUse(f"{d} is linked in {shown}: delete what uses it there (or pass "
                            "--force; their images then break)")
        if not engine.delete(d):
            raise BlobNotFound(d)


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
