"""``casengine serve --auth FILE``: the life of a token and the token endpoint's edges.

Tokens end with the secret they were issued for (``auth rotate``, ``auth rm`` then ``auth
add`` of the same name) while grant changes still apply to live ones; ``POST /token`` is
an OAuth2 password grant (what containerd, nerdctl and the kubelet send); the catalog
works through the token flow (``registry:catalog:*``) and challenges anonymous callers
when anonymous may pull nothing; a credentials file that goes missing or bad while the
server runs gives 503s, logged once.

A real server (a subprocess on 127.0.0.1) and, for the file edits, the real ``casengine
auth`` CLI. Users: admin ``*:pull``, alice ``team/*:pull,push``, carol ``team/ro/*:pull``;
no anonymous grants (test_auth_http.py covers a server with some).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from casengine.credentials import Credentials, Grant
from tests.auth_helpers import (
    AuthServer,
    Bearer,
    error_code,
    parse_challenge,
    push_blob,
    sha256,
    token_claims,
)
from tests.helpers import free_port, run_cli

USERS = {"admin": ["*:pull"], "alice": ["team/*:pull,push"], "carol": ["team/ro/*:pull"]}


def _server(base: Path, anonymous: list[str]) -> AuthServer:
    server = AuthServer(root=base / "root", auth_file=base / "credentials.json",
                        log=base / "serve.log")
    server.add_users(USERS, anonymous)
    return server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    with _server(tmp_path_factory.mktemp("auth-tokens"), []).running() as server:
        yield server


@pytest.fixture
def own_srv(tmp_path: Path) -> Iterator[AuthServer]:
    """A server of the test's own, for edits that would disturb the others."""
    with _server(tmp_path, []).running() as server:
        yield server


def cli(srv: AuthServer, *args: str) -> str:
    """``casengine auth ARGS --file <the server's file>``; its last line of stdout."""
    r = run_cli(["auth", *args, "--file", str(srv.auth_file)], cwd=srv.auth_file.parent)
    assert r.returncode == 0, r.stderr
    return (r.stdout.decode().splitlines() or [""])[-1]


def challenge(srv: AuthServer, r: httpx.Response) -> dict[str, str]:
    assert r.status_code == 401, (r.status_code, r.text)
    params = parse_challenge(r.headers["WWW-Authenticate"])
    assert params["realm"] == f"{srv.url}/token" and params["service"] == "casengine"
    return params


def bearer(srv: AuthServer, token: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, auth=Bearer(token), timeout=30)


# -- tokens end with their secret -------------------------------------------------------------


def test_rotate_ends_the_tokens_of_the_old_secret(srv: AuthServer) -> None:
    old = cli(srv, "add", "rot", "--grant", "team/rot/*:pull,push")
    token = srv.token("rot", "repository:team/rot/app:pull,push", secret=old)
    assert bearer(srv, token).get("/v2/team/rot/app/tags/list").status_code == 404  # works

    new = cli(srv, "rotate", "rot")
    data = os.urandom(100)
    with bearer(srv, token) as c:
        challenge(srv, c.get("/v2/team/rot/app/tags/list"))
        challenge(srv, push_blob(c, "team/rot/app", data))
    assert not srv.exists("team/rot/app") and not srv.stored(sha256(data))
    fresh = srv.token("rot", "repository:team/rot/app:pull,push", secret=new)
    assert push_blob(bearer(srv, fresh), "team/rot/app", data).status_code == 201


def test_a_recreated_user_does_not_inherit_the_old_ones_tokens(srv: AuthServer) -> None:
    first = cli(srv, "add", "reborn", "--grant", "team/reborn/*:pull,push")
    token = srv.token("reborn", "repository:team/reborn/app:pull,push", secret=first)
    cli(srv, "rm", "reborn")
    cli(srv, "add", "reborn", "--grant", "team/reborn/*:pull,push")  # the same grants
    data = os.urandom(100)
    with bearer(srv, token) as c:
        challenge(srv, c.get("/v2/team/reborn/app/tags/list"))
        challenge(srv, push_blob(c, "team/reborn/app", data))
    assert not srv.exists("team/reborn/app")


