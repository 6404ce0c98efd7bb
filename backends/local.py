"""``file:///path`` or a plain path: objects as files under a root directory.

Durability follows the classic recipe: write a temp file under ``<root>/.tmp/``, fsync it,
then ``rename`` (or ``link`` for put-if-absent, which fails natively if the name exists) and
fsync the directory. Keys never start with a dot, so ``.tmp`` and the default index
directory ``.index`` can never be listed or addressed as objects.

Writes go through :mod:`backends.local_files` (``O_DIRECT`` for large aligned chunks,
early writeback for the rest); upload sessions are staged as described in
:mod:`backends.local_staging`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator

from backends.local_files import FileSink, fsync_dir, read_file, translated
from backends.local_staging import LocalUploadStaging
from casengine.backend import (
    READ_CHUNK,
    Backend,
    Buffer,
    ObjectInfo,
    Writer,
    check_key,
    check_prefix,
    os_error,
    split_scheme,
    writers_cutoff,
)
from casengine.errors import BackendError, ConfigError
from casengine.layout import UPLOADS

TMP_DIR = ".tmp"
INDEX_DIR = ".index"


class LocalWriter(Writer):
    def __init__(self, backend: LocalBackend) -> None:
        self._backend = backend
        self._sink: FileSink | None = FileSink(
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


class LocalBackend(LocalUploadStaging, Backend):
    schemes = ("file",)

    def __init__(self, url: str) -> None:
        super().__init__(url)
        _, path = split_scheme(url)
        if url.startswith("file://") and not path.startswith("/"):
            raise BackendError(f"file URL {url!r} must have an absolute path: file:///path")
        self.root = os.path.abspath(path)
        self.tmp_dir = os.path.join(self.root, TMP_DIR)
        try:
            os.makedirs(self.tmp_dir, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission: the root is unusable
            raise ConfigError(f"cannot use {self.root} as a root: {exc.strerror}") from None

    def path(self, key: str) -> str:
        """The file of ``key``; ``check_key`` makes escaping the root impossible."""
        return os.path.join(self.root, *check_key(key).split("/"))

    def publish_file(self, src: str, key: str, *, exclusive: bool) -> bool:
        """Give the synced file ``src`` the name of ``key``; ``src`` stays for the caller."""
        final = self.path(key)
        with translated(f"storing {key}"):
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
            fsync_dir(os.path.dirname(final))
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
        fsync_dir(os.path.dirname(parent))

    # -- primitives ---------------------------------------------------------------------

    def writer(self, key_hint: str | None = None) -> Writer:
        return LocalWriter(self)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        with translated(f"reading {key}"):
            f = open(self.path(key), "rb", buffering=0)  # noqa: SIM115 - closed by read_file
        return read_file(f, start, length, chunk_size)

    def stat(self, key: str) -> ObjectInfo:
        with translated(f"stat {key}"):
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

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False, *,
                      writers_before: float | None = None) -> int:
        """Temp files of writers that died (``kill -9``) before commit or abort, and empty
        directories of upload sessions a discard died in."""
        cutoff = writers_cutoff(older_than, writers_before)
        purged = 0
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    purged += 1
        return purged + self._purge_session_dirs(older_than, in_use)

    def _purge_session_dirs(self, older_than: float, in_use: Callable[[str], bool]) -> int:
        """Empty directories of sessions without a record: a discard killed between
        removing the staged file and its directory leaves one, which no listing of keys
        finds (it holds none). ``rmdir`` removes only empty ones."""
        purged = 0
        try:
            entries = list(os.scandir(self.path(UPLOADS.rstrip("/"))))
        except FileNotFoundError:
            return 0
        for entry in entries:
            key = UPLOADS + entry.name
            with contextlib.suppress(OSError):  # gone, or not empty: a session's bytes
                if (entry.is_dir(follow_symlinks=False) and not in_use(key)
                        and entry.stat().st_mtime < older_than):
                    os.rmdir(entry.path)
                    purged += 1
        return purged

    def default_index_path(self) -> str:
        return os.path.join(self.root, INDEX_DIR)

    # -- capabilities -------------------------------------------------------------------

    def local_path(self, key: str) -> str:
        return self.path(key)

