"""``casengine check`` throughput next to the machine's own limits, measured in the same run.

    python benchmarks/check_speed.py [--size 2G] [--blob 64M] [--rounds 3] [--workers 2]
                                     [--dir DIR] [--json] [--strict]

Builds a local root of ``--size`` bytes: ``--size / --blob`` blobs of random bytes, stored
through ``Engine.ingest`` (so their records carry the xxh3 that ``--fast`` compares). Then
each round runs, one after the other so they see the same machine state:

  sha256-1t  one thread hashing with hashlib.sha256 (for scale: does a second thread help?)
  sha256-2t  the limit of --full: two threads hashing concurrently with hashlib.sha256, in
             4 MiB updates (the check's read size) over a 64 MiB buffer of their own in
             memory, ``--size`` bytes in all
  xxh3-2t    the same with xxh3-128 (what both modes compute over the stored bytes)
  read-1t    plain reads of the same blob files: readinto a reused 4 MiB buffer, one thread
  read-2t    the same, the files split between two threads
  full       Checker(full=True, workers=N).run() -- ``casengine check --full --workers N``
  fast       Checker(workers=N).run() -- ``casengine check --fast --workers N``

Figures are medians over the rounds (MB = 10^6 bytes); each ratio is the median of the
per-round ratios. The targets (issue 8): full >= 0.8 x sha256-2t; fast >= 2 GB/s, or the
read speed (the better of read-1t and read-2t) if that is lower.

The reads are **warm**: the blobs were just written, and are read once before the first
round, so the page cache holds them (the machine needs ``--size`` of free memory for that).
A cold figure needs the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches`` as root,
or posix_fadvise DONTNEED, which not every filesystem honours); on a shared machine
neither is reliable, so this script does not pretend to. Warm, the read limit is memory
bandwidth, and ``fast`` shows the check's own overhead.

Everything lives in a fresh temp directory (in ``--dir``, default the system temp dir),
removed at exit, also on Ctrl-C or SIGTERM. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import xxhash
from pairs import MB, parse_size

from casengine.check import Checker
from casengine.engine import Engine
from casengine.layout import BLOBS
from casengine.registry import Registry

CHUNK = 4 << 20  #: the check reads 4 MiB at a time
HASH_BUFFER = 64 << 20
FULL_TARGET = 0.8  #: full / sha256-2t
FAST_TARGET = 2e9  #: bytes per second, or the read speed if lower


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the limits -------------------------------------------------------------------------------


def _in_threads(work: list[Callable[[], None]]) -> float:
    """Run the callables in threads at once; the seconds from the start to the last end."""
    barrier = threading.Barrier(len(work) + 1)
    errors: list[BaseException] = []

    def run(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in work]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def hash_rate(factory: Callable[[], Any], buffers: list[memoryview], total: int) -> float:
    """Bytes per second of ``len(buffers)`` threads hashing ``total`` bytes between them."""
    share = total // len(buffers)

    def work(buf: memoryview) -> Callable[[], None]:
        def run() -> None:
            h, done = factory(), 0
            while done < share:
                for off in range(0, len(buf), CHUNK):
                    n = min(CHUNK, share - done)
                    h.update(buf[off:off + n])
                    done += n
                    if done >= share:
                        break
            h.digest()
        return run

    return share * len(buffers) / _in_threads([work(b) for b in buffers])


def read_rate(paths: list[str], threads: int) -> float:
    """Bytes per second of plain reads of ``paths``, split between ``threads`` threads."""
    done = [0] * threads

    def work(i: int) -> Callable[[], None]:
        def run() -> None:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            for path in paths[i::threads]:
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(view):
                        done[i] += n
        return run

    elapsed = _in_threads([work(i) for i in range(threads)])
    return sum(done) / elapsed


# -- the root ---------------------------------------------------------------------------------


def build(root: str, size: int, blob: int) -> list[str]:
    """``size // blob`` random blobs stored through Engine.ingest; their object paths."""
    rng = random.Random(8)
    with Engine.open(root) as engine:
        for i in range(size // blob):
            engine.ingest(rng.randbytes(blob))
            log(f"  stored {i + 1}/{size // blob}")
        return [engine.backend.local_path(k) for k in engine.backend.list(BLOBS)]


def check_rate(root: str, *, full: bool, workers: int) -> tuple[float, int]:
    """(bytes per second, bytes) of one check of the whole root, in this process."""
    with Engine.open(root) as engine:
        start = time.perf_counter()
        report = Checker(Registry(engine), full=full, workers=workers).run()
        elapsed = time.perf_counter() - start
    if not report.clean or not report.complete:
        raise SystemExit(f"the check found problems: {report.to_json()}")
    return report.bytes / elapsed, report.bytes


# -- the run ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2G"))
    ap.add_argument("--blob", type=parse_size, default=parse_size("64M"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="parent of the scratch directory")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args()
    if args.size < args.blob:
        ap.error("--size must be at least one --blob")

    scratch = tempfile.mkdtemp(prefix="casengine-check-bench-", dir=args.dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args, os.path.join(scratch, "root"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, root: str) -> int:
    total = args.size // args.blob * args.blob
    log(f"building a local root of {total / 2**30:.2f} GiB in {os.path.dirname(root)}")
    t = time.perf_counter()
    paths = build(root, total, args.blob)
    log(f"  built in {time.perf_counter() - t:.1f} s; warming the page cache")
    read_rate(paths, 2)

    rng = random.Random(9)
    buffers = [memoryview(rng.randbytes(HASH_BUFFER)) for _ in range(2)]
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        fig = {
            "sha256-1t": hash_rate(hashlib.sha256, buffers[:1], total // 2),
            "sha256-2t": hash_rate(hashlib.sha256, buffers, total),
            "xxh3-2t": hash_rate(xxhash.xxh3_128, buffers, total),
            "read-1t": read_rate(paths, 1),
            "read-2t": read_rate(paths, 2),
        }
        fig["full"], checked = check_rate(root, full=True, workers=args.workers)
        fig["fast"], _ = check_rate(root, full=False, workers=args.workers)
        assert checked == total, (checked, total)
        read = max(fig["read-1t"], fig["read-2t"])
        fig["full/sha256-2t"] = fig["full"] / fig["sha256-2t"]
        fig["fast/target"] = fig["fast"] / min(FAST_TARGET, read)
        rounds.append(fig)
        log(f"  round {r + 1}: " + ", ".join(
            f"{k} {v:.2f}" if "/" in k else f"{k} {v / MB:.0f} MB/s" for k, v in fig.items()))

    med = {k: statistics.median(f[k] for f in rounds) for k in rounds[0]}
    read = max(med["read-1t"], med["read-2t"])
    fast_target = min(FAST_TARGET, read)
    ok = {"full": med["full/sha256-2t"] >= FULL_TARGET, "fast": med["fast/target"] >= 1.0}
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load": os.getloadavg()},
        "size_bytes": total, "blob_bytes": args.blob, "workers": args.workers,
        "rounds": rounds, "cache": "warm",
        "median_mb_s": {k: round(v / MB) for k, v in med.items() if "/" not in k},
        "full_vs_sha256_2t": round(med["full/sha256-2t"], 3),
        "fast_vs_target": round(med["fast/target"], 3),
        "fast_target_mb_s": round(fast_target / MB),
        "targets_met": ok,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"check on a local root of {total / 2**30:.2f} GiB ({total // args.blob} blobs of "
              f"{args.blob >> 20} MiB), --workers {args.workers}, warm page cache, "
              f"median of {args.rounds}; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} CPUs")
        print(f"{'figure':<12} {'MB/s':>8}")
        for k in ("sha256-1t", "sha256-2t", "xxh3-2t", "read-1t", "read-2t", "full", "fast"):
            print(f"{k:<12} {med[k] / MB:>8.0f}")
        print(f"full / sha256-2t = {med['full/sha256-2t']:.2f} (target >= {FULL_TARGET}) "
              f"{'ok' if ok['full'] else 'MISSED'}")
        print(f"fast / min(2 GB/s, read {read / MB:.0f} MB/s) = {med['fast/target']:.2f} "
              f"(target >= 1.00) {'ok' if ok['fast'] else 'MISSED'}")
    return 1 if args.strict and not all(ok.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
