"""``casengine check --repair``: every step looks again, where it acts, at what it acts on.

A check runs while the registry serves pushes, so what it found may have changed by the
time it repairs: a record may have landed, a tag been pushed, a link made. So every
destructive step re-verifies its premise inside the index write transaction that acts, as
garbage collection does; a backend record it removes or writes after that transaction is
looked up in the index again afterwards, and put right if a push changed it meanwhile.

- Nothing younger than :data:`casengine.gc.ORPHAN_MIN_AGE` is quarantined unrecorded: a
  publish has its object before its record. Re-indexing an orphan whose bytes match its
  name is safe at any age (the record is added only if none is there, in one transaction,
  and a publish racing it finds that record and keeps its own object).
- An object whose size or xxh3 disagrees with its record is first judged by its digest:
  one that verifies gets its record rewritten, never quarantined.
- The backend's repository records are made to say what the index says: a push's index
  transaction is its acknowledgement, so the index holds what was acknowledged (as in
  garbage collection's orphan pass). A tag record that names another manifest is rewritten
  only once it is as old as that minimum age: a push writes it just before its transaction.

A step that cannot act raises :class:`Left`; the finding stays unrepaired and says why.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import xxhash

from casengine.digest import Digest, Hasher
from casengine.errors import IntegrityError, NotFound
from casengine.index import BlobRecord, pack_blob, unpack_blob
from casengine.layout import BLOBS, blob_key, parse_tag_record, tag_key
from casengine.leases import is_live, new_lease
from casengine.registry import records
from casengine.verify import same_record

if TYPE_CHECKING:
    from casengine.backend import ObjectInfo
    from casengine.check import Checker
    from casengine.index import Txn
    from casengine.verify import Verdict

QUARANTINE = "quarantine/"


class Left(Exception):
    """A repair that could not act; the message says why."""


class _Recorded(Exception):
    def __init__(self, codec: str) -> None:
        self.codec = codec


def _k(*parts: str) -> bytes:
    return "\0".join(parts).encode()


class Repairer:
    """The repairs of one check run (see the module docstring)."""

    def __init__(self, checker: Checker) -> None:
        self.checker = checker
        self.engine = checker.engine
        self.index = checker.index
        self.backend = checker.backend
        self.min_age = checker.orphan_min_age

    # -- blob records and objects ---------------------------------------------------------

    def blob(self, verdict: Verdict) -> str:
        record = verdict.record
        if verdict.kind == "missing-object":
            self._drop_record(record)
            return "record dropped"
        if verdict.kind == "stale-record":
            assert verdict.fixed is not None
            self._rewrite_record(record, verdict.fixed)
            return "record rewritten from the object, which verifies against its digest"
        key = blob_key(Digest.parse(record.digest), record.codec)
        if verdict.kind == "trailing-bytes":
            target = self._trim(key, record)
            return (f"object cut to its first {record.size} bytes, which verify; the whole "
                    f"object quarantined as {target}")
        target = self._copy_to_quarantine(key)
        try:
            self._take(record)
        except Left:
            self.backend.delete(target)
            raise
        return "record dropped, object quarantined"

    def _drop_record(self, record: BlobRecord) -> None:
        key = record.digest.encode()
        with self.index.transaction(write=True) as txn:
            self._unchanged(txn, record)
            txn.delete("blobs", key)

    @staticmethod
    def _unchanged(txn: Txn, record: BlobRecord) -> None:
        key = record.digest.encode()
        value = txn.get("blobs", key)
        if value is None or not same_record(unpack_blob(key, value), record):
            raise Left("the record changed while it was checked")

    def _rewrite_record(self, record: BlobRecord, fixed: BlobRecord) -> None:
        key = record.digest.encode()
        with self.index.transaction(write=True) as txn:
            self._unchanged(txn, record)
            current = unpack_blob(key, txn.get("blobs", key))  # type: ignore[arg-type]
            txn.put("blobs", key, pack_blob(replace(fixed, created=current.created,
                                                    touched=current.touched)))

    def _take(self, record: BlobRecord) -> None:
        """Forget the record and delete its object, as :meth:`Engine.delete` does, but
        only if the record is still the one that was found wrong. The ``deleting`` lease
        makes an ingest of the same bytes wait instead of adopting the doomed object."""
        key = record.digest.encode()
        lease = new_lease()
        with self.index.transaction(write=True) as txn:
            self._unchanged(txn, record)
            txn.delete("blobs", key)
            txn.put("deleting", key, json.dumps(lease).encode())
        try:
            self.backend.delete(blob_key(Digest.parse(record.digest), record.codec))
        finally:
            with self.index.transaction(write=True) as txn:
                held = txn.get("deleting", key)
                if held is not None and json.loads(held)["token"] == lease["token"]:
                    txn.delete("deleting", key)

    def _trim(self, key: str, record: BlobRecord) -> str:
        """Cut a raw object whose first ``size`` bytes are the blob back to those bytes,
        the whole object quarantined first, the cut one verified on its way in."""
        target = self._copy_to_quarantine(key)
        hasher, xxh = Hasher(record.digest.split(":", 1)[0]), xxhash.xxh3_128()
        with self.backend.writer() as w:  # no key hint: S3 would upload onto the object read
            for chunk in self.backend.read(key, 0, record.size, chunk_size=4 << 20):
                hasher.update(chunk)
                xxh.update(chunk)
                w.write(chunk)
            if str(hasher.digest()) != record.digest or hasher.size != record.size:
                raise Left("the object changed while it was repaired")
            with self.index.transaction(write=True) as txn:
                self._unchanged(txn, record)
            w.commit(key)
        self._rewrite_record(record, replace(record, stored_size=record.size,
                                             xxh3=xxh.hexdigest()))
        return target

    def _copy_to_quarantine(self, key: str) -> str:
        """A copy of ``key`` under quarantine/: the bytes are kept before anything goes."""
        target = f"{QUARANTINE}{key[len(BLOBS):]}.{int(time.time())}"
        with self.backend.writer() as w:
            for chunk in self.backend.read(key, chunk_size=4 << 20):
                w.write(chunk)
            w.commit(target)
        return target

    # -- orphan objects -------------------------------------------------------------------

    def orphan(self, key: str, digest: Digest, codec: str, info: ObjectInfo) -> str:
        """Re-index an orphan whose bytes match its name; quarantine any other, if old."""
        hasher = Hasher(digest.algorithm)
        try:
            xxh, stored = self.checker.verifier.scan(key, codec, info.size, hasher)
            intact = hasher.digest() == digest
        except IntegrityError:
            intact = False
        except NotFound:
            return "gone meanwhile"
        duplicate = None
        if intact:
            now = time.time()
            try:
                self.index.add_blob(BlobRecord(str(digest), hasher.size, codec, stored, xxh,
                                               now, now), guard=self._adoptable(digest))
                return "verified and re-indexed"
            except _Recorded as exc:
                if exc.codec == codec:
                    return "recorded meanwhile (its publish was in progress)"
                duplicate = exc.codec
        if time.time() - info.mtime < self.min_age:
            raise Left(f"younger than {self.min_age / 60:g} minutes: a publish in progress "
                       "has its object before its record")
        target = self._copy_to_quarantine(key)
        if not self.engine.delete_orphan(digest, codec):
            self.backend.delete(target)
            raise Left("recorded meanwhile, or a delete of it is under way")
        if duplicate:
            return f"quarantined as {target} (a record names its {duplicate} object)"
        return f"quarantined as {target}"

    @staticmethod
    def _adoptable(digest: Digest) -> Callable[[Txn], None]:
        name = str(digest).encode()

        def guard(txn: Txn) -> None:
            value = txn.get("blobs", name)
            if value is not None:
                raise _Recorded(unpack_blob(name, value).codec)
            held = txn.get("deleting", name)
            if held is not None and is_live(json.loads(held)):
                raise Left("a delete of it is under way")

        return guard

    # -- repository records ---------------------------------------------------------------

    def _indexed(self, table: str, key: bytes) -> bytes | None:
        with self.index.transaction() as txn:
            return txn.get(table, key)

    def _put_from_index(self, key: str, table: str, ikey: bytes,
                        body: Callable[[bytes], bytes]) -> None:
        """Write the backend record ``key`` from the index's ``table`` row, under the
        record's lock: no push or delete of it can change the row meanwhile."""
        with records.locked(self.index, [key]):
            value = self._indexed(table, ikey)
            if value is None:
                raise Left("gone from the index meanwhile")
            self.backend.put(key, body(value))

    def write_record(self, key: str, table: str, ikey: bytes) -> str:
        """A link or manifest record the backend lost, written again from the index."""
        self._put_from_index(key, table, ikey, lambda value: b"")
        return "backend record written"

    def tag_record(self, repo: str, tag: str, seen: bytes | None) -> str:
        """Make the backend's record of ``repo:tag`` say what the index says."""
        key, ikey = tag_key(repo, tag), _k(repo, tag)
        if self._indexed("tags", ikey) is None:
            raise Left("the index, which holds what was acknowledged, has no such tag: "
                       "gc --orphans removes the record of a push never acknowledged once "
                       "it is old")
        if seen is not None:
            try:
                now_seen, info = self.backend.get(key), self.backend.stat(key)
            except NotFound:
                now_seen, info = None, None
            if now_seen != seen:
                raise Left("the backend's record changed while it was checked")
            if parse_tag_record(seen) is not None and info is not None \
                    and time.time() - info.mtime < self.min_age:
                raise Left(f"the backend's record is younger than {self.min_age / 60:g} "
                           "minutes: a push writes it just before its index transaction")
        self._put_from_index(key, "tags", ikey, lambda value: value)
        return "backend record written from the index"

    def drop_tag(self, repo: str, tag: str, digest: str) -> str:
        """Remove a tag that names a manifest the repository has no record of."""
        record = records.tag_record(repo, tag)
        with records.locked(self.index, [record.key]):  # a push of the tag waits
            with self.index.transaction(write=True) as txn:
                if txn.get("tags", record.row) != digest.encode():
                    raise Left("the tag moved while it was checked")
                if txn.get("manifests", _k(repo, digest)) is not None:
                    raise Left("its manifest was recorded meanwhile")
                txn.delete("tags", record.row)
            records.agree(self.index, self.backend, [record])
        return "tag removed"

    def unlink(self, repo: str, digest: str) -> str:
        """Remove a link to a blob that is not stored and that no manifest needs."""
        record = records.link_record(repo, Digest.parse(digest))
        with records.locked(self.index, [record.key]):  # a push linking it waits
            with self.index.transaction(write=True) as txn:
                if txn.get("links", record.row) is None:
                    return "gone meanwhile"
                if txn.get("blobs", digest.encode()) is not None:
                    return "the blob was stored meanwhile"
                if txn.get("refs", record.row) is not None:
                    raise Left("a manifest needs it now: it stays for a restore")
                txn.delete("links", record.row)
                txn.delete("linked", _k(digest, repo))
            records.agree(self.index, self.backend, [record])
        return "link removed"

    def drop_referrer(self, repo: str, subject: str, digest: str) -> str:
        """Remove a referrer entry that no manifest of the repository backs."""
        key = _k(repo, subject, digest)
        with self.index.transaction(write=True) as txn:
            if txn.get("referrers", key) is None:
                return "gone meanwhile"
            value = txn.get("manifests", _k(repo, digest))
            if value is not None and json.loads(value).get("subject") == subject:
                return "its manifest was recorded meanwhile"
            txn.delete("referrers", key)
        return "entry removed"
