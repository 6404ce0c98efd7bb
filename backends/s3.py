"""``s3://bucket/prefix`` (or ``s3a://``): objects in an S3 bucket, through s3fs.

::

    <bucket>/<prefix>/
    |-- <key>                       published objects
    |-- <upload key>/               an upload session's staging (see backends.s3_staging)
    |   |-- data                    the session's multipart upload target, completed at commit
    |   `-- pending-<end, 16 hex>   the tail below one part, ending at that session offset
    `-- .staging/<uuid>             large writes that had no key hint, until copied to their key

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

Upload staging (one multipart upload per chunked-upload session) is in
:mod:`backends.s3_staging`.

Storage options ``part_size``, ``copy_limit`` and ``copy_part_size`` are read here, all others
go to :class:`s3fs.S3FileSystem` unchanged, one filesystem per backend. Requests go through
s3fs's client (``call_s3``), so its retries and ``s3_additional_kwargs`` apply. Errors are
translated in one place, :func:`_translated`, by S3 error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import s3fs
from fsspec.asyn import sync

from backends.s3_common import (
    MAX_PART,
    MAX_PARTS,
    MIB,
    MIN_PART,
    STAGING,
    OpenUpload,
    Parts,
    Piece,
    Recorded,
    _BodyStream,
    _for_completion,
    _RangeNotSatisfiable,
    _translated,
    _UploadGone,
)
from backends.s3_staging import S3UploadStaging
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
    InvalidInput,
    InvalidKey,
)

log = logging.getLogger(__name__)


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
        """Best effort: whatever a failure leaves is for :meth:`S3Backend.purge_staging`."""
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


class S3Backend(S3UploadStaging, Backend):
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
        return self.compose(dst, [(src, 0, size, size)], exclusive)

    def compose(self, dst: str, pieces: list[Piece], exclusive: bool) -> bool:
        """Publish the concatenation of ``pieces`` at ``dst`` by a multipart upload made of
        UploadPartCopy parts; False if ``exclusive`` and ``dst`` exists."""
        upload_id = self.call(f"starting a copy to {dst}", "create_multipart_upload",
                              Key=dst)["UploadId"]
        done = False
        try:
            ranges = [(src, start + s, n, size)
                      for i, (src, start, length, size) in enumerate(pieces)
                      for s, n in self.copy_ranges(length, last=i == len(pieces) - 1)]
            with _translated(f"copying to {dst}"):
                parts = sync(self.fs.loop, self._copy_into, dst, upload_id, ranges, 1)
            done = self.complete(dst, upload_id, _for_completion(parts), exclusive)
            return done
        finally:
            if not done:
                with contextlib.suppress(CASError):
                    self.abort_upload(dst, upload_id)

    def copy_ranges(self, length: int, *, last: bool) -> list[tuple[int, int]]:
        """(start, length) of the copy parts for ``length`` bytes: at most ``copy_part_size``
        each (more if 10,000 parts would not do); unless ``last``, none under 5 MiB."""
        step = max(self.options.copy_part_size, -(-length // MAX_PARTS))
        if length <= step:
            return [(0, length)]
        if last:
            return [(s, min(step, length - s)) for s in range(0, length, step)]
        n = -(-length // step)
        if length // n < MIN_PART:
            n = max(1, length // MIN_PART)
        size, extra = divmod(length, n)
        starts = [i * size + min(i, extra) for i in range(n + 1)]
        return [(a, b - a) for a, b in itertools.pairwise(starts)]

    async def _copy_into(self, dst: str, upload_id: str, ranges: list[Piece],
                         first: int) -> Recorded:
        """UploadPartCopy each range into the upload, numbered from ``first``, in parallel."""
        if first + len(ranges) - 1 > MAX_PARTS:
            raise BackendError(f"more than {MAX_PARTS} parts: raise the S3 copy_part_size")
        limit = asyncio.Semaphore(self.fs.max_concurrency)

        async def part(number: int, src: str, start: int, length: int, size: int) -> list[Any]:
            whole = start == 0 and length == size
            ranged = {} if whole else {"CopySourceRange": f"bytes={start}-{start + length - 1}"}
            async with limit:
                resp = await self.fs._call_s3(
                    "upload_part_copy", Bucket=self.bucket, Key=dst, UploadId=upload_id,
                    PartNumber=number, CopySource={"Bucket": self.bucket, "Key": src}, **ranged)
            return [number, resp["CopyPartResult"]["ETag"], length]

        return list(await asyncio.gather(*(part(first + i, *r) for i, r in enumerate(ranges))))

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

    def multipart_uploads(self, prefix: str = "") -> list[OpenUpload]:
        """Open multipart uploads under the root whose key starts with ``prefix``, staging
        ones included."""
        root, found, markers = self.absolute(""), [], {}
        while True:
            page = self.call("listing multipart uploads", "list_multipart_uploads",
                             Prefix=root + prefix, **markers)
            found += [OpenUpload(u["Key"][len(root) :], u["UploadId"], u["Initiated"].timestamp())
                      for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"],
                       "UploadIdMarker": page["NextUploadIdMarker"]}

    def staging_objects(self) -> list[ObjectInfo]:
        """Completed staging objects, which a crash between copy and delete leaves."""
        return [ObjectInfo(*obj) for obj in self._objects(STAGING + "/")]
