"""``casengine check``: integrity verification and repair.

- **fast** (the default): every blob record has its object, of the recorded stored size,
  and the xxh3-128 of the stored bytes matches the record (a record without one, from a
  chunked upload, gets it now).
- **full**: also re-hashes the logical bytes of every blob with its own algorithm,
  manifests and configs included. A blob stored as seekable zstd is decompressed in the
  same pass over its stored bytes, and its seek table must match the record.

Both check references (every tag names a present manifest; every manifest's blobs and
children are linked and stored; every link names a stored blob; every referrer entry
matches its manifest), list orphans both ways (objects no record names, records whose
object is gone) and stale upload sessions. Each unique blob is read once, however many
repositories link it, and blobs are read in parallel. Every finding names the digest and
the ``repo:tag`` and ``repo@digest`` references it affects.

``repair`` moves corrupt or truncated objects to ``quarantine/`` (never deletes them) and
drops their records; re-indexes orphan objects whose bytes match their name and
quarantines the others; removes dangling records, tags, links and referrer entries. It
never deletes intact data. The broken images are in the report.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import xxhash

from casengine.backend import LocalPaths
from casengine.digest import Digest, Hasher
from casengine.errors import IntegrityError, NotFound
from casengine.index import BlobRecord, pack_blob, unpack_blob
from casengine.layout import (
    BLOBS,
    ZST,
    blob_key,
    link_key,
    manifest_key,
    parse_blob_key,
    repo_key,
)
from casengine.leases import is_live
from casengine.seekable import FrameDecoder, read_table

if TYPE_CHECKING:
    from casengine.registry import Registry

QUARANTINE = "quarantine/"
Progress = Callable[[str, int], None]


@dataclass(slots=True)
class Finding:
    kind: str  #: corrupt, truncated, missing-object, orphan-object, dangling-tag, ...
    digest: str | None
    detail: str
    affected: list[str] = field(default_factory=list)
    repaired: str | None = None

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
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "blobs": self.blobs, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "complete": self.complete,
                "clean": self.clean, "findings": [f.to_json() for f in self.findings]}


class _Throttle:
    """At most ``rate`` bytes per second across all reading threads."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            self._bytes += n
            ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)


