"""Real ``casengine serve`` processes on loopback, and ways to look behind their back.

Every test talks HTTP to a real server (uvicorn in a subprocess, started the way an
operator starts it) and then checks the store itself through a fresh
:class:`casengine.Engine` on the same root: LMDB lets several processes share an index,
so what the server acknowledged (or refused) is visible from here.

- ``server``: one server for the whole session, on a local root in a temp directory.
- ``s3_server``: one per module, on a fresh bucket of the session's moto endpoint, with
  ``--redirect`` and a 5 MiB part size.
- ``repo``: a repository name of the test's own, so tests share servers but no state.
- ``client``: an :class:`httpx.Client` on ``server``.

Helpers for requests that httpx would not send (raw paths, truncated bodies) and for
checking error responses live here too; the test modules import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from casengine.digest import Digest
from casengine.engine import Engine
from casengine.layout import blob_key
from casengine.registry import Registry
from casengine.testing.s3server import DUMMY_CREDENTIALS, free_port
from tests.registry_helpers import Manifest

HOST = "127.0.0.1"
REGION = "us-east-1"
MIB = 1 << 20
#: The command line of ``casengine``, run by the interpreter that runs the tests.
CASENGINE = [sys.executable, "-c", "from casengine.cli import main; main()"]
STARTUP_TIMEOUT = 30.0
#: Lines in a server's log that mean a request crashed somewhere (a 500 or worse).
CRASH = re.compile(r"Traceback|Exception in ASGI application")


@dataclass
class Server:
    """One running ``casengine serve`` (a single process, or a uvicorn supervisor)."""

    root: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    index: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    _log_mark: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @contextlib.contextmanager
    def registry(self) -> Iterator[Registry]:
        """A fresh engine and registry on the server's root, closed after the block
        (never two at once in this process: LMDB wants one environment per process)."""
        engine = Engine.open(self.root, index=self.index, **self.options)
        try:
            yield Registry(engine)
        finally:
            engine.close()

    def log_since_mark(self) -> str:
        text = self.log.read_text(errors="replace")
        return text[self._log_mark:]

    def mark_log(self) -> None:
        self._log_mark = len(self.log.read_text(errors="replace"))

    def rss_peak(self) -> int:
        """VmHWM of the server process, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc status")

    def reset_rss_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not allowed."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def stop(self) -> None:
        _RUNNING[:] = [s for s in _RUNNING if s is not self]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: workers too
                self.proc.wait()


_RUNNING: list[Server] = []


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/", timeout=2, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def compressed(root: str, digest: str, timeout: float = 60.0) -> None:
    """Wait until the server's compactor has stored the blob as zstd: large blobs are
    compressed after the push is acknowledged (casengine/compactor.py)."""
    deadline = time.monotonic() + timeout
    while True:
        with Engine.open(root) as engine:
            if engine.stat(digest).codec == "zst":
                return
        assert time.monotonic() < deadline, f"{digest} still raw after {timeout} s"
        time.sleep(0.05)


def start_server(root: str, log_dir: Path, *, index: str | None = None,
                 options: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None,
                 engine_options: dict[str, Any] | None = None,
                 port: int | None = None) -> Server:
    """Start ``casengine serve`` on ``port`` or a free loopback port; return once ``/v2/``
    answers.

    ``options`` are the ``-o KEY=VALUE`` storage options of the command line (strings);
    ``engine_options`` what this process passes to :meth:`Engine.open` for the same root.
    """
    global_args: list[str] = []
    if index is not None:
        global_args += ["--index", index]
    for key, value in (options or {}).items():
        global_args += ["-o", f"{key}={value}"]
    full_env = {**os.environ, "CASENGINE_ROOT": root, **(env or {})}
    full_env.pop("CASENGINE_INDEX", None)
    last_log = ""
    fixed = port
    for _ in range(3):
        port = fixed or free_port(HOST)
        log = log_dir / f"serve-{port}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*CASENGINE, *global_args, "serve", "--host", HOST, "--port", str(port), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                start_new_session=True)
        url = f"{'https' if '--tls-cert' in args else 'http'}://{HOST}:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                server = Server(root, url, proc, log, index, engine_options or {})
                _RUNNING.append(server)
                return server
            time.sleep(0.05)
        last_log = log.read_text(errors="replace")
        if proc.poll() is None:
            Server(root, url, proc, log).stop()
    raise RuntimeError(f"casengine serve did not start:\n{last_log}")


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def http_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory that holds the session server's root, and nothing else: traversal
    tests list it to prove nothing was created beside the root."""
    return tmp_path_factory.mktemp("http")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http-logs")


@pytest.fixture(scope="session")
def server(http_tmp: Path, log_dir: Path) -> Iterator[Server]:
    s = start_server(str(http_tmp / "root"), log_dir)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def s3_server(s3_endpoint: str, s3_client: Any, tmp_path_factory: pytest.TempPathFactory,
              log_dir: Path) -> Iterator[Server]:
    """A server on a fresh bucket, with --redirect; its index in a temp directory."""
    bucket = f"http-{uuid.uuid4().hex}"
    s3_client.create_bucket(Bucket=bucket)
    index = str(tmp_path_factory.mktemp("s3-index"))
    cli_options = {"endpoint_url": s3_endpoint, **DUMMY_CREDENTIALS, "part_size": str(5 * MIB)}
    engine_options = {"endpoint_url": s3_endpoint, **DUMMY_CREDENTIALS, "part_size": 5 * MIB,
                      "client_kwargs": {"region_name": REGION}}
    env = {"AWS_DEFAULT_REGION": REGION, "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIALS["key"],
           "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIALS["secret"]}
    s = start_server(f"s3://{bucket}/root", log_dir, index=index, options=cli_options,
                     args=("--redirect",), env=env, engine_options=engine_options)
    yield s
    s.stop()
    for upload in s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3_client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                         UploadId=upload["UploadId"])
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=bucket, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=bucket)


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name of this test's own, e.g. ``t/test-cancel-3f9a1c``."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:90].strip("-")
    return f"t/{base}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]}"


@pytest.fixture(autouse=True)
def _servers_did_not_crash(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which any running server logged a traceback (a 500 or worse):
    bad input must never crash a request. Tests marked xfail document such crashes."""
    for s in _RUNNING:
        s.mark_log()
    yield
    if request.node.get_closest_marker("xfail") is not None:
        return
    for s in _RUNNING:
        crashed = CRASH.search(s.log_since_mark())
        assert crashed is None, f"server {s.url} logged a crash:\n{s.log_since_mark()}"


