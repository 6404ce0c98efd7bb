"""``proto://path`` for any other fsspec protocol (``gcs://``, ``abfs://``, ...): objects as
files of an fsspec filesystem under a root path.

A write goes to ``<root>/.tmp/<uuid>`` and is moved into place at commit. Keys never start
with a dot, so ``.tmp`` can never be listed or addressed as an object. The move is a rename
on file systems and a server-side copy plus delete on object stores; either way the object
appears whole under its key.

Put-if-absent (``commit(key, exclusive=True)``) is only as strong as the filesystem allows,
and :attr:`FsspecBackend.atomic_exclusive` says which case applies:

- **Native** when the filesystem has ``link`` (a hard link, refused if the name exists, as
  fsspec's local filesystem has): atomic, exactly one of racing writers creates the object.
- **Check, then move** otherwise: an existing object is never replaced by an exclusive
  commit that sees it, but two exclusive commits racing on one absent key may both report
  that they created it, and the last one's bytes stay. fsspec has no portable conditional
  write (its ``"xb"`` mode is optional and not promised atomic), so nothing stronger is
  claimed. For content-addressed blobs the racers write the same bytes, so no data is wrong;
  records that need a single winner should use a backend with a native mechanism.

Durability is what the filesystem gives when a file is closed; nothing is fsynced here.
Storage options go to ``fsspec.filesystem`` unchanged, one filesystem per backend instance.
Errors are translated in one place, :func:`_translated`, by exception type.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

from fsspec.core import url_to_fs

from casengine.backend import (
    READ_CHUNK,
    Backend,
    Buffer,
    ObjectInfo,
    Writer,
    check_key,
    check_prefix,
    os_error,
)
from casengine.errors import BackendError, CASError, InvalidKey, MissingExtra, NotFound

TMP_DIR = ".tmp"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map filesystem errors to the engine's errors, by type, in one place."""
    try:
        yield
    except CASError:
        raise
    except (FileNotFoundError, IsADirectoryError) as exc:  # a directory is no object either
        raise NotFound(f"{what}: not found") from exc
    except OSError as exc:  # EIO, timeouts, resets are transient; a full disk is not
        raise os_error(what, exc) from exc
    except Exception as exc:  # fsspec implementations raise their own error types
        raise BackendError(f"{what}: {type(exc).__name__}: {exc}") from exc


class FsspecWriter(Writer):
    def __init__(self, backend: FsspecBackend) -> None:
        self._backend = backend
        self._tmp = f"{backend.tmp_dir}/{uuid.uuid4().hex}"
        with _translated(f"creating {self._tmp}"):
            self._file: IO[bytes] | None = backend.fs.open(self._tmp, "wb")
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._file is None:
            raise BackendError("write after commit or abort")
        view = memoryview(data).cast("B")
        with _translated(f"writing {self._tmp}"):
            self._file.write(view)
        self.size += len(view)

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        final = self._backend.path(key)
        if self._file is None:
            raise BackendError("commit after commit or abort")
        fs = self._backend.fs
        try:
            with _translated(f"storing {key}"):
                file, self._file = self._file, None
                file.close()
                fs.makedirs(posixpath.dirname(final), exist_ok=True)
                if not exclusive:
                    fs.mv(self._tmp, final)
                elif self._backend.atomic_exclusive:
                    try:
                        fs.link(self._tmp, final)
                    except FileExistsError:
                        return False
                else:
                    if self._backend.exists(key):
                        return False
                    fs.mv(self._tmp, final)
                return True
        finally:
            self.abort()

    def abort(self) -> None:
        """Best effort: a temp file that cannot be removed stays under ``.tmp``."""
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()
            self._backend.fs.rm_file(self._tmp)
        except FileNotFoundError:
            pass  # committed, or never written
        except Exception as exc:  # noqa: BLE001 - cleanup must not mask the caller's error
            log.warning("%s: could not remove %s: %s", self._backend.url, self._tmp, exc)


class FsspecBackend(Backend):
    """Objects as files under an fsspec root; see the module docstring."""

    #: None of its own: it serves every fsspec protocol casengine has no backend for.
    schemes = ()

    def __init__(self, url: str, **storage_options: Any) -> None:
        super().__init__(url)
        try:
            with _translated(f"opening {url}"):
                self.fs, root = url_to_fs(url, skip_instance_cache=True, **storage_options)
                self.root = str(root).rstrip("/")
                self.tmp_dir = f"{self.root}/{TMP_DIR}"
                self.fs.makedirs(self.tmp_dir, exist_ok=True)
        except BackendError as exc:
            if isinstance(exc.__cause__, ImportError):  # the protocol's package is missing
                raise MissingExtra(f"{url}: {exc.__cause__}") from None
            raise
        #: Whether put-if-absent is atomic here (see the module docstring).
        self.atomic_exclusive = callable(getattr(self.fs, "link", None))

    def path(self, key: str) -> str:
        """The filesystem path of ``key``; ``check_key`` makes escaping the root impossible."""
        return f"{self.root}/{check_key(key)}"

    def writer(self, key_hint: str | None = None) -> Writer:
        return FsspecWriter(self)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        path = self.path(key)
        with _translated(f"reading {key}"):
            f = self.fs.open(path, "rb", block_size=chunk_size, cache_type="none")
        return self._iter(f, key, start, length, chunk_size)

    @staticmethod
    def _iter(f: IO[bytes], key: str, start: int, length: int | None,
              chunk_size: int) -> Iterator[bytes]:
        with f, _translated(f"reading {key}"):
            f.seek(start)
            left = -1 if length is None else length
            while left:
                chunk = f.read(chunk_size if left < 0 else min(chunk_size, left))
                if not chunk:
                    return
                left -= len(chunk) if left > 0 else 0
                yield chunk

    def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        with _translated(f"stat {key}"):
            info = self.fs.info(path)
            if info.get("type") == "directory":
                raise NotFound(f"stat {key}: not found")
            return ObjectInfo(key, int(info["size"]), self._mtime(info, path))

    def _mtime(self, info: dict[str, Any], path: str) -> float:
        for name in ("mtime", "LastModified", "updated", "last_modified", "modified"):
            value = info.get(name)
            if isinstance(value, int | float):
                return float(value)
            if isinstance(value, datetime):
                return value.timestamp()
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    return datetime.fromisoformat(value).timestamp()
        return float(self.fs.modified(path).timestamp())

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it existed is asked first, so two concurrent deletes of
        one key may both return True."""
        path = self.path(key)
        if not self.exists(key):
            return False
        try:
            with _translated(f"deleting {key}"):
                self.fs.rm_file(path)
        except NotFound:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        base = prefix.rpartition("/")[0]
        top = f"{self.root}/{base}" if base else self.root
        with _translated(f"listing {prefix!r}"):
            self.fs.invalidate_cache(top)
            paths = self.fs.find(top, withdirs=False, detail=False)
        return self._keys(paths, prefix)

    def _keys(self, paths: list[str], prefix: str) -> Iterator[str]:
        for path in paths:
            key = str(path)[len(self.root) + 1 :]
            if key.startswith(prefix) and not key.startswith(TMP_DIR + "/"):
                with contextlib.suppress(InvalidKey):
                    yield check_key(key)
