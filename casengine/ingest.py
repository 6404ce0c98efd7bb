"""Moving bytes in: turn any source into chunks, and write them on a second thread.

Ingest is bounded by sha256 on one core. To reach that limit the calling thread only
hashes: files and streams are read ahead on a reader thread (:func:`_read_ahead`), and
:class:`WritePipeline` hands each hashed chunk to a writer thread that stores it: for an
ingest, a :class:`~casengine.compression.BlobSink` that compresses it if the policy says
so, computes the xxh3 of the stored bytes and writes them to the backend. ``hashlib``,
``zstandard``, ``xxhash`` and file I/O release the GIL, so the threads run in parallel.
Memory stays bounded: stream sources are read into a small pool of reused buffers, and a
buffer goes back to the pool only once it has been written.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Protocol, Self, TypeVar

import xxhash

from casengine import hashstate
from casengine.backend import Buffer
from casengine.errors import InvalidInput

#: Chunk size for reading streams and files: large enough that per-chunk overhead vanishes
#: next to hashing, small enough that the buffer pool stays a few MiB.
CHUNK = 4 << 20
#: A chunk this big starts the writer thread at once; smaller blobs may need none.
THREAD_AT = 1 << 20
#: Buffers in flight per ingest (read ahead, hashing, writing); bounds memory at POOL * CHUNK.
POOL = 6

#: The size of a huge page: anonymous memory may be made of these (see :func:`private_map`).
HUGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_PRIVATE = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)

Source = bytes | bytearray | memoryview | str | os.PathLike | IO[bytes] | Iterable[bytes]
#: A chunk to hash and write, and the buffer to give back once it is written (or None).
Chunk = tuple[memoryview, mmap.mmap | None]


def private_map(size: int) -> mmap.mmap:
    """``size`` bytes of anonymous memory, private to this process and page-aligned, that
    the kernel may make of huge pages (transparent huge pages in ``madvise`` or ``always``
    mode) wherever a whole one fits.

    Physically contiguous memory is written direct in one disk request: from 4 KiB pages a
    1 MiB write is 256 segments, more than the 254 a virtio disk takes per request. And a
    fresh buffer then costs a page fault per 2 MiB instead of per 4 KiB. A ``blob put`` of
    1 GiB took 0.77 s against 0.80 s (median of six, alternating). Without huge pages the
    memory is plain pages, which work the same.
    """
    if not _PRIVATE:
        return mmap.mmap(-1, size)
    buf = mmap.mmap(-1, size, flags=_PRIVATE)
    if _MADV_HUGEPAGE is not None:
        with contextlib.suppress(OSError):  # no huge pages: plain ones then
            buf.madvise(_MADV_HUGEPAGE)
    return buf


class BufferPool:
    """At most ``count`` reusable buffers; ``get`` blocks while all are in flight.

    Buffers are anonymous maps (:func:`private_map`), so they are page-aligned: a local
    backend can hand them to the disk with O_DIRECT, without a copy through the page cache.
    """

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._left = count
        self._size = size
        self._lock = threading.Lock()

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._left:
                self._left -= 1
                return private_map(self._size)
        return self._free.get()

    def put(self, buf: mmap.mmap) -> None:
        self._free.put(buf)


def _from_buffer(data: bytes | bytearray | memoryview, size: int) -> Iterator[Chunk]:
    view = memoryview(data).cast("B")
    for off in range(0, len(view), size):
        yield view[off : off + size], None


def _from_stream(f: Any, pool: BufferPool, size: int) -> Iterator[Chunk]:
    readinto = getattr(f, "readinto", None)
    if readinto is None:  # a read()-only object: take its bytes as they come
        while chunk := f.read(size):
            yield memoryview(chunk), None
        return
    while True:
        buf = pool.get()
        view = memoryview(buf)
        filled = 0
        # fill the whole buffer: pipes and sockets return short reads
        while filled < size:
            n = readinto(view[filled:])
            if not n:
                break
            filled += n
        if not filled:
            pool.put(buf)
            return
        yield view[:filled], buf
        if filled < size:
            return


def _from_iterable(chunks: Iterable[bytes]) -> Iterator[Chunk]:
    for chunk in chunks:
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"an ingest source yielded {type(chunk).__name__}, not bytes")
        if chunk:
            yield memoryview(chunk).cast("B"), None


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


@contextlib.contextmanager
def _read_ahead(chunks: Iterator[Chunk], pool: BufferPool) -> Iterator[Iterator[Chunk]]:
    """Run ``chunks`` on a reader thread, so reading overlaps hashing."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=POOL)
    stop = threading.Event()

    def run() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    if chunk[1] is not None:
                        pool.put(chunk[1])
                    return
                ready.put(chunk)
            ready.put(_END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            ready.put(_Failed(exc))

    def consume() -> Iterator[Chunk]:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    reader = threading.Thread(target=run, name="casengine-reader", daemon=True)
    reader.start()
    try:
        yield consume()
    finally:
        stop.set()
        # Give queued buffers back so a reader blocked on the pool or the queue can finish.
        # A reader blocked on a silent pipe is left to die with the process.
        deadline = time.monotonic() + 1.0
        while reader.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                item = ready.get(timeout=0.05)
                if isinstance(item, tuple) and item[1] is not None:
                    pool.put(item[1])


@contextlib.contextmanager
def open_source(source: Source, pool: BufferPool, size: int = CHUNK) -> Iterator[Iterator[Chunk]]:
    """Chunks of ``source``: bytes-like, a path, a binary file object, or an iterable of bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield _from_buffer(source, size)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            with _read_ahead(_from_stream(f, pool, size), pool) as chunks:
                yield chunks
    elif isinstance(source, io.TextIOBase):
        raise InvalidInput("cannot ingest a text stream: open the file in binary mode ('rb')")
    elif hasattr(source, "readinto"):
        with _read_ahead(_from_stream(source, pool, size), pool) as chunks:
            yield chunks
    elif hasattr(source, "read"):
        yield _from_stream(source, pool, size)
    elif isinstance(source, Iterable):
        yield _from_iterable(source)
    else:
        raise InvalidInput(f"cannot ingest a {type(source).__name__}: want bytes, a path, "
                           "a binary file or an iterable of bytes")


class Target(Protocol):
    """Where a pipeline writes: a backend writer or appender, or a BlobSink."""

    def write(self, data: Buffer) -> None: ...


class _Workers:
    """Daemon threads that stay for the next job: starting a thread per pipeline costs
    ~0.1 ms, a tenth of a 1 MiB append. Not ThreadPoolExecutor: its workers are joined at
    interpreter exit, and a pipeline whose owner is a daemon thread would hang it there."""

    SPARE = 16

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        if start:
            threading.Thread(target=self._serve, name="casengine-writer", daemon=True).start()
        self._jobs.put(job)

    def _serve(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                if self._idle >= self.SPARE:
                    return
                self._idle += 1


_workers = _Workers()


T = TypeVar("T")


def linux_call(name: str, *argtypes: type) -> Any:
    """The C library's ``name`` with these argument types (returning int, errno kept), or
    None off Linux or where the library has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_sched_getcpu = linux_call("sched_getcpu") if hasattr(os, "sched_setaffinity") else None


class _Apart:
    """Keeps the two halves of :func:`alongside` on different CPUs while they run.

    Left to the scheduler, a thread writing 8 MiB direct a MiB at a time and a thread
    hashing the same bytes often ended up waiting for each other's CPU: the writes took
    8.3-11.4 ms against 5.6-7.1 ms with no hash beside them. Kept apart (the caller on the
    CPU it is on, the worker on the others), they took as long as alone. Each thread gets
    its own mask back afterwards; with one CPU allowed, or off Linux, nothing is pinned.
    """

    def __init__(self, mask: set[int], cpu: int) -> None:
        self.mask = mask
        self.cpu = cpu

    @classmethod
    def begin(cls) -> _Apart | None:
        """For the calling thread, or None where there is one CPU or no way to choose."""
        if _sched_getcpu is None:
            return None
        mask = os.sched_getaffinity(0)
        cpu = _sched_getcpu()
        if len(mask) < 2 or cpu not in mask:
            return None
        return cls(mask, cpu)

    @contextlib.contextmanager
    def caller(self) -> Iterator[None]:
        with _pinned({self.cpu}, self.mask):
            yield

    @contextlib.contextmanager
    def worker(self) -> Iterator[None]:
        with _pinned(self.mask - {self.cpu}, os.sched_getaffinity(0)):
            yield


@contextlib.contextmanager
def _pinned(cpus: set[int], back: set[int]) -> Iterator[None]:
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:  # a cpuset changed under us: run where we are allowed
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, back)


