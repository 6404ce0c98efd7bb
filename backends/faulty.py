"""``faulty+<url>``: any backend, with failures injected into a chosen fraction of calls.

For tests, load tests and crash drills: ``casengine serve --root 'faulty+file:///srv/cas?rate=0.05&seed=1'``.
The inner URL is everything after ``faulty+`` up to the ``?``; the query (or storage options
of the same names, ``-o rate=0.05``, which win) sets the faults. Other storage options go to
the inner backend.

Each protocol call (start a write, write a chunk, commit, read, each chunk read, stat,
delete, list, put, and the upload staging calls) draws once from a seeded random stream;
with one thread the faults fall on the same calls every run (with several, the order in
which the threads call decides). The kinds, each with its own rate (a fraction of calls):

========== ============================================================================
``eio``        ``OSError(EIO)``, translated as the local backend translates it: transient
``http500``    an S3-style ``InternalError`` (500): transient
``http503``    an S3-style ``ServiceUnavailable`` (503): transient
``slowdown``   S3 throttling, ``SlowDown``: transient
``stall``      no error: the call waits ``stall_seconds`` first (a slow store)
``enospc``     ``OSError(ENOSPC)`` on calls that write: permanent (:class:`StorageFull`)
========== ============================================================================

``rate=R`` spreads R evenly over the four transient errors and the stall. A call that
changes something (commit, put, delete, publish, finish, discard) fails *after* doing its
work in a fraction ``lost_reply`` (default 0.5) of its injected errors: the reply was lost,
the outcome is unknown to the caller. ``full_after=BYTES`` makes every write fail with
ENOSPC once that many bytes went through, as a filling disk does; ``full`` (an attribute
too) does so at once. Deletes still work on a full store. ``calls=commit,put`` limits the
faults to those calls. ``injected`` counts what was injected, by kind.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Self, TypeVar
from urllib.parse import parse_qsl

from casengine.backend import (
    READ_CHUNK,
    Appender,
    Backend,
    BackendWrapper,
    Buffer,
    ObjectInfo,
    Writer,
    open_backend,
    os_error,
    service_error,
    split_scheme,
    wrapper_class,
)
from casengine.errors import CASError, ConfigError

T = TypeVar("T")
PREFIX = "faulty+"
#: The transient errors: kind -> the service error code it imitates (None: an OS error).
TRANSIENT = {"eio": None, "http500": "InternalError", "http503": "ServiceUnavailable",
             "slowdown": "SlowDown"}
_MESSAGES = {"InternalError": "We encountered an internal error. Please try again.",
             "ServiceUnavailable": "Service is unable to handle request.",
             "SlowDown": "Please reduce your request rate."}


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to inject; rates are fractions of calls in [0, 1]."""

    eio: float = 0.0
    http500: float = 0.0
    http503: float = 0.0
    slowdown: float = 0.0
    stall: float = 0.0
    enospc: float = 0.0
    stall_seconds: float = 0.05
    lost_reply: float = 0.5
    full_after: int | None = None
    full: bool = False
    seed: int | None = None
    #: only these calls fail (None: all): writer, write, commit, read, chunk, stat, delete,
    #: list, put, append, finish, publish, discard
    calls: frozenset[str] | None = None

    @classmethod
    def parse(cls, options: dict[str, Any]) -> FaultPlan:
        """From query or storage options (strings or numbers); ``rate`` is the shorthand."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        rate = options.pop("rate", None)
        if rate is not None:
            share = _fraction("rate", rate) / 5
            values.update({k: share for k in (*TRANSIENT, "stall")})
        for name in list(options):
            if name not in known:
                continue
            raw = options.pop(name)
            if name in ("full_after", "seed"):
                values[name] = None if raw in (None, "") else _whole(name, raw)
            elif name == "full":
                values[name] = str(raw).lower() in ("1", "true", "yes")
            elif name == "calls":
                values[name] = None if raw is None else frozenset(
                    raw.split(",") if isinstance(raw, str) else raw)
            elif name == "stall_seconds":
                values[name] = _number(name, raw)
            else:
                values[name] = _fraction(name, raw)
        return cls(**values)

    def error_rates(self, writes: bool) -> list[tuple[str, float]]:
        kinds = [*((k, getattr(self, k)) for k in TRANSIENT), ("stall", self.stall)]
        return [*kinds, ("enospc", self.enospc)] if writes else kinds


def _number(name: str, raw: Any) -> float:
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"faulty backend: {name}={raw!r} is not a number") from None


def _fraction(name: str, raw: Any) -> float:
    value = _number(name, raw)
    if not 0 <= value <= 1:
        raise ConfigError(f"faulty backend: {name}={raw!r} must be between 0 and 1")
    return value


def _whole(name: str, raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"faulty backend: {name}={raw!r} is not a whole number") from None


class FaultyBackend(BackendWrapper):
    schemes = ("faulty",)

    def __new__(cls, url: str, **options: Any) -> Self:
        # the capabilities (a local path, presigning) are the inner backend's: build the
        # class that declares the same ones
        inner, plan = _open_inner(url, options)
        self = object.__new__(wrapper_class(FaultyBackend, type(inner)))
        self._opened = (inner, plan)
        return self

    def __init__(self, url: str, **options: Any) -> None:
        inner, plan = self._opened
        super().__init__(inner)
        self.url = url
        self.plan = plan
        self.full = plan.full
        self.injected: Counter[str] = Counter()
        self._written = 0
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FaultyBackend({self.url!r})"

    # -- deciding and raising -------------------------------------------------------------

    def _draw(self, writes: bool) -> str | None:
        if writes and (self.full or (self.plan.full_after is not None
                                     and self._written > self.plan.full_after)):
            return "enospc"
        with self._lock:
            r = self._rng.random()
            lost = self._rng.random() < self.plan.lost_reply
        for kind, rate in self.plan.error_rates(writes):
            if r < rate:
                return f"{kind}+lost" if lost and kind not in ("stall", "enospc") else kind
            r -= rate
        return None

    @staticmethod
    def _error(kind: str, what: str) -> CASError:
        """The error a backend's own translation gives for such a failure."""
        if kind == "enospc":
            return os_error(what, OSError(errno.ENOSPC, "No space left on device (injected)"))
        code = TRANSIENT[kind]
        if code is None:
            return os_error(what, OSError(errno.EIO, "Input/output error (injected)"))
        return service_error(what, code, f"{_MESSAGES[code]} (injected)")

    def faulted(self, op: str, what: str, fn: Callable[[], T], *, writes: bool = False,
                changes: bool = False) -> T:
        """Run the call ``fn`` (of the kind ``op``) as the plan says: fail before it, stall,
        or fail after it (only where ``changes``: the work is done, the reply is lost)."""
        if self.plan.calls is not None and op not in self.plan.calls:
            return fn()
        kind = self._draw(writes)
        if kind is None:
            return fn()
        base, _, lost = kind.partition("+")
        with self._lock:
            self.injected[base] += 1
        if base == "stall":
            time.sleep(self.plan.stall_seconds)
            return fn()
        if lost and changes:
            fn()
        raise self._error(base, what)

    def count_written(self, n: int) -> None:
        with self._lock:
            self._written += n

    # -- the primitives ---------------------------------------------------------------------

    def writer(self, key_hint: str | None = None) -> Writer:
        return _Writer(self, self.faulted("writer", "starting a write", lambda: self.inner.writer(key_hint),
                                          writes=True))

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        stream = self.faulted("read", f"reading {key}",
                              lambda: self.inner.read(key, start, length, chunk_size=chunk_size))
        return self._stream(f"reading {key}", stream)

    def _stream(self, what: str, stream: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in stream:
            yield self.faulted("chunk", what, lambda c=chunk: c)

    def stat(self, key: str) -> ObjectInfo:
        return self.faulted("stat", f"stat {key}", lambda: self.inner.stat(key))

    def delete(self, key: str) -> bool:
        return self.faulted("delete", f"deleting {key}", lambda: self.inner.delete(key), changes=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.faulted("list", f"listing {prefix}", lambda: self.inner.list(prefix))

    def put(self, key: str, data: Buffer, *, exclusive: bool = False) -> bool:
        def put() -> bool:
            self.count_written(len(memoryview(data).cast("B")))
            return self.inner.put(key, data, exclusive=exclusive)

        return self.faulted("put", f"storing {key}", put, writes=True, changes=True)

    def append(self, key: str, state: dict, offset: int) -> Appender:
        return _Appender(self, self.faulted("append", f"staging {key}",
                                            lambda: self.inner.append(key, state, offset),
                                            writes=True))

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        return self.faulted(
            "publish", f"publishing {key}",
            lambda: self.inner.publish_upload(key, state, size, final, exclusive=exclusive),
            writes=True, changes=True)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        stream = self.faulted("read", f"reading {key}", lambda: self.inner.read_upload(key, state))
        return self._stream(f"reading {key}", stream)

    def discard_upload(self, key: str, state: dict) -> None:
        self.faulted("discard", f"discarding {key}", lambda: self.inner.discard_upload(key, state),
                     changes=True)


class _Faulted:
    """What a faulty writer and appender share: the inner object, its size, faulted writes."""

    def __init__(self, backend: FaultyBackend, inner: Writer | Appender) -> None:
        self._backend = backend
        self._inner = inner

    @property
    def size(self) -> int:
        return self._inner.size

    def _write(self, data: Buffer, what: str) -> None:
        def write() -> None:
            self._backend.count_written(len(memoryview(data).cast("B")))
            self._inner.write(data)

        self._backend.faulted("write", what, write, writes=True)

    def abort(self) -> None:
        self._inner.abort()


class _Writer(_Faulted, Writer):
    _inner: Writer

    def write(self, data: Buffer) -> None:
        self._write(data, "writing")

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        return self._backend.faulted("commit", f"committing {key}",
                                     lambda: self._inner.commit(key, exclusive=exclusive),
                                     writes=True, changes=True)


class _Appender(_Faulted, Appender):
    _inner: Appender

    def expect(self, size: int, *, in_memory: bool = False) -> None:
        self._inner.expect(size, in_memory=in_memory)

    def write(self, data: Buffer) -> None:
        self._write(data, "appending")

    def finish(self, journal: dict | None = None) -> dict:
        state = self._backend.faulted("finish", "finishing an append",
                                      lambda: self._inner.finish(journal), writes=True,
                                      changes=True)
        self.journaled = self._inner.journaled
        return state


def _open_inner(url: str, options: dict[str, Any]) -> tuple[Backend, FaultPlan]:
    scheme, _ = split_scheme(url)
    if not scheme.startswith(PREFIX):
        raise ConfigError(f"faulty backend: want a URL like faulty+file:///path, got {url!r}")
    inner_url, _, query = url[len(PREFIX):].partition("?")
    settings: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(settings) - {f.name for f in fields(FaultPlan)} - {"rate"}
    if unknown:
        raise ConfigError(f"faulty backend: unknown setting(s) {', '.join(sorted(unknown))}")
    fault_names = {f.name for f in fields(FaultPlan)} | {"rate"}
    settings.update({k: options.pop(k) for k in list(options) if k in fault_names})
    plan = FaultPlan.parse(settings)
    return open_backend(inner_url, **options), plan
