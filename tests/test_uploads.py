"""Chunked upload sessions: offsets, resume in another engine and process, crashes, expiry.

Every test runs on a local root and on S3 (moto's server, with 5 MiB parts so that the
multipart paths run on a few MiB); those that need only one engine run on ``memory://`` too.
S3-only behaviour (parts, tails, copies, aborts) is tested in ``test_uploads_s3.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from casengine import Engine
from casengine.digest import parse_digest
from casengine.errors import (
    BackendError,
    Conflict,
    DigestMismatch,
    OffsetMismatch,
    SizeMismatch,
    UploadNotFound,
)
from casengine.layout import RAW, blob_key, upload_key

DATA = os.urandom((5 << 20) + 4321)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


MIB = 1 << 20
#: S3's smallest part, so that DATA is one part and a tail.
S3_PART = 5 * MIB


@dataclass(frozen=True)
class Store:
    """How to open one store, in this process or (as JSON) in a child process."""

    url: str
    index: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> Engine:
        return Engine.open(self.url, index=self.index, **self.options)

    def json(self) -> str:
        return json.dumps(asdict(self))


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
               **s3_options: Any) -> Store:
    if kind == "local":
        return Store(str(tmp_path / "root"))
    if kind == "memory":
        return Store("memory://")
    url, options = request.getfixturevalue("s3_url_and_options")
    return Store(url, str(tmp_path / "index"), {**options, "part_size": S3_PART, **s3_options})


@pytest.fixture(params=["local", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_store(request.param, request, tmp_path)


@pytest.fixture(params=["local", "s3"])
def durable(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A store that outlives its engine and can be opened from other processes."""
    return make_store(request.param, request, tmp_path)


@pytest.fixture
def engine(store: Store) -> Iterator[Engine]:
    with store.open() as e:
        yield e


def no_multipart_uploads(engine: Engine) -> None:
    """S3: nothing left open (other backends have no such state)."""
    uploads = getattr(engine.backend, "multipart_uploads", None)
    if uploads is not None:
        assert uploads() == []


def _append_all(engine: Engine, upload_id: str, data: bytes, chunk: int) -> None:
    offset = engine.uploads.status(upload_id).offset
    while offset < len(data):
        offset = engine.uploads.append(upload_id, data[offset : offset + chunk], offset).offset


def _nothing_staged(engine: Engine) -> None:
    assert list(engine.uploads.list()) == []
    assert list(engine.backend.list("uploads/")) == []
    no_multipart_uploads(engine)


def test_chunks_then_commit(engine: Engine) -> None:
    s = engine.uploads.start("team/app")
    assert (s.offset, s.repository) == (0, "team/app")
    _append_all(engine, s.id, DATA, 1 << 20)
    assert engine.uploads.status(s.id).offset == len(DATA)
    result = engine.uploads.commit(s.id, DIGEST, size=len(DATA))
    assert result.created and str(result.digest) == DIGEST
    assert engine.read_bytes(DIGEST) == DATA
    _nothing_staged(engine)
    with pytest.raises(UploadNotFound):
        engine.uploads.status(s.id)


def test_commit_with_last_chunk_and_empty_upload(engine: Engine) -> None:
    s = engine.uploads.start()
    engine.uploads.append(s.id, DATA[:1000], 0)
    assert engine.uploads.commit(s.id, DIGEST, last=DATA[1000:]).size == len(DATA)
    empty = engine.uploads.start()
    r = engine.uploads.commit(empty.id, "sha256:" + hashlib.sha256(b"").hexdigest())
    assert r.size == 0 and engine.read_bytes(r.digest) == b""
    _nothing_staged(engine)


