"""Repositories, blob links, manifests, tags and referrers over the blob store.

Blobs live once in the engine's global store; a repository holds *links* to them, so a
cross-repository mount is a link, never a copy, and a blob is readable through a
repository only if it is linked there. Manifests are blobs too (their exact bytes), linked
in their repository and described by a record of what they refer to.

Every link, manifest and tag is also a small object under ``repositories/`` (see
:mod:`casengine.layout`), so the index can be rebuilt from the backend alone; the index is
what was acknowledged. A writer holds a record's own lock from its backend call to its
index transaction, so records end as the index does, and a crash leaves the backend ahead
of the index, never behind it (see :mod:`casengine.registry.records`).

Usage is kept as it changes: per repository, a reference count per blob (from the
repository's manifests and the manifests themselves) and the sum of the sizes of the blobs
whose count is above zero, its *logical* size. Blobs that were pushed but never referenced
by a manifest are not charged (see :mod:`casengine.registry.usage`).
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from casengine.backend import READ_CHUNK
from casengine.digest import Digest, parse_digest
from casengine.errors import (
    BlobNotFound,
    Conflict,
    CorruptObject,
    DigestMismatch,
    InUse,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestNotFound,
    NotFound,
    RepositoryNotFound,
    UploadNotFound,
)
from casengine.index import Txn
from casengine.layout import repo_key
from casengine.registry import records
from casengine.registry.manifests import DEFAULT_MAX_SIZE, Manifest, parse_manifest
from casengine.registry.names import check_name, check_tag, is_digest
from casengine.registry.records import link_record, manifest_record, tag_record

if TYPE_CHECKING:
    from casengine.backend import Backend
    from casengine.engine import Engine, IngestResult
    from casengine.index import BlobRecord, Index
    from casengine.ingest import Source
    from casengine.uploads import UploadStatus

_REF = struct.Struct("<IQ")  # reference count, blob size
_TIME = struct.Struct("<d")


def _k(repo: str, *parts: str) -> bytes:
    return "\0".join((repo, *parts)).encode()


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    repository: str
    digest: str
    media_type: str
    size: int
    refs: tuple[str, ...]  #: digests this manifest keeps: config, layers, children
    subject: str | None = None
    artifact_type: str | None = None


@dataclass(frozen=True, slots=True)
class Page:
    items: list[str]
    #: the value to pass as ``last`` for the next page, or None when this was the last page
    next_last: str | None


def paginate(keys: Iterator[str], n: int | None, last: str | None) -> Page:
    """Lexical pagination as the distribution spec defines it: items after ``last``."""
    items: list[str] = []
    for key in keys:
        if last is not None and key <= last:
            continue
        if n is not None and len(items) == n:
            return Page(items, items[-1] if items else None)
        items.append(key)
    return Page(items, None)


class Registry:
    """The registry model over one engine; thread- and process-safe like the engine."""

    def __init__(self, engine: Engine, *, create_on_push: bool = True,
                 max_manifest_size: int = DEFAULT_MAX_SIZE) -> None:
        from casengine.registry.usage import Quotas

        self.engine = engine
        self.create_on_push = create_on_push
        self.max_manifest_size = max_manifest_size
        self.quotas = Quotas(self)

    @property
    def index(self) -> Index:
        return self.engine.index

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    # -- repositories -----------------------------------------------------------------------

    def create_repository(self, name: str) -> bool:
        """Create ``name``; return False if it already existed."""
        check_name(name)
        if self.repository_exists(name):
            return False
        record = {"created": time.time(), "logical": 0}
        key = repo_key(name, "_repo")
        with records.locked(self.index, [key]):  # as a repo rm sweeping it holds it
            self.backend.put(key, json.dumps({"created": record["created"]}).encode(),
                             exclusive=True)
            with self.index.transaction(write=True) as txn:
                if txn.get("repos", name.encode()) is not None:
                    return False
                txn.put("repos", name.encode(), json.dumps(record).encode())
        return True

    def repository_exists(self, name: str) -> bool:
        with self.index.transaction() as txn:
            return txn.get("repos", check_name(name).encode()) is not None

    def repository(self, name: str) -> dict[str, Any]:
        with self.index.transaction() as txn:
            value = txn.get("repos", check_name(name).encode())
        if value is None:
            raise RepositoryNotFound(name)
        return {"name": name, **json.loads(value)}

    def _may_push(self, name: str) -> None:
        """Refuse a push to a repository that does not exist and may not be created."""
        check_name(name)
        if not self.create_on_push and not self.repository_exists(name):
            raise RepositoryNotFound(name)

    def _for_push(self, name: str) -> None:
        """Create the repository of a push that succeeded, if the policy allows."""
        self._may_push(name)
        if not self.repository_exists(name):
            self.create_repository(name)

    def _for_read(self, name: str) -> None:
        if not self.repository_exists(name):
            raise RepositoryNotFound(name)

    def repositories(self, prefix: str = "") -> Iterator[str]:
        with self.index.transaction() as txn:
            names = [k.decode() for k, _ in txn.scan("repos", prefix.encode())]
        return iter(names)

    def catalog(self, n: int | None = None, last: str | None = None) -> Page:
        return paginate(self.repositories(), n, last)

    def delete_repository(self, name: str) -> None:
        """Remove the repository, its tags, manifests and links. Blobs stay for GC.

        Every row goes in one transaction: a push racing it either lands before (and goes
        with the rest) or after (and re-creates the repository, whole). The backend's
        records then go one by one under their locks, each only if the index still lacks
        it: a push after the transaction keeps its own.
        """
        self._for_read(name)
        prefix = _k(name, "")
        with self.index.transaction(write=True) as txn:
            for table in ("tags", "manifests", "refs", "referrers"):
                for k, _ in list(txn.scan(table, prefix)):
                    txn.delete(table, k)
            for k, _ in list(txn.scan("links", prefix)):
                txn.delete("links", k)
                txn.delete("linked", _k(k.split(b"\0", 1)[1].decode(), name))
            txn.delete("repos", name.encode())
        # only this repository's records: a nested repository (team/app under team)
        # shares the prefix, and no name component can start with '_'
        for part in ("_links/", "_manifests/", "_tags/"):
            for key in list(self.backend.list(repo_key(name, part))):
                record = records.of_key(key)
                if record is None:
                    continue
                with records.locked(self.index, [key]):
                    records.agree(self.index, self.backend, [record])
        key = repo_key(name, "_repo")
        with records.locked(self.index, [key]):
            if not self.repository_exists(name):  # else a push has made it again
                with contextlib.suppress(NotFound):
                    self.backend.delete(key)

    # -- blobs in repositories --------------------------------------------------------------

    def link(self, repo: str, digest: str | Digest) -> None:
        d = parse_digest(digest)
        with records.writing(self.index, self.backend, [link_record(repo, d)], b""), \
                self.index.transaction(write=True) as txn:
            add_link(txn, repo, str(d))

    def is_linked(self, repo: str, digest: str | Digest) -> bool:
        with self.index.transaction() as txn:
            return txn.get("links", _k(repo, str(parse_digest(digest)))) is not None

    def stat_blob(self, repo: str, digest: str | Digest) -> BlobRecord:
        d = parse_digest(digest)
        self._for_read(check_name(repo))
        if not self.is_linked(repo, d):
            raise BlobNotFound(d)
        return self.engine.stat(d)

    def read_blob(self, repo: str, digest: str | Digest, start: int = 0,
                  length: int | None = None, *, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        self.stat_blob(repo, digest)
        return self.engine.read(digest, start, length, chunk_size=chunk_size)

    def open_blob_file(self, repo: str, digest: str | Digest) -> IO[bytes] | None:
        """The blob as an open local file for zero-copy sends, or None (see
        :meth:`Engine.open_file`)."""
        self.stat_blob(repo, digest)
        return self.engine.open_file(digest)

    def unlink(self, repo: str, digest: str | Digest) -> bool:
        """Remove the blob from ``repo`` (the bytes stay for GC); False if it was not there.

        A blob a manifest of ``repo`` references, or a manifest's own digest, is refused with
        :class:`InUse`: without its link the manifest could not be pulled, and GC would
        take bytes it needs.
        """
        d = parse_digest(digest)
        self._for_read(check_name(repo))
        record = link_record(repo, d)
        with records.locked(self.index, [record.key]):
            with self.index.transaction(write=True) as txn:
                if txn.get("refs", _k(repo, str(d))) is not None:
                    if txn.get("manifests", _k(repo, str(d))) is not None:
                        raise InUse(f"{d} is a manifest of {repo}: delete it as a manifest")
                    raise InUse(f"{d} is referenced by a manifest of {repo}: delete the "
                                "manifest first")
                existed = txn.delete("links", _k(repo, str(d)))
                txn.delete("linked", _k(str(d), repo))
            records.agree(self.index, self.backend, [record])
        return existed

    def ingest_blob(self, repo: str, source: Source, *, digest: str | Digest | None = None,
                    size: int | None = None, media_type: str | None = None) -> IngestResult:
        """Store a blob and link it in ``repo`` (a monolithic push); ``media_type``, when
        known, helps the engine's compression policy (see :meth:`Engine.ingest`)."""
        self._may_push(repo)
        if size is not None:  # refuse early what is known to be too big
            self.quotas.check_blob(repo, size, parse_digest(digest) if digest else None)
        result = self.engine.ingest(source, digest=digest, size=size, media_type=media_type,
                                    check=lambda d, n: self.quotas.check_blob(repo, n, d))
        self._for_push(repo)
        self.link(repo, result.digest)
        return result

    def mount(self, repo: str, digest: str | Digest, from_repo: str | None = None,
              readable: Callable[[str], bool] | None = None) -> bool:
        """Link a blob that ``from_repo`` (or, if None, any readable repository) holds.

        ``readable`` says which repositories the caller may read; None means all. Returns
        False when no such repository has the blob: the caller then falls back to an upload.
        """
        d = parse_digest(digest)
        self._may_push(repo)
        if from_repo is not None:
            sources = [check_name(from_repo)]
        else:
            sources = [r for r in self.repositories() if r != repo]
        for source in sources:
            if (readable is None or readable(source)) and self.is_linked(source, d):
                try:
                    record = self.engine.stat(d)
                except BlobNotFound:
                    continue  # collected meanwhile: the client falls back to an upload
                self.quotas.check_blob(repo, record.size, d)
                self._for_push(repo)
                self.link(repo, d)
                return True
        return False

    # -- upload sessions bound to a repository ----------------------------------------------

    def start_upload(self, repo: str, owner: str | None = None) -> UploadStatus:
        # the repository comes with the first blob committed, not with a session that may
        # be cancelled (or a mount that fell back to one)
        self._may_push(repo)
        return self.engine.uploads.start(repo, owner)

    def upload_status(self, repo: str, upload_id: str, owner: str | None = None) -> UploadStatus:
        """The session, if it belongs to ``repo`` (and to ``owner``, where it has one)."""
        status = self.engine.uploads.status(upload_id)
        if status.repository != repo or (status.owner is not None and status.owner != owner):
            raise UploadNotFound(upload_id)
        return status

    def append_upload(self, repo: str, upload_id: str, source: Source, offset: int, *,
                      length: int | None = None, owner: str | None = None) -> UploadStatus:
        self.upload_status(repo, upload_id, owner)
        return self.engine.uploads.append(upload_id, source, offset, length=length)

    def commit_upload(self, repo: str, upload_id: str, digest: str | Digest, *,
                      last: Source | None = None, last_length: int | None = None,
                      size: int | None = None, owner: str | None = None) -> IngestResult:
        self.upload_status(repo, upload_id, owner)
        # linked before the session is forgotten: a crash in between leaves the session,
        # and the client's retried PUT links it then
        return self.engine.uploads.commit(upload_id, digest, last=last,
                                          last_length=last_length, size=size,
                                          check=lambda d, n: self.quotas.check_blob(repo, n, d),
                                          published=lambda d: self._link_pushed(repo, d))

    def _link_pushed(self, repo: str, digest: Digest) -> None:
        self._for_push(repo)
        self.link(repo, digest)

    def cancel_upload(self, repo: str, upload_id: str, owner: str | None = None) -> None:
        self.upload_status(repo, upload_id, owner)
        self.engine.uploads.cancel(upload_id)

    # -- manifests and tags -----------------------------------------------------------------

    def put_manifest(self, repo: str, reference: str, data: bytes,
                     content_type: str | None = None) -> Manifest:
        """Validate and store a manifest, by tag or by digest; return what it says."""
        check_name(repo)
        by_digest = parse_digest(reference) if is_digest(reference) else None
        manifest = parse_manifest(data, content_type, max_size=self.max_manifest_size,
                                  algorithm=by_digest.algorithm if by_digest else "sha256")
        tag = None
        if by_digest is not None:
            if by_digest != manifest.digest:
                raise DigestMismatch(reference, manifest.digest)
        else:
            tag = check_tag(reference)
        self._may_push(repo)
        refs = self._check_references(repo, manifest)
        sizes = {str(manifest.digest): manifest.size}
        for d in (*manifest.blobs, *manifest.children):
            sizes.setdefault(str(d.digest), d.size)
        charged = [str(manifest.digest), *refs]
        self.quotas.check_manifest(repo, charged, sizes)  # early: before the ingest
        self._for_push(repo)
        self.engine.ingest(data, digest=manifest.digest)
        record = ManifestRecord(repo, str(manifest.digest), manifest.media_type, manifest.size,
                                refs, str(manifest.subject.digest) if manifest.subject else None,
                                manifest.artifact_type)
        backend_records = [link_record(repo, manifest.digest),
                           manifest_record(repo, manifest.digest)]
        if tag is not None:
            backend_records.append(tag_record(repo, tag))
        # refused inside (a blob swept since the check, a quota crossed meanwhile), the
        # records written ahead are taken back
        with records.writing(self.index, self.backend, backend_records,
                             str(manifest.digest).encode()), \
                self.index.transaction(write=True) as txn:
            self.quotas.check_manifest(repo, charged, sizes, txn)
            self._record_manifest(txn, record, manifest, sizes)
            if tag is not None:
                txn.put("tags", _k(repo, tag), str(manifest.digest).encode())
        return manifest

    def _check_references(self, repo: str, manifest: Manifest) -> tuple[str, ...]:
        """What the manifest keeps, once each: every blob (a foreign layer only if pushed)
        and every child. The recording transaction checks them all again."""
        refs: list[str] = []
        for blob in manifest.blobs:
            linked = self.is_linked(repo, blob.digest)
            if blob.foreign and not linked:
                continue
            if not linked:
                raise ManifestBlobUnknown(repo, blob.digest)
            try:
                stored = self.engine.stat(blob.digest).size
            except BlobNotFound:
                raise ManifestBlobUnknown(repo, blob.digest) from None
            if stored != blob.size:
                raise ManifestInvalid(
                    f"descriptor of {blob.digest} says {blob.size} bytes, the blob has {stored}")
            refs.append(str(blob.digest))
        for child in manifest.children:
            record = self._manifest_record(repo, str(child.digest))
            if record is None:
                raise ManifestBlobUnknown(repo, child.digest, "manifest")
            if record.size != child.size:
                raise ManifestInvalid(f"descriptor of {child.digest} says {child.size} bytes, "
                                      f"the manifest has {record.size}")
            refs.append(str(child.digest))
        return tuple(dict.fromkeys(refs))

    def _record_manifest(self, txn: Txn, record: ManifestRecord, manifest: Manifest,
                         sizes: dict[str, int]) -> None:
        repo, key = record.repository, _k(record.repository, record.digest)
        children = {str(c.digest) for c in manifest.children}
        for ref in record.refs:  # again, inside the transaction: an unlink may have raced
            if txn.get("links", _k(repo, ref)) is None:
                raise ManifestBlobUnknown(repo, ref)
            if ref in children and txn.get("manifests", _k(repo, ref)) is None:
                raise ManifestBlobUnknown(repo, ref, "manifest")
        add_link(txn, repo, record.digest)
        if txn.get("manifests", key) is not None:
            return  # the same bytes again: nothing new is referenced
        txn.put("manifests", key, json.dumps(_record_json(record)).encode())
        added = 0
        for digest in (record.digest, *record.refs):
            rk = _k(repo, digest)
            old = txn.get("refs", rk)
            count, size = _REF.unpack(old) if old else (0, sizes[digest])
            if count == 0:
                added += size
            txn.put("refs", rk, _REF.pack(count + 1, size))
        if record.subject is not None:
            txn.put("referrers", _k(repo, record.subject, record.digest),
                    json.dumps(manifest.referrer_descriptor()).encode())
        self._add_logical(txn, repo, added)

    @staticmethod
    def _add_logical(txn: Txn, repo: str, delta: int) -> None:
        info = json.loads(txn.get("repos", repo.encode()) or b'{"created": 0, "logical": 0}')
        info["logical"] = info.get("logical", 0) + delta
        txn.put("repos", repo.encode(), json.dumps(info).encode())

    def _manifest_record(self, repo: str, digest: str) -> ManifestRecord | None:
        with self.index.transaction() as txn:
            value = txn.get("manifests", _k(repo, digest))
        return None if value is None else _record_from(repo, digest, json.loads(value))

    def resolve(self, repo: str, reference: str) -> ManifestRecord:
        """The manifest a tag or digest names in ``repo``."""
        self._for_read(check_name(repo))
        if is_digest(reference):
            digest = str(parse_digest(reference))
        else:
            with self.index.transaction() as txn:
                value = txn.get("tags", _k(repo, check_tag(reference)))
            if value is None:
                raise ManifestNotFound(repo, reference)
            digest = value.decode()
        record = self._manifest_record(repo, digest)
        if record is None:
            raise ManifestNotFound(repo, reference)
        return record

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, ManifestRecord]:
        """The manifest's exact bytes, verified: a client pins images by this digest, and
        a manifest is small enough to hash on every read."""
        record = self.resolve(repo, reference)
        data = self.engine.read_bytes(record.digest)
        expected = parse_digest(record.digest)
        actual = Digest.of(data, expected.algorithm)
        if actual != expected or len(data) != record.size:
            raise CorruptObject(f"manifest {repo}@{expected} is damaged: its {len(data)} stored "
                                f"bytes hash to {actual}; run 'casengine check'")
        return data, record

    def delete_manifest(self, repo: str, digest: str | Digest,
                        guard: Callable[[Txn], bool] | None = None) -> bool:
        """Delete a manifest by digest, with the tags that point at it.

        A manifest another one of ``repo`` needs (an index's child) is refused with
        :class:`InUse`: the index could no longer be pulled.
        ``guard`` (garbage collection's) runs inside the deleting transaction and may veto
        by returning False; then nothing changes. Returns whether the manifest was deleted.
        """
        d = str(parse_digest(digest))
        record = self.resolve(repo, d)
        manifest_rec = manifest_record(repo, parse_digest(d))
        tags: list[str] = []
        with records.locked(self.index, [manifest_rec.key]):
            with self.index.transaction(write=True) as txn:
                if guard is None:
                    _refuse_if_needed(txn, repo, d)
                elif not guard(txn):
                    return False
                if not txn.delete("manifests", _k(repo, d)):
                    return False
                # in the same transaction: a tag pushed again meanwhile must not be left
                # naming a manifest that is gone (a guarded delete has none: its guard says)
                tags = [k.split(b"\0", 1)[1].decode()
                        for k, v in txn.scan("tags", _k(repo, "")) if v.decode() == d]
                for tag in tags:
                    txn.delete("tags", _k(repo, tag))
                removed = 0
                for ref in (d, *record.refs):
                    old = txn.get("refs", _k(repo, ref))
                    if old is None:
                        continue
                    count, size = _REF.unpack(old)
                    if count <= 1:
                        txn.delete("refs", _k(repo, ref))
                        removed += size
                    else:
                        txn.put("refs", _k(repo, ref), _REF.pack(count - 1, size))
                if record.subject is not None:
                    txn.delete("referrers", _k(repo, record.subject, d))
                self._add_logical(txn, repo, -removed)
            records.agree(self.index, self.backend, [manifest_rec])
        for tag in tags:  # each under its own lock (never two sets held at once)
            tag_rec = tag_record(repo, tag)
            with records.locked(self.index, [tag_rec.key]):
                records.agree(self.index, self.backend, [tag_rec])
        return True

    def delete_tag(self, repo: str, tag: str) -> None:
        self._for_read(check_name(repo))
        record = tag_record(repo, check_tag(tag))
        with records.locked(self.index, [record.key]):
            with self.index.transaction(write=True) as txn:
                if not txn.delete("tags", record.row):
                    raise ManifestNotFound(repo, tag)
            records.agree(self.index, self.backend, [record])

    def tags(self, repo: str, n: int | None = None, last: str | None = None) -> Page:
        self._for_read(check_name(repo))
        with self.index.transaction() as txn:
            names = [k.split(b"\0", 1)[1].decode() for k, _ in txn.scan("tags", _k(repo, ""))]
        return paginate(iter(names), n, last)

    def tag_map(self, repo: str) -> dict[str, str]:
        """Every tag of ``repo`` and the digest it points at."""
        self._for_read(check_name(repo))
        with self.index.transaction() as txn:
            return {k.split(b"\0", 1)[1].decode(): v.decode()
                    for k, v in txn.scan("tags", _k(repo, ""))}

    def manifests(self, repo: str) -> list[ManifestRecord]:
        self._for_read(check_name(repo))
        with self.index.transaction() as txn:
            return [_record_from(repo, k.split(b"\0", 1)[1].decode(), json.loads(v))
                    for k, v in txn.scan("manifests", _k(repo, ""))]

    def referrers(self, repo: str, subject: str | Digest,
                  artifact_type: str | None = None) -> list[dict[str, Any]]:
        """Descriptors of the manifests in ``repo`` whose subject is ``subject``."""
        self._for_read(check_name(repo))
        with self.index.transaction() as txn:
            found = [json.loads(v) for _, v in
                     txn.scan("referrers", _k(repo, str(parse_digest(subject)), ""))]
        if artifact_type is not None:
            found = [d for d in found if d.get("artifactType") == artifact_type]
        return found


