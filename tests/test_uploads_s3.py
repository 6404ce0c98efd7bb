"""Upload sessions on S3 (moto's server): multipart parts and tails, server-side commit,
copies beyond the copy limit, crashes between the backend and the index, abort and purge.

The session tests shared with the other backends (offsets, conflicts, other processes,
kill -9 at random moments, expiry) run on S3 too, in ``test_uploads.py``. Parts are S3's
smallest, 5 MiB, so every path runs on a few MiB.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsspec.asyn import sync

from backends.s3 import MIB, S3Backend
from casengine import Engine
from casengine import backend as backend_module
from casengine.digest import parse_digest
from casengine.errors import DigestMismatch
from casengine.layout import blob_key
from tests.test_uploads import Store, _python

PART = 5 * MIB
UrlAndOptions = tuple[str, dict[str, Any]]


def digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@pytest.fixture
def s3store(s3_url_and_options: UrlAndOptions, tmp_path: Path) -> Store:
    url, options = s3_url_and_options
    return Store(url, str(tmp_path / "index"), {**options, "part_size": PART})


@pytest.fixture
def engine(s3store: Store) -> Iterator[Engine]:
    with s3store.open() as e:
        yield e


def s3(engine: Engine) -> S3Backend:
    backend = getattr(engine.backend, "inner", engine.backend)  # behind the retries
    assert isinstance(backend, S3Backend)
    return backend


def state(engine: Engine, upload_id: str) -> dict:
    return engine.index.get_upload(upload_id)["backend"]


def objects(engine: Engine, upload_id: str) -> list[str]:
    """The names under the session's key."""
    prefix = f"uploads/{upload_id}/"
    return sorted(k[len(prefix):] for k in engine.backend.list(prefix))


def tail(end: int) -> str:
    return f"pending-{end:016x}"


def requests(backend: S3Backend) -> list[str]:
    """Record the S3 operation of every request the backend sends from now on."""
    seen: list[str] = []
    fs = backend.fs
    real = fs._call_s3

    async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(method)
        return await real(method, *args, **kwargs)

    fs._call_s3 = counted
    fs.call_s3 = lambda method, *args, **kwargs: sync(fs.loop, counted, method, *args, **kwargs)
    return seen


def parts_in_etag(backend: S3Backend, key: str) -> int:
    """How many parts made the object; 0 for a PutObject or CopyObject."""
    etag = backend.call("head", "head_object", Key=backend.full_key(key))["ETag"].strip('"')
    return int(etag.partition("-")[2] or 0)


def append_all(engine: Engine, upload_id: str, data: bytes, chunk: int) -> None:
    offset = engine.uploads.status(upload_id).offset
    while offset < len(data):
        offset = engine.uploads.append(upload_id, data[offset : offset + chunk], offset).offset


def nothing_left(engine: Engine) -> None:
    assert list(engine.uploads.list()) == []
    assert list(engine.backend.list("uploads/")) == []
    assert s3(engine).multipart_uploads() == []


# -- chunks, parts and tails -----------------------------------------------------------------


def test_min_chunk_is_the_part_size(engine: Engine, s3_url_and_options: UrlAndOptions,
                                    tmp_path: Path) -> None:
    assert engine.uploads.min_chunk == PART
    url, options = s3_url_and_options
    with Engine.open(url, index=str(tmp_path / "other"), **options) as default:
        assert default.uploads.min_chunk == 8 * MIB


