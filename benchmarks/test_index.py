"""Index lookups and inserts per second at 10k, 100k and 1M records, next to bare LMDB.

Run with ``pytest benchmarks/test_index.py`` (never part of the default suite). Each
benchmark pairs the engine's index (:class:`casengine.index.LmdbIndex`, durable as a local
root's index is) with the same work done on the same LMDB environment by the ``lmdb``
module directly, round by round (A B A B, see ``conftest.py``): the ratio is what the
index layer costs over LMDB itself, and ``extra_info`` carries both rates in operations per
second (``ops_per_s``, ``limit_ops_per_s``) and the overhead per operation.

- ``test_bulk_load``: all N records into a fresh index in one write transaction
  (``index.transaction(write=True)`` + ``txn.put`` of packed records, as a rebuild would),
  commit included; the limit puts the same pre-packed bytes with ``lmdb`` in one transaction.
- ``test_get_blob``: 10,000 ``get_blob`` calls (each its own read transaction, as the engine
  does) on an index of N records, for digests that are stored (hit) or not (miss); the limit
  is one bare ``txn.get`` per read transaction.
- ``test_add_blob``: 100 ``add_blob`` calls on an index of N records, each its own durable
  write transaction (what every ingest pays); the limit is one bare ``put`` per durable
  transaction. Both are fsync-bound on a real disk.

Every index lives in the session's scratch directory and is removed after its tests.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from casengine.index import BlobRecord, LmdbIndex, pack_blob

COUNTS = (10_000, 100_000, 1_000_000)
LOOKUPS = 10_000
ADDS = 100
WARMUP = 1
SIZE = 12_345_678
WHEN = 1_700_000_000.0
XXH3 = "5a" * 16


def digests(n: int) -> list[str]:
    """``n`` distinct random sha256 digests."""
    raw = os.urandom(32 * n).hex()
    return [f"sha256:{raw[i:i + 64]}" for i in range(0, 64 * n, 64)]


def record(digest: str) -> BlobRecord:
    return BlobRecord(digest, SIZE, "raw", SIZE, XXH3, WHEN, WHEN)


def blobs_db(index: LmdbIndex) -> Any:
    """The index's own ``blobs`` table, as a bare lmdb handle."""
    return index.env.open_db(b"blobs")


def fresh_index(parent: str) -> LmdbIndex:
    """A new durable index, like a local root's own."""
    return LmdbIndex(tempfile.mkdtemp(prefix="index-", dir=parent))


def remove(index: LmdbIndex) -> None:
    index.close()
    shutil.rmtree(index.path, ignore_errors=True)


class Rates:
    """Times of the limit and the engine side, to report operations per second."""

    def __init__(self, items: int) -> None:
        self.items = items
        self.limit: list[float] = []
        self.engine: list[float] = []

    def timing(self, times: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args)
            times.append(time.perf_counter() - t0)
            return out
        return run

    def report(self, benchmark: Any) -> None:
        if benchmark.disabled or len(self.engine) <= WARMUP:
            return
        engine = statistics.median(self.engine[WARMUP:])
        limit = statistics.median(self.limit[WARMUP:])
        benchmark.extra_info.update({
            "items": self.items,
            "ops_per_s": round(self.items / engine),
            "limit_ops_per_s": round(self.items / limit),
        })


@pytest.fixture(scope="module", params=COUNTS, ids=lambda n: f"{n // 1000}k")
def populated(request: pytest.FixtureRequest, bench_dir: str) -> Iterator[tuple[LmdbIndex, list[str]]]:
    """A durable index of N blob records (bulk-loaded, untimed), removed after its tests."""
    stored = digests(request.param)
    index = fresh_index(bench_dir)
    value = pack_blob(record(stored[0]))
    db = blobs_db(index)
    with index.env.begin(write=True) as txn:
        for d in stored:
            txn.put(d.encode(), value, db=db)
    try:
        yield index, stored
    finally:
        remove(index)


