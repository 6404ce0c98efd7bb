"""``casengine check``: integrity verification and repair.

- **fast** (the default): every blob record has its object, of the recorded stored size,
  and the xxh3-128 of the stored bytes matches the record (a record without one, from a
  chunked upload, gets it now).
- **full**: also re-hashes the logical bytes of every blob with its own algorithm,
  manifests and configs included. A blob stored as seekable zstd is decompressed in the
  same pass over its stored bytes, and its seek table must match the record.

An object whose size or xxh3 disagrees with its record is judged by its digest before it
is called damaged (see :mod:`casengine.verify`).

Both check references (every tag names a present manifest; every manifest's blobs and
children are linked and stored; every link names a stored blob; every referrer entry
matches its manifest), list orphans both ways (objects no record names, records whose
object is gone) and stale upload sessions. A repository's index rows are read in one
transaction, after its backend records, so that a push landing meanwhile is never taken
for damage. Each unique blob is read once, however many repositories link it, and blobs
are read in parallel. Every finding names the digest and the ``repo:tag`` and
``repo@digest`` references it affects.

``repair`` (see :mod:`casengine.repair`) moves corrupt or truncated objects to
``quarantine/`` (never deletes them) and drops their records; rewrites records that their
verified objects contradict; re-indexes orphan objects whose bytes match their name and
quarantines the others; removes dangling records, tags, links and referrer entries, but
keeps what a manifest needs, so that restored bytes bring the image back. It never deletes
intact data, and is safe while the registry serves. The broken images are in the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from casengine.digest import Digest
from casengine.errors import NotFound
from casengine.gc import ORPHAN_MIN_AGE
from casengine.index import BlobRecord, unpack_blob
from casengine.layout import (
    BLOBS,
    link_key,
    manifest_key,
    parse_blob_key,
    parse_tag_record,
    repo_key,
)
from casengine.leases import is_live
from casengine.registry import records
from casengine.repair import QUARANTINE, Left, Repairer
from casengine.verify import Stopped, Verdict, Verifier

if TYPE_CHECKING:
    from casengine.registry import Registry

__all__ = ["QUARANTINE", "CheckReport", "Checker", "Finding", "Verdict"]

#: Seconds an object found unrecorded is given to be recorded before it is judged an
#: orphan: a publish's record follows its object by one index transaction.
IN_FLIGHT_SETTLE = 1.0

Progress = Callable[[str, int], None]


@dataclass(slots=True)
class Finding:
    kind: str  #: corrupt, truncated, missing-object, orphan-object, dangling-tag, ...
    digest: str | None
    detail: str
    affected: list[str] = field(default_factory=list)
    repaired: str | None = None  #: what repair did; None: nothing (the detail says why)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "digest": self.digest, "detail": self.detail,
                "affected": self.affected, "repaired": self.repaired}


@dataclass(slots=True)
class CheckReport:
    mode: str
    blobs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = True  #: False when a time limit stopped it early
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        # a check that stopped early has not seen everything: it cannot vouch for the store
        return self.complete and not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "blobs": self.blobs, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "complete": self.complete,
                "clean": self.clean, "findings": [f.to_json() for f in self.findings]}


@dataclass(slots=True)
class _Snapshot:
    """A repository's index rows, read in one transaction."""

    manifests: dict[str, tuple[tuple[str, ...], str | None]]  #: digest -> (refs, subject)
    tags: dict[str, str]
    links: set[str]
    stored: set[str]  #: digests of the above with a blob record
    referrers: list[tuple[str, str]]  #: (subject, referrer digest)


@dataclass(slots=True)
class _Records:
    """A repository's records in the backend."""

    tags: dict[str, bytes]
    links: set[str]
    manifests: set[str]


