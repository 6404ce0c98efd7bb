"""``casengine bench``: the engine's throughput next to the machine's own limits, same run.

For each size, random (incompressible) bytes are generated once, then

1. the **limits** are measured: ``hashlib.sha256`` on one thread and on two threads at once
   (hashlib releases the GIL), a memory copy, zstd level 3, and the backend's own raw write
   (:meth:`Backend.writer` + commit of the same bytes), full read and 1 MiB range read;
2. the **engine** does the same work: ingest and chunked upload (8 MiB appends) next to
   sha256 on one thread, read and a 1 MiB range read in the middle next to the backend's
   raw read and range read. Each figure runs alternately with its limit (A B A B, as in
   ``benchmarks/``), so both see the same machine state.

MB/s figures are medians over repetitions (MB = 10^6 bytes); a figure's ratio is the median
of the per-pair ratios ``engine speed / limit speed``: 1.00 means the engine runs at the
limit. The number of repetitions adapts to the size (see :func:`repetitions`), so 1 MiB gets
many and 1 GiB three, after one warm-up each.

The engine's bytes go to the root's own backend, but through an engine with a **private
index** (beside the root's index, as durable as it), so the root's index is never touched.
Every object written (blobs, upload staging, the raw-limit object) and every directory that
had to be created for it is removed at the end, also on an error or Ctrl-C. The random
digests cannot name anything already stored, so nothing of the root's own is ever deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from casengine.backend import READ_CHUNK, Backend, LocalPaths
from casengine.bench_report import (
    FIGURES,
    LIMITS,
    Figure,
    Limit,
    Report,
    format_table,
    machine_info,
    plot,
    size_label,
)
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import NotFound
from casengine.index import LmdbIndex
from casengine.ingest import CHUNK
from casengine.layout import RAW, UPLOADS, blob_key, upload_key

MB = 1_000_000
MiB = 1 << 20
#: The default sizes of ``casengine bench``.
DEFAULT_SIZES = (MiB, 64 * MiB, 1 << 30)
#: Length of the range read, in the middle of the blob (the whole blob when smaller).
RANGE = MiB
#: Append size of the chunked upload (raised to the backend's ``min_chunk`` if larger).
UPLOAD_CHUNK = 8 * MiB
#: From this size on, three repetitions after the warm-up; below, at least five.
LARGE = 256 * MiB
#: Below ``LARGE``, repeat until this much time was measured (or ``MAX_REPS``).
MIN_TIME = 0.2
MAX_REPS = 100

#: What a run does for each size, in order: one progress step each.
STEPS = ("random data", "sha256", "sha256-2t", "memcopy", "zstd-3", "backend-write",
         "backend-read", "backend-range", "ingest", "read", "range-read", "upload-8m")

#: The figures that write, also shown next to the backend's raw write.
WRITING = ("ingest", "upload-8m")

#: Called with the label of each step as it begins ("64 MiB: ingest").
Progress = Callable[[str], None]


# -- timing -----------------------------------------------------------------------------------


def repetitions(nbytes: int) -> tuple[int, int, float]:
    """``(min reps, max reps, min measured seconds)`` for work moving ``nbytes`` per rep.

    Large work: exactly three (after a warm-up), so 1 GiB stays in the minutes. Small work:
    at least five, more until ``MIN_TIME`` was measured, so a 1 MiB median is not noise.
    """
    if nbytes >= LARGE:
        return 3, 3, 0.0
    return 5, MAX_REPS, MIN_TIME


def measure(run: Callable[[], float], nbytes: int, *, warmup: int = 1) -> tuple[float, int]:
    """Median MB/s of ``run()``, which does the work once and returns its timed seconds."""
    for _ in range(warmup):
        run()
    least, most, min_time = repetitions(nbytes)
    times: list[float] = []
    while len(times) < most and (len(times) < least or sum(times) < min_time):
        times.append(run())
    return nbytes / max(statistics.median(times), 1e-9) / MB, len(times)


def measure_pairs(limit: Callable[[], float], engine: Callable[[], float], limit_bytes: int,
                  engine_bytes: int, *, warmup: int = 1) -> tuple[float, float, float, int]:
    """The engine next to its limit, alternately (A B A B), so both see the same machine.

    Returns the engine's and the limit's median MB/s, the median of the per-pair ratios
    (engine speed / limit speed), and the number of pairs. On a busy machine the per-pair
    ratio is far steadier than a quotient of medians taken at different times.
    """
    for _ in range(warmup):
        limit()
        engine()
    least, most, min_time = repetitions(max(limit_bytes, engine_bytes))
    a: list[float] = []
    b: list[float] = []
    while len(b) < most and (len(b) < least or sum(a) + sum(b) < min_time):
        a.append(limit())
        b.append(engine())
    ratios = [(engine_bytes / max(tb, 1e-9)) / (limit_bytes / max(ta, 1e-9))
              for ta, tb in zip(a, b, strict=True)]
    return (engine_bytes / max(statistics.median(b), 1e-9) / MB,
            limit_bytes / max(statistics.median(a), 1e-9) / MB,
            statistics.median(ratios), len(b))


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def drain(chunks: Iterator[bytes]) -> int:
    return sum(len(c) for c in chunks)


def pieces(view: memoryview, size: int) -> Iterator[memoryview]:
    for off in range(0, len(view), size):
        yield view[off:off + size]


# -- what the bench writes, and removing it ---------------------------------------------------


class Scratch:
    """Every key the bench writes on the backend, and the directories made for them.

    Directories are only known on backends with local paths; one is removed at the end
    only if it did not exist before the bench wrote under it, and only if empty.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.keys: set[str] = set()
        self.uploads: set[str] = set()  #: sessions not committed yet
        self.prefixes: set[str] = set()  #: every staging prefix used, swept at the end
        self._dirs: list[str] = []

    def will_write(self, key: str) -> None:
        self.keys.add(key)
        if key.startswith(UPLOADS):
            self.prefixes.add(key.rsplit("/", 1)[0] + "/")
        if not isinstance(self.backend, LocalPaths):
            return
        path = self.backend.local_path(key)
        parents = []
        for _ in range(key.count("/")):
            path = os.path.dirname(path)
            parents.append(path)
        for d in reversed(parents):  # top down: from the first missing one, all are ours
            if not os.path.isdir(d) and d not in self._dirs:
                self._dirs.append(d)

    def will_upload(self, upload_id: str) -> None:
        self.uploads.add(upload_id)
        self.will_write(upload_key(upload_id) + "/data")

    def clean(self, engine: Engine) -> None:
        """Remove everything written, best effort: one failure does not stop the rest."""
        errors: list[BaseException] = []
        for upload_id in self.uploads:
            try:
                rec = engine.index.get_upload(upload_id)
                self.backend.discard_upload(upload_key(upload_id), (rec or {}).get("backend")
                                            or {})
                if rec is not None:
                    engine.index.update_upload(upload_id, lambda _: None)
            except Exception as exc:  # noqa: BLE001 - reported after the rest is removed
                errors.append(exc)
        # staging keys are the backend's own business (parts by offset, a multipart
        # target): sweep each prefix used rather than trust the one key expected there
        swept = [k for p in sorted(self.prefixes) for k in self.backend.list(p)]
        for key in sorted(self.keys | set(swept)):
            try:
                self.backend.delete(key)
            except NotFound:
                pass
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        for d in sorted(self._dirs, key=len, reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def private_engine(engine: Engine) -> Iterator[Engine]:
    """An engine on ``engine``'s backend with an index of its own, removed at the end.

    The index lives beside the root's index (same filesystem), durable unless the backend
    is ephemeral, so an ingest pays the same index commit as a real one.
    """
    base = None
    if isinstance(engine.index, LmdbIndex):
        base = os.path.dirname(os.path.abspath(engine.index.path))
    try:
        path = tempfile.mkdtemp(prefix=".casengine-bench-index-", dir=base)
    except OSError:  # the root's index directory is not ours to write in
        path = tempfile.mkdtemp(prefix="casengine-bench-index-")
    try:
        index = LmdbIndex(path, temporary=engine.backend.ephemeral)
        try:
            yield Engine(engine.backend, index, chunk_size=engine.chunk_size)
        finally:
            index.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- one size ----------------------------------------------------------------------------------


class SizeRun:
    """Limits and engine figures for one size, on one backend."""

    def __init__(self, engine: Engine, scratch: Scratch, size: int, progress: Progress) -> None:
        self.engine = engine
        self.backend = engine.backend
        self.scratch = scratch
        self.size = size
        self._progress = progress
        self.data = b""
        self.view = memoryview(b"")
        self.digest = Digest("sha256", "0" * 64)
        self.limits: dict[str, Limit] = {}
        #: how each limit was measured, to run it again next to its engine figure
        self.limit_runs: dict[str, tuple[Callable[[], float], int]] = {}
        self.figures: list[Figure] = []
        self.range_start = max(0, (size - RANGE) // 2)
        self.range_len = min(RANGE, size)
        # the raw-limit object sits where upload staging lives: 'uploads purge' sweeps it
        # should the bench ever be killed before it cleans up
        self.raw_key = upload_key(secrets.token_hex(16)) + "/data"

    def step(self, name: str) -> None:
        self._progress(f"{size_label(self.size)}: {name}")

    def run(self) -> None:
        self.step("random data")
        self.data = os.urandom(self.size)
        self.view = memoryview(self.data)
        self.digest = Digest("sha256", hashlib.sha256(self.data).hexdigest())
        try:
            self.machine_limits()
            self.backend_limits()
            self.engine_figures()
        finally:  # free the bytes before the next size's are made
            self.view = memoryview(b"")
            self.data = b""
            with contextlib.suppress(NotFound):
                self.backend.delete(self.raw_key)

    # -- limits

    def limit(self, name: str, run: Callable[[], float], nbytes: int | None = None) -> None:
        self.step(name)
        nbytes = self.size if nbytes is None else nbytes
        mbps, reps = measure(run, nbytes)
        sha = self.limits["sha256"].mbps if "sha256" in self.limits else mbps
        self.limits[name] = Limit(name, self.size, nbytes, mbps, reps, mbps / sha)
        self.limit_runs[name] = (run, nbytes)

    def machine_limits(self) -> None:
        data, view = self.data, self.view
        self.limit("sha256", lambda: timed(lambda: hashlib.sha256(data).digest()))

        with ThreadPoolExecutor(2, thread_name_prefix="casengine-bench") as pool:
            def two() -> float:
                t0 = time.perf_counter()
                futures = [pool.submit(hashlib.sha256, data) for _ in range(2)]
                for f in futures:
                    f.result()
                return time.perf_counter() - t0

            self.limit("sha256-2t", two, 2 * self.size)

        dest = memoryview(bytearray(min(self.size, LARGE)))

        def copy() -> float:
            step = len(dest)
            t0 = time.perf_counter()
            for off in range(0, len(view), step):
                n = min(step, len(view) - off)
                dest[:n] = view[off:off + n]
            return time.perf_counter() - t0

        self.limit("memcopy", copy)  # the warm-up touches every page of dest
        dest.release()

        import zstandard

        cctx = zstandard.ZstdCompressor(level=3)

        def compress() -> float:
            t0 = time.perf_counter()
            for piece in pieces(view, CHUNK):
                cctx.compress(piece)
            return time.perf_counter() - t0

        self.limit("zstd-3", compress)

    def raw_write(self) -> float:
        backend, key = self.backend, self.raw_key
        t0 = time.perf_counter()
        with backend.writer(key) as w:
            for piece in pieces(self.view, CHUNK):
                w.write(piece)
            w.commit(key)
        return time.perf_counter() - t0

    def backend_limits(self) -> None:
        backend, key = self.backend, self.raw_key
        self.scratch.will_write(key)

        def write() -> float:
            dt = self.raw_write()
            backend.delete(key)
            return dt

        self.limit("backend-write", write)
        # the object the raw reads read, here and next to the engine's reads: written as
        # the engine's blob will be; removed at the end of the size
        self.raw_write()

        def read() -> float:
            t0 = time.perf_counter()
            n = drain(backend.read(key, chunk_size=READ_CHUNK))
            dt = time.perf_counter() - t0
            _check(n == self.size, f"raw read of {n} bytes, want {self.size}")
            return dt

        self.limit("backend-read", read)

        def read_range() -> float:
            t0 = time.perf_counter()
            n = drain(backend.read(key, self.range_start, self.range_len,
                                   chunk_size=READ_CHUNK))
            dt = time.perf_counter() - t0
            _check(n == self.range_len, f"raw range read of {n} bytes")
            return dt

        self.limit("backend-range", read_range, self.range_len)

    # -- the engine

    def figure(self, name: str, run: Callable[[], float], nbytes: int | None = None) -> None:
        self.step(name)
        nbytes = self.size if nbytes is None else nbytes
        limit = FIGURES[name][1]
        limit_run, limit_bytes = self.limit_runs[limit]
        mbps, limit_mbps, ratio, reps = measure_pairs(limit_run, run, limit_bytes, nbytes)
        write = self.limits["backend-write"].mbps if name in WRITING else None
        self.figures.append(Figure(name, self.size, nbytes, mbps, limit, limit_mbps, ratio,
                                   reps, write and mbps / write))

    def engine_figures(self) -> None:
        engine, digest = self.engine, self.digest
        self.scratch.will_write(blob_key(digest, RAW))

        def ingest() -> float:
            engine.delete(digest)  # no dedupe: every repetition stores the bytes
            t0 = time.perf_counter()
            res = engine.ingest(self.data)
            dt = time.perf_counter() - t0
            _check(res.created and res.digest == digest and res.size == self.size,
                   f"ingest gave {res}, want a new {digest} of {self.size} bytes")
            return dt

        self.figure("ingest", ingest)  # the last repetition's blob stays for the reads

        def read() -> float:
            t0 = time.perf_counter()
            n = drain(engine.read(digest))
            dt = time.perf_counter() - t0
            _check(n == self.size, f"Engine.read gave {n} bytes, want {self.size}")
            return dt

        self.figure("read", read)

        def read_range() -> float:
            t0 = time.perf_counter()
            n = drain(engine.read(digest, self.range_start, self.range_len))
            dt = time.perf_counter() - t0
            _check(n == self.range_len, f"Engine.read of a range gave {n} bytes")
            return dt

        self.figure("range-read", read_range, self.range_len)

        uploads = engine.uploads
        chunk = max(UPLOAD_CHUNK, uploads.min_chunk)

        def upload() -> float:
            engine.delete(digest)  # else the commit only dedupes
            t0 = time.perf_counter()
            upload_id = uploads.start().id
            self.scratch.will_upload(upload_id)
            for off in range(0, self.size, chunk):
                uploads.append(upload_id, self.view[off:off + chunk], off)
            res = uploads.commit(upload_id, digest)
            dt = time.perf_counter() - t0
            self.scratch.uploads.discard(upload_id)  # committed: the session is gone
            _check(res.created and res.size == self.size, f"upload commit gave {res}")
            return dt

        self.figure("upload-8m", upload)
        engine.delete(digest)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"bench: {what}")


# -- the whole run -----------------------------------------------------------------------------


def run(engine: Engine, sizes: list[int], progress: Progress | None = None) -> Report:
    """Measure every limit and figure at each size on ``engine``'s backend; clean up."""
    backend = getattr(engine.backend, "inner", engine.backend)  # the one behind the retries
    report = Report(engine.backend.url, type(backend).__name__, list(sizes), machine_info())
    t0 = time.perf_counter()
    with private_engine(engine) as scratch_engine:
        scratch = Scratch(engine.backend)
        try:
            for size in sizes:
                one = SizeRun(scratch_engine, scratch, size, progress or (lambda _: None))
                one.run()
                report.limits.extend(one.limits.values())
                report.figures.extend(one.figures)
        finally:
            scratch.clean(scratch_engine)
    report.seconds = time.perf_counter() - t0
    return report


def total_steps(sizes: list[int]) -> int:
    return len(sizes) * len(STEPS)


__all__ = ["DEFAULT_SIZES", "FIGURES", "LIMITS", "STEPS", "Figure", "Limit", "Report",
           "format_table", "plot", "run", "total_steps"]
