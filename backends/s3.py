"""``s3://bucket/prefix`` (or ``s3a://``): objects in an S3 bucket, through s3fs.

::

    <bucket>/<prefix>/
    |-- <key>                       published objects
    |-- <upload key>/               an upload session's staging (see "Upload staging" below)
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

Upload staging (:meth:`S3Backend.append` and friends; ``min_chunk`` is ``part_size``):

- Each upload session has one multipart upload targeting ``<key>/data``, created with the
  first full part. An append prepends the previous tail (``pending-*``, under one part, so
  bounded), sends every full ``part_size`` part with UploadPart (one in flight while the next
  is buffered) and stores what is left as ``pending-<new end offset>``. The state it returns
  records the upload id, the parts (number, ETag, size) and the pending size.
- Crashes: only recorded parts count. An unacknowledged append re-sends part numbers after
  the recorded ones (S3 replaces a part uploaded again under its number) and writes its tail
  under a larger end offset, so it can never overwrite the acknowledged tail. Superseded
  tails are deleted by the next append, once the state that dropped them was acknowledged.
- Commit copies the tail into the upload as its last part (UploadPartCopy), completes it at
  ``<key>/data`` and copies that server-side to the blob's key (:meth:`S3Backend.copy_full`,
  exclusive through ``IfNoneMatch``); a session below one part is a copy of its tail. No
  byte goes through this process, so a commit costs the same in any process.
- Parts of an open multipart upload cannot be read, so :meth:`S3Backend.read_upload` (only
  for re-hashing) completes the upload first; an append that then finds the upload gone
  reopens it with server-side copies of ``data``, and a commit composes ``data`` and the tail.
- :meth:`S3Backend.purge_staging` aborts multipart uploads of sessions (keys ``*/data``) on
  which nothing happened since the cutoff: neither the upload's start, nor a part, nor an
  object under the session.

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
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import s3fs
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.asyn import sync

from casengine.backend import (
    READ_CHUNK,
    Appender,
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
#: Names under an upload session's key: the multipart upload target, and the tail's prefix.
DATA, PENDING = "data", "pending-"
Parts = list[dict[str, Any]]
#: Parts as an upload session's state records them: [number, ETag, size].
Recorded = list[list[Any]]
#: A piece of an object to copy server-side: (S3 key, start, length, size of the object).
Piece = tuple[str, int, int, int]


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


def _for_completion(parts: Recorded) -> Parts:
    """Recorded parts as CompleteMultipartUpload wants them."""
    return [{"PartNumber": number, "ETag": etag} for number, etag, _ in parts]


@dataclass(frozen=True, slots=True)
class Staged:
    """An upload session's staging, as its state records it."""

    upload: str | None  #: the multipart upload id, once a full part was sent
    parts: Recorded  #: [number, ETag, size] of the acknowledged parts, in order
    pending: int  #: bytes of the tail after the parts, in ``pending-<offset>``
    stale: list[int]  #: end offsets of superseded tails, for the next append to delete

    @classmethod
    def of(cls, key: str, state: dict) -> Staged:
        if "parts" in state and "uploaded" not in state:
            raise BackendError(f"upload {key} was staged in another format: cancel it and "
                               "start again")
        return cls(state.get("upload"), [list(p) for p in state.get("uploaded", [])],
                   int(state.get("pending", 0)), list(state.get("stale", [])))

    @property
    def base(self) -> int:
        """Where the tail starts: the bytes in the recorded parts."""
        return sum(p[2] for p in self.parts)

    @property
    def size(self) -> int:
        return self.base + self.pending

    def state(self) -> dict:
        out: dict[str, Any] = {"upload": self.upload, "uploaded": self.parts,
                               "pending": self.pending}
        if self.stale:
            out["stale"] = self.stale
        return out


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


