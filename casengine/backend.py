"""The backend protocol: a backend moves bytes under keys, and nothing more.

Backends know nothing of digests, manifests or the index. Every backend provides the same
small set of primitives:

- atomic put, through a staged :class:`Writer` that publishes on :meth:`Writer.commit`
- put-if-absent (``commit(key, exclusive=True)``), native to each backend
- ranged read as a stream (:meth:`Backend.read`)
- :meth:`Backend.stat`, :meth:`Backend.delete`, :meth:`Backend.list` by prefix

Optional capabilities are declared by implementing one of the ``runtime_checkable``
protocols at the bottom (``isinstance(backend, LocalPaths)``), never faked.

Keys are ``/``-separated relative paths, validated in one place (:func:`check_key`). Temp
and staging objects never show in :meth:`Backend.list`.

Backends are found by URL scheme (:func:`open_backend`), never imported by name from the
core: a lazy table of the built-in ones plus the ``casengine.backends`` entry-point group,
and the generic fsspec backend for any other protocol fsspec knows. ``wrapper+inner://``
names a backend around another one (``faulty+file:///srv/cas``), built on
:class:`BackendWrapper`.

Backends translate their failures through :func:`os_error` and :func:`service_error`, so
that all agree on what is transient (:class:`~casengine.errors.BackendUnavailable`, which
:mod:`casengine.retry` retries) and what is not (a full disk, a refused request).
"""

from __future__ import annotations

import errno
import functools
import inspect
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import import_module
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

from casengine.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidKey,
    MissingExtra,
    NotFound,
    StorageFull,
    UnknownScheme,
)

#: What writers accept: anything with the buffer protocol over bytes.
Buffer = bytes | bytearray | memoryview

#: Default size of the chunks a read yields.
READ_CHUNK = 1 << 20
#: Seconds a writer's leftovers (a temp file, an ingest's multipart upload) must be idle
#: before a purge drops them: nothing says whether their writer lives, and a client may
#: pause mid-body. Upload sessions have leases and their own cutoff.
WRITER_MIN_IDLE = 3600.0


def writers_cutoff(older_than: float, writers_before: float | None) -> float:
    """Before when a writer's leftovers must have last changed to be purged."""
    if writers_before is not None:
        return writers_before
    return min(older_than, time.time() - WRITER_MIN_IDLE)

