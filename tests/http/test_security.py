"""Security review (issue 11, item 5), over real HTTP against real servers on loopback.

Each of these must be impossible, and each test tries it:

- path traversal through names, digests, tags and upload ids, in every spelling a client
  can send (``..``, ``%2e%2e``, ``%2f``, backslashes, NUL, absolute paths): nothing
  outside the root is read (a sentinel file beside the root never shows in a response)
  or written (the tree beside the root is unchanged, byte for byte);
- a token for one repository used on another, on every route;
- a mount from a repository the caller cannot read, with ``from=`` or automatic: the
  answer is the same as for a blob that exists nowhere, so it leaks no existence;
- a secret or token compared with ``==`` (timing): checked by reading the code;
- an upload session continued by a guess: ids carry 128 bits from :mod:`secrets`;
- a deleted or quarantined blob served by GET, HEAD or a range GET, or mounted;
- a manifest whose stored bytes rotted answered with 200 by GET or HEAD.

Owner binding of upload sessions (another user holding the real id) is tested in
tests/test_auth_http.py; hostile input that once crashed a worker is at the end.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import casengine.credentials
import casengine.http.auth
import casengine.uploads
from tests.auth_helpers import AuthServer, Bearer, error_code, sha256
from tests.helpers import run_cli
from tests.http.conftest import (
    Server,
    assert_error,
    digest_of,
    push_blob,
    push_manifest,
    raw_request,
    start_server,
    start_upload,
)
from tests.registry_helpers import simple_image

SENTINEL = b"casengine-sentinel-" + os.urandom(8).hex().encode()


# -- path traversal ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A server whose root sits in a folder full of sentinel files at the places a
    traversal would reach: beside the root, and where blob, upload and repository keys
    would land one or two levels up."""
    base = tmp_path_factory.mktemp("jail")
    for rel in ("secret", "etc/passwd", "blobs/sha256/aa/" + "a" * 64 + ".raw",
                "repositories/escape/_repo", "uploads/" + "0" * 32, "escape/secret"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(SENTINEL)
    (base / "root-logs").mkdir()
    server = start_server(str(base / "root"), base / "root-logs")
    try:
        yield server, base
    finally:
        server.stop()


def _outside(base: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file beside the root (logs aside): size, mtime and content."""
    out = {}
    for p in base.rglob("*"):
        rel = p.relative_to(base).as_posix()
        if p.is_file() and not rel.startswith(("root/", "root-logs/")):
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


DIGEST = "sha256:" + "a" * 64
#: hostile path parts, raw as they go on the wire
HOSTILE = ["..", "%2e%2e", "%2E%2E", ".%2e", "..%2f..%2fsecret", "%2e%2e%2f%2e%2e%2fsecret",
           "..\\..\\secret", "%5c..%5c..%5csecret", "%00", "a%00b", "%2fetc%2fpasswd",
           "/etc/passwd", "//etc/passwd", "~root", "a/../../secret", "escape%2f..%2f..",
           "%252e%252e", "..;/secret", "..%c0%af", "%e2%80%a5", "%ef%bc%8e%ef%bc%8e"]
TEMPLATES = [
    ("GET", "/v2/{x}/tags/list"), ("POST", "/v2/{x}/blobs/uploads/"),
    ("GET", f"/v2/{{x}}/blobs/{DIGEST}"), ("PUT", "/v2/{x}/manifests/latest"),
    ("GET", "/v2/t/ok/blobs/{x}"), ("HEAD", "/v2/t/ok/blobs/sha256:{x}"),
    ("DELETE", "/v2/t/ok/blobs/{x}"), ("GET", "/v2/t/ok/manifests/{x}"),
    ("PUT", "/v2/t/ok/manifests/{x}"), ("DELETE", "/v2/t/ok/manifests/{x}"),
    ("GET", "/v2/t/ok/referrers/{x}"),
    ("GET", "/v2/t/ok/blobs/uploads/{x}"), ("PATCH", "/v2/t/ok/blobs/uploads/{x}"),
    ("PUT", f"/v2/t/ok/blobs/uploads/{{x}}?digest={DIGEST}"),
    ("DELETE", "/v2/t/ok/blobs/uploads/{x}"),
    ("POST", f"/v2/t/ok/blobs/uploads/?mount={DIGEST}&from={{x}}"),
    ("POST", "/v2/t/ok/blobs/uploads/?digest={x}"),
    ("POST", "/v2/t/ok/blobs/uploads/?mount={x}&from=escape"),
]


@pytest.mark.parametrize(("method", "template"), TEMPLATES, ids=[f"{m} {t}" for m, t in TEMPLATES])
def test_no_traversal_reads_or_writes_outside_the_root(
        jail: tuple[Server, Path], method: str, template: str) -> None:
    server, base = jail
    before = _outside(base)
    for part in HOSTILE:
        path = template.replace("{x}", part)
        r = raw_request(server, method, path, SENTINEL if method in ("PUT", "PATCH", "POST")
                        else b"", {"Content-Type": "application/octet-stream"})
        if "mount=" in template and r.status_code == 202:
            # a mount that cannot be is a plain upload (distribution spec): no name or digest
            # of it is used, and the session it started goes again
            assert r.headers["location"].startswith("/v2/t/ok/blobs/uploads/")
            assert raw_request(server, "DELETE", r.headers["location"]).status_code == 204
            continue
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.content[:300])
        assert SENTINEL not in r.content, (method, path)
        if method != "HEAD":
            assert r.headers["content-type"].startswith("application/json"), (method, path)
    assert _outside(base) == before
    # and nothing of the hostile bodies was stored inside the root either
    with server.registry() as reg:
        assert not reg.engine.exists(digest_of(SENTINEL))
        assert [s for s in reg.engine.uploads.list()] == []
        assert all(re.fullmatch(r"[a-z0-9]+([._/-]+[a-z0-9]+)*", r) for r in reg.repositories())


# -- auth: tokens, mounts ---------------------------------------------------------------------

USERS = {"alice": ["team/*:pull,push,delete"], "bob": ["other/*:pull,push,delete"]}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    base = tmp_path_factory.mktemp("security-auth")
    server = AuthServer(root=base / "root", auth_file=base / "credentials.json",
                        log=base / "serve.log")
    server.add_users(USERS, [])
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log_text(), server.log_text()[-4000:]


def _every_route(c: httpx.Client, repo: str, digest: str, location: str) -> list[httpx.Response]:
    """One request of each kind on ``repo``; ``location`` is an upload of that repository."""
    body = b"intruder"
    return [
        c.get(f"/v2/{repo}/tags/list"),
        c.get(f"/v2/{repo}/blobs/{digest}"),
        c.head(f"/v2/{repo}/blobs/{digest}"),
        c.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-3"}),
        c.get(f"/v2/{repo}/manifests/latest"),
        c.get(f"/v2/{repo}/referrers/{digest}"),
        c.post(f"/v2/{repo}/blobs/uploads/"),
        c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(body)}, content=body),
        c.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest}),
        c.get(location),
        c.patch(location, content=body),
        c.put(location, params={"digest": sha256(body)}, content=body),
        c.delete(location),
        c.put(f"/v2/{repo}/manifests/latest", content=b"{}",
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}),
        c.delete(f"/v2/{repo}/manifests/latest"),
        c.delete(f"/v2/{repo}/blobs/{digest}"),
    ]


@pytest.mark.parametrize("other", ["team/b", "team/a/b", "team/ab", "team/a.b", "other/a"])
def test_a_token_for_one_repository_opens_no_other(srv: AuthServer, other: str) -> None:
    """alice's grants cover team/*; a token she got for team/a carries team/a only."""
    data = os.urandom(32)
    with srv.client("alice") as alice:
        assert push_blob(alice, "team/a", data) == sha256(data)
        if other.startswith("team/"):
            push_blob(alice, other, data)
            location = start_upload(alice, other)
        else:
            location = f"/v2/{other}/blobs/uploads/{'0' * 32}"
    token = srv.token("alice", "repository:team/a:pull,push,delete")
    with httpx.Client(base_url=srv.url, auth=Bearer(token), timeout=30) as c:
        assert c.get(f"/v2/team/a/blobs/{sha256(data)}").content == data  # the token works
        for r in _every_route(c, other, sha256(data), location):
            assert r.status_code in (401, 403), (r.request.method, r.request.url, r.status_code)
            if r.request.method != "HEAD":
                assert error_code(r) in ("UNAUTHORIZED", "DENIED")
            assert data not in r.content
    assert not srv.stored(sha256(b"intruder"))
    with srv.registry() as reg:
        if reg.repository_exists(other):
            assert reg.is_linked(other, sha256(data)) == other.startswith("team/")
            assert reg.tags(other).items == []


def _shape(r: httpx.Response) -> tuple[int, tuple[str, ...], str]:
    """What a mount answer tells: its status, header names and where it sends the client."""
    names = tuple(sorted(k.lower() for k in r.headers if k.lower() != "date"))
    return r.status_code, names, r.headers.get("location", "").rsplit("/", 1)[0]


def test_a_mount_tells_nothing_of_unreadable_repositories(srv: AuthServer) -> None:
    """bob's blob, in a repository alice cannot read, is as absent to her as a digest that
    exists nowhere: with from=, without it, and with a from= that does not exist."""
    theirs = os.urandom(48)
    with srv.client("bob") as bob:
        assert push_blob(bob, "other/private", theirs) == sha256(theirs)
    nowhere = sha256(os.urandom(48))
    with srv.client("alice") as alice:
        answers = {
            "from, exists": alice.post("/v2/team/m/blobs/uploads/",
                                       params={"mount": sha256(theirs), "from": "other/private"}),
            "from, absent": alice.post("/v2/team/m/blobs/uploads/",
                                       params={"mount": nowhere, "from": "other/private"}),
            "from, no such repo": alice.post("/v2/team/m/blobs/uploads/",
                                             params={"mount": sha256(theirs), "from": "other/none"}),
            "automatic, exists": alice.post("/v2/team/m/blobs/uploads/",
                                            params={"mount": sha256(theirs)}),
            "automatic, absent": alice.post("/v2/team/m/blobs/uploads/", params={"mount": nowhere}),
        }
        shapes = {k: _shape(r) for k, r in answers.items()}
        assert len(set(shapes.values())) == 1, shapes
        assert next(iter(shapes.values()))[0] == 202
        for r in answers.values():
            assert alice.delete(r.headers["Location"]).status_code == 204
        assert alice.head(f"/v2/team/m/blobs/{sha256(theirs)}").status_code == 404
    assert not srv.linked("team/m", sha256(theirs))
    assert srv.linked("other/private", sha256(theirs))


# -- secrets are compared in constant time ----------------------------------------------------

#: names of values that hold secrets, signatures or hashes of them
_SECRETISH = re.compile(r"secret|signature|sig\b|want|got|expected|hash|token|key|password",
                        re.IGNORECASE)


def _equality_on_secrets(source: str) -> list[str]:
    """Every ``==`` or ``!=`` in ``source`` with an operand named like a secret."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq))
                                                 for op in node.ops):
            operands = [node.left, *node.comparators]
            if any(not isinstance(o, ast.Constant) and _SECRETISH.search(ast.unparse(o))
                   for o in operands):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _calls(function: object) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    return {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}


@pytest.mark.parametrize("module", [casengine.http.auth, casengine.credentials],
                         ids=lambda m: m.__name__)
def test_no_secret_is_compared_with_equality(module: object) -> None:
    assert _equality_on_secrets(inspect.getsource(module)) == []  # type: ignore[arg-type]


def test_the_secret_comparisons_are_constant_time() -> None:
    assert "hmac.compare_digest" in _calls(casengine.credentials.verify_secret)
    assert "hmac.compare_digest" in _calls(casengine.http.auth.TokenAuth._bearer)
    # the Basic cache is keyed by an HMAC of the credentials, never by the secret itself
    assert "hmac.new" in _calls(casengine.http.auth.TokenAuth._basic_user)


def test_the_inspection_would_see_an_equality() -> None:
    """The check above can fail: the comparisons it exists to catch are found."""
    assert _equality_on_secrets("ok = signature == want\n") == ["line 1: signature == want"]
    assert _equality_on_secrets("ok = user.secret_hash != stored\n")
    assert _equality_on_secrets("ok = n == 2 and user is None\n") == []


# -- upload ids are unguessable ---------------------------------------------------------------


def test_upload_ids_carry_128_bits_from_secrets() -> None:
    calls = _calls(casengine.uploads.Uploads.start)
    assert "secrets.token_hex" in calls, calls
    tree = ast.parse(textwrap.dedent(inspect.getsource(casengine.uploads.Uploads.start)))
    sizes = [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
             and ast.unparse(n.func) == "secrets.token_hex"]
    assert sizes and all(s >= 16 for s in sizes), sizes


def test_upload_ids_over_http_look_random(client: httpx.Client, repo: str) -> None:
    ids = []
    for _ in range(64):
        r = client.post(f"/v2/{repo}/blobs/uploads/")
        assert r.status_code == 202, r.text
        ids.append(r.headers["Docker-Upload-UUID"])
        assert r.headers["Location"].endswith(ids[-1])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    ones = sum(int(i, 16).bit_count() for i in ids)  # 8192 bits: about half are set
    assert 3700 < ones < 4500, ones
    for i in ids:
        assert client.delete(f"/v2/{repo}/blobs/uploads/{i}").status_code == 204
    # a guess next to a real id (one bit off) is no session
    guess = f"{int(ids[0], 16) ^ 1:032x}"
    assert_error(client.get(f"/v2/{repo}/blobs/uploads/{guess}"), 404, "BLOB_UPLOAD_UNKNOWN")


# -- deleted and quarantined blobs are never served --------------------------------------------


def _never_served(client: httpx.Client, repo: str, digest: str, source: str) -> None:
    for r in (client.get(f"/v2/{repo}/blobs/{digest}"),
              client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-3"}),
              client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-2"})):
        assert_error(r, 404, "BLOB_UNKNOWN")
    assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    for params in ({"mount": digest, "from": source}, {"mount": digest}):
        r = client.post(f"/v2/{repo}-copy/blobs/uploads/", params=params)
        assert r.status_code == 202, (params, r.status_code, r.text)  # an upload, no mount
        assert client.delete(r.headers["Location"]).status_code == 204
        assert client.head(f"/v2/{repo}-copy/blobs/{digest}").status_code == 404


def test_a_deleted_blob_is_never_served(client: httpx.Client, repo: str) -> None:
    data = os.urandom(64)
    digest = push_blob(client, repo, data)
    assert client.get(f"/v2/{repo}/blobs/{digest}").content == data
    assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    _never_served(client, repo, digest, repo)


def test_a_quarantined_blob_is_never_served(server: Server, client: httpx.Client,
                                            repo: str) -> None:
    data = os.urandom(4096)  # random: stored raw, so the file holds the bytes as they are
    digest = push_blob(client, repo, data)
    files = list(Path(server.root).glob(f"blobs/sha256/{digest[7:9]}/{digest[7:]}.*"))
    assert len(files) == 1, files
    files[0].write_bytes(b"rot" + data[3:])  # bit rot, same size
    result = run_cli(["check", "--full", "--repair", "--json"], cwd=Path(server.root).parent,
                     env={"CASENGINE_ROOT": server.root}, timeout=120)
    report = json.loads(result.stdout)
    quarantined = [f for f in report["findings"] if f["digest"] == digest]
    assert quarantined and quarantined[0]["kind"] == "corrupt", report
    assert not files[0].exists()
    _never_served(client, repo, digest, repo)


def test_a_damaged_manifest_is_never_served(tmp_path: Path, log_dir: Path) -> None:
    """A manifest's stored bytes rotted (same size): GET and HEAD answer a 5xx, never 200
    with bytes that do not hash to the digest the client asked for. Stored raw, so no
    zstd frame check stands in the way."""
    server = start_server(str(tmp_path / "root"), log_dir,
                          env={"CASENGINE_COMPRESSION": "never"})
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            m = simple_image("rot")
            push_manifest(client, "team/rot", m, "v1")
            stored = Path(server.root) / "blobs" / "sha256" / m.digest[7:9] / f"{m.digest[7:]}.raw"
            stored.write_bytes(m.content.replace(b"schemaVersion", b"schemaVersioN"))
            for reference in ("v1", m.digest):
                url = f"/v2/team/rot/manifests/{reference}"
                assert_error(client.get(url), 500, "UNKNOWN")
                assert client.head(url).status_code == 500
    finally:
        server.stop()


# -- hostile input that once made a 500 --------------------------------------------------------


def test_a_unicode_digit_page_size_is_a_400(client: httpx.Client, repo: str) -> None:
    """Regression: ``n=²`` passed str.isdigit() and then failed int(): a 500."""
    for path in ("/v2/_catalog", f"/v2/{repo}/tags/list"):
        r = client.get(path, params={"n": "\u00b2"})
        assert_error(r, 400, "UNSUPPORTED")


def test_a_range_of_thousands_of_digits_is_not_a_500(client: httpx.Client, repo: str) -> None:
    """Regression: int() refuses more than 4300 digits; the ValueError was a 500."""
    data = os.urandom(16)
    digest = push_blob(client, repo, data)
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-" + "9" * 5000})
    assert r.status_code == 206 and r.content == data
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert r.status_code == 416
    location = start_upload(client, repo)
    r = client.patch(location, content=b"x", headers={"Content-Range": "0-" + "9" * 5000})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    assert client.delete(location).status_code == 204


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"schemaVersion": ' + b"9" * 5000 + b"}"],
                         ids=["deep", "huge-int"])
def test_a_hostile_manifest_is_a_400(client: httpx.Client, repo: str, body: bytes) -> None:
    """Regression: RecursionError and the int parser's ValueError were 500s."""
    r = client.put(f"/v2/{repo}/manifests/latest", content=body,
                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert_error(r, 400, "MANIFEST_INVALID")
