"""Seekable zstd at rest through the engine: policies, keys, range reads, integrity, tools."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casengine import seekable
from casengine.backend import READ_CHUNK, Backend, open_backend
from casengine.check import Checker
from casengine.compression import Policy, already_compressed
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import IntegrityError, InvalidInput
from casengine.gc import Collector
from casengine.index import pack_blob
from casengine.layout import RAW, ZST, blob_key
from casengine.registry import Registry
from casengine.reindex import rebuild
from casengine.seekable import TAIL, encode_table, read_table
from tests.helpers import (
    KINDS,
    MIB,
    WrappedBackend,
    audit,
    blob_objects,
    digest_of,
    ok,
    run_cli,
)
from tests.test_seekable import text

POLICIES = ("auto", "never", "always")


def engine_on(kind: str, tmp_path: Path, policy: Policy) -> Engine:
    if kind == "memory":
        return Engine.open("memory://", compression=policy)
    return Engine.open(str(tmp_path / "root"), compression=policy)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def ingested(engine: Engine, data: bytes) -> Digest:
    """Ingest, then wait for the compactor: a blob as it is stored once things settle."""
    digest = engine.ingest(data).digest
    engine.wait_compacted()
    return digest


def stored_key(engine: Engine, digest: str) -> str:
    return blob_key(Digest.parse(str(digest)), engine.stat(digest).codec)


# -- policies --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", POLICIES)
def test_round_trip_under_each_policy(kind: str, mode: str, tmp_path: Path) -> None:
    blobs = {"text": text(9 * MIB + 5), "random": os.urandom(2 * MIB + 3), "small": b"{}",
             "empty": b""}
    with engine_on(kind, tmp_path, Policy(mode, frame_size=1 * MIB)) as engine:
        for name, data in blobs.items():
            result = engine.ingest(data, digest=digest_of(data), size=len(data))
            engine.wait_compacted()  # large blobs are compressed after the acknowledgement
            record = engine.stat(result.digest)
            assert (record.digest, record.size) == (digest_of(data), len(data))
            assert b"".join(engine.read(result.digest)) == data, name
            at = min(1000, len(data))
            assert b"".join(engine.read(result.digest, at, 3 * MIB)) == data[at:at + 3 * MIB]
            want = RAW if mode == "never" or not data else ZST
            if mode == "auto" and name in ("random", "small"):
                want = RAW  # does not shrink by the margin
            assert record.codec == want, name
            # the xxh3 and size of the record are the stored object's
            stored = b"".join(engine.backend.read(stored_key(engine, result.digest)))
            assert record.stored_size == len(stored)
            assert record.xxh3 == xxhash.xxh3_128(stored).hexdigest()
            assert not engine.ingest(data).created  # dedupe whatever the codec
        audit(engine)
        assert len(blob_objects(engine)) == len(blobs)


def test_text_takes_less_space_and_random_stays_raw(kind: str, tmp_path: Path) -> None:
    with engine_on(kind, tmp_path, Policy()) as engine:
        data = text(5 * MIB)
        record = engine.stat(ingested(engine, data))
        assert record.codec == ZST and record.stored_size < len(data) // 4
        noise = engine.stat(ingested(engine, os.urandom(5 * MIB)))
        assert noise.codec == RAW and noise.stored_size == noise.size
        assert sorted(k.rsplit(".", 1)[1] for k in blob_objects(engine)) == [RAW, ZST]


@pytest.mark.parametrize("magic", [b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd", b"\xfd7zXZ\x00",
                                   b"BZh9", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n",
                                   b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 "])
def test_compressed_magic_stays_raw_under_auto(magic: bytes, tmp_path: Path) -> None:
    # compressible after the magic: only the sniffing keeps it raw
    data = magic + text(MIB)
    with engine_on("memory", tmp_path, Policy()) as engine:
        assert engine.stat(ingested(engine, data)).codec == RAW
    with engine_on("memory", tmp_path, Policy("always")) as engine:
        digest = ingested(engine, data)
        assert engine.stat(digest).codec == ZST and engine.read_bytes(digest) == data


def test_real_gzip_stays_raw_and_media_types_are_honoured() -> None:
    layer = gzip.compress(text(2 * MIB))
    with Engine.open("memory://") as engine:
        assert engine.stat(engine.ingest(layer).digest).codec == RAW
        data = text(MIB)
        gz_type = "application/vnd.oci.image.layer.v1.tar+gzip"
        assert engine.stat(engine.ingest(data, media_type=gz_type).digest).codec == RAW
        assert engine.stat(engine.ingest(data[1:], media_type="application/vnd.oci.image."
                                         "layer.v1.tar").digest).codec == ZST
    docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    for media_type in ("image/png", "application/zip", docker_gzip,
                       "application/vnd.oci.image.layer.v1.tar+zstd", "video/mp4"):
        assert already_compressed(media_type, b"plain")
    assert not already_compressed("application/vnd.oci.image.config.v1+json", b"{")


def test_margin_decides_on_the_sample() -> None:
    # half random, half zeros: shrinks by about half
    data = b"".join(os.urandom(512) + bytes(512) for _ in range(2048))
    with Engine.open("memory://", compression=Policy(margin=0.3)) as engine:
        assert engine.stat(ingested(engine, data)).codec == ZST
    with Engine.open("memory://", compression=Policy(margin=0.7)) as engine:
        assert engine.stat(ingested(engine, data)).codec == RAW


def test_policy_is_validated() -> None:
    for bad in ({"mode": "sometimes"}, {"level": 40}, {"margin": 1.5}, {"frame_size": 10}):
        with pytest.raises(InvalidInput):
            Policy(**bad)
    with pytest.raises(InvalidInput):
        Policy.parse("auto", "fast")
    assert Policy.parse(None, "5") == Policy("auto", 5)


def test_chunked_uploads_publish_raw_and_compress_after_the_commit(tmp_path: Path) -> None:
    data, noise = text(3 * MIB), os.urandom(3 * MIB)
    with Engine.open(str(tmp_path / "root")) as engine:
        registry = Registry(engine)
        for blob in (noise, data):
            session = registry.start_upload("team/app")
            registry.append_upload("team/app", session.id, blob[:MIB], 0)
            registry.append_upload("team/app", session.id, blob[MIB:], MIB)
            registry.commit_upload("team/app", session.id, digest_of(blob))
            if blob is noise:  # its first bytes did not compress: no compactor at all
                assert "compactor" not in engine.__dict__
        engine.wait_compacted()
        assert engine.stat(digest_of(noise)).codec == RAW
        record = engine.stat(digest_of(data))
        assert record.codec == ZST and record.stored_size < len(data) // 4
        assert engine.read_bytes(digest_of(data)) == data
        assert registry.ingest_blob("team/app", data[1:]).digest == Digest.parse(digest_of(data[1:]))
        engine.wait_compacted()
        assert engine.stat(digest_of(data[1:])).codec == ZST
        audit(engine)


# -- range reads -------------------------------------------------------------------------------


DATA = text(3 * MIB + 777)


@pytest.fixture(scope="module")
def small_frames() -> Iterator[tuple[Engine, str]]:
    with Engine.open("memory://", compression=Policy("always", frame_size=64 << 10)) as engine:
        yield engine, str(engine.ingest(DATA).digest)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(DATA)), st.integers(0, len(DATA) + 10), st.integers(1, 300_000))
def test_random_ranges_match_the_original(small_frames: tuple[Engine, str], start: int,
                                          length: int, chunk: int) -> None:
    engine, digest = small_frames
    chunks = list(engine.read(digest, start, length, chunk_size=chunk))
    assert b"".join(chunks) == DATA[start:start + length]
    assert all(len(c) <= chunk for c in chunks)


class CountingBackend(WrappedBackend):
    """A real backend underneath; counts the bytes every read returns."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.read_bytes = 0
        self.reads = 0

    def read(self, key: str, start: int = 0, length: int | None = None, *,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        self.reads += 1
        for chunk in self.inner.read(key, start, length, chunk_size=chunk_size):
            self.read_bytes += len(chunk)
            yield chunk


def test_a_middle_range_reads_and_decompresses_at_most_two_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = text(48 * MIB)
    with Engine.open(str(tmp_path / "root")) as engine:
        digest = ingested(engine, data)
        record = engine.stat(digest)
        key = stored_key(engine, str(digest))
        table, _ = read_table(engine.backend, key, record.stored_size)
        assert record.codec == ZST and table.frames == 12
        counting = CountingBackend(engine.backend)
        reader = Engine(counting, engine.index)
        start = 24 * MIB - 300_000  # crosses the boundary between frames 5 and 6
        decoded: list[int] = []
        real = seekable.decode_frame

        def counted(frame: Any, expected: int, *args: Any) -> bytes:
            out = real(frame, expected, *args)  # counted, and the real work still runs
            decoded.append(len(out))
            return out

        monkeypatch.setattr(seekable, "decode_frame", counted)
        assert b"".join(reader.read(digest, start, MIB)) == data[start:start + MIB]
        assert decoded == [4 * MIB, 4 * MIB]
        frames = table.compressed[7] - table.compressed[5]
        assert counting.read_bytes == min(TAIL, record.stored_size) + frames
        # the table is cached: a second range reads only its frame
        counting.read_bytes = 0
        assert b"".join(reader.read(digest, 40 * MIB, 10)) == data[40 * MIB:40 * MIB + 10]
        assert counting.read_bytes == table.compressed[11] - table.compressed[10]


# -- corruption and bombs ---------------------------------------------------------------------


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0x10
    elif how == "truncate":
        data = data[:-100]
    else:  # a seek table that does not tile the object
        data[-9 - 8 - 8] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "table"])
