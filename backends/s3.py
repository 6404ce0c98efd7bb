"""``s3://bucket/prefix`` (or ``s3a://``): objects in an S3 bucket, through s3fs.

::

    <bucket>/<prefix>/
    |-- <key>                 published objects
    `-- .staging/<uuid>       large uploads that had no key hint, until copied to their key

How a writer publishes; nothing partial is ever visible under a key:

- Up to ``part_size`` bytes (default 8 MiB) are buffered and sent at commit in one
  PutObject. ``exclusive`` adds ``IfNoneMatch='*'``; a 412 means the key already exists.
- More goes up as a multipart upload in ``part_size`` parts, one part in flight while the
  next is buffered (memory: two parts). If the writer's ``key_hint`` is the commit key, the
  upload targets that key and CompleteMultipartUpload publishes it (``IfNoneMatch='*'``
  when exclusive). Without a hint it targets a staging key, which commit completes, copies
  server-side to the key and deletes.
- A copy is one CopyObject up to ``copy_limit`` (default 5 GiB, S3's limit), else
  UploadPartCopy in ``copy_part_size`` parts. An exclusive copy is always the multipart
  kind, so that it publishes through CompleteMultipartUpload with ``IfNoneMatch='*'``:
  moto ignores ``IfNoneMatch`` on CopyObject, and S3 implementations differ there.

Storage options ``part_size``, ``copy_limit`` and ``copy_part_size`` are read here, all others
go to :class:`s3fs.S3FileSystem` unchanged, one filesystem per backend. Requests go through
s3fs's client (``call_s3``), so its retries and ``s3_additional_kwargs`` apply. Errors are
translated in one place, :func:`_translated`, by S3 error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import s3fs
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.asyn import sync

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
from casengine.errors import (
    AlreadyExists,
    BackendError,
    CASError,
    ConfigError,
    Conflict,
    InvalidInput,
    InvalidKey,
    NotFound,
)

log = logging.getLogger(__name__)

MIB, GIB = 1 << 20, 1 << 30
MIN_PART, MAX_PART, MAX_PARTS = 5 * MIB, 5 * GIB, 10_000  # S3's multipart limits
STAGING = ".staging"
Parts = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class S3Options:
    """The storage options this backend reads itself (sizes in bytes)."""

    part_size: int = 8 * MIB
    copy_limit: int = MAX_PART
    copy_part_size: int = 512 * MIB

    def __post_init__(self) -> None:
        for name in ("part_size", "copy_part_size"):
            if not MIN_PART <= getattr(self, name) <= MAX_PART:
                raise ConfigError(f"S3 {name} must be between 5 MiB and 5 GiB")
        if not 0 < self.copy_limit <= MAX_PART:
            raise ConfigError("S3 copy_limit must be between 1 byte and 5 GiB")


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
        cls = _BY_CODE.get(code or "", BackendError)
        if cls is NotFound:
            raise NotFound(f"{what}: not found") from exc
        raise cls(f"{what}: {code or type(exc).__name__}: {exc}") from exc


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


class S3Writer(Writer):
    def __init__(self, backend: S3Backend, key_hint: str | None) -> None:
        self._b = backend
        self._hint = key_hint
        self._target = backend.full_key(key_hint) if key_hint is not None else None
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: Parts = []
        self._inflight: tuple[int, Any] | None = None
        self._staged: str | None = None  # a completed staging object, still to delete
        self._closed = False
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._closed:
            raise BackendError("write after commit or abort")
        view = memoryview(data).cast("B")
        self._buf += view
        self.size += len(view)
        step = self._b.options.part_size
        while len(self._buf) > step:  # at least one byte stays for the last part
            part = bytes(memoryview(self._buf)[:step])
            del self._buf[:step]
            self._send(part)

    def _send(self, part: bytes) -> None:
        """Upload ``part`` in the background, once the previous one has landed."""
        if self._upload_id is None:
            self._target = self._target or self._b.absolute(f"{STAGING}/{uuid.uuid4().hex}")
            self._upload_id = self._b.call(f"starting an upload to {self._target}",
                                           "create_multipart_upload", Key=self._target)["UploadId"]
        self._wait()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise BackendError(f"more than {MAX_PARTS} parts: raise the S3 part_size")
        coro = self._b.fs._call_s3("upload_part", Bucket=self._b.bucket, Key=self._target,
                                   UploadId=self._upload_id, PartNumber=number, Body=part)
        self._inflight = (number, asyncio.run_coroutine_threadsafe(coro, self._b.fs.loop))

    def _wait(self) -> None:
        if self._inflight is not None:
            (number, future), self._inflight = self._inflight, None
            with _translated(f"uploading part {number} of {self._target}"):
                self._parts.append({"PartNumber": number, "ETag": future.result()["ETag"]})

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        final = self._b.full_key(key)
        if self._closed:
            raise BackendError("commit after commit or abort")
        try:
            if self._upload_id is None:
                return self._b.put_object(final, bytes(self._buf), exclusive)
            if self._hint is not None and self._target != final:
                raise InvalidInput(f"a writer whose parts went to its key hint {self._hint!r} "
                                   f"cannot commit to {key!r}")
            self._send(bytes(self._buf))
            self._wait()
            if self._target == final:
                done = self._b.complete(final, self._upload_id, self._parts, exclusive)
                self._upload_id = None if done else self._upload_id
                return done
            self._b.complete(self._target, self._upload_id, self._parts, False)
            self._upload_id, self._staged = None, self._target
            return self._b.copy_full(self._target, final, self.size, exclusive)
        finally:
            self.abort()

    def abort(self) -> None:
        """Best effort: whatever a failure leaves is for :meth:`S3Backend.abort_stale_uploads`."""
        self._closed = True
        self._buf = bytearray()
        try:
            with contextlib.suppress(CASError):
                self._wait()
            if self._upload_id is not None:
                upload_id, self._upload_id = self._upload_id, None
                self._b.abort_upload(self._target or "", upload_id)
            if self._staged is not None:
                staged, self._staged = self._staged, None
                self._b.call(f"deleting {staged}", "delete_object", Key=staged)
        except CASError as exc:
            log.warning("%s: cleanup left something behind: %s", self._b.url, exc)


class S3Backend(Backend):
    """Objects under ``s3://bucket/prefix``; see the module docstring."""

    schemes = ("s3", "s3a")

    def __init__(self, url: str, **storage_options: Any) -> None:
        super().__init__(url)
        self.bucket, _, prefix = split_scheme(url)[1].partition("/")
        self.prefix = prefix.strip("/")
        if not self.bucket:
            raise ConfigError(f"S3 URL {url!r} has no bucket: s3://bucket/prefix")
        try:
            check_prefix(self.prefix)
        except InvalidKey as exc:
            raise ConfigError(f"S3 URL {url!r} has an invalid prefix: {exc}") from exc
        ours = {f.name for f in fields(S3Options)} & storage_options.keys()
        self.options = S3Options(**{name: int(storage_options.pop(name)) for name in ours})
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)

    def absolute(self, relative: str) -> str:
        """The S3 key of a name under the root, unchecked (staging names too)."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def full_key(self, key: str) -> str:
        """The S3 key of ``key``; keys never start with a dot, so never meet ``.staging``."""
        return self.absolute(check_key(key))

    def call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One S3 request through s3fs's client, errors translated."""
        with _translated(what):
            return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)

    # -- publishing ------------------------------------------------------------------------

    def put_object(self, full: str, data: bytes, exclusive: bool) -> bool:
        try:
            self.call(f"storing {full}", "put_object", Key=full, Body=data,
                      **({"IfNoneMatch": "*"} if exclusive else {}))
        except AlreadyExists:
            return False
        return True

    def complete(self, full: str, upload_id: str, parts: Parts, exclusive: bool) -> bool:
        """Complete an upload; False if ``exclusive`` and ``full`` exists (the upload stays)."""
        try:
            self.call(f"publishing {full}", "complete_multipart_upload", Key=full,
                      UploadId=upload_id, MultipartUpload={"Parts": parts},
                      **({"IfNoneMatch": "*"} if exclusive else {}))
        except AlreadyExists:
            return False
        return True

    def abort_upload(self, full: str, upload_id: str) -> None:
        with contextlib.suppress(_UploadGone):
            self.call(f"aborting the upload to {full}", "abort_multipart_upload", Key=full,
                      UploadId=upload_id)

    def copy_full(self, src: str, dst: str, size: int, exclusive: bool) -> bool:
        """Server-side copy of ``size`` bytes between S3 keys (see the module docstring)."""
        if not exclusive and size <= self.options.copy_limit:
            self.call(f"copying {src} to {dst}", "copy_object", Key=dst,
                      CopySource={"Bucket": self.bucket, "Key": src})
            return True
        upload_id = self.call(f"starting a copy to {dst}", "create_multipart_upload",
                              Key=dst)["UploadId"]
        done = False
        try:
            with _translated(f"copying {src} to {dst}"):
                parts = sync(self.fs.loop, self._copy_parts, src, dst, upload_id, size)
            done = self.complete(dst, upload_id, parts, exclusive)
            return done
        finally:
            if not done:
                with contextlib.suppress(CASError):
                    self.abort_upload(dst, upload_id)

    async def _copy_parts(self, src: str, dst: str, upload_id: str, size: int) -> Parts:
        step = max(self.options.copy_part_size, -(-size // MAX_PARTS))
        limit = asyncio.Semaphore(self.fs.max_concurrency)

        async def part(number: int, start: int) -> dict[str, Any]:
            ranged = {"CopySourceRange": f"bytes={start}-{min(start + step, size) - 1}"}
            async with limit:
                resp = await self.fs._call_s3(
                    "upload_part_copy", Bucket=self.bucket, Key=dst, UploadId=upload_id,
                    PartNumber=number, CopySource={"Bucket": self.bucket, "Key": src},
                    **(ranged if size > step else {}))
            return {"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]}

        starts = range(0, max(size, 1), step)
        return list(await asyncio.gather(*(part(i + 1, s) for i, s in enumerate(starts))))

    # -- primitives ------------------------------------------------------------------------

    def writer(self, key_hint: str | None = None) -> Writer:
        return S3Writer(self, key_hint)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        full = self.full_key(key)
        if length == 0:
            self.stat(key)
            return iter(())
        ranged = {}
        if start or length is not None:
            ranged["Range"] = f"bytes={start}-{'' if length is None else start + length - 1}"
        try:
            body = self.call(f"reading {full}", "get_object", Key=full, **ranged)["Body"]
        except _RangeNotSatisfiable:
            return iter(())
        return _BodyStream(self.fs, body, chunk_size, f"reading {full}")

    def stat(self, key: str) -> ObjectInfo:
        full = self.full_key(key)
        head = self.call(f"stat {full}", "head_object", Key=full)
        return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> bool:
        """Remove ``key``. S3 does not say whether a delete found anything, so this asks
        first: two concurrent deletes of one key may both return True."""
        if not self.exists(key):
            return False
        full = self.full_key(key)
        self.call(f"deleting {full}", "delete_object", Key=full)
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys by plain string prefix; neither staging objects nor names that are no valid
        key (such as folder markers made by consoles) are listed."""
        check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        for key, _, _ in self._objects(prefix):
            if not key.startswith(STAGING + "/"):
                with contextlib.suppress(InvalidKey):
                    yield check_key(key)

    def _objects(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """(key relative to the root, size, mtime) of every object whose key starts so."""
        root, token = self.absolute(""), {}
        while True:
            page = self.call(f"listing {root}{prefix}", "list_objects_v2",
                             Prefix=root + prefix, **token)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(root) :], obj["Size"], obj["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def close(self) -> None:
        creator = getattr(self.fs, "_s3creator", None)  # set once s3fs has connected
        if creator is not None:
            s3fs.S3FileSystem.close_session(self.fs.loop, creator)

    # -- capabilities ----------------------------------------------------------------------

    def presign(self, key: str, expires: int = 300) -> str:
        """A GET URL for ``key``, valid ``expires`` seconds (``Presigner``)."""
        return str(self.fs.url(f"{self.bucket}/{self.full_key(key)}", expires=expires))

    def copy(self, src: str, dst: str, *, exclusive: bool = False) -> bool:
        """Server-side copy (``ServerCopy``); with ``exclusive``, an existing ``dst`` stays."""
        source, target = self.full_key(src), self.full_key(dst)
        size = self.call(f"stat {source}", "head_object", Key=source)["ContentLength"]
        return self.copy_full(source, target, int(size), exclusive)

    # -- what crashes leave behind ---------------------------------------------------------

    def multipart_uploads(self) -> list[OpenUpload]:
        """Open multipart uploads under the prefix, staging ones included."""
        root, found, markers = self.absolute(""), [], {}
        while True:
            page = self.call("listing multipart uploads", "list_multipart_uploads",
                             Prefix=root, **markers)
            found += [OpenUpload(u["Key"][len(root) :], u["UploadId"], u["Initiated"].timestamp())
                      for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"],
                       "UploadIdMarker": page["NextUploadIdMarker"]}

    def staging_objects(self) -> list[ObjectInfo]:
        """Completed staging objects, which a crash between copy and delete leaves."""
        return [ObjectInfo(*obj) for obj in self._objects(STAGING + "/")]

    def abort_stale_uploads(self, older_than: float, *, now: float | None = None) -> int:
        """Abort the multipart uploads, and delete the staging objects, started more than
        ``older_than`` seconds before ``now``; return how many were removed.

        Pick an age well beyond the longest a live writer may take: a writer whose upload
        is aborted under it fails at its next part or at commit.
        """
        cutoff = (time.time() if now is None else now) - older_than
        stale = [u for u in self.multipart_uploads() if u.initiated < cutoff]
        for upload in stale:
            self.abort_upload(self.absolute(upload.key), upload.upload_id)
        staged = [obj.key for obj in self.staging_objects() if obj.mtime < cutoff]
        for key in staged:
            self.call(f"deleting {key}", "delete_object", Key=self.absolute(key))
        return len(stale) + len(staged)
