"""gzip in, zstd out: one streaming pass, verified, with bounded memory and a bomb limit.

The conversion runs as a pipeline of threads joined by small bounded queues::

    source chunks --> [gunzip + sha256 of the tar] --> [zstd, multithreaded] --> caller
                                                                            \\--> [unzstd + sha256]

Inflate is ISA-L's (the ``isal`` package; two to three times zlib's speed, which the
single-threaded gunzip stage needs to keep up with zstd on two cores). ``isal``,
``hashlib`` and ``zstandard`` release the GIL on large buffers, so the stages
really run in parallel, as ``gzip -dc | zstd -T0`` does. The caller (usually an engine
ingest, which hashes and writes the zstd bytes) consumes :class:`GzipToZstd` as an
iterable. Its last chunk is handed over only once the zstd output, decompressed again on
its own thread, has been shown to hash to exactly the tar the gzip input held; any failure
(corrupt or truncated gzip, a bomb, a mismatch) raises out of the iteration instead, so an
ingest fed by it publishes nothing.

Memory stays bounded (I6): gunzip emits at most :data:`OUT_CHUNK` bytes per step however
much a compressed chunk expands, every queue holds a few chunks, and the verifier
decompresses through a stream writer rather than into one buffer.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import zstandard

try:  # ISA-L's inflate: the same API as zlib at two to three times its speed
    from isal import isal_zlib as inflate
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    inflate = zlib  # type: ignore[no-redef]

from casengine.errors import DecompressionBomb, IntegrityError, LayerInvalid

T = TypeVar("T")

#: The most one gunzip step emits: bounds memory whatever the compression ratio.
OUT_CHUNK = 4 << 20
#: Chunks waiting between two stages.
DEPTH = 4
#: zstd worker threads: one per CPU (-1), as ``zstd -T0``. The output does not depend on it.
ZSTD_THREADS = -1
#: gzip (and only gzip) framing for zlib.
_GZIP = 16 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class Limits:
    """When a layer counts as a decompression bomb: beyond ``max_size`` uncompressed bytes,
    or beyond ``max_ratio`` times its compressed size once past ``ratio_after`` bytes (a
    small layer of zeros is legitimate). deflate cannot exceed about 1032:1."""

    max_size: int = 64 << 30
    max_ratio: float = 500.0
    ratio_after: int = 256 << 20


DEFAULT_LIMITS = Limits()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has gone away; False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def threaded(items: Iterator[T], name: str, depth: int = DEPTH) -> Iterator[T]:
    """Run ``items`` on a thread of its own and yield what it produces, in order.

    An error in ``items`` is raised here; closing this generator stops and closes
    ``items`` (and so, in a chain, every stage upstream of it).
    """
    q: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in items:
                if not _put(q, item, stop):
                    return
            _put(q, _END, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            _put(q, _Failed(exc), stop)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


class _Sink:
    """Where the verifier's stream writer puts the decompressed tar: into a hash."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


class _Verifier:
    """Decompresses the zstd output on its own thread as it is produced, and hashes it."""

    def __init__(self) -> None:
        self._q: queue.Queue[Any] = queue.Queue(DEPTH * 4)
        self._sink = _Sink()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="casengine-verify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            writer = zstandard.ZstdDecompressor().stream_writer(
                self._sink, write_size=1 << 20, write_return_read=True)
            while (chunk := self._q.get()) is not _END:
                writer.write(chunk)
            writer.flush()
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self._error = exc
            while self._q.get() is not _END:  # keep draining so feed() never blocks
                pass

    # The thread takes from the queue until _END whatever happens, so a put never blocks
    # for long and needs no stop signal.
    def feed(self, chunk: bytes) -> None:
        self._q.put(chunk)

    def _end(self) -> None:
        self._q.put(_END)
        self._thread.join()

    def finish(self) -> tuple[str, int]:
        """The sha256 and size of everything fed, decompressed."""
        self._end()
        if self._error is not None:
            raise IntegrityError(f"the zstd output does not decompress: {self._error}")
        return f"sha256:{self._sink.sha.hexdigest()}", self._sink.size

    def abandon(self) -> None:
        if self._thread.is_alive():
            self._end()