_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`InvalidKey`.

    Each ``/``-separated part must start with a letter, digit or underscore, so ``..``,
    ``.``, hidden names, empty parts and absolute paths are all impossible by construction.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(f"invalid key {key!r}: must be a non-empty string")
    if len(key) > 1024 or not all(_KEY_PART.fullmatch(p) for p in key.split("/")):
        raise InvalidKey(
            f"invalid key {key[:200]!r}: parts must match [A-Za-z0-9_][A-Za-z0-9._-]*, "
            "joined by single '/'"
        )
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key, optionally ending in ``/``."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class Writer(ABC):
    """A staged object. Nothing written here is visible until :meth:`commit`.

    Use it as a context manager: leaving the block without a commit aborts, so a failed
    ingest leaves no partial object behind.
    """

    size: int = 0

    @abstractmethod
    def write(self, data: Buffer) -> None:
        """Append bytes. The caller may reuse ``data`` once this returns."""

    @abstractmethod
    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        """Publish the staged bytes atomically under ``key``.

        With ``exclusive``, an existing object is left untouched and the staged bytes are
        dropped; the return value says whether this call created the object.
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop the staged bytes. Safe to call more than once, and after commit."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class Appender(ABC):
    """Bytes appended to an upload's staged data at a fixed offset.

    Nothing is acknowledged until :meth:`finish` returns the upload's new backend state
    (a JSON-able dict the caller stores); by then the bytes are durable. :meth:`abort`, or
    leaving the ``with`` block without finishing, drops what this appender wrote.
    """

    size: int = 0
    #: Set by :meth:`finish` when the journal it was given is durable with the bytes.
    journaled: bool = False

    def expect(self, size: int, *, in_memory: bool = False) -> None:
        """A hint, given before the first write: this append will have ``size`` bytes,
        and with ``in_memory``, all of them come in one write, from memory the caller
        already holds (so the write is bounded by the backend, not by the bytes' arrival).
        A backend may choose how it writes by it; nothing else depends on it."""

    @abstractmethod
    def write(self, data: Buffer) -> None: ...

    @abstractmethod
    def finish(self, journal: dict | None = None) -> dict:
        """Make the appended bytes durable; return the new state.

        ``journal`` is the caller's session state after this append (JSON-able, small).
        A backend that can make it durable together with the bytes, in the same flush,
        does so and sets :attr:`journaled`; :meth:`Backend.upload_journal` gives it back.
        The caller then need not make its own record of the append durable at once.
        """

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class _PartAppender(Appender):
    """The generic append: each append is one more object ``<key>/<offset as hex>``."""

    def __init__(self, backend: Backend, key: str, state: dict, offset: int) -> None:
        self._key = f"{key}/{offset:016x}"
        self._state = state
        self._offset = offset
        self._writer = backend.writer(self._key)
        self.size = 0

    def write(self, data: Buffer) -> None:
        self._writer.write(data)
        self.size = self._writer.size

    def finish(self, journal: dict | None = None) -> dict:
        if self.size:
            self._writer.commit(self._key)
            parts = [p for p in self._state.get("parts", []) if p[0] < self._offset]
            return {**self._state, "parts": [*parts, [self._offset, self.size]]}
        self._writer.abort()
        return self._state

    def abort(self) -> None:
        self._writer.abort()


@dataclass(frozen=True, slots=True)
class UploadJournal:
    """What :meth:`Backend.upload_journal` found of an upload's journal.

    ``entries`` are ``(state, journal)`` pairs, oldest first: the backend state an append's
    :meth:`Appender.finish` returned and the journal it was given. They are only claims:
    an append in flight at a power cut may have its entry on disk without all its bytes,
    so the caller checks an entry against the bytes (``read(start, end)``) before it
    trusts it.
    """

    entries: list[tuple[dict, dict]]
    read: Callable[[int, int], Iterator[bytes]]


class Backend(ABC):
    """Bytes under keys. Implementations must be thread-safe."""

    #: URL schemes this class serves, for error messages and ``repr``.
    schemes: ClassVar[tuple[str, ...]] = ()
    #: The data dies with the process (``memory://``), so the index may be temporary too.
    ephemeral: ClassVar[bool] = False

    def __init__(self, url: str) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- primitives ---------------------------------------------------------------------

    @abstractmethod
    def writer(self, key_hint: str | None = None) -> Writer:
        """Start a staged object (see :class:`Writer`).

        ``key_hint`` is the key the caller expects to commit to, when it knows it (an
        ingest with an expected digest). Object stores use it to upload straight to the
        final key and publish at commit, instead of copying from a staging key.
        """

    @abstractmethod
    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        """Stream ``length`` bytes (all, if None) from ``start``; raises NotFound eagerly."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time; raises :class:`~casengine.errors.NotFound`."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys that start with ``prefix``, in no particular order, temp objects never."""

    # -- conveniences built on the primitives --------------------------------------------

    def put(self, key: str, data: Buffer, *, exclusive: bool = False) -> bool:
        """Atomically store small ``data`` under ``key`` (see :meth:`Writer.commit`)."""
        with self.writer(key) as w:
            w.write(data)
            return w.commit(key, exclusive=exclusive)

    def get(self, key: str) -> bytes:
        """The whole object: for small records only, never for blobs."""
        return b"".join(self.read(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    # -- upload staging -------------------------------------------------------------------
    #
    # An upload session's bytes arrive in chunks, possibly in different processes, and must
    # be published as one object without being streamed through the engine again where the
    # backend can avoid it. The generic versions below keep one object per append and
    # concatenate them on publish (a copy); backends with better means override all four.

    #: Smallest chunk worth sending in one append (S3: a multipart part); 0 means any.
    min_chunk: ClassVar[int] = 0

    def append(self, key: str, state: dict, offset: int) -> Appender:
        """Append to the staged data under the prefix ``key``, whose length is ``offset``."""
        return _PartAppender(self, key, state, offset)

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        """Publish the staged data as the object ``final`` (see :meth:`Writer.commit`)."""
        with self.writer(final) as w:
            for chunk in self.read_upload(key, state):
                w.write(chunk)
            if w.size != size:
                raise BackendError(f"staged data of {key} has {w.size} bytes, expected {size}")
            return w.commit(final, exclusive=exclusive)

    def upload_journal(self, key: str, state: dict) -> UploadJournal | None:
        """Journal entries newer than ``state`` (see :meth:`Appender.finish`); None where
        the backend keeps no journal."""
        return None

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        """The staged bytes, in order: for re-hashing when a saved hash state is missing."""
        for offset, _ in state.get("parts", []):
            yield from self.read(f"{key}/{offset:016x}")

    def discard_upload(self, key: str, state: dict) -> None:
        """Remove all staged data under ``key``, including that of unfinished appends."""
        for k in list(self.list(key + "/")):
            self.delete(k)

    def staged_bytes(self, key: str, state: dict) -> int:
        """What the staged data under ``key`` takes, that of unfinished appends included:
        what :meth:`discard_upload` would free. An upload sweep reports it."""
        total = 0
        for k in list(self.list(key + "/")):
            try:
                total += self.stat(k).size
            except NotFound:
                pass  # discarded meanwhile
        return total

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False, *,
                      writers_before: float | None = None) -> int:
        """Drop abandoned staging state only the backend can see (S3: multipart uploads
        idle since before the unix time ``older_than``); return how many. ``in_use(key)``
        says whether the upload prefix ``key`` still belongs to a live session, which is
        never touched. What other writers leave (temp files, the multipart upload of an
        ingest) goes only if idle since before ``writers_before`` (default: also for
        :data:`WRITER_MIN_IDLE`, see :func:`writers_cutoff`). Default: nothing to drop."""
        return 0

    def default_index_path(self) -> str | None:
        """Where the index lives when the user names none; None: the user must name one."""
        return None

    def close(self) -> None:
        """Release connections and files. The default has nothing to release."""


# -- optional capabilities ---------------------------------------------------------------


@runtime_checkable
class LocalPaths(Protocol):
    """The object lives in a local file that may be served zero-copy (``sendfile``)."""

    def local_path(self, key: str) -> str: ...


@runtime_checkable
class Presigner(Protocol):
    """Short-lived URLs that let a client fetch an object without going through us."""

    def presign(self, key: str, expires: int = 300) -> str: ...


@runtime_checkable
class ServerCopy(Protocol):
    """Copy an object inside the store without streaming it through this process."""

    def copy(self, src: str, dst: str, *, exclusive: bool = False) -> bool: ...


# -- transient or permanent: the one classification of backend failures ------------------
#
# Backends translate their own exceptions (by type or error code, never by message text)
# through these two functions, so that every backend agrees on what a retry may fix.

#: OS errors a retry may fix: I/O errors of network and FUSE filesystems, timeouts, resets.
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH,
    errno.ESTALE})
#: OS errors that mean the store is out of space: permanent until someone frees some.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: Service error codes (S3 and friends) a retry may fix: throttling, 5xx, timeouts.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "InternalFailure", "ServiceUnavailable", "ServiceUnavailableException",
    "BandwidthLimitExceeded", "429", "500", "502", "503", "504"})


def os_error(what: str, exc: OSError) -> BackendError | NotFound:
    """The engine error for an OS error of the operation ``what``."""
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{what}: not found")
    text = f"{what}: {exc.strerror or exc}"
    if exc.errno in FULL_ERRNOS:
        return StorageFull(text)
    if exc.errno in TRANSIENT_ERRNOS or isinstance(exc, TimeoutError | ConnectionError):
        return BackendUnavailable(text)
    return BackendError(text)


def service_error(what: str, code: str, message: str) -> BackendError:
    """The engine error for a storage service's error ``code`` (``SlowDown``, ``503``)."""
    cls = BackendUnavailable if code in TRANSIENT_CODES else BackendError
    return cls(f"{what}: {code}: {message}")


# -- wrappers: a backend around another one ----------------------------------------------


class BackendWrapper(Backend):
    """Delegates every primitive to ``inner``; subclasses change some (retries, faults).

    Build one with :meth:`around`, which also declares exactly the optional capabilities
    the inner backend has. Other attributes (a local root's ``root``) are the inner's.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.schemes = inner.schemes
        self.ephemeral = inner.ephemeral
        self.min_chunk = inner.min_chunk

    @classmethod
    def around(cls, inner: Backend, *args: Any, **kwargs: Any) -> Self:
        return wrapper_class(cls, type(inner))(inner, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def __getattr__(self, name: str) -> Any:
        if name == "inner" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def writer(self, key_hint: str | None = None) -> Writer:
        return self.inner.writer(key_hint)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        return self.inner.read(key, start, length, chunk_size=chunk_size)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def put(self, key: str, data: Buffer, *, exclusive: bool = False) -> bool:
        return self.inner.put(key, data, exclusive=exclusive)

    def append(self, key: str, state: dict, offset: int) -> Appender:
        return self.inner.append(key, state, offset)

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        return self.inner.publish_upload(key, state, size, final, exclusive=exclusive)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        return self.inner.read_upload(key, state)

    def upload_journal(self, key: str, state: dict) -> UploadJournal | None:
        return self.inner.upload_journal(key, state)

    def discard_upload(self, key: str, state: dict) -> None:
        self.inner.discard_upload(key, state)

    def staged_bytes(self, key: str, state: dict) -> int:
        return self.inner.staged_bytes(key, state)

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False, *,
                      writers_before: float | None = None) -> int:
        return self.inner.purge_staging(older_than, in_use, writers_before=writers_before)

    def default_index_path(self) -> str | None:
        return self.inner.default_index_path()

    def close(self) -> None:
        self.inner.close()


class _LocalPathsOf:
    inner: Any

    def local_path(self, key: str) -> str:
        return self.inner.local_path(key)


class _PresignerOf:
    inner: Any

    def presign(self, key: str, expires: int = 300) -> str:
        return self.inner.presign(key, expires)


class _ServerCopyOf:
    inner: Any

    def copy(self, src: str, dst: str, *, exclusive: bool = False) -> bool:
        return self.inner.copy(src, dst, exclusive=exclusive)


@functools.cache
def wrapper_class(cls: type, inner: type) -> type:
    """``cls`` plus a delegating method for each optional capability ``inner`` has; a
    wrapper's subclass may override them (the capability is the inner's either way)."""
    mixins = tuple(m for name, m in (("local_path", _LocalPathsOf), ("presign", _PresignerOf),
                                     ("copy", _ServerCopyOf))
                   if callable(getattr(inner, name, None)))
    if not mixins:
        return cls
    return type(cls.__name__, (*mixins, cls), {"__module__": cls.__module__})


# -- finding a backend by URL -------------------------------------------------------------

ENTRY_POINT_GROUP = "casengine.backends"

#: Built-in backends: scheme -> (``module:Class``, extra that provides its dependencies).
BUILTIN: dict[str, tuple[str, str | None]] = {
    "memory": ("backends.memory:MemoryBackend", None),
    "file": ("backends.local:LocalBackend", None),
    "s3": ("backends.s3:S3Backend", "s3"),
    "s3a": ("backends.s3:S3Backend", "s3"),
    "faulty": ("backends.faulty:FaultyBackend", None),
}
FSSPEC_GENERIC = "backends.fsspec:FsspecBackend"

_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")


def split_scheme(url: str) -> tuple[str, str]:
    """``'s3://b/p'`` -> ``('s3', 'b/p')``; a plain path is ``file``."""
    m = _SCHEME.match(url)
    if not m:
        return "file", url
    return m.group(1).lower(), url[m.end() :]


def _registered() -> dict[str, str]:
    """Built-ins plus entry points; a name claimed twice for different classes is an error."""
    from importlib.metadata import entry_points  # slow to import: only when needed

    table = {scheme: target for scheme, (target, _) in BUILTIN.items()}
    seen: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen and seen[ep.name] != ep.value:
            raise ConfigError(
                f"backend scheme {ep.name!r} is registered twice: {seen[ep.name]} and {ep.value}"
            )
        seen[ep.name] = ep.value
        if ep.name in table and table[ep.name] != ep.value:
            raise ConfigError(
                f"backend scheme {ep.name!r} of entry point {ep.value} clashes with the "
                f"built-in {table[ep.name]}"
            )
        table[ep.name] = ep.value
    return table


def _load(target: str, scheme: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    extra = BUILTIN.get(scheme, (None, None))[1]
    try:
        module = import_module(module_name)
    except ImportError as exc:
        if extra:
            raise MissingExtra(
                f"{scheme}:// needs the '{extra}' extra: pip install 'casengine[{extra}]' "
                f"({exc})"
            ) from exc
        raise MissingExtra(f"cannot load the backend for {scheme}:// from {target}: {exc}") from exc
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise ConfigError(f"{target} is not a casengine Backend")
    return cls


def backend_class(scheme: str) -> type[Backend]:
    """The class for ``scheme``. ``wrapper+inner`` (``faulty+file``) names a wrapper
    backend, which opens the inner URL itself."""
    if scheme in BUILTIN:  # the common case needs no scan of installed packages
        return _load(BUILTIN[scheme][0], scheme)
    table = _registered()
    if scheme in table:
        return _load(table[scheme], scheme)
    wrapper = scheme.partition("+")[0]
    if wrapper != scheme and wrapper in table:
        return _load(table[wrapper], wrapper)
    from fsspec.registry import known_implementations, registry

    if scheme in known_implementations or scheme in registry:
        return _load(FSSPEC_GENERIC, scheme)
    raise UnknownScheme(
        f"unknown storage scheme {scheme!r}: casengine knows {', '.join(sorted(table))} "
        "and every protocol fsspec knows"
    )


def open_backend(url: str, **storage_options: Any) -> Backend:
    """Open the backend for ``url``; ``storage_options`` go to the backend unchanged."""
    scheme, _ = split_scheme(url)
    cls = backend_class(scheme)
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(storage_options) - set(params))
        if unknown:
            known = sorted(set(params) - {"url"})
            raise ConfigError(f"unknown storage option {', '.join(unknown)} for a {scheme}:// "
                              f"root (it takes {', '.join(known) or 'none'})")
    return cls(url, **storage_options)
