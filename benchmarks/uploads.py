"""Chunked upload sessions next to the machine's own limits, measured in the same run.

    python benchmarks/uploads.py [--size 1G] [--rounds 5] [--warmup 1] [--dir DIR]
                                 [--cases local-8m,local-1m,...] [--s3-size 64M]
                                 [--json] [--strict]

A blob is uploaded as an upload session: ``uploads.start()``, then one
``uploads.append(id, chunk, offset)`` per chunk, each a separate call that returns only once
the chunk is durable and acknowledged (what a client's PATCH waits for), then
``uploads.commit(id, digest)`` in a *new* engine object on the same root, as after a restart
or in another process. The timed part (B) is the appends plus that commit; opening and
closing engines and making and removing roots are not timed. The limit (A) is
``hashlib.sha256`` over the same bytes in one call.

Like ``benchmarks/ingest.py``, limit and case run alternately (A B A B ...) and the ratio is
the median of the per-pair ratios ``A time / B time`` (1.00 = the upload runs at the speed
of hashing the bytes once). The commit column is the median commit time: it reads none of
the uploaded data (the script counts what the backend reads during the commit and stops if
it is not zero), so it stays at milliseconds whatever the size.

A local round also measures the disk (D) between A and B: each chunk written to a new file
the way the local backend writes an append whose bytes the caller holds, then
``fdatasync``: copied 2 MiB at a time into the backend's aligned buffer (huge pages, where
the kernel gives them) and written from it with ``O_DIRECT``. That is what durability per
append costs at least. The ``disk`` column is D's speed as a ratio to A's, ``B/D`` the
upload's speed as a ratio to D's (medians of the per-round ratios): where ``disk`` is below
1, the disk, not hashing, bounds a durable upload on this machine.

Cases (``--cases``, comma separated; default: all):

  local-8m   upload to a fresh local root in 8 MiB appends     vs hashlib.sha256  (>= 0.80)
  local-1m   the same in 1 MiB appends                         vs hashlib.sha256  (>= 0.50)
  s3-8m      ``--s3-size`` (64 MiB) to S3 in 8 MiB appends      vs hashlib.sha256 over those
             (moto's server on 127.0.0.1, started here; a      bytes (orientation, no target:
             fresh bucket per round)                            moto is no S3)

Everything is written under a fresh temp directory (``--dir``, default the system temp dir)
or in moto's memory, and removed at exit, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ingest import machine_info
from pairs import (
    MB,
    MIN_ROUNDS,
    Paired,
    add_options,
    chosen_cases,
    human,
    parse_size,
    progress,
    run,
    scratch,
)

from backends.local_files import BOUNCE, AlignedBuffer
from casengine.digest import Digest
from casengine.engine import Engine

MiB = 1 << 20
TARGETS = {"local-8m": 0.80, "local-1m": 0.50}
ALL_CASES = ("local-8m", "local-1m", "s3-8m")


# -- measuring --------------------------------------------------------------------------


@dataclass
class Result(Paired):
    case: str
    what: str
    nbytes: int
    chunk: int
    target: float | None
    limit_times: list[float] = field(default_factory=list)
    engine_times: list[float] = field(default_factory=list)
    commit_times: list[float] = field(default_factory=list)
    disk_times: list[float] = field(default_factory=list)

    @property
    def disk_ratio(self) -> float | None:
        """The disk's speed as a ratio to sha256's (median over rounds)."""
        if not self.disk_times:
            return None
        return statistics.median(a / d for a, d in zip(self.limit_times, self.disk_times,
                                                       strict=True))

    @property
    def vs_disk(self) -> float | None:
        """The upload's speed as a ratio to the disk's (median over rounds)."""
        if not self.disk_times:
            return None
        return statistics.median(d / b for d, b in zip(self.disk_times, self.engine_times,
                                                       strict=True))

    @property
    def needed_vs_disk(self) -> float | None:
        """How close to the bare disk the upload had to come to meet the target: where the
        disk alone is near (or under) the target, a miss says more about the disk."""
        if self.target is None or not self.disk_ratio:
            return None
        return self.target / self.disk_ratio

    @property
    def commit_ms(self) -> float | None:
        return statistics.median(self.commit_times) * 1000 if self.commit_times else None

    def as_dict(self) -> dict[str, object]:
        return {
            "case": self.case, "what": self.what, "bytes": self.nbytes, "chunk": self.chunk,
            "limit": "sha256", "limit_MBps": round(self.mbps(self.limit_times), 1),
            "engine_MBps": round(self.mbps(self.engine_times), 1),
            "ratio": round(self.ratio, 4), "ratios": [round(r, 4) for r in self.ratios],
            "commit_ms": None if self.commit_ms is None else round(self.commit_ms, 2),
            "disk_ratio": None if self.disk_ratio is None else round(self.disk_ratio, 4),
            "engine_vs_disk": None if self.vs_disk is None else round(self.vs_disk, 4),
            "needed_vs_disk": None if self.needed_vs_disk is None else round(
                self.needed_vs_disk, 4),
            "disk_seconds": self.disk_times,
            "target": self.target, "meets_target": self.meets_target,
            "limit_seconds": self.limit_times,
            "engine_seconds": self.engine_times, "commit_seconds": self.commit_times,
        }


@dataclass
class Round:
    """One upload's timings: all of it (appends and commit), and the commit alone."""

    total: float
    commit: float | None = None


