"""Compression after the acknowledgement (casengine/compactor.py): the protocol's steps,
readers racing the swap, concurrent compactors, restarts, deletes, faults and damage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casengine.backend import Backend, ObjectInfo, Writer
from casengine.check import Checker
from casengine.compression import Policy
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import CorruptObject
from casengine.gc import Collector
from casengine.layout import RAW, ZST, blob_key, parse_blob_key
from casengine.leases import new_lease
from casengine.registry import Registry
from tests.helpers import KINDS, MIB, WrappedBackend, audit, blob_objects, open_engine
from tests.test_seekable import text

DATA = text(6 * MIB + 123)


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with open_engine(request.param, tmp_path) as e:
        yield e


def hold(engine: Engine, digest: str, *, live: bool = True) -> None:
    """Put a compaction lease on ``digest``: a live one keeps this engine's compactor off it,
    a stale one is what a process killed mid-compaction leaves."""
    lease = new_lease() if live else {**new_lease(), "since": 0.0}
    with engine.index.transaction(write=True) as txn:
        txn.put("compact", digest.encode(), json.dumps(lease).encode())


def release(engine: Engine, digest: str) -> None:
    with engine.index.transaction(write=True) as txn:
        txn.delete("compact", digest.encode())


def ingest_raw(engine: Engine, data: bytes = DATA) -> str:
    """Ingest ``data`` with the engine's compactor kept off it: a blob stored raw, marked."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    hold(engine, digest)
    engine.ingest(data)
    assert engine.wait_compacted(30)
    release(engine, digest)
    return digest


def objects_of(engine: Engine, digest: str) -> list[str]:
    return [k for k in blob_objects(engine) if Digest.parse(digest).hex in k]


def test_a_large_blob_is_acknowledged_raw_then_compressed(engine: Engine) -> None:
    digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
    hold(engine, digest)  # the compactor may not start before we have looked
    assert engine.ingest(DATA, digest=digest).created
    assert engine.wait_compacted(30)
    record = engine.stat(digest)
    assert record.codec == RAW and record.stored_size == len(DATA)
    assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), RAW)]
    release(engine, digest)
    assert engine.compactor.compact(digest)
    record = engine.stat(digest)
    assert record.codec == ZST and record.stored_size < len(DATA) // 4
    assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]
    assert engine.read_bytes(digest) == DATA
    with engine.index.transaction() as txn:
        assert txn.get("compact", digest.encode()) is None  # the mark went with the work
    audit(engine)
    assert Checker(Registry(engine), full=True).run().clean


def test_by_default_the_engine_compresses_in_the_background(engine: Engine) -> None:
    digest = str(engine.ingest(DATA).digest)
    assert engine.wait_compacted(60)
    assert engine.stat(digest).codec == ZST
    assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]


def test_inline_policy_and_small_blobs_compress_before_the_ack(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root"), compression=Policy(defer=False)) as engine:
        assert engine.stat(engine.ingest(DATA).digest).codec == ZST
        assert "compactor" not in engine.__dict__  # no thread was ever started
    with Engine.open("memory://") as engine:
        small = text(MIB - 1)
        assert engine.stat(engine.ingest(small).digest).codec == ZST
        assert "compactor" not in engine.__dict__


def test_a_sample_that_promised_too_much_stays_raw(tmp_path: Path) -> None:
    # the first 256 KiB compress well (the sample), the rest not at all
    data = text(256 << 10) + os.urandom(4 * MIB)
    with Engine.open("memory://") as engine:
        digest = str(engine.ingest(data).digest)
        assert engine.wait_compacted(30)
        assert engine.stat(digest).codec == RAW
        assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), RAW)]
    with Engine.open("memory://", compression=Policy("always")) as engine:
        digest = str(engine.ingest(data).digest)
        assert engine.wait_compacted(30)
        assert engine.stat(digest).codec == ZST  # always means always
    with Engine.open("memory://", compression=Policy("never")) as engine:
        digest = str(engine.ingest(DATA).digest)
        assert not engine.compactor.compact(digest)
        assert engine.stat(digest).codec == RAW


class RangedReads(WrappedBackend):
    """Reads one ranged request per chunk, as s3fs and other object stores do, so an object
    deleted mid-read fails the next chunk instead of living on in an open file."""

    def read(self, key: str, start: int = 0, length: int | None = None, *,
             chunk_size: int = 1 << 20) -> Iterator[bytes]:
        end = self.inner.stat(key).size if length is None else start + length
        first = b"".join(self.inner.read(key, start, min(chunk_size, end - start)))

        def rest() -> Iterator[bytes]:
            yield first
            pos = start + len(first)
            while pos < end:
                chunk = b"".join(self.inner.read(key, pos, min(chunk_size, end - pos)))
                if not chunk:
                    return
                pos += len(chunk)
                yield chunk

        return rest()