class S3Appender(Appender):
    """One append to an upload session: full parts to its multipart upload, the rest to a
    new tail object (see "Upload staging" in the module docstring)."""

    def __init__(self, backend: S3Backend, key: str, state: dict, offset: int) -> None:
        self._b = backend
        self._key = key
        self._state = state
        self._staged = Staged.of(key, state)
        if self._staged.size != offset:
            raise BackendError(f"upload {key}: its staging holds {self._staged.size} bytes, "
                               f"not {offset}")
        self._data = backend.full_key(f"{key}/{DATA}")
        self._offset = offset
        self._upload = self._staged.upload
        self._parts: Recorded = [list(p) for p in self._staged.parts]
        self._buf = bytearray()
        self._loaded = self._staged.pending == 0  # the old tail is read at the first write
        self._inflight: tuple[int, bytes, Any] | None = None
        self._ours: str | None = None  # an upload this append started: aborted on failure
        self._sent = 0
        self._closed = False
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._closed:
            raise BackendError("write after finish or abort")
        view = memoryview(data).cast("B")
        if not view:
            return
        if not self._loaded:
            tail = self._b.pending_key(self._key, self._offset)
            self._buf += self._b.get_exactly(tail, self._staged.pending)
            self._loaded = True
        self.size += len(view)
        step = self._b.options.part_size
        while view:  # memory: at most a part buffered and one in flight, whatever the chunk
            if not self._buf and len(view) >= step:  # aligned: one copy, no buffering
                part, view = bytes(view[:step]), view[step:]
            else:
                take = min(max(step - len(self._buf), 0), len(view))  # 0: an old tail
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < step:
                    break
                part, self._buf = bytes(self._buf), bytearray()
            self._send(part)

    def _send(self, part: bytes) -> None:
        """Upload ``part`` in the background, once the previous one has landed."""
        self._wait()
        if self._upload is None:
            self._upload = self._ours = self._b.call(
                f"starting the upload of {self._data}", "create_multipart_upload",
                Key=self._data)["UploadId"]
        number = self._next_number()
        coro = self._b.fs._call_s3("upload_part", Bucket=self._b.bucket, Key=self._data,
                                   UploadId=self._upload, PartNumber=number, Body=part)
        self._inflight = (number, part, asyncio.run_coroutine_threadsafe(coro, self._b.fs.loop))

    def _next_number(self) -> int:
        number = (self._parts[-1][0] if self._parts else 0) + 1
        if number >= MAX_PARTS:  # one number stays for the tail at commit
            raise BackendError(f"upload {self._key} needs more than {MAX_PARTS} parts: "
                               "raise the S3 part_size")
        return number

    def _wait(self) -> None:
        if self._inflight is None:
            return
        (number, part, future), self._inflight = self._inflight, None
        try:
            with _translated(f"uploading part {number} of {self._data}"):
                etag = future.result()["ETag"]
        except CASError as exc:
            # completed by a re-hash (read_upload), or aborted by a purge under us? (moto
            # answers a part for an upload it no longer has with a 500, not NoSuchUpload)
            gone = isinstance(exc, _UploadGone) or self._b.upload_gone(self._data, self._upload)
            if not gone:
                raise
            if self._sent or self._upload == self._ours:
                raise BackendError(f"the multipart upload of {self._key} vanished while "
                                   "appending (aborted by a purge of stale uploads?)") from exc
            self._upload, self._parts = self._b.reopen_upload(self._key, self._staged.base)
            self._ours = self._upload
            number = self._next_number()
            etag = self._b.call(f"uploading part {number} of {self._data}", "upload_part",
                                Key=self._data, UploadId=self._upload, PartNumber=number,
                                Body=part)["ETag"]
        self._parts.append([number, etag, len(part)])
        self._sent += 1

    def finish(self) -> dict:
        if self._closed:
            raise BackendError("finish after finish or abort")
        self._wait()
        if not self.size:
            self._closed = True
            return self._state
        end = self._offset + self.size
        if self._buf:
            full = self._b.full_key(self._b.pending_key(self._key, end))
            self._b.call(f"storing {full}", "put_object", Key=full, Body=bytes(self._buf))
        # the state we started from is acknowledged, so what it superseded may go now
        stale = self._b.delete_tails(self._key, self._staged.stale)
        if self._staged.pending:
            stale.append(self._offset)
        self._closed, self._ours, self._buf = True, None, bytearray()
        return Staged(self._upload, self._parts, end - sum(p[2] for p in self._parts),
                      stale).state()

    def abort(self) -> None:
        """Best effort: whatever is left is for discard_upload and purge_staging."""
        if self._closed:
            return
        self._closed, self._buf = True, bytearray()
        try:
            with contextlib.suppress(CASError):
                self._wait()
            if self._ours is not None:
                upload_id, self._ours = self._ours, None
                self._b.abort_upload(self._data, upload_id)
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

    # -- upload staging: one multipart upload per session (see the module docstring) ---------

    @property  # type: ignore[override]
    def min_chunk(self) -> int:
        """A part: smaller appends are kept in a tail object, re-read by the next append."""
        return self.options.part_size

    @staticmethod
    def pending_key(key: str, end: int) -> str:
        return f"{key}/{PENDING}{end:016x}"

    def append(self, key: str, state: dict, offset: int) -> Appender:
        return S3Appender(self, key, state, offset)

    def get_exactly(self, key: str, size: int) -> bytes:
        """A small object (a tail), which must have ``size`` bytes."""
        full = self.full_key(key)
        data = b"".join(_BodyStream(self.fs, self.call(f"reading {full}", "get_object",
                                                       Key=full)["Body"],
                                    max(size, 1), f"reading {full}"))
        if len(data) != size:
            raise BackendError(f"{full} has {len(data)} bytes, expected {size}")
        return data

    def delete_tails(self, key: str, ends: list[int]) -> list[int]:
        """Delete superseded tails; return the ends of those that failed, to retry later."""
        failed = []
        for end in ends:
            full = self.full_key(self.pending_key(key, end))
            try:
                self.call(f"deleting {full}", "delete_object", Key=full)
            except CASError as exc:
                log.warning("%s: %s", self.url, exc)
                failed.append(end)
        return failed

    def upload_gone(self, full: str, upload_id: str | None) -> bool:
        """Whether the multipart upload was completed or aborted (one small request)."""
        if upload_id is None:
            return False
        try:
            self.call(f"checking the upload of {full}", "list_parts", Key=full,
                      UploadId=upload_id, MaxParts=1)
        except _UploadGone:
            return True
        return False

    def reopen_upload(self, key: str, base: int) -> tuple[str, Recorded]:
        """A new multipart upload to ``<key>/data`` whose parts are server-side copies of its
        first ``base`` bytes, for appending after the upload was completed (read_upload)."""
        data = self.full_key(f"{key}/{DATA}")
        try:
            have = int(self.call(f"stat {data}", "head_object", Key=data)["ContentLength"])
        except NotFound:
            have = -1
        if have < base:
            raise BackendError(f"the staged data of {key} is lost: its multipart upload is "
                               "gone (aborted by a purge of stale uploads?)")
        upload_id = self.call(f"starting the upload of {data}", "create_multipart_upload",
                              Key=data)["UploadId"]
        try:
            ranges = [(data, s, n, have) for s, n in self.copy_ranges(base, last=False)]
            with _translated(f"copying {data} into a new upload"):
                return upload_id, sync(self.fs.loop, self._copy_into, data, upload_id, ranges, 1)
        except BaseException:
            with contextlib.suppress(CASError):
                self.abort_upload(data, upload_id)
            raise

    def _seal(self, key: str, staged: Staged) -> int:
        """Complete the session's upload, tail included, at ``<key>/data``; return how many
        of the session's first bytes ``data`` holds (fewer than all if it was completed
        before and only the tail grew since)."""
        data = self.full_key(f"{key}/{DATA}")
        assert staged.upload is not None
        with contextlib.suppress(_UploadGone):
            if self.upload_gone(data, staged.upload):  # ask first: moto answers a 500 to a
                raise _UploadGone(staged.upload)       # part copy into an upload it lacks
            parts = [list(p) for p in staged.parts]
            if staged.pending:
                tail = self.full_key(self.pending_key(key, staged.size))
                number = parts[-1][0] + 1
                resp = self.call(f"copying {tail} into {data}", "upload_part_copy", Key=data,
                                 UploadId=staged.upload, PartNumber=number,
                                 CopySource={"Bucket": self.bucket, "Key": tail})
                parts.append([number, resp["CopyPartResult"]["ETag"], staged.pending])
            self.complete(data, staged.upload, _for_completion(parts), False)
            return staged.size
        try:  # completed already: data holds a prefix of the session
            have = int(self.call(f"stat {data}", "head_object", Key=data)["ContentLength"])
        except NotFound:
            have = -1
        if not staged.base <= have <= staged.size:
            raise BackendError(f"the staged data of {key} is lost: its multipart upload is "
                               "gone (aborted by a purge of stale uploads?)")
        return have

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        """Complete and copy server-side; not one byte of the session goes through here."""
        staged = Staged.of(key, state)
        if staged.size != size:
            raise BackendError(f"staged data of {key} has {staged.size} bytes, expected {size}")
        target = self.full_key(final)
        tail = self.full_key(self.pending_key(key, size))
        if staged.upload is None:  # under one part: the tail is all
            if not size:
                return self.put_object(target, b"", exclusive)
            return self.copy_full(tail, target, size, exclusive)
        data = self.full_key(f"{key}/{DATA}")
        have = self._seal(key, staged)
        if have == size:
            return self.copy_full(data, target, size, exclusive)
        return self.compose(target, [(data, 0, have, have),
                                     (tail, have - staged.base, size - have, staged.pending)],
                            exclusive)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        """The session's bytes. Parts of an open upload cannot be read, so this completes it
        first (see the module docstring); meant only for re-hashing."""
        staged = Staged.of(key, state)
        tail = self.pending_key(key, staged.size)
        if staged.upload is None:
            if staged.pending:
                yield from self.read(tail)
            return
        have = self._seal(key, staged)
        yield from self.read(f"{key}/{DATA}", 0, have)
        if have < staged.size:
            yield from self.read(tail, have - staged.base)

    def discard_upload(self, key: str, state: dict) -> None:
        """Abort the session's multipart uploads (also those of unacknowledged appends) and
        delete every object under ``key``."""
        recorded = state.get("upload")
        if recorded:
            self.abort_upload(self.full_key(f"{key}/{DATA}"), recorded)
        for upload in self.multipart_uploads(check_key(key) + "/"):
            if upload.upload_id != recorded:
                self.abort_upload(self.absolute(upload.key), upload.upload_id)
        for rel, _, _ in list(self._objects(key + "/")):
            self.call(f"deleting {rel}", "delete_object", Key=self.absolute(rel))

    def purge_staging(self, older_than: float,
                      in_use: Callable[[str], bool] = lambda key: False) -> int:
        """Abort the multipart uploads of upload sessions (``*/data``) on which nothing
        happened before the unix time ``older_than``: neither their start, nor a part, nor
        an object under the session; return how many.

        Activity counts, not the start alone, because a live session's upload may be old
        (and moto reports one fixed start time for every upload).
        """
        aborted = 0
        for upload in self.multipart_uploads():
            session, _, name = upload.key.rpartition("/")
            if not session or name != DATA or upload.initiated >= older_than:
                continue
            if in_use(session):
                continue  # a live session's upload, however quiet: never ours to abort
            try:
                if self._last_activity(session, upload) >= older_than:
                    continue
            except _UploadGone:
                continue
            self.abort_upload(self.absolute(upload.key), upload.upload_id)
            aborted += 1
        return aborted

    def _last_activity(self, session: str, upload: OpenUpload) -> float:
        last, marker = upload.initiated, {}
        while True:
            page = self.call(f"listing the parts of {upload.key}", "list_parts",
                             Key=self.absolute(upload.key), UploadId=upload.upload_id, **marker)
            for part in page.get("Parts", []):
                last = max(last, part["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                break
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}
        for _, _, mtime in self._objects(session + "/"):
            last = max(last, mtime)
        return last

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