def test_small_chunks_accumulate_until_a_part_fills(engine: Engine) -> None:
    data = os.urandom(12 * MIB + 777)
    s = engine.uploads.start()
    upload_id = None
    offset, previous_end = 0, 0
    while offset < len(data):
        offset = engine.uploads.append(s.id, data[offset : offset + MIB], offset).offset
        st = state(engine, s.id)
        assert [p[0] for p in st["uploaded"]] == list(range(1, offset // PART + 1))
        assert all(p[2] == PART for p in st["uploaded"])
        assert st["pending"] == offset % PART
        if offset < PART:
            assert st["upload"] is None
        else:
            upload_id = upload_id or st["upload"]
            assert st["upload"] == upload_id, "one multipart upload per session"
        # the tail, and at most the one it superseded (deleted by the next append)
        names = objects(engine, s.id)
        assert (tail(offset) in names) == bool(offset % PART)
        assert set(names) <= {tail(offset), tail(previous_end)}
        previous_end = offset
    assert engine.uploads.commit(s.id, digest(data)).size == len(data)
    assert engine.read_bytes(digest(data)) == data
    nothing_left(engine)


@pytest.mark.parametrize("seed", [1, 2])
def test_irregular_chunks_across_part_boundaries(engine: Engine, seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, PART - 1, 1, 2 * PART + 3, 0, 7] + [rng.randrange(1, 3 * MIB)
                                                       for _ in range(6)]
    data = rng.randbytes(sum(sizes))
    s = engine.uploads.start()
    offset = 0
    for n in sizes:
        offset = engine.uploads.append(s.id, data[offset : offset + n], offset).offset
        st = state(engine, s.id)
        assert sum(p[2] for p in st.get("uploaded", [])) + st.get("pending", 0) == offset
        assert all(p[2] == PART for p in st.get("uploaded", []))
    assert engine.uploads.commit(s.id, digest(data)).size == len(data)
    assert engine.read_bytes(digest(data)) == data
    nothing_left(engine)


def test_part_size_may_change_between_engines(s3store: Store) -> None:
    """A tail left under a larger part size goes out as one larger part."""
    data = os.urandom(3 * PART)
    big = Store(s3store.url, s3store.index, {**s3store.options, "part_size": 8 * MIB})
    with big.open() as e:
        s = e.uploads.start()
        e.uploads.append(s.id, data[: 7 * MIB], 0)
    with s3store.open() as e:
        e.uploads.append(s.id, data[7 * MIB :], 7 * MIB)
        st = state(e, s.id)
        assert ([p[2] for p in st["uploaded"]], st["pending"]) == ([7 * MIB, PART], 3 * MIB)
        assert e.uploads.commit(s.id, digest(data)).created
        assert e.read_bytes(digest(data)) == data
        nothing_left(e)


def test_aligned_chunks_are_parts_and_leave_no_tail(engine: Engine) -> None:
    data = os.urandom(3 * PART)
    s = engine.uploads.start()
    append_all(engine, s.id, data, PART)
    st = state(engine, s.id)
    assert (len(st["uploaded"]), st["pending"], objects(engine, s.id)) == (3, 0, [])
    seen = requests(s3(engine))
    assert engine.uploads.commit(s.id, digest(data)).created
    assert "upload_part_copy" in seen and "get_object" not in seen and "upload_part" not in seen
    assert engine.read_bytes(digest(data)) == data
    nothing_left(engine)


@pytest.mark.parametrize("size", [0, 1000, PART, 3 * PART + 2 * MIB + 1234],
                         ids=["empty", "below-a-part", "one-part", "parts-and-tail"])
def test_commit_in_a_new_engine_moves_no_data(s3store: Store, size: int) -> None:
    """Commit is server-side: the session's upload is completed (its tail copied in as the
    last part) and copied to the blob's key; no GetObject, no UploadPart."""
    data = os.urandom(size)
    with s3store.open() as e:
        s = e.uploads.start()
        append_all(e, s.id, data, 3 * MIB)
        st = state(e, s.id)
        assert len(st.get("uploaded", [])) == size // PART
        assert st.get("pending", 0) == size % PART
    with s3store.open() as e:
        seen = requests(s3(e))
        assert e.uploads.commit(s.id, digest(data), size=size).created
        assert "get_object" not in seen and "upload_part" not in seen, seen
        if size > PART:
            # the tail into the session's upload, then the blob's copy: two completions
            assert seen.count("complete_multipart_upload") == 2
        assert e.read_bytes(digest(data)) == data
        nothing_left(e)


def test_copies_beyond_the_copy_limit_go_in_ranged_parts(s3_url_and_options: UrlAndOptions,
                                                         tmp_path: Path) -> None:
    """The path objects over 5 GiB take (S3's CopyObject limit), on a 1 MiB limit."""
    url, options = s3_url_and_options
    small = {"part_size": PART, "copy_part_size": 6 * MIB, "copy_limit": MIB}
    data = os.urandom(3 * PART + 2 * MIB + 1234)  # 17 MiB: copied as 6 + 6 + 5 MiB
    with Engine.open(url, index=str(tmp_path / "index"), **options, **small) as e:
        s = e.uploads.start()
        append_all(e, s.id, data, 4 * MIB)
        assert e.uploads.commit(s.id, digest(data)).created
        assert e.read_bytes(digest(data)) == data
        b = s3(e)
        assert parts_in_etag(b, next(iter(b.list("blobs/")))) == 3
        nothing_left(e)
    # the backend on its own: a plain (not exclusive) publish beyond the copy limit, then
    # within it (a CopyObject); publishing again finds the session's upload completed
    b = S3Backend(url, **options, **small)
    with b.append("uploads/x", {}, 0) as a:
        a.write(data)
        st = a.finish()
    assert b.publish_upload("uploads/x", st, len(data), "big")
    assert parts_in_etag(b, "big") == 3
    within = S3Backend(url, **options, part_size=PART)
    assert within.publish_upload("uploads/x", st, len(data), "copied")
    assert parts_in_etag(within, "copied") == 0
    assert b"".join(b.read("big")) == b"".join(b.read("copied")) == data
    b.discard_upload("uploads/x", st)
    assert list(b.list("uploads/")) == [] and b.multipart_uploads() == []
    b.close()
    within.close()


def test_commit_keeps_an_object_already_at_the_blob_key(engine: Engine) -> None:
    """Exclusive publish: an unindexed object at the key (another writer won) is kept."""
    data = os.urandom(PART + MIB)
    s = engine.uploads.start()
    engine.uploads.append(s.id, data, 0)
    key = blob_key(parse_digest(digest(data)))
    engine.backend.put(key, data)
    etag = s3(engine).call("head", "head_object", Key=s3(engine).full_key(key))["ETag"]
    assert not engine.uploads.commit(s.id, digest(data)).created
    assert s3(engine).call("head", "head_object", Key=s3(engine).full_key(key))["ETag"] == etag
    assert engine.read_bytes(digest(data)) == data
    nothing_left(engine)


# -- re-hashing: the upload must be completed to be read --------------------------------------


def test_rehash_then_more_tail_then_commit(engine: Engine) -> None:
    """A commit with another algorithm re-hashes from storage, which completes the upload;
    a later tail-only append and a commit compose the completed data and the tail."""
    data = os.urandom(PART + 3 * MIB)
    s = engine.uploads.start()
    engine.uploads.append(s.id, data[: PART + 2 * MIB], 0)
    with pytest.raises(DigestMismatch):
        engine.uploads.commit(s.id, "sha512:" + "0" * 128)
    assert s3(engine).multipart_uploads() == []  # completed, to be read
    engine.uploads.append(s.id, data[PART + 2 * MIB :], PART + 2 * MIB)
    result = engine.uploads.commit(s.id, digest(data, "sha512"))
    assert result.created and engine.read_bytes(result.digest) == data
    nothing_left(engine)


def test_rehash_then_a_part_reopens_the_upload(s3store: Store) -> None:
    # the part sent to the completed upload fails, S3 says NoSuchUpload, moto a 500 which
    # botocore retries with back-off: no retries here, for speed
    options = {**s3store.options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    with Store(s3store.url, s3store.index, options).open() as engine:
        _rehash_then_a_part_reopens_the_upload(engine)


def _rehash_then_a_part_reopens_the_upload(engine: Engine) -> None:
    data = os.urandom(3 * PART + 1234)
    s = engine.uploads.start()
    engine.uploads.append(s.id, data[: PART + 2 * MIB], 0)
    first = state(engine, s.id)["upload"]
    with pytest.raises(DigestMismatch):
        engine.uploads.commit(s.id, "sha512:" + "0" * 128)
    append_all(engine, s.id, data, 4 * MIB)  # fills parts: the upload is reopened by copy
    st = state(engine, s.id)
    assert st["upload"] != first
    assert [u.upload_id for u in s3(engine).multipart_uploads()] == [st["upload"]]
    assert engine.uploads.commit(s.id, digest(data)).created
    assert engine.read_bytes(digest(data)) == data
    nothing_left(engine)


def test_rehash_of_a_session_below_one_part(engine: Engine) -> None:
    data = os.urandom(MIB)
    s = engine.uploads.start()
    engine.uploads.append(s.id, data, 0)
    result = engine.uploads.commit(s.id, digest(data, "sha512"))
    assert engine.read_bytes(result.digest) == data
    nothing_left(engine)


# -- cancel and purge --------------------------------------------------------------------------


def test_cancel_aborts_every_multipart_upload_of_the_session(engine: Engine) -> None:
    s = engine.uploads.start()
    engine.uploads.append(s.id, os.urandom(PART + MIB), 0)
    b = s3(engine)
    # and one an unacknowledged first append would leave (created, never recorded)
    b.call("crash", "create_multipart_upload", Key=b.full_key(f"uploads/{s.id}/data"))
    assert len(b.multipart_uploads()) == 2
    engine.uploads.cancel(s.id)
    nothing_left(engine)


def test_purge_aborts_abandoned_uploads(engine: Engine,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    b = s3(engine)
    expired = engine.uploads.start()
    engine.uploads.append(expired.id, os.urandom(PART + MIB), 0)
    aged = {**engine.index.get_upload(expired.id), "updated": time.time() - 7200}
    engine.index.update_upload(expired.id, lambda _: aged)
    # a session whose record a crash lost, with one part and no tail: no object shows it
    orphan = engine.uploads.start()
    engine.uploads.append(orphan.id, os.urandom(PART), 0)
    engine.index.update_upload(orphan.id, lambda _: None)
    # a first append killed before its first part landed: an upload with no parts
    b.call("crash", "create_multipart_upload", Key=b.full_key("uploads/" + "f" * 32 + "/data"))
    # an ingest straight to its blob's key, killed after its first part
    ingest = b.call("crash", "create_multipart_upload", Key=b.full_key("blobs/sha256/ab/ab.raw"))
    b.call("crash", "upload_part", Key=b.full_key("blobs/sha256/ab/ab.raw"), PartNumber=1,
           UploadId=ingest["UploadId"], Body=os.urandom(PART))
    assert len(b.multipart_uploads()) == 4

    assert engine.uploads.purge(3600).leftovers == 1
    # the orphan's and the ingest's parts are younger than an hour: kept for now (moto's
    # fixed 'Initiated' of 2010 is older than any cutoff, so activity decides)
    assert sorted(u.key for u in b.multipart_uploads()) == [
        "blobs/sha256/ab/ab.raw", f"uploads/{orphan.id}/data"]
    # the orphan session's goes; the ingest's may belong to a writer that is only slow
    assert engine.uploads.purge(0).leftovers == 1
    assert [u.key for u in b.multipart_uploads()] == ["blobs/sha256/ab/ab.raw"]
    monkeypatch.setattr(backend_module, "WRITER_MIN_IDLE", 0.0)  # an hour later
    assert engine.uploads.purge(0).leftovers == 1
    nothing_left(engine)


def test_purge_keeps_the_uploads_of_live_sessions(engine: Engine) -> None:
    data = os.urandom(2 * PART + 1234)
    s = engine.uploads.start()
    engine.uploads.append(s.id, data[: PART + MIB], 0)
    engine.uploads.purge(3600)
    assert len(s3(engine).multipart_uploads()) == 1
    assert s3(engine).purge_staging(time.time() - 3600) == 0
    append_all(engine, s.id, data, 4 * MIB)
    assert engine.uploads.commit(s.id, digest(data)).created
    nothing_left(engine)


# -- kill -9 between the backend and the index --------------------------------------------------


JUNK_FOREVER = """
    import json, sys, time
    from casengine import Engine
    spec, upload_id, offset, junk = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    def chunks():
        for _ in range(int(junk) >> 20):
            yield b"j" * (1 << 20)
        print("sent", flush=True)
        time.sleep(120)
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        e.uploads.append(upload_id, chunks(), int(offset))
"""

JUNK_THEN_DIE_BEFORE_THE_INDEX = """
    import json, os, signal, sys
    from casengine import Engine
    from casengine.uploads import Uploads
    real = Uploads._release
    def release(self, upload_id, token, **updates):
        if "offset" in updates:  # the backend has finished: die before the state is saved
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, upload_id, token, **updates)
    Uploads._release = release
    spec, upload_id, offset, junk = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    with Engine.open(spec["url"], index=spec["index"], **spec["options"]) as e:
        e.uploads.append(upload_id, b"j" * int(junk), int(offset))
"""


def _acknowledged_7_mib(engine: Engine, data: bytes) -> str:
    """A session of 7 MiB in two appends: one part, a 2 MiB tail, a superseded 3 MiB tail."""
    s = engine.uploads.start()
    engine.uploads.append(s.id, data[: 3 * MIB], 0)
    engine.uploads.append(s.id, data[3 * MIB : 7 * MIB], 3 * MIB)
    st = state(engine, s.id)
    assert (len(st["uploaded"]), st["pending"], st["stale"]) == (1, 2 * MIB, [3 * MIB])
    return s.id


def test_kill_9_after_parts_beyond_the_state(s3store: Store, s3_client: Any) -> None:
    data = os.urandom(3 * PART + 2 * MIB + 1234)
    with s3store.open() as e:
        upload_id = _acknowledged_7_mib(e, data)
        before = state(e, upload_id)
        bucket, key = s3(e).bucket, s3(e).full_key(f"uploads/{upload_id}/data")
    p = _python(JUNK_FOREVER, s3store.json(), upload_id, str(7 * MIB), str(18 * MIB))
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"sent"
        deadline = time.time() + 30
        while time.time() < deadline:  # parts 2, 3, 4 of junk have landed
            parts = s3_client.list_parts(Bucket=bucket, Key=key, UploadId=before["upload"])
            if len(parts.get("Parts", [])) >= 4:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the junk parts never landed")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    with s3store.open() as e:
        assert e.uploads.status(upload_id).offset == 7 * MIB
        assert state(e, upload_id) == before
        append_all(e, upload_id, data, 4 * MIB)  # re-sends parts 2 and 3 over the junk
        assert e.uploads.commit(upload_id, digest(data)).created
        assert e.read_bytes(digest(data)) == data
        nothing_left(e)


@pytest.mark.parametrize("resume", [4 * MIB, 10 * MIB + 1234], ids=["same-end", "past-it"])
def test_kill_9_after_the_tail_but_before_the_state(s3store: Store, resume: int) -> None:
    """The dead append sent a part and wrote a newer tail, and deleted what the acknowledged
    state had superseded; the acknowledged tail is untouched, and the resume overwrites or
    ignores the rest."""
    data = os.urandom(3 * PART + 2 * MIB + 1234)
    with s3store.open() as e:
        upload_id = _acknowledged_7_mib(e, data)
        before = state(e, upload_id)
    p = _python(JUNK_THEN_DIE_BEFORE_THE_INDEX, s3store.json(), upload_id, str(7 * MIB),
                str(4 * MIB))
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, err.decode()
    with s3store.open() as e:
        assert state(e, upload_id) == before
        # acknowledged tail kept; the dead append's tail (2 + 4 - 5 MiB, ending at 11 MiB) too
        assert objects(e, upload_id) == [tail(7 * MIB), tail(11 * MIB)]
        e.uploads.append(upload_id, data[7 * MIB : 7 * MIB + resume], 7 * MIB)
        append_all(e, upload_id, data, 4 * MIB)
        assert e.uploads.commit(upload_id, digest(data)).created
        assert e.read_bytes(digest(data)) == data
        nothing_left(e)
