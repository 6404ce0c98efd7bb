"""``casengine bench``: throughput of this root next to the machine's limits, same run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from casengine.cli.common import emit_json, engine_from

DEFAULT_SIZES = "1M,64M,1G"


def parse_sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    from casengine.errors import InvalidInput
    from casengine.units import parse_size

    sizes: set[int] = set()
    for part in value.split(","):
        try:
            size = parse_size(part)
        except InvalidInput as exc:
            raise click.BadParameter(str(exc)) from exc
        if size < 1:
            raise click.BadParameter(f"size {part.strip()!r} is empty: want at least 1 byte")
        sizes.add(size)
    return sorted(sizes)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Let SIGTERM (``timeout``, a service manager) unwind like Ctrl-C, so cleanup runs."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Bar:
    """A tqdm bar on stderr, one step per measurement, naming the running one."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False,
                        bar_format="{desc:<24} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        self.started = False

    def __call__(self, label: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description_str(label)

    def close(self) -> None:
        self.bar.close()


@click.command()
@click.option("--sizes", default=DEFAULT_SIZES, show_default=True, callback=parse_sizes,
              help="Comma-separated blob sizes to measure at, e.g. 1M,64M,1G.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True),
              default=None, metavar="FILE.png",
              help="Draw throughput against size, limits as dashed lines (needs matplotlib).")
@click.pass_context
def bench(ctx: click.Context, sizes: list[int], as_json: bool, plot_file: str | None) -> None:
    """Measure this root's ingest, read, range read and chunked upload next to the limits.

    The limits are measured first, in the same run: hashlib sha256 on one and on two
    threads, a memory copy, zstd level 3, and the backend's raw write, read and range read.
    Then each casengine figure runs alternately with its limit and is printed next to it,
    with the ratio (1.00 = at the limit). Everything written is removed again; the root's
    index is never touched.
    """
    from casengine import bench as measuring
    from casengine.errors import MissingExtra

    if plot_file is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise MissingExtra("--plot needs matplotlib: pip install matplotlib")
        if not os.path.isdir(os.path.dirname(os.path.abspath(plot_file))):
            raise click.BadParameter(f"{plot_file}: no such directory", param_hint="--plot")
    bar = _Bar(measuring.total_steps(sizes)) if sys.stderr.isatty() else None
    try:
        with _sigterm_interrupts(), engine_from(ctx, create=True) as engine:
            report = measuring.run(engine, sizes, bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(measuring.format_table(report))
    if plot_file is not None:  # after the figures are out: a failing plot loses nothing
        measuring.plot(report, plot_file)
