"""The local backend's file sink: bounced direct writes keep every byte and skip the cache."""

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from backends.local_files import BOUNCE, AlignedBuffer, FileSink
from casengine.engine import Engine
from tests.helpers import huge_kib_at, huge_pages

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident(path: Path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (mincore on a mapping never touched)."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return [bool(v & 1) for v in vec]


def direct_io_works(directory: Path) -> bool:
    probe = directory / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


def test_bounced_writes_keep_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(6 << 20)
    # pieces that start and end on and off page boundaries, one longer than a bounce buffer
    sizes = [1, PAGE - 1, PAGE + 1, (1 << 20) + 3, 2 * PAGE, 5, (3 << 20) + 7]
    sink = FileSink(str(path), 0, create=True)
    sink.bounced = True
    pos = 0
    for size in sizes[:4]:
        sink.write(data[pos:pos + size])
        pos += size
    sink.sync()
    sink.close()
    # a second append, as the next request, starts in the middle of a page
    sink = FileSink(str(path), pos)
    sink.bounced = True
    for size in sizes[4:]:
        sink.write(memoryview(data)[pos:pos + size])
        pos += size
    sink.sync()
    sink.close()
    assert path.read_bytes() == data[:pos]


def test_bounced_pages_skip_the_page_cache(tmp_path: Path) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} has no O_DIRECT")
    for bounced in (True, False):
        path = tmp_path / f"f-{bounced}"
        sink = FileSink(str(path), 0, create=True)
        sink.bounced = bounced
        sink.write(os.urandom((1 << 20) + 100))
        sink.sync()
        sink.close()
        pages = resident(path)
        if bounced:  # all but the last, partial page went past the cache
            assert pages[:-1] == [False] * (len(pages) - 1)
        else:
            assert all(pages)


def test_short_or_held_appends_write_direct_and_long_streams_through_the_cache(
        tmp_path: Path) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} has no O_DIRECT")
    short, long = 1 << 20, 4 << 20
    streamed = iter([os.urandom(1 << 20) for _ in range(long >> 20)])  # as an HTTP body comes
    with Engine.open(str(tmp_path / "root")) as engine:
        upload = engine.uploads.start()
        engine.uploads.append(upload.id, os.urandom(short), 0)
        engine.uploads.append(upload.id, os.urandom(long), short)
        engine.uploads.append(upload.id, streamed, short + long, length=long)
        staged = next((tmp_path / "root").rglob("data"))
        pages = resident(staged)
        assert not any(pages[:(short + long) // PAGE])
        assert all(pages[(short + long) // PAGE:(short + 2 * long) // PAGE])


@huge_pages
@pytest.mark.parametrize("size", [BOUNCE, 1 << 20, 3 << 20])
def test_aligned_buffers_are_huge_pages(size: int) -> None:
    buf = AlignedBuffer(size)
    try:
        assert len(buf.view) == size and not buf.view.readonly
        buf.view[:] = b"\x5a" * size  # the pages exist once touched
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf.view))
        assert addr % (2 << 20) == 0
        # one huge page per 2 MiB started, so a direct write from it is one disk request
        assert huge_kib_at(addr) >= -(-size // (2 << 20)) * 2048
        assert bytes(buf.view[-4:]) == b"\x5a" * 4
    finally:
        buf.close()


def test_bounced_writes_come_from_one_aligned_buffer_of_bounce_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long held append is written BOUNCE bytes per direct write, from huge pages."""
    if not direct_io_works(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    writes: list[tuple[int, int]] = []
    real = FileSink._pwrite

    def spy(self: FileSink, fd: int, view: memoryview) -> None:
        if fd == self._direct:
            writes.append((len(view), ctypes.addressof(ctypes.c_char.from_buffer(view))))
        real(self, fd, view)

    data = os.urandom(3 * BOUNCE + 3 * PAGE)
    path = tmp_path / "f"
    monkeypatch.setattr(FileSink, "_pwrite", spy)
    sink = FileSink(str(path), 0, create=True)
    sink.bounced = True
    try:
        sink.write(memoryview(data))
    finally:
        sink.close()
    assert [n for n, _ in writes] == [BOUNCE, BOUNCE, BOUNCE, 3 * PAGE]
    assert all(addr % PAGE == 0 for _, addr in writes)
    assert path.read_bytes() == data