@pytest.mark.parametrize("ranged", [False, True], ids=["open-file", "ranged"])
def test_a_read_racing_the_swap_returns_the_logical_bytes(
        engine: Engine, ranged: bool) -> None:
    digest = ingest_raw(engine)
    reader = Engine(RangedReads(engine.backend), engine.index) if ranged else engine
    started = reader.read(digest, 1000, chunk_size=256 << 10)
    head = next(started)  # the raw object is open (or its first range was read)
    assert engine.compactor.compact(digest)
    assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]
    assert head + b"".join(started) == DATA[1000:]
    # a read that looked the record up before the swap but opens after it
    assert b"".join(reader.read(digest, 5 * MIB, MIB)) == DATA[5 * MIB:6 * MIB]


def test_concurrent_compactors_do_the_work_once(engine: Engine) -> None:
    digest = ingest_raw(engine)
    other = Engine(engine.backend, engine.index)  # another process's engine, same store
    results: list[bool] = []
    threads = [threading.Thread(target=lambda e=e: results.append(e.compactor.compact(digest)))
               for e in (engine, other, engine)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1, results
    assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]
    assert engine.read_bytes(digest) == DATA
    audit(engine)


def test_a_restart_takes_up_interrupted_work(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    with Engine.open(root) as engine:
        digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
        hold(engine, digest)  # kept off (before the ingest: the compactor starts at once) ...
        engine.ingest(DATA)
        engine.wait_compacted(30)
        hold(engine, digest, live=False)  # ... by a process that was then killed
        assert engine.stat(digest).codec == RAW
    with Engine.open(root) as engine:
        hold(engine, "sha256:" + "0" * 64)  # a mark whose blob is gone
        assert engine.compactor.resume() == 1  # the other is another live process's
        assert engine.wait_compacted(60)
        assert engine.stat(digest).codec == ZST
        assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]


class DeleteBeforeCommit(WrappedBackend):
    """Deletes the blob (as a GC or a client DELETE would) just before the zstd object is
    published: the record the compactor read is gone when it comes to swap."""

    engine: Engine | None = None

    def wrap_writer(self, writer: Writer) -> Writer:
        real_commit = writer.commit

        def commit(key: str, *, exclusive: bool = False) -> bool:
            parsed = parse_blob_key(key)
            if parsed is not None and parsed[1] == ZST and self.engine is not None:
                self.before_commit(self.engine, parsed[0])
            return real_commit(key, exclusive=exclusive)

        writer.commit = commit  # type: ignore[method-assign]
        return writer

    def before_commit(self, engine: Engine, digest: Digest) -> None:
        assert engine.delete(digest)


@contextlib.contextmanager
def deleting_engine(tmp_path: Path, wrapper: type[DeleteBeforeCommit]
                    ) -> Iterator[tuple[Engine, DeleteBeforeCommit]]:
    """An engine on a local root whose backend is ``wrapper``, which deletes through it."""
    inner = Engine.open(str(tmp_path / "root"))
    backend = wrapper(inner.backend)
    engine = Engine(backend, inner.index)
    backend.engine = engine
    try:
        yield engine, backend
    finally:
        inner.close()


def test_a_blob_deleted_during_compression_leaves_nothing(tmp_path: Path) -> None:
    with deleting_engine(tmp_path, DeleteBeforeCommit) as (engine, _):
        digest = str(engine.ingest(DATA).digest)
        assert not engine.compactor.compact(digest)
        assert not engine.exists(digest) and objects_of(engine, digest) == []


