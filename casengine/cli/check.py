"""``casengine check`` and ``casengine reindex``."""

from __future__ import annotations

import sys
import time

import click

from casengine.cli.common import Settings, emit_json, require_store
from casengine.cli.registry import registry_from

#: check's own exit codes (README): problems found (or left unrepaired), the check itself
#: failed, and stopped early (--time-limit) without a problem in what it did check.
EXIT_PROBLEMS = 1
EXIT_FAILED = 2
EXIT_INCOMPLETE = 3


def _bar(stage: str, unit: str = "B") -> object:
    from tqdm import tqdm

    return tqdm(desc=stage, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


@click.command()
@click.option("--fast", "mode", flag_value="fast", default=True,
              help="Sizes and xxh3 of the stored bytes (the default).")
@click.option("--full", "mode", flag_value="full",
              help="Also re-hash every blob's logical bytes with its own algorithm.")
@click.option("--repo", "pattern", metavar="PATTERN", help="Only repositories matching, e.g. 'team/*'.")
@click.option("--repair", is_flag=True, help="Quarantine, re-index and drop what is broken.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--max-rate", metavar="BYTES/S", help="Read at most this fast, e.g. 200M.")
@click.option("--time-limit", metavar="DURATION", help="Stop after this long; --resume goes on.")
@click.option("--resume", is_flag=True, help="Go on from where an interrupted check stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def check(ctx: click.Context, mode: str, pattern: str | None, repair: bool, workers: int,
          max_rate: str | None, time_limit: str | None, resume: bool, as_json: bool) -> None:
    """Verify stored data and references.

    Exit 0 clean (with --repair: everything found was repaired), 1 problems found or left
    unrepaired, 2 the check failed, 3 stopped early by --time-limit with no problem in what
    it checked (--resume goes on).
    """
    from casengine.check import Checker
    from casengine.errors import CASError
    from casengine.units import format_size, parse_duration, parse_size

    bar = _bar("checking")
    try:
        with registry_from(ctx) as registry:
            report = Checker(
                registry, full=mode == "full", repo=pattern, workers=workers,
                max_rate=parse_size(max_rate) if max_rate else None, repair=repair,
                deadline=time.monotonic() + parse_duration(time_limit) if time_limit else None,
                progress=lambda stage, n: bar.update(n), resume=resume).run()
    except CASError as exc:
        click.echo(f"casengine: check failed: {exc}", err=True)
        ctx.exit(EXIT_FAILED)
    finally:
        bar.close()
    if as_json:
        emit_json(report.to_json())
    else:
        rate = report.bytes / report.seconds / 1e6 if report.seconds else 0.0
        click.echo(f"{report.mode} check: {report.blobs} blobs, {format_size(report.bytes)} read "
                   f"in {report.seconds:.1f} s ({rate:.0f} MB/s)"
                   + ("" if report.complete else "; stopped early, --resume goes on"))
        for f in report.findings:
            click.echo(f"{f.kind}: {f.digest or '-'}: {f.detail}"
                       + (f" [affects {', '.join(f.affected)}]" if f.affected else "")
                       + (f" -> {f.repaired}" if f.repaired else ""))
        if report.clean:
            click.echo("clean")
    if any(not (repair and f.repaired) for f in report.findings):
        ctx.exit(EXIT_PROBLEMS)
    if not report.complete:  # unchecked blobs may be damaged: never a clean bill of health
        ctx.exit(EXIT_INCOMPLETE)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def reindex(ctx: click.Context, as_json: bool) -> None:
    """Rebuild the index from the backend alone (stop the registry first)."""
    from casengine.backend import open_backend
    from casengine.errors import ConfigError
    from casengine.reindex import rebuild

    s: Settings = ctx.find_object(Settings)
    require_store(s.root)
    backend = open_backend(s.root, **s.storage_options)
    try:
        path = s.index or backend.default_index_path()
        if path is None:
            raise ConfigError(f"{s.root} is not a local directory: name the index with --index")
        bar = _bar("reindexing", unit=" objects")
        try:
            report = rebuild(backend, path, progress=lambda stage, n: bar.update(n))
        finally:
            bar.close()
    finally:
        backend.close()
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo(f"rebuilt: {report.blobs} blobs, {report.repositories} repositories, "
                   f"{report.manifests} manifests, {report.tags} tags, {report.links} links"
                   + (f"; kept {report.quotas} quotas" if report.quotas else ""))
        for item in report.skipped or []:
            click.echo(f"skipped: {item}")
