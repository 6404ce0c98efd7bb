"""What a hostile or just heavy client can make a server hold: memory, descriptors, threads
and time. Each test attacks a real ``casengine serve`` on loopback with raw sockets, reads
what the attack cost from ``/proc``, and checks that other clients are still served."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.conftest import HOST, MIB, Server, compressed, push_blob, start_server

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def _pids(server: Server) -> list[int]:
    """The server and its worker processes."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    return [server.pid, *map(int, children)]


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def rss(server: Server) -> int:
    """Resident bytes of the server and its workers together."""
    return sum(_status(pid, "VmRSS") for pid in _pids(server)) * 1024


@contextlib.contextmanager
def serving(tmp_path: Path, log_dir: Path, *args: str) -> Iterator[Server]:
    s = start_server(str(tmp_path / "root"), log_dir, args=args)
    try:
        yield s
    finally:
        s.stop()


def still_served(server: Server, repo: str, digest: str, timeout: float = 10.0) -> None:
    """Another client's small pull is answered, well within ``timeout``."""
    r = httpx.get(f"{server.url}/v2/{repo}/blobs/{digest}", timeout=timeout)
    assert r.status_code == 200, r.text


# -- the request head ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("head", [
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n",  # then endless headers
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: ",  # then one endless header value
    b"GET /v2/",  # then an endless URL
], ids=["many-headers", "one-header", "url"])
def test_an_endless_request_head_is_refused_early(tmp_path: Path, log_dir: Path, head: bytes,
                                                  workers: str) -> None:
    """httptools sets no limit: 200 MiB of headers took 260 MiB of the server's memory (and
    the end of them never came, so it was never answered)."""
    with serving(tmp_path, log_dir, "--max-header-size", "64k", "--workers", workers) as srv:
        digest = push_blob(httpx.Client(base_url=srv.url), "limits/head", b"small")
        before = rss(srv)
        piece = (b"X-A: " + b"a" * 1000 + b"\r\n") if head.endswith(b"\r\n") else b"a" * 1000
        sent = 0
        answer = b""
        with socket.create_connection((HOST, srv.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            s.sendall(head)
            with contextlib.suppress(OSError):  # the server closes on us, as it should
                while sent < 64 * MIB:
                    s.sendall(piece * 64)
                    sent += len(piece) * 64
            with contextlib.suppress(OSError):
                while chunk := s.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 431 "), (sent, answer[:200])
        assert sent < 16 * MIB, f"the server took {sent >> 20} MiB of head before refusing it"
        assert rss(srv) - before < 32 * MIB
        still_served(srv, "limits/head", digest)
        # a head under the limit is served as ever
        r = httpx.get(f"{srv.url}/v2/", headers={f"X-{i}": "a" * 500 for i in range(100)})
        assert r.status_code == 200



def test_many_lines_of_one_header_do_not_hold_the_server(tmp_path: Path, log_dir: Path) -> None:
    """Repeated headers were joined line by line, in quadratic time on the event loop: 32k
    lines of ``Accept`` took 0.3 s, a MiB of them seconds, during which nobody was served."""
    with serving(tmp_path, log_dir, "--max-header-size", "8M") as srv:
        head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"Accept: a\r\n" * 600_000 + b"\r\n"
        started = time.monotonic()
        with socket.create_connection((HOST, srv.port), timeout=30) as s:
            s.sendall(head)
            answer = s.recv(100)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert time.monotonic() - started < 15


def _fds(server: Server) -> int:
    return sum(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in _pids(server))


def _closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest.mark.parametrize("workers", ["1", "2"])
def test_connections_that_never_finish_their_head_are_closed(tmp_path: Path, log_dir: Path,
                                                             workers: str) -> None:
    """Connections that sent nothing, or a header a byte at a time, were kept for good: 1100
    of them took every descriptor of a server limited to 1024, and others were refused."""
    with serving(tmp_path, log_dir, "--header-timeout", "1s", "--workers", workers) as srv:
        with httpx.Client(base_url=srv.url) as c:
            digest = push_blob(c, "limits/idle", b"small")
        before = _fds(srv)
        idle = [socket.create_connection((HOST, srv.port)) for _ in range(100)]
        trickling = [socket.create_connection((HOST, srv.port)) for _ in range(100)]
        # after a complete request, the next head has its own deadline
        kept_alive = [socket.create_connection((HOST, srv.port)) for _ in range(20)]
        for s in kept_alive:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            s.sendall(b"GET /v2/ HTTP/1.1\r\n")
        for s in trickling:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for s in trickling:
                with contextlib.suppress(OSError):
                    s.send(b"a")
            if all(_closed_by_peer(s) for s in idle + trickling + kept_alive):
                break
            time.sleep(0.2)
        open_ = sum(not _closed_by_peer(s) for s in idle + trickling + kept_alive)
        for s in idle + trickling + kept_alive:
            s.close()
        assert open_ == 0, f"{open_} connections without a complete head are still open"
        assert _fds(srv) <= before + 4
        still_served(srv, "limits/idle", digest)


# -- request bodies -----------------------------------------------------------------------


def _stalled_bodies(srv: Server, patches: int) -> list[socket.socket]:
    """Chunked-upload PATCHes, monolithic POSTs and manifest PUTs that send part of their
    body and then nothing more."""
    socks = []
    with httpx.Client(base_url=srv.url) as c:
        for i in range(patches):
            location = c.post("/v2/limits/stall/blobs/uploads/").headers["location"]
            s = socket.create_connection((HOST, srv.port))
            s.sendall(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n"
                      f"\r\n".encode() + b"a" * (i + 1))
            socks.append(s)
    for _ in range(10):
        s = socket.create_connection((HOST, srv.port))
        s.sendall(f"POST /v2/limits/stall/blobs/uploads/?digest=sha256:{'0' * 64} HTTP/1.1\r\n"
                  f"Host: x\r\nContent-Length: {MIB}\r\n\r\n".encode() + b"a" * 1000)
        socks.append(s)
        s = socket.create_connection((HOST, srv.port))
        s.sendall(b"PUT /v2/limits/stall/manifests/v1 HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 100000\r\n\r\n{")
        socks.append(s)
    return socks


def test_stalled_request_bodies_are_dropped(tmp_path: Path, log_dir: Path) -> None:
    """A body of which nothing more came held its worker thread for good: 63 stalled PATCHes
    took every thread for engine calls, and no other client was served (a pull timed out
    after 10 s, and again after 40 s)."""
    with serving(tmp_path, log_dir, "--stall-timeout", "1s") as srv:
        with httpx.Client(base_url=srv.url) as c:
            digest = push_blob(c, "limits/stall", b"small")
        socks = _stalled_bodies(srv, 80)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(map(_closed_by_peer, socks)):
            time.sleep(0.2)
        open_ = sum(not _closed_by_peer(s) for s in socks)
        for s in socks:
            s.close()
        assert open_ == 0, f"{open_} stalled requests are still open"
        still_served(srv, "limits/stall", digest)
        with srv.registry() as reg:
            sessions = [u for u in reg.engine.uploads.list() if u.repository == "limits/stall"]
        assert len(sessions) == 80 and {u.offset for u in sessions} == {0}
        assert not list((Path(srv.root) / ".tmp").iterdir())


def test_slow_uploads_do_not_starve_pulls(tmp_path: Path, log_dir: Path) -> None:
    """Engine calls that read a body held the threads every request shares for as long as
    their clients took: 64 uploads sending a byte now and then (too often for any stall
    timeout) stopped every pull."""
    with serving(tmp_path, log_dir) as srv:
        with httpx.Client(base_url=srv.url) as c:
            digest = push_blob(c, "limits/slow", b"small")
        socks = _stalled_bodies(srv, 80)
        try:
            time.sleep(0.5)  # let them all reach the engine
            for s in socks:
                s.send(b"a")
            still_served(srv, "limits/slow", digest)
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                assert c.post("/v2/limits/slow/blobs/uploads/").status_code == 202
        finally:
            for s in socks:
                s.close()


def _behind_busy_threads(srv: Server, repo: str, sessions: int
                         ) -> tuple[str, list[str], list[socket.socket], int]:
    """A small blob of ``repo`` to pull, ``sessions`` upload sessions' locations, the
    stalled uploads that hold every body thread, and the server's RSS once they do."""
    with httpx.Client(base_url=srv.url) as c:
        digest = push_blob(c, repo, b"small")
        waiting = [c.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
                   for _ in range(sessions)]
    holders = _stalled_bodies(srv, 64)  # every body thread, for now
    time.sleep(0.5)
    return digest, waiting, holders, rss(srv)


def test_uploads_waiting_for_a_thread_do_not_read_ahead(tmp_path: Path, log_dir: Path) -> None:
    """Each upload read 8 MiB of its body ahead of its worker thread even while it waited
    for one: 300 PATCHes queued behind busy threads took 2 GiB."""
    with serving(tmp_path, log_dir) as srv:
        digest, waiting, holders, before = _behind_busy_threads(srv, "limits/queue", 100)
        size = 16 * MIB
        block = b"b" * MIB
        socks = []
        for location in waiting:
            s = socket.create_connection((HOST, srv.port))
            s.sendall(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                      f"\r\n".encode())
            s.setblocking(False)
            socks.append(s)
        try:
            sent = [0] * len(socks)
            quiet_since = time.monotonic()
            while time.monotonic() - quiet_since < 1.0:  # until the server takes no more
                for i, s in enumerate(socks):
                    with contextlib.suppress(BlockingIOError):
                        if sent[i] < size:
                            sent[i] += s.send(block[: size - sent[i]])
                            quiet_since = time.monotonic()
            growth = rss(srv) - before
            assert growth < 300 * MIB, f"100 queued uploads took {growth >> 20} MiB"
            still_served(srv, "limits/queue", digest)
        finally:
            for s in socks + holders:
                s.close()


# -- responses ----------------------------------------------------------------------------


def test_a_pull_that_stops_reading_is_dropped(tmp_path: Path, log_dir: Path) -> None:
    """A blob stored compressed streams through Python; a client that stopped reading it
    held the connection and about 17 MiB of buffers for good (100 such pulls: 1.7 GB)."""
    with serving(tmp_path, log_dir, "--stall-timeout", "1s") as srv:
        line = b"a line of text that compresses well, again and again\n"
        data = line * (64 * MIB // len(line))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            digest = push_blob(c, "limits/pull", data)
            small = push_blob(c, "limits/pull", b"small")
        compressed(srv.root, digest)
        before = _fds(srv)
        socks = []
        for _ in range(20):
            s = socket.create_connection((HOST, srv.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(f"GET /v2/limits/pull/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            socks.append(s)  # and read no more
        try:
            assert _fds(srv) >= before + 20
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _fds(srv) > before + 2:
                time.sleep(0.2)
            assert _fds(srv) <= before + 2, "stalled pulls still hold their connections"
            still_served(srv, "limits/pull", small)
        finally:
            for s in socks:
                s.close()


def test_bodies_nobody_reads_yet_are_not_buffered(tmp_path: Path, log_dir: Path) -> None:
    """Before its request reached the app's first read, each connection buffered a MiB of
    body: 500 uploads queued behind busy threads took 600 MiB, and the count of them is
    bounded only by the descriptor limit."""
    with serving(tmp_path, log_dir) as srv:
        digest, waiting, holders, before = _behind_busy_threads(srv, "limits/unread", 500)
        block = b"b" * (2 * MIB)
        socks = []
        try:
            for location in waiting:
                s = socket.create_connection((HOST, srv.port))
                s.setblocking(False)
                socks.append(s)
                with contextlib.suppress(BlockingIOError):
                    s.send(f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Length: "
                           f"{len(block)}\r\n\r\n".encode())
                    s.send(block)
            time.sleep(1)
            growth = rss(srv) - before
            assert growth < 200 * MIB, f"500 unread uploads took {growth >> 20} MiB"
            still_served(srv, "limits/unread", digest)
        finally:
            for s in socks + holders:
                s.close()
