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

An upload session's bytes are appended in place to ``<key>/data``. Each append also writes
the session's journal (offset and hash state, see :mod:`casengine.uploads`) into one of two
slots far past any blob's end in the same file, so the single ``fdatasync`` that makes the
bytes durable makes their journal durable too: an acknowledged append costs one flush, not
two. The file is sparse; publishing cuts it to the blob's size and links it::

    uploads/<id>/data   [ blob bytes ... ][ hole ... ][ slot 0 ][ slot 1 ]
                        0                            JOURNAL_AT
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import IO

import xxhash

from casengine.backend import (
    READ_CHUNK,
    Appender,
    Backend,
    Buffer,
    ObjectInfo,
    UploadJournal,
    Writer,
    check_key,
    check_prefix,
    os_error,
    split_scheme,
)
from casengine.errors import BackendError, InvalidInput

TMP_DIR = ".tmp"
INDEX_DIR = ".index"
_SYNC_FILE_RANGE_WRITE = 2
#: O_DIRECT wants buffer address, length and file offset aligned; a page satisfies every disk.
_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
#: Start writeback once this much is dirty: big enough to batch, small enough that the
#: disk writes while the caller still hashes, so the fdatasync that acknowledges a chunk
#: waits only for the last step.
_WRITEBACK_STEP = 1 << 20
#: Where the journal slots of a staged upload start: 8 TiB, past any blob (and below
#: ext4's 16 TiB file size limit). A slot holds one append's journal entry.
JOURNAL_AT = 1 << 43
_SLOT = 4096
_MAGIC = b"casjrnl1"
#: A slot that cannot be written here (a file system without sparse files this large)
#: only means the append is not journaled: the caller then records it durably itself.
_NO_JOURNAL = (errno.EFBIG, errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP)


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSink:
    """Writes at increasing offsets of one file: O_DIRECT for aligned chunks, else buffered."""

    def __init__(self, path: str, offset: int, *, create: bool) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        with _translated(f"opening {path}"):
            self.fd = os.open(path, flags, 0o644)
        self._direct = _open_direct(path)
        self.start = self.pos = self._flushed = offset

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        with _translated(f"writing {self.path}"):
            if self._direct is not None and self.pos % _ALIGN == 0 and _aligned(view):
                self._write_direct(view)
            else:
                self._write_buffered(view)

    def _write_direct(self, view: memoryview) -> None:
        """Whole pages from a page-aligned buffer go past the page cache."""
        assert self._direct is not None
        self._pwrite(self._direct, view)
        self._flushed = self.pos

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
        with _translated(f"syncing {self.path}"):
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalWriter(Writer):
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._sink: _FileSink | None = _FileSink(
            os.path.join(backend.tmp_dir, uuid.uuid4().hex), 0, create=True)
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._sink is None:
            raise BackendError("write after commit or abort")
        self._sink.write(data)
        self.size = self._sink.pos

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        if self._sink is None:
            raise BackendError("commit after commit or abort")
        try:
            self._sink.sync()
            self._sink.close()
            return self._backend.publish_file(self._sink.path, key, exclusive=exclusive)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._sink.path)
            self._sink = None


