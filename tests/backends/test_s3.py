import os
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from backends.s3 import MIB, S3Backend
from casengine import backend as backend_module
from casengine.backend import Backend, Presigner, ServerCopy, open_backend
from casengine.errors import BackendError, ConfigError, InvalidInput, NotFound
from casengine.testing.backend_suite import BackendSuite

UrlAndOptions = tuple[str, dict[str, Any]]
#: The smallest sizes S3 allows, so that the multipart paths run on a few MiB. Copy parts
#: differ from upload parts, so an ETag's part count tells which made the object.
SMALL_PARTS = {"part_size": 5 * MIB, "copy_part_size": 6 * MIB}


class TestS3Backend(BackendSuite):
    @pytest.fixture
    def backend(self, s3_url_and_options: UrlAndOptions) -> Iterator[S3Backend]:
        url, options = s3_url_and_options
        b = S3Backend(url, **options)
        yield b
        b.close()

    def leftovers(self, backend: Backend) -> list[str]:
        assert isinstance(backend, S3Backend)
        return [f"upload {u.key}" for u in backend.multipart_uploads()] + [
            f"staged {o.key}" for o in backend.staging_objects()]


def _no_leftovers(b: S3Backend) -> None:
    assert b.multipart_uploads() == []
    assert b.staging_objects() == []


@pytest.fixture
def s3(s3_url_and_options: UrlAndOptions) -> Iterator[S3Backend]:
    url, options = s3_url_and_options
    b = S3Backend(url, **options)
    yield b
    _no_leftovers(b)
    b.close()


@pytest.fixture
def small_parts(s3_url_and_options: UrlAndOptions) -> Iterator[S3Backend]:
    url, options = s3_url_and_options
    b = S3Backend(url, **options, **SMALL_PARTS)
    yield b
    _no_leftovers(b)
    b.close()


def _write(backend: Backend, data: bytes, key: str, *, hint: str | None = None,
           exclusive: bool = False) -> bool:
    with backend.writer(hint) as w:
        for off in range(0, len(data), 1 << 20):
            w.write(memoryview(data)[off : off + (1 << 20)])
        return w.commit(key, exclusive=exclusive)


def _parts_in_etag(backend: S3Backend, key: str) -> int:
    """How many parts the object was completed from; 0 for a single PutObject or CopyObject."""
    etag = backend.call("head", "head_object", Key=backend.full_key(key))["ETag"].strip('"')
    return int(etag.partition("-")[2] or 0)


# -- multipart uploads -----------------------------------------------------------------------


def test_multipart_upload_with_hint_publishes_directly(small_parts: S3Backend) -> None:
    data = os.urandom(17 * MIB)  # parts of 5, 5, 5 and 2 MiB
    with small_parts.writer("blobs/big") as w:
        w.write(data[: 12 * MIB])
        assert [u.key for u in small_parts.multipart_uploads()] == ["blobs/big"]
        assert not small_parts.exists("blobs/big")
        w.write(data[12 * MIB :])
        assert w.commit("blobs/big")
    assert b"".join(small_parts.read("blobs/big")) == data
    assert _parts_in_etag(small_parts, "blobs/big") == 4  # the upload itself, no copy
    assert small_parts.stat("blobs/big").size == len(data)


def test_without_hint_the_upload_is_staged_then_copied(small_parts: S3Backend) -> None:
    data = os.urandom(11 * MIB)
    with small_parts.writer() as w:
        w.write(data)
        [upload] = small_parts.multipart_uploads()
        assert upload.key.startswith(".staging/")
        assert list(small_parts.list("")) == []
        assert w.commit("k")
    assert b"".join(small_parts.read("k")) == data
    assert _parts_in_etag(small_parts, "k") == 0  # one CopyObject


def test_copies_over_the_copy_limit_go_in_parts(s3_url_and_options: UrlAndOptions) -> None:
    url, options = s3_url_and_options
    b = S3Backend(url, **options, **SMALL_PARTS, copy_limit=MIB)
    data = os.urandom(12 * MIB)  # uploaded as 5 + 5 + 2 MiB, copied as 6 + 6 MiB
    assert _write(b, data, "k")
    assert b"".join(b.read("k")) == data
    assert _parts_in_etag(b, "k") == 2
    _no_leftovers(b)


@pytest.mark.parametrize("hint", ["k", None], ids=["direct", "staged"])
def test_exclusive_large_put_keeps_the_existing_object(small_parts: S3Backend,
                                                       hint: str | None) -> None:
    small_parts.put("k", b"first")
    assert not _write(small_parts, os.urandom(6 * MIB), "k", hint=hint, exclusive=True)
    assert small_parts.get("k") == b"first"
    assert small_parts.delete("k")
    data = os.urandom(6 * MIB)
    assert _write(small_parts, data, "k", hint=hint, exclusive=True)
    assert b"".join(small_parts.read("k")) == data


def test_abort_removes_the_multipart_upload(small_parts: S3Backend) -> None:
    w = small_parts.writer("k")
    w.write(os.urandom(6 * MIB))
    assert [u.key for u in small_parts.multipart_uploads()] == ["k"]
    w.abort()
    w.abort()
    assert small_parts.multipart_uploads() == []
    assert not small_parts.exists("k")
    with pytest.raises(BackendError):
        w.write(b"more")


def test_large_commit_to_another_key_than_the_hint_is_refused(small_parts: S3Backend) -> None:
    with small_parts.writer("a") as w:
        w.write(os.urandom(6 * MIB))
        with pytest.raises(InvalidInput):
            w.commit("b")
    assert list(small_parts.list("")) == []


