"""Shared fixtures for the pytest-benchmark micro benchmarks (run: ``pytest benchmarks``).

Every engine figure is measured next to its limit in the same run: in each round the limit
(``hashlib.sha256`` over the same bytes, or a plain file read) runs first, then the engine,
so the two see the same machine state (A B A B ...). The per-round ratios ``limit time /
engine time`` are reduced to their median and stored in ``benchmark.extra_info``; a summary
table is printed at the end of the run.

Knobs (environment variables, so they work however pytest is invoked):

- ``CASENGINE_BENCH_SIZE``: large-blob size, e.g. ``256M`` (default), ``64M``, ``1G``.
- ``CASENGINE_BENCH_ROUNDS``: rounds per benchmark; never fewer than 5 (default 5).
- ``CASENGINE_BENCH_DIR``: parent of the scratch directory (default: the system temp dir).
- ``CASENGINE_BENCH_STRICT=1``: fail a benchmark whose median ratio misses its target.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pairs import MIN_ROUNDS, Paired, parse_size

MiB = 1 << 20

SIZE = parse_size(os.environ.get("CASENGINE_BENCH_SIZE", "256M"))
ROUNDS = max(MIN_ROUNDS, int(os.environ.get("CASENGINE_BENCH_ROUNDS", MIN_ROUNDS)))
STRICT = os.environ.get("CASENGINE_BENCH_STRICT", "") not in ("", "0")
SMALL_COUNT = 1000
SMALL_SIZE = 16 << 10


@dataclass
class PairResult(Paired):
    """One benchmark's engine-vs-limit figures, for the terminal summary."""

    name: str
    limit: str
    nbytes: int
    limit_times: list[float] = field(default_factory=list)
    engine_times: list[float] = field(default_factory=list)
    target: float | None = None
    #: work items per round (blobs), for a per-item overhead figure
    items: int | None = None

    @property
    def overhead_us(self) -> float | None:
        """Median over rounds of the engine's extra time per item, in microseconds."""
        if not self.items:
            return None
        extra = [(eng - lim) / self.items * 1e6
                 for lim, eng in zip(self.limit_times, self.engine_times, strict=True)]
        return statistics.median(extra)


_RESULTS = pytest.StashKey[list[PairResult]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[str]:
    """A scratch directory for roots and files; removed, with everything in it, at the end."""
    path = tempfile.mkdtemp(prefix="casengine-bench-", dir=os.environ.get("CASENGINE_BENCH_DIR"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def big_blob() -> bytes:
    """``SIZE`` random (incompressible) bytes, generated once per session."""
    return os.urandom(SIZE)


@pytest.fixture(scope="session")
def small_blobs() -> list[bytes]:
    return [os.urandom(SMALL_SIZE) for _ in range(SMALL_COUNT)]


@pytest.fixture(scope="session")
def bench_rounds() -> int:
    return ROUNDS


@pytest.fixture
def fresh_root(bench_dir: str) -> Iterator[Callable[[], str]]:
    """Make a new, empty local root on each call; every one is removed after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(tempfile.mkdtemp(prefix="root-", dir=bench_dir))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


Paired = Callable[..., Any]


@pytest.fixture
def paired(benchmark: Any, request: pytest.FixtureRequest) -> Paired:
    """Benchmark ``target`` with ``limit`` timed right before it in every round.

    ``paired(limit, target, nbytes=..., limit_name=..., setup=..., teardown=..., target_ratio=...,
    items=..., warmup=1)``

    - ``limit()`` is the machine's own limit for the same work; it is timed here.
    - ``setup()`` returns the state ``target(state)`` works on (a fresh engine, a fresh root);
      ``teardown(state)`` releases it. Neither is timed.
    - Only the ``target`` call is timed by pytest-benchmark (``benchmark.pedantic``, at least
      5 rounds); the ratio is the median over rounds of ``limit time / target time``.
    - ``items``: work items per round (e.g. blobs), to report the per-item overhead.
    - ``warmup``: untimed rounds first (pairs too).
    """

    def run(limit: Callable[[], Any], target: Callable[[Any], Any], *, nbytes: int,
            limit_name: str, setup: Callable[[], Any] | None = None,
            teardown: Callable[[Any], None] | None = None,
            target_ratio: float | None = None, items: int | None = None,
            warmup: int = 1) -> Any:
        res = PairResult(request.node.name, limit_name, nbytes, target=target_ratio,
                         items=items)

        live: list[Any] = []  # states set up and not yet torn down

        def bench_setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            t0 = time.perf_counter()
            limit()
            res.limit_times.append(time.perf_counter() - t0)
            live.append(setup() if setup else None)
            return (live[-1],), {}

        def bench_target(state: Any) -> Any:
            t0 = time.perf_counter()
            out = target(state)
            res.engine_times.append(time.perf_counter() - t0)
            return out

        def bench_teardown(state: Any) -> None:
            for i, s in enumerate(live):
                if s is state:
                    del live[i]
                    if teardown:
                        teardown(state)
                    return

        try:
            result = benchmark.pedantic(bench_target, setup=bench_setup,
                                        teardown=bench_teardown, rounds=ROUNDS,
                                        warmup_rounds=warmup)
        finally:
            # pytest-benchmark skips teardown when disabled or on error: release the rest
            while live:
                bench_teardown(live[-1])
        if benchmark.disabled:  # --benchmark-disable: one unmeasured run, a smoke test
            return result
        # keep the rounds pytest-benchmark timed: not the warm-up, nor a --benchmark-cprofile run
        del res.limit_times[warmup + ROUNDS:], res.engine_times[warmup + ROUNDS:]
        del res.limit_times[:warmup], res.engine_times[:warmup]
        ratio = res.ratio
        benchmark.extra_info.update({
            "limit": limit_name,
            f"ratio_vs_{limit_name}": round(ratio, 4),
            "ratios": [round(r, 4) for r in res.ratios],
            "bytes": nbytes,
            "limit_MBps": round(res.mbps(res.limit_times), 1),
            "engine_MBps": round(res.mbps(res.engine_times), 1),
            "target_ratio": target_ratio,
            "meets_target": None if target_ratio is None else ratio >= target_ratio,
        })
        if items:
            benchmark.extra_info["items"] = items
            benchmark.extra_info["overhead_us_per_item"] = round(res.overhead_us or 0.0, 1)
        request.config.stash[_RESULTS].append(res)
        if STRICT and target_ratio is not None and ratio < target_ratio:
            pytest.fail(f"{res.name}: {ratio:.2f}x {limit_name} < target {target_ratio}x")
        return result

    return run


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    tr = terminalreporter
    tr.section("casengine: engine vs machine limit (medians, paired rounds)")
    tr.write_line(f"{'benchmark':<44} {'limit':<12} {'limit MB/s':>10} {'engine MB/s':>11} "
                  f"{'ratio':>6} {'target':>6}")
    for r in results:
        target = "" if r.target is None else f"{r.target:.2f}"
        verdict = "" if r.target is None else ("  ok" if r.ratio >= r.target else "  MISSED")
        if r.overhead_us is not None:
            verdict += f"  (+{r.overhead_us:.0f} us/blob over the limit)"
        tr.write_line(f"{r.name:<44} {r.limit:<12} {r.mbps(r.limit_times):>10.0f} "
                      f"{r.mbps(r.engine_times):>11.0f} {r.ratio:>6.2f} {target:>6}{verdict}")
    tr.write_line(f"ratio = median over {ROUNDS} rounds of (limit time / engine time); "
                  "1.00 = at the limit; MB = 10^6 bytes")
