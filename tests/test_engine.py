"""casengine.engine: ingest, verify, dedupe, read, stat, delete, list, on memory:// and a
local root; failures mid-write; and bounded memory (I6)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from casengine.backend import Writer
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import (
    BlobNotFound,
    Closed,
    DigestMismatch,
    IntegrityError,
    InvalidDigest,
    InvalidInput,
    NotFound,
    SizeMismatch,
    UnsupportedAlgorithm,
)
from casengine.layout import blob_key
from tests.helpers import (
    KINDS,
    MIB,
    REPO,
    FailingBackend,
    WrappedBackend,
    assert_nothing_published,
    audit,
    blob_objects,
    digest_of,
    open_engine,
    pipe_from,
    tmp_files,
)

#: Small chunks, so a few hundred KiB go through many chunks and the writer thread.
SMALL_CHUNK = 64 * 1024


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(kind: str, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(kind, tmp_path)
    yield e
    e.close()


@pytest.fixture
def small(engine: Engine) -> Engine:
    """The same engine, reading sources in 64 KiB chunks."""
    engine.chunk_size = SMALL_CHUNK
    return engine


def _data(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"data-{seed}".encode()).digest(n) if n else b""


def _read(engine: Engine, digest: object, start: int = 0, length: int | None = None) -> bytes:
    return b"".join(engine.read(digest, start, length))  # type: ignore[arg-type]


def _check_stored(engine: Engine, data: bytes, algorithm: str = "sha256") -> str:
    digest = digest_of(data, algorithm)
    assert _read(engine, digest) == data
    record = engine.stat(digest)
    assert (record.digest, record.size, record.codec) == (digest, len(data), "raw")
    assert record.stored_size == len(data)
    assert record.xxh3 == xxhash.xxh3_128(data).hexdigest()
    assert record.created <= record.touched
    assert blob_key(Digest.parse(digest)) in blob_objects(engine)
    assert tmp_files(engine) == []
    return digest


# -- sources --------------------------------------------------------------------------------

SIZES = [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, 5 * SMALL_CHUNK + 17]


@pytest.mark.parametrize("n", SIZES)
def test_ingest_bytes_like(small: Engine, n: int) -> None:
    data = _data(n)
    for i, source in enumerate([data, bytearray(data), memoryview(data)]):
        result = small.ingest(source)
        assert str(result.digest) == digest_of(data)
        assert result.size == n
        assert result.created is (i == 0)
    _check_stored(small, data)
    assert small.index.count_blobs() == 1


@pytest.mark.parametrize("n", SIZES)
def test_ingest_path(small: Engine, tmp_path: Path, n: int) -> None:
    data = _data(n, 1)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    result = small.ingest(str(path))
    assert (str(result.digest), result.size, result.created) == (digest_of(data), n, True)
    assert not small.ingest(path).created  # a PathLike as well
    _check_stored(small, data)


@pytest.mark.parametrize("n", SIZES)
def test_ingest_binary_file(small: Engine, tmp_path: Path, n: int) -> None:
    data = _data(n, 2)
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert str(small.ingest(f).digest) == digest_of(data)
    with open(path, "rb", buffering=0) as f:
        assert str(small.ingest(f, digest=digest_of(data), size=n).digest) == digest_of(data)
    assert str(small.ingest(io.BytesIO(data)).digest) == digest_of(data)
    _check_stored(small, data)


class _ReadOnly:
    """A file-like object with read() only: no readinto."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 1000) if n > 0 else n)  # short reads, too


def test_ingest_read_only_file_object(small: Engine) -> None:
    data = _data(300_000, 3)
    assert str(small.ingest(_ReadOnly(data)).digest) == digest_of(data)
    _check_stored(small, data)


@pytest.mark.parametrize("n", [0, 1, 3 * SMALL_CHUNK + 5, 9 * MIB + 123])
def test_ingest_pipe(engine: Engine, n: int) -> None:
    data = _data(n, 4)
    reader, feeder = pipe_from(data)
    with reader:
        result = engine.ingest(reader, size=n)
    feeder.join()
    assert (str(result.digest), result.size, result.created) == (digest_of(data), n, True)
    _check_stored(engine, data)


