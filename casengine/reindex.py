"""Rebuild the index from the backend alone (``casengine reindex``).

The layout is self-describing (see :mod:`casengine.layout`): blob keys name digest and
codec; repositories keep ``_repo``, ``_links``, ``_manifests`` and ``_tags`` records; a
manifest's references and subject are in its own bytes. So a lost or corrupted index can be
built again, into a fresh directory that then replaces the old one. Run it with the
registry stopped. A ``.zst`` blob's logical size comes from its seek table (one small
ranged read); an object whose table is unreadable is skipped, and ``casengine check``
reports it as an orphan. A link comes back even where its blob is missing, and so does the
blob in the records of the manifests that need it: ``casengine check`` then reports those
images as missing it, and a blob restored later is linked, not collected. A tag record that
names no digest is skipped and reported. Blob records come back without their xxh3 (the
next ``casengine check`` computes it); upload sessions do not come back (their staged bytes
are purged as orphans).
Quotas live only in the index: they are carried over from the old one where it can still be
read, and must be set again where it is lost. A reindex killed part way leaves its staging
directory, and, killed between moving the old index aside and the new one in, no index: the
next reindex takes the quotas from the one moved aside, and removes both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casengine.backend import Backend
from casengine.digest import Digest
from casengine.errors import CASError, NotFound
from casengine.index import BlobRecord, LmdbIndex, Txn
from casengine.index_binding import bind, is_bound, mark
from casengine.layout import BLOBS, REPOSITORIES, ZST, parse_blob_key, parse_tag_record
from casengine.leases import is_live
from casengine.registry.manifests import parse_manifest
from casengine.seekable import read_table

if TYPE_CHECKING:
    from casengine.registry import Registry

Progress = Callable[[str, int], None]


@dataclass(slots=True)
class ReindexReport:
    blobs: int = 0
    repositories: int = 0
    manifests: int = 0
    tags: int = 0
    links: int = 0
    skipped: list[str] | None = None
    quotas: int = 0  #: carried over from the old index

    def to_json(self) -> dict:
        return {"blobs": self.blobs, "repositories": self.repositories,
                "manifests": self.manifests, "tags": self.tags, "links": self.links,
                "quotas": self.quotas, "skipped": self.skipped or []}


def _old_quotas(index_path: str) -> list[tuple[bytes, bytes]]:
    """The quotas of the index being replaced, where it exists and can be read.

    A reindex killed between moving the old index aside and moving the new one in left
    the old one aside (see :func:`_moved_aside`) and nothing at ``index_path``, or only
    the new, unbound index a command made there meanwhile (and refused): then the
    quotas are those of the index moved aside."""
    aside = _moved_aside(index_path)
    found = _quotas(index_path, bound_only=bool(aside))
    for path in aside:
        if found is not None:
            break
        found = _quotas(path, bound_only=False)
    return found or []


def _quotas(path: str, *, bound_only: bool) -> list[tuple[bytes, bytes]] | None:
    """The quotas of the index at ``path``; None where there is none, or with
    ``bound_only`` where it is new (unbound: it was never used with the store)."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    try:
        old = LmdbIndex(path)
    except CASError:
        return []
    try:
        with old.transaction() as txn:
            if bound_only and not is_bound(txn):
                return None
            return list(txn.scan("quotas"))
    except CASError:
        return []  # damaged: what it held is lost with it
    finally:
        old.close()


def _siblings(index_path: str, kind: str) -> list[tuple[int, str]]:
    """(number, path) of the directories ``<index_path>.<kind>-<number>`` beside it."""
    base = index_path.rstrip("/")
    parent, name = os.path.split(base)
    try:
        entries = os.listdir(parent or ".")
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        number = entry[len(name) + len(kind) + 2:]
        if entry.startswith(f"{name}.{kind}-") and number.isdigit():
            found.append((int(number), os.path.join(parent, entry)))
    return found


def _moved_aside(index_path: str) -> list[str]:
    """Old indexes a reindex moved aside and was killed before removing, newest first."""
    return [path for _, path in sorted(_siblings(index_path, "old"), reverse=True)]


def _sweep_leftovers(index_path: str) -> None:
    """Remove what killed reindexes left beside the index: the old indexes they moved
    aside (the new one is in place now) and the staging of those no longer running."""
    for path in _moved_aside(index_path):
        shutil.rmtree(path, ignore_errors=True)
    for pid, path in _siblings(index_path, "rebuild"):
        # a staging directory names its process as a lease does (same host, as the index)
        if not is_live({"pid": pid, "host": socket.gethostname(), "since": time.time()}):
            shutil.rmtree(path, ignore_errors=True)


def _split_repo_key(key: str) -> tuple[str, str, list[str]] | None:
    """``repositories/<name>/_kind/rest`` -> (name, kind, rest parts)."""
    parts = key[len(REPOSITORIES):].split("/")
    for i, part in enumerate(parts):
        if part.startswith("_"):
            return "/".join(parts[:i]), part, parts[i + 1:]
    return None


def _staging(index_path: str) -> str:
    return f"{index_path.rstrip('/')}.rebuild-{os.getpid()}"


def rebuild(backend: Backend, index_path: str, *, progress: Progress | None = None) -> ReindexReport:
    """Build a new index at ``index_path`` (replacing what is there) from ``backend``."""
    try:
        return _rebuild(backend, index_path, progress=progress)
    except BaseException:
        # a half-built index is no use to anyone, and the next run starts afresh anyway
        shutil.rmtree(_staging(index_path), ignore_errors=True)
        raise