def chunks_of(data: bytes, chunk: int) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    for off in range(0, len(view), chunk):
        yield off, view[off : off + chunk]


def upload(open_engine: Callable[[], Engine], data: bytes, chunk: int, digest: Digest) -> Round:
    """Append ``data`` in ``chunk``-byte appends, then commit in a new engine; time both."""
    with open_engine() as engine:
        t0 = time.perf_counter()
        upload_id = engine.uploads.start().id
        for off, piece in chunks_of(data, chunk):
            engine.uploads.append(upload_id, piece, off)
        appends = time.perf_counter() - t0
    with open_engine() as engine:  # as after a restart, or in another process
        read = count_reads(engine)
        t0 = time.perf_counter()
        result = engine.uploads.commit(upload_id, digest, size=len(data))
        commit = time.perf_counter() - t0
        if result.digest != digest or result.size != len(data) or not result.created:
            raise SystemExit(f"wrong commit result {result} (want {digest})")
        if read:
            raise SystemExit(f"the commit read uploaded data again: {read}")
    return Round(appends + commit, commit)


def count_reads(engine: Engine) -> list[str]:
    """Record every backend call that reads stored bytes from now on."""
    seen: list[str] = []
    backend = engine.backend
    for name in ("read", "read_upload", "get_exactly"):
        real = getattr(backend, name, None)
        if real is None:
            continue

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            seen.append(_name)
            return _real(*args, **kwargs)

        setattr(backend, name, counted)
    return seen