def test_ingest_iterable_of_chunks(small: Engine) -> None:
    data = _data(400_000, 5)
    pieces = [data[:1], b"", data[1:70_000], bytearray(data[70_000:300_000]), b"",
              memoryview(data)[300_000:]]
    assert str(small.ingest(pieces).digest) == digest_of(data)
    assert str(small.ingest(iter(pieces)).digest) == digest_of(data)

    def gen() -> Iterator[bytes]:
        for off in range(0, len(data), 4096):
            yield data[off : off + 4096]

    assert str(small.ingest(gen(), size=len(data)).digest) == digest_of(data)
    assert str(small.ingest([]).digest) == digest_of(b"")
    _check_stored(small, data)


def test_iterable_of_non_bytes_is_refused(small: Engine) -> None:
    with pytest.raises(InvalidInput, match="str"):
        small.ingest([b"abc" * 30_000, "text", b"def"])
    with pytest.raises(InvalidInput, match="int"):
        small.ingest([b"x" * 300_000, 42])
    assert_nothing_published(small)


@pytest.mark.parametrize("source", [42, 4.5, None, object()])
def test_unknown_source_type_is_refused(engine: Engine, source: object) -> None:
    with pytest.raises(InvalidInput):
        engine.ingest(source)  # type: ignore[arg-type]
    assert_nothing_published(engine)


# -- verification -----------------------------------------------------------------------------


def test_correct_digest_and_size(small: Engine) -> None:
    data = _data(200_000, 6)
    result = small.ingest(data, digest=digest_of(data), size=len(data))
    assert result.created and str(result.digest) == digest_of(data)
    result = small.ingest(data, digest=Digest.parse(digest_of(data)), size=len(data))
    assert not result.created
    _check_stored(small, data)


def _source(data: bytes, how: str) -> Any:
    """``data`` as each kind of source: bytes, a file object, an iterator of chunks, a pipe."""
    if how == "bytes":
        return data
    if how == "file":
        return io.BytesIO(data)
    if how == "chunks":
        return iter([data[i : i + 10_000] for i in range(0, len(data), 10_000)])
    if how == "pipe":
        reader, feeder = pipe_from(data)
        _pipes.append((reader, feeder))
        return reader
    raise ValueError(how)


_pipes: list[tuple[Any, threading.Thread]] = []


@pytest.fixture(autouse=True)
def _close_pipes() -> Iterator[None]:
    """Close the pipes _source opened: a failed ingest leaves its feeder blocked otherwise."""
    yield
    while _pipes:
        reader, feeder = _pipes.pop()
        reader.close()
        feeder.join(timeout=10)
        assert not feeder.is_alive()


@pytest.mark.parametrize("how", ["bytes", "file", "chunks", "pipe"])
def test_digest_mismatch_names_both_and_stores_nothing(small: Engine, how: str) -> None:
    data = _data(300_000, 7)
    expected = digest_of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        small.ingest(_source(data, how), digest=expected)
    err = info.value
    assert str(err.expected) == expected and str(err.actual) == digest_of(data)
    assert expected in str(err) and digest_of(data) in str(err)
    assert isinstance(err, IntegrityError) and isinstance(err, InvalidInput)
    assert_nothing_published(small)
    assert not small.exists(digest_of(data)) and not small.exists(expected)


@pytest.mark.parametrize("how", ["bytes", "file", "chunks", "pipe"])
@pytest.mark.parametrize("delta", [-1, +1, -100_000, +100_000])
def test_size_mismatch_stores_nothing(small: Engine, how: str, delta: int) -> None:
    data = _data(300_000, 8)
    with pytest.raises(SizeMismatch) as info:
        small.ingest(_source(data, how), size=len(data) + delta)
    assert info.value.expected == len(data) + delta
    assert str(len(data) + delta) in str(info.value)
    if delta > 0:  # a short body is found at the end, a long one as soon as it overflows
        assert info.value.actual == len(data)
    else:
        assert info.value.actual > len(data) + delta
    assert_nothing_published(small)


