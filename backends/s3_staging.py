"""Upload staging for S3: chunked-upload sessions as multipart uploads.

``min_chunk`` is the part size. Mixed into :class:`backends.s3.S3Backend`.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fsspec.asyn import sync

from casengine.backend import (
    Appender,
    Buffer,
    check_key,
    writers_cutoff,
)
from casengine.errors import (
    BackendError,
    CASError,
    NotFound,
)
from casengine.layout import UPLOADS

if TYPE_CHECKING:
    from backends.s3 import S3Backend

log = logging.getLogger("backends.s3")

from backends.s3_common import (
    DATA,
    MAX_PARTS,
    PENDING,
    OpenUpload,
    Recorded,
    _BodyStream,
    _for_completion,
    _translated,
    _UploadGone,
)


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

    def finish(self, journal: dict | None = None) -> dict:
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


class S3UploadStaging:
    """Upload staging, mixed into :class:`backends.s3.S3Backend`."""

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
        body = self.call(f"reading {full}", "get_object", Key=full)["Body"]
        data = b"".join(_BodyStream(self.fs, body, max(size, 1), f"reading {full}"))
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
                      in_use: Callable[[str], bool] = lambda key: False, *,
                      writers_before: float | None = None) -> int:
        """Drop what dead writers left, idle since before the unix time ``older_than``;
        return how many: the multipart uploads of upload sessions (``uploads/*/data``) no
        live session holds and on which nothing happened, neither their start, nor a part,
        nor an object under the session; multipart uploads of other writers (an ingest
        straight to its key, killed before its commit or abort) without a start or part
        since; and staging objects a crash left between a copy and its delete.

        Activity counts, not the start alone, because a live session's upload may be old
        (and moto reports one fixed start time for every upload).
        """
        writers = writers_cutoff(older_than, writers_before)
        purged = 0
        for upload in self.multipart_uploads():
            session, _, name = upload.key.rpartition("/")
            ours = upload.key.startswith(UPLOADS) and name == DATA
            cutoff = older_than if ours else writers
            if upload.initiated >= cutoff:
                continue
            if ours and in_use(session):
                continue  # a live session's upload, however quiet: never ours to abort
            try:
                last = self._last_part(upload)
                if ours:
                    last = max([last, *(mtime for _, _, mtime in self._objects(session + "/"))])
            except _UploadGone:
                continue
            if last >= cutoff:
                continue
            self.abort_upload(self.absolute(upload.key), upload.upload_id)
            purged += 1
        for obj in self.staging_objects():  # an ingest's, between its copy and its delete
            if obj.mtime < writers:
                self.call(f"deleting {obj.key}", "delete_object", Key=self.absolute(obj.key))
                purged += 1
        return purged

    def staged_bytes(self, key: str, state: dict) -> int:
        total = sum(size for _, size, _ in self._objects(key + "/"))
        for upload in self.multipart_uploads(check_key(key) + "/"):
            with contextlib.suppress(_UploadGone):  # completed or aborted meanwhile
                total += sum(part["Size"] for part in self._parts(upload))
        return total

    def _last_part(self, upload: OpenUpload) -> float:
        """When the upload started or last got a part."""
        return max([upload.initiated,
                    *(p["LastModified"].timestamp() for p in self._parts(upload))])

    def _parts(self, upload: OpenUpload) -> Iterator[dict]:
        marker: dict = {}
        while True:
            page = self.call(f"listing the parts of {upload.key}", "list_parts",
                             Key=self.absolute(upload.key), UploadId=upload.upload_id, **marker)
            yield from page.get("Parts", [])
            if not page.get("IsTruncated"):
                return
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}