def durable_writes(path: str, data: bytes, chunk: int) -> float:
    """The disk's share of a durable append: each chunk written as the local backend writes
    an append it is handed as bytes (direct, through an aligned buffer), then
    ``fdatasync``, to a new file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    direct = -1
    if chunk % mmap.PAGESIZE == 0 and hasattr(os, "O_DIRECT"):
        with contextlib.suppress(OSError):  # tmpfs and some others have no O_DIRECT
            direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
    bounce = AlignedBuffer(BOUNCE) if direct >= 0 else None
    try:
        t0 = time.perf_counter()
        for off, piece in chunks_of(data, chunk):
            if bounce is not None and len(piece) == chunk:
                for at, part in chunks_of(piece, BOUNCE):
                    bounce.view[:len(part)] = part  # the backend's copy into its buffer
                    os.pwrite(direct, bounce.view[:len(part)], off + at)
            else:
                while piece:
                    n = os.pwrite(fd, piece, off)
                    piece, off = piece[n:], off + n
            os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        if bounce is not None:
            bounce.close()
        if direct >= 0:
            os.close(direct)
        os.close(fd)
        os.unlink(path)


class Bench:
    def __init__(self, data: bytes, s3_size: int, base: str, rounds: int, warmup: int,
                 progress: Callable[[str], None]) -> None:
        self.data = data
        self.s3_data = data[:s3_size] if s3_size <= len(data) else os.urandom(s3_size)
        self.base = base
        self.rounds = rounds
        self.warmup = warmup
        self.progress = progress

    def _pairs(self, result: Result, data: bytes, case: Callable[[], Round],
               disk: Callable[[], float] | None = None) -> Result:
        for i in range(self.warmup + self.rounds):
            t0 = time.perf_counter()
            hashlib.sha256(data).digest()
            a = time.perf_counter() - t0
            # each timed part starts after the deferred work of the one before it: the
            # unlinks of the last round's files (and, with online discard, their TRIMs)
            # would otherwise land in this round's fdatasyncs
            os.sync()
            d = disk() if disk else None
            os.sync()
            b = case()
            if i >= self.warmup:
                result.limit_times.append(a)
                result.engine_times.append(b.total)
                if b.commit is not None:
                    result.commit_times.append(b.commit)
                if d is not None:
                    result.disk_times.append(d)
            extra = "" if d is None else f", disk {len(data) / d / MB:6.0f} MB/s"
            extra += "" if b.commit is None else f", commit {b.commit * 1000:.1f} ms"
            self.progress(f"  {result.case:<9} {'warm-up' if i < self.warmup else f'round {i - self.warmup + 1}'}:"
                          f" sha256 {len(data) / a / MB:6.0f} MB/s, case {len(data) / b.total / MB:6.0f}"
                          f" MB/s, ratio {a / b.total:.2f}{extra}")
        return result

    def local(self, chunk: int) -> Result:
        case = f"local-{chunk // MiB}m"
        digest = Digest("sha256", hashlib.sha256(self.data).hexdigest())
        path = os.path.join(self.base, "disk-limit.bin")

        def one() -> Round:
            root = tempfile.mkdtemp(prefix="root-", dir=self.base)
            try:
                return upload(lambda: Engine.open(root), self.data, chunk, digest)
            finally:
                shutil.rmtree(root, ignore_errors=True)

        what = f"upload in {human(chunk)} appends -> local"
        return self._pairs(Result(case, what, len(self.data), chunk, TARGETS[case]), self.data,
                           one, lambda: durable_writes(path, self.data, chunk))

    def s3(self, chunk: int) -> Result:
        import boto3

        from casengine.testing.s3server import DUMMY_CREDENTIALS, moto_server

        data = self.s3_data
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        with moto_server() as endpoint:
            options = {"endpoint_url": endpoint, **DUMMY_CREDENTIALS,
                       "client_kwargs": {"region_name": "us-east-1"}}
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                  aws_access_key_id=DUMMY_CREDENTIALS["key"],
                                  aws_secret_access_key=DUMMY_CREDENTIALS["secret"])

            def one() -> Round:
                bucket = f"bench-{uuid.uuid4().hex}"
                client.create_bucket(Bucket=bucket)
                index = tempfile.mkdtemp(prefix="index-", dir=self.base)
                try:
                    done = upload(lambda: Engine.open(f"s3://{bucket}/root", index=index,
                                                      **options), data, chunk, digest)
                    if client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                        raise SystemExit("the commit left a multipart upload open")
                    return done
                finally:
                    shutil.rmtree(index, ignore_errors=True)
                    for upload_ in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                        client.abort_multipart_upload(Bucket=bucket, Key=upload_["Key"],
                                                      UploadId=upload_["UploadId"])
                    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                        client.delete_object(Bucket=bucket, Key=obj["Key"])
                    client.delete_bucket(Bucket=bucket)

            what = f"upload {human(len(data))} in {human(chunk)} appends -> S3 (moto)"
            return self._pairs(Result(f"s3-{chunk // MiB}m", what, len(data), chunk, None),
                               data, one)

    def run(self, case: str) -> Result:
        kind, _, chunk = case.partition("-")
        return getattr(self, kind)(int(chunk.removesuffix("m")) * MiB)


# -- reporting --------------------------------------------------------------------------


def table(results: list[Result], info: dict[str, object], size: int, rounds: int,
          warmup: int) -> str:
    lines = [
        (f"casengine upload benchmark: {human(size)} random blob as separate acknowledged "
         f"appends, medians of {rounds} rounds (+{warmup} warm-up), sha256 and case "
         "alternating (A B A B ...)"),
        (f"machine: {info.get('cpu', '?')}, {info.get('cpus')} CPUs, sha_ni={info.get('sha_ni')},"
         f" Python {info['python']}, {info['openssl']}, scratch fs {info.get('fs', '?')}"),
    ]
    if rounds < MIN_ROUNDS:
        lines.append(f"WARNING: fewer than {MIN_ROUNDS} rounds: not a reportable figure")
    head = (f"{'case (B)':<42} {'A MB/s':>7} {'B MB/s':>7} {'ratio':>6} {'min-max':>10}"
            f" {'disk':>5} {'B/D':>5} {'commit':>9}  target")
    lines += ["", head, "-" * len(head)]

    def row(r: Result) -> str:
        target = ""
        if r.target is not None:
            target = f">= {r.target:.2f} " + ("ok" if r.meets_target else "MISSED")
        commit = "" if r.commit_ms is None else f"{r.commit_ms:.1f} ms"
        disk = "" if r.disk_ratio is None else f"{r.disk_ratio:.2f}"
        vs_disk = "" if r.vs_disk is None else f"{r.vs_disk:.2f}"
        return (f"{r.what:<42} {r.mbps(r.limit_times):>7.0f} {r.mbps(r.engine_times):>7.0f}"
                f" {r.ratio:>6.2f} {min(r.ratios):>4.2f}-{max(r.ratios):<4.2f} {disk:>5}"
                f" {vs_disk:>5} {commit:>9}  {target}")

    lines += [row(r) for r in results]
    for r in results:
        if r.meets_target is False and r.needed_vs_disk is not None:
            lines.append(f"  {r.case}: the disk alone ran at {r.disk_ratio:.2f} of sha256; meeting"
                         f" {r.target:.2f} needed B/D >= {r.needed_vs_disk:.2f}")
    lines += ["", ("A = hashlib.sha256 over the same bytes; ratio = median of per-pair (A time /"
                   " B time); B includes the commit, made in a new engine (restart) and reading"
                   " nothing back"),
              ("disk = each chunk copied through an aligned buffer and written with O_DIRECT, as"
               " the backend writes an append handed over as bytes, + fdatasync (D), same"
               " rounds, as a ratio to A; B/D = the upload as a ratio to D; MB = 10^6 bytes")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, size="1G", size_help="blob size of the local cases, binary units "
                "(default 1G = 1 GiB)", cases=ALL_CASES, default_cases=ALL_CASES)
    ap.add_argument("--s3-size", type=parse_size, default=parse_size("64M"),
                    help="blob size of the S3 case (default 64M)")
    args = ap.parse_args(argv)
    cases = chosen_cases(ap, args, ALL_CASES)
    if args.s3_size < 1:
        ap.error("--s3-size must be >= 1 byte")

    with scratch(args.dir) as base:
        progress(f"generating {human(args.size)} of random bytes in {base}")
        bench = Bench(os.urandom(args.size), args.s3_size, base, args.rounds, args.warmup,
                      progress)
        results = [bench.run(case) for case in cases]
        info = machine_info(os.path.realpath(base))

    if args.json:
        print(json.dumps({
            "size": args.size, "s3_size": args.s3_size, "rounds": args.rounds,
            "warmup": args.warmup, "machine": info, "results": [r.as_dict() for r in results],
        }, indent=2))
    else:
        print(table(results, info, args.size, args.rounds, args.warmup))
    missed = [r.case for r in results if r.meets_target is False]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    run(main)
