"""A failing backend behind ``casengine serve``: after the engine's retries, the client gets
503 with Retry-After (transient) or 500 (a full disk), both with an OCI error body, and
nothing is stored."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import digest_of, tmp_files
from tests.http.conftest import Server, assert_error, start_server


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], Server]]:
    servers: list[Server] = []

    def start(query: str) -> Server:
        s = start_server(f"faulty+file://{tmp_path}/root?{query}", tmp_path)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _nothing_stored(server: Server, digest: str) -> None:
    with server.registry() as reg:
        assert not reg.engine.exists(digest)
        assert list(reg.backend.list("blobs/")) == []
        assert tmp_files(reg.engine) == []


def test_throttling_that_outlasts_the_retries_gives_503(serve: Callable[[str], Server]) -> None:
    server = serve("slowdown=1&lost_reply=0&calls=commit,publish")
    data = b"layer" * 1000
    digest = digest_of(data)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v2/t/app/blobs/uploads/", params={"digest": digest}, content=data)
        assert_error(r, 503, "UNAVAILABLE")
        assert int(r.headers["retry-after"]) >= 1
        assert "SlowDown" in json.loads(r.content)["errors"][0]["message"]
        # a chunked upload's commit fails the same way, and the session stays usable
        loc = c.post("/v2/t/app/blobs/uploads/").headers["location"]
        r = c.patch(loc, content=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        r = c.put(r.headers["location"], params={"digest": digest})
        assert_error(r, 503, "UNAVAILABLE")
        message = json.loads(r.content)["errors"][0]["message"]
        assert "gave up after 4 attempts" in message and "SlowDown" in message
        assert c.get(loc).status_code == 204
    _nothing_stored(server, digest)


def test_a_full_disk_gives_500_with_the_reason(serve: Callable[[str], Server]) -> None:
    server = serve("full=1")
    data = b"x" * 100_000
    digest = digest_of(data)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v2/t/app/blobs/uploads/", params={"digest": digest}, content=data)
        assert_error(r, 500, "UNKNOWN")
        assert "No space left" in json.loads(r.content)["errors"][0]["message"]
        assert "retry-after" not in r.headers
    _nothing_stored(server, digest)