def test_size_mismatch_with_the_right_digest_stores_nothing(small: Engine) -> None:
    data = _data(300_000, 9)
    with pytest.raises(SizeMismatch):
        small.ingest(data, digest=digest_of(data), size=len(data) - 1)
    with pytest.raises(SizeMismatch):
        small.ingest(data, digest=digest_of(data), size=len(data) + 1)
    assert_nothing_published(small)


@pytest.mark.parametrize("cut", [0, 1, 150_000, 299_999])
def test_truncated_stream_with_a_size_stores_nothing(small: Engine, cut: int) -> None:
    data = _data(300_000, 10)
    reader, feeder = pipe_from(data, close_early_at=cut)
    with reader, pytest.raises(SizeMismatch) as info:
        small.ingest(reader, size=len(data))
    feeder.join()
    assert (info.value.expected, info.value.actual) == (len(data), cut)
    assert_nothing_published(small)
    # the same truncation with only the digest is a digest mismatch
    reader, feeder = pipe_from(data, close_early_at=cut)
    with reader, pytest.raises(DigestMismatch):
        small.ingest(reader, digest=digest_of(data))
    feeder.join()
    assert_nothing_published(small)


@pytest.mark.parametrize("size", [-1, 1.5, "10"])
def test_invalid_size_is_refused(engine: Engine, size: object) -> None:
    with pytest.raises(InvalidInput):
        engine.ingest(b"abc", size=size)  # type: ignore[arg-type]
    assert_nothing_published(engine)


def test_malformed_expected_digest_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidDigest, match="'sha256:abc'"):
        engine.ingest(b"abc", digest="sha256:abc")
    with pytest.raises(UnsupportedAlgorithm):
        engine.ingest(b"abc", digest="md5:900150983cd24fb0d6963f7d28e17f72")
    with pytest.raises(UnsupportedAlgorithm):
        engine.ingest(b"abc", algorithm="sha1")
    assert_nothing_published(engine)


def test_sha512(small: Engine) -> None:
    data = _data(200_000, 11)
    d512 = digest_of(data, "sha512")
    result = small.ingest(data, algorithm="sha512")
    assert str(result.digest) == d512 and result.created
    assert not small.ingest(io.BytesIO(data), digest=d512).created
    assert _check_stored(small, data, "sha512") == d512
    assert blob_objects(small) == [f"blobs/sha512/{d512[7:9]}/{d512[7:]}.raw"]
    # the same bytes under sha256 are another blob
    assert small.ingest(data).created
    assert {r.digest for r in small.list()} == {d512, digest_of(data)}
    with pytest.raises(DigestMismatch):
        small.ingest(data[:-1], digest=d512)
    audit(small)


# -- dedupe ------------------------------------------------------------------------------------


def test_dedupe_writes_no_second_object(small: Engine, kind: str) -> None:
    data = _data(300_000, 12)
    digest = digest_of(data)
    assert small.ingest(data).created
    key = blob_key(Digest.parse(digest))
    before = small.backend.stat(key)
    record = small.stat(digest)
    if kind == "local":
        st = os.stat(small.backend.local_path(key))  # type: ignore[attr-defined]
    for source in (data, io.BytesIO(data), [data]):
        assert not small.ingest(source).created
        assert not small.ingest(source if isinstance(source, bytes) else data,
                                digest=digest, size=len(data)).created
    assert small.backend.stat(key) == before
    assert blob_objects(small) == [key]
    assert small.index.count_blobs() == 1
    after = small.stat(digest)
    assert after.created == record.created and after.touched >= record.touched
    if kind == "local":
        st2 = os.stat(small.backend.local_path(key))  # type: ignore[attr-defined]
        assert (st2.st_ino, st2.st_mtime_ns, st2.st_nlink) == (st.st_ino, st.st_mtime_ns, 1)
    assert tmp_files(small) == []


