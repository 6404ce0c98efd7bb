"""Retries of transient backend failures, in one place: a wrapper every engine's backend
goes through (:meth:`casengine.engine.Engine.open`).

Only :class:`~casengine.errors.BackendUnavailable` is retried (throttling such as S3's
``SlowDown``, 5xx, timeouts, EIO; see :func:`casengine.backend.os_error`); a full disk, a
missing key or a refused request is not. Each retry waits an exponential backoff with full
jitter, and a call gives up after :attr:`RetryPolicy.attempts` tries or once its
:attr:`RetryPolicy.deadline` would pass, raising ``BackendUnavailable`` that says so.

What is retried, and why that is safe:

- reads, stats, listings, deletes, the start of a staged write or append, and discarding
  staged data: idempotent. A read that fails mid-stream resumes where it stopped (objects
  never change under a key while being read: blobs are content-addressed), and a listing
  that fails midway starts again without yielding a key twice.
- ``put`` of bytes in memory: the same bytes again. An exclusive put whose outcome is
  unknown, and whose retry finds the key taken, reads the object back to tell "ours"
  from "another's".
- the exclusive publish of a staged object (a blob, content-addressed): the staged bytes
  cannot be sent twice, so when the commit fails, a stat learns the outcome. If the key
  exists, the publish is settled (``False``: it was not created by this call, as far as
  the caller may know); else the error stands and the caller's request fails cleanly.
- writes into a staged object or upload are never retried here: their bytes come from a
  stream that cannot be replayed. The request fails, nothing is published, and the
  client sends it again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from casengine.backend import (
    READ_CHUNK,
    Appender,
    Backend,
    BackendWrapper,
    Buffer,
    ObjectInfo,
    Writer,
)
from casengine.errors import BackendUnavailable, NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 4  #: tries per call, the first included
    base: float = 0.05  #: the first backoff, in seconds; each next one doubles
    cap: float = 2.0  #: the longest single backoff
    deadline: float = 20.0  #: no retry starts later than this after the first try

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return rng.uniform(0, min(self.cap, self.base * (1 << min(attempt, 30))))


class _Attempts:
    """The retry loop's state for one call: counts, waits, and gives up."""

    def __init__(self, backend: RetryingBackend, what: str) -> None:
        self.backend = backend
        self.what = what
        self.start = time.monotonic()
        self.attempt = 0

    def failed(self, exc: BackendUnavailable) -> None:
        """Wait before the next try, or raise when the bound is reached."""
        policy = self.backend.policy
        self.attempt += 1
        delay = policy.backoff(self.attempt - 1, self.backend.rng)
        elapsed = time.monotonic() - self.start
        if self.attempt >= policy.attempts or elapsed + delay > policy.deadline:
            raise BackendUnavailable(
                f"{self.what}: gave up after {self.attempt} attempts in {elapsed:.1f} s: {exc}"
            ) from exc
        self.backend.count_retry()
        log.debug("%s: retry %d in %.3f s after %s", self.what, self.attempt, delay, exc)
        time.sleep(delay)