def test_grant_changes_apply_to_live_tokens(srv: AuthServer) -> None:
    secret = cli(srv, "add", "narrowed", "--grant", "team/narrow/*:pull,push")
    token = srv.token("narrowed", "repository:team/narrow/app:pull,push", secret=secret)
    with Credentials.edit(str(srv.auth_file)) as creds:
        creds.users["narrowed"].grants = [Grant.parse("team/narrow/*:pull")]
    with bearer(srv, token) as c:
        assert c.get("/v2/team/narrow/app/tags/list").status_code == 404  # still may pull
        r = push_blob(c, "team/narrow/app", os.urandom(100))
        assert r.status_code == 403 and error_code(r) == "DENIED"
    assert not srv.exists("team/narrow/app")


# -- POST /token: the OAuth2 password grant -----------------------------------------------------


def _form(user: str, password: str, **more: str) -> dict[str, str]:
    return {"grant_type": "password", "service": "casengine", "client_id": "containerd-client",
            "username": user, "password": password, **more}


def test_password_grant(srv: AuthServer) -> None:
    """What containerd's authorizer posts when it has a user name and secret."""
    r = httpx.post(f"{srv.url}/token", data=_form(
        "alice", srv.secrets["alice"],
        scope="repository:team/oauth/a:pull repository:team/oauth/b:push repository:other/x:pull"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["expires_in"] == 300 and doc["issued_at"].endswith("Z")
    assert sorted(doc["scope"].split(" ")) == ["repository:team/oauth/a:pull,push",
                                               "repository:team/oauth/b:pull,push"]
    claims = token_claims(doc["access_token"])
    assert claims["sub"] == "alice"
    assert claims["acc"] == {"team/oauth/a": "pull,push", "team/oauth/b": "pull,push"}
    data = os.urandom(100)
    assert push_blob(bearer(srv, doc["access_token"]), "team/oauth/b", data).status_code == 201


def test_password_grant_with_a_wrong_password_is_a_401(srv: AuthServer) -> None:
    for user, password in (("alice", "WRONG"), ("nobody", srv.secrets["alice"])):
        r = httpx.post(f"{srv.url}/token",
                       data=_form(user, password, scope="repository:team/oauth:pull"))
        challenge(srv, r)
        assert r.json()["error"] == "invalid_grant"
        assert "access_token" not in r.json()


@pytest.mark.parametrize(("form", "code"), [
    ({"grant_type": "refresh_token", "refresh_token": "x", "client_id": "c"},
     "unsupported_grant_type"),
    ({"grant_type": "client_credentials", "client_id": "c"}, "unsupported_grant_type"),
    ({"username": "alice", "password": "x"}, "invalid_request"),
    ({"grant_type": "password", "username": "alice"}, "invalid_request"),
])
def test_other_grants_are_a_400(srv: AuthServer, form: dict[str, str], code: str) -> None:
    """On a 400 containerd falls back to GET /token with Basic credentials."""
    r = httpx.post(f"{srv.url}/token", data=form)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == code and r.json()["error_description"]


def test_a_token_form_must_be_a_form(srv: AuthServer) -> None:
    r = httpx.post(f"{srv.url}/token", json=_form("alice", srv.secrets["alice"]))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = httpx.post(f"{srv.url}/token", content=b"grant_type=password&username=%ff",
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "HEAD"])
def test_the_token_endpoint_takes_only_get_and_post(srv: AuthServer, method: str) -> None:
    r = httpx.request(method, f"{srv.url}/token", auth=("alice", srv.secrets["alice"]))
    assert r.status_code == 405, r.text
    assert r.headers["Allow"] == "GET, POST"
    if method != "HEAD":
        assert error_code(r) == "UNSUPPORTED"


def test_a_wrong_password_on_get_token_names_an_absolute_realm(srv: AuthServer) -> None:
    r = httpx.get(f"{srv.url}/token", params={"scope": "repository:team/app:pull"},
                  auth=("alice", "WRONG"))
    challenge(srv, r)


# -- the catalog through the token flow ----------------------------------------------------------


def test_catalog_through_the_token_flow(srv: AuthServer) -> None:
    for repo in ("team/cat/a", "team/ro/cat", "other/cat"):
        with srv.registry() as reg:
            reg.create_repository(repo)
    everything = sorted(srv.repositories())
    # anonymous may pull nothing here: a challenge for the catalog, not an empty list
    params = challenge(srv, httpx.get(f"{srv.url}/v2/_catalog"))
    assert params["scope"] == "registry:catalog:*"
    # following it: admin (*:pull) sees everything, carol what her grants cover
    for user, want in (("admin", everything),
                       ("carol", [r for r in everything if r.startswith("team/ro/")])):
        token = srv.token(user, params["scope"])
        assert token_claims(token)["acc"] == {}  # the catalog opens no repository
        r = bearer(srv, token).get("/v2/_catalog")
        assert r.status_code == 200, r.text
        assert r.json()["repositories"] == want, user
        assert push_blob(bearer(srv, token), "team/ro/cat", b"x").status_code in (401, 403)
    # an anonymous token for it gets nothing, and the challenge again
    token = srv.token(None, "registry:catalog:*")
    assert "cat" not in token_claims(token)
    challenge(srv, bearer(srv, token).get("/v2/_catalog"))


def test_anonymous_catalog_is_kept_where_anonymous_may_pull(tmp_path: Path) -> None:
    with _server(tmp_path, ["public/*:pull"]).running() as server:
        with server.registry() as reg:
            for repo in ("public/a", "team/b"):
                reg.create_repository(repo)
        r = httpx.get(f"{server.url}/v2/_catalog")
        assert r.status_code == 200 and r.json()["repositories"] == ["public/a"]
        token = server.token("alice", "registry:catalog:*")
        r = bearer(server, token).get("/v2/_catalog")
        assert r.json()["repositories"] == ["public/a", "team/b"]


# -- a credentials file that goes bad at runtime -----------------------------------------------


def test_a_broken_credentials_file_is_a_503_logged_once(own_srv: AuthServer) -> None:
    srv = own_srv
    good = srv.auth_file.read_bytes()
    doc = json.loads(good)
    alice = ("alice", srv.secrets["alice"])
    breakages = {
        "secret null": json.dumps({**doc, "users": {**doc["users"], "alice": {
            **doc["users"]["alice"], "secret": None}}}).encode(),
        "secret 12": json.dumps({**doc, "users": {**doc["users"], "alice": {
            **doc["users"]["alice"], "secret": 12}}}).encode(),
        "half written": good[: len(good) // 2],
        "deleted": None,
    }
    for what, content in breakages.items():
        if content is None:
            srv.auth_file.unlink()
        else:
            srv.auth_file.write_bytes(content)
        for _ in range(3):
            for r in (httpx.get(f"{srv.url}/v2/team/app/tags/list", auth=alice),
                      httpx.get(f"{srv.url}/v2/_catalog"),
                      httpx.get(f"{srv.url}/token", auth=alice),
                      httpx.post(f"{srv.url}/token", data=_form(*alice))):
                assert r.status_code == 503, (what, r.status_code, r.text)
                assert "credentials file" in r.text, what
        srv.auth_file.write_bytes(good)
        time.sleep(0.01)
        r = httpx.get(f"{srv.url}/v2/team/app/tags/list", auth=alice)
        assert r.status_code == 404, (what, r.text)  # mended: alice is back
    log = srv.log_text()
    assert log.count("answering 503") == len(breakages), log
    assert log.count("readable again") == len(breakages), log


def test_a_malformed_secret_stops_serve_at_start(tmp_path: Path) -> None:
    path = tmp_path / "credentials.json"
    creds = Credentials.load(str(path), missing_ok=True)
    creds.add("ci", [Grant.parse("team/*:pull")])
    creds.save()
    doc = json.loads(path.read_text())
    doc["users"]["ci"]["secret"] = None
    path.write_text(json.dumps(doc))
    r = run_cli(["--root", str(tmp_path / "root"), "serve", "--host", "127.0.0.1", "--port",
                 str(free_port()), "--auth", str(path)], cwd=tmp_path, timeout=10)
    out = r.stderr.decode()
    assert r.returncode not in (0, None), out
    assert "Traceback" not in out and "malformed" in out and "ci" in out, out
