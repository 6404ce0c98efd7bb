"""Engine errors to OCI error responses, in one place and by type."""

from __future__ import annotations

from casengine import errors as e
from casengine.http.asgi import HTTPError

# Most specific first: the first class the error is an instance of wins.
_TABLE: list[tuple[type[BaseException], int, str]] = [
    (e.InvalidName, 400, "NAME_INVALID"),
    (e.RepositoryNotFound, 404, "NAME_UNKNOWN"),
    (e.ManifestNotFound, 404, "MANIFEST_UNKNOWN"),
    (e.UploadNotFound, 404, "BLOB_UPLOAD_UNKNOWN"),
    (e.BlobNotFound, 404, "BLOB_UNKNOWN"),
    (e.ManifestBlobUnknown, 400, "MANIFEST_BLOB_UNKNOWN"),
    (e.ManifestTooLarge, 413, "MANIFEST_INVALID"),
    (e.ManifestInvalid, 400, "MANIFEST_INVALID"),
    (e.InvalidDigest, 400, "DIGEST_INVALID"),
    (e.DigestMismatch, 400, "DIGEST_INVALID"),
    (e.SizeMismatch, 400, "SIZE_INVALID"),
    (e.QuotaExceeded, 403, "DENIED"),
    (e.Unsupported, 415, "UNSUPPORTED"),
    # as zot answers it: the spec's 405 is for a registry that deletes nothing, and DENIED
    # tells the client this deletion, not deletion, is refused
    (e.InUse, 405, "DENIED"),
    (e.Conflict, 409, "BLOB_UPLOAD_INVALID"),
    # damaged stored bytes are the server's fault, never the client's: a 5xx
    (e.CorruptObject, 500, "UNKNOWN"),
    (e.InvalidInput, 400, "UNSUPPORTED"),
    (e.NotFound, 404, "NAME_UNKNOWN"),
    # transient (throttled, 5xx, timeout) after the engine's retries: the client may retry;
    # any other storage failure (a full disk) is the server's: 500, with the reason
    (e.BackendUnavailable, 503, "UNAVAILABLE"),
    (e.Busy, 429, "TOOMANYREQUESTS"),
    (e.BackendError, 500, "UNKNOWN"),
]


def to_http(exc: BaseException) -> HTTPError:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, e.OffsetMismatch):
        end = exc.offset - 1 if exc.offset else 0
        return HTTPError(416, "BLOB_UPLOAD_INVALID", str(exc),
                         headers={"Range": f"0-{end}"})
    for cls, status, code in _TABLE:
        if isinstance(exc, cls):
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            return HTTPError(status, code, str(exc), headers=headers)
    return HTTPError(500, "UNKNOWN", "internal error")