def alongside(here: Callable[[], T], aside: Callable[[], None], *, apart: bool = False) -> T:
    """Run ``here`` in this thread while a worker runs ``aside``; return ``here``'s result
    once both are done (an error of either is raised then).

    The reverse of :class:`WritePipeline`, for a write that mostly waits for the disk (a
    direct write, a flush) next to a hash that is pure CPU: this thread, already running,
    starts the write at once, and the worker hashes. A worker woken to write instead may
    have to wait until this thread's hashing is done, when the scheduler has put both on
    the same busy CPU; woken to hash, it gets the CPU whenever the write waits.

    ``apart`` keeps the two on different CPUs while they run (see :class:`_Apart`): for a
    write long enough that the disk's completions wake this thread many times.
    """
    done = threading.Event()
    error: list[BaseException] = []
    placed = _Apart.begin() if apart else None

    def run() -> None:
        try:
            with placed.worker() if placed else contextlib.nullcontext():
                aside()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)
        finally:
            done.set()

    _workers.run(run)
    try:
        with placed.caller() if placed else contextlib.nullcontext():
            result = here()
    finally:
        done.wait()  # the worker may read the caller's buffers: it must be done first
    if error:
        raise error[0]
    return result


class HashAside:
    """An append's hash, run on a worker (``alongside``) while the caller writes its bytes:
    whether it is nearly done, and the xxh3 that vouches for the bytes in a journal entry
    written before the hash is done.

    Where the disk is faster than hashing, a long append's write ends first; flushing it
    then, vouched for by an xxh3, leaves only the release after the hash: 5.75 against
    5.91 ms and 6.12 against 6.16 ms per 8 MiB append, alternating within the same uploads,
    and up to 5 % less where hashing was the bound throughout. Where the disk is slower,
    the hash is done first and the append journals its end state: an xxh3 would only add
    to the write.

    A short append always flushes before its hash is done; its xxh3 is taken by the worker,
    before the sha256, while the caller writes: 0.97-1.08 against 1.00-1.13 ms per 1 MiB
    append in three runs, alternating within the same uploads.
    """

    #: bytes per second of the last hash in this process: sha256 keeps a steady pace
    rate = 0.0

    def __init__(self, hasher: hashstate.ResumableHash, data: memoryview, *,
                 tail: bool = False) -> None:
        """``tail``: take the xxh3 of ``data`` on the worker, first."""
        self.hasher = hasher
        self.data = data
        self.started = 0.0
        self.done = False
        self._tail: str | None = None
        self._tailed = threading.Event() if tail else None

    def tail(self) -> str:
        """The xxh3 of the bytes: the worker's where it took one, else taken here."""
        if self._tailed is not None:
            self._tailed.wait()
        if self._tail is None:  # not asked for, or the worker failed (alongside raises it)
            return xxhash.xxh3_64_hexdigest(self.data)
        return self._tail

    def __call__(self) -> None:
        if self._tailed is not None:
            try:
                self._tail = xxhash.xxh3_64_hexdigest(self.data)
            finally:
                self._tailed.set()
        self.started = time.perf_counter()
        self.hasher.update(self.data)
        took = time.perf_counter() - self.started
        if took > 0:
            HashAside.rate = len(self.data) / took
        self.done = True

    def nearly_done(self, share: float) -> bool:
        """Done, or (by the pace of the last hash) with at most ``share`` of it to go."""
        if self.done:
            return True
        if not self.rate or not self.started:
            return False
        total = len(self.data) / self.rate
        return self.started + total - time.perf_counter() < share * total