def test_dedupe_with_an_expected_digest_still_refuses_a_wrong_body(small: Engine) -> None:
    data = _data(300_000, 13)
    digest = digest_of(data)
    small.ingest(data)
    wrong = bytearray(data)
    wrong[150_000] ^= 1
    with pytest.raises(DigestMismatch) as info:
        small.ingest(bytes(wrong), digest=digest)
    assert str(info.value.actual) == digest_of(bytes(wrong))
    with pytest.raises(DigestMismatch):
        small.ingest(io.BytesIO(data[:-1]), digest=digest)
    with pytest.raises(SizeMismatch):
        small.ingest(data, digest=digest, size=len(data) - 1)
    with pytest.raises(SizeMismatch):
        small.ingest(data + b"x", digest=digest, size=len(data))
    # the stored blob is untouched, and nothing else was stored
    assert _read(small, digest) == data
    assert small.index.count_blobs() == 1
    assert blob_objects(small) == [blob_key(Digest.parse(digest))]
    assert not small.exists(digest_of(bytes(wrong)))
    assert tmp_files(small) == []


def test_ingest_again_after_delete(small: Engine) -> None:
    data = _data(100_000, 14)
    d = str(small.ingest(data).digest)
    assert small.delete(d)
    assert blob_objects(small) == []
    result = small.ingest(data, digest=d)
    assert result.created
    _check_stored(small, data)


@pytest.mark.timeout(60)
def test_concurrent_ingests_of_the_same_new_content(engine: Engine) -> None:
    data = _data(8 * MIB, 15)
    digest = digest_of(data)
    barrier = threading.Barrier(8)
    results: list[object] = [None] * 8

    def work(i: int) -> None:
        barrier.wait()
        try:
            source = data if i % 2 else io.BytesIO(data)
            results[i] = engine.ingest(source, digest=digest if i % 3 else None)
        except BaseException as exc:  # noqa: BLE001 - checked below
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert not isinstance(r, BaseException), r
        assert str(r.digest) == digest and r.size == len(data)  # type: ignore[union-attr]
    assert sum(r.created for r in results) <= 1  # type: ignore[union-attr]
    assert blob_objects(engine) == [blob_key(Digest.parse(digest))]
    assert engine.index.count_blobs() == 1
    assert hashlib.sha256(_read(engine, digest)).hexdigest() == digest[7:]
    assert tmp_files(engine) == []


class _SlowPublish(WrappedBackend):
    """The first writer to publish pauses after its commit until told to go on."""

    def __init__(self, inner, published: threading.Event, go_on: threading.Event) -> None:
        super().__init__(inner)
        self.published, self.go_on = published, go_on

    def wrap_writer(self, writer: Writer) -> Writer:
        outer = self

        class Pausing(Writer):
            def write(self, data):  # type: ignore[no-untyped-def]
                writer.write(data)
                self.size = writer.size

            def commit(self, key: str, *, exclusive: bool = False) -> bool:
                created = writer.commit(key, exclusive=exclusive)
                if created and not outer.published.is_set():
                    outer.published.set()
                    outer.go_on.wait(timeout=10)
                return created

            def abort(self) -> None:
                writer.abort()

        return Pausing()


def test_exactly_one_concurrent_ingest_reports_created(engine: Engine) -> None:
    data = _data(100_000, 16)
    published, go_on = threading.Event(), threading.Event()
    slow = Engine(_SlowPublish(engine.backend, published, go_on), engine.index)
    results = {}

    def first() -> None:
        results["first"] = slow.ingest(data)

    t = threading.Thread(target=first)
    t.start()
    assert published.wait(timeout=10)
    results["second"] = slow.ingest(data)  # publishes nothing: the object is there
    go_on.set()
    t.join()
    assert blob_objects(engine) == [blob_key(Digest.parse(digest_of(data)))]
    assert engine.index.count_blobs() == 1
    assert [results["first"].created, results["second"].created] == [True, False]