class DeleteAcrossCommit(DeleteBeforeCommit):
    """A delete of the blob starts just before the zstd object is published and is still
    removing the raw object, under its ``deleting`` lease, when the compactor finds its
    record gone and comes to remove the zstd object it made."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.deleting = threading.Event()
        self.delete_done = threading.Event()
        self.deleter: threading.Thread | None = None

    def delete(self, key: str) -> bool:
        if key.endswith(".raw"):
            self.deleting.set()
            # still deleting when the compactor gets to its orphan
            threading.Timer(0.2, self.delete_done.set).start()
            self.delete_done.wait(10)
        return self.inner.delete(key)

    def before_commit(self, engine: Engine, digest: Digest) -> None:
        self.deleter = threading.Thread(target=lambda: engine.delete(digest))
        self.deleter.start()
        assert self.deleting.wait(10)


def test_a_delete_still_running_when_compression_ends_leaves_nothing(tmp_path: Path) -> None:
    with deleting_engine(tmp_path, DeleteAcrossCommit) as (engine, backend):
        digest = ingest_raw(engine)
        assert not engine.compactor.compact(digest)
        assert isinstance(backend, DeleteAcrossCommit) and backend.deleter is not None
        backend.deleter.join(10)
        assert not engine.exists(digest) and objects_of(engine, digest) == []


class LoseDeletes(WrappedBackend):
    """Deletes of raw objects fail: the state a crash between the swap and the delete
    leaves."""

    def delete(self, key: str) -> bool:
        if key.endswith(".raw"):
            raise OSError("lost")
        return self.inner.delete(key)


def test_a_crash_after_the_swap_leaves_an_orphan_gc_removes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        digest = ingest_raw(engine)
        crashing = Engine(LoseDeletes(engine.backend), engine.index)
        with pytest.raises(OSError):
            crashing.compactor.compact(digest)
        assert engine.stat(digest).codec == ZST and engine.read_bytes(digest) == DATA
        raw = blob_key(Digest.parse(digest), RAW)
        assert sorted(objects_of(engine, digest)) == sorted([raw, blob_key(Digest.parse(digest),
                                                                           ZST)])
        findings = Checker(Registry(engine)).run().findings
        assert [(f.kind, f.digest) for f in findings] == [("orphan-object", digest)]
        old = time.time() - 7200  # orphans are left alone for the grace window
        os.utime(root / raw, (old, old))
        report = Collector(Registry(engine), grace=3600, orphans=True).run()
        assert report.orphans == 1
        assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), ZST)]
        assert Checker(Registry(engine), full=True).run().clean


def test_damaged_raw_bytes_are_not_compressed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        digest = ingest_raw(engine)
        path = root / blob_key(Digest.parse(digest), RAW)
        damaged = bytearray(path.read_bytes())
        damaged[len(damaged) // 2] ^= 1
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptObject):
            engine.compactor.compact(digest)
        assert engine.stat(digest).codec == RAW  # check reports it; nothing else changed
        assert objects_of(engine, digest) == [blob_key(Digest.parse(digest), RAW)]
        assert not list((root / ".tmp").iterdir())


def test_close_finishes_the_queue(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    blobs = [text(2 * MIB + i) for i in range(3)]
    with Engine.open(root) as engine:
        digests = [str(engine.ingest(b).digest) for b in blobs]
    with Engine.open(root) as engine:
        assert [engine.stat(d).codec for d in digests] == [ZST] * 3



class CompactOnStat(WrappedBackend):
    """Compresses the blob just as ``check`` looks at its raw object."""

    engine: Engine | None = None

    def stat(self, key: str) -> ObjectInfo:
        parsed = parse_blob_key(key)
        if parsed is not None and parsed[1] == RAW and self.engine is not None:
            assert self.engine.compactor.compact(str(parsed[0]))
        return self.inner.stat(key)


def test_check_racing_the_swap_reports_nothing(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root")) as engine:
        digest = ingest_raw(engine)
        backend = CompactOnStat(engine.backend)
        racing = Engine(backend, engine.index)
        backend.engine = racing
        assert Checker(Registry(racing), full=True).run().clean
        assert engine.stat(digest).codec == ZST


def test_closing_without_finishing_leaves_the_queue_marked(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    blobs = [text(2 * MIB + i) for i in range(4)]
    with Engine.open(root) as engine:
        compactor = engine.compactor
        gate = threading.Event()
        real = compactor.compact

        def gated(digest: str) -> bool:  # the thread's first blob waits until close began
            gate.wait(30)
            return real(digest)

        compactor.compact = gated  # type: ignore[method-assign]
        digests = [str(engine.ingest(b).digest) for b in blobs]
        closer = threading.Thread(target=lambda: compactor.close(finish=False))
        closer.start()
        while not compactor._skip:
            time.sleep(0.001)
        gate.set()
        closer.join()
        # the blob at hand was finished, the queued ones were left
        assert [engine.stat(d).codec for d in digests] == [ZST, RAW, RAW, RAW]
    with Engine.open(root) as engine:
        assert engine.compactor.resume() == 3
        assert engine.wait_compacted(60)
        assert [engine.stat(d).codec for d in digests] == [ZST] * 4


def test_a_zst_orphan_from_a_killed_compactor_is_replaced(engine: Engine) -> None:
    """A .zst object beside a raw record (a compactor killed before its swap) may hold
    anything: it is removed, and the blob compressed afresh."""
    digest = ingest_raw(engine)
    engine.backend.put(blob_key(Digest.parse(digest), ZST), b"half a compression")
    assert engine.compactor.compact(digest)
    assert engine.read_bytes(digest) == DATA
    assert Checker(Registry(engine), full=True).run().clean
