"""``casengine serve --auth FILE`` end to end: HTTP Basic, the Docker token flow, grants on
every route, mounts, upload ownership, the filtered catalog, the loopback rule, and the
real clients (skopeo, oras-py) with credentials.

One real server (a subprocess on 127.0.0.1) serves the whole module; each test works in
repositories of its own. Every refusal is checked three ways: the status, the OCI error
code (and for a 401 the ``WWW-Authenticate`` challenge), and that nothing was created:
the repository, the link, the blob or the upload session is absent from a
:class:`~casengine.registry.Registry` opened on the same root beside the server.

Users: alice ``team/*:pull,push``, bob ``other/*:pull,push,delete``, carol
``team/ro/*:pull``, dave ``team/*:pull,push``, pub ``public/*:pull,push``; anonymous
``public/*:pull``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from casengine.credentials import Credentials, Grant
from casengine.http.asgi import HTTPError, Request
from casengine.http.auth import TokenAuth
from tests.auth_helpers import (
    OCI_MANIFEST,
    AuthServer,
    Bearer,
    Skopeo,
    b64url,
    clean_env,
    error_code,
    make_token,
    parse_challenge,
    push_blob,
    push_image,
    require_module,
    require_tool,
    sha256,
    skopeo_prefix,
    token_claims,
    unb64url,
    write_layout,
)
from tests.helpers import casengine_command

USERS = {
    "alice": ["team/*:pull,push"],
    "bob": ["other/*:pull,push,delete"],
    "carol": ["team/ro/*:pull"],
    "dave": ["team/*:pull,push"],
    "pub": ["public/*:pull,push"],
}
ANONYMOUS = ["public/*:pull"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    base = tmp_path_factory.mktemp("auth-serve")
    server = AuthServer(root=base / "root", auth_file=base / "credentials.json",
                        log=base / "serve.log")
    server.add_users(USERS, ANONYMOUS)
    with server.running():
        yield server


def challenge(srv: AuthServer, r: httpx.Response) -> dict[str, str]:
    """Assert ``r`` is a 401 UNAUTHORIZED with a Bearer challenge naming this server's
    /token; return the challenge's parameters."""
    assert r.status_code == 401, (r.status_code, r.text)
    assert error_code(r) == "UNAUTHORIZED"
    params = parse_challenge(r.headers["WWW-Authenticate"])
    assert params["realm"] == f"{srv.url}/token"
    assert params["service"] == "casengine"
    return params


def denied(r: httpx.Response) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert error_code(r) == "DENIED"
    assert "WWW-Authenticate" not in r.headers


def unique(label: str) -> bytes:
    return os.urandom(64) + label.encode()


# -- GET /v2/: docker login ------------------------------------------------------------------


