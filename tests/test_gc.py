"""casengine.gc: reachability, the grace window, dry runs, uploads, orphans, interruption,
the lock, the two races of issue 7 made deterministic (and the ones found beside them), the
CLI and ``serve --gc-interval``; on memory:// and a local root where it is cheap.

Every race test pins one interleaving with hooks (a gate in the backend's delete, a paused
collector, a slow source) and then audits the whole registry with
:func:`tests.gc_helpers.audit_registry`: whatever was acknowledged must read back by digest.
The bounded multi-process soak is in ``test_gc_soak.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import casengine.engine as engine_module
from casengine import gc
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import (
    BackendError,
    Conflict,
    ManifestBlobUnknown,
    ManifestNotFound,
    UploadNotFound,
)
from casengine.gc import Collector, GCReport
from casengine.layout import UPLOADS, blob_key, upload_key
from casengine.leases import new_lease
from casengine.registry import Registry, records
from tests.gc_helpers import (
    assert_sound,
    backdate,
    blob_objects,
    garbage_left,
    sha256_of,
    start_serve,
    verify_image,
)
from tests.helpers import KINDS, digest_of, open_engine, run_cli
from tests.registry_helpers import (
    Blob,
    Manifest,
    backend_records,
    config,
    index,
    index_records,
    layer,
    oci_manifest,
    push,
    push_blobs,
    simple_image,
    snapshot,
)

SIG = "application/vnd.example.signature"


@pytest.fixture(params=KINDS)
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    engine = open_engine(request.param, tmp_path)
    yield Registry(engine)
    engine.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Registry]:
    engine = open_engine("local", tmp_path)
    yield Registry(engine)
    engine.close()


@pytest.fixture
def mem(tmp_path: Path) -> Iterator[Registry]:
    engine = open_engine("memory", tmp_path)
    yield Registry(engine)
    engine.close()


def run(reg: Registry, **kw: Any) -> GCReport:
    kw.setdefault("grace", 0)
    return Collector(reg, **kw).run()


def run_until_done(reg: Registry, **kw: Any) -> int:
    """Collect until a run reclaims nothing; return how many runs reclaimed something."""
    for n in range(5):
        r = run(reg, **kw)
        if not (r.manifests or r.links or r.blobs):
            return n
    raise AssertionError("five runs still reclaim something")


def stored(reg: Registry, *items: Blob | Manifest) -> list[bool]:
    return [reg.engine.exists(i.digest) for i in items]


def manifest_digests(reg: Registry, repo: str) -> set[str]:
    return {r.digest for r in reg.manifests(repo)}


class Gate:
    """Blocks whoever calls it until :meth:`release`; :meth:`wait` until someone did."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> None:
        self.reached.set()
        assert self.released.wait(20), "the gate was never released"

    def wait(self) -> None:
        assert self.reached.wait(20), "nobody reached the gate"

    def release(self) -> None:
        self.released.set()