class LocalAppender(Appender):
    """Appends go straight into one staged file; publishing it is a hard link.

    What an unfinished append leaves past the offset is overwritten by the next one, or cut
    off on publishing; truncating it here would cut off the journal slots too.
    """

    def __init__(self, path: str, offset: int, seq: int) -> None:
        self._sink: _FileSink | None = _FileSink(path, offset, create=False)
        self._seq = seq
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._sink is None:
            raise BackendError("write after finish or abort")
        if self._sink.pos + memoryview(data).nbytes > JOURNAL_AT:
            raise InvalidInput(f"an upload holds at most {JOURNAL_AT} bytes here")
        self._sink.write(data)
        self.size = self._sink.pos - self._sink.start

    def finish(self, journal: dict | None = None) -> dict:
        if self._sink is None:
            raise BackendError("finish after finish or abort")
        # every append advances seq, journaled or not: an entry is newer than a record
        # exactly when its seq is higher
        state = {"seq": self._seq + 1, "size": self._sink.pos}
        if journal is not None:
            self.journaled = self._write_slot(state, journal)
        self._sink.sync()
        self._sink.close()
        self._sink = None
        return state

    def _write_slot(self, state: dict, journal: dict) -> bool:
        assert self._sink is not None
        payload = json.dumps({"state": state, "journal": journal},
                             separators=(",", ":")).encode()
        slot = _MAGIC + len(payload).to_bytes(4, "little") + payload + xxhash.xxh3_64_digest(
            payload)
        if len(slot) > _SLOT:
            return False
        # consecutive appends use alternate slots: a torn write never spoils the last entry
        try:
            os.pwrite(self._sink.fd, slot, JOURNAL_AT + state["seq"] % 2 * _SLOT)
        except OSError as exc:
            if exc.errno in _NO_JOURNAL:
                return False
            raise os_error(f"journaling {self._sink.path}", exc) from exc
        return True

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def _read_slots(path: str) -> list[tuple[dict, dict]]:
    """The intact journal entries of a staged file, oldest first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        raw = [os.pread(fd, _SLOT, JOURNAL_AT + i * _SLOT) for i in range(2)]
    except OSError as exc:
        if exc.errno in _NO_JOURNAL:
            return []  # where no slot could be written, none was
        raise
    finally:
        os.close(fd)
    entries = []
    for slot in raw:
        n = int.from_bytes(slot[8:12], "little")
        payload, check = slot[12:12 + n], slot[12 + n:20 + n]
        if slot[:8] != _MAGIC or len(check) != 8 or xxhash.xxh3_64_digest(payload) != check:
            continue  # never written, or torn by a power cut
        entry = json.loads(payload)
        entries.append((entry["state"], entry["journal"]))
    return sorted(entries, key=lambda e: e[0]["seq"])


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

    def publish_file(self, src: str, key: str, *, exclusive: bool) -> bool:
        """Give the synced file ``src`` the name of ``key``; ``src`` stays for the caller."""
        final = self.path(key)
        with _translated(f"storing {key}"):
            self.make_parents(final)
            if exclusive:
                try:
                    os.link(src, final)
                except FileExistsError:
                    return False
            else:
                tmp = os.path.join(self.tmp_dir, uuid.uuid4().hex)
                os.link(src, tmp)
                os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        return True

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
            raise os_error(f"deleting {key}", exc) from exc
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

    # -- upload staging: one file per upload, appended in place, published by link -------

    def _upload_file(self, key: str) -> str:
        return self.path(f"{key}/data")

    def append(self, key: str, state: dict, offset: int) -> Appender:
        path = self._upload_file(key)
        with _translated(f"staging {key}"):
            self.make_parents(path)
            if offset == 0 and not os.path.exists(path):
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                _fsync_dir(os.path.dirname(path))
        return LocalAppender(path, offset, state.get("seq", 0))

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        path = self._upload_file(key)
        with _translated(f"publishing {key}"):
            self.make_parents(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                have = os.fstat(fd).st_size
                if have < size:
                    raise BackendError(f"staged data of {key} has {have} bytes, expected {size}")
                if have > size:  # the journal, and any unacknowledged tail
                    os.ftruncate(fd, size)
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        return self.publish_file(path, final, exclusive=exclusive)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        # the size bounds it: past the bytes lies the journal (and a hole up to it)
        return self.read(f"{key}/data", 0, state.get("size"))

    def upload_journal(self, key: str, state: dict) -> UploadJournal:
        with _translated(f"reading the journal of {key}"):
            entries = _read_slots(self._upload_file(key))
        seq = state.get("seq", 0)
        return UploadJournal([e for e in entries if e[0]["seq"] > seq],
                             lambda start, end: self.read(f"{key}/data", start, end - start))

    def discard_upload(self, key: str, state: dict) -> None:
        top = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(top, "data"))
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(top)

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False) -> int:
        """Temp files of writers that died (``kill -9``) before commit or abort."""
        purged = 0
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    purged += 1
        return purged

    def default_index_path(self) -> str:
        return os.path.join(self.root, INDEX_DIR)

    # -- capabilities -------------------------------------------------------------------

    def local_path(self, key: str) -> str:
        return self.path(key)