# -- checking responses -----------------------------------------------------------------------


def error_codes(resp: httpx.Response | RawResponse) -> list[str]:
    body = json.loads(resp.content)
    assert isinstance(body.get("errors"), list) and body["errors"], body
    for error in body["errors"]:
        assert isinstance(error.get("message"), str), error
    return [error["code"] for error in body["errors"]]


def assert_error(resp: httpx.Response | RawResponse, status: int | tuple[int, ...],
                 code: str | tuple[str, ...]) -> None:
    """``resp`` is an OCI error response with that status and error code."""
    statuses = status if isinstance(status, tuple) else (status,)
    codes = code if isinstance(code, tuple) else (code,)
    assert resp.status_code in statuses, (resp.status_code, resp.content[:500])
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers.get("docker-distribution-api-version") == "registry/2.0"
    found = error_codes(resp)
    assert set(found) & set(codes), (found, codes)


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


# -- pushing over HTTP ------------------------------------------------------------------------


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = digest_of(data)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert r.status_code == 201, r.text
    return digest


def push_manifest(client: httpx.Client, repo: str, m: Manifest,
                  reference: str | None = None) -> httpx.Response:
    """Push ``m``'s blobs and children, then ``m`` under ``reference`` (its digest)."""
    for child in m.children:
        push_manifest(client, repo, child)
    for b in m.blobs:
        push_blob(client, repo, b.content)
    r = client.put(f"/v2/{repo}/manifests/{reference or m.digest}", content=m.content,
                   headers={"Content-Type": m.media_type})
    assert r.status_code == 201, r.text
    return r


def start_upload(client: httpx.Client, repo: str) -> str:
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    return r.headers["location"]


# -- looking behind the server's back ---------------------------------------------------------


def blob_stored(reg: Registry, digest: str) -> bool:
    """Whether the store holds ``digest`` at all: an index record or an object."""
    d = Digest.parse(digest)
    if reg.engine.index.get_blob(str(d)) is not None:
        return True
    return any(True for _ in reg.backend.list(blob_key(d)))


def open_uploads(reg: Registry, repo: str) -> list[Any]:
    return [s for s in reg.engine.uploads.list() if s.repository == repo]


def assert_repo_clean(server: Server, repo: str, *digests: str) -> None:
    """Nothing of ``digests`` is stored, and ``repo`` has no tag, manifest, link or open
    upload session (the repository itself may or may not exist)."""
    with server.registry() as reg:
        for d in digests:
            assert not blob_stored(reg, d), f"{d} was stored"
        assert open_uploads(reg, repo) == []
        if reg.repository_exists(repo):
            assert reg.tags(repo).items == []
            assert reg.manifests(repo) == []
            for d in digests:
                assert not reg.is_linked(repo, d)


def tmp_files(server: Server) -> list[str]:
    """Temp files a local root holds in ``<root>/.tmp``."""
    tmp = Path(server.root) / ".tmp"
    return sorted(os.listdir(tmp)) if tmp.is_dir() else []


# -- requests httpx would not send --------------------------------------------------------------


@dataclass
class RawResponse:
    status_code: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def raw_request(server: Server, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> RawResponse:
    """A request with ``path`` sent exactly as given (no dot-segment removal, no quoting)."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return RawResponse(r.status, httpx.Headers(r.getheaders()), r.read())
    finally:
        conn.close()


def send_truncated(server: Server, method: str, path: str, declared: int, sent: bytes,
                   headers: dict[str, str] | None = None) -> bytes:
    """Declare ``Content-Length: declared``, send only ``sent``, then close the socket.

    Returns whatever the server answered before the close (usually nothing)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{server.port}",
             f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    got = b""
    with socket.create_connection((HOST, server.port), timeout=10) as s:
        s.sendall(head + sent)
        s.settimeout(0.3)  # let the server start on the body; it must not answer 2xx
        with contextlib.suppress(TimeoutError, OSError):
            got = s.recv(65536)
    return got


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