class Background(threading.Thread):
    """``fn()`` on a thread; :meth:`outcome` joins and returns its result or raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to outcome()
            self.error = exc

    def outcome(self) -> Any:
        self.join(30)
        assert not self.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def gc_in_thread(reg: Registry, **kw: Any) -> GCReport:
    """A whole collection on another thread, waited for (for use inside hooks)."""
    return Background(lambda: run(reg, **kw)).outcome()


# -- reachability -----------------------------------------------------------------------------


def test_tagged_index_keeps_all_its_children(reg: Registry) -> None:
    base = layer("base", 300)
    amd, arm = simple_image("amd", base=base), simple_image("arm", base=base)
    inner = index([amd, arm])
    extra = simple_image("riscv", base=base)
    outer = index([inner, extra])  # an index of an index: children at two levels
    push(reg, "app", outer, "multi")
    loose = simple_image("loose")
    push(reg, "app", loose)  # untagged and no one's child

    report = run(reg, untagged=True)

    assert report.manifests == 1
    assert manifest_digests(reg, "app") == {outer.digest, inner.digest, amd.digest, arm.digest,
                                            extra.digest}
    assert verify_image(reg, "app", "multi", outer.digest) == []
    assert stored(reg, *loose.blobs[1:]) == [False]  # its own layer went with it
    assert garbage_left(reg, untagged=True) == []
    assert_sound(reg)


def test_untagged_index_child_survives_while_its_index_is_kept(reg: Registry) -> None:
    base = layer("base", 300)
    child = simple_image("child", base=base)
    idx = index([child])
    push(reg, "app", idx)  # all by digest: untagged

    run(reg)  # the default policy keeps untagged manifests, so both stay
    assert manifest_digests(reg, "app") == {idx.digest, child.digest}

    reg.put_manifest("app", "v1", idx.content, idx.media_type)  # now the index is tagged
    run(reg, untagged=True)
    assert manifest_digests(reg, "app") == {idx.digest, child.digest}
    assert verify_image(reg, "app", "v1", idx.digest) == []

    successor = simple_image("next", base=base)
    push(reg, "app", successor, "v1")  # the index is no longer kept: nor is its child
    run_until_done(reg, untagged=True)
    assert manifest_digests(reg, "app") == {successor.digest}
    assert stored(reg, idx, child, child.blobs[0], child.blobs[2], base) == \
        [False, False, False, False, True]
    assert garbage_left(reg, untagged=True) == []
    assert_sound(reg)


def test_deleting_a_subject_releases_its_referrers(reg: Registry) -> None:
    subject = simple_image("subject")
    sig = oci_manifest(config("sig"), [layer("sig")], subject=subject, artifact_type=SIG)
    sig_of_sig = oci_manifest(config("sig2"), [layer("sig2")], subject=sig, artifact_type=SIG)
    push(reg, "app", subject, "v1")
    push(reg, "app", sig)
    push(reg, "app", sig_of_sig)

    run(reg, untagged=True)  # referrers follow their subject, transitively
    assert manifest_digests(reg, "app") == {subject.digest, sig.digest, sig_of_sig.digest}

    reg.delete_manifest("app", subject.digest)
    run(reg)  # by default untagged manifests (referrers too) are kept
    assert manifest_digests(reg, "app") == {sig.digest, sig_of_sig.digest}

    run_until_done(reg, untagged=True)
    assert manifest_digests(reg, "app") == set()
    assert reg.referrers("app", subject.digest) == []
    assert stored(reg, sig, sig_of_sig, *sig.blobs, *sig_of_sig.blobs, *subject.blobs) == \
        [False] * 8
    assert reg.engine.index.count_blobs() == 0
    assert_sound(reg)


def test_retagging_releases_the_old_manifest_only_with_untagged(reg: Registry) -> None:
    base = layer("base", 500)
    old, new = simple_image("old", base=base), simple_image("new", base=base)
    push(reg, "app", old, "latest")
    push(reg, "app", new, "latest")

    run(reg)
    assert manifest_digests(reg, "app") == {old.digest, new.digest}
    assert verify_image(reg, "app", old.digest, old.digest) == []

    run(reg, untagged=True, grace=3600)  # the old one was pushed just now: grace keeps it
    assert manifest_digests(reg, "app") == {old.digest, new.digest}

    backdate(reg, 7200)
    report = run(reg, untagged=True, grace=3600)
    assert (report.manifests, report.blobs) == (1, 3)  # the manifest, its config and layer
    assert manifest_digests(reg, "app") == {new.digest}
    assert stored(reg, old, *old.blobs) == [False, False, True, False]  # base is shared
    assert verify_image(reg, "app", "latest", new.digest) == []
    assert_sound(reg)


def test_default_policy_keeps_untagged_manifests(reg: Registry) -> None:
    by_digest, untagged_later = simple_image("a"), simple_image("b")
    push(reg, "app", by_digest)
    push(reg, "app", untagged_later, "v1")
    reg.delete_tag("app", "v1")

    report = run(reg)
    assert (report.manifests, report.links, report.blobs) == (0, 0, 0)
    for m in (by_digest, untagged_later):
        assert verify_image(reg, "app", m.digest, m.digest) == []
    assert garbage_left(reg) == []
    assert_sound(reg)


def _ordered(make: Callable[[int], tuple[Manifest, Manifest]]) -> tuple[Manifest, Manifest]:
    """The first (parent, dependent) pair whose dependent sorts first: the sweep visits
    manifests in digest order, so it meets the dependent while its parent still exists."""
    for i in range(64):
        parent, dependent = make(i)
        if dependent.digest < parent.digest:
            return parent, dependent
    raise AssertionError("no such pair")


def test_one_untagged_run_collects_an_index_with_its_child_and_a_subject_with_its_referrer(
        mem: Registry) -> None:
    def index_pair(i: int) -> tuple[Manifest, Manifest]:
        child = simple_image(f"c{i}")
        return index([child]), child

    def referrer_pair(i: int) -> tuple[Manifest, Manifest]:
        subject = simple_image(f"s{i}")
        return subject, oci_manifest(config(f"r{i}"), [layer(f"r{i}")], subject=subject)

    idx, _ = _ordered(index_pair)
    subject, referrer = _ordered(referrer_pair)
    push(mem, "app", idx)
    push(mem, "app", subject)
    push(mem, "app", referrer)

    report = run(mem, untagged=True)

    assert report.manifests == 4
    assert manifest_digests(mem, "app") == set()


# -- the grace window -----------------------------------------------------------------------------


def test_grace_protects_a_fresh_unreferenced_blob(reg: Registry) -> None:
    x = layer("fresh")
    reg.engine.ingest(x.content)  # stored, linked nowhere: only the grace window keeps it

    assert run(reg, grace=3600).blobs == 0
    assert stored(reg, x) == [True]

    backdate(reg, 7200)
    report = run(reg, grace=3600)
    assert (report.blobs, report.bytes) == (1, x.size)
    assert stored(reg, x) == [False]
    assert blob_objects(reg) == set()


def test_grace_protects_a_fresh_link(reg: Registry) -> None:
    x = layer("linked")
    reg.ingest_blob("app", x.content, digest=x.digest)
    backdate(reg, 7200)
    reg.link("app", x.digest)  # a fresh link to an old blob: a push in progress

    report = run(reg, grace=3600)
    assert (report.links, report.blobs) == (0, 0)
    assert reg.is_linked("app", x.digest)

    backdate(reg, 7200)
    report = run(reg, grace=3600)
    assert (report.links, report.blobs) == (1, 1)
    assert not reg.is_linked("app", x.digest)
    assert stored(reg, x) == [False]


def test_dead_links_are_removed_and_the_blob_then_collected(reg: Registry) -> None:
    x = layer("shared", 700)
    m = oci_manifest(config("c"), [x])
    reg.ingest_blob("one", x.content, digest=x.digest)  # pushed, never referenced
    push(reg, "two", m, "v1")

    report = run(reg)
    assert report.links == 1 and report.blobs == 0  # linked and referenced in "two"
    assert report.repositories["one"].links == 1
    assert report.repositories["one"].bytes == x.size
    assert not reg.is_linked("one", x.digest)
    assert backend_records(reg.engine, "one")["links"] == set()
    assert verify_image(reg, "two", "v1", m.digest) == []

    reg.delete_manifest("two", m.digest)
    report = run(reg)
    assert (report.links, report.blobs) == (3, 3)  # the manifest, its config and layer
    assert backend_records(reg.engine, "two")["links"] == set()
    assert reg.engine.index.count_blobs() == 0
    assert blob_objects(reg) == set()
    assert_sound(reg)


# -- dry runs -------------------------------------------------------------------------------------


def _mixed_garbage(reg: Registry) -> None:
    base = layer("base", 1000)
    keep = simple_image("keep", base=base)
    gone = simple_image("gone", base=base)
    push(reg, "a", keep, "v1")
    push(reg, "a", gone, "v1-old")
    reg.delete_manifest("a", gone.digest)  # its config, layer and bytes are now garbage
    reg.ingest_blob("a", layer("dead-a", 333).content)  # a pushed blob never referenced
    reg.ingest_blob("b", base.content, digest=base.digest)  # shared: the link goes, not the blob
    reg.ingest_blob("b", layer("dead-b", 444).content)
    reg.engine.ingest(layer("nowhere", 555).content)  # linked in no repository


def _comparable(report: GCReport) -> dict[str, Any]:
    out = report.to_json()
    del out["dry_run"], out["timings_seconds"]
    return out


def test_dry_run_changes_nothing_and_reports_what_a_real_run_reclaims(reg: Registry) -> None:
    _mixed_garbage(reg)
    before = snapshot(reg)

    dry = run(reg, dry_run=True)

    assert snapshot(reg) == before
    assert dry.dry_run and dry.blobs == 6 and dry.links == 6
    assert set(dry.repositories) == {"a", "b"}
    objects = blob_objects(reg)
    real = run(reg)
    assert _comparable(real) == _comparable(dry)
    assert len(objects - blob_objects(reg)) == real.blobs
    assert garbage_left(reg) == []
    assert_sound(reg)


def test_dry_run_with_untagged_reports_what_a_real_run_reclaims(mem: Registry) -> None:
    push(mem, "a", simple_image("tagged"), "v1")
    push(mem, "a", simple_image("untagged"))

    dry = run(mem, untagged=True, dry_run=True)
    real = run(mem, untagged=True)

    assert real.blobs == 3
    assert _comparable(dry) == _comparable(real)


# -- upload sessions ------------------------------------------------------------------------------


def test_expired_upload_sessions_are_swept(local: Registry) -> None:
    old = local.start_upload("app")
    local.append_upload("app", old.id, b"o" * 3000, 0)
    fresh = local.start_upload("app")
    local.append_upload("app", fresh.id, b"f" * 100, 0)
    day_ago = time.time() - 2 * 86400
    local.engine.index.update_upload(old.id, lambda rec: {**rec, "updated": day_ago})

    dry = run(local, dry_run=True)
    assert (dry.uploads, dry.upload_bytes) == (1, 3000)
    assert local.engine.uploads.status(old.id).offset == 3000

    report = run(local)
    assert (report.uploads, report.upload_bytes) == (1, 3000)
    with pytest.raises(UploadNotFound):
        local.engine.uploads.status(old.id)
    assert not list(local.backend.list(upload_key(old.id)))
    assert local.engine.uploads.status(fresh.id).offset == 100  # live sessions are roots
    result = local.commit_upload("app", fresh.id, digest_of(b"f" * 100))
    assert local.is_linked("app", result.digest)


def _late_retry_of_a_commit_that_died_unlinked(reg: Registry) -> None:
    """A commit dies between publishing and linking; GC runs long after, then the client
    retries its PUT: the blob must still be there for the retry to link."""
    x = layer("late-retry", 3000)
    st = reg.start_upload("app")
    reg.append_upload("app", st.id, x.content, 0)

    def killed(_: Digest) -> None:
        raise RuntimeError("the process died here")

    with pytest.raises(RuntimeError):
        reg.engine.uploads.commit(st.id, x.digest, published=killed)
    assert not reg.is_linked("app", x.digest)
    backdate(reg, 7200)

    for dry_run in (True, False):
        report = run(reg, grace=3600, dry_run=dry_run)
        assert (report.blobs, report.uploads) == (0, 0)
    assert stored(reg, x) == [True]

    result = reg.commit_upload("app", st.id, x.digest)
    assert (str(result.digest), result.created) == (x.digest, False)
    assert reg.is_linked("app", x.digest)
    assert reg.engine.read_bytes(x.digest) == x.content


def test_a_blob_whose_commit_died_unlinked_is_kept_for_the_retry(reg: Registry) -> None:
    _late_retry_of_a_commit_that_died_unlinked(reg)


def test_a_blob_whose_commit_died_unlinked_is_kept_for_the_retry_on_s3(
        tmp_path: Path, s3_url_and_options: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url_and_options
    engine = Engine.open(url, index=str(tmp_path / "index"), **options)
    try:
        _late_retry_of_a_commit_that_died_unlinked(Registry(engine))
    finally:
        engine.close()


def test_expired_sessions_and_abandoned_multipart_uploads_are_swept_on_s3(
        tmp_path: Path, s3_url_and_options: tuple[str, dict[str, Any]], s3_client: Any) -> None:
    url, options = s3_url_and_options
    engine = Engine.open(url, index=str(tmp_path / "index"), **options)
    try:
        reg = Registry(engine)
        body = b"p" * engine.uploads.min_chunk + b"tail"  # one part, and a pending tail
        expired, abandoned = reg.start_upload("app"), reg.start_upload("app")
        for st in (expired, abandoned):
            reg.append_upload("app", st.id, body, 0)
        engine.index.update_upload(abandoned.id, lambda _: None)  # a crash lost its record
        bucket = url.split("/")[2]
        assert len(s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 2
        engine.uploads.ttl = 0.5  # instead of waiting a day
        time.sleep(0.7)

        report = run(reg)

        assert (report.uploads, report.upload_bytes) == (1, len(body))
        assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        assert list(reg.backend.list(UPLOADS)) == []
    finally:
        engine.close()


def test_upload_sweep_survives_a_session_finishing_meanwhile(
        local: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    st = local.start_upload("app")
    local.append_upload("app", st.id, b"abc" * 1000, 0)
    rec = local.engine.index.get_upload(st.id)
    backend = local.backend
    real_list = backend.list

    def listing(prefix: str = "") -> Iterator[str]:
        keys = list(real_list(prefix))
        if prefix == UPLOADS and keys:  # a client's commit finishes now: record, then bytes
            local.engine.index.update_upload(st.id, lambda _: None)
            backend.discard_upload(upload_key(st.id), rec["backend"])
        return iter(keys)

    monkeypatch.setattr(backend, "list", listing)
    run(local)


# -- race (a): re-push of a blob being swept --------------------------------------------------------


def slow_source(content: bytes, gate: Gate) -> Iterator[bytes]:
    """The first half, then wait at ``gate`` (the ingest is hashing), then the rest."""
    half = len(content) // 2
    yield content[:half]
    gate()
    yield content[half:]


def test_repush_is_refused_when_the_sweep_takes_the_blob_while_it_hashes(reg: Registry) -> None:
    x = layer("x", 4096)
    reg.engine.ingest(x.content)  # stored and linked nowhere: garbage at grace 0
    gate = Gate()
    ingest = Background(lambda: reg.engine.ingest(slow_source(x.content, gate),
                                                  digest=x.digest, size=x.size))
    gate.wait()  # it found x stored (dedupe) and is hashing
    assert run(reg).blobs == 1
    gate.release()

    with pytest.raises(Conflict):
        ingest.outcome()  # refused before it was acknowledged
    assert stored(reg, x) == [False]
    assert blob_objects(reg) == set()
    again = reg.engine.ingest(x.content, digest=x.digest)  # the client pushes again
    assert again.created
    assert sha256_of(reg.engine.read(x.digest)) == (x.digest, x.size)


def test_repush_keeps_the_blob_when_its_touch_lands_before_the_take(reg: Registry) -> None:
    x = layer("x", 4096)
    reg.engine.ingest(x.content)
    gate = Gate()

    class Paused(Collector):
        def _take(self, *args: Any) -> None:  # candidates chosen; the take not yet done
            gate()
            super()._take(*args)

    collector = Background(lambda: Paused(reg, grace=0).run())
    gate.wait()
    result = reg.engine.ingest(x.content, digest=x.digest)  # dedupe: its touch lands now
    gate.release()

    assert collector.outcome().blobs == 0  # touched since the run began: kept
    assert not result.created
    assert sha256_of(reg.engine.read(x.digest)) == (x.digest, x.size)


def test_repush_through_the_registry_is_refused_when_swept_while_it_hashes(
        reg: Registry) -> None:
    x = layer("x", 4096)
    reg.ingest_blob("old", x.content, digest=x.digest)
    reg.unlink("old", x.digest)  # the blob is garbage now
    gate = Gate()
    push_ = Background(lambda: reg.ingest_blob("app", slow_source(x.content, gate),
                                               digest=x.digest, size=x.size))
    gate.wait()
    run(reg)
    gate.release()

    with pytest.raises(Conflict):
        push_.outcome()
    assert not reg.is_linked("app", x.digest)
    assert_sound(reg)
    reg.ingest_blob("app", x.content, digest=x.digest)
    assert sha256_of(reg.read_blob("app", x.digest)) == (x.digest, x.size)


def test_repush_through_the_registry_is_refused_when_swept_between_touch_and_link(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    x = layer("x", 4096)
    reg.engine.ingest(x.content)
    real_link = reg.link
    runs: list[GCReport] = []

    def link(repo: str, digest: Any) -> None:
        if not runs:  # a run that began after the dedupe touch, before the link
            runs.append(gc_in_thread(reg))
        real_link(repo, digest)

    monkeypatch.setattr(reg, "link", link)
    with pytest.raises(Conflict):
        reg.ingest_blob("app", x.content, digest=x.digest)
    assert runs[0].blobs == 1
    assert not reg.is_linked("app", x.digest)
    assert stored(reg, x) == [False]
    assert_sound(reg)


# -- race (b): a manifest PUT referencing a blob being swept ----------------------------------------


def _gate_blob_delete(reg: Registry, monkeypatch: pytest.MonkeyPatch, digest: str) -> Gate:
    gate = Gate()
    backend = reg.backend
    real_delete = backend.delete
    key = blob_key(Digest.parse(digest))

    def delete(k: str) -> bool:
        if k == key:
            gate()  # the record is gone and a deleting lease stands; the bytes not yet
        return real_delete(k)

    monkeypatch.setattr(backend, "delete", delete)
    return gate


def test_manifest_put_while_the_sweep_deletes_its_blob_is_refused(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x = config("c"), layer("x", 2048)
    push_blobs(reg, "app", [cfg, x])  # pushed; the manifest comes late, after grace 0
    m = oci_manifest(cfg, [x])
    gate = _gate_blob_delete(reg, monkeypatch, x.digest)
    collector = Background(lambda: run(reg))
    gate.wait()

    with pytest.raises((ManifestBlobUnknown, Conflict)):
        reg.put_manifest("app", "v1", m.content, m.media_type)
    gate.release()
    assert collector.outcome().blobs == 2
    with pytest.raises(ManifestNotFound):
        reg.resolve("app", "v1")
    assert_sound(reg)


def test_repush_while_the_sweep_deletes_waits_and_then_the_manifest_lands(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x = config("c"), layer("x", 2048)
    push_blobs(reg, "app", [cfg, x])
    m = oci_manifest(cfg, [x])
    gate = _gate_blob_delete(reg, monkeypatch, x.digest)
    collector = Background(lambda: run(reg))
    gate.wait()
    repush = Background(lambda: push_blobs(reg, "app", [cfg, x]))  # waits out the lease
    time.sleep(0.2)
    assert repush.is_alive()
    gate.release()

    collector.outcome()
    repush.outcome()
    reg.put_manifest("app", "v1", m.content, m.media_type)
    assert verify_image(reg, "app", "v1", m.digest) == []
    assert_sound(reg)


def test_manifest_put_racing_the_link_sweep_after_its_reference_check(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x = config("c"), layer("x", 2048)
    push_blobs(reg, "app", [cfg, x])
    m = oci_manifest(cfg, [x])
    engine = reg.engine
    real_stat = engine.stat
    seen: list[str] = []

    def stat(digest: Any) -> Any:
        record = real_stat(digest)
        seen.append(str(digest))
        if len(seen) == 2:  # _check_references has checked both blobs: collect now
            gc_in_thread(reg)
        return record

    monkeypatch.setattr(engine, "stat", stat)
    try:
        reg.put_manifest("app", "v1", m.content, m.media_type)
    except (ManifestBlobUnknown, Conflict):
        pass  # refused: fine
    else:
        assert verify_image(reg, "app", "v1", m.digest) == []
    assert_sound(reg)


def test_index_put_racing_the_untagged_deletion_of_its_child(
        mem: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    child = simple_image("child")
    push(mem, "app", child)  # by digest: untagged, no index yet
    idx = index([child])
    swept = Gate()
    resume = Gate()

    def progress(stage: str, n: int) -> None:
        if stage == "manifests":  # the child is deleted, its link not yet swept
            swept.reached.set()
            resume()

    real_check = mem._check_references
    started: list[Background] = []

    def check(repo: str, manifest: Any) -> tuple[str, ...]:
        refs = real_check(repo, manifest)
        if not started:  # the child is still here; the recording transaction is to come
            started.append(Background(lambda: run(mem, untagged=True, progress=progress)))
            swept.wait()
        return refs

    monkeypatch.setattr(mem, "_check_references", check)
    try:
        mem.put_manifest("app", "v1", idx.content, idx.media_type)
    except (ManifestBlobUnknown, Conflict):
        pass
    finally:
        resume.release()
        started[0].outcome()
    assert_sound(mem)


def test_untagged_sweep_survives_concurrent_client_deletes(mem: Registry) -> None:
    for i in range(3):
        push(mem, "app", simple_image(f"u{i}"))

    def progress(stage: str, n: int) -> None:
        if stage == "manifests":  # a client deletes the rest meanwhile
            for r in mem.manifests("app"):
                mem.delete_manifest("app", r.digest)

    run(mem, untagged=True, progress=progress)
    assert manifest_digests(mem, "app") == set()


def test_a_failed_object_delete_leaves_no_lease_that_blocks_pushes(
        mem: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    x = layer("x")
    mem.engine.ingest(x.content)
    backend = mem.backend
    real_delete = backend.delete

    def delete(key: str) -> bool:
        if key.startswith("blobs/"):
            raise BackendError("injected: S3 answered 500")
        return real_delete(key)

    monkeypatch.setattr(backend, "delete", delete)
    try:
        run(mem)
    except BackendError:
        pass  # failing the run is fine; leaving the leases live is not
    monkeypatch.setattr(backend, "delete", real_delete)
    monkeypatch.setattr(engine_module, "DELETE_WAIT", 0.5)

    mem.engine.ingest(x.content, digest=x.digest)  # the client pushes again: accepted
    assert sha256_of(mem.engine.read(x.digest)) == (x.digest, x.size)
    assert_sound(mem)


def test_a_relink_during_the_unlink_keeps_the_backend_link_record(
        mem: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    x = layer("x")
    mem.ingest_blob("app", x.content, digest=x.digest)
    real_agree = records.agree
    pushes: list[threading.Thread] = []

    def agree(index: Any, backend: Any, which: Any) -> None:
        # the index link is gone, the backend record not yet: a client pushes the blob
        # again (it waits for the record's lock, then writes the record and the link)
        if not pushes:
            pushes.append(threading.Thread(
                target=mem.ingest_blob, args=("app", x.content), kwargs={"digest": x.digest}))
            pushes[0].start()
            pushes[0].join(0.3)
        real_agree(index, backend, which)

    monkeypatch.setattr(records, "agree", agree)
    run(mem)
    pushes[0].join(10)
    assert not pushes[0].is_alive()
    assert mem.is_linked("app", x.digest)
    assert backend_records(mem.engine, "app")["links"] == index_records(mem, "app")["links"]


def test_a_mount_racing_the_sweep_falls_back_to_an_upload(
        mem: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    x = layer("x")
    mem.ingest_blob("src", x.content, digest=x.digest)
    real = mem.is_linked

    def is_linked(repo: str, digest: Any) -> bool:
        linked = real(repo, digest)
        if repo == "src" and linked:
            gc_in_thread(mem)
        return linked

    monkeypatch.setattr(mem, "is_linked", is_linked)
    try:
        assert mem.mount("dst", x.digest, "src") is False
    except Conflict:
        pass
    monkeypatch.setattr(mem, "is_linked", real)
    assert not mem.is_linked("dst", x.digest)
    assert_sound(mem)


def test_a_manifest_put_racing_the_sweep_is_refused_as_manifest_blob_unknown(
        mem: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, x = config("c"), layer("x")
    push_blobs(mem, "app", [cfg, x])
    m = oci_manifest(cfg, [x])
    real = mem.is_linked

    def is_linked(repo: str, digest: Any) -> bool:
        linked = real(repo, digest)
        if linked and str(digest) == cfg.digest:
            gc_in_thread(mem)
        return linked

    monkeypatch.setattr(mem, "is_linked", is_linked)
    with pytest.raises((ManifestBlobUnknown, Conflict)):
        mem.put_manifest("app", "v1", m.content, m.media_type)
    monkeypatch.setattr(mem, "is_linked", real)
    assert_sound(mem)


# -- orphans ----------------------------------------------------------------------------------------


def _orphan(reg: Registry, label: str, age: float) -> tuple[Blob, str]:
    """A complete object under blobs/ whose record is gone (a crash between publish and
    record), its mtime ``age`` seconds back."""
    b = layer(label, 1000)
    reg.engine.ingest(b.content)
    reg.engine.index.delete_blob(b.digest)
    key = blob_key(Digest.parse(b.digest))
    when = time.time() - age
    os.utime(reg.backend.path(key), (when, when))
    return b, key


def test_the_orphan_pass(local: Registry) -> None:
    kept_image = simple_image("kept")
    push(local, "app", kept_image, "v1")
    backdate(local, 7200)
    old, old_key = _orphan(local, "old", 7200)
    young, _ = _orphan(local, "young", 0)
    below_minimum, _ = _orphan(local, "below-minimum", gc.ORPHAN_MIN_AGE / 2)
    leased, _ = _orphan(local, "leased", 7200)
    with local.index.transaction(write=True) as txn:  # a delete of it is running
        txn.put("deleting", leased.digest.encode(), json.dumps(new_lease()).encode())
    local.backend.put("blobs/README", b"not a blob key")

    assert run(local).orphans == 0  # only with orphans=True
    assert run(local, orphans=True, grace=3 * 3600).orphans == 0  # younger than the grace
    dry = run(local, orphans=True, dry_run=True)
    assert (dry.orphans, dry.orphan_bytes) == (1, old.size)
    assert local.backend.exists(old_key)

    report = run(local, orphans=True)

    assert (report.orphans, report.orphan_bytes) == (1, old.size)
    assert not local.backend.exists(old_key)
    assert blob_objects(local) == {young.digest, below_minimum.digest, leased.digest,
                                   *(b.digest for b in kept_image.blobs), kept_image.digest}
    assert local.backend.exists("blobs/README")
    with local.index.transaction(write=True) as txn:
        txn.delete("deleting", leased.digest.encode())
    assert verify_image(local, "app", "v1", kept_image.digest) == []
    assert_sound(local)


def test_the_orphan_pass_racing_a_repush_of_the_orphan(
        local: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    b, key = _orphan(local, "orphan", 7200)
    backend = local.backend
    real_stat = backend.stat

    def stat(k: str) -> Any:
        info = real_stat(k)
        if k == key:  # the pass found no record; a client pushes the same bytes now
            Background(lambda: local.ingest_blob("app", b.content, digest=b.digest)).outcome()
        return info

    monkeypatch.setattr(backend, "stat", stat)
    run(local, orphans=True)
    assert local.is_linked("app", b.digest)
    assert sha256_of(local.read_blob("app", b.digest)) == (b.digest, b.size)


# -- interruption and the lock -----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["links", "blobs"])
def test_an_interrupted_run_leaves_a_sound_store_and_a_rerun_completes(
        reg: Registry, monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    monkeypatch.setattr(gc, "BATCH", 2)
    kept = simple_image("kept")
    push(reg, "app", kept, "v1")
    garbage = [layer(f"g{i}", 100 + i) for i in range(7)]
    for b in garbage[:4]:
        reg.ingest_blob("app", b.content, digest=b.digest)  # dead links, then blobs
    for b in garbage[4:]:
        reg.engine.ingest(b.content)  # unlinked blobs
    calls: list[int] = []

    def progress(s: str, n: int) -> None:
        if s == stage:
            calls.append(n)
            if len(calls) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(reg, progress=progress)

    assert_sound(reg)  # no lease, no lock, nothing referenced lost
    if stage == "links":  # two links removed, then interrupted: no blob taken yet
        assert [reg.is_linked("app", b.digest) for b in garbage[:4]].count(False) == 2
        assert stored(reg, *garbage) == [True] * len(garbage)
    else:  # two batches of two taken and deleted, then interrupted
        assert stored(reg, *garbage).count(False) == 4
    report = run(reg)
    assert report.blobs > 0
    assert stored(reg, *garbage) == [False] * len(garbage)
    assert verify_image(reg, "app", "v1", kept.digest) == []
    assert garbage_left(reg) == []
    assert_sound(reg)


def test_one_collector_at_a_time(reg: Registry) -> None:
    reg.ingest_blob("app", layer("dead").content)  # so the first run reports progress
    gate = Gate()
    first = Background(lambda: run(reg, progress=lambda stage, n: gate()))
    gate.wait()

    with pytest.raises(Conflict):
        run(reg)
    assert run(reg, dry_run=True).dry_run  # a dry run changes nothing: it may overlap
    gate.release()
    assert first.outcome().links == 1
    assert run(reg).blobs == 0  # the lock was released

    dead = subprocess.Popen(["true"])
    dead.wait()
    with reg.index.transaction(write=True) as txn:  # a collector that died holding it
        txn.put("locks", b"gc", json.dumps({**new_lease(), "pid": dead.pid}).encode())
    assert run(reg).dry_run is False
    assert_sound(reg)


# -- the command line and the server ------------------------------------------------------------------


REPORT_KEYS = {"dry_run", "grace_seconds", "untagged", "manifests", "links", "blobs", "bytes",
               "uploads", "upload_bytes", "orphans", "orphan_bytes", "repositories",
               "timings_seconds"}


def test_cli_gc(tmp_path: Path) -> None:
    root = tmp_path / "root"
    engine = open_engine("local", tmp_path)
    _mixed_garbage(Registry(engine))
    engine.close()

    def gc_cli(*args: str) -> subprocess.CompletedProcess:
        proc = run_cli(["--root", str(root), "gc", *args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stderr == b""  # no progress bar when stderr is not a terminal
        return proc

    dry = json.loads(gc_cli("--dry-run", "--json").stdout)
    assert set(dry) == REPORT_KEYS
    assert dry["dry_run"] is True and dry["grace_seconds"] == 3600
    assert (dry["blobs"], dry["links"]) == (0, 0)  # everything is younger than 1 h

    dry = json.loads(gc_cli("--dry-run", "--json", "--grace", "0s").stdout)
    assert (dry["blobs"], dry["links"]) == (6, 6)
    assert set(dry["repositories"]) == {"a", "b"}
    assert set(dry["repositories"]["a"]) == {"manifests", "links", "bytes"}
    assert set(dry["timings_seconds"]) == {"links", "blobs", "uploads"}
    # which bytes each figure counts: the store's freed, a repository's unlinked
    lines = gc_cli("--dry-run", "--grace", "0s", "--untagged").stdout.decode().splitlines()
    assert lines[0].startswith("would reclaim: ") and " stored), " in lines[0]
    assert any(line.startswith("  a: ") and line.endswith(" logical)") for line in lines)

    real = json.loads(gc_cli("--grace", "0s", "--json", "--untagged", "--orphans").stdout)
    assert real["dry_run"] is False and real["grace_seconds"] == 0
    assert {k: v for k, v in real.items() if k in ("blobs", "bytes", "links")} == \
        {k: v for k, v in dry.items() if k in ("blobs", "bytes", "links")}
    assert set(real["timings_seconds"]) == {"manifests", "links", "blobs", "uploads", "orphans"}

    text = gc_cli("--grace", "0s").stdout.decode()
    assert text.startswith("reclaimed: 0 blobs (")
    assert "would reclaim" in gc_cli("--dry-run").stdout.decode()


def test_serve_gc_interval_collects_in_the_background(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    engine = open_engine("local", tmp_path)
    try:
        reg = Registry(engine)
        image = simple_image("kept")
        push(reg, "app", image, "v1")  # before the server: its gc would race the push
        with start_serve(root, tmp_path / "serve.log", "--gc-interval", "1s",
                         "--gc-grace", "0s"):
            x = layer("unreferenced")
            for _ in range(10):
                try:  # grace 0: a background run may take x before it is linked
                    reg.ingest_blob("app", x.content, digest=x.digest)
                    break
                except Conflict:
                    continue
            deadline = time.monotonic() + 20
            while engine.exists(x.digest):
                assert time.monotonic() < deadline, "the background gc never collected it"
                time.sleep(0.1)
            assert not reg.is_linked("app", x.digest)
            assert verify_image(reg, "app", "v1", image.digest) == []
            assert_sound(reg, gc_idle=False)  # the server may be collecting right now
    finally:
        engine.close()
