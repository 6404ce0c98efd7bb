"""File primitives of the local backend: durable writes at increasing offsets.

Large aligned chunks (the engine's page-aligned read buffers) are written with
``O_DIRECT``: the disk DMAs them straight from the buffer while the caller hashes the next
one, and the page cache is neither copied into nor flooded. Other writes go through the
page cache, with writeback started after every MiB (``sync_file_range`` on Linux), so the
final fsync only has the tail left to flush.

A sink told to write ``bounced`` copies other chunks into a reused aligned buffer of huge
pages (:class:`AlignedBuffer`), 2 MiB at a time, and writes that with ``O_DIRECT`` too;
only the partial pages at either end of a chunk go through the page cache. That is for
short appends that are flushed each on its own: on ext4 the flush after a direct write
costs less than after writeback of the same bytes, and no page-cache pages have to be
found for them (measured in ``benchmarks/uploads.py``).
Longer writes keep the page cache, where writeback keeps more of the disk busy than one
direct write at a time does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import IO

from casengine.backend import Buffer, os_error
from casengine.ingest import HUGE, linux_call, private_map

_SYNC_FILE_RANGE_WRITE = 2
#: O_DIRECT wants buffer address, length and file offset aligned; a page satisfies every disk.
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Start writeback once this much is dirty: big enough to batch, small enough that the
#: disk writes while the caller still hashes, so the fdatasync that acknowledges a chunk
#: waits only for the last step.
_WRITEBACK_STEP = 1 << 20
#: A bounce buffer's size, and how many idle ones are kept for the next appends: a new
#: buffer faults in every page, which took longer than the 1 MiB direct write itself here.
BOUNCE = 2 << 20
_BOUNCE_KEEP = 8


_sync_file_range = linux_call("sync_file_range", ctypes.c_int, ctypes.c_longlong,
                              ctypes.c_longlong, ctypes.c_uint)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Map OS errors to the engine's errors, by type, in one place."""
    try:
        yield
    except OSError as exc:
        raise os_error(what, exc) from exc


def _aligned(view: memoryview) -> bool:
    if view.readonly or len(view) % _ALIGN:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % _ALIGN == 0


def _open_direct(path: str) -> int | None:
    """A second descriptor on ``path`` with O_DIRECT, or None where the filesystem has none."""
    if not _O_DIRECT:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
    except OSError:  # tmpfs and some others refuse O_DIRECT
        return None


class AlignedBuffer:
    """``size`` writable bytes (``view``) that start at a huge page, for direct writes.

    Made of huge pages where the kernel gives them (:func:`casengine.ingest.private_map`),
    so each direct write from it is one disk request: a 1 MiB write took 0.55 against
    0.71 ms per MiB on this VM, and 8 MiB in 2 MiB writes took 3.5 against 5.3 ms.
    """

    def __init__(self, size: int) -> None:
        span = -(-size // HUGE) * HUGE  # whole huge pages
        self._map = private_map(span + HUGE)  # room to start at a huge page's address
        start = -ctypes.addressof(ctypes.c_char.from_buffer(self._map)) % HUGE
        self.view = memoryview(self._map)[start:start + size]

    def close(self) -> None:
        self.view.release()
        self._map.close()


_bounces: list[AlignedBuffer] = []
_bounces_lock = threading.Lock()


@contextlib.contextmanager
def _bounce() -> Iterator[memoryview]:
    with _bounces_lock:
        buf = _bounces.pop() if _bounces else None
    if buf is None:
        buf = AlignedBuffer(BOUNCE)
    try:
        yield buf.view
    finally:
        with _bounces_lock:
            if len(_bounces) < _BOUNCE_KEEP:
                _bounces.append(buf)
                buf = None
        if buf is not None:
            buf.close()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSink:
    """Writes at increasing offsets of one file: O_DIRECT for aligned chunks (and, when
    ``bounced``, for the whole pages of any chunk), else buffered."""

    def __init__(self, path: str, offset: int, *, create: bool = False,
                 fd: int | None = None) -> None:
        """Open ``path`` (``create`` it: it must not exist), or take over its open ``fd``."""
        self.path = path
        if fd is None:
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
            with translated(f"opening {path}"):
                fd = os.open(path, flags, 0o644)
        self.fd = fd
        #: the O_DIRECT descriptor, opened with the first aligned chunk; None: none possible
        self._direct: int | None = -1 if _O_DIRECT else None
        self.start = self.pos = self._flushed = offset
        self.bounced = False

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        with translated(f"writing {self.path}"):
            if self._direct is not None and self.pos % _ALIGN == 0 and _aligned(view):
                self._write_direct(view)
            elif self._direct is not None and self.bounced:
                self._write_bounced(view)
            else:
                self._write_buffered(view)

    def _write_direct(self, view: memoryview) -> None:
        """Whole pages from a page-aligned buffer go past the page cache."""
        if self._direct == -1:
            self._direct = _open_direct(self.path)
            if self._direct is None:
                self._write_buffered(view)
                return
        assert self._direct is not None
        self._pwrite(self._direct, view)
        self._flushed = self.pos

    def _write_bounced(self, view: memoryview) -> None:
        """Whole pages through an aligned buffer; the partial ones at the ends buffered."""
        head = min(len(view), -self.pos % _ALIGN)
        whole = (len(view) - head) // _ALIGN * _ALIGN
        if head:
            self._write_buffered(view[:head])
        if whole:
            with _bounce() as buf:
                for at in range(head, head + whole, len(buf)):
                    part = view[at:min(at + len(buf), head + whole)]
                    buf[:len(part)] = part
                    self._write_direct(buf[:len(part)])
        if head + whole < len(view):
            self._write_buffered(view[head + whole:])

    def _write_buffered(self, view: memoryview) -> None:
        self._pwrite(self.fd, view)
        if _sync_file_range and self.pos - self._flushed >= _WRITEBACK_STEP:
            _sync_file_range(self.fd, self._flushed, self.pos - self._flushed,
                             _SYNC_FILE_RANGE_WRITE)
            self._flushed = self.pos

    def _pwrite(self, fd: int, view: memoryview) -> None:
        while view:
            n = os.pwrite(fd, view, self.pos)
            view = view[n:]
            self.pos += n

    def sync(self) -> None:
        with translated(f"syncing {self.path}"):
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self._direct is not None and self._direct >= 0:
            os.close(self._direct)
        self._direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_file(f: IO[bytes], start: int, length: int | None, chunk_size: int) -> Iterator[bytes]:
    """``length`` bytes (all, if None) of ``f`` from ``start``, read ahead; closes ``f``."""
    with f:
        fd = f.fileno()
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, length or 0, os.POSIX_FADV_SEQUENTIAL)
        pos = start
        left = sys.maxsize if length is None else length
        while left > 0:
            chunk = os.pread(fd, min(chunk_size, left), pos)
            if not chunk:
                return
            pos += len(chunk)
            left -= len(chunk)
            yield chunk