@pytest.mark.benchmark(group="index-bulk-load")
def test_bulk_load(paired: Any, benchmark: Any, bench_dir: str,
                   populated: tuple[LmdbIndex, list[str]]) -> None:
    _, stored = populated
    n = len(stored)
    keys = [d.encode() for d in stored]
    value = pack_blob(record(stored[0]))
    rates = Rates(n)
    spare: list[LmdbIndex] = [fresh_index(bench_dir)]  # the limit's next empty index
    used: list[LmdbIndex] = []

    def limit() -> None:
        index = spare.pop()
        used.append(index)
        db = blobs_db(index)
        with index.env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, value, db=db)

    def setup() -> LmdbIndex:
        return fresh_index(bench_dir)

    def load(index: LmdbIndex) -> int:
        with index.transaction(write=True) as txn:
            for d in stored:
                txn.put("blobs", d.encode(), pack_blob(record(d)))
        return index.count_blobs()

    def teardown(index: LmdbIndex) -> None:
        remove(index)
        while used:
            remove(used.pop())
        if not spare:
            spare.append(fresh_index(bench_dir))

    try:
        count = paired(rates.timing(rates.limit, limit), rates.timing(rates.engine, load),
                       setup=setup, teardown=teardown, nbytes=n * (len(keys[0]) + len(value)),
                       limit_name="lmdb_put", items=n, warmup=WARMUP)
    finally:
        for index in spare + used:
            remove(index)
    rates.report(benchmark)
    assert count == n


@pytest.mark.benchmark(group="index-lookup")
@pytest.mark.parametrize("kind", ["hit", "miss"])
def test_get_blob(paired: Any, benchmark: Any, populated: tuple[LmdbIndex, list[str]],
                  kind: str) -> None:
    index, stored = populated
    rng = random.Random(len(stored))
    sample = rng.sample(stored, LOOKUPS) if kind == "hit" else digests(LOOKUPS)
    keys = [d.encode() for d in sample]
    env, db = index.env, blobs_db(index)
    rates = Rates(LOOKUPS)

    def limit() -> None:
        for k in keys:
            with env.begin() as txn:
                txn.get(k, db=db)

    def lookups(_: Any) -> int:
        return sum(index.get_blob(d) is not None for d in sample)

    found = paired(rates.timing(rates.limit, limit), rates.timing(rates.engine, lookups),
                   nbytes=LOOKUPS * len(keys[0]), limit_name="lmdb_get", items=LOOKUPS,
                   warmup=WARMUP)
    rates.report(benchmark)
    assert found == (LOOKUPS if kind == "hit" else 0)


@pytest.mark.benchmark(group="index-insert")
def test_add_blob(paired: Any, benchmark: Any, populated: tuple[LmdbIndex, list[str]]) -> None:
    """Durable inserts one transaction each; the records added are removed afterwards."""
    index, stored = populated
    env, db = index.env, blobs_db(index)
    value = pack_blob(record(stored[0]))
    rates = Rates(ADDS)
    added: list[str] = []
    pending: list[list[bytes]] = []  # the limit's next keys, made untimed

    def new_digests() -> list[str]:
        fresh = digests(ADDS)
        added.extend(fresh)
        return fresh

    def limit() -> None:
        for k in pending.pop():
            with env.begin(write=True) as txn:
                txn.put(k, value, db=db)

    def setup() -> list[BlobRecord]:
        pending.append([d.encode() for d in new_digests()])  # for the next round's limit
        return [record(d) for d in new_digests()]

    def adds(records: list[BlobRecord]) -> int:
        return sum(index.add_blob(r) for r in records)

    pending.append([d.encode() for d in new_digests()])
    try:
        created = paired(rates.timing(rates.limit, limit), rates.timing(rates.engine, adds),
                         setup=setup, nbytes=ADDS * (71 + len(value)), limit_name="lmdb_put_txn",
                         items=ADDS, warmup=WARMUP)
    finally:
        with index.env.begin(write=True) as txn:
            for d in added:
                txn.delete(d.encode(), db=db)
    rates.report(benchmark)
    assert created == ADDS
    assert index.count_blobs() == len(stored)
