"""oras-py against ``casengine serve --auth FILE``, logged in the way its users log in
(``OrasClient.login``: user name and secret, then the token flow on every challenge).

oras-py keeps the first token it gets for the rest of the client's life and re-sends it on
every later 401, so a push works only if the token it gets for its first request (a blob
existence check, challenged for ``pull``) already carries ``push``. The server gives each
token every action the user's grants allow on the repository the scope names, never more.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.auth_helpers import AuthServer, sha256, token_claims
from tests.interop.conftest import require_module
from tests.interop.images import payload

pytestmark = pytest.mark.interop


@pytest.fixture
def oras_client_class() -> Any:
    """oras-py's client class (skips or, under CI, fails the test without oras-py)."""
    return require_module("oras.client").OrasClient


@pytest.fixture
def auth_server(oras_client_class: Any, tmp_path: Path) -> Iterator[AuthServer]:
    """Users: rw ``team/*:pull,push``, ro ``team/*:pull``; no anonymous access."""
    server = AuthServer(root=tmp_path / "root", auth_file=tmp_path / "credentials.json",
                        log=tmp_path / "serve.log")
    server.add_users({"rw": ["team/*:pull,push"], "ro": ["team/*:pull"]}, [])
    with server.running():
        yield server


@pytest.fixture
def login(oras_client_class: Any, auth_server: AuthServer, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Any:
    """``login(user)``: an oras-py client logged in as ``user``, in a fresh directory
    (oras-py only pushes files under the current one) with a HOME of its own (``login``
    writes a docker config there)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)

    def make(user: str) -> Any:
        client = oras_client_class(hostname=auth_server.host, insecure=True)
        client.login(username=user, password=auth_server.secrets[user],
                     hostname=auth_server.host, tls_verify=False)
        return client

    return make


def test_push_and_pull_with_credentials(login: Any, auth_server: AuthServer,
                                        tmp_path: Path) -> None:
    data = payload("oras/auth", 300_000)
    Path("artifact.bin").write_bytes(data)
    target = f"{auth_server.host}/team/oras/auth:v1"
    pusher = login("rw")
    response = pusher.push(target=target, files=["artifact.bin"], quiet=True)
    assert response.status_code == 201, response.text
    assert auth_server.linked("team/oras/auth", sha256(data))
    # one token did it all, and it carries no more than rw's grants
    assert token_claims(pusher.auth.token)["acc"] == {"team/oras/auth": "pull,push"}

    reader = login("ro")
    files = reader.pull(target=target, outdir=str(tmp_path / "out"))
    assert [Path(f).name for f in files] == ["artifact.bin"]
    assert Path(files[0]).read_bytes() == data
    assert token_claims(reader.auth.token)["acc"] == {"team/oras/auth": "pull"}
    # (a refused push is not tried here: oras-py retries a 403 for two minutes; the
    # refusals are in tests/test_auth_http.py, with its basic backend)