class GzipToZstd:
    """An iterable of the zstd bytes of a gzip stream's content (see the module doc).

    Once iterated to the end, :attr:`diff_id` and :attr:`size` name the tar inside (the
    layer's ``diff_id``, which must be ``diff_id`` if given), checked on both sides, and ``bytes_in``/``bytes_out`` count
    the compressed bytes read and written. ``on_read(n)`` is called as input is consumed.
    """

    def __init__(self, source: Iterable[bytes], *, level: int = 3, limits: Limits = DEFAULT_LIMITS,
                 what: str = "layer", diff_id: str | None = None,
                 on_read: Callable[[int], None] | None = None) -> None:
        self._source = source
        self._expected = diff_id
        self.level = level
        self.limits = limits
        self.what = what
        self._on_read = on_read
        self.bytes_in = 0
        self.bytes_out = 0
        self.size = 0
        self.diff_id: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        tar_sha = hashlib.sha256()
        verifier = _Verifier()
        compressed = threaded(self._zstd(threaded(self._gunzip(tar_sha), "casengine-gunzip")),
                              "casengine-zstd")
        try:
            for chunk in compressed:
                verifier.feed(chunk)
                self.bytes_out += len(chunk)
                yield chunk
            digest, size = verifier.finish()
        except BaseException:
            verifier.abandon()
            raise
        finally:
            compressed.close()
        tar = f"sha256:{tar_sha.hexdigest()}"
        if (digest, size) != (tar, self.size):
            raise IntegrityError(f"{self.what}: the zstd output decompresses to {digest} "
                                 f"({size} bytes), the gzip input to {tar} ({self.size})")
        if self._expected is not None and tar != self._expected:
            raise LayerInvalid(f"{self.what} holds the tar {tar}, but its config names "
                               f"{self._expected}")
        self.diff_id = tar

    def _zstd(self, tar: Iterator[bytes]) -> Iterator[bytes]:
        compressor = zstandard.ZstdCompressor(level=self.level, threads=ZSTD_THREADS,
                                              write_checksum=True)
        cobj = compressor.compressobj()
        try:
            for chunk in tar:
                out = cobj.compress(chunk)
                if out:
                    yield out
            if out := cobj.flush():
                yield out
        finally:
            close = getattr(tar, "close", None)
            if close is not None:  # stops the gunzip thread when we stop early
                close()

    def _gunzip(self, sha: Any) -> Iterator[bytes]:
        """The tar in the gzip stream (all of its members), hashed into ``sha``."""
        d = inflate.decompressobj(_GZIP)
        started = False
        for chunk in self._source:
            self.bytes_in += len(chunk)
            if self._on_read is not None:
                self._on_read(len(chunk))
            data: bytes | memoryview = chunk
            while data:
                if d.eof:  # another member may follow, after zero padding
                    data = bytes(data).lstrip(b"\0")
                    if not data:
                        break
                    d = inflate.decompressobj(_GZIP)
                try:
                    out = d.decompress(data, OUT_CHUNK)
                except (zlib.error, inflate.error) as exc:
                    raise LayerInvalid(f"{self.what} is not valid gzip: {exc}") from None
                started = True
                data = d.unused_data if d.eof else d.unconsumed_tail
                if out:
                    self.size += len(out)
                    self._check_bomb()
                    sha.update(out)
                    yield out
        if not started or not d.eof:
            raise LayerInvalid(f"{self.what} is not valid gzip: "
                               + ("it is empty" if not started else "the stream is truncated"))

    def _check_bomb(self) -> None:
        lim = self.limits
        if self.size > lim.max_size:
            raise DecompressionBomb(
                f"{self.what} decompresses to more than {lim.max_size} bytes (the limit); "
                "nothing was stored")
        if self.size > lim.ratio_after and self.size > lim.max_ratio * max(self.bytes_in, 1):
            raise DecompressionBomb(
                f"{self.what} expands more than {lim.max_ratio:g} times ({self.bytes_in} "
                f"compressed bytes gave {self.size}); nothing was stored")

