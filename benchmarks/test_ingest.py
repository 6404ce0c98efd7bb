"""Ingest and read throughput of the foundation, each next to the machine's own limit.

Run with ``pytest benchmarks`` (never part of the default suite). See benchmarks/README.md.

- Large blob (``CASENGINE_BENCH_SIZE``, 256 MiB): ingest into ``memory://`` and into a fresh
  local root per round, from bytes and from a file path, against ``hashlib.sha256`` over the
  same bytes; read of a stored local blob against a plain read of a file of the same size.
- Small blobs (1000 x 16 KiB): the per-blob overhead of an ingest, against hashing each blob.

Targets (the issue's): local ingest >= 0.85x sha256, memory >= 0.9x, local read >= 0.8x of a
plain file read. They are recorded (``extra_info["meets_target"]``), not asserted, unless
``CASENGINE_BENCH_STRICT=1``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from casengine.backend import READ_CHUNK
from casengine.digest import Digest
from casengine.engine import Engine, IngestResult

TARGET_LOCAL = 0.85
TARGET_MEMORY = 0.90
TARGET_READ = 0.80


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def big_digest(big_blob: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(big_blob).hexdigest())


@pytest.fixture(scope="session")
def big_file(big_blob: bytes, bench_dir: str) -> str:
    """The same bytes as a plain file, durable and warm in the page cache."""
    path = os.path.join(bench_dir, "plain.bin")
    with open(path, "wb") as f:
        f.write(big_blob)
        f.flush()
        os.fsync(f.fileno())
    plain_read(path)
    return path


@pytest.fixture(scope="module")
def stored_local(big_blob: bytes, big_digest: Digest, bench_dir: str) -> Iterator[Engine]:
    """A local root holding the big blob, read once so it is as warm as ``big_file``."""
    root = os.path.join(bench_dir, "read-root")
    engine = Engine.open(root)
    try:
        assert engine.ingest(big_blob).digest == big_digest
        assert drain(engine.read(big_digest)) == len(big_blob)
        yield engine
    finally:
        engine.close()
        shutil.rmtree(root, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------------


def sha256_limit(data: bytes) -> Callable[[], Any]:
    return lambda: hashlib.sha256(data).digest()


def plain_read(path: str, chunk: int = READ_CHUNK) -> int:
    """The plain way to read a file, in chunks of the engine's read size."""
    n = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            n += len(block)
    return n


def drain(chunks: Iterator[bytes]) -> int:
    return sum(len(c) for c in chunks)


def open_memory() -> Engine:
    return Engine.open("memory://")


def close_memory(engine: Engine) -> None:
    engine.close()


def open_local(make_root: Callable[[], str]) -> Callable[[], tuple[Engine, str]]:
    def setup() -> tuple[Engine, str]:
        root = make_root()
        return Engine.open(root), root
    return setup


def close_local(state: tuple[Engine, str]) -> None:
    engine, root = state
    engine.close()
    shutil.rmtree(root, ignore_errors=True)


# -- the large blob ---------------------------------------------------------------------


@pytest.mark.benchmark(group="ingest-large")
def test_limit_sha256(benchmark: Any, big_blob: bytes, bench_rounds: int) -> None:
    """The limit itself, for the pytest-benchmark table: hashlib.sha256 over the bytes."""
    benchmark.extra_info["bytes"] = len(big_blob)
    benchmark.pedantic(sha256_limit(big_blob), rounds=bench_rounds, warmup_rounds=1)


@pytest.mark.benchmark(group="ingest-large")
def test_ingest_memory(paired: Any, big_blob: bytes, big_digest: Digest) -> None:
    result: IngestResult = paired(
        sha256_limit(big_blob), lambda engine: engine.ingest(big_blob),
        setup=open_memory, teardown=close_memory,
        nbytes=len(big_blob), limit_name="sha256", target_ratio=TARGET_MEMORY,
    )
    assert result.digest == big_digest and result.size == len(big_blob) and result.created


@pytest.mark.benchmark(group="ingest-large")
@pytest.mark.parametrize("source", ["bytes", "path"])
def test_ingest_local(paired: Any, fresh_root: Callable[[], str], big_blob: bytes,
                      big_digest: Digest, big_file: str, source: str) -> None:
    """A fresh root per round (untimed); the ingest includes its fsyncs and the index commit."""
    src = big_blob if source == "bytes" else big_file
    result: IngestResult = paired(
        sha256_limit(big_blob), lambda state: state[0].ingest(src),
        setup=open_local(fresh_root), teardown=close_local,
        nbytes=len(big_blob), limit_name="sha256", target_ratio=TARGET_LOCAL,
    )
    assert result.digest == big_digest and result.size == len(big_blob) and result.created


@pytest.mark.benchmark(group="read-large")
def test_limit_plain_read(benchmark: Any, big_file: str, bench_rounds: int) -> None:
    """The limit itself: a plain buffered read of a warm file, in 1 MiB chunks."""
    benchmark.extra_info["bytes"] = os.path.getsize(big_file)
    n = benchmark.pedantic(plain_read, args=(big_file,), rounds=bench_rounds, warmup_rounds=1)
    assert n == os.path.getsize(big_file)


@pytest.mark.benchmark(group="read-large")
def test_read_local(paired: Any, stored_local: Engine, big_file: str, big_digest: Digest,
                    big_blob: bytes) -> None:
    """Engine.read of a stored local blob (warm) next to a plain read of a warm file."""
    n = paired(
        lambda: plain_read(big_file), lambda _: drain(stored_local.read(big_digest)),
        nbytes=len(big_blob), limit_name="plain_read", target_ratio=TARGET_READ,
    )
    assert n == len(big_blob)


# -- small blobs: per-blob overhead -----------------------------------------------------


@pytest.mark.benchmark(group="ingest-small")
@pytest.mark.parametrize("backend", ["memory", "local"])
def test_ingest_small(paired: Any, fresh_root: Callable[[], str], small_blobs: list[bytes],
                      backend: str) -> None:
    """1000 ingests of 16 KiB each into a fresh store, next to 1000 separate sha256 calls.

    ``extra_info["overhead_us_per_item"]`` is the engine's median extra time per blob. A local
    ingest is durable (file, directory and index fsyncs), so its overhead is mostly the disk's.
    """

    def hash_each() -> None:
        for blob in small_blobs:
            hashlib.sha256(blob).digest()

    def ingest_each(state: Any) -> int:
        engine = state if backend == "memory" else state[0]
        return sum(engine.ingest(blob).created for blob in small_blobs)

    if backend == "memory":
        setup, teardown = open_memory, close_memory
    else:
        setup, teardown = open_local(fresh_root), close_local
    created = paired(
        hash_each, ingest_each, setup=setup, teardown=teardown,
        nbytes=sum(map(len, small_blobs)), limit_name="sha256", items=len(small_blobs),
        # a local round is fsync-bound (seconds): skip the warm-up to stay well under a minute
        warmup=1 if backend == "memory" else 0,
    )
    assert created == len(small_blobs)
