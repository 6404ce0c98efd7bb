"""Several server processes on one root: a second ``casengine serve --workers 2`` sees what
the first one stored, and an upload session continues in whichever process gets the next
request."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.conftest import (
    Server,
    digest_of,
    open_uploads,
    push_manifest,
    start_server,
    wait_until,
)
from tests.registry_helpers import data, simple_image


@pytest.fixture(scope="module")
def workers(server: Server, log_dir: Path) -> Iterator[Server]:
    """``--workers 2`` on the session server's root, beside it."""
    s = start_server(server.root, log_dir, args=("--workers", "2"))
    yield s
    s.stop()


def _fresh(url: str, method: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a connection of its own, so the kernel may hand it to any worker."""
    with httpx.Client(base_url=url, timeout=30, headers={"Connection": "close"}) as c:
        return c.request(method, path, **kwargs)  # type: ignore[arg-type]


def test_second_server_sees_the_first(client: httpx.Client, server: Server, workers: Server,
                                      repo: str) -> None:
    m = simple_image("shared", layer_size=50_000)
    push_manifest(client, repo, m, "v1")
    for _ in range(4):  # several connections: both workers get a chance to answer
        r = _fresh(workers.url, "GET", f"/v2/{repo}/manifests/v1")
        assert r.status_code == 200 and r.content == m.content
        assert _fresh(workers.url, "GET", f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
        for b in m.blobs:
            r = _fresh(workers.url, "GET", f"/v2/{repo}/blobs/{b.digest}")
            assert r.status_code == 200 and r.content == b.content
    catalog = _fresh(workers.url, "GET", "/v2/_catalog").json()["repositories"]
    assert repo in catalog
    # and the other way round
    other = simple_image("shared-back")
    for b in other.blobs:
        r = _fresh(workers.url, "POST", f"/v2/{repo}/blobs/uploads/",
                   params={"digest": b.digest}, content=b.content)
        assert r.status_code == 201
    r = _fresh(workers.url, "PUT", f"/v2/{repo}/manifests/v2", content=other.content,
               headers={"Content-Type": other.media_type})
    assert r.status_code == 201
    assert client.get(f"/v2/{repo}/manifests/v2").content == other.content


def test_upload_moves_between_processes(client: httpx.Client, server: Server,
                                        workers: Server, repo: str) -> None:
    content = data("moving", 1_200_000)
    step = 100_000
    r = _fresh(workers.url, "POST", f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["location"]
    for i, start in enumerate(range(0, len(content) - step, step)):
        # alternate between the single server and the two workers, a new connection each
        url = server.url if i % 3 == 2 else workers.url
        r = _fresh(url, "PATCH", location, content=content[start:start + step],
                   headers={"Content-Range": f"{start}-{start + step - 1}"})
        assert r.status_code == 202, (url, r.text)
        assert r.headers["range"] == f"0-{start + step - 1}"
        status = _fresh(workers.url, "GET", location)
        assert status.status_code == 204 and status.headers["range"] == f"0-{start + step - 1}"
    last = len(content) - step
    r = _fresh(workers.url, "PUT", location, params={"digest": digest_of(content)},
               content=content[last:], headers={"Content-Range": f"{last}-{len(content) - 1}"})
    assert r.status_code == 201, r.text
    for url in (server.url, workers.url, workers.url):
        r = _fresh(url, "GET", f"/v2/{repo}/blobs/{digest_of(content)}")
        assert r.status_code == 200 and r.content == content
    with server.registry() as reg:
        assert open_uploads(reg, repo) == []



def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            kids.append(int(stat.parent.name))
    return kids


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # dead, waiting for a parent to reap it


def test_workers_stop_when_their_master_is_killed(server: Server, log_dir: Path) -> None:
    """kill -9 of the master must not leave its workers serving the port: a restart on
    the same port must work."""
    s = start_server(server.root, log_dir, args=("--workers", "2"))
    workers = wait_until(lambda: len(kids := _children(s.pid)) >= 2 and kids)
    assert workers, "the workers did not start"
    s.proc.kill()
    s.proc.wait()
    try:
        assert wait_until(lambda: all(_gone(p) for p in workers), timeout=15), \
            "the workers outlived their master"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.pid, signal.SIGKILL)  # whatever outlived it (its own session)
    start_server(server.root, log_dir, args=("--workers", "2"), port=s.port).stop()
