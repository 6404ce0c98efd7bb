"""The crash matrix, bounded: ``kill -9`` of a real server (and of a GC beside it) during
pushes, chunked uploads, manifest puts and deletes; nothing acknowledged is lost, and GC
reclaims what unacknowledged work left. ``tools/crash_matrix.py --iterations 200`` is the
full run."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from casengine.check import Checker
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.gc import ORPHAN_MIN_AGE, Collector
from casengine.layout import blob_key, link_key, manifest_key, repo_key, tag_key
from casengine.registry import Registry
from casengine.uploads import DEFAULT_TTL
from tests.helpers import REPO, digest_of

sys.path.insert(0, str(REPO / "tools"))
import crash_matrix


@pytest.mark.timeout(240)
def test_kill_nine_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    report = crash_matrix.run(16, seed=20261127, root=str(tmp_path / "root"), max_delay=0.8)
    assert report["lost"] == []
    assert report["check_before_gc"]["unexpected"] == []
    assert report["check_after_gc"]["clean"], report["check_after_gc"]
    assert report["tmp_left"] == [] and report["staged_left"] == []
    assert report["ok"], json.dumps(report, indent=1)
    counts = report["counts"]
    assert counts.get("manifests", 0) >= 5 and counts.get("chunked", 0) >= 5, counts
    assert report["kills"]["server"] == 16
    assert report["images_kept"] > 0


@pytest.mark.timeout(240)
def test_with_two_worker_processes_cut_off_uploads_resume(tmp_path: Path) -> None:
    """Any worker continues a session; a killed worker's lease must not hold it (a killed
    worker that nobody reaps still has its pid)."""
    report = crash_matrix.run(8, seed=20261128, root=str(tmp_path / "root"), max_delay=0.8,
                              workers=2, gc_chance=0)
    assert report["lost"] == [] and report["ok"], json.dumps(report, indent=1)
    assert report["counts"].get("resumed", 0) >= 1, report["counts"]


@pytest.mark.timeout(240)
def test_on_s3_nothing_acknowledged_is_lost_and_purge_leaves_no_multipart_upload(
        tmp_path: Path) -> None:
    """The same on an S3 root (moto): killed writers' multipart uploads, sessions' and
    ingests' alike, are aborted by the sweep, and no staging object is left."""
    report = crash_matrix.run(8, seed=20261129, root=str(tmp_path / "s3"), max_delay=0.8,
                              s3=True)
    assert report["lost"] == [] and report["ok"], json.dumps(report, indent=1)
    assert report["tmp_left"] == [] and report["staged_left"] == []
    assert report["counts"].get("chunked", 0) >= 3, report["counts"]


def test_the_matrix_sees_a_lost_upload(tmp_path: Path) -> None:
    """The resume check can fail: a session gone though its PUT was never sent is lost."""
    server = crash_matrix.Server(crash_matrix.Store.local(str(tmp_path / "root")),
                                 tmp_path / "serve.log")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            loc = c.post("/v2/crash/a/blobs/uploads/").headers["location"]
            r = c.patch(loc, content=b"x" * 1000, headers={
                "Content-Type": "application/octet-stream", "Content-Range": "0-999"})
            loc = r.headers["location"]
            cut = crash_matrix.Interrupted("crash/a", digest_of(b"x" * 2000), b"x" * 2000, loc,
                                           1000, committing=False)
            assert crash_matrix.resume(server.url, [cut]) == []
            loc = c.post("/v2/crash/a/blobs/uploads/").headers["location"]
            c.delete(loc).raise_for_status()  # behind the client's back
        lost = crash_matrix.resume(server.url, [crash_matrix.Interrupted(
            "crash/a", digest_of(b"y"), b"y", loc, 0, committing=False)])
        assert len(lost) == 1 and "status 404" in lost[0], lost
    finally:
        server.stop()


