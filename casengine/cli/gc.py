"""``casengine gc``: online garbage collection (see casengine.gc for the protocol)."""

from __future__ import annotations

import sys

import click

from casengine.cli.common import emit_json
from casengine.cli.registry import registry_from


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be reclaimed; change nothing.")
@click.option("--grace", default="1h", show_default=True, metavar="DURATION",
              help="Keep anything written or touched this recently.")
@click.option("--untagged", is_flag=True,
              help="Also delete manifests that are neither tagged nor reached from a tagged one.")
@click.option("--orphans", is_flag=True,
              help="Also remove stored objects that no index record names (left by a crash).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: str, untagged: bool, orphans: bool,
       as_json: bool) -> None:
    """Delete what nothing reachable refers to, while the registry keeps serving."""
    from tqdm import tqdm

    from casengine.gc import Collector
    from casengine.units import format_size, parse_duration

    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(desc=stage, unit=" items", file=sys.stderr, leave=False,
                               disable=not sys.stderr.isatty())
        bars[stage].update(n)

    with registry_from(ctx) as registry:
        try:
            report = Collector(registry, grace=parse_duration(grace), untagged=untagged,
                               orphans=orphans, dry_run=dry_run, progress=progress).run()
        finally:
            for bar in bars.values():
                bar.close()
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    click.echo(f"{verb}: {report.blobs} blobs ({format_size(report.bytes)} stored), "
               f"{report.manifests} manifests, {report.links} links, {report.uploads} upload "
               f"sessions ({format_size(report.upload_bytes)})"
               + (f", {report.orphans} orphans ({format_size(report.orphan_bytes)})"
                  if orphans else ""))
    # a repository's figure is the logical size of what it no longer links; the blobs' is
    # what the store frees (compressed, and only where no other repository links them)
    for name, r in sorted(report.repositories.items()):
        click.echo(f"  {name}: {r.manifests} manifests, {r.links} links "
                   f"({format_size(r.bytes)} logical)")