def _rebuild(backend: Backend, index_path: str, *, progress: Progress | None = None) -> ReindexReport:
    from casengine.engine import Engine
    from casengine.registry import Registry

    progress = progress or (lambda stage, n: None)
    quotas = _old_quotas(index_path)
    staging = _staging(index_path)
    shutil.rmtree(staging, ignore_errors=True)
    index = LmdbIndex(staging)
    engine = Engine(backend, index)
    registry = Registry(engine)
    report = ReindexReport(skipped=[])
    try:
        for key in backend.list(BLOBS):
            parsed = parse_blob_key(key)
            if parsed is None:
                report.skipped.append(key)
                continue
            digest, codec = parsed
            info = backend.stat(key)
            size = info.size  # raw: logical == stored
            if codec == ZST:  # the seek table knows the logical size
                try:
                    size = read_table(backend, key, info.size)[0].logical_size
                except CASError:
                    report.skipped.append(key)
                    continue
            index.add_blob(BlobRecord(str(digest), size, codec, info.size, "", info.mtime,
                                      info.mtime))
            report.blobs += 1
            progress("blobs", 1)
        repos: dict[str, dict[str, list]] = {}
        for key in backend.list(REPOSITORIES):
            split = _split_repo_key(key)
            if split is None:
                report.skipped.append(key)
                continue
            name, kind, rest = split
            repos.setdefault(name, {"_links": [], "_manifests": [], "_tags": [], "_repo": []})
            repos[name].setdefault(kind, []).append(rest)
        for name, records in sorted(repos.items()):
            created = time.time()
            if records["_repo"]:
                try:
                    created = json.loads(backend.get(f"{REPOSITORIES}{name}/_repo"))["created"]
                except (CASError, ValueError, KeyError):
                    pass
            with index.transaction(write=True) as txn:
                txn.put("repos", name.encode(), json.dumps({"created": created,
                                                            "logical": 0}).encode())
                for alg, hexdigest in (r for r in records["_links"] if len(r) == 2):
                    _restore_link(txn, name, f"{alg}:{hexdigest}")
                    report.links += 1
            report.repositories += 1
            manifests = [f"{r[0]}:{r[1]}" for r in records["_manifests"] if len(r) == 2]
            _restore_manifests(registry, name, manifests, report)
            for rest in records["_tags"]:
                tag = "/".join(rest)
                try:
                    digest = parse_tag_record(backend.get(f"{REPOSITORIES}{name}/_tags/{tag}"))
                except NotFound:
                    continue  # deleted since it was listed
                if digest is None:
                    report.skipped.append(f"{name}:{tag} (an unusable tag record)")
                    continue
                with index.transaction(write=True) as txn:
                    if txn.get("manifests", f"{name}\0{digest}".encode()) is not None:
                        txn.put("tags", f"{name}\0{tag}".encode(), digest.encode())
                        report.tags += 1
                    else:
                        report.skipped.append(f"{name}:{tag} -> {digest}")
            progress("repositories", 1)
        with index.transaction(write=True) as txn:
            for prefix, limit in quotas:
                txn.put("quotas", prefix, limit)
        report.quotas = len(quotas)
        bind(index)
        mark(backend, index)  # the store is used with this index from now on
    finally:
        index.close()
    # in nanoseconds: one a killed run left may be of the same second
    old = f"{index_path.rstrip('/')}.old-{time.time_ns()}"
    if os.path.exists(index_path):
        os.rename(index_path, old)
    os.rename(staging, index_path)
    _sweep_leftovers(index_path)  # ``old``, and any a killed run left
    return report


def _restore_link(txn: Txn, repo: str, digest: str) -> None:
    """The link as the backend records it, whether or not its blob is stored: a manifest
    that needs a missing blob must show as missing it (check reports the image), and a
    blob restored later must find its link, or GC would take it."""
    from casengine.registry.model import _TIME, add_link

    if txn.get("blobs", digest.encode()) is not None:
        add_link(txn, repo, digest)
    else:
        txn.put("links", f"{repo}\0{digest}".encode(), _TIME.pack(time.time()))
        txn.put("linked", f"{digest}\0{repo}".encode(), b"")


def _restore_manifests(registry: Registry, name: str, digests: list[str],
                       report: ReindexReport) -> None:
    """Record manifests children first, so an index finds its children recorded."""
    from casengine.registry.model import ManifestRecord

    parsed = {}
    for digest in digests:
        try:
            data = registry.engine.read_bytes(digest)
            parsed[digest] = parse_manifest(data, None, algorithm=Digest.parse(digest).algorithm)
        except CASError:
            report.skipped.append(f"{name}@{digest}")
    done: set[str] = set()

    def record(digest: str) -> None:
        if digest in done:
            return
        done.add(digest)
        manifest = parsed[digest]
        for child in manifest.children:
            if str(child.digest) in parsed:
                record(str(child.digest))
        with registry.index.transaction() as txn:
            refs = tuple(dict.fromkeys(
                str(d.digest) for d in (*manifest.blobs, *manifest.children)
                if txn.get("links", f"{name}\0{d.digest}".encode()) is not None))
        sizes = {digest: manifest.size}
        for d in (*manifest.blobs, *manifest.children):
            sizes.setdefault(str(d.digest), d.size)
        rec = ManifestRecord(name, digest, manifest.media_type, manifest.size, refs,
                             str(manifest.subject.digest) if manifest.subject else None,
                             manifest.artifact_type)
        with registry.index.transaction(write=True) as txn:
            registry._record_manifest(txn, rec, manifest, sizes)
        report.manifests += 1

    for digest in parsed:
        record(digest)