def test_out_of_order_chunk_is_refused_and_nothing_appended(engine: Engine) -> None:
    s = engine.uploads.start()
    engine.uploads.append(s.id, DATA[:100], 0)
    for bad in (0, 50, 101, 10**9):
        with pytest.raises(OffsetMismatch) as info:
            engine.uploads.append(s.id, b"junk", bad)
        assert info.value.offset == 100
    engine.uploads.append(s.id, DATA[100:], 100)
    assert engine.uploads.commit(s.id, DIGEST).size == len(DATA)


def test_wrong_digest_or_size_publishes_nothing_and_keeps_the_session(engine: Engine) -> None:
    s = engine.uploads.start()
    engine.uploads.append(s.id, DATA, 0)
    with pytest.raises(DigestMismatch) as info:
        engine.uploads.commit(s.id, "sha256:" + "0" * 64)
    assert DIGEST in str(info.value) and "0" * 64 in str(info.value)
    with pytest.raises(SizeMismatch):
        engine.uploads.commit(s.id, DIGEST, size=len(DATA) + 1)
    assert list(engine.list()) == []
    assert engine.uploads.commit(s.id, DIGEST).created


def test_declared_chunk_length_is_checked(engine: Engine) -> None:
    s = engine.uploads.start()
    with pytest.raises(SizeMismatch):
        engine.uploads.append(s.id, DATA[:1000], 0, length=2000)
    with pytest.raises(SizeMismatch):
        engine.uploads.append(s.id, DATA[:1000], 0, length=10)
    assert engine.uploads.status(s.id).offset == 0
    engine.uploads.append(s.id, DATA, 0, length=len(DATA))
    assert engine.uploads.commit(s.id, DIGEST).size == len(DATA)


def test_commit_of_stored_blob_dedupes(engine: Engine) -> None:
    engine.ingest(DATA)
    s = engine.uploads.start()
    engine.uploads.append(s.id, DATA, 0)
    assert not engine.uploads.commit(s.id, DIGEST).created
    _nothing_staged(engine)


def test_cancel(engine: Engine) -> None:
    s = engine.uploads.start()
    engine.uploads.append(s.id, DATA[:5000], 0)
    engine.uploads.cancel(s.id)
    _nothing_staged(engine)
    with pytest.raises(UploadNotFound):
        engine.uploads.append(s.id, b"x", 5000)


@pytest.mark.parametrize("bad", ["", "../../etc", "x" * 32, "A" * 32, "0" * 31, None])
def test_unknown_or_malformed_ids(engine: Engine, bad: object) -> None:
    with pytest.raises(UploadNotFound):
        engine.uploads.status(bad)  # type: ignore[arg-type]
    with pytest.raises(UploadNotFound):
        engine.uploads.append(bad, b"x", 0)  # type: ignore[arg-type]


def test_concurrent_appends_one_wins(engine: Engine) -> None:
    s = engine.uploads.start()
    gate = threading.Event()
    results: list[str] = []

    def slow_chunks() -> Iterator[bytes]:
        yield b"a" * 1000
        gate.wait(10)
        yield b"b" * 1000

    def first() -> None:
        engine.uploads.append(s.id, slow_chunks(), 0)
        results.append("first")

    t = threading.Thread(target=first)
    t.start()
    deadline = time.time() + 10
    while engine.index.get_upload(s.id)["lease"] is None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(Conflict):
        engine.uploads.append(s.id, b"c" * 1000, 0)
    gate.set()
    t.join()
    assert results == ["first"]
    r = engine.uploads.commit(s.id, "sha256:" + hashlib.sha256(b"a" * 1000 + b"b" * 1000).hexdigest())
    assert engine.read_bytes(r.digest) == b"a" * 1000 + b"b" * 1000


