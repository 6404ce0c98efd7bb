"""One error root for casengine.

Every error the engine raises is a :class:`CASError`. Subclasses also inherit the matching
built-in error, so callers that only know Python's own exceptions still catch them
(``except FileNotFoundError`` catches :class:`NotFound`). Each class carries the exit code
the CLI uses for it; the README lists them.
"""

from __future__ import annotations


class CASError(Exception):
    """Root of every casengine error."""

    exit_code = 1


class InvalidInput(CASError, ValueError):
    """The caller handed in something malformed; nothing was stored."""

    exit_code = 4


class InvalidDigest(InvalidInput):
    """A digest string that is not ``algorithm:hex`` per the OCI digest grammar."""


class UnsupportedAlgorithm(InvalidDigest):
    """A well-formed digest whose algorithm casengine does not implement."""


class InvalidKey(InvalidInput):
    """A backend key that is empty, absolute, or tries to leave the root."""


class IntegrityError(InvalidInput):
    """Received bytes do not match what the caller promised; nothing was published."""

    exit_code = 5


class CorruptObject(IntegrityError):
    """A stored object is damaged (the store's fault, not the caller's): run ``check``."""


class DigestMismatch(IntegrityError):
    def __init__(self, expected: object, actual: object) -> None:
        super().__init__(f"digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class SizeMismatch(IntegrityError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"size mismatch: expected {expected} bytes, got {actual}")
        self.expected = expected
        self.actual = actual


class NotFound(CASError, FileNotFoundError):
    exit_code = 3


class BlobNotFound(NotFound):
    def __init__(self, digest: object) -> None:
        super().__init__(f"blob {digest} not found")
        self.digest = digest


class InvalidName(InvalidInput):
    """A repository name or tag outside the OCI grammar."""


class ManifestInvalid(InvalidInput):
    """A manifest that is malformed, inconsistent, or of a refused kind."""


class ManifestTooLarge(ManifestInvalid):
    pass


class ManifestBlobUnknown(ManifestInvalid):
    """A manifest refers to a blob or child manifest that is not in the repository."""

    def __init__(self, repository: str, digest: object, what: str = "blob") -> None:
        super().__init__(f"manifest refers to {what} {digest}, which is not in {repository}")
        self.digest = digest


class RepositoryNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"repository {name!r} not found")
        self.name = name


class ManifestNotFound(NotFound):
    def __init__(self, repository: str, reference: str) -> None:
        super().__init__(f"manifest {repository}:{reference} not found"
                         if ":" not in reference else f"manifest {repository}@{reference} not found")
        self.repository = repository
        self.reference = reference


class LayerInvalid(InvalidInput):
    """A compressed layer that does not decode (corrupt or truncated gzip); nothing was stored."""


class DecompressionBomb(LayerInvalid):
    """A layer that expands past the configured size or ratio limit; nothing was stored."""


class QuotaExceeded(CASError):
    """The change would take a namespace over its quota; nothing was stored."""

    exit_code = 10


class UploadNotFound(NotFound):
    def __init__(self, upload_id: object) -> None:
        shown = repr(upload_id)[:80]
        super().__init__(f"upload {shown} not found: unknown, finished, cancelled or expired")
        self.upload_id = upload_id


class AlreadyExists(CASError, FileExistsError):
    exit_code = 6


class Conflict(CASError):
    """Another writer got there first; retrying the same request may succeed."""

    exit_code = 6


class InUse(CASError):
    """A manifest still needs it (a blob a manifest references, or the manifest itself):
    removing it would break the manifest. Delete the manifest first."""

    exit_code = 6


class OffsetMismatch(CASError):
    """A chunk that does not start where the upload stands; nothing of it was appended."""

    exit_code = 6

    def __init__(self, upload_id: str, offset: int, current: int) -> None:
        super().__init__(
            f"upload {upload_id}: the chunk starts at byte {offset}, but the upload is at {current}"
        )
        self.upload_id = upload_id
        self.offset = current


class Busy(CASError):
    """Too much of one kind of work at once (logins): nothing was done; retry shortly."""


class BackendError(CASError, OSError):
    """The storage backend failed in a way the engine could not recover from."""

    exit_code = 7


class BackendUnavailable(BackendError):
    """A transient backend failure (throttling, 5xx, timeout, EIO): the same call may
    succeed later. The engine retries these where that is safe (:mod:`casengine.retry`)."""


class StorageFull(BackendError):
    """The backend refuses writes for want of space (ENOSPC, EDQUOT): retrying cannot help
    until space is freed; nothing of the refused write was published."""


class ConfigError(CASError):
    """casengine was pointed at something it cannot open (URL, extra, index path)."""

    exit_code = 8


class UnknownScheme(ConfigError):
    pass


class MissingExtra(ConfigError, ImportError):
    pass


class Unsupported(CASError, NotImplementedError):
    """The backend does not have an optional capability."""

    exit_code = 9


class Closed(CASError, ValueError):
    """The engine (and its index) was closed: open the store again to go on."""