class RetryingBackend(BackendWrapper):
    """Retries what is safe to retry (see the module's docstring)."""

    def __init__(self, inner: Backend, policy: RetryPolicy | None = None, *,
                 seed: int | None = None) -> None:
        super().__init__(inner)
        self.policy = policy or RetryPolicy()
        self.rng = random.Random(seed)
        #: retries made so far, for tests and reports
        self.retries = 0
        self._lock = threading.Lock()

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def call(self, what: str, fn: Callable[[], T],
             settled: Callable[[], T | None] | None = None) -> T:
        """``fn()``, retried; after a failure, ``settled()`` may return the outcome."""
        attempts = _Attempts(self, what)
        while True:
            try:
                return fn()
            except BackendUnavailable as exc:
                if settled is not None:
                    outcome = self._quietly(settled)
                    if outcome is not None:
                        return outcome
                attempts.failed(exc)

    @staticmethod
    def _quietly(settled: Callable[[], T | None]) -> T | None:
        try:
            return settled()
        except BackendUnavailable:
            return None  # not known yet: the loop tries again

    def _exists(self, key: str) -> bool:
        try:
            self.inner.stat(key)
        except NotFound:
            return False
        return True

    # -- the primitives ---------------------------------------------------------------------

    def writer(self, key_hint: str | None = None) -> Writer:
        inner = self.call("starting a write", lambda: self.inner.writer(key_hint))
        return _Writer(self, inner)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        def open_at(pos: int, left: int | None) -> Iterator[bytes]:
            return self.call(f"reading {key}",
                             lambda: self.inner.read(key, pos, left, chunk_size=chunk_size))

        return self._resuming(f"reading {key}", open_at, start, length)

    def _resuming(self, what: str, open_at: Callable[[int, int | None], Iterator[bytes]],
                  start: int, length: int | None) -> Iterator[bytes]:
        """Open eagerly (a missing key raises now), then stream, resuming after failures."""
        stream = open_at(start, length)

        def chunks() -> Iterator[bytes]:
            nonlocal stream
            pos, left = start, length
            attempts = _Attempts(self, what)
            while True:
                try:
                    for chunk in stream:
                        pos += len(chunk)
                        if left is not None:
                            left -= len(chunk)
                        attempts.attempt = 0  # progress: a later failure starts afresh
                        yield chunk
                    return
                except BackendUnavailable as exc:
                    attempts.failed(exc)
                    stream = open_at(pos, left)

        return chunks()

    def stat(self, key: str) -> ObjectInfo:
        return self.call(f"stat {key}", lambda: self.inner.stat(key))

    def delete(self, key: str) -> bool:
        return self.call(f"deleting {key}", lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        listing = self.call(f"listing {prefix}", lambda: self.inner.list(prefix))

        def keys() -> Iterator[str]:
            nonlocal listing
            seen: set[str] | None = None  # kept only once a listing had to start again
            attempts = _Attempts(self, f"listing {prefix}")
            while True:
                yielded: list[str] = []
                try:
                    for key in listing:
                        if seen is not None and key in seen:
                            continue
                        yielded.append(key)
                        yield key
                    return
                except BackendUnavailable as exc:
                    seen = (seen or set()) | set(yielded)
                    attempts.failed(exc)
                    listing = self.call(f"listing {prefix}", lambda: self.inner.list(prefix))

        return keys()

    def put(self, key: str, data: Buffer, *, exclusive: bool = False) -> bool:
        failed = False

        def attempt() -> bool:
            nonlocal failed
            try:
                created = self.inner.put(key, data, exclusive=exclusive)
            except BackendUnavailable:
                failed = True
                raise
            if exclusive and not created and failed:
                # an earlier try may have stored it: the same bytes there say it did
                return self.inner.get(key) == bytes(data)  # failing, it is tried again
            return created

        return self.call(f"storing {key}", attempt)

    # -- upload staging ---------------------------------------------------------------------

    def append(self, key: str, state: dict, offset: int) -> Appender:
        return self.call(f"staging {key}", lambda: self.inner.append(key, state, offset))

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        def publish() -> bool:
            return self.inner.publish_upload(key, state, size, final, exclusive=exclusive)

        if not exclusive:  # an overwrite whose outcome is unknown: leave it to the caller
            return publish()
        return self.call(f"publishing {key} as {final}", publish,
                         settled=lambda: False if self._exists(final) else None)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        def open_at(pos: int, left: int | None) -> Iterator[bytes]:
            stream = self.call(f"reading {key}", lambda: self.inner.read_upload(key, state))
            return _skip(stream, pos)

        return self._resuming(f"reading {key}", open_at, 0, None)

    def discard_upload(self, key: str, state: dict) -> None:
        self.call(f"discarding {key}", lambda: self.inner.discard_upload(key, state))

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False, *,
                      writers_before: float | None = None) -> int:
        return self.call("purging staging", lambda: self.inner.purge_staging(
            older_than, in_use, writers_before=writers_before))


def _skip(stream: Iterator[bytes], n: int) -> Iterator[bytes]:
    """``stream`` without its first ``n`` bytes (a resumed read of staged data)."""
    for chunk in stream:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0


class _Writer(Writer):
    """Writes pass through; an exclusive commit that fails learns its outcome by a stat."""

    def __init__(self, backend: RetryingBackend, inner: Writer) -> None:
        self._backend = backend
        self._inner = inner

    @property  # type: ignore[override]
    def size(self) -> int:
        return self._inner.size

    def write(self, data: Buffer) -> None:
        self._inner.write(data)

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        try:
            return self._inner.commit(key, exclusive=exclusive)
        except BackendUnavailable:
            # the staged bytes may be gone: no second commit. For put-if-absent the key's
            # presence settles it (False: not known to be ours), else the error stands.
            if exclusive and self._backend.call(f"stat {key}", lambda: self._backend._exists(key)):
                return False
            raise

    def abort(self) -> None:
        self._inner.abort()


def retrying(backend: Backend, policy: RetryPolicy | None = None) -> RetryingBackend:
    """``backend`` behind retries (a backend already behind them is returned as it is)."""
    if isinstance(backend, RetryingBackend):
        return backend
    return RetryingBackend.around(backend, policy)