def test_resume_in_a_new_engine_reads_nothing_at_commit(durable: Store) -> None:
    with durable.open() as e:
        s = e.uploads.start()
        e.uploads.append(s.id, DATA[: 3 << 20], 0)
    with durable.open() as e:
        reads: list[str] = []
        backend = getattr(e.backend, "inner", e.backend)  # behind the retries: the real one
        # S3 reads back the tail below a part (get_exactly) when an append fills a part
        for name in ("read", "read_upload", "get_exactly"):
            real = getattr(backend, name, None)
            if real is None:
                continue

            def counted(*args: object, _real=real, _name=name, **kw: object) -> object:
                reads.append(_name)
                return _real(*args, **kw)

            setattr(backend, name, counted)
        assert e.uploads.status(s.id).offset == 3 << 20
        e.uploads.append(s.id, DATA[3 << 20 :], 3 << 20)
        if durable.url.startswith("s3://"):
            assert reads == ["get_exactly"], "an append reads the previous tail, no more"
            reads.clear()
        else:
            assert reads == [], "an append read staged data"
        assert e.uploads.commit(s.id, DIGEST).created
        assert reads == [], "commit read uploaded data again"
        assert e.read_bytes(DIGEST) == DATA
        no_multipart_uploads(e)


def _python(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


APPEND = """
    import json, sys
    from casengine import Engine
    store, upload_id, path, start, end = sys.argv[1:6]
    spec = json.loads(store)
    data = open(path, "rb").read()[int(start):int(end)]
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        print(e.uploads.append(upload_id, data, int(start)).offset, flush=True)
"""


def test_appends_from_other_processes(durable: Store, tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    with durable.open() as e:
        s = e.uploads.start()
    cuts = [0, 1 << 20, 3 << 20, len(DATA)]
    for a, b in itertools.pairwise(cuts):
        p = _python(APPEND, durable.json(), s.id, str(path), str(a), str(b))
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
        assert int(out) == b
    with durable.open() as e:
        assert e.uploads.commit(s.id, DIGEST).created
        assert e.read_bytes(DIGEST) == DATA
        no_multipart_uploads(e)


def test_commit_in_another_process(durable: Store) -> None:
    with durable.open() as e:
        s = e.uploads.start()
        _append_all(e, s.id, DATA, 2 << 20)
    p = _python("""
        import json, sys
        from casengine import Engine
        spec = json.loads(sys.argv[1])
        with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
            print(e.uploads.commit(sys.argv[2], sys.argv[3]).created, flush=True)
    """, durable.json(), s.id, DIGEST)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    assert out.strip() == b"True"
    with durable.open() as e:
        assert e.read_bytes(DIGEST) == DATA
        _nothing_staged(e)


SLOW_APPEND = """
    import json, sys, time
    from casengine import Engine
    store, upload_id, offset = sys.argv[1:4]
    spec = json.loads(store)
    def chunks():
        for i in range(400):
            yield bytes([i % 251]) * 65536
            time.sleep(0.002)
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        print("started", flush=True)
        e.uploads.append(upload_id, chunks(), int(offset))
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.4])
def test_kill_9_mid_append_then_resume(durable: Store, delay: float) -> None:
    with durable.open() as e:
        s = e.uploads.start()
        e.uploads.append(s.id, DATA[:4096], 0)
    p = _python(SLOW_APPEND, durable.json(), s.id, "4096")
    assert p.stdout is not None
    assert p.stdout.readline().strip() == b"started"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    with durable.open() as e:
        assert e.uploads.status(s.id).offset == 4096  # the last acknowledged chunk
        with pytest.raises(OffsetMismatch):
            e.uploads.append(s.id, b"x", 8192)
        e.uploads.append(s.id, DATA[4096:], 4096)
        assert e.uploads.commit(s.id, DIGEST).created
        assert e.read_bytes(DIGEST) == DATA
        _nothing_staged(e)


HELD_APPENDS = """
    import json, random, sys
    from casengine import Engine
    store, upload_id, size, step = sys.argv[1:5]
    spec = json.loads(store)
    data = random.Random(7).randbytes(int(size))
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        for off in range(0, len(data), int(step)):
            print(e.uploads.append(upload_id, data[off:off + int(step)], off).offset, flush=True)
"""


def test_kill_9_among_appends_of_bytes_in_hand(durable: Store, tmp_path: Path) -> None:
    """Appends handed over as bytes (written direct while a worker hashes them): a kill at
    any moment keeps every acknowledged one and no part of the one in flight."""
    step, size = 4 << 20, 48 << 20
    data = random.Random(7).randbytes(size)
    with durable.open() as e:
        upload_id = e.uploads.start().id
    p = _python(HELD_APPENDS, durable.json(), upload_id, str(size), str(step))
    assert p.stdout is not None
    acked = [int(p.stdout.readline()) for _ in range(3)]
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    with durable.open() as e:
        offset = e.uploads.status(upload_id).offset
        assert offset % step == 0 and offset >= acked[-1]
        for off in range(offset, size, step):
            e.uploads.append(upload_id, data[off:off + step], off)
        result = e.uploads.commit(upload_id, "sha256:" + hashlib.sha256(data).hexdigest())
        assert result.created and e.read_bytes(result.digest) == data
        _nothing_staged(e)


def test_expiry_sweep(engine: Engine) -> None:
    old = engine.uploads.start()
    engine.uploads.append(old.id, DATA[:777], 0)
    fresh = engine.uploads.start()
    engine.uploads.append(fresh.id, DATA[:10], 0)
    aged = {**engine.index.get_upload(old.id), "updated": time.time() - 7200}
    engine.index.update_upload(old.id, lambda _: aged)
    dry = engine.uploads.purge(3600, dry_run=True)
    assert [s.id for s in dry.sessions] == [old.id] and dry.bytes == 777
    assert engine.uploads.status(old.id).offset == 777
    report = engine.uploads.purge(3600)
    assert [s.id for s in report.sessions] == [old.id]
    with pytest.raises(UploadNotFound):
        engine.uploads.status(old.id)
    assert engine.uploads.status(fresh.id).offset == 10
    assert all(old.id not in k for k in engine.backend.list("uploads/"))


def test_the_sweep_counts_what_a_cut_off_append_left(durable: Store) -> None:
    """An append that died after writing reports nothing acknowledged, yet its bytes take
    room until swept: the sweep reports them as reclaimed."""
    with durable.open() as engine:
        s = engine.uploads.start()
        engine.uploads.append(s.id, DATA[:3000], 0)
        rec = engine.index.get_upload(s.id)
        cut_off = max(engine.uploads.min_chunk, 1 << 20) * 2  # whole parts, on S3
        appender = engine.backend.append(upload_key(s.id), rec["backend"], rec["offset"])
        appender.write(os.urandom(cut_off))  # written, never finished: the process died
    with durable.open() as engine:
        assert engine.uploads.status(s.id).offset == 3000
        engine.index.update_upload(s.id, lambda r: {**r, "updated": time.time() - 7200})
        for dry_run in (True, False):
            report = engine.uploads.purge(3600, dry_run=dry_run)
            assert [st.id for st in report.sessions] == [s.id]
            # at least the first part (S3 sends one part while it fills the next)
            assert cut_off // 2 <= report.bytes <= 3000 + cut_off + 4096, report.bytes
        assert list(engine.backend.list(upload_key(s.id) + "/")) == []


def test_purge_sweeps_a_session_whose_first_append_died_before_writing(
        tmp_path: Path) -> None:
    """The first append creates the staged file empty, then writes: a kill between the two
    leaves an empty file, where the search for its end finds no hole (ENXIO)."""
    with Store(str(tmp_path / "root")).open() as e:
        s = e.uploads.start()
        path = e.backend.local_path(upload_key(s.id) + "/data")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
        e.index.update_upload(s.id, lambda r: {**r, "updated": time.time() - 7200})
        report = e.uploads.purge(3600)
        assert [st.id for st in report.sessions] == [s.id] and report.bytes == 0
        assert list(e.backend.list("uploads/")) == []


def test_purge_sweeps_the_directory_a_discard_died_in(tmp_path: Path) -> None:
    """A discard removes the staged file, then its directory: a kill between the two leaves
    an empty directory, which holds no key for the sweep of staged bytes to find."""
    with Store(str(tmp_path / "root")).open() as e:
        s = e.uploads.start()
        e.uploads.append(s.id, b"bytes", 0)
        live = e.uploads.start()
        e.uploads.append(live.id, b"more", 0)
        e.index.update_upload(s.id, lambda _: None)  # _forget: the record first
        path = e.backend.local_path(upload_key(s.id) + "/data")
        os.unlink(path)
        for session in (s, live):
            top = e.backend.local_path(upload_key(session.id))
            os.utime(top, (time.time() - 7200,) * 2)
        report = e.uploads.purge(3600)
        assert report.leftovers == 1
        assert not os.path.exists(os.path.dirname(path))
        assert list(e.backend.list("uploads/")) == [upload_key(live.id) + "/data"]


def test_purge_removes_staged_bytes_without_a_record(durable: Store) -> None:
    with durable.open() as e:
        s = e.uploads.start()
        e.uploads.append(s.id, DATA[:100], 0)
        e.index.update_upload(s.id, lambda _: None)  # as if a crash lost the record
        assert list(e.backend.list("uploads/"))
        e.uploads.purge(0)
        assert list(e.backend.list("uploads/")) == []


DIES_AFTER_PUBLISHING = """
    import json, os, sys
    from casengine import Engine
    from casengine.uploads import Uploads
    spec = json.loads(sys.argv[1])
    # the process dies once the blob is published, before the session is forgotten
    Uploads._forget = lambda *_: os._exit(9)
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        e.uploads.commit(sys.argv[2], sys.argv[3])
"""


def _commit_dies_after_publishing(store: Store) -> str:
    """An upload of DATA whose commit's process died once the blob was published."""
    with store.open() as e:
        upload_id = e.uploads.start().id
        _append_all(e, upload_id, DATA, 2 << 20)
    p = _python(DIES_AFTER_PUBLISHING, store.json(), upload_id, DIGEST)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 9, err.decode()
    return upload_id


@pytest.mark.parametrize("then", ["append", "commit"])
def test_death_between_publishing_and_forgetting(durable: Store, then: str) -> None:
    """The published blob never changes through the session it came from: a later append
    finds the session finished, a retried commit finds the blob."""
    upload_id = _commit_dies_after_publishing(durable)
    with durable.open() as e:
        assert e.read_bytes(DIGEST) == DATA  # published, and its session still there
        assert e.uploads.status(upload_id).offset == len(DATA)
        if then == "append":
            with pytest.raises(UploadNotFound):
                e.uploads.append(upload_id, b"more" * 2000, len(DATA))
        else:
            assert not e.uploads.commit(upload_id, DIGEST).created
        assert e.read_bytes(DIGEST) == DATA
        # the object itself, not just what the index says of it
        assert e.backend.stat(blob_key(parse_digest(DIGEST), RAW)).size == len(DATA)
        _nothing_staged(e)


def test_local_staged_file_linked_as_a_blob_takes_no_more_bytes(tmp_path: Path) -> None:
    """Should the mark be lost too (a power cut: it is not synced), the local backend still
    refuses to write into a staged file that is also a published blob's."""
    store = Store(str(tmp_path / "root"))
    upload_id = _commit_dies_after_publishing(store)
    with store.open() as e:
        e.index.update_upload(upload_id, lambda rec: {**rec, "published": None})
        with pytest.raises(BackendError, match="linked elsewhere"):
            e.uploads.append(upload_id, b"more" * 2000, len(DATA))
        assert e.backend.stat(blob_key(parse_digest(DIGEST), RAW)).size == len(DATA)
        assert not e.uploads.commit(upload_id, DIGEST).created  # a retried commit still ends it
        assert e.read_bytes(DIGEST) == DATA
        _nothing_staged(e)
