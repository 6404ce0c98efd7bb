"""``casengine uploads``: list chunked upload sessions and purge the abandoned ones."""

from __future__ import annotations

import dataclasses
import time

import click

from casengine.cli.common import emit_json, engine_from
from casengine.errors import BackendError


@click.group()
def uploads() -> None:
    """Chunked upload sessions."""


@uploads.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_context
def ls(ctx: click.Context, as_json: bool) -> None:
    """List open upload sessions: id, repository, bytes so far, idle time."""
    with engine_from(ctx) as engine:
        sessions = list(engine.uploads.list())
    if as_json:
        emit_json([dataclasses.asdict(s) for s in sessions])
        return
    from casengine.units import format_duration, format_size

    now = time.time()
    for s in sessions:
        idle = format_duration(round(now - s.updated))
        click.echo(f"{s.id}\t{s.repository or '-'}\t{format_size(s.offset)}\tidle {idle}")


@uploads.command()
@click.option("--older-than", default=None, metavar="DURATION",
              help="Idle time after which a session is abandoned (default: the TTL, 24h).")
@click.option("--writers-idle", default=None, metavar="DURATION",
              help="How long other writers' leftovers (temp files, S3 multipart uploads of "
                   "pushes) must be idle too, since a live push's look the same (default 1h; "
                   "0s once the registry is stopped).")
@click.option("--dry-run", is_flag=True, help="Report what would be purged; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def purge(ctx: click.Context, older_than: str | None, writers_idle: str | None, dry_run: bool,
          as_json: bool) -> None:
    """Remove upload sessions idle longer than DURATION, and their staged bytes."""
    from casengine.units import format_size, parse_duration

    age = parse_duration(older_than) if older_than is not None else None
    writers = parse_duration(writers_idle) if writers_idle is not None else None
    with engine_from(ctx) as engine:
        report = engine.uploads.purge(age, dry_run=dry_run, writers_idle=writers)
    if as_json:
        emit_json({"dry_run": report.dry_run, "sessions": len(report.sessions),
                   "bytes": report.bytes, "ids": [s.id for s in report.sessions],
                   "leftovers": report.leftovers, "failed": list(report.failed)})
    else:
        verb = "would purge" if dry_run else "purged"
        left = (f"; dropped {report.leftovers} leftovers of dead writers"
                if report.leftovers else "")
        click.echo(f"{verb} {len(report.sessions)} sessions, {format_size(report.bytes)}{left}")
    if report.failed:
        click.echo(f"casengine: error: {len(report.failed)} sessions not purged (the backend "
                   f"failed on them, see above): {' '.join(report.failed)}", err=True)
        ctx.exit(BackendError.exit_code)
