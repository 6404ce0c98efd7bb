"""What the benchmark scripts share: sizes, A/B pairs and their ratios, and the plumbing of
a command line (options, cases, a scratch directory removed at exit, Ctrl-C).

Every figure here is a pair measured in the same run: the limit (A) and the engine (B)
alternate, A B A B ..., and a figure's ratio is the median of the per-pair ratios
``A time / B time``, the engine's speed as a fraction of the limit's.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator

MB = 1_000_000
MIN_ROUNDS = 5


def parse_size(text: str) -> int:
    """``256M``/``256MiB`` -> 256 MiB; ``1G``; ``64K``; plain bytes. Binary units throughout."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: want e.g. 256M, 1G, 65536")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


class Paired:
    """Ratios of a dataclass with ``nbytes``, ``target`` and the two lists of times."""

    nbytes: int
    target: float | None
    limit_times: list[float]
    engine_times: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.limit_times, self.engine_times, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def mbps(self, times: list[float]) -> float:
        return self.nbytes / statistics.median(times) / MB

    @property
    def meets_target(self) -> bool | None:
        return None if self.target is None else self.ratio >= self.target


def add_options(ap: argparse.ArgumentParser, *, size: str, size_help: str,
                cases: tuple[str, ...], default_cases: tuple[str, ...]) -> None:
    """The options every script has: size, rounds, warm-up, scratch place, cases, output."""
    ap.add_argument("--size", type=parse_size, default=parse_size(size), help=size_help)
    ap.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                    help=f"measured pairs per case (default {MIN_ROUNDS}; report >= {MIN_ROUNDS})")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured pairs first (default 1)")
    ap.add_argument("--dir", help="where to make the scratch directory (default: system temp)")
    which = "all" if default_cases == cases else "all but " + ", ".join(
        c for c in cases if c not in default_cases)
    ap.add_argument("--cases", default=",".join(default_cases),
                    help=f"comma-separated, from {', '.join(cases)} (default: {which})")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")


def chosen_cases(ap: argparse.ArgumentParser, args: argparse.Namespace,
                 cases: tuple[str, ...]) -> list[str]:
    """``--cases``, checked; also checks the counts every script takes."""
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [c for c in chosen if c not in cases]:
        ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(cases)}")
    if args.rounds < 1 or args.warmup < 0 or args.size < 1:
        ap.error("--rounds must be >= 1, --warmup >= 0 and --size >= 1 byte")
    return chosen


@contextlib.contextmanager
def scratch(parent: str | None) -> Iterator[str]:
    """A fresh directory for the run, removed at the end, also on Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C
    base = tempfile.mkdtemp(prefix="casengine-bench-", dir=parent)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(main: Callable[[], int]) -> None:
    """The ``__main__`` of a script: its exit status, or 130 after Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
