"""Ingest and read throughput next to the machine's own limits, measured in the same run.

    python benchmarks/ingest.py [--size 256M] [--rounds 5] [--warmup 1] [--dir DIR]
                                [--cases memory,local,...] [--json] [--strict]

Each case pairs a limit (A) with the engine doing the same work (B) and runs them alternately,
A B A B ..., so both see the same machine state; the ratio reported is the median of the
per-pair ratios ``limit time / engine time`` (1.00 = the engine runs at the limit). MB/s
figures are medians too (MB = 10^6 bytes). Only the work itself is timed: making a fresh
root, opening and closing the engine and removing the root are not.

Cases (``--cases``, comma separated; default: all but read-cold):

  memory      ingest of the bytes into memory://              vs hashlib.sha256 (same bytes)
  local       ingest of the bytes into a fresh local root     vs hashlib.sha256
  local-path  ingest of a (warm) file path into a fresh root  vs hashlib.sha256
  read        Engine.read of a stored local blob (warm)       vs plain read of a warm file
  read-cold   the same after dropping both files from the page cache (posix_fadvise)
  sha512      ingest into memory:// with sha512               vs hashlib.sha512
  disk        plain write + fdatasync of the bytes to a file  vs hashlib.sha256 (is the disk
              faster than hashing? if not, local ingest cannot reach sha256 speed)
  memcopy     copy of the bytes into fresh memory, in 4 MiB   vs hashlib.sha256 (memory://
              chunks kept (what memory:// must do per ingest)  keeps one copy of each chunk:
              first-touch page faults bound it; is that faster than hashing?)

Everything is written under a fresh temp directory (in ``--dir``, default the system temp
dir) that is removed at exit, also on Ctrl-C or SIGTERM. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pairs import (
    MB,
    MIN_ROUNDS,
    Paired,
    add_options,
    chosen_cases,
    human,
    progress,
    run,
    scratch,
)

from casengine.backend import READ_CHUNK
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.ingest import CHUNK
from casengine.layout import RAW, blob_key

#: The issue's targets: engine / limit, median of 5 rounds at 256 MiB.
TARGETS = {"memory": 0.90, "local": 0.85, "local-path": 0.85, "read": 0.80}
ALL_CASES = ("memory", "local", "local-path", "read", "read-cold", "sha512", "disk", "memcopy")
DEFAULT_CASES = tuple(c for c in ALL_CASES if c != "read-cold")


# -- measuring --------------------------------------------------------------------------


@dataclass
class Result(Paired):
    case: str
    what: str
    limit: str
    nbytes: int
    target: float | None
    #: a machine probe (disk, memory) next to the limit, not an engine figure
    reference: bool = False
    limit_times: list[float] = field(default_factory=list)
    engine_times: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case, "what": self.what, "limit": self.limit, "bytes": self.nbytes,
            "limit_MBps": round(self.mbps(self.limit_times), 1),
            "engine_MBps": round(self.mbps(self.engine_times), 1),
            "ratio": round(self.ratio, 4), "ratios": [round(r, 4) for r in self.ratios],
            "target": self.target, "meets_target": self.meets_target,
            "reference": self.reference,
            "limit_seconds": self.limit_times, "engine_seconds": self.engine_times,
        }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_pairs(result: Result, limit: Callable[[], float], engine: Callable[[], float],
              rounds: int, warmup: int, progress: Callable[[str], None]) -> Result:
    """A B A B ...: ``limit`` and ``engine`` each return the seconds of their timed part."""
    for i in range(warmup + rounds):
        a = limit()
        b = engine()
        if i >= warmup:
            result.limit_times.append(a)
            result.engine_times.append(b)
        progress(f"  {result.case:<11} {'warm-up' if i < warmup else f'round {i - warmup + 1}'}:"
                 f" {result.limit} {result.nbytes / a / MB:7.0f} MB/s,"
                 f" engine {result.nbytes / b / MB:7.0f} MB/s, ratio {a / b:.2f}")
    return result


# -- the work ---------------------------------------------------------------------------


def plain_read(path: str, chunk: int = READ_CHUNK) -> int:
    """The plain way to read a file, in chunks of the engine's read size."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            n += len(block)
    return n