class _SlowDelete(WrappedBackend):
    """Backend deletes wait, once started, until told to go on."""

    def __init__(self, inner, started: threading.Event, go_on: threading.Event) -> None:
        super().__init__(inner)
        self.started, self.go_on = started, go_on

    def delete(self, key: str) -> bool:
        self.started.set()
        self.go_on.wait(timeout=10)
        return self.inner.delete(key)


def test_ingest_racing_a_delete_of_the_same_blob_keeps_it(engine: Engine) -> None:
    data = _data(100_000, 24)
    digest = str(engine.ingest(data).digest)
    started, go_on = threading.Event(), threading.Event()
    slow = Engine(_SlowDelete(engine.backend, started, go_on), engine.index)
    deleter = threading.Thread(target=slow.delete, args=(digest,))
    deleter.start()
    results: list[object] = []
    ingester = threading.Thread(target=lambda: results.append(slow.ingest(data)))
    try:
        assert started.wait(timeout=10)  # the record is gone, the object not yet
        ingester.start()
        ingester.join(0.3)
        assert ingester.is_alive(), "the ingest trusted an object that is being deleted"
    finally:
        go_on.set()
        deleter.join()
        ingester.join(30)
    assert len(results) == 1  # acknowledged...
    # ...so it must be readable afterwards, with its object
    assert engine.exists(digest)
    assert _read(engine, digest) == data
    audit(engine)


