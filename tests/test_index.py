"""casengine.index: the LMDB blob records, across reopen, threads and processes."""

from __future__ import annotations

import multiprocessing
import random
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from casengine.errors import ConfigError
from casengine.index import BlobRecord, LmdbIndex
from tests.helpers import fake_digest, index_writer, make_record


@pytest.fixture
def index_path(tmp_path: Path) -> str:
    return str(tmp_path / "index")


@pytest.fixture
def index(index_path: str) -> Iterator[LmdbIndex]:
    idx = LmdbIndex(index_path)
    yield idx
    idx.close()


def _record(label: str, **kw: object) -> BlobRecord:
    return replace(make_record(fake_digest(label)), **kw)  # type: ignore[arg-type]


def test_add_get(index: LmdbIndex) -> None:
    r = BlobRecord(fake_digest("a"), 123, "raw", 120, "0123456789abcdef" * 2, 1000.5, 1000.5)
    assert index.get_blob(r.digest) is None
    assert index.add_blob(r)
    assert index.get_blob(r.digest) == r
    assert index.count_blobs() == 1
    assert index.get_blob(fake_digest("b")) is None


def test_add_twice_touches_and_keeps_the_first(index: LmdbIndex) -> None:
    first = _record("a", size=5, stored_size=5, created=100.0, touched=100.0)
    assert index.add_blob(first)
    again = _record("a", size=999, stored_size=999, xxh3="f" * 32, created=200.0, touched=200.0)
    assert not index.add_blob(again)
    assert index.get_blob(first.digest) == replace(first, touched=200.0)
    assert index.count_blobs() == 1


def test_touch(index: LmdbIndex) -> None:
    r = _record("a", created=100.0, touched=100.0)
    assert not index.touch_blob(r.digest, 150.0)
    assert index.get_blob(r.digest) is None  # touching does not create
    index.add_blob(r)
    assert index.touch_blob(r.digest, 150.0)
    assert index.get_blob(r.digest) == replace(r, touched=150.0)
    assert index.touch_blob(r.digest)
    got = index.get_blob(r.digest)
    assert got is not None and got.touched > 1_600_000_000 and got.created == 100.0


def test_touch_to_the_epoch(index: LmdbIndex) -> None:
    r = _record("a", created=100.0, touched=100.0)
    index.add_blob(r)
    assert index.touch_blob(r.digest, 0.0)
    got = index.get_blob(r.digest)
    assert got is not None and got.touched == 0.0


def test_delete(index: LmdbIndex) -> None:
    r = _record("a")
    index.add_blob(r)
    index.add_blob(_record("b"))
    assert index.delete_blob(r.digest)
    assert not index.delete_blob(r.digest)
    assert index.get_blob(r.digest) is None
    assert index.count_blobs() == 1
    assert index.add_blob(r)  # can come back


def test_iter_order_and_start(index: LmdbIndex) -> None:
    labels = [f"blob-{i}" for i in range(50)]
    random.Random(1).shuffle(labels)
    records = [_record(label) for label in labels]
    sha512 = replace(records[0], digest="sha512:" + "ab" * 64)
    for r in [*records, sha512]:
        index.add_blob(r)
    digests = sorted(r.digest for r in [*records, sha512])
    assert [r.digest for r in index.iter_blobs()] == digests
    assert digests[-1].startswith("sha512:")
    assert index.count_blobs() == 51
    # from an existing digest: inclusive
    assert [r.digest for r in index.iter_blobs(digests[20])] == digests[20:]
    # from between two digests
    between = digests[20][:-1] + chr(ord(digests[20][-1]) + 1) if digests[20][-1] != "f" \
        else digests[20] + "0"
    assert [r.digest for r in index.iter_blobs(between)] == digests[21:]
    assert [r.digest for r in index.iter_blobs("sha512:")] == [sha512.digest]
    assert list(index.iter_blobs("sha9")) == []
    assert list(index.iter_blobs("zzz")) == []


