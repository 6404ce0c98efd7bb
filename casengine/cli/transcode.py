"""``casengine transcode``: convert an image's gzip layers to zstd (see casengine.transcode)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from casengine.cli.common import emit_json
from casengine.cli.registry import registry_from

if TYPE_CHECKING:
    from casengine.transcode import Report


@click.command()
@click.argument("ref")
@click.option("--to", "target", type=click.Choice(["zstd"]), default="zstd", show_default=True,
              help="Layer compression to convert to.")
@click.option("--level", default=3, show_default=True, type=click.IntRange(1, 22),
              help="zstd compression level.")
@click.option("--tag", "new_tag", metavar="NEWTAG",
              help="Tag for the result (default: <tag>-zstd; a REF by digest without --tag "
                   "stores the result by digest only).")
@click.option("--max-size", default="64G", show_default=True, metavar="SIZE",
              help="Refuse a layer that decompresses to more than this (a bomb).")
@click.option("--max-ratio", default=500.0, show_default=True, type=click.FloatRange(1),
              help="Refuse a layer past 256 MiB that expands more than this many times.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.pass_context
def transcode(ctx: click.Context, ref: str, target: str, level: int, new_tag: str | None,
              max_size: str, max_ratio: float, as_json: bool) -> None:
    """Convert the gzip layers of REF (repo:tag or repo@sha256:...) to zstd, as a new image.

    An index is converted with all of its platforms; Docker manifests become OCI ones.
    The original image is left as it is.
    """
    from tqdm import tqdm

    from casengine.recompress import Limits
    from casengine.registry.names import Reference
    from casengine.transcode import transcode as run
    from casengine.units import parse_size

    reference = Reference.parse(ref)
    limits = Limits(max_size=parse_size(max_size), max_ratio=max_ratio)
    bar = tqdm(desc="transcoding", unit="B", unit_scale=True, file=sys.stderr, leave=False,
               disable=not sys.stderr.isatty())

    def progress(event: str, n: int) -> None:
        if event == "total":
            bar.total = (bar.total or 0) + n
            bar.refresh()
        else:
            bar.update(n)

    try:
        with registry_from(ctx) as registry:
            report = run(registry, reference.repository, reference.ref, to=target, level=level,
                         tag=new_tag, limits=limits, progress=progress)
    finally:
        bar.close()
    if as_json:
        emit_json(report.to_json())
    else:
        _show(report)


def _short(digest: str) -> str:
    """A layer digest as ``docker`` shows it: 12 hex digits (--json has them whole)."""
    algorithm, _, hexdigest = digest.partition(":")
    return f"{algorithm}:{hexdigest[:12]}"


def _show(report: Report) -> None:
    from casengine.units import format_size

    where = f":{report.tag}" if report.tag else f"@{report.target}"
    click.echo(f"{report.repository}@{report.source} -> {report.repository}{where} "
               f"({report.target})")
    for layer in report.layers:
        if layer.action == "kept":
            click.echo(f"  {_short(layer.source)}  kept ({layer.media_type})")
            continue
        rate = layer.bytes_in / layer.seconds / 1e6 if layer.seconds else 0.0
        click.echo(f"  {_short(layer.source)} -> {_short(layer.target)}  {layer.action:9s}  "
                   f"{format_size(layer.bytes_in)} -> {format_size(layer.bytes_out)} "
                   f"({layer.ratio:.2f})  {layer.seconds:.2f} s"
                   + (f"  {rate:.0f} MB/s" if layer.action == "converted" else ""))
    total = report.bytes_in
    ratio = report.bytes_out / total if total else 1.0
    click.echo(f"{report.count('converted')} converted, {report.count('reused')} reused, "
               f"{report.count('kept')} kept; {format_size(total)} -> "
               f"{format_size(report.bytes_out)} ({ratio:.2f}); {report.manifests} manifests "
               f"written in {report.seconds:.2f} s")