def test_small_commit_may_differ_from_the_hint(s3: S3Backend) -> None:
    with s3.writer("a") as w:
        w.write(b"small")
        assert w.commit("b")
    assert list(s3.list("")) == ["b"]


# -- crash leftovers -------------------------------------------------------------------------


def test_a_dead_writers_upload_is_aborted_once_idle(small_parts: S3Backend,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What a writer killed before its commit or abort leaves (an ingest straight to its
    key) goes with the sweep of upload staging, but only once it has been idle that long."""
    w = small_parts.writer("blobs/x")
    w.write(os.urandom(6 * MIB))
    [upload] = small_parts.multipart_uploads()
    deadline = time.monotonic() + 30
    while not small_parts.call("parts", "list_parts", Key=small_parts.absolute(upload.key),
                               UploadId=upload.upload_id).get("Parts"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # moto reports one old start time for every upload: the part's time is what counts
    assert small_parts.purge_staging(time.time() - 60) == 0
    assert small_parts.multipart_uploads() == [upload]
    # however short the purge's cutoff, a writer's upload must be idle for the floor: its
    # writer may only be slow (a client pausing mid-body)
    assert small_parts.purge_staging(time.time() + 1) == 0
    monkeypatch.setattr(backend_module, "WRITER_MIN_IDLE", 0.0)  # an hour later
    assert small_parts.purge_staging(time.time() + 1) == 1
    assert small_parts.multipart_uploads() == []
    w.abort()  # finds its upload gone, which is fine


def test_stale_staging_objects_are_deleted(s3: S3Backend,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s3.call("planting", "put_object", Key=s3.absolute(".staging/left"), Body=b"x")
    assert [o.key for o in s3.staging_objects()] == [".staging/left"]
    assert list(s3.list("")) == []
    assert s3.purge_staging(time.time() - 3600) == 0
    assert s3.purge_staging(time.time() + 1) == 0  # young: an ingest may be copying it
    monkeypatch.setattr(backend_module, "WRITER_MIN_IDLE", 0.0)
    assert s3.purge_staging(time.time() + 1) == 1
    assert s3.staging_objects() == []


# -- reads, capabilities, configuration ----------------------------------------------------


def test_reads_stream_in_bounded_chunks(s3: S3Backend) -> None:
    data = os.urandom(3 * MIB + 5)
    s3.put("r", data)
    chunks = list(s3.read("r", 7, None, chunk_size=256 * 1024))
    assert b"".join(chunks) == data[7:]
    assert max(map(len, chunks)) == 256 * 1024
    assert list(s3.read("r", len(data) + 10)) == []
    assert list(s3.read("r", 5, 0)) == []
    with pytest.raises(NotFound):
        s3.read("nope", 5, 0)
    stream = s3.read("r")
    next(stream)
    del stream  # an abandoned stream releases its connection
    assert s3.get("r") == data


def test_presigned_url_is_fetchable_with_plain_http(s3: S3Backend) -> None:
    assert isinstance(s3, Presigner)
    s3.put("p/q", b"presigned bytes")
    with urllib.request.urlopen(s3.presign("p/q", expires=60), timeout=10) as resp:
        assert resp.read() == b"presigned bytes"


def test_server_copy(small_parts: S3Backend) -> None:
    assert isinstance(small_parts, ServerCopy)
    small_parts.put("src", b"payload")
    small_parts.put("taken", b"old")
    assert small_parts.copy("src", "dst")
    assert small_parts.get("dst") == b"payload"
    assert not small_parts.copy("src", "taken", exclusive=True)
    assert small_parts.get("taken") == b"old"
    assert small_parts.copy("src", "fresh", exclusive=True)
    assert small_parts.get("fresh") == b"payload"
    with pytest.raises(NotFound):
        small_parts.copy("missing", "x")


def test_bucket_root_without_prefix(s3_url_and_options: UrlAndOptions) -> None:
    url, options = s3_url_and_options
    b = S3Backend(url.rsplit("/", 1)[0], **options, **SMALL_PARTS)
    assert b.prefix == ""
    with b.writer() as w:
        w.write(os.urandom(6 * MIB))
        [upload] = b.multipart_uploads()
        assert upload.key.startswith(".staging/")
        assert w.commit("k")
    assert list(b.list("")) == ["k"]
    assert b.delete("k")
    _no_leftovers(b)


def test_errors_other_than_missing_are_backend_errors(s3_url_and_options: UrlAndOptions) -> None:
    url, options = s3_url_and_options
    b = S3Backend(url.replace("s3://", "s3://no-such-bucket-"), **options)
    with pytest.raises(BackendError) as err:
        b.read("k")
    assert not isinstance(err.value, NotFound)
    with pytest.raises(BackendError):
        b.put("k", b"x")
    with pytest.raises(BackendError):
        list(b.list(""))


def test_open_backend_picks_s3(s3_url_and_options: UrlAndOptions) -> None:
    url, options = s3_url_and_options
    for scheme in ("s3", "s3a"):
        b = open_backend(url.replace("s3://", f"{scheme}://"), **options)
        assert isinstance(b, S3Backend)
        b.put("k", b"x")
        assert b.get("k") == b"x"
        b.close()


def test_bad_configuration_is_refused(s3_url_and_options: UrlAndOptions) -> None:
    url, options = s3_url_and_options
    with pytest.raises(ConfigError):
        S3Backend("s3://", **options)
    with pytest.raises(ConfigError):
        S3Backend(url, **options, part_size=MIB)  # S3 refuses parts under 5 MiB
    with pytest.raises(ConfigError):
        S3Backend(url + "/../escape", **options)