def test_corrupt_stored_zst_fails_cleanly_and_check_reports_it(how: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = text(6 * MIB)
    with Engine.open(str(root)) as engine:
        digest = str(ingested(engine, data))
        key = stored_key(engine, digest)
    _corrupt(root / key, how)
    with Engine.open(str(root)) as engine:
        with pytest.raises(IntegrityError):
            b"".join(engine.read(digest))
        for full in (False, True):
            report = Checker(Registry(engine), full=full).run()
            assert [(f.kind, f.digest) for f in report.findings] == [
                ("truncated" if how == "truncate" else "corrupt", digest)]
    proc = run_cli(["--root", str(root), "check", "--full", "--json"], cwd=tmp_path)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["findings"][0]["digest"] == digest


def test_full_check_decompresses_when_the_xxh3_is_forged(tmp_path: Path) -> None:
    """Fast check trusts a matching xxh3; full re-derives the logical digest."""
    root = tmp_path / "root"
    data = text(3 * MIB)
    with Engine.open(str(root)) as engine:
        digest = str(ingested(engine, data))
        key = stored_key(engine, digest)
        other = engine.stat(ingested(engine, text(3 * MIB + 1)))
        # swap in another blob's valid seekable object of another logical size
        forged = b"".join(engine.backend.read(blob_key(Digest.parse(other.digest), ZST)))
        engine.backend.put(key, forged)
        record = engine.stat(digest)
        with engine.index.transaction(write=True) as txn:
            txn.put("blobs", digest.encode(), pack_blob(type(record)(
                digest, record.size, ZST, len(forged), xxhash.xxh3_128(forged).hexdigest(),
                record.created, record.touched)))
        registry = Registry(engine)
        assert Checker(registry).run().clean
        findings = Checker(registry, full=True).run().findings
        assert [(f.kind, f.digest) for f in findings] == [("corrupt", digest)]


def test_a_stored_bomb_cannot_exhaust_memory(tmp_path: Path) -> None:
    """Tiny stored frames that claim (and would decompress to) far more than the table says."""
    import tracemalloc

    from tests.test_seekable import _zeros_stream

    bomb = _zeros_stream(256 << 20)
    obj = bomb * 4 + encode_table([(len(bomb), 4 << 20)] * 4)
    digest = digest_of(bytes(16 << 20))  # what the table claims the blob is
    with Engine.open(str(tmp_path / "root")) as engine:
        key = blob_key(Digest.parse(digest), ZST)
        engine.backend.put(key, obj)
        # (no minimum age: the object is not a publish in progress, and cannot verify)
        report = Checker(Registry(engine), repair=True, orphan_min_age=0).run()
        assert report.findings[0].kind == "orphan-object"
        assert report.findings[0].repaired.startswith("quarantined")
        engine.backend.put(key, obj)
        from casengine.index import BlobRecord

        engine.index.add_blob(BlobRecord(digest, 16 << 20, ZST, len(obj), "", 0, 0))
        tracemalloc.start()
        try:
            with pytest.raises(IntegrityError):
                b"".join(engine.read(digest))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 << 20


# -- delete, gc, reindex, S3, CLI --------------------------------------------------------------


def test_delete_gc_and_reindex_know_zst(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        keep, drop, noise = text(2 * MIB), text(2 * MIB + 1), os.urandom(MIB)
        registry = Registry(engine)
        digests = [str(registry.ingest_blob("team/app", b).digest) for b in (keep, drop, noise)]
        assert registry.unlink("team/app", digests[1]) and engine.delete(digests[1])
        engine.wait_compacted()
        assert blob_objects(engine) == sorted(stored_key(engine, d) for d in (digests[0], digests[2]))
        before = {r.digest: (r.size, r.codec, r.stored_size) for r in engine.list()}
        index = engine.index.path
    backend = open_backend(str(root))
    rebuild(backend, index)
    backend.close()
    with Engine.open(str(root)) as engine:
        after = {r.digest: (r.size, r.codec, r.stored_size) for r in engine.list()}
        assert after == before
        assert engine.read_bytes(digests[0]) == keep
        registry = Registry(engine)
        assert Checker(registry, full=True).run().clean  # and fills in the xxh3
        key = stored_key(engine, digests[0])
        assert key.endswith(".zst")
        registry.unlink("team/app", digests[0])
        Collector(registry, grace=0).run()
        assert not engine.exists(digests[0])
        assert key not in blob_objects(engine)


def test_round_trip_on_s3(s3_url_and_options: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    url, options = s3_url_and_options
    data = text(9 * MIB)
    with Engine.open(url, index=str(tmp_path / "index"), **options) as engine:
        digest = engine.ingest(data, digest=digest_of(data)).digest
        engine.wait_compacted()
        record = engine.stat(digest)
        assert record.codec == ZST and record.stored_size < len(data) // 4
        assert engine.read_bytes(digest) == data
        assert b"".join(engine.read(digest, 5 * MIB - 7, MIB)) == data[5 * MIB - 7:6 * MIB - 7]
        assert Checker(Registry(engine), full=True).run().clean


def test_cli_options_and_environment(tmp_path: Path) -> None:
    root = tmp_path / "root"
    data = text(MIB)

    def put(*opts: str, env: dict[str, str] | None = None) -> str:
        proc = run_cli(["--root", str(root), *opts, "blob", "put", "-"], cwd=tmp_path,
                       input=data, env=env)
        digest = ok(proc).strip()
        stat = json.loads(ok(run_cli(["--root", str(root), "blob", "stat", "--json", digest],
                                     cwd=tmp_path)))
        got = run_cli(["--root", str(root), "blob", "get", digest], cwd=tmp_path)
        assert ok(got) and got.stdout == data
        ok(run_cli(["--root", str(root), "blob", "rm", digest], cwd=tmp_path))
        return stat["codec"]

    assert put() == ZST
    assert put("--compression", "never") == RAW
    assert put(env={"CASENGINE_COMPRESSION": "never"}) == RAW
    assert put("--compression", "always", "--compression-level", "9") == ZST
    assert put(env={"CASENGINE_COMPRESSION_LEVEL": "3"}) == ZST
    bad = run_cli(["--root", str(root), "--compression-level", "99", "blob", "ls"], cwd=tmp_path)
    assert bad.returncode == 2
    digest = ok(run_cli(["--root", str(root), "blob", "put", "-"], cwd=tmp_path, input=data))
    stat = json.loads(ok(run_cli(["--root", str(root), "blob", "stat", "--json", digest.strip()],
                                 cwd=tmp_path)))
    assert stat["size"] == len(data) and stat["stored_size"] < len(data) // 4
    assert hashlib.sha256(data).hexdigest() in digest


def test_usage_shows_stored_next_to_physical(tmp_path: Path) -> None:
    from casengine.registry import usage

    with Engine.open("memory://") as engine:
        registry = Registry(engine)
        layer, noise = text(2 * MIB), os.urandom(MIB)
        descriptors = [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": str(registry.ingest_blob("team/app", b).digest),
                        "size": len(b)} for b in (layer, noise)]
        config = registry.ingest_blob("team/app", b"{}")
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": str(config.digest), "size": 2},
            "layers": descriptors}).encode()
        registry.put_manifest("team/app", "v1", manifest)
        engine.wait_compacted()
        total = usage(registry).total
        stored = sum(engine.stat(d).stored_size
                     for d in (*(x["digest"] for x in descriptors), config.digest,
                               digest_of(manifest)))
        assert total.physical == len(layer) + len(noise) + 2 + len(manifest)
        assert total.stored == stored < len(noise) + len(layer) // 4