def test_the_matrix_sees_a_lost_blob(tmp_path: Path) -> None:
    """The check above can fail: a blob removed behind the server's back is reported lost."""
    root = str(tmp_path / "root")
    server = crash_matrix.Server(crash_matrix.Store.local(root), tmp_path / "serve.log")
    server.start()
    try:
        image = crash_matrix._image(random.Random(1), "crash/a", "v1")
        ledger = crash_matrix.Ledger()
        client = crash_matrix.Client(server.url, ledger, random.Random(2), "t", threading.Event())
        with httpx.Client(base_url=server.url, timeout=30) as c:
            client.push(c, image)
        assert crash_matrix.verify(server.url, [image.kept()], ledger.blob_acks) == []
        victim = next(iter(image.blobs))
        with Engine.open(root) as engine:
            os.unlink(engine.backend.local_path(blob_key(Digest.parse(victim))))
        lost = crash_matrix.verify(server.url, [image.kept()], ledger.blob_acks)
        assert any(victim in line for line in lost), lost
    finally:
        server.stop()



# -- what the matrix found: regressions --------------------------------------------------------


def _age(path: str, seconds: float = ORPHAN_MIN_AGE + 60) -> None:
    st = os.stat(path)
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def test_gc_reclaims_the_backend_records_of_a_push_killed_before_its_index_write(
        tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root")) as engine:
        reg = Registry(engine)
        reg.create_repository("crash/a")
        d = Digest.parse(digest_of(b"never acknowledged"))
        records = [link_key("crash/a", d), manifest_key("crash/a", d), tag_key("crash/a", "v1"),
                   repo_key("crash/b", "_repo")]
        for key in records:
            engine.backend.put(key, str(d).encode())
        # a re-tag whose index write never happened: the index says v2 is another manifest
        other = Digest.parse(digest_of(b"acknowledged"))
        with engine.index.transaction(write=True) as txn:
            txn.put("tags", b"crash/a\0v2", str(other).encode())
        engine.backend.put(tag_key("crash/a", "v2"), str(d).encode())
        records.append(tag_key("crash/a", "v2"))
        young = link_key("crash/a", Digest.parse(digest_of(b"a push in progress")))
        engine.backend.put(young, b"")
        kinds = {f.kind for f in Checker(reg).run().findings}
        assert kinds == {"link-record", "manifest-record", "tag-record", "dangling-tag"}
        for key in records:
            _age(engine.backend.local_path(key))
        report = Collector(reg, grace=0, orphans=True).run()
        assert report.orphans == 5
        assert sorted(engine.backend.list("repositories/")) == sorted(
            [repo_key("crash/a", "_repo"), tag_key("crash/a", "v2"), young])
        assert engine.backend.get(tag_key("crash/a", "v2")) == str(other).encode()
        engine.backend.delete(young)
        with engine.index.transaction(write=True) as txn:
            txn.delete("tags", b"crash/a\0v2")
        engine.backend.delete(tag_key("crash/a", "v2"))
        assert Checker(reg).run().clean


def test_gc_takes_an_orphan_a_killed_collector_left_under_its_lease(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root")) as engine:
        data = b"taken, then the collector was killed"
        digest = Digest.parse(digest_of(data))
        engine.backend.put(blob_key(digest), data)
        _age(engine.backend.local_path(blob_key(digest)))
        dead = {"pid": 2**22 + 7, "host": socket.gethostname(), "token": "x",
                "since": time.time()}
        with engine.index.transaction(write=True) as txn:
            txn.put("deleting", str(digest).encode(), json.dumps(dead).encode())
        assert [f.kind for f in Checker(Registry(engine)).run().findings] == ["orphan-object"]
        assert Collector(Registry(engine), grace=0, orphans=True).run().orphans == 1
        assert list(engine.backend.list("blobs/")) == []


def test_purge_removes_the_temp_files_of_writers_that_died(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root")) as engine:
        tmp = tmp_path / "root" / ".tmp"
        dead = engine.backend.writer()
        dead.write(b"partial")
        live = engine.backend.writer()
        live.write(b"in progress")
        (old,) = [p for p in tmp.iterdir() if p.read_bytes() == b"partial"]
        _age(str(old), DEFAULT_TTL + 60)
        engine.uploads.purge()  # the default TTL: only the old temp file goes
        assert [p.read_bytes() for p in tmp.iterdir()] == [b"in progress"]
        assert live.commit("k") and engine.backend.get("k") == b"in progress"
        dead.abort()
        assert list(tmp.iterdir()) == []