def test_base_without_credentials_is_a_challenge(srv: AuthServer) -> None:
    r = httpx.get(f"{srv.url}/v2/")
    assert r.status_code == 401
    assert error_code(r) == "UNAUTHORIZED"
    assert r.headers["WWW-Authenticate"] == \
        f'Bearer realm="http://127.0.0.1:{srv.port}/token",service="casengine"'
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("host", ['evil",service="other', "a b", "x\\y", "", "[::1"])
def test_challenge_realm_ignores_a_malformed_host(srv: AuthServer, host: str) -> None:
    """A Host header that could break out of the quoted realm is not echoed into it: the
    realm names the address the client connected to."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("GET", "/v2/", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
    finally:
        conn.close()
    assert r.status in (400, 401)
    if r.status == 401:
        assert r.getheader("WWW-Authenticate") == \
            f'Bearer realm="http://127.0.0.1:{srv.port}/token",service="casengine"'


def test_challenge_realm_keeps_a_proper_host(srv: AuthServer) -> None:
    r = httpx.get(f"{srv.url}/v2/", headers={"Host": f"registry.example:{srv.port}"})
    assert parse_challenge(r.headers["WWW-Authenticate"])["realm"] == \
        f"http://registry.example:{srv.port}/token"


def test_public_url_sets_the_realm(tmp_path: Path) -> None:
    """Behind a TLS proxy the server sees plain HTTP: --public-url says where clients are."""
    server = AuthServer(root=tmp_path / "root", auth_file=tmp_path / "credentials.json",
                        log=tmp_path / "serve.log",
                        args=["--public-url", "https://registry.example:8443/"])
    server.add_users({"alice": ["team/*:pull,push"]}, [])
    server.start()
    try:
        r = httpx.get(f"{server.url}/v2/team/app/tags/list")
        assert parse_challenge(r.headers["WWW-Authenticate"]) == {
            "realm": "https://registry.example:8443/token", "service": "casengine",
            "scope": "repository:team/app:pull"}
    finally:
        server.stop()


def test_base_with_basic(srv: AuthServer) -> None:
    with srv.client("alice") as c:
        r = c.get("/v2/")
    assert r.status_code == 200, r.text
    assert r.json() == {}


@pytest.mark.parametrize(("user", "secret"), [
    ("alice", "wrong"),                       # wrong password
    ("alice", ""),                            # empty password
    ("mallory", "whatever"),                  # unknown user
    ("", ""),
])
def test_base_with_bad_basic_is_a_challenge(srv: AuthServer, user: str, secret: str) -> None:
    with srv.client(user, secret=secret) as c:
        r = c.get("/v2/")
    challenge(srv, r)
    assert srv.secrets["alice"] not in r.text


def test_unknown_user_with_a_real_secret_is_refused(srv: AuthServer) -> None:
    # bob's secret under alice's name, and alice's under an unknown name
    challenge(srv, srv.client("alice", secret=srv.secrets["bob"]).get("/v2/"))
    challenge(srv, srv.client("mallory", secret=srv.secrets["alice"]).get("/v2/"))


@pytest.mark.parametrize("header", [
    "Basic !!!notbase64", "Basic " + b64url(b"no-colon-here"), "Bearer", "Bearer garbage",
    "Bearer a.b", "Digest username=alice",
])
def test_malformed_authorization_headers(srv: AuthServer, header: str) -> None:
    # a bad credential is refused; an unknown scheme is anonymous, and /v2/ wants a login
    challenge(srv, httpx.get(f"{srv.url}/v2/", headers={"Authorization": header}))


def test_docker_login_flow(srv: AuthServer) -> None:
    """What ``docker login`` does: ping, follow the realm with Basic, ping with the token."""
    r = httpx.get(f"{srv.url}/v2/")
    params = challenge(srv, r)
    r = httpx.get(params["realm"], params={"service": params["service"]},
                  auth=("alice", srv.secrets["alice"]))
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert r.json()["expires_in"] == 300
    r = httpx.get(f"{srv.url}/v2/", auth=Bearer(token))
    assert r.status_code == 200, r.text
    # the token endpoint with a wrong password issues nothing
    r = httpx.get(params["realm"], params={"service": "casengine"}, auth=("alice", "nope"))
    assert r.status_code == 401
    assert error_code(r) == "UNAUTHORIZED"
    assert "token" not in r.json()


# -- the token flow ---------------------------------------------------------------------------


def test_token_push_and_pull(srv: AuthServer) -> None:
    assert not srv.exists("team/tok")
    token = srv.token("alice", "repository:team/tok:pull,push")
    claims = token_claims(token)
    assert claims["sub"] == "alice"
    assert claims["acc"] == {"team/tok": "pull,push"}
    assert 0 < claims["exp"] - time.time() <= 300

    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        config, layer, manifest = push_image(c, "team/tok", "v1", "tok")
        assert srv.exists("team/tok")  # created by the push, inside alice's grant
        r = c.get("/v2/team/tok/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == manifest
        for blob in (config, layer):
            r = c.get(f"/v2/team/tok/blobs/{sha256(blob)}")
            assert r.status_code == 200 and r.content == blob
        assert c.get("/v2/team/tok/tags/list").json()["tags"] == ["v1"]


def test_token_for_one_repository_does_not_open_another(srv: AuthServer) -> None:
    token = srv.token("alice", "repository:team/tok2:pull,push")
    data = unique("elsewhere")
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        # a repository outside alice's grants: 403
        for r in (push_blob(c, "other/tokx", data), c.get("/v2/other/tokx/tags/list"),
                  c.post("/v2/other/tokx/blobs/uploads/")):
            denied(r)
        # a repository inside alice's grants that the token does not carry: a new challenge
        for r in (push_blob(c, "team/tok3", data), c.get("/v2/team/tok3/tags/list")):
            assert challenge(srv, r)["error"] == "insufficient_scope"
    assert not srv.exists("other/tokx") and not srv.exists("team/tok3")
    assert not srv.stored(sha256(data))


def test_token_only_carries_what_the_grants_allow(srv: AuthServer) -> None:
    # a scope outside the grants: a token that carries nothing
    token = srv.token("alice", "repository:other/x:pull,push")
    assert token_claims(token)["acc"] == {}
    data = unique("ungranted")
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        denied(push_blob(c, "other/x", data))
        denied(c.get("/v2/other/x/tags/list"))
    assert not srv.exists("other/x") and not srv.stored(sha256(data))

    # several scopes, some wider than the grants: for each repository asked about, what
    # the grants allow there (more than asked for on team/ro/y), never more
    token = srv.token("alice", "repository:team/sub:pull,push,delete",
                      "repository:other/x:pull", "repository:team/ro/y:pull")
    assert token_claims(token)["acc"] == {"team/sub": "pull,push", "team/ro/y": "pull,push"}
    token = srv.token("carol", "repository:team/ro/y:pull,push repository:team/z:pull")
    assert token_claims(token)["acc"] == {"team/ro/y": "pull"}


def _flip(text: str, i: int) -> str:
    return text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]


def test_forged_tokens_are_refused(srv: AuthServer) -> None:
    good = srv.token("alice", "repository:team/forge:pull,push")
    payload, _, signature = good.partition(".")
    wider = json.loads(unb64url(payload))
    wider["acc"] = {"team/forge": "pull,push", "other/forge": "pull,push,delete"}
    wider_payload = b64url(json.dumps(wider, separators=(",", ":")).encode())
    forged = {
        "flipped signature": f"{payload}.{_flip(signature, len(signature) // 2)}",
        "another key": make_token(os.urandom(32), wider),
        "payload changed": f"{wider_payload}.{signature}",
        "no signature": f"{payload}.",
        "no payload": f".{signature}",
        "signature as payload": f"{signature}.{payload}",
    }
    data = unique("forged")
    for what, token in forged.items():
        with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
            for r in (c.get("/v2/"), push_blob(c, "team/forge", data),
                      push_blob(c, "other/forge", data), c.get("/v2/team/forge/tags/list")):
                assert r.status_code == 401, (what, r.status_code, r.text)
                challenge(srv, r)
    assert not srv.exists("team/forge") and not srv.exists("other/forge")
    assert not srv.stored(sha256(data))
    # the untouched token works: the refusals were for the changes
    r = push_blob(httpx.Client(base_url=srv.url, auth=Bearer(good)), "team/forge", data)
    assert r.status_code == 201, r.text


def test_expired_token_is_refused(srv: AuthServer) -> None:
    now = time.time()
    claims = {"sub": "alice", "iat": now - 600, "exp": now - 1,
              "acc": {"team/exp": "pull,push"}, "sid": srv.secret_id("alice")}
    data = unique("expired")
    with httpx.Client(base_url=srv.url, auth=Bearer(make_token(srv.key, claims))) as c:
        challenge(srv, c.get("/v2/"))
        challenge(srv, push_blob(c, "team/exp", data))
    assert not srv.exists("team/exp") and not srv.stored(sha256(data))
    # the same token, not yet expired, is accepted: the key and format are right
    claims["exp"] = now + 60
    with httpx.Client(base_url=srv.url, auth=Bearer(make_token(srv.key, claims))) as c:
        assert c.get("/v2/").status_code == 200
        assert push_blob(c, "team/exp", data).status_code == 201
    assert srv.linked("team/exp", sha256(data))


def test_a_token_never_exceeds_the_current_grants(srv: AuthServer) -> None:
    """A validly signed token claiming more than the user's grants gets only the grants."""
    now = time.time()
    claims = {"sub": "carol", "iat": now, "exp": now + 60,
              "acc": {"team/ro/over": "pull,push,delete", "other/over": "pull,push"},
              "sid": srv.secret_id("carol")}
    data = unique("over")
    with httpx.Client(base_url=srv.url, auth=Bearer(make_token(srv.key, claims))) as c:
        denied(push_blob(c, "team/ro/over", data))
        denied(push_blob(c, "other/over", data))
    assert not srv.exists("team/ro/over") and not srv.exists("other/over")
    assert not srv.stored(sha256(data))