class WritePipeline:
    """Writes chunks to ``target`` on a second thread.

    The thread starts with the first large chunk, or when a second chunk arrives, so a
    small blob costs no thread and a big one overlaps from its first byte.
    Use as a context manager; :meth:`finish` waits for the writes and re-raises their error.
    """

    def __init__(self, target: Target, release: Callable[[mmap.mmap], None],
                 size: int | None = None) -> None:
        """``size``, if known, is how many bytes will be put: the worker is then told to stop
        with the last chunk, while it writes, rather than woken for it afterwards."""
        self.target = target
        self._release = release
        self._size = size
        self._bytes = 0
        self._stopped = False  #: the stop marker is queued
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=POOL)
        self._done: threading.Event | None = None  #: set when the worker has drained the queue
        self._first: Chunk | None = None
        self._error: BaseException | None = None
        # chunks handed to the worker and written by it; once the caller has put its last
        # chunk, ``_wanted`` is their number and ``_caught_up`` is set when all are written
        self._lock = threading.Lock()
        self._put = self._written = 0
        self._wanted: int | None = None
        self._caught_up = threading.Event()

    def _write(self, chunk: Chunk) -> None:
        view, buf = chunk
        try:
            if self._error is None:
                self.target.write(view)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
        finally:
            if buf is not None:
                self._release(buf)

    def _run(self, done: threading.Event) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                self._write(chunk)
                with self._lock:
                    self._written += 1
                    if self._written == self._wanted:
                        self._caught_up.set()
        finally:
            done.set()

    def put(self, chunk: Chunk) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise ValueError(f"more than the {self._size} bytes announced")
        self._bytes += len(chunk[0])
        if self._done is None:
            if self._first is None and len(chunk[0]) < THREAD_AT:
                self._first = chunk
                return
            done = self._done = threading.Event()
            _workers.run(lambda: self._run(done))
            if self._first is not None:
                self._put += 1
                self._queue.put(self._first)
                self._first = None
        self._put += 1
        self._queue.put(chunk)
        if self._bytes == self._size:
            self._stop_worker()

    def finish(self) -> None:
        self._drain()
        if self._first is not None:
            first, self._first = self._first, None
            self._write(first)
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Wait until the worker has written every chunk, then let it go without waiting
        for it: a worker that is done by the time the caller is costs no wake-up at all."""
        if self._done is None:
            return
        with self._lock:
            self._wanted = self._put
            caught_up = self._written == self._put
        if not caught_up:
            self._caught_up.wait()
        self._stop_worker()
        self._done = None

    def _stop(self) -> None:
        if self._done is not None:
            self._stop_worker()
            self._done.wait()
            self._done = None

    def _stop_worker(self) -> None:
        if not self._stopped:
            self._queue.put(None)
            self._stopped = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self._first is not None and self._first[1] is not None:
            self._release(self._first[1])
        self._first = None
