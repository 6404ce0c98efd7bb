"""Online garbage collection, driven by the index, safe while pushes run.

What is kept (the roots and what they reach):

- every manifest, unless ``untagged`` is set; then only tagged manifests, the children of
  kept indexes, and the referrers of kept subjects (referrers follow their subject);
- in each repository, the blobs its kept manifests reference (config, layers, children),
  and its links younger than the grace window (a push in progress);
- every blob written or touched within the grace window (default 1 h);
- live upload sessions (their bytes are staging, not blobs, and expire by their own TTL),
  and the blob a session's commit published before it died unlinked (named by the session's
  mark, see :mod:`casengine.uploads`): the client's retried ``PUT`` links it, however late,
  until the session expires. On S3 that blob's bytes exist nowhere else.

The protocol, step by step, each deletion a compare-and-swap in one LMDB write transaction
(LMDB serialises write transactions across threads and processes):

1. **Manifests** (``untagged`` only): a manifest is deleted only if, inside the deleting
   transaction, no tag points at it, nothing else in the repository references it, and it
   is older than the grace window.
2. **Links**: a link is removed only if, inside the transaction, no manifest of its
   repository references the blob and the link is older than the grace window.
3. **Blobs**: a blob is taken only if, inside the transaction, no repository links it and
   it was not touched within the grace window. Its record becomes a ``deleting`` lease in
   the same transaction: metadata first, bytes last. Then the objects are deleted, in
   batches and in parallel, and the leases dropped.

The two races registries are known for cannot happen:

- *Re-push of a blob being swept.* An ingest that finds the blob already stored touches it
  at the end, in a write transaction: if the collector took the blob first, the touch
  fails and the push is refused with Conflict before it is acknowledged (the client
  pushes again); if the touch lands first, the collector sees a fresh blob and keeps it.
  An ingest of new bytes waits out a ``deleting`` lease before it publishes.
- *A manifest PUT referencing a blob being swept.* Linking a blob checks, in its
  transaction, that the blob record exists; the manifest's transaction checks that its
  blobs are linked. Whichever transaction runs second sees the first's outcome.

Nothing here lists the backend, except the optional orphan pass, which looks for objects
that no record names (left by a crash between publish and record), and for repository
records in the backend that the index lacks (a crash between a push's backend write and its
index transaction), and removes those older than the grace window, and never younger than
:data:`ORPHAN_MIN_AGE`, because a publish in progress has its object before its record.

A run holds the ``gc`` lock in the index, so two collectors never overlap; it can be
interrupted at any point and run again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from casengine.digest import Digest
from casengine.errors import Conflict, NotFound
from casengine.index import Txn, unpack_blob
from casengine.layout import BLOBS, REPOSITORIES, blob_key, parse_blob_key
from casengine.leases import is_live, new_lease
from casengine.registry import records
from casengine.registry.model import _REF, link_time
from casengine.registry.records import link_record

if TYPE_CHECKING:
    from casengine.registry import Registry

DEFAULT_GRACE = 3600.0
ORPHAN_MIN_AGE = 600.0
#: Blobs taken per write transaction, and deleted per batch.
BATCH = 1000

Progress = Callable[[str, int], None]
_NOT_A_RECORD = object()


def _k(*parts: str) -> bytes:
    return "\0".join(parts).encode()


@dataclass(slots=True)
class RepoReport:
    manifests: int = 0
    links: int = 0
    bytes: int = 0  #: sizes of the blobs whose links were removed


@dataclass(slots=True)
class GCReport:
    dry_run: bool
    grace: float
    untagged: bool
    manifests: int = 0
    links: int = 0
    blobs: int = 0
    bytes: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    orphans: int = 0
    orphan_bytes: int = 0
    repositories: dict[str, RepoReport] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def repo(self, name: str) -> RepoReport:
        return self.repositories.setdefault(name, RepoReport())

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "grace_seconds": self.grace, "untagged": self.untagged,
            "manifests": self.manifests, "links": self.links, "blobs": self.blobs,
            "bytes": self.bytes, "uploads": self.uploads, "upload_bytes": self.upload_bytes,
            "orphans": self.orphans, "orphan_bytes": self.orphan_bytes,
            "repositories": {k: {"manifests": v.manifests, "links": v.links, "bytes": v.bytes}
                             for k, v in sorted(self.repositories.items())},
            "timings_seconds": {k: round(v, 4) for k, v in self.timings.items()},
        }


class Collector:
    """One garbage collection run over a registry; see the module docstring."""

    def __init__(self, registry: Registry, *, grace: float = DEFAULT_GRACE,
                 untagged: bool = False, orphans: bool = False, dry_run: bool = False,
                 workers: int = 8, progress: Progress | None = None) -> None:
        self.registry = registry
        self.engine = registry.engine
        self.index = registry.index
        self.grace = grace
        self.untagged = untagged
        self.orphans = orphans
        self.dry_run = dry_run
        self.workers = workers
        self.progress = progress or (lambda stage, n: None)
        self.cutoff = 0.0
        #: dry run only: (repo, digest) -> references the planned deletions would drop
        self._released: dict[bytes, int] = {}

    def run(self) -> GCReport:
        report = GCReport(self.dry_run, self.grace, self.untagged)
        self.cutoff = time.time() - self.grace
        with self._lock():
            steps: list[tuple[str, Callable[[GCReport], None]]] = []
            if self.untagged:
                steps.append(("manifests", self._sweep_manifests))
            steps += [("links", self._sweep_links), ("blobs", self._sweep_blobs),
                      ("uploads", self._sweep_uploads)]
            if self.orphans:
                steps.append(("orphans", self._sweep_orphans))
            for name, step in steps:
                started = time.perf_counter()
                step(report)
                report.timings[name] = time.perf_counter() - started
        return report

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if self.dry_run:  # a dry run changes nothing, so it may overlap a real run
            yield
            return
        lease = new_lease()
        with self.index.transaction(write=True) as txn:
            held = txn.get("locks", b"gc")
            if held is not None and is_live(json.loads(held)):
                raise Conflict("another garbage collection is running on this store")
            txn.put("locks", b"gc", json.dumps(lease).encode())
        try:
            yield
        finally:
            with self.index.transaction(write=True) as txn:
                held = txn.get("locks", b"gc")
                if held is not None and json.loads(held)["token"] == lease["token"]:
                    txn.delete("locks", b"gc")

    # -- 1. manifests ---------------------------------------------------------------------

    def _kept_manifests(self, repo: str) -> tuple[set[str], list[Any]]:
        records = self.registry.manifests(repo)
        by_digest = {r.digest: r for r in records}
        kept = set(self.registry.tag_map(repo).values()) & set(by_digest)
        changed = True
        while changed:  # children of kept indexes, referrers of kept subjects
            changed = False
            for r in records:
                if r.digest in kept:
                    for ref in r.refs:
                        if ref in by_digest and ref not in kept:
                            kept.add(ref)
                            changed = True
                elif r.subject is not None and r.subject in kept:
                    kept.add(r.digest)
                    changed = True
        return kept, records

    def _sweep_manifests(self, report: GCReport) -> None:
        for repo in list(self.registry.repositories()):
            planned: set[str] = set()
            # a child or referrer is released only once its parent or subject is gone, so
            # go round until a pass deletes nothing
            while True:
                try:
                    kept, records = self._kept_manifests(repo)
                except NotFound:
                    break  # the repository was deleted meanwhile
                deleted = 0
                for record in records:
                    if record.digest in kept or record.digest in planned \
                            or self._young(record.digest):
                        continue
                    if self.dry_run:
                        took = self._dry_would_delete(repo, record, planned)
                        if took:
                            planned.add(record.digest)
                            self._release(repo, record)
                    else:
                        try:
                            took = self.registry.delete_manifest(
                                repo, record.digest, guard=self._manifest_guard(repo, record))
                        except NotFound:
                            continue  # deleted by a client meanwhile
                    if took:
                        deleted += 1
                        report.manifests += 1
                        report.repo(repo).manifests += 1
                        self.progress("manifests", 1)
                if not deleted:
                    break

    def _dry_would_delete(self, repo: str, record: Any, planned: set[str]) -> bool:
        """The real run's guard, against the index as it would be after ``planned``."""
        with self.index.transaction() as txn:
            if any(v.decode() == record.digest for _, v in txn.scan("tags", _k(repo, ""))):
                return False
            holders = self._released.get(_k(repo, record.digest), 0)
            refs = txn.get("refs", _k(repo, record.digest))
            if refs is not None and _REF.unpack(refs)[0] - holders > 1:
                return False
            subject = record.subject
            return subject is None or subject in planned or \
                txn.get("manifests", _k(repo, subject)) is None

    def _release(self, repo: str, record: Any) -> None:
        """In a dry run: the references a planned manifest deletion would drop."""
        for ref in (record.digest, *record.refs):
            key = _k(repo, ref)
            self._released[key] = self._released.get(key, 0) + 1

    def _manifest_guard(self, repo: str, record: Any) -> Callable[[Txn], bool]:
        def unreferenced(txn: Txn) -> bool:
            if any(v.decode() == record.digest for _, v in txn.scan("tags", _k(repo, ""))):
                return False  # tagged meanwhile
            refs = txn.get("refs", _k(repo, record.digest))
            if refs is not None and _REF.unpack(refs)[0] > 1:
                return False  # an index or another manifest references it now
            if record.subject is not None and txn.get("manifests", _k(repo, record.subject)):
                return False  # its subject is here: referrers follow their subject
            blob = txn.get("blobs", record.digest.encode())
            return blob is None or unpack_blob(record.digest.encode(), blob).touched < self.cutoff

        return unreferenced

    def _young(self, digest: str) -> bool:
        record = self.index.get_blob(digest)
        return record is not None and record.touched >= self.cutoff

    # -- 2. links -------------------------------------------------------------------------

    def _sweep_links(self, report: GCReport) -> None:
        for repo in list(self.registry.repositories()):
            with self.index.transaction() as txn:
                dead = [(k.split(b"\0", 1)[1].decode(), link_time(v))
                        for k, v in txn.scan("links", _k(repo, ""))
                        if link_time(v) < self.cutoff and self._unreferenced(txn, k)]
            for digest, _ in dead:
                if self.dry_run or self._unlink_if_dead(repo, digest):
                    record = self.index.get_blob(digest)
                    size = record.size if record else 0
                    report.links += 1
                    report.repo(repo).links += 1
                    report.repo(repo).bytes += size
                    self.progress("links", 1)

    def _unreferenced(self, txn: Txn, key: bytes) -> bool:
        refs = txn.get("refs", key)
        return refs is None or _REF.unpack(refs)[0] <= self._released.get(key, 0)

    def _unlink_if_dead(self, repo: str, digest: str) -> bool:
        key = _k(repo, digest)
        record = link_record(repo, Digest.parse(digest))
        # under the record's lock: a push linking it again waits, and keeps its record
        with records.locked(self.index, [record.key]):
            with self.index.transaction(write=True) as txn:
                value = txn.get("links", key)
                if value is None or link_time(value) >= self.cutoff or txn.get("refs", key):
                    return False
                txn.delete("links", key)
                txn.delete("linked", _k(digest, repo))
            records.agree(self.index, self.engine.backend, [record])
        return True

    # -- 3. blobs -------------------------------------------------------------------------

    def _unlinked_blobs(self, dead_links: set[bytes] | None = None) -> Iterator[tuple[str, int]]:
        """(digest, size) of blobs no repository links, untouched within the grace window.

        Blob records and their reverse links are read together, a batch per short read
        transaction, so a long walk never pins old pages.
        """
        # a mark set after this look belongs to a commit whose blob is fresh, or touched by
        # its dedupe: the grace window keeps that one
        marked = {rec["published"]["digest"] for rec in self.index.iter_uploads()
                  if rec.get("published")}
        start = b""
        while True:
            with self.index.transaction() as txn:
                found: list[tuple[str, int]] = []
                seen = 0
                last = start
                for key, value in txn.scan("blobs", start=start):
                    if key == start:
                        continue
                    seen += 1
                    last = key
                    record = unpack_blob(key, value)
                    if record.touched < self.cutoff and record.digest not in marked and not any(
                            k not in dead_links if dead_links is not None else True
                            for k, _ in txn.scan("linked", key + b"\0")):
                        found.append((record.digest, record.stored_size))
                    if seen == BATCH:
                        break
            yield from found
            if seen < BATCH:
                return
            start = last

    def _sweep_blobs(self, report: GCReport) -> None:
        dead = self._dry_dead_links() if self.dry_run else None
        batch: list[tuple[str, int]] = []
        with ThreadPoolExecutor(self.workers) as pool:
            for candidate in self._unlinked_blobs(dead):
                batch.append(candidate)
                if len(batch) == BATCH:
                    self._take(batch, report, pool)
                    batch = []
            if batch:
                self._take(batch, report, pool)

    def _dry_dead_links(self) -> set[bytes]:
        """In a dry run nothing is unlinked: the links a real run would remove, by blob."""
        dead: set[bytes] = set()
        with self.index.transaction() as txn:
            for k, v in txn.scan("links"):
                if link_time(v) < self.cutoff and self._unreferenced(txn, k):
                    repo, digest = k.decode().split("\0", 1)
                    dead.add(_k(digest, repo))
        return dead

    def _take(self, batch: list[tuple[str, int]], report: GCReport, pool: ThreadPoolExecutor) -> None:
        if self.dry_run:
            report.blobs += len(batch)
            report.bytes += sum(size for _, size in batch)
            self.progress("blobs", len(batch))
            return
        lease = new_lease()
        taken: list[tuple[str, str, int]] = []
        with self.index.transaction(write=True) as txn:
            for digest, _ in batch:
                key = digest.encode()
                value = txn.get("blobs", key)
                if value is None:
                    continue
                record = unpack_blob(key, value)
                if record.touched >= self.cutoff or any(True for _ in txn.scan("linked", key + b"\0")):
                    continue  # touched or linked since we looked: keep it
                txn.delete("blobs", key)
                txn.put("deleting", key, json.dumps(lease).encode())
                taken.append((digest, record.codec, record.stored_size))
        try:
            list(pool.map(
                lambda t: self.engine.backend.delete(blob_key(Digest.parse(t[0]), t[1])), taken))
        finally:  # a failed delete leaves an orphan object, never a lease that blocks pushes
            with self.index.transaction(write=True) as txn:
                for digest, _, _ in taken:
                    value = txn.get("deleting", digest.encode())
                    if value is not None and json.loads(value)["token"] == lease["token"]:
                        txn.delete("deleting", digest.encode())
        report.blobs += len(taken)
        report.bytes += sum(size for _, _, size in taken)
        self.progress("blobs", len(batch))

    # -- 4. uploads, 5. orphans -------------------------------------------------------------

    def _sweep_uploads(self, report: GCReport) -> None:
        purged = self.engine.uploads.purge(dry_run=self.dry_run)
        report.uploads = len(purged.sessions)
        report.upload_bytes = purged.bytes

    def _sweep_orphans(self, report: GCReport) -> None:
        cutoff = time.time() - max(self.grace, ORPHAN_MIN_AGE)
        backend = self.engine.backend
        for key in list(backend.list(BLOBS)):
            parsed = parse_blob_key(key)
            if parsed is None:
                continue
            digest, codec = parsed
            record = self.index.get_blob(str(digest))
            if record is not None and record.codec == codec:
                continue
            try:
                info = backend.stat(key)
            except FileNotFoundError:
                continue
            if info.mtime >= cutoff:
                continue
            if self.dry_run:
                with self.index.transaction() as txn:
                    held = txn.get("deleting", str(digest).encode())
                    if held is not None and is_live(json.loads(held)):
                        continue
            elif not self.engine.delete_orphan(digest, codec):
                continue
            report.orphans += 1
            report.orphan_bytes += info.size
            self.progress("orphans", 1)
        self._sweep_orphan_records(report, cutoff)

    def _sweep_orphan_records(self, report: GCReport, cutoff: float) -> None:
        """Repository records in the backend that the index lacks, or a tag record that
        names another manifest than the index: a crash between the backend write and the
        index transaction of a push that was never acknowledged. The index holds what was
        acknowledged, so an orphan record goes and a tag record is written again from the
        index. Only old ones: a push in progress writes its records just before its
        transaction."""
        backend = self.engine.backend
        for key in list(backend.list(REPOSITORIES)):
            rel = key[len(REPOSITORIES):]
            entry = self._index_entry(rel)
            if entry is _NOT_A_RECORD or (entry is not None and "/_tags/" not in rel):
                continue
            try:
                if entry is not None and backend.get(key) == entry:
                    continue
                if backend.stat(key).mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if not self.dry_run and not self._put_right(key, rel, entry):
                continue
            report.orphans += 1
            self.progress("orphans", 1)

    def _put_right(self, key: str, rel: str, entry: Any) -> bool:
        """Delete the record, or write the index's value to it, unless the index changed
        since ``entry`` was read. Under the record's lock: a push holds it from its backend
        write to its index transaction, so none can land between this look and the
        change."""
        backend = self.engine.backend
        with records.locked(self.index, [key]):
            if self._index_entry(rel) != entry:
                return False
            if entry is None:
                with contextlib.suppress(NotFound):
                    backend.delete(key)
            else:
                backend.put(key, entry)
        return True

    def _index_entry(self, rel: str) -> Any:
        """The index's value for the record ``repositories/<rel>`` (None: missing)."""
        record = records.of_key(REPOSITORIES + rel)
        repo, sep, rest = rel.rpartition("/")
        with self.index.transaction() as txn:
            if record is not None:
                return txn.get(record.table, record.row)
            if sep and rest == "_repo":
                return txn.get("repos", repo.encode())
        return _NOT_A_RECORD