def test_a_token_cannot_be_traded_for_a_wider_one(srv: AuthServer) -> None:
    narrow = srv.token("alice", "repository:team/trade:pull")
    r = httpx.get(f"{srv.url}/token", auth=Bearer(narrow),
                  params={"service": "casengine", "scope": "repository:team/trade:pull,push"})
    challenge(srv, r)
    assert "token" not in r.json()
    # nor a forged or expired one
    r = httpx.get(f"{srv.url}/token", auth=Bearer(_flip(narrow, len(narrow) - 10)),
                  params={"service": "casengine", "scope": "repository:team/trade:push"})
    challenge(srv, r)


def test_insufficient_scope_versus_denied(srv: AuthServer) -> None:
    data = unique("scope")
    # alice may push to team/scope, but her token is for another repository: ask for a
    # wider token (a token for a repository carries all she may do there)
    token = srv.token("alice", "repository:team/scope-other:pull")
    assert token_claims(token)["acc"] == {"team/scope-other": "pull,push"}
    r = push_blob(httpx.Client(base_url=srv.url, auth=Bearer(token)), "team/scope", data)
    params = challenge(srv, r)
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "repository:team/scope:pull,push"
    assert not srv.exists("team/scope") and not srv.stored(sha256(data))
    # following the challenge gets a token that works
    wider = srv.token("alice", params["scope"])
    r = push_blob(httpx.Client(base_url=srv.url, auth=Bearer(wider)), "team/scope", data)
    assert r.status_code == 201, r.text

    # carol may not push to team/ro/x at all: no wider token would help
    data = unique("carol")
    token = srv.token("carol", "repository:team/ro/scope:pull,push")
    assert token_claims(token)["acc"] == {"team/ro/scope": "pull"}
    denied(push_blob(httpx.Client(base_url=srv.url, auth=Bearer(token)), "team/ro/scope", data))
    assert not srv.exists("team/ro/scope") and not srv.stored(sha256(data))


def test_tokens_of_a_removed_user_stop_working(srv: AuthServer) -> None:
    creds = Credentials.load(str(srv.auth_file))
    secret = creds.add("eve", [Grant.parse("team/eve/*:pull,push")])
    creds.save()
    token = srv.token("eve", "repository:team/eve/x:pull,push", secret=secret)
    assert httpx.get(f"{srv.url}/v2/", auth=Bearer(token)).status_code == 200
    creds = Credentials.load(str(srv.auth_file))
    creds.remove("eve")
    time.sleep(0.01)  # a distinct mtime
    creds.save()
    data = unique("eve")
    challenge(srv, push_blob(httpx.Client(base_url=srv.url, auth=Bearer(token)),
                             "team/eve/x", data))
    challenge(srv, httpx.get(f"{srv.url}/v2/", auth=("eve", secret)))
    assert not srv.exists("team/eve/x") and not srv.stored(sha256(data))


# -- Basic on every route -------------------------------------------------------------------