def test_iteration_crosses_batches_while_the_index_changes(tmp_path: Path) -> None:
    idx = LmdbIndex(str(tmp_path / "big"), temporary=True)  # no fsync: 2500 quick inserts
    try:
        records = sorted((_record(f"r{i}") for i in range(2500)), key=lambda r: r.digest)
        for r in records:
            idx.add_blob(r)
        assert [r.digest for r in idx.iter_blobs()] == [r.digest for r in records]
        assert [r.digest for r in idx.iter_blobs(records[999].digest)] == \
            [r.digest for r in records[999:]]
        # Delete the record a batch resumes from, and one just after it, mid-walk.
        seen = []
        for n, r in enumerate(idx.iter_blobs()):
            seen.append(r.digest)
            if n == 999:
                idx.delete_blob(records[999].digest)
                idx.delete_blob(records[1000].digest)
        expected = [r.digest for r in records[:1000]] + [r.digest for r in records[1001:]]
        assert seen == expected
        assert len(set(seen)) == len(seen)
    finally:
        idx.close()
    assert not (tmp_path / "big").exists()  # a temporary index removes itself


def test_records_survive_reopen(index_path: str) -> None:
    records = [_record(f"x{i}", size=i, created=float(i), touched=float(i)) for i in range(20)]
    idx = LmdbIndex(index_path)
    for r in records:
        idx.add_blob(r)
    idx.delete_blob(records[3].digest)
    idx.touch_blob(records[4].digest, 99.0)
    idx.close()
    again = LmdbIndex(index_path)
    try:
        expected = {r.digest: r for r in records}
        del expected[records[3].digest]
        expected[records[4].digest] = replace(records[4], touched=99.0)
        assert {r.digest: r for r in again.iter_blobs()} == expected
        assert again.count_blobs() == 19
    finally:
        again.close()


def test_unusable_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(ConfigError, match="index"):
        LmdbIndex(str(blocker / "index"))


def test_threads_adding_the_same_digests(index: LmdbIndex) -> None:
    created: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        mine = [i for i in range(100) if index.add_blob(_record(f"same-{i}"))]
        with lock:
            created.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == list(range(100)), "each digest is created exactly once"
    assert index.count_blobs() == 100


def test_two_processes_writing_at_once_lose_nothing(index_path: str) -> None:
    LmdbIndex(index_path).close()  # create it first, as a running server would have
    ctx = multiprocessing.get_context("spawn")  # LMDB handles must not cross a fork
    start = ctx.Event()
    results = ctx.Queue()
    count, shared = 200, 50
    procs = [ctx.Process(target=index_writer, args=(index_path, w, count, shared, start, results))
             for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    reports = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for worker, created in reports.items():
        assert isinstance(created, list), f"worker {worker} failed: {created}"
    # every shared digest was created by exactly one of the two
    assert sorted(reports[0] + reports[1]) == list(range(shared))
    idx = LmdbIndex(index_path)
    try:
        got = {r.digest: r for r in idx.iter_blobs()}
        assert idx.count_blobs() == len(got) == 2 * count + shared
        for w in range(2):
            for i in range(count):
                assert got[fake_digest(f"w{w}-{i}")].size == i
        for i in range(shared):
            assert got[fake_digest(f"shared-{i}")].size == i
    finally:
        idx.close()


@pytest.mark.timeout(60)
def test_two_threads_opening_one_root_at_once_never_both_get_it(tmp_path: Path) -> None:
    """lmdb allows one environment per file per process; two opens racing must leave one
    engine and one clear error, never two environments (which hang in lmdb)."""
    from casengine.engine import Engine
    from casengine.errors import ConfigError

    root = str(tmp_path / "root")
    Engine.open(root).close()
    def race(start: threading.Barrier, opened: list[Engine],
             refused: list[ConfigError]) -> None:
        start.wait()
        try:
            opened.append(Engine.open(root))
        except ConfigError as exc:
            refused.append(exc)

    for _ in range(40):
        start = threading.Barrier(2)
        opened: list[Engine] = []
        refused: list[ConfigError] = []
        threads = [threading.Thread(target=race, args=(start, opened, refused), daemon=True)
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), "an open hung"
        assert (len(opened), len(refused)) == (1, 1), (opened, refused)
        opened[0].ingest(b"x")
        opened[0].close()


def test_a_data_file_cut_short_is_refused_not_a_sigbus(tmp_path: Path) -> None:
    """Opened, a truncated data.mdb kills the reading process with SIGBUS; the command
    must instead say the index is damaged and name the way back."""
    import os

    from casengine.engine import Engine
    from tests.helpers import one_line_error, run_cli

    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        for n in range(2000):
            engine.ingest(f"blob {n}".encode() * 20)
    data = root / ".index" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    err = one_line_error(run_cli(["--root", str(root), "usage"], cwd=tmp_path), 8)
    assert "damaged" in err and "reindex" in err