class Checker:
    def __init__(self, registry: Registry, *, full: bool = False, repo: str | None = None,
                 workers: int = 2, max_rate: float | None = None, repair: bool = False,
                 deadline: float | None = None, progress: Progress | None = None,
                 upload_ttl: float | None = None, resume: bool = False) -> None:
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
        self.throttle = _Throttle(max_rate)
        self.upload_ttl = upload_ttl
        self.resume = resume
        self._refs: dict[str, list[str]] | None = None
        self._local = threading.local()
        self._state_key = f"check:{'full' if full else 'fast'}:{repo or '*'}".encode()

    # -- what a problem affects -----------------------------------------------------------

    def affected(self, digest: str) -> list[str]:
        """``repo:tag`` and ``repo@digest`` references that need ``digest``."""
        if self._refs is None:
            refs: dict[str, list[str]] = {}
            for repo in self.registry.repositories():
                manifests = {m.digest: m for m in self.registry.manifests(repo)}
                names: dict[str, set[str]] = {d: {f"{repo}@{d}"} for d in manifests}
                for tag, d in self.registry.tag_map(repo).items():
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
        with ThreadPoolExecutor(self.workers) as pool:
            pending = []
            for record in self._blob_records():
                if self.deadline is not None and time.monotonic() > self.deadline:
                    report.complete = False
                    break
                pending.append(pool.submit(self._verify, record))
                if len(pending) >= 4 * self.workers:
                    self._collect(pending.pop(0).result(), report)
            for future in pending:
                self._collect(future.result(), report)

    def _verify(self, record: BlobRecord) -> tuple[BlobRecord, str | None, str, int]:
        """(record, problem kind or None, detail, bytes read)."""
        result = self._verify_stored(record)
        if result[1] is not None:
            current = self.index.get_blob(record.digest)
            if current is not None and current.codec != record.codec:
                return self._verify_stored(current)  # compressed while we looked: check that
        return result

    def _verify_stored(self, record: BlobRecord) -> tuple[BlobRecord, str | None, str, int]:
        key = blob_key(Digest.parse(record.digest), record.codec)
        try:
            info = self.backend.stat(key)
        except NotFound:
            return record, "missing-object", f"object {key} is gone", 0
        if info.size != record.stored_size:
            kind = "truncated" if info.size < record.stored_size else "corrupt"
            detail = f"object has {info.size} bytes, the record says {record.stored_size}"
            return record, kind, detail, 0
        # without a recorded xxh3 (chunked uploads, reindex) only the digest can vouch
        verify = self.full or not record.xxh3
        hasher = Hasher(record.digest.split(":", 1)[0]) if verify else None
        try:
            xxh, n = self._scan(key, record.codec, record.stored_size, hasher)
        except IntegrityError as exc:
            return record, "corrupt", str(exc), 0
        except NotFound:
            return record, "missing-object", f"object {key} went while it was read", 0
        if record.xxh3 and xxh != record.xxh3:
            return record, "corrupt", "xxh3 of the stored bytes does not match the record", n
        if hasher is not None and str(hasher.digest()) != record.digest:
            return record, "corrupt", f"the bytes hash to {hasher.digest()}", n
        if hasher is not None and hasher.size != record.size:
            return record, "corrupt", f"{hasher.size} logical bytes, the record says {record.size}", n
        if not record.xxh3:
            self._fill_xxh3(record, xxh)
        return record, None, "", n

    def _scan(self, key: str, codec: str, stored_size: int,
              hasher: Hasher | None) -> tuple[str, int]:
        """One pass over a stored object: the xxh3 of its bytes and their count; ``hasher``
        (if any) gets the logical bytes, decompressed from a ``zst`` object on the way."""
        decoder = None
        if codec == ZST and hasher is not None:
            decoder = FrameDecoder(read_table(self.backend, key, stored_size)[0], key=key)
        xxh, n = xxhash.xxh3_128(), 0
        for chunk in self._stored_bytes(key):
            xxh.update(chunk)
            n += len(chunk)
            self.throttle(len(chunk))
            if decoder is not None:
                for frame in decoder.feed(chunk):
                    hasher.update(frame)  # type: ignore[union-attr]
            elif hasher is not None:
                hasher.update(chunk)
        if decoder is not None:
            decoder.close()
        return xxh.hexdigest(), n

    def _stored_bytes(self, key: str) -> Iterator[memoryview | bytes]:
        """The object's bytes; a local file is read into one reused buffer per thread,
        which is twice as fast here as a new bytes object per chunk."""
        if not isinstance(self.backend, LocalPaths):
            yield from self.backend.read(key, chunk_size=4 << 20)
            return
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(4 << 20)
        view = memoryview(buf)
        try:
            f = open(self.backend.local_path(key), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is gone") from exc
        with f:
            while n := f.readinto(buf):
                yield view[:n]

    def _fill_xxh3(self, record: BlobRecord, xxh3: str) -> None:
        key = record.digest.encode()
        with self.index.transaction(write=True) as txn:
            value = txn.get("blobs", key)
            if value is not None and not unpack_blob(key, value).xxh3:
                current = unpack_blob(key, value)
                txn.put("blobs", key, pack_blob(BlobRecord(
                    current.digest, current.size, current.codec, current.stored_size, xxh3,
                    current.created, current.touched)))

    def _collect(self, result: tuple[BlobRecord, str | None, str, int], report: CheckReport) -> None:
        record, kind, detail, n = result
        report.blobs += 1
        report.bytes += n
        self._after = max(self._after, record.digest)
        self.progress("blobs", n)
        if kind is None:
            return
        finding = self._find(report, kind, record.digest, detail)
        if self.repair:
            key = blob_key(Digest.parse(record.digest), record.codec)
            if kind != "missing-object":
                self._quarantine(key)
            self.index.delete_blob(record.digest)
            finding.repaired = "record dropped" + ("" if kind == "missing-object"
                                                   else ", object quarantined")

    def _quarantine(self, key: str) -> str:
        """Move ``key`` under quarantine/ (copy, then delete): never lose the bytes."""
        target = f"{QUARANTINE}{key[len(BLOBS):]}.{int(time.time())}"
        with self.backend.writer() as w:
            for chunk in self.backend.read(key, chunk_size=4 << 20):
                w.write(chunk)
            w.commit(target)
        self.backend.delete(key)
        return target

    def _check_orphans(self, report: CheckReport) -> None:
        if self.repo is not None:
            return  # orphans belong to no repository
        for key in list(self.backend.list(BLOBS)):
            parsed = parse_blob_key(key)
            if parsed is None:
                self._find(report, "unknown-object", None, f"{key} is not a blob key")
                continue
            digest, codec = parsed
            record = self.index.get_blob(str(digest))
            if record is not None and record.codec == codec:
                continue
            with self.index.transaction() as txn:
                held = txn.get("deleting", str(digest).encode())
            if held is not None and is_live(json.loads(held)):
                continue  # being deleted right now (a dead lease: a killed collector's)
            finding = self._find(report, "orphan-object", str(digest),
                                 f"object {key} has no index record")
            if self.repair:
                finding.repaired = self._adopt(key, digest, codec)

    def _adopt(self, key: str, digest: Digest, codec: str) -> str:
        """Re-index an orphan whose bytes match its name; quarantine any other."""
        hasher = Hasher(digest.algorithm)
        try:
            xxh, stored = self._scan(key, codec, self.backend.stat(key).size, hasher)
        except IntegrityError:
            return f"quarantined as {self._quarantine(key)}"
        if hasher.digest() != digest or self.index.get_blob(str(digest)) is not None:
            return f"quarantined as {self._quarantine(key)}"
        now = time.time()
        self.index.add_blob(BlobRecord(str(digest), hasher.size, codec, stored, xxh, now, now))
        return "verified and re-indexed"

    def _check_references(self, report: CheckReport) -> None:
        reg = self.registry
        for repo in list(reg.repositories()):
            if not self._selected(repo):
                continue
            manifests = {m.digest: m for m in reg.manifests(repo)}
            self._compare_records(report, repo, manifests)
            for tag, digest in reg.tag_map(repo).items():
                if digest not in manifests or not self.engine.exists(digest):
                    f = self._find(report, "dangling-tag", digest,
                                   f"tag {repo}:{tag} names a manifest that is not stored")
                    f.affected = sorted({*f.affected, f"{repo}:{tag}"})
                    if self.repair:
                        reg.delete_tag(repo, tag)
                        f.repaired = "tag removed"
            for m in manifests.values():
                for ref in (m.digest, *m.refs):
                    if not self.engine.exists(ref) or not reg.is_linked(repo, ref):
                        f = self._find(report, "missing-blob", ref,
                                        f"{repo}@{m.digest} needs {ref}, which is not stored "
                                        "or not linked")
                        f.affected = sorted({*f.affected, f"{repo}@{m.digest}"})
            with self.index.transaction() as txn:
                links = [k.split(b"\0", 1)[1].decode()
                         for k, _ in txn.scan("links", f"{repo}\0".encode())]
            needed = {r for m in manifests.values() for r in (m.digest, *m.refs)}
            for digest in links:
                if self.engine.exists(digest):
                    continue
                if digest in needed:
                    # the link stays: without it GC would take the bytes once restored
                    self._find(report, "dangling-link", digest,
                               f"{repo} links {digest}, which is not stored and a manifest "
                               "needs: restore the blob (e.g. from a backup), then run "
                               "check --repair")
                    continue
                f = self._find(report, "dangling-link", digest,
                               f"{repo} links {digest}, which is not stored")
                if self.repair:
                    reg.unlink(repo, digest)
                    f.repaired = "link removed"
            with self.index.transaction() as txn:
                entries = [(k, v) for k, v in txn.scan("referrers", f"{repo}\0".encode())]
            for k, _ in entries:
                _, subject, digest = k.decode().split("\0")
                m = manifests.get(digest)
                if m is None or m.subject != subject:
                    f = self._find(report, "bad-referrer", digest,
                                   f"referrer entry {repo}: {digest} -> {subject} has no "
                                   "matching manifest")
                    if self.repair:
                        with self.index.transaction(write=True) as txn:
                            txn.delete("referrers", k)
                        f.repaired = "entry removed"

    def _compare_records(self, report: CheckReport, repo: str, manifests: dict[str, Any]) -> None:
        """The backend's records of ``repo`` (what reindex would rebuild) against the index.

        Writes reach the backend first, so where the two disagree the backend holds the
        later truth: repair brings the index to it (or, for a record the backend lost,
        writes the record again from the index).
        """
        reg = self.registry
        prefix = repo_key(repo, "_tags/")
        stored = {}
        for key in self.backend.list(prefix):
            try:
                stored[key[len(prefix):]] = self.backend.get(key).decode().strip()
            except NotFound:
                continue
        indexed = reg.tag_map(repo)
        for tag in sorted(set(stored) | set(indexed)):
            here, there = indexed.get(tag), stored.get(tag)
            if here == there:
                continue
            if here is None:
                detail = f"tag {repo}:{tag} is in the backend ({there}) but not in the index"
            elif there is None:
                detail = f"tag {repo}:{tag} is in the index ({here}) but not in the backend"
            else:
                detail = f"tag {repo}:{tag} is {here} in the index but {there} in the backend"
            f = self._find(report, "tag-record", here or there, detail)
            f.affected = sorted({*f.affected, f"{repo}:{tag}"})
            if self.repair:
                f.repaired = self._repair_tag(repo, tag, there, manifests)
        for kind, key_of, present in (
                ("link-record", link_key, lambda d: reg.is_linked(repo, d)),
                ("manifest-record", manifest_key, lambda d: d in manifests)):
            table_prefix = repo_key(repo, "_links/" if kind == "link-record" else "_manifests/")
            in_backend = {"{}:{}".format(*k[len(table_prefix):].split("/", 1))
                          for k in self.backend.list(table_prefix) if "/" in k[len(table_prefix):]}
            with self.index.transaction() as txn:
                table = "links" if kind == "link-record" else "manifests"
                in_index = {k.split(b"\0", 1)[1].decode()
                            for k, _ in txn.scan(table, f"{repo}\0".encode())}
            for digest in sorted(in_index - in_backend):
                f = self._find(report, kind, digest,
                               f"{repo}: {digest} is in the index but has no backend record")
                if self.repair and present(digest):
                    self.backend.put(key_of(repo, Digest.parse(digest)), b"")
                    f.repaired = "backend record written"
            for digest in sorted(in_backend - in_index):
                self._find(report, kind, digest, f"{repo}: the backend records {digest}, the "
                           "index does not (casengine reindex restores it)")

    def _repair_tag(self, repo: str, tag: str, there: str | None,
                    manifests: dict[str, Any]) -> str:
        if there is None:  # the backend lost it: write it again from the index
            digest = self.registry.tag_map(repo)[tag]
            self.backend.put(repo_key(repo, "_tags", tag), digest.encode())
            return "backend record written"
        if there not in manifests:
            return "left: the backend's manifest is not in the index (run reindex)"
        with self.index.transaction(write=True) as txn:
            txn.put("tags", f"{repo}\0{tag}".encode(), there.encode())
        return "index updated from the backend"

    def _check_uploads(self, report: CheckReport) -> None:
        ttl = self.upload_ttl if self.upload_ttl is not None else self.engine.uploads.ttl
        cutoff = time.time() - ttl
        for status in self.engine.uploads.list():
            if status.updated < cutoff:
                f = self._find(report, "stale-upload", None,
                               f"upload {status.id} to {status.repository} idle since "
                               f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(status.updated))}")
                if self.repair:
                    self.engine.uploads.cancel(status.id)
                    f.repaired = "session purged"