def test_read_only_user(srv: AuthServer) -> None:
    with srv.client("alice") as c:
        _, layer, manifest = push_image(c, "team/ro/app", "v1", "ro")
    with srv.client("carol") as c:
        r = c.get("/v2/team/ro/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == manifest
        assert c.head(f"/v2/team/ro/app/blobs/{sha256(layer)}").status_code == 200
        assert c.get(f"/v2/team/ro/app/blobs/{sha256(layer)}").content == layer
        assert c.get("/v2/team/ro/app/tags/list").json()["tags"] == ["v1"]

        uploads = srv.open_uploads()
        data = unique("carol-push")
        denied(push_blob(c, "team/ro/app", data))
        denied(push_blob(c, "team/ro/new", data))
        denied(c.post("/v2/team/ro/app/blobs/uploads/"))
        denied(c.post("/v2/team/ro/app/blobs/uploads/",
                      params={"mount": sha256(layer), "from": "team/ro/app"}))
        _, _, other_manifest = push_image(srv.client("alice"), "team/ro/src", "v1", "src")
        denied(c.put("/v2/team/ro/app/manifests/v2", content=other_manifest,
                     headers={"Content-Type": OCI_MANIFEST}))
        denied(c.delete(f"/v2/team/ro/app/manifests/{sha256(manifest)}"))
        denied(c.delete(f"/v2/team/ro/app/blobs/{sha256(layer)}"))
        # and nothing outside team/ro/, not even pull
        denied(c.get("/v2/team/tok/tags/list"))
    assert srv.open_uploads() == uploads
    assert not srv.exists("team/ro/new") and not srv.stored(sha256(data))
    with srv.registry() as reg:
        assert reg.tag_map("team/ro/app") == {"v1": sha256(manifest)}
        assert reg.is_linked("team/ro/app", sha256(layer))


def test_delete_needs_the_delete_grant(srv: AuthServer) -> None:
    with srv.client("alice") as c:
        _, layer, manifest = push_image(c, "team/del", "v1", "del")
        denied(c.delete(f"/v2/team/del/manifests/{sha256(manifest)}"))
        denied(c.delete("/v2/team/del/manifests/v1"))
        denied(c.delete(f"/v2/team/del/blobs/{sha256(layer)}"))
    with srv.registry() as reg:
        assert reg.tag_map("team/del") == {"v1": sha256(manifest)}
        assert reg.is_linked("team/del", sha256(layer))

    with srv.client("bob") as c:
        _, bob_layer, bob_manifest = push_image(c, "other/del", "v1", "del")
        r = c.delete(f"/v2/other/del/manifests/{sha256(bob_manifest)}")
        assert r.status_code == 202, r.text
        assert c.get(f"/v2/other/del/manifests/{sha256(bob_manifest)}").status_code == 404
        assert c.delete(f"/v2/other/del/blobs/{sha256(bob_layer)}").status_code == 202
        assert not srv.linked("other/del", sha256(bob_layer))
        # bob cannot delete in team/
        denied(c.delete(f"/v2/team/del/blobs/{sha256(layer)}"))
        denied(c.delete(f"/v2/team/del/manifests/{sha256(manifest)}"))
    assert srv.linked("team/del", sha256(layer))
    with srv.registry() as reg:
        assert reg.tag_map("team/del") == {"v1": sha256(manifest)}


# -- anonymous --------------------------------------------------------------------------------


def test_anonymous(srv: AuthServer) -> None:
    with srv.client("pub") as c:
        _, layer, manifest = push_image(c, "public/x", "v1", "public")
    with srv.client() as c:
        r = c.get("/v2/public/x/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.content == manifest
        assert c.get(f"/v2/public/x/blobs/{sha256(layer)}").content == layer
        assert c.get("/v2/public/x/tags/list").json()["tags"] == ["v1"]

        data = unique("anon")
        params = challenge(srv, push_blob(c, "public/x", data))
        assert params["scope"] == "repository:public/x:pull,push"
        assert "error" not in params
        challenge(srv, push_blob(c, "public/new", data))
        challenge(srv, c.post("/v2/public/x/blobs/uploads/"))
        challenge(srv, c.delete(f"/v2/public/x/manifests/{sha256(manifest)}"))
        params = challenge(srv, c.get("/v2/team/tok/tags/list"))
        assert params["scope"] == "repository:team/tok:pull"
        challenge(srv, c.get(f"/v2/team/tok/blobs/{sha256(layer)}"))
    assert not srv.exists("public/new") and not srv.stored(sha256(data))
    with srv.registry() as reg:
        assert reg.tag_map("public/x") == {"v1": sha256(manifest)}

    # an anonymous token carries the anonymous grants, and pull only
    token = srv.token(None, "repository:public/x:pull,push", "repository:team/tok:pull")
    assert token_claims(token)["acc"] == {"public/x": "pull"}
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        assert c.get("/v2/public/x/tags/list").status_code == 200
        challenge(srv, push_blob(c, "public/x", data))
        challenge(srv, c.get("/v2/team/tok/tags/list"))
    assert not srv.stored(sha256(data))


# -- mounts -------------------------------------------------------------------------------


def test_mount_needs_pull_on_the_source(srv: AuthServer) -> None:
    secret_blob = unique("bobs")
    assert push_blob(srv.client("bob"), "other/mnt", secret_blob).status_code == 201
    d = sha256(secret_blob)
    with srv.client("alice") as c:
        # from a repository alice cannot read: a plain upload session, no link
        r = c.post("/v2/team/mnt/blobs/uploads/", params={"mount": d, "from": "other/mnt"})
        assert r.status_code == 202, r.text
        assert r.headers["Location"].startswith("/v2/team/mnt/blobs/uploads/")
        with srv.registry() as reg:  # a session of alice's own, like any other
            assert reg.engine.uploads.status(r.headers["Docker-Upload-UUID"]).owner == "alice"
        assert not srv.linked("team/mnt", d)
        assert c.get(f"/v2/team/mnt/blobs/{d}").status_code == 404
        # automatic mount (no from=): only repositories alice can read are considered
        r = c.post("/v2/team/mnt/blobs/uploads/", params={"mount": d})
        assert r.status_code == 202, r.text
        assert not srv.linked("team/mnt", d)
        assert c.head(f"/v2/team/mnt/blobs/{d}").status_code == 404

        # from a repository she can read: mounted
        mine = unique("alices")
        assert push_blob(c, "team/mnt-src", mine).status_code == 201
        r = c.post("/v2/team/mnt/blobs/uploads/",
                   params={"mount": sha256(mine), "from": "team/mnt-src"})
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == sha256(mine)
        assert srv.linked("team/mnt", sha256(mine))
        # and automatically
        mine2 = unique("alices2")
        assert push_blob(c, "team/mnt-src", mine2).status_code == 201
        r = c.post("/v2/team/mnt2/blobs/uploads/", params={"mount": sha256(mine2)})
        assert r.status_code == 201, r.text
        assert srv.linked("team/mnt2", sha256(mine2))

    # mounting into a repository without push on it is refused before anything
    with srv.client("carol") as c:
        denied(c.post("/v2/team/ro/mnt/blobs/uploads/",
                      params={"mount": sha256(mine), "from": "team/mnt-src"}))
    assert not srv.exists("team/ro/mnt")
    assert srv.linked("other/mnt", d)  # bob's blob untouched


def test_mount_with_a_token_needs_pull_on_the_source_in_the_token(srv: AuthServer) -> None:
    secret_blob = unique("bobs-token")
    assert push_blob(srv.client("bob"), "other/mnt-t", secret_blob).status_code == 201
    d = sha256(secret_blob)
    token = srv.token("alice", "repository:team/mnt-t:pull,push", "repository:other/mnt-t:pull")
    assert token_claims(token)["acc"] == {"team/mnt-t": "pull,push"}
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        r = c.post("/v2/team/mnt-t/blobs/uploads/", params={"mount": d, "from": "other/mnt-t"})
        assert r.status_code == 202, r.text
        r = c.post("/v2/team/mnt-t/blobs/uploads/", params={"mount": d})
        assert r.status_code == 202, r.text
    assert not srv.linked("team/mnt-t", d)


# -- upload sessions belong to their user -------------------------------------------------------


def test_upload_session_cannot_be_continued_by_another_user(srv: AuthServer) -> None:
    data = unique("shared") * 20
    first, rest = data[:100], data[100:]
    with srv.client("alice") as alice, srv.client("dave") as dave:
        r = alice.post("/v2/team/shared/blobs/uploads/")
        assert r.status_code == 202, r.text
        location = r.headers["Location"]
        r = alice.patch(location, content=first, headers={
            "Content-Range": f"0-{len(first) - 1}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        assert r.headers["Range"] == "0-99"

        other = unique("daves") * 20
        attempts = [
            dave.get(location),
            dave.patch(location, content=rest, headers={
                "Content-Range": f"100-{len(data) - 1}",
                "Content-Type": "application/octet-stream"}),
            dave.patch(location, content=other),
            dave.put(location, params={"digest": sha256(other)}, content=other),
            dave.put(location, params={"digest": sha256(first)}),
            dave.delete(location),
        ]
        for r in attempts:
            assert r.status_code == 404, (r.request.method, r.status_code, r.text)
            assert error_code(r) == "BLOB_UPLOAD_UNKNOWN"
        assert not srv.stored(sha256(other)) and not srv.stored(sha256(first))

        # alice's session is intact: same offset, and she can finish it
        r = alice.get(location)
        assert r.status_code == 204, r.text
        assert r.headers["Range"] == "0-99"
        # the owner is the user, not the way she authenticates: a token works too
        token = srv.token("alice", "repository:team/shared:pull,push")
        r = httpx.put(f"{srv.url}{location}", params={"digest": sha256(data)}, content=rest,
                      auth=Bearer(token), headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        assert alice.get(f"/v2/team/shared/blobs/{sha256(data)}").content == data
    assert srv.linked("team/shared", sha256(data))


def test_another_users_token_cannot_continue_an_upload(srv: AuthServer) -> None:
    with srv.client("alice") as alice:
        location = alice.post("/v2/team/shared2/blobs/uploads/").headers["Location"]
    token = srv.token("dave", "repository:team/shared2:pull,push")
    data = unique("dave-token")
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as dave:
        for r in (dave.get(location), dave.put(location, params={"digest": sha256(data)},
                                               content=data), dave.delete(location)):
            assert r.status_code == 404, r.text
            assert error_code(r) == "BLOB_UPLOAD_UNKNOWN"
    assert not srv.stored(sha256(data))
    assert srv.client("alice").get(location).status_code == 204


# -- the catalog ------------------------------------------------------------------------------


def _catalog(c: httpx.Client, n: int | None = None) -> list[str]:
    names, url, params = [], "/v2/_catalog", {"n": n} if n else None
    while True:
        r = c.get(url, params=params)  # (params={} would drop the Link URL's query)
        assert r.status_code == 200, r.text
        names += r.json()["repositories"]
        link = r.headers.get("Link")
        if not link:
            return names
        url, params = link[1:link.index(">")], None


def test_catalog_is_filtered_by_grants(srv: AuthServer) -> None:
    for user, repo in (("alice", "team/cat"), ("alice", "team/ro/cat"), ("bob", "other/cat"),
                       ("pub", "public/cat")):
        assert push_blob(srv.client(user), repo, unique(repo)).status_code == 201
    everything = srv.repositories()
    public = [r for r in sorted(everything) if r.startswith("public/")]

    def under(*prefixes: str) -> list[str]:
        return sorted(r for r in everything if r.startswith(prefixes))

    cases = {"alice": under("team/"), "dave": under("team/"), "carol": under("team/ro/"),
             "bob": under("other/"), "pub": public, None: public}
    for user, want in cases.items():
        with srv.client(user) as c:
            for got in (_catalog(c), _catalog(c, n=1)):  # pages hold only visible names too
                # what the user's grants cover, exactly; beyond it at most what anonymous
                # may pull (see test_signed_in_users_can_pull_what_anonymous_can)
                assert [r for r in got if r not in public or r in want] == want, user
                assert set(got) <= set(want) | set(public), user
    assert "team/cat" in cases["alice"] and "team/ro/cat" in cases["carol"]
    assert "other/cat" in cases["bob"] and "public/cat" in cases[None]
    # a token sees no more than its user
    token = srv.token("carol", "repository:team/ro/cat:pull")
    with httpx.Client(base_url=srv.url, auth=Bearer(token)) as c:
        assert set(_catalog(c)) <= set(cases["carol"])
    # wrong credentials get no catalog at all
    challenge(srv, srv.client("alice", secret="wrong").get("/v2/_catalog"))


def test_signed_in_users_can_pull_what_anonymous_can(srv: AuthServer) -> None:
    _, layer, _ = push_image(srv.client("pub"), "public/inherit", "v1", "inherit")
    assert srv.client().get("/v2/public/inherit/tags/list").status_code == 200
    with srv.client("bob") as c:
        r = c.get(f"/v2/public/inherit/blobs/{sha256(layer)}")
        assert r.status_code == 200, r.text
        assert "public/inherit" in _catalog(c)
        denied(push_blob(c, "public/inherit", unique("bob-public")))  # still pull only


def test_a_refusal_does_not_tell_whether_the_repository_exists(srv: AuthServer) -> None:
    push_image(srv.client("alice"), "team/exists", "v1", "exists")
    with srv.client("bob") as c:
        a, b = c.get("/v2/team/exists/tags/list"), c.get("/v2/team/never/tags/list")
    denied(a)
    denied(b)
    assert a.json()["errors"][0]["message"].replace("exists", "X") == \
        b.json()["errors"][0]["message"].replace("never", "X")
    with srv.client() as c:
        a, b = c.get("/v2/team/exists/tags/list"), c.get("/v2/team/never/tags/list")
    challenge(srv, a)
    challenge(srv, b)
    assert not srv.exists("team/never")


def test_rotation_and_removal_take_effect_at_once(srv: AuthServer) -> None:
    """The server re-reads the file: a rotated secret stops working even though the server
    had just verified (and cached) it."""
    creds = Credentials.load(str(srv.auth_file))
    old = creds.add("frank", [Grant.parse("team/frank/*:pull,push")])
    creds.save()
    assert httpx.get(f"{srv.url}/v2/", auth=("frank", old)).status_code == 200
    assert httpx.get(f"{srv.url}/v2/", auth=("frank", old)).status_code == 200  # cached
    creds = Credentials.load(str(srv.auth_file))
    new = creds.rotate("frank")
    time.sleep(0.01)
    creds.save()
    data = unique("frank")
    challenge(srv, httpx.get(f"{srv.url}/v2/", auth=("frank", old)))
    challenge(srv, push_blob(srv.client("frank", secret=old), "team/frank/x", data))
    assert not srv.exists("team/frank/x") and not srv.stored(sha256(data))
    assert httpx.get(f"{srv.url}/v2/", auth=("frank", new)).status_code == 200


def test_server_files_stay_private(srv: AuthServer) -> None:
    key = Path(f"{srv.auth_file}.key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_text().strip()) == 64
    for user, secret in srv.secrets.items():
        assert secret.encode() not in srv.auth_file.read_bytes(), user
    assert key.read_text().strip() not in srv.log_text()


# -- serve refuses to expose an open registry ---------------------------------------------------


def _serve(tmp_path: Path, *args: str, timeout: float = 20) -> tuple[int | None, str]:
    root = tmp_path / "root"
    proc = subprocess.Popen([*casengine_command(), "serve", *args], env=clean_env(root),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # it bound after all: stop it
        proc.kill()
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


def test_serve_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    code, out = _serve(tmp_path, "--host", "192.0.2.1", "--port", "5999")
    assert code == 8, out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert "--auth" in lines[0] and "--insecure" in lines[0] and "192.0.2.1" in lines[0]
    assert "Traceback" not in out
    assert not (tmp_path / "root").exists()  # refused before opening anything
    code, out = _serve(tmp_path, "--host", "0.0.0.0", "--port", "5999")
    assert code == 8 and "--insecure" in out


@pytest.mark.parametrize("url", ["ftp://registry.example", 'https://a"b', "registry.example",
                                 "https://a b"])
def test_serve_refuses_a_malformed_public_url(tmp_path: Path, url: str) -> None:
    code, out = _serve(tmp_path, "--port", "5999", "--public-url", url)
    assert code == 2 and "--public-url" in out and "Traceback" not in out, out


@pytest.mark.parametrize("flag", ["--insecure", "--auth"])
def test_serve_insecure_or_auth_gets_past_the_check(tmp_path: Path, flag: str) -> None:
    args = [flag]
    if flag == "--auth":
        creds = Credentials.load(str(tmp_path / "creds.json"), missing_ok=True)
        creds.add("x", [Grant.parse("x/*:pull")])
        creds.save()
        args.append(str(tmp_path / "creds.json"))
    code, out = _serve(tmp_path, "--host", "192.0.2.1", "--port", "5999", *args)
    assert "refusing" not in out and "--insecure" not in out, out
    assert code != 0  # 192.0.2.1 is a documentation address: binding it fails


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_fails_clearly(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, out = _serve(tmp_path, "--port", port, "--workers", workers)
    assert code == 8, out
    assert out.strip() == f"casengine: error: cannot listen on 127.0.0.1:{port}: " \
                          "Address already in use"


def test_serve_with_a_missing_credentials_file_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    code, out = _serve(tmp_path, "--host", "127.0.0.1", "--port", "5999", "--auth",
                       str(missing))
    assert code not in (0, None), out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "missing.json" in lines[0], out
    assert "Traceback" not in out


# -- the token check in process: constant time, malformed claims ---------------------------------


def _request(path: str, authorization: str | None = None) -> Request:
    headers = [(b"host", b"127.0.0.1:5000")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    return Request({"type": "http", "method": "GET", "path": path, "headers": headers,
                    "scheme": "http", "query_string": b""}, receive)


@pytest.fixture(scope="module")
def token_auth(tmp_path_factory: pytest.TempPathFactory) -> TokenAuth:
    path = tmp_path_factory.mktemp("token-auth") / "credentials.json"
    creds = Credentials.load(str(path), missing_ok=True)
    creds.add("alice", [Grant.parse("team/*:pull,push")])
    creds.save()
    return TokenAuth(str(path))


def _authorize(auth: TokenAuth, token: str, repo: str = "team/a",
               actions: frozenset[str] = frozenset({"pull"})):
    return asyncio.run(auth.authorize(_request(f"/v2/{repo}/tags/list", f"Bearer {token}"),
                                      repo, actions))


def test_token_signature_is_compared_in_constant_time(token_auth: TokenAuth,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    real = hmac.compare_digest
    calls: list[tuple] = []

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    now = time.time()
    sid = token_auth.secret_id(Credentials.load(token_auth.path).users["alice"])
    good = make_token(token_auth.key, {"sub": "alice", "iat": now, "exp": now + 60,
                                       "acc": {"team/a": "pull"}, "sid": sid})
    assert _authorize(token_auth, good).user == "alice"
    # the signature, then the fingerprint of the secret the token was issued for
    assert len(calls) == 2 and all(len(x) == 32 for x in calls[0]) and calls[1] == (sid, sid)
    payload, _, signature = good.partition(".")
    with pytest.raises(HTTPError) as refused:
        _authorize(token_auth, f"{payload}.{_flip(signature, 5)}")
    assert refused.value.status == 401 and refused.value.code == "UNAUTHORIZED"
    assert len(calls) == 3


_NOW = time.time()
_BAD_CLAIMS = {
    "not an object": [1, 2],
    "no sub": {"exp": _NOW + 60, "acc": {}},
    "no exp": {"sub": "alice", "acc": {}},
    "exp a string": {"sub": "alice", "exp": "later", "acc": {}},
    "acc a list": {"sub": "alice", "exp": _NOW + 60, "acc": ["team/a"]},
    "acc values a list": {"sub": "alice", "exp": _NOW + 60, "acc": {"team/a": ["pull"]}},
    "unknown sub": {"sub": "mallory", "exp": _NOW + 60, "acc": {"team/a": "pull"}},
}
_BUG_CLAIMS = "BUG: casengine/http/auth.py TokenAuth.identify: a signed token whose claims "


@pytest.mark.parametrize("claims", [
    *(pytest.param(v, id=k) for k, v in _BAD_CLAIMS.items()),
    pytest.param({"sub": ["alice"], "exp": _NOW + 60, "acc": {}}, id="sub a list"),
    pytest.param({"sub": "alice", "exp": float("nan"), "acc": {"team/a": "pull"}},
                 id="exp NaN"),
])
def test_signed_tokens_with_malformed_claims_are_a_401(token_auth: TokenAuth,
                                                       claims: object) -> None:
    """Only the server can sign, so this is robustness, not forgery: whatever a signed
    payload holds, a bad one is a 401 and never a 500."""
    token = make_token(token_auth.key, claims)
    with pytest.raises(HTTPError) as refused:
        _authorize(token_auth, token)
    assert refused.value.status == 401 and refused.value.code == "UNAUTHORIZED"


# -- real clients -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skopeo_isolation() -> list[str]:
    return skopeo_prefix()


@pytest.fixture
def skopeo(tmp_path: Path, skopeo_isolation: list[str]) -> Skopeo:
    return Skopeo(require_tool("skopeo"), tmp_path / "skopeo", skopeo_isolation)


def test_skopeo_round_trip_with_credentials(srv: AuthServer, skopeo: Skopeo,
                                            tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    blobs = write_layout(layout)
    alice = f"alice:{srv.secrets['alice']}"
    ref = f"docker://{srv.host}/team/skopeo/app:v1"
    r = skopeo.run("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds",
                   alice, f"oci:{layout}:v1", ref)
    assert r.returncode == 0, r.stderr.decode()
    with srv.registry() as reg:
        assert reg.tag_map("team/skopeo/app") == {"v1": blobs["manifest"]["digest"]}
        for d in ("config", "layer"):
            assert reg.is_linked("team/skopeo/app", blobs[d]["digest"])

    out = tmp_path / "out"
    r = skopeo.run("copy", "--preserve-digests", "--src-tls-verify=false", "--src-creds",
                   alice, ref, f"oci:{out}:v1")
    assert r.returncode == 0, r.stderr.decode()
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == blobs["manifest"]["digest"]
    for d in ("config", "layer", "manifest"):
        digest = blobs[d]["digest"]
        assert (out / "blobs" / "sha256" / digest[7:]).read_bytes() == \
            (layout / "blobs" / "sha256" / digest[7:]).read_bytes()

    r = skopeo.run("inspect", "--raw", "--tls-verify=false", "--creds", alice, ref)
    assert r.returncode == 0 and sha256(r.stdout) == blobs["manifest"]["digest"]


def test_skopeo_refused(srv: AuthServer, skopeo: Skopeo, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    blobs = write_layout(layout)
    cases = [
        ("alice:wrong-password", "team/skopeo/bad"),
        (f"mallory:{srv.secrets['alice']}", "team/skopeo/bad"),
        (f"carol:{srv.secrets['carol']}", "team/ro/skopeo"),   # pull only
        (f"alice:{srv.secrets['alice']}", "other/skopeo"),     # outside her grants
    ]
    for creds, repo in cases:
        r = skopeo.run("copy", "--preserve-digests", "--dest-tls-verify=false", "--dest-creds",
                       creds, f"oci:{layout}:v1", f"docker://{srv.host}/{repo}:v1")
        assert r.returncode != 0, (creds, repo)
        err = r.stderr.decode().lower()
        assert any(w in err for w in ("unauthorized", "denied", "forbidden", "401", "403")), err
        assert not srv.exists(repo), repo
    for d in ("config", "layer", "manifest"):
        assert not srv.stored(blobs[d]["digest"])

    # and pulling with wrong credentials
    r = skopeo.run("inspect", "--raw", "--tls-verify=false", "--creds", "alice:wrong",
                   f"docker://{srv.host}/team/tok:v1")
    assert r.returncode != 0


@pytest.fixture
def oras_client(srv: AuthServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Makes oras-py clients of the server: ``make(user, secret=None, backend="basic")``.

    oras-py's "basic" backend answers a 401 with HTTP Basic on the retried request; its
    "token" backend (the default) follows the challenge's realm with Basic to get a token.
    """
    require_module("oras")
    import oras.client

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # oras-py only pushes files under the current directory
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # it reads docker auth files
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)

    def make(user: str, secret: str | None = None, backend: str = "basic"):
        client = oras.client.OrasClient(hostname=srv.host, insecure=True, auth_backend=backend)
        client.auth.set_basic_auth(user, secret if secret is not None else srv.secrets[user])
        return client

    return make


def test_oras_round_trip_with_basic(srv: AuthServer, oras_client, tmp_path: Path) -> None:
    data = unique("oras") * 100
    Path("artifact.bin").write_bytes(data)
    client = oras_client("alice")
    r = client.push(target=f"{srv.host}/team/oras/art:v1", files=["artifact.bin"], quiet=True)
    assert r.status_code == 201, r.text
    assert srv.linked("team/oras/art", sha256(data))
    files = oras_client("alice").pull(target=f"{srv.host}/team/oras/art:v1",
                                      outdir=str(tmp_path / "out"))
    assert [Path(f).name for f in files] == ["artifact.bin"]
    assert Path(files[0]).read_bytes() == data
    # carol cannot push to team/ro/, but reads what alice put there
    r = client.push(target=f"{srv.host}/team/ro/oras:v1", files=["artifact.bin"], quiet=True)
    assert r.status_code == 201, r.text
    files = oras_client("carol").pull(target=f"{srv.host}/team/ro/oras:v1",
                                      outdir=str(tmp_path / "out2"))
    assert Path(files[0]).read_bytes() == data


def test_oras_token_flow(srv: AuthServer, oras_client, tmp_path: Path) -> None:
    """oras-py's token backend: a pull or a push follows the challenge to /token with
    Basic. oras-py keeps the first token it gets (for its blob existence check, whose
    challenge asks for pull) and does not ask for a wider one on ``insufficient_scope``,
    so a push works only because a token carries all the grants allow on its repository."""
    data = unique("oras-token") * 50
    Path("artifact.bin").write_bytes(data)
    pusher = oras_client("alice", backend="token")
    r = pusher.push(target=f"{srv.host}/team/oras/tok:v1", files=["artifact.bin"], quiet=True)
    assert r.status_code == 201, r.text
    assert srv.linked("team/oras/tok", sha256(data))

    puller = oras_client("carol", backend="token")  # carol may not read team/oras/
    with pytest.raises(ValueError, match="Forbidden"):  # oras-py's error for a 403
        puller.pull(target=f"{srv.host}/team/oras/tok:v1", outdir=str(tmp_path / "no"))
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())

    puller = oras_client("alice", backend="token")
    files = puller.pull(target=f"{srv.host}/team/oras/tok:v1", outdir=str(tmp_path / "out"))
    assert [Path(f).read_bytes() for f in files] == [data]
    assert puller.auth.token and token_claims(puller.auth.token)["acc"] == \
        {"team/oras/tok": "pull,push"}


def test_oras_refused(srv: AuthServer, oras_client) -> None:
    data = unique("oras-refused") * 10
    Path("refused.bin").write_bytes(data)
    for user, secret, repo in (("alice", "wrong", "team/oras/bad"),
                               ("mallory", "whatever", "team/oras/bad"),
                               ("carol", None, "team/ro/oras-bad"),
                               ("alice", None, "other/oras")):
        client = oras_client(user, secret)
        try:
            r = client.push(target=f"{srv.host}/{repo}:v1", files=["refused.bin"], quiet=True)
        except ValueError as exc:  # oras-py raises when the upload session is refused
            assert "UNAUTHORIZED" in str(exc) or "DENIED" in str(exc), exc
        else:
            assert r.status_code in (401, 403), (user, repo, r.status_code, r.text)
        assert not srv.exists(repo), (user, repo)
    assert not srv.stored(sha256(data))
