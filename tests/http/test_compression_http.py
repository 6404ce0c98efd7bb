"""Seekable zstd behind the HTTP API: the policy reaches ``serve``, and ranges read right."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from casengine.engine import Engine
from tests.http.conftest import Server, compressed, start_server
from tests.test_seekable import text


@pytest.fixture(scope="module")
def zst_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("zst") / "root"
    s = start_server(str(root), log_dir, env={"CASENGINE_COMPRESSION": "always",
                                              "CASENGINE_COMPRESSION_LEVEL": "3"})
    yield s
    s.stop()


@pytest.mark.parametrize("data", [text(9 << 20), b"tiny"], ids=["9MiB", "tiny"])
def test_push_then_ranged_pulls(zst_server: Server, data: bytes) -> None:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=zst_server.url, timeout=60) as client:
        r = client.post(f"/v2/t/zst/blobs/uploads/?digest={digest}", content=data)
        assert r.status_code == 201, r.text
        r = client.get(f"/v2/t/zst/blobs/{digest}")
        assert r.status_code == 200 and r.content == data
        assert r.headers["content-length"] == str(len(data))
        n = len(data)
        ranges = [(0, 0), (max(n // 2 - 5, 0), min(n // 2 + 1_000_000, n - 1)), (n - 3, n - 1)]
        for start, end in ranges:
            r = client.get(f"/v2/t/zst/blobs/{digest}", headers={"Range": f"bytes={start}-{end}"})
            assert r.status_code == 206 and r.content == data[start:end + 1]
            assert r.headers["content-range"] == f"bytes {start}-{end}/{n}"
        r = client.get(f"/v2/t/zst/blobs/{digest}", headers={"Range": "bytes=0-1,-2"})
        assert r.status_code == 206 and data[:2] in r.content and data[-2:] in r.content
    compressed(zst_server.root, digest)
    with Engine.open(zst_server.root) as engine:
        record = engine.stat(digest)
    assert record.codec == "zst" and record.size == len(data)
    if len(data) > 1 << 20:
        assert record.stored_size < len(data) // 4


def test_a_damaged_stored_object_is_a_server_error(zst_server: Server) -> None:
    data = text(3 << 20) + b"damaged"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=zst_server.url, timeout=60) as client:
        assert client.post(f"/v2/t/zst/blobs/uploads/?digest={digest}",
                           content=data).status_code == 201
        compressed(zst_server.root, digest)
        stored = Path(zst_server.root) / "blobs" / "sha256" / digest[7:9] / f"{digest[7:]}.zst"
        with stored.open("r+b") as f:  # lose the seek table's footer
            f.truncate(stored.stat().st_size - 4)
        r = client.get(f"/v2/t/zst/blobs/{digest}", headers={"Range": "bytes=10-20"})
    # the store's fault, not the client's: a 5xx with an OCI error body, never a 4xx
    assert r.status_code == 500, r.text
    assert r.json()["errors"][0]["code"] == "UNKNOWN"
    assert "check" in r.json()["errors"][0]["message"]


def test_a_chunked_push_is_compressed_after_its_commit(zst_server: Server) -> None:
    data = text(5 << 20) + b"chunked"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=zst_server.url, timeout=60) as client:
        r = client.post("/v2/t/zst/blobs/uploads/")
        assert r.status_code == 202, r.text
        location, offset = r.headers["location"], 0
        for piece in (data[:2 << 20], data[2 << 20:]):
            r = client.patch(location, content=piece, headers={
                "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                "Content-Type": "application/octet-stream"})
            assert r.status_code == 202, r.text
            location, offset = r.headers["location"], offset + len(piece)
        assert client.put(location, params={"digest": digest}).status_code == 201
        compressed(zst_server.root, digest)
        r = client.get(f"/v2/t/zst/blobs/{digest}", headers={"Range": "bytes=3000000-3000099"})
        assert r.status_code == 206 and r.content == data[3000000:3000100]
        assert client.get(f"/v2/t/zst/blobs/{digest}").content == data