class Checker:
    def __init__(self, registry: Registry, *, full: bool = False, repo: str | None = None,
                 workers: int = 2, max_rate: float | None = None, repair: bool = False,
                 deadline: float | None = None, progress: Progress | None = None,
                 upload_ttl: float | None = None, resume: bool = False,
                 orphan_min_age: float = ORPHAN_MIN_AGE) -> None:
        self.registry = registry
        self.engine = registry.engine
        self.index = registry.index
        self.backend = registry.backend
        self.full = full
        self.repo = repo
        self.workers = workers
        self.repair = repair
        self.deadline = deadline
        self.progress = progress or (lambda stage, n: None)
        self.upload_ttl = upload_ttl
        self.resume = resume
        #: an unrecorded object younger than this is never quarantined (see repair)
        self.orphan_min_age = orphan_min_age
        self.verifier = Verifier(self.backend, self.index, full=full, max_rate=max_rate,
                                 deadline=deadline)
        self.fixer = Repairer(self)
        self._refs: dict[str, list[str]] | None = None
        self._state_key = f"check:{'full' if full else 'fast'}:{repo or '*'}".encode()

    # -- what a problem affects -----------------------------------------------------------

    def affected(self, digest: str) -> list[str]:
        """``repo:tag`` and ``repo@digest`` references that need ``digest``."""
        if self._refs is None:
            refs: dict[str, list[str]] = {}
            for repo in self.registry.repositories():
                try:
                    manifests = {m.digest: m for m in self.registry.manifests(repo)}
                    tag_map = self.registry.tag_map(repo)
                except NotFound:
                    continue  # deleted meanwhile
                names: dict[str, set[str]] = {d: {f"{repo}@{d}"} for d in manifests}
                for tag, d in tag_map.items():
                    names.setdefault(d, set()).add(f"{repo}:{tag}")
                # an image inside an index is also needed by the index and its tags
                changed = True
                while changed:
                    changed = False
                    for m in manifests.values():
                        for child in m.refs:
                            if child in manifests and not names[m.digest] <= names[child]:
                                names[child] |= names[m.digest]
                                changed = True
                for m in manifests.values():
                    for ref in (m.digest, *m.refs):
                        refs.setdefault(ref, []).extend(names[m.digest])
            self._refs = refs
        return sorted(set(self._refs.get(digest, [])))

    def _find(self, report: CheckReport, kind: str, digest: str | None, detail: str) -> Finding:
        finding = Finding(kind, digest, detail, self.affected(digest) if digest else [])
        report.findings.append(finding)
        return finding

    def _act(self, finding: Finding, repair: Callable[..., str], *args: Any) -> None:
        """Run one repair of ``finding`` (only with ``repair``); what it could not do
        stays unrepaired, and the detail says why."""
        if not self.repair:
            return
        try:
            finding.repaired = repair(*args)
        except Left as exc:
            finding.detail += f"; left: {exc}"

    def _selected(self, repo: str) -> bool:
        return self.repo is None or fnmatchcase(repo, self.repo)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> CheckReport:
        """Check; an interrupted or time-limited run saves where it stopped and what it
        found, and ``resume=True`` goes on from there."""
        if self.repo is not None and not any(map(self._selected, self.registry.repositories())):
            # a mistyped pattern must not pass for a clean bill of health
            raise NotFound(f"no repository matches {self.repo!r}")
        report = CheckReport("full" if self.full else "fast")
        started = time.perf_counter()
        self._after = ""
        if self.resume:
            saved = self._load_state()
            if saved:
                self._after = saved["after"]
                report.findings = [Finding(**f) for f in saved["findings"]]
                report.blobs, report.bytes = saved["blobs"], saved["bytes"]
        try:
            self._check_blobs(report)
        except BaseException:
            self._save_state(report)
            raise
        if not report.complete:
            self._save_state(report)
        else:
            # orphans first: one that repair re-indexes is no missing blob to the references
            self._check_orphans(report)
            self._check_references(report)
            self._check_uploads(report)
            self._clear_state()
        report.seconds = time.perf_counter() - started
        return report

    def _load_state(self) -> dict[str, Any] | None:
        with self.index.transaction() as txn:
            value = txn.get("locks", self._state_key)
        return None if value is None else json.loads(value)

    def _save_state(self, report: CheckReport) -> None:
        state = {"after": self._after, "blobs": report.blobs, "bytes": report.bytes,
                 "findings": [f.to_json() for f in report.findings]}
        with self.index.transaction(write=True) as txn:
            txn.put("locks", self._state_key, json.dumps(state).encode())

    def _clear_state(self) -> None:
        with self.index.transaction(write=True) as txn:
            txn.delete("locks", self._state_key)

    def _blob_records(self) -> Iterator[BlobRecord]:
        if self.repo is None:
            for record in self.index.iter_blobs(self._after):
                if record.digest != self._after:
                    yield record
            return
        wanted: set[str] = set()
        for repo in self.registry.repositories():
            if self._selected(repo):
                with self.index.transaction() as txn:
                    wanted |= {k.split(b"\0", 1)[1].decode()
                               for k, _ in txn.scan("links", f"{repo}\0".encode())}
        for digest in sorted(d for d in wanted if d > self._after):
            record = self.index.get_blob(digest)
            if record is not None:
                yield record

    def _check_blobs(self, report: CheckReport) -> None:
        cut: list[Stopped] = []  # blobs the time ran out in, unjudged
        with ThreadPoolExecutor(self.workers) as pool:
            pending: list[Future[Verdict]] = []
            for record in self._blob_records():
                if self.deadline is not None and time.monotonic() > self.deadline:
                    report.complete = False
                    break
                pending.append(pool.submit(self.verifier.verify, record))
                if len(pending) >= 4 * self.workers:
                    self._take(pending.pop(0), report, cut)
            for future in pending:
                self._take(future, report, cut)

    def _take(self, future: Future[Verdict], report: CheckReport, cut: list[Stopped]) -> None:
        try:
            verdict = future.result()
        except Stopped as stopped:  # the time ran out inside it: a resumed run starts here
            report.complete = False
            cut.append(stopped)
            return
        self._collect(verdict, report, advance=not cut)

    def _collect(self, verdict: Verdict, report: CheckReport, *, advance: bool = True) -> None:
        record = verdict.record
        report.blobs += 1
        report.bytes += verdict.read
        if advance:  # in digest order: past a blob cut off, a resumed run must redo it
            self._after = max(self._after, record.digest)
        self.progress("blobs", verdict.read)
        if verdict.kind is None:
            return
        finding = self._find(report, verdict.kind, record.digest, verdict.detail)
        self._act(finding, self.fixer.blob, verdict)

    # -- orphans --------------------------------------------------------------------------

    def _recorded_as(self, digest: Digest, codec: str) -> bool:
        """Whether a record names this object, or a delete of it is under way."""
        name = str(digest).encode()
        with self.index.transaction() as txn:
            value = txn.get("blobs", name)
            held = txn.get("deleting", name)
        if value is not None and unpack_blob(name, value).codec == codec:
            return True
        # a dead lease is what a killed collector left: its object is an orphan
        return held is not None and is_live(json.loads(held))

    def _check_orphans(self, report: CheckReport) -> None:
        """Objects no record names, judged :data:`IN_FLIGHT_SETTLE` after they were seen:
        a publish puts its object before its record, so while the registry serves, one in
        flight is seen unrecorded for a moment, and is no orphan."""
        if self.repo is not None:
            return  # orphans belong to no repository
        keys = []
        for key in list(self.backend.list(BLOBS)):
            parsed = parse_blob_key(key)
            if parsed is None or not self._recorded_as(*parsed):
                keys.append(key)
        if any(parse_blob_key(key) is not None for key in keys):
            time.sleep(IN_FLIGHT_SETTLE)
        for key in keys:
            parsed = parse_blob_key(key)
            if parsed is None:
                self._find(report, "unknown-object", None, f"{key} is not a blob key")
                continue
            digest, codec = parsed
            if self._recorded_as(digest, codec):
                continue  # its publish recorded it meanwhile
            try:
                info = self.backend.stat(key)
            except NotFound:
                continue  # deleted meanwhile
            if self._recorded_as(digest, codec):
                continue
            finding = self._find(report, "orphan-object", str(digest),
                                 f"object {key} has no index record")
            self._act(finding, self.fixer.orphan, key, digest, codec, info)

    # -- references -----------------------------------------------------------------------

    def _check_references(self, report: CheckReport) -> None:
        for repo in list(self.registry.repositories()):
            if not self._selected(repo):
                continue
            # the backend first: a push writes there before its index transaction, so what
            # it pushes meanwhile is seen in the index, if anywhere
            records = self._backend_records(repo)
            snap = self._snapshot(repo)
            if snap is None:
                continue  # deleted meanwhile
            self._compare_records(report, repo, records, snap)
            self._check_tags(report, repo, snap)
            self._check_manifests(report, repo, snap)
            self._check_links(report, repo, snap, records)
            for subject, digest in snap.referrers:
                m = snap.manifests.get(digest)
                if m is None or m[1] != subject:
                    f = self._find(report, "bad-referrer", digest,
                                   f"referrer entry {repo}: {digest} -> {subject} has no "
                                   "matching manifest")
                    self._act(f, self.fixer.drop_referrer, repo, subject, digest)

    def _snapshot(self, repo: str) -> _Snapshot | None:
        prefix = f"{repo}\0".encode()

        def rows(txn: Any, table: str) -> Iterator[tuple[str, bytes]]:
            for k, v in txn.scan(table, prefix):
                yield k[len(prefix):].decode(errors="replace"), v

        with self.index.transaction() as txn:
            if txn.get("repos", repo.encode()) is None:
                return None
            manifests = {}
            for digest, value in rows(txn, "manifests"):
                record = json.loads(value)
                manifests[digest] = (tuple(record["refs"]), record.get("subject"))
            tags = {tag: v.decode(errors="replace") for tag, v in rows(txn, "tags")}
            links = {digest for digest, _ in rows(txn, "links")}
            referrers = [tuple(k.split("\0", 1)) for k, _ in rows(txn, "referrers")]
            wanted = links | set(tags.values()) | {
                r for d, (refs, _) in manifests.items() for r in (d, *refs)}
            stored = {d for d in wanted if txn.get("blobs", d.encode()) is not None}
        return _Snapshot(manifests, tags, links, stored, referrers)  # type: ignore[arg-type]

    def _check_tags(self, report: CheckReport, repo: str, snap: _Snapshot) -> None:
        for tag, digest in sorted(snap.tags.items()):
            if digest in snap.manifests and digest in snap.stored:
                continue
            if digest in snap.manifests:
                # its record and link stay for a restore of the bytes: so does the tag,
                # or the restored manifest would come back without its name
                f = self._find(report, "dangling-tag", digest,
                               f"tag {repo}:{tag} names a manifest whose bytes are not "
                               "stored: the tag stays, so restoring them (e.g. from a "
                               "backup) brings the image back")
            else:
                f = self._find(report, "dangling-tag", digest,
                               f"tag {repo}:{tag} names a manifest that is not stored")
                self._act(f, self.fixer.drop_tag, repo, tag, digest)
            f.affected = sorted({*f.affected, f"{repo}:{tag}"})

    def _check_manifests(self, report: CheckReport, repo: str, snap: _Snapshot) -> None:
        for digest, (refs, _) in snap.manifests.items():
            for ref in (digest, *refs):
                if ref not in snap.stored or ref not in snap.links:
                    f = self._find(report, "missing-blob", ref,
                                   f"{repo}@{digest} needs {ref}, which is not stored "
                                   "or not linked")
                    f.affected = sorted({*f.affected, f"{repo}@{digest}"})

    def _check_links(self, report: CheckReport, repo: str, snap: _Snapshot,
                     records: _Records) -> None:
        # a manifest only the backend records (reindex could not read its bytes) needs its
        # own link too: restored, its bytes must not be collected before a reindex
        needed = records.manifests | {
            r for d, (refs, _) in snap.manifests.items() for r in (d, *refs)}
        for digest in sorted(snap.links - snap.stored):
            if digest in needed:
                # the link stays: without it GC would take the bytes once restored
                self._find(report, "dangling-link", digest,
                           f"{repo} links {digest}, which is not stored and a manifest "
                           "needs: restore the blob (e.g. from a backup), then run "
                           "check --repair")
                continue
            f = self._find(report, "dangling-link", digest,
                           f"{repo} links {digest}, which is not stored")
            self._act(f, self.fixer.unlink, repo, digest)

    def _backend_records(self, repo: str) -> _Records:
        tags: dict[str, bytes] = {}
        prefix = repo_key(repo, "_tags/")
        for key in self.backend.list(prefix):
            try:
                tags[key[len(prefix):]] = self.backend.get(key)
            except NotFound:
                continue
        found = []
        for part in ("_links/", "_manifests/"):
            table_prefix = repo_key(repo, part)
            found.append({"{}:{}".format(*k[len(table_prefix):].split("/", 1))
                          for k in self.backend.list(table_prefix)
                          if "/" in k[len(table_prefix):]})
        return _Records(tags, *found)

    def _compare_records(self, report: CheckReport, repo: str, records: _Records,
                         snap: _Snapshot) -> None:
        """The backend's records of ``repo`` (what reindex would rebuild) against the index.

        The index transaction is a push's acknowledgement, so the index holds what was
        acknowledged: where the two disagree, repair makes the backend say what the index
        says (as garbage collection's orphan pass does); a record the index lacks is left
        to that pass, which removes it once it is old.
        """
        for tag in sorted(set(records.tags) | set(snap.tags)):
            here, raw = snap.tags.get(tag), records.tags.get(tag)
            there = parse_tag_record(raw) if raw is not None else None
            if raw is not None and here == there:
                continue
            if not self._still_differ(repo, tag):
                continue  # a push or delete was between our two reads
            if raw is not None and there is None:
                detail = (f"the backend's record of tag {repo}:{tag} is unusable "
                          f"({len(raw)} bytes that name no digest)")
                detail += f"; the index says {here}" if here else ""
            elif here is None:
                detail = f"tag {repo}:{tag} is in the backend ({there}) but not in the index"
            elif raw is None:
                detail = f"tag {repo}:{tag} is in the index ({here}) but not in the backend"
            else:
                detail = f"tag {repo}:{tag} is {here} in the index but {there} in the backend"
            f = self._find(report, "tag-record", here or there, detail)
            f.affected = sorted({*f.affected, f"{repo}:{tag}"})
            self._act(f, self.fixer.tag_record, repo, tag, raw)
        for kind, table, key_of, in_backend in (
                ("link-record", "links", link_key, records.links),
                ("manifest-record", "manifests", manifest_key, records.manifests)):
            in_index = snap.links if table == "links" else set(snap.manifests)
            for digest in sorted(in_index - in_backend):
                key = key_of(repo, Digest.parse(digest))
                with self.index.transaction() as txn:
                    gone = txn.get(table, f"{repo}\0{digest}".encode()) is None
                if gone or self.backend.exists(key):
                    continue  # deleted, or pushed, between our two reads
                f = self._find(report, kind, digest,
                               f"{repo}: {digest} is in the index but has no backend record")
                self._act(f, self.fixer.write_record, key, table, f"{repo}\0{digest}".encode())
            table_prefix = repo_key(repo, "_links/" if table == "links" else "_manifests/")
            for digest in sorted(in_backend - in_index):
                key = table_prefix + digest.replace(":", "/", 1)
                if not self._unacknowledged(key, table, f"{repo}\0{digest}".encode()):
                    continue  # its push recorded it, or took it back, while we looked
                self._find(report, kind, digest, f"{repo}: the backend records {digest}, the "
                           "index does not: left by a push never acknowledged (gc --orphans "
                           "removes it once old), or lost by the index (casengine reindex "
                           "restores it)")

    def _unacknowledged(self, key: str, table: str, row: bytes) -> bool:
        """Whether the backend record ``key`` still lacks its index row once no writer
        holds it: a push holds its records' locks from its backend write to its index
        transaction, so one in flight finishes (or takes its records back) first."""
        with records.locked(self.index, [key]):
            with self.index.transaction() as txn:
                if txn.get(table, row) is not None:
                    return False
            return self.backend.exists(key)

    def _still_differ(self, repo: str, tag: str) -> bool:
        """Whether backend and index still disagree on ``repo:tag``, read again once no
        push or delete of the tag is between its backend call and its index transaction."""
        key = repo_key(repo, "_tags", tag)
        with records.locked(self.index, [key]):
            try:
                raw = self.backend.get(key)
            except NotFound:
                raw = None
            with self.index.transaction() as txn:
                value = txn.get("tags", f"{repo}\0{tag}".encode())
        here = None if value is None else value.decode(errors="replace")
        return raw is None and here is not None or raw is not None and (
            parse_tag_record(raw) is None or parse_tag_record(raw) != here)

    def _check_uploads(self, report: CheckReport) -> None:
        ttl = self.upload_ttl if self.upload_ttl is not None else self.engine.uploads.ttl
        cutoff = time.time() - ttl
        for status in self.engine.uploads.list():
            if status.updated < cutoff:
                f = self._find(report, "stale-upload", None,
                               f"upload {status.id} to {status.repository} idle since "
                               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(status.updated))}")
                self._act(f, self._purge_upload, status.id)

    def _purge_upload(self, upload_id: str) -> str:
        self.engine.uploads.cancel(upload_id)
        return "session purged"
