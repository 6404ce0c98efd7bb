"""What the S3 backend's modules share: S3's limits, the names under an upload session's key,
and the one translation of S3 errors into the engine's, by error code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import s3fs
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.asyn import sync

from casengine.backend import os_error, service_error
from casengine.errors import (
    AlreadyExists,
    BackendError,
    BackendUnavailable,
    CASError,
    Conflict,
    NotFound,
)

MIB, GIB = 1 << 20, 1 << 30
MIN_PART, MAX_PART, MAX_PARTS = 5 * MIB, 5 * GIB, 10_000  # S3's multipart limits
STAGING = ".staging"
#: Names under an upload session's key: the multipart upload target, and the tail's prefix.
DATA, PENDING = "data", "pending-"
Parts = list[dict[str, Any]]
#: Parts as an upload session's state records them: [number, ETag, size].
Recorded = list[list[Any]]
#: A piece of an object to copy server-side: (S3 key, start, length, size of the object).
Piece = tuple[str, int, int, int]


@dataclass(frozen=True, slots=True)
class OpenUpload:
    """A multipart upload neither completed nor aborted; ``key`` is relative to the root."""

    key: str
    upload_id: str
    initiated: float


class _UploadGone(BackendError):
    """NoSuchUpload: completed or aborted already (perhaps by a stale-upload purge)."""


class _RangeNotSatisfiable(BackendError):
    """InvalidRange: the object exists, but the range starts at or past its end."""


_BY_CODE: dict[str, type[CASError]] = {
    "NoSuchKey": NotFound,
    "NotFound": NotFound,
    "404": NotFound,  # HEAD answers carry no error body, only the status
    "PreconditionFailed": AlreadyExists,  # the only condition sent is IfNoneMatch='*'
    "412": AlreadyExists,
    "ConditionalRequestConflict": Conflict,  # a concurrent conditional write: retry
    "NoSuchUpload": _UploadGone,
    "InvalidRange": _RangeNotSatisfiable,
}


def _error_code(exc: BaseException | None) -> str | None:
    """The S3 error code behind an error: s3fs keeps botocore's ClientError as the cause."""
    for _ in range(8):
        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", "")) or None
        if exc is None:
            break
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map S3 errors to the engine's errors, by error code, in one place."""
    try:
        yield
    except CASError:
        raise
    except (OSError, BotoCoreError, ClientError) as exc:
        code = _error_code(exc)
        cls = _BY_CODE.get(code or "")
        if cls is NotFound:
            raise NotFound(f"{what}: not found") from exc
        if cls is not None:
            raise cls(f"{what}: {code}: {exc}") from exc
        if code is not None:  # throttling and 5xx are transient (casengine.backend)
            raise service_error(what, code, str(exc)) from exc
        if isinstance(exc, BotoConnectionError | HTTPClientError):  # timeouts, resets
            raise BackendUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        if isinstance(exc, OSError):
            raise os_error(what, exc) from exc
        raise BackendError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _for_completion(parts: Recorded) -> Parts:
    """Recorded parts as CompleteMultipartUpload wants them."""
    return [{"PartNumber": number, "ETag": etag} for number, etag, _ in parts]


async def _read_upto(body: Any, n: int) -> bytes:
    """Up to ``n`` bytes of a response body; fewer only at its end."""
    pieces, got = [], 0
    while got < n and (piece := await body.read(n - got)):
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _BodyStream(Iterator[bytes]):
    """A GetObject body read in ``chunk_size`` pieces; closes the connection when dropped."""

    def __init__(self, fs: s3fs.S3FileSystem, body: Any, chunk_size: int, what: str) -> None:
        self._fs, self._body, self._chunk, self._what = fs, body, chunk_size, what

    def __next__(self) -> bytes:
        if self._body is None:
            raise StopIteration
        with _translated(self._what):
            chunk = sync(self._fs.loop, _read_upto, self._body, self._chunk)
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None and not self._fs.loop.is_closed():
            self._fs.loop.call_soon_threadsafe(body.close)

    def __del__(self) -> None:
        self.close()
