"""``file:///path`` or a plain path: objects as files under a root directory.

Durability follows the classic recipe: write a temp file under ``<root>/.tmp/``, fsync it,
then ``rename`` (or ``link`` for put-if-absent, which fails natively if the name exists) and
fsync the directory. Keys never start with a dot, so ``.tmp`` and the default index
directory ``.index`` can never be listed or addressed as objects.

Large aligned chunks (the engine's page-aligned read buffers) are written with
``O_DIRECT``: the disk DMAs them straight from the buffer while the caller hashes the next
one, and the page cache is neither copied into nor flooded. Other writes go through the
page cache, with writeback started after every few MiB (``sync_file_range`` on Linux), so
the final fsync only has the tail left to flush.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import uuid
from collections.abc import Iterator
from typing import IO

from casengine.backend import (
    READ_CHUNK,
    Backend,
    Buffer,
    ObjectInfo,
    Writer,
    check_key,
    check_prefix,
    split_scheme,
)
from casengine.errors import BackendError, NotFound

TMP_DIR = ".tmp"
INDEX_DIR = ".index"
_SYNC_FILE_RANGE_WRITE = 2
#: O_DIRECT wants buffer address, length and file offset aligned; a page satisfies every disk.
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Start writeback once this much is dirty: big enough to batch, small enough to overlap.
_WRITEBACK_STEP = 8 << 20


def _load_sync_file_range():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map OS errors to the engine's errors, by type, in one place."""
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(f"{what}: not found") from exc
    except OSError as exc:
        raise BackendError(f"{what}: {exc.strerror or exc}") from exc


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalWriter(Writer):
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._tmp = os.path.join(backend.tmp_dir, uuid.uuid4().hex)
        with _translated("creating a temp file"):
            self._fd: int | None = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
        self._direct = _open_direct(self._tmp)
        self.size = 0
        self._flushed = 0

    def write(self, data: Buffer) -> None:
        if self._fd is None:
            raise BackendError("write after commit or abort")
        view = memoryview(data).cast("B")
        direct = self._direct is not None and self.size % _ALIGN == 0 and _aligned(view)
        fd = self._direct if direct else self._fd
        with _translated(f"writing {self._tmp}"):
            while view:
                n = os.pwrite(fd, view, self.size)
                view = view[n:]
                self.size += n
            if direct:
                self._flushed = self.size
            elif _sync_file_range and self.size - self._flushed >= _WRITEBACK_STEP:
                _sync_file_range(self._fd, self._flushed, self.size - self._flushed,
                                 _SYNC_FILE_RANGE_WRITE)
                self._flushed = self.size

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        if self._fd is None:
            raise BackendError("commit after commit or abort")
        final = self._backend.path(key)
        self._close_direct()
        fd, self._fd = self._fd, None
        try:
            with _translated(f"storing {key}"):
                os.fdatasync(fd)
                os.close(fd)
                fd = -1
                self._backend.make_parents(final)
                if exclusive:
                    try:
                        os.link(self._tmp, final)
                    except FileExistsError:
                        return False
                    finally:
                        os.unlink(self._tmp)
                else:
                    os.replace(self._tmp, final)
                _fsync_dir(os.path.dirname(final))
                return True
        finally:
            if fd >= 0:
                os.close(fd)
            self.abort()

    def _close_direct(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def abort(self) -> None:
        self._close_direct()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


class LocalBackend(Backend):
    schemes = ("file",)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        _, path = split_scheme(url)
        if url.startswith("file://") and not path.startswith("/"):
            raise BackendError(f"file URL {url!r} must have an absolute path: file:///path")
        self.root = os.path.abspath(path)
        self.tmp_dir = os.path.join(self.root, TMP_DIR)
        with _translated(f"creating the root {self.root}"):
            os.makedirs(self.tmp_dir, exist_ok=True)

    def path(self, key: str) -> str:
        """The file of ``key``; ``check_key`` makes escaping the root impossible."""
        return os.path.join(self.root, *check_key(key).split("/"))

    def make_parents(self, path: str) -> None:
        """Create missing parent directories, fsyncing each parent that gained an entry."""
        parent = os.path.dirname(path)
        if os.path.isdir(parent):
            return
        self.make_parents(parent)
        try:
            os.mkdir(parent)
        except FileExistsError:
            return
        _fsync_dir(os.path.dirname(parent))

    # -- primitives ---------------------------------------------------------------------

    def writer(self, key_hint: str | None = None) -> Writer:
        return LocalWriter(self)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        with _translated(f"reading {key}"):
            f = open(self.path(key), "rb", buffering=0)  # noqa: SIM115 - closed by _iter
        return self._iter(f, start, length, chunk_size)

    @staticmethod
    def _iter(f: IO[bytes], start: int, length: int | None, chunk_size: int) -> Iterator[bytes]:
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

    def stat(self, key: str) -> ObjectInfo:
        with _translated(f"stat {key}"):
            st = os.stat(self.path(key))
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> bool:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise BackendError(f"deleting {key}: {exc.strerror}") from exc
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]
        top = os.path.join(self.root, *base.split("/")) if base else self.root
        return self._walk(top, base, prefix)

    def _walk(self, top: str, base: str, prefix: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(top))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            key = f"{base}/{entry.name}" if base else entry.name
            if entry.is_dir(follow_symlinks=False):
                if key.startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(entry.path, key, prefix)
            elif key.startswith(prefix):
                yield key

    def default_index_path(self) -> str:
        return os.path.join(self.root, INDEX_DIR)

    # -- capabilities -------------------------------------------------------------------

    def local_path(self, key: str) -> str:
        return self.path(key)