def drop_cache(path: str) -> None:
    """Evict a (clean, fsynced) file from the page cache; needs no privileges."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view):]
        os.fdatasync(f.fileno())


class Bench:
    def __init__(self, data: bytes, base: str, rounds: int, warmup: int,
                 progress: Callable[[str], None]) -> None:
        self.data = data
        self.base = base
        self.rounds = rounds
        self.warmup = warmup
        self.progress = progress
        self.sha256 = Digest("sha256", hashlib.sha256(data).hexdigest())
        self._file: str | None = None

    @property
    def file(self) -> str:
        """The bytes as a plain durable file, warm in the page cache (made on first use)."""
        if self._file is None:
            self._file = os.path.join(self.base, "plain.bin")
            write_file(self._file, self.data)
            plain_read(self._file)
        return self._file

    def _pairs(self, case: str, what: str, limit_name: str, limit: Callable[[], float],
               engine: Callable[[], float], target: float | None = None,
               reference: bool = False) -> Result:
        result = Result(case, what, limit_name, len(self.data), target, reference)
        return run_pairs(result, limit, engine, self.rounds, self.warmup, self.progress)

    def _sha256(self) -> float:
        return timed(lambda: hashlib.sha256(self.data).digest())

    def _ingest(self, url: str | None, source: object, expected: Digest,
                algorithm: str = "sha256") -> float:
        """Open a fresh store, time one ingest, check it, close and remove the store."""
        root = url or tempfile.mkdtemp(prefix="root-", dir=self.base)
        try:
            with Engine.open(root) as engine:
                t0 = time.perf_counter()
                res = engine.ingest(source, algorithm=algorithm)  # type: ignore[arg-type]
                dt = time.perf_counter() - t0
        finally:
            if url is None:
                shutil.rmtree(root, ignore_errors=True)
        if res.digest != expected or res.size != len(self.data) or not res.created:
            raise SystemExit(f"wrong ingest result {res} (want {expected})")
        return dt

    def memory(self) -> Result:
        return self._pairs("memory", "ingest bytes -> memory://", "sha256", self._sha256,
                           lambda: self._ingest("memory://", self.data, self.sha256),
                           TARGETS["memory"])

    def local(self) -> Result:
        return self._pairs("local", "ingest bytes -> local root", "sha256", self._sha256,
                           lambda: self._ingest(None, self.data, self.sha256),
                           TARGETS["local"])

    def local_path(self) -> Result:
        path = self.file
        return self._pairs("local-path", "ingest file path -> local root", "sha256",
                           self._sha256, lambda: self._ingest(None, path, self.sha256),
                           TARGETS["local-path"])

    def sha512(self) -> Result:
        expected = Digest("sha512", hashlib.sha512(self.data).hexdigest())
        return self._pairs("sha512", "ingest bytes -> memory:// (sha512)", "sha512",
                           lambda: timed(lambda: hashlib.sha512(self.data).digest()),
                           lambda: self._ingest("memory://", self.data, expected, "sha512"))

    def disk(self) -> Result:
        def write() -> float:
            path = os.path.join(self.base, "disk-limit.bin")
            try:
                return timed(lambda: write_file(path, self.data))
            finally:
                os.unlink(path)
        return self._pairs("disk", "plain write + fdatasync of a file", "sha256",
                           self._sha256, write, reference=True)

    def memcopy(self) -> Result:
        def copy() -> float:
            view = memoryview(self.data)
            t0 = time.perf_counter()
            kept = [bytes(view[off:off + CHUNK]) for off in range(0, len(view), CHUNK)]
            dt = time.perf_counter() - t0
            del kept  # freed untimed, as an engine is closed untimed
            return dt
        return self._pairs("memcopy", "copy into fresh memory, 4 MiB chunks", "sha256",
                           self._sha256, copy, reference=True)

    def read(self, cold: bool = False) -> Result:
        path = self.file
        root = tempfile.mkdtemp(prefix="read-root-", dir=self.base)
        try:
            with Engine.open(root) as engine:
                engine.ingest(self.data)
                blob = engine.backend.local_path(blob_key(self.sha256, RAW))  # type: ignore[attr-defined]

                def limit() -> float:
                    if cold:
                        drop_cache(path)
                    return timed(lambda: plain_read(path))

                def read() -> float:
                    if cold:
                        drop_cache(blob)
                    t0 = time.perf_counter()
                    n = sum(len(c) for c in engine.read(self.sha256))
                    dt = time.perf_counter() - t0
                    if n != len(self.data):
                        raise SystemExit(f"read {n} bytes of a {len(self.data)}-byte blob")
                    return dt

                if not cold:  # both warm: the blob was written with O_DIRECT, bypassing the cache
                    read()
                    plain_read(path)
                case = "read-cold" if cold else "read"
                what = "Engine.read local blob" + (" (cold cache)" if cold else " (warm cache)")
                return self._pairs(case, what, "plain_read", limit, read,
                                   None if cold else TARGETS["read"])
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def run(self, case: str) -> Result:
        if case == "read-cold":
            return self.read(cold=True)
        return getattr(self, case.replace("-", "_"))()


# -- reporting --------------------------------------------------------------------------


def machine_info(base: str) -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
        "kernel": platform.release(), "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        cpuinfo = open("/proc/cpuinfo").read()  # noqa: SIM115 - a one-off read
        if m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE):
            info["cpu"] = m.group(1).strip()
        info["sha_ni"] = bool(re.search(r"^flags\s*:.*\bsha_ni\b", cpuinfo, re.MULTILINE))
    with contextlib.suppress(OSError):
        best = ""
        for line in open("/proc/mounts"):  # noqa: SIM115 - a one-off read
            _, mnt, fstype, *_ = line.split()
            if (base == mnt or base.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, info["fs"] = mnt, fstype
    return info


def table(results: list[Result], info: dict[str, object], size: int, rounds: int,
          warmup: int) -> str:
    lines = [
        (f"casengine ingest benchmark: {human(size)} random blob, medians of {rounds} rounds"
         f" (+{warmup} warm-up), limit and case alternating (A B A B ...)"),
        (f"machine: {info.get('cpu', '?')}, {info.get('cpus')} CPUs, sha_ni={info.get('sha_ni')},"
         f" Python {info['python']}, {info['openssl']}, scratch fs {info.get('fs', '?')}"),
    ]
    if rounds < MIN_ROUNDS:
        lines.append(f"WARNING: fewer than {MIN_ROUNDS} rounds: not a reportable figure")
    head = (f"{'case (B)':<38} {'limit (A)':<11} {'A MB/s':>7} {'B MB/s':>7} {'ratio':>6}"
            f" {'min-max':>10}  target")
    lines += ["", head, "-" * len(head)]
    sha = [t for r in results if r.limit == "sha256" for t in r.limit_times]
    if sha:
        lines.append(f"{'hashlib.sha256 (the ingest limit)':<38} {'-':<11}"
                     f" {size / statistics.median(sha) / MB:>7.0f}")

    def row(r: Result) -> str:
        target = ""
        if r.target is not None:
            target = f">= {r.target:.2f} " + ("ok" if r.meets_target else "MISSED")
        return (f"{r.what:<38} {r.limit:<11} {r.mbps(r.limit_times):>7.0f}"
                f" {r.mbps(r.engine_times):>7.0f} {r.ratio:>6.2f}"
                f" {min(r.ratios):>4.2f}-{max(r.ratios):<4.2f}  {target}")

    lines += [row(r) for r in results if not r.reference]
    if refs := [r for r in results if r.reference]:
        lines += ["", "machine references (what bounds a backend, next to the same limit):"]
        lines += [row(r) for r in refs]
    lines += ["", ("ratio = median of per-pair (A time / B time) = B speed as a fraction of A;"
                   " 1.00 = at the limit; MB = 10^6 bytes")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, size="256M", size_help="blob size, binary units (default 256M = 256 MiB)",
                cases=ALL_CASES, default_cases=DEFAULT_CASES)
    args = ap.parse_args(argv)
    cases = chosen_cases(ap, args, ALL_CASES)

    saved_tempdir = tempfile.tempdir
    with scratch(args.dir) as base:
        tempfile.tempdir = base  # the temporary index of memory:// engines lands here too
        try:
            progress(f"generating {human(args.size)} of random bytes in {base}")
            bench = Bench(os.urandom(args.size), base, args.rounds, args.warmup, progress)
            results = [bench.run(case) for case in cases]
            info = machine_info(os.path.realpath(base))
        finally:
            tempfile.tempdir = saved_tempdir

    if args.json:
        print(json.dumps({
            "size": args.size, "rounds": args.rounds, "warmup": args.warmup, "machine": info,
            "results": [r.as_dict() for r in results],
        }, indent=2))
    else:
        print(table(results, info, args.size, args.rounds, args.warmup))
    missed = [r.case for r in results if r.meets_target is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    run(main)