@pytest.mark.parametrize("after", [0, 1, 5])
def test_source_failing_mid_stream_leaves_nothing(small: Engine, after: int) -> None:
    def gen() -> Iterator[bytes]:
        for i in range(10):
            if i == after:
                raise ConnectionResetError("client went away (injected)")
            yield _data(SMALL_CHUNK, i)

    with pytest.raises(ConnectionResetError):
        small.ingest(gen())
    assert_nothing_published(small)

    class BrokenFile(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            self.calls += 1
            if self.calls > after:
                raise OSError(104, "Connection reset by peer (injected)")
            b[:1000] = b"z" * 1000
            return 1000

    with pytest.raises(OSError, match="injected"):
        small.ingest(BrokenFile(), digest=digest_of(b"whatever"))
    assert_nothing_published(small)


# -- reading ------------------------------------------------------------------------------------


def test_range_reads(small: Engine) -> None:
    data = _data(300_001, 17)
    d = str(small.ingest(data).digest)
    n = len(data)
    cases = [(0, None), (0, n), (0, 0), (0, 1), (5, 10), (SMALL_CHUNK - 1, 2),
             (SMALL_CHUNK, SMALL_CHUNK), (n - 3, 10), (n - 1, None), (n, None), (n, 5),
             (n - 100, 10**9), (123_456, None), (1, n - 2)]
    for start, length in cases:
        want = data[start:] if length is None else data[start : start + length]
        assert _read(small, d, start, length) == want, (start, length)


@pytest.mark.parametrize(("start", "length"), [(-1, None), (-1, 5), (0, -1), (301, None),
                                               (10**9, 1), (5, -5)])
def test_invalid_range(engine: Engine, start: int, length: int | None) -> None:
    d = str(engine.ingest(_data(300, 18)).digest)
    with pytest.raises(InvalidInput, match="range"):
        engine.read(d, start, length)


@pytest.mark.parametrize("arguments", [{"start": "5"}, {"start": None}, {"start": 1.0},
                                       {"start": float("nan")}, {"length": True},
                                       {"chunk_size": 0}, {"chunk_size": -1}])
def test_read_refuses_arguments_that_are_not_whole_numbers(engine: Engine,
                                                            arguments: dict) -> None:
    """Refused at the call, never a short body: chunk_size 0 used to end the stream at once."""
    d = str(engine.ingest(_data(300, 19)).digest)
    with pytest.raises(InvalidInput, match=f"invalid {next(iter(arguments))} "):
        engine.read(d, **arguments)


def test_a_text_stream_is_refused_clearly(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "text"
    path.write_text("not bytes")
    with path.open() as text:
        for source in (io.StringIO("not bytes"), text):
            with pytest.raises(InvalidInput, match="binary mode"):
                engine.ingest(source)
    assert list(engine.list()) == []


def test_open_takes_a_compression_mode_by_name(tmp_path: Path) -> None:
    with Engine.open(str(tmp_path / "root"), compression="never") as engine:
        assert engine.stat(engine.ingest(b"z" * 100_000).digest).codec == "raw"
    with pytest.raises(InvalidInput, match="compression mode"):
        Engine.open(str(tmp_path / "root"), compression="sometimes")


def test_a_closed_engine_says_so(engine: Engine) -> None:
    d = str(engine.ingest(b"kept").digest)
    engine.close()
    for call in (lambda: engine.ingest(b"x"), lambda: engine.exists(d)):
        with pytest.raises(Closed, match="closed"):
            call()


def test_range_of_an_empty_blob(engine: Engine) -> None:
    d = str(engine.ingest(b"").digest)
    assert _read(engine, d) == b""
    assert _read(engine, d, 0, 10) == b""
    with pytest.raises(InvalidInput):
        engine.read(d, 1)


def test_read_unknown_and_malformed(engine: Engine) -> None:
    unknown = digest_of(b"never stored")
    for call in (engine.read, engine.stat, engine.read_bytes):
        with pytest.raises(BlobNotFound) as info:
            call(unknown)
        assert unknown in str(info.value)
        assert isinstance(info.value, NotFound) and isinstance(info.value, FileNotFoundError)
    assert not engine.exists(unknown)
    for call in (engine.read, engine.stat, engine.exists, engine.delete):
        with pytest.raises(InvalidDigest, match="'sha256:XYZ'"):
            call("sha256:XYZ")


def test_reads_stream_in_chunks(kind: str, tmp_path: Path) -> None:
    with open_engine(kind, tmp_path) as e:
        data = _data(5 * MIB + 7, 19)
        d = str(e.ingest(data).digest)
        chunks = list(e.read(d))
        assert len(chunks) > 1 and max(map(len, chunks)) <= 4 * MIB
        assert b"".join(chunks) == data


def test_stat_and_exists(engine: Engine) -> None:
    data = b"hello, stat"
    d = str(engine.ingest(data).digest)
    assert engine.exists(d) and engine.exists(Digest.parse(d))
    r = engine.stat(Digest.parse(d))
    assert (r.digest, r.size, r.codec, r.stored_size) == (d, len(data), "raw", len(data))


def test_delete(engine: Engine) -> None:
    a = str(engine.ingest(b"a").digest)
    b = str(engine.ingest(b"b").digest)
    assert engine.delete(a)
    assert not engine.delete(a)
    assert not engine.delete(digest_of(b"never"))
    assert not engine.exists(a) and engine.exists(b)
    with pytest.raises(BlobNotFound):
        engine.read(a)
    assert blob_objects(engine) == [blob_key(Digest.parse(b))]
    assert [r.digest for r in engine.list()] == [b]


def test_list_order(engine: Engine) -> None:
    digests = [str(engine.ingest(f"blob {i}".encode()).digest) for i in range(30)]
    digests.append(str(engine.ingest(b"long", algorithm="sha512").digest))
    records = list(engine.list())
    assert [r.digest for r in records] == sorted(digests)
    assert [r.size for r in records] == [len(_read(engine, r.digest)) for r in records]
    mid = sorted(digests)[10]
    assert [r.digest for r in engine.list(mid)] == sorted(digests)[10:]
    assert sorted(blob_objects(engine)) == sorted(blob_key(Digest.parse(d)) for d in digests)


def test_local_store_survives_reopen(tmp_path: Path) -> None:
    data = _data(200_000, 20)
    with Engine.open(str(tmp_path / "root")) as e:
        d = str(e.ingest(data).digest)
    with Engine.open(f"file://{tmp_path}/root") as e:
        assert _read(e, d) == data
        assert not e.ingest(data).created
        audit(e)


def test_memory_engines_share_nothing() -> None:
    with Engine.open("memory://") as a, Engine.open("memory://") as b:
        d = str(a.ingest(b"only in a").digest)
        assert a.exists(d) and not b.exists(d)
        assert list(b.list()) == []


# -- a backend that fails ------------------------------------------------------------------------


def _failing(engine: Engine, **kw: object) -> Engine:
    return Engine(FailingBackend(engine.backend, **kw), engine.index,  # type: ignore[arg-type]
                  chunk_size=engine.chunk_size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["bytes", "file", "chunks", "pipe"])
@pytest.mark.parametrize("fail_after", [0, 1, SMALL_CHUNK + 1, 400_000])
def test_backend_failing_mid_write_leaves_nothing(small: Engine, how: str,
                                                  fail_after: int) -> None:
    data = _data(500_000, 21)
    failing = _failing(small, fail_after=fail_after)
    with pytest.raises(OSError, match="injected"):
        failing.ingest(_source(data, how), digest=digest_of(data))
    assert_nothing_published(small)
    with pytest.raises(OSError, match="injected"):
        failing.ingest(_source(data, how))
    assert_nothing_published(small)
    # the engine is fine afterwards
    assert small.ingest(_source(data, how)).created
    _check_stored(small, data)


def test_backend_failing_at_commit_leaves_nothing(small: Engine) -> None:
    data = _data(300_000, 22)
    with pytest.raises(OSError, match="injected at commit"):
        _failing(small, fail_commit=True).ingest(data)
    assert_nothing_published(small)


# -- bounded memory (I6) -------------------------------------------------------------------------

_RSS_CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from casengine import Engine

    root, how, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block = os.urandom(1 << 20)

    def gen():
        for i in range(total >> 20):
            yield i.to_bytes(8, "little") + block[8:]

    def status(field):
        # VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child would
        # start with the peak of the (large) pytest process that spawned it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    with Engine.open(root) as engine:
        engine.ingest(b"warm up the imports and the index")
        before = status("VmRSS")  # the current RSS, not the peak: a peak could hide growth
        if how == "generator":
            result = engine.ingest(gen(), size=total)
        else:
            r, w = os.pipe()

            def feed():
                with os.fdopen(w, "wb") as f:
                    for chunk in gen():
                        f.write(chunk)

            t = threading.Thread(target=feed)
            t.start()
            with os.fdopen(r, "rb") as f:
                result = engine.ingest(f, size=total)
            t.join()
        print(json.dumps({"digest": str(result.digest), "size": result.size,
                          "growth": status("VmHWM") - before}))
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["generator", "pipe"])
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_memory_stays_bounded_rss(tmp_path: Path, how: str) -> None:
    total = 256 * MIB
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "root"), how,
                          str(total)], capture_output=True, text=True, timeout=110, cwd=REPO,
                         check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["size"] == total
    assert report["growth"] < 40 * MIB, f"RSS grew by {report['growth'] / MIB:.1f} MiB"
    with Engine.open(str(tmp_path / "root")) as e:
        assert e.stat(report["digest"]).size == total


@pytest.mark.timeout(120)
def test_memory_stays_bounded_tracemalloc(tmp_path: Path) -> None:
    total = 256 * MIB
    block = _data(MIB, 23)

    def gen() -> Iterator[bytes]:
        for i in range(total // MIB):
            yield i.to_bytes(8, "little") + block[8:]

    expected = hashlib.sha256()
    for chunk in gen():
        expected.update(chunk)
    with Engine.open(str(tmp_path / "root")) as e:
        e.ingest(b"warm up")
        tracemalloc.start()
        try:
            result = e.ingest(gen(), size=total)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert str(result.digest) == "sha256:" + expected.hexdigest()
        assert peak < 40 * MIB, f"tracemalloc peak {peak / MIB:.1f} MiB"
