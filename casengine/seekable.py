"""Seekable zstd: a blob stored as independent zstd frames plus a table of their sizes.

The stored object (codec ``zst``, see :mod:`casengine.layout`) is zstd's own *seekable
format* (``contrib/seekable_format`` in the zstd sources)::

    +---------+---------+-----+---------+---------------------------------------------+
    | frame 0 | frame 1 | ... | frame N | skippable frame: the seek table             |
    +---------+---------+-----+---------+---------------------------------------------+
                                          magic 0x184D2A5E, size, N x (compressed u32,
                                          decompressed u32), N u32, descriptor u8,
                                          magic 0x8F92EAB1

Each frame holds ``frame_size`` bytes of the logical data (4 MiB by default), compressed
on its own with a content checksum, so a byte range needs only the frames it overlaps.

Why the table is a trailer and not a header: an ingest streams and writes each frame as
soon as it is compressed, and the compressed sizes are known only then. A header would
mean buffering the whole blob or rewriting the object. The trailing skippable frame is
ignored by every zstd decoder, so the object stays one valid zstd stream (``zstd -d``
and ``zstdcat`` read it whole), and it is what zstd's ``seekable_format`` library and
other tools already read. A reader finds the table with one small ranged read of the
object's tail (:func:`read_table`).

Everything read from storage is treated as hostile: :func:`parse_table` checks the table
against the object's size and caps every frame at :data:`MAX_FRAME` logical bytes, and
:func:`decode_frame` refuses a frame whose header or output disagrees with the table, so a
corrupt object or a decompression bomb is a clean :class:`~casengine.errors.CorruptObject` (an IntegrityError)
and memory stays bounded by one frame.
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zstandard

from casengine.errors import CorruptObject

if TYPE_CHECKING:
    from casengine.backend import Backend, Buffer

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
_SKIP_HEADER = struct.Struct("<II")  # magic, frame size
_FOOTER = struct.Struct("<IBI")  # number of frames, descriptor, magic
_ENTRY = struct.Struct("<II")  # compressed size, decompressed size
_CHECKSUM_FLAG = 0x80
_RESERVED_BITS = 0x7C

#: Logical bytes per frame: big enough that zstd compresses well and per-frame costs
#: vanish, small enough that a range read decompresses little it does not need.
FRAME_SIZE = 4 << 20
#: The largest frame a table may claim, in logical bytes: what one read may allocate.
MAX_FRAME = 64 << 20
#: The largest seek table read, in bytes: 16 MiB holds 2M frames, 8 TiB at 4 MiB a frame.
MAX_TABLE = 16 << 20
#: How much of an object's tail the first read of a table takes; a small object (a
#: manifest, a config) is read whole with it.
TAIL = 64 << 10
#: The smallest valid zstd frame: magic, frame header, one empty last block.
_MIN_FRAME = 9
_TABLE_OVERHEAD = _SKIP_HEADER.size + _FOOTER.size


def _bad(key: str, why: str) -> CorruptObject:
    return CorruptObject(f"stored object {key} is not valid seekable zstd: {why}; "
                          "run 'casengine check'")


@dataclass(frozen=True, slots=True)
class SeekTable:
    """Where each frame starts, in the stored object and in the logical bytes."""

    compressed: array  #: stored offset of each frame, and the table's offset last
    logical: array  #: logical offset of each frame, and the logical size last
    stored_size: int

    @property
    def frames(self) -> int:
        return len(self.compressed) - 1

    @property
    def logical_size(self) -> int:
        return self.logical[-1]

    def frame_of(self, offset: int) -> int:
        """The frame holding logical byte ``offset`` (0 <= offset < logical_size)."""
        return bisect.bisect_right(self.logical, offset) - 1


def encode_table(entries: Iterable[tuple[int, int]]) -> bytes:
    """The seek table frame for ``(compressed, decompressed)`` sizes, without checksums."""
    body = b"".join(_ENTRY.pack(c, d) for c, d in entries)
    count = len(body) // _ENTRY.size
    return (_SKIP_HEADER.pack(SKIPPABLE_MAGIC, len(body) + _FOOTER.size) + body
            + _FOOTER.pack(count, 0, SEEKABLE_MAGIC))


def table_length(footer: bytes, stored_size: int, key: str = "object") -> int:
    """The length of the seek table frame that ``footer`` (the object's last 9 bytes) ends."""
    if len(footer) != _FOOTER.size:
        raise _bad(key, f"{stored_size} bytes is too short for a seek table")
    count, descriptor, magic = _FOOTER.unpack(footer)
    if magic != SEEKABLE_MAGIC:
        raise _bad(key, "no seek table footer")
    if descriptor & _RESERVED_BITS:
        raise _bad(key, "reserved bits set in the seek table descriptor")
    entry = _ENTRY.size + (4 if descriptor & _CHECKSUM_FLAG else 0)
    length = _TABLE_OVERHEAD + count * entry
    if length > MAX_TABLE or length + count * _MIN_FRAME > stored_size:
        raise _bad(key, f"a table of {count} frames does not fit in {stored_size} bytes")
    return length


def parse_table(data: Buffer, stored_size: int, key: str = "object") -> SeekTable:
    """Parse the seek table at the end of ``data``, the tail of an object of ``stored_size``.

    Every claim is checked: the frames must tile the object exactly, each frame must be a
    plausible zstd frame of at most :data:`MAX_FRAME` logical bytes.
    """
    view = memoryview(data).cast("B")
    if stored_size < _TABLE_OVERHEAD or len(view) < _FOOTER.size or len(view) > stored_size:
        raise _bad(key, f"{stored_size} bytes is too short for a seek table")
    length = table_length(bytes(view[-_FOOTER.size:]), stored_size, key)
    if length > len(view):
        raise _bad(key, "the seek table is cut short")
    frame = view[len(view) - length:]
    magic, size = _SKIP_HEADER.unpack_from(frame)
    if magic != SKIPPABLE_MAGIC or size != length - _SKIP_HEADER.size:
        raise _bad(key, "the seek table frame's header does not match its footer")
    count, descriptor, _ = _FOOTER.unpack_from(frame, length - _FOOTER.size)
    entry = _ENTRY.size + (4 if descriptor & _CHECKSUM_FLAG else 0)
    compressed, logical = array("Q", [0]), array("Q", [0])
    for i in range(count):
        c, d = _ENTRY.unpack_from(frame, _SKIP_HEADER.size + i * entry)
        if c < _MIN_FRAME or not 0 < d <= MAX_FRAME or c > d + (d >> 7) + 1024:
            raise _bad(key, f"frame {i} claims {c} stored and {d} logical bytes")
        compressed.append(compressed[-1] + c)
        logical.append(logical[-1] + d)
    if compressed[-1] + length != stored_size:
        raise _bad(key, f"the frames and table make {compressed[-1] + length} bytes, "
                        f"the object has {stored_size}")
    return SeekTable(compressed, logical, stored_size)


def read_exact(backend: Backend, key: str, start: int, length: int) -> bytes:
    data = b"".join(backend.read(key, start, length))
    if len(data) != length:
        raise _bad(key, f"truncated: wanted {length} bytes at {start}, got {len(data)}")
    return data


def read_table(backend: Backend, key: str, stored_size: int) -> tuple[SeekTable, bytes]:
    """The object's seek table, and the tail read to find it (the whole object if small).

    One ranged read of at most :data:`TAIL` bytes, and a second only for a table larger
    than that (an object of more than about 30 GiB).
    """
    if stored_size < _TABLE_OVERHEAD:
        raise _bad(key, f"{stored_size} bytes is too short for a seek table")
    tail_len = min(stored_size, TAIL)
    tail = read_exact(backend, key, stored_size - tail_len, tail_len)
    length = table_length(tail[-_FOOTER.size:], stored_size, key)
    if length > len(tail):
        tail = read_exact(backend, key, stored_size - length, length)
    return parse_table(tail, stored_size, key), tail


def decode_frame(frame: Buffer, expected: int, dctx: zstandard.ZstdDecompressor,
                 key: str = "object") -> bytes:
    """Decompress one frame that the table says holds ``expected`` logical bytes.

    The frame header's content size (when present) must match before anything is
    allocated, and the output may not exceed it: a frame that lies is a bomb, refused.
    """
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared not in (expected, zstandard.CONTENTSIZE_UNKNOWN):
            raise _bad(key, f"a frame declares {declared} bytes, the table {expected}")
        out = dctx.decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise _bad(key, f"a frame does not decompress ({exc})") from exc
    if len(out) != expected:
        raise _bad(key, f"a frame holds {len(out)} bytes, the table says {expected}")
    return out


class FrameDecoder:
    """Push stored bytes from frame ``first`` on; get back each frame's logical bytes.

    Holds at most one frame's stored bytes and one chunk. Bytes past frame ``last`` (the
    seek table, when a whole object is fed) are ignored; :meth:`close` raises if the
    stream ended before frame ``last`` did.
    """

    def __init__(self, table: SeekTable, first: int = 0, last: int | None = None, *,
                 key: str = "object") -> None:
        self.table = table
        self.key = key
        self._next = first
        self._last = table.frames - 1 if last is None else last
        self._buf = bytearray()
        self._dctx = zstandard.ZstdDecompressor()

    def feed(self, data: Buffer) -> Iterator[bytes]:
        if self._next > self._last:
            return
        self._buf += data
        t = self.table
        while self._next <= self._last:
            i = self._next
            need = t.compressed[i + 1] - t.compressed[i]
            if len(self._buf) < need:
                return
            frame = memoryview(self._buf)[:need]
            try:
                out = decode_frame(frame, t.logical[i + 1] - t.logical[i], self._dctx, self.key)
            finally:
                frame.release()
            del self._buf[:need]
            self._next += 1
            yield out
        self._buf = bytearray()

    def close(self) -> None:
        if self._next <= self._last:
            raise _bad(self.key, f"the object ends inside frame {self._next}")


def read_range(backend: Backend, key: str, table: SeekTable, start: int, length: int, *,
               chunk_size: int, tail: bytes = b"") -> Iterator[bytes]:
    """Stream logical bytes ``[start, start+length)``, decompressing only the frames they
    overlap. ``tail`` may hold the object's last bytes, already read: frames inside it are
    not read again."""
    end = min(start + length, table.logical_size)
    if end <= start:
        return
    first, last = table.frame_of(start), table.frame_of(end - 1)
    lo, hi = table.compressed[first], table.compressed[last + 1]
    decoder = FrameDecoder(table, first, last, key=key)
    if lo >= table.stored_size - len(tail):
        skip = lo - (table.stored_size - len(tail))
        stream: Iterable[bytes] = (tail[skip:skip + hi - lo],)
    else:
        stream = backend.read(key, lo, hi - lo, chunk_size=max(chunk_size, 1 << 20))
    pos = table.logical[first]
    for chunk in stream:
        for frame in decoder.feed(chunk):
            a, b = max(start - pos, 0), min(end - pos, len(frame))
            pos += len(frame)
            if a == 0 and b == len(frame) and len(frame) <= chunk_size:
                yield frame
                continue
            view = memoryview(frame)
            for i in range(a, b, chunk_size):
                yield bytes(view[i:min(i + chunk_size, b)])
    decoder.close()


def read_object(backend: Backend, key: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Every logical byte of a stored object whose record is unknown (an orphan)."""
    table, tail = read_table(backend, key, backend.stat(key).size)
    return read_range(backend, key, table, 0, table.logical_size, chunk_size=chunk_size,
                      tail=tail)


class FrameEncoder:
    """Compress a stream into frames of ``frame_size`` logical bytes; ``emit`` gets the
    stored bytes in order, the seek table last (on :meth:`finish`).

    A whole frame handed in at once (the ingest's 4 MiB chunks) is compressed straight from
    the caller's buffer; smaller pieces are gathered into one frame buffer first. Either way
    each frame is one call that knows its size (so zstd sizes its tables to it and records
    the content size in the frame header) and that blocks until done, so the caller's buffer
    is free when :meth:`write` returns. With ``threads`` > 1, up to that many frames are
    compressed at once, each on its own worker from a copy of its bytes: independent
    frames parallelize with no coordination, where zstd's own workers split one 4 MiB frame
    into jobs too small to pay for themselves (measured: 585 against 551 MB/s single).
    """

    def __init__(self, emit: Callable[[bytes], None], level: int = 3,
                 frame_size: int = FRAME_SIZE, threads: int = 0) -> None:
        if not 0 < frame_size <= MAX_FRAME:
            raise ValueError(f"frame size {frame_size} outside 1..{MAX_FRAME}")
        self._emit = emit
        self._level = level
        self._threads = threads
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._inflight: deque[tuple[Future[bytes], int]] = deque()
        self.frame_size = frame_size
        self.entries: list[tuple[int, int]] = []
        self._pending = bytearray()

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        size = self.frame_size
        while view:
            if not self._pending and len(view) >= size:
                self._frame(view[:size])
                view = view[size:]
                continue
            take = min(len(view), size - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == size:
                self._frame(self._pending)
                self._pending.clear()

    def _frame(self, data: Buffer) -> None:
        n = len(data)  # type: ignore[arg-type]
        if self._threads > 1:
            # twice as many frames in flight as workers: one queued behind each running
            # keeps every worker busy while this thread emits the oldest
            while len(self._inflight) >= 2 * self._threads:
                self._emit_oldest()
            job = _compressors().submit(_compress_frame, self._level, bytes(data))
            self._inflight.append((job, n))
        else:
            self._done(self._cctx.compress(data), n)

    def _emit_oldest(self) -> None:
        job, n = self._inflight.popleft()
        self._done(job.result(), n)

    def _done(self, out: bytes, n: int) -> None:
        self._emit(out)
        self.entries.append((len(out), n))

    def finish(self) -> None:
        if self._pending:
            self._frame(self._pending)
            self._pending = bytearray()
        while self._inflight:
            self._emit_oldest()
        self._emit(encode_table(self.entries))


_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _compressors() -> ThreadPoolExecutor:
    """Workers shared by every encoder: a frame is a bounded job, so none can hold one up."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="casengine-zstd")
        return _pool


def _compress_frame(level: int, data: bytes) -> bytes:
    cctxs = getattr(_local, "cctxs", None)
    if cctxs is None:
        cctxs = _local.cctxs = {}
    if level not in cctxs:  # a context per worker and level: made once, reused per frame
        cctxs[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cctxs[level].compress(data)


def compress(data: Buffer, level: int = 3, frame_size: int = FRAME_SIZE) -> bytes:
    """The seekable form of small in-memory ``data`` (tests, tools)."""
    parts: list[bytes] = []
    encoder = FrameEncoder(parts.append, level, frame_size)
    encoder.write(data)
    encoder.finish()
    return b"".join(parts)


class TableCache:
    """The parsed tables of the last few objects read, so a burst of range reads of one
    blob (a client resuming a pull in pieces) reads its table once."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._tables: OrderedDict[tuple, SeekTable] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ident: tuple) -> SeekTable | None:
        with self._lock:
            table = self._tables.get(ident)
            if table is not None:
                self._tables.move_to_end(ident)
            return table

    def put(self, ident: tuple, table: SeekTable) -> None:
        with self._lock:
            self._tables[ident] = table
            while len(self._tables) > self._size:
                self._tables.popitem(last=False)