def add_link(txn: Txn, repo: str, digest: str) -> None:
    """Link ``digest`` in ``repo`` -- only while the blob is stored and not being deleted.

    This check and garbage collection's (no link, then delete) run in write transactions,
    which LMDB serialises across processes: either the link lands first and the collector
    sees it, or the collector takes the blob first and the link is refused here, before
    the push is acknowledged. A blob can never be linked and deleted at once.
    """
    if txn.get("blobs", digest.encode()) is None:
        raise Conflict(f"blob {digest} is not stored (it may just have been collected): "
                       "push it again")
    txn.put("links", _k(repo, digest), _TIME.pack(time.time()))
    txn.put("linked", _k(digest, repo), b"")


def link_time(value: bytes) -> float:
    return _TIME.unpack(value)[0] if len(value) == _TIME.size else 0.0


def _refuse_if_needed(txn: Txn, repo: str, digest: str) -> None:
    """Raise InUse if a manifest of ``repo`` other than ``digest`` itself references it."""
    refs = txn.get("refs", _k(repo, digest))
    if refs is not None and _REF.unpack(refs)[0] > 1:
        raise InUse(f"{digest} is part of another manifest of {repo} (a child of an index): "
                    "delete that one first")


def _record_json(r: ManifestRecord) -> dict[str, Any]:
    return {"mediaType": r.media_type, "size": r.size, "refs": list(r.refs),
            "subject": r.subject, "artifactType": r.artifact_type}


def _record_from(repo: str, digest: str, obj: dict[str, Any]) -> ManifestRecord:
    return ManifestRecord(repo, digest, obj["mediaType"], obj["size"], tuple(obj["refs"]),
                          obj.get("subject"), obj.get("artifactType"))
