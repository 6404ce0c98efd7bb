"""Invariant I5 over HTTP: bad input gets the spec's status and OCI error code, never a 500,
and leaves no partial state (no blob, no tag, no manifest, no upload session, no file
outside the root). Every server log is checked for tracebacks after each test (conftest).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from casengine.registry.manifests import DOCKER_LIST, OCI_INDEX, OCI_MANIFEST
from tests.http.conftest import (
    HOST,
    Server,
    assert_error,
    assert_repo_clean,
    blob_stored,
    digest_of,
    open_uploads,
    push_blob,
    push_manifest,
    raw_request,
    send_truncated,
    start_upload,
    tmp_files,
    wait_until,
)
from tests.registry_helpers import (
    SCHEMA1,
    SCHEMA1_SIGNED,
    config,
    data,
    encode,
    image_doc,
    index,
    layer,
    oci_manifest,
    schema1_manifest,
    simple_image,
)

#: Malformed or unsupported digests; all of them have a colon, so a manifest route takes
#: them as digests, not tags.
BAD_DIGESTS = [
    "sha256:abc",  # too short
    "sha256:" + "a" * 65,  # too long
    "sha256:" + "A" * 64,  # uppercase hex
    "sha256:" + "g" * 64,  # not hex
    "SHA256:" + "a" * 64,  # uppercase algorithm
    "sha999:" + "a" * 64,  # unknown algorithm
    "md5:" + "a" * 32,
    "sha256:",
    ":" + "a" * 64,
    "sha256::" + "a" * 64,
    "sha256:" + "a" * 63 + "%20",
]


def _upload_offset(server: Server, repo: str, location: str) -> int | None:
    """The offset of the session at ``location``, read from the index; None if it is gone."""
    upload_id = location.rsplit("/", 1)[1]
    with server.registry() as reg:
        for s in open_uploads(reg, repo):
            if s.id == upload_id:
                return s.offset
    return None


def _assert_no_blob(server: Server, repo: str, digest: str) -> None:
    """``digest`` is neither stored nor linked in ``repo``."""
    with server.registry() as reg:
        assert not blob_stored(reg, digest)
        assert not reg.is_linked(repo, digest)


# -- malformed digests in every position ---------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_malformed_digest_everywhere(client: httpx.Client, server: Server, repo: str,
                                     bad: str) -> None:
    existing = push_blob(client, repo, b"the repository exists")
    body = b"some bytes"
    assert_error(client.get(f"/v2/{repo}/blobs/{bad}"), 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/blobs/{bad}").status_code == 400
    assert_error(client.delete(f"/v2/{repo}/blobs/{bad}"), 400, "DIGEST_INVALID")
    assert_error(client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": bad}, content=body),
                 400, "DIGEST_INVALID")
    for params in ({"mount": bad, "from": repo}, {"mount": bad}):  # no mount: a plain upload
        r = client.post(f"/v2/{repo}/blobs/uploads/", params=params)
        assert r.status_code == 202 and "/blobs/uploads/" in r.headers["location"], r.content
        assert client.delete(r.headers["location"]).status_code == 204
    assert_error(client.get(f"/v2/{repo}/manifests/{bad}"), 400, "DIGEST_INVALID")
    assert client.head(f"/v2/{repo}/manifests/{bad}").status_code == 400
    assert_error(client.delete(f"/v2/{repo}/manifests/{bad}"), 400, "DIGEST_INVALID")
    m = oci_manifest(config("bad-digest"), [])
    push_blob(client, repo, m.blobs[0].content)
    assert_error(client.put(f"/v2/{repo}/manifests/{bad}", content=m.content,
                            headers={"Content-Type": OCI_MANIFEST}), 400, "DIGEST_INVALID")
    assert_error(client.get(f"/v2/{repo}/referrers/{bad}"), 400, "DIGEST_INVALID")

    location = start_upload(client, repo)
    client.patch(location, content=body, headers={"Content-Range": f"0-{len(body) - 1}"})
    assert_error(client.put(location, params={"digest": bad}), 400, "DIGEST_INVALID")
    assert_error(client.put(location, params={"digest": bad}, content=b"more"),
                 400, "DIGEST_INVALID")
    assert _upload_offset(server, repo, location) == len(body)  # the session is untouched
    assert client.delete(location).status_code == 204

    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(body))
        assert not blob_stored(reg, digest_of(body + b"more"))
        assert reg.manifests(repo) == [] and reg.tag_map(repo) == {}
        assert open_uploads(reg, repo) == []
        assert reg.is_linked(repo, existing)


# -- digests that do not match the body -----------------------------------------------------------


def test_monolithic_digest_mismatch(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("mismatch", 200_000)
    claimed = digest_of(f"something else than {repo}'s bytes".encode())  # no other test's
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=content)
    assert_error(r, 400, "DIGEST_INVALID")
    assert_repo_clean(server, repo, claimed, digest_of(content))
    assert wait_until(lambda: tmp_files(server) == [])
    with server.registry() as reg:
        assert not reg.repository_exists(repo)  # a refused first push creates nothing


def test_monolithic_size_mismatch_with_known_digest(client: httpx.Client, server: Server,
                                                    repo: str) -> None:
    """Dedupe still verifies: the right digest of a stored blob with other bytes is refused."""
    content = data("dedupe", 5000)
    digest = push_blob(client, f"{repo}/other", content)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                    content=content[:-1] + b"!")
    assert_error(r, 400, "DIGEST_INVALID")
    with server.registry() as reg:
        assert not reg.is_linked(repo, digest)


def test_commit_digest_mismatch(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("commit-mismatch", 30_000)
    claimed = digest_of(b"not it")
    location = start_upload(client, repo)
    client.patch(location, content=content, headers={"Content-Range": f"0-{len(content) - 1}"})
    r = client.put(location, params={"digest": claimed})
    assert_error(r, 400, "DIGEST_INVALID")
    with server.registry() as reg:
        assert not blob_stored(reg, claimed) and not blob_stored(reg, digest_of(content))
        assert not reg.is_linked(repo, digest_of(content))
    # the session is as it was: the right digest still commits it
    assert _upload_offset(server, repo, location) == len(content)
    r = client.put(location, params={"digest": digest_of(content)})
    assert r.status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(content)}").content == content


def test_commit_digest_mismatch_with_final_chunk(client: httpx.Client, server: Server,
                                                 repo: str) -> None:
    location = start_upload(client, repo)
    client.patch(location, content=b"0123456789", headers={"Content-Range": "0-9"})
    r = client.put(location, params={"digest": digest_of(b"wrong")}, content=b"abcde")
    assert_error(r, 400, "DIGEST_INVALID")
    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(b"0123456789abcde"))
    offset = _upload_offset(server, repo, location)
    assert offset in (None, 10), f"the refused PUT left its chunk behind: offset {offset}"


def test_put_without_digest(client: httpx.Client, server: Server, repo: str) -> None:
    location = start_upload(client, repo)
    client.patch(location, content=b"abc", headers={"Content-Range": "0-2"})
    assert_error(client.put(location), 400, "DIGEST_INVALID")
    assert_error(client.put(location, content=b"def"), 400, "DIGEST_INVALID")
    assert _upload_offset(server, repo, location) == 3
    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(b"abc")) and not blob_stored(reg, digest_of(b"abcdef"))
    assert client.delete(location).status_code == 204


# -- Content-Range and sizes ----------------------------------------------------------------------


def test_wrong_content_range_start(client: httpx.Client, server: Server, repo: str) -> None:
    location = start_upload(client, repo)
    assert client.patch(location, content=b"a" * 10,
                        headers={"Content-Range": "0-9"}).status_code == 202
    for start in (0, 5, 11, 100):
        r = client.patch(location, content=b"b" * 10,
                         headers={"Content-Range": f"{start}-{start + 9}"})
        assert_error(r, 416, "BLOB_UPLOAD_INVALID")
        assert r.headers["range"] == "0-9"
        assert r.headers["location"] == location
    assert _upload_offset(server, repo, location) == 10
    r = client.patch(location, content=b"c" * 10, headers={"Content-Range": "10-19"})
    assert r.status_code == 202 and r.headers["range"] == "0-19"
    content = b"a" * 10 + b"c" * 10
    assert client.put(location, params={"digest": digest_of(content)}).status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(content)}").content == content


def test_wrong_content_range_with_a_big_body(client: httpx.Client, server: Server,
                                            repo: str) -> None:
    """Refused early: the server answers without reading 8 MiB, and keeps serving."""
    location = start_upload(client, repo)
    big = b"b" * (8 << 20)
    r = client.patch(location, content=big, headers={"Content-Range": f"7-{7 + len(big) - 1}"})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    r = client.patch(location, content=iter([big]), headers={"Content-Range": "7-9"})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    assert client.get("/v2/").status_code == 200
    assert _upload_offset(server, repo, location) == 0
    assert client.delete(location).status_code == 204


def test_concurrent_chunks_at_one_offset(server: Server, repo: str, client: httpx.Client) -> None:
    """Three PATCHes race for offset 0: exactly one is appended, the others are refused
    (409 while it runs, 416 after), and the blob is that one's bytes, never a mix."""
    location = start_upload(client, repo)
    size = 2 << 20
    results: dict[bytes, httpx.Response] = {}

    def patch(fill: bytes) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            results[fill] = c.patch(location, content=fill * size,
                                    headers={"Content-Range": f"0-{size - 1}"})

    threads = [threading.Thread(target=patch, args=(fill,)) for fill in (b"a", b"b", b"c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    [winner] = [fill for fill, r in results.items() if r.status_code == 202]
    for fill, r in results.items():
        if fill != winner:
            assert_error(r, (409, 416), "BLOB_UPLOAD_INVALID")
    assert _upload_offset(server, repo, location) == size
    r = client.put(location, params={"digest": digest_of(winner * size)})
    assert r.status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(winner * size)}").content == winner * size


def test_wrong_content_range_start_on_put(client: httpx.Client, server: Server,
                                          repo: str) -> None:
    location = start_upload(client, repo)
    client.patch(location, content=b"a" * 10, headers={"Content-Range": "0-9"})
    r = client.put(location, params={"digest": digest_of(b"a" * 20)}, content=b"a" * 10,
                   headers={"Content-Range": "20-29"})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    assert r.headers["range"] == "0-9"
    assert _upload_offset(server, repo, location) == 10
    _assert_no_blob(server, repo, digest_of(b"a" * 20))
    assert client.delete(location).status_code == 204


def test_out_of_order_chunks(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("ooo", 3000)
    location = start_upload(client, repo)
    r = client.patch(location, content=content[1000:2000], headers={"Content-Range": "1000-1999"})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    assert r.headers["range"] == "0-0"
    assert _upload_offset(server, repo, location) == 0
    assert client.patch(location, content=content[:1000],
                        headers={"Content-Range": "0-999"}).status_code == 202
    r = client.patch(location, content=content[2000:], headers={"Content-Range": "2000-2999"})
    assert_error(r, 416, "BLOB_UPLOAD_INVALID")
    assert r.headers["range"] == "0-999"
    for start, end in ((1000, 2000), (2000, 3000)):
        r = client.patch(location, content=content[start:end],
                         headers={"Content-Range": f"{start}-{end - 1}"})
        assert r.status_code == 202
    assert client.put(location, params={"digest": digest_of(content)}).status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(content)}").content == content


def test_content_range_disagrees_with_content_length(client: httpx.Client, server: Server,
                                                     repo: str) -> None:
    location = start_upload(client, repo)
    r = client.patch(location, content=b"x" * 5, headers={"Content-Range": "0-9"})
    assert_error(r, 400, "SIZE_INVALID")
    r = client.patch(location, content=b"x" * 20, headers={"Content-Range": "0-9"})
    assert_error(r, 400, "SIZE_INVALID")
    assert _upload_offset(server, repo, location) == 0
    # streamed (no Content-Length): the body itself disagrees with the range
    for size in (5, 20):
        r = client.patch(location, content=iter([b"y" * size]), headers={"Content-Range": "0-9"})
        assert_error(r, 400, "SIZE_INVALID")
        assert _upload_offset(server, repo, location) == 0
    r = client.patch(location, content=b"z" * 10, headers={"Content-Range": "0-9"})
    assert r.status_code == 202
    assert client.put(location, params={"digest": digest_of(b"z" * 10)}).status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(b'z' * 10)}").content == b"z" * 10


def test_content_range_disagrees_with_body_on_put(client: httpx.Client, server: Server,
                                                  repo: str) -> None:
    location = start_upload(client, repo)
    client.patch(location, content=b"0123456789", headers={"Content-Range": "0-9"})
    content = b"0123456789abcde"
    r = client.put(location, params={"digest": digest_of(content)}, content=b"abcde",
                   headers={"Content-Range": "10-19"})
    assert_error(r, 400, "SIZE_INVALID")
    _assert_no_blob(server, repo, digest_of(content))


@pytest.mark.parametrize("header", ["bytes=abc", "10", "5-2", "-5", "a-b"])
def test_malformed_content_range(client: httpx.Client, server: Server, repo: str,
                                 header: str) -> None:
    location = start_upload(client, repo)
    r = client.patch(location, content=b"x" * 4, headers={"Content-Range": header})
    assert_error(r, (400, 416), ("BLOB_UPLOAD_INVALID", "SIZE_INVALID"))
    assert _upload_offset(server, repo, location) == 0
    assert client.delete(location).status_code == 204


# -- manifests ------------------------------------------------------------------------------------


def _put(client: httpx.Client, repo: str, reference: str, content: bytes,
         media_type: str | None = OCI_MANIFEST) -> httpx.Response:
    headers = {"Content-Type": media_type} if media_type else {}
    return client.put(f"/v2/{repo}/manifests/{reference}", content=content, headers=headers)


def _assert_no_manifest(server: Server, repo: str, *digests: str) -> None:
    with server.registry() as reg:
        for d in digests:
            assert not blob_stored(reg, d), f"manifest bytes {d} were stored"
        if reg.repository_exists(repo):
            assert reg.manifests(repo) == []
            assert reg.tag_map(repo) == {}


def test_oversize_manifest(client: httpx.Client, server: Server, repo: str) -> None:
    cfg = config("big")
    push_blob(client, repo, cfg.content)
    doc = image_doc(cfg, [], annotations={"pad": "x" * (4 << 20)})
    content = encode(doc)
    assert len(content) > 4 << 20
    r = _put(client, repo, "big", content)
    assert_error(r, 413, "MANIFEST_INVALID")
    # streamed, so the size is not known up front
    r = client.put(f"/v2/{repo}/manifests/big",
                   content=(content[i:i + 256 << 10] for i in range(0, len(content), 256 << 10)),
                   headers={"Content-Type": OCI_MANIFEST})
    assert_error(r, 413, "MANIFEST_INVALID")
    _assert_no_manifest(server, repo, digest_of(content))
    assert client.get("/v2/").status_code == 200


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b"\xff\xfe\x00",
    b"[]",
    b'"a string"',
    b'{"schemaVersion": "2", "layers": []}',
    b'{"schemaVersion": true}',
    b'{"schemaVersion": 3}',
    b'{"schemaVersion": 2}',
    b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}',
    b'{"schemaVersion": 2, "config": {"mediaType": "x"}, "layers": []}',
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "size": 1, "digest": "sha256:abc"},'
     b' "layers": []}'),
    (b'{"schemaVersion": 2, "config": {"mediaType": "x", "size": -1, "digest": "sha256:'
     + b"a" * 64 + b'"}, "layers": []}'),
    b'{"schemaVersion": 2, "layers": {}}',
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",'
     b' "manifests": {}}'),
    b'{"schemaVersion": 2, "manifests": [{"mediaType": "x"}]}',
], ids=lambda c: c[:40].decode("latin-1"))
def test_malformed_manifest(client: httpx.Client, server: Server, repo: str,
                            content: bytes) -> None:
    digest = digest_of(content)
    with server.registry() as reg:  # the server is shared: another test may store b""
        stored_before = blob_stored(reg, digest)
    r = _put(client, repo, "bad", content, media_type=None)
    assert_error(r, 400, "MANIFEST_INVALID")
    _assert_no_manifest(server, repo, *([] if stored_before else [digest]))


def test_manifest_with_unknown_blob(client: httpx.Client, server: Server, repo: str) -> None:
    cfg, lay = config("unknown"), layer("unknown-layer", 500)
    m = oci_manifest(cfg, [lay])
    push_blob(client, repo, cfg.content)
    r = _put(client, repo, "v1", m.content)
    assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    # in another repository is not in this one
    push_blob(client, f"{repo}/other", lay.content)
    assert_error(_put(client, repo, "v1", m.content), 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(_put(client, repo, m.digest, m.content), 400, "MANIFEST_BLOB_UNKNOWN")
    _assert_no_manifest(server, repo, m.digest)


def test_index_with_unknown_child(client: httpx.Client, server: Server, repo: str) -> None:
    known, missing = simple_image("known-child"), simple_image("missing-child")
    push_manifest(client, repo, known)
    idx = index([known, missing])
    assert_error(_put(client, repo, "multi", idx.content, OCI_INDEX), 400,
                 "MANIFEST_BLOB_UNKNOWN")
    with server.registry() as reg:
        assert not blob_stored(reg, idx.digest)
        assert reg.tag_map(repo) == {}
        assert [r.digest for r in reg.manifests(repo)] == [known.digest]


def test_manifest_descriptor_size_mismatch(client: httpx.Client, server: Server,
                                           repo: str) -> None:
    cfg = config("size")
    push_blob(client, repo, cfg.content)
    doc = image_doc(cfg, [])
    doc["config"]["size"] += 1
    content = encode(doc)
    assert_error(_put(client, repo, "v1", content), 400, "MANIFEST_INVALID")
    _assert_no_manifest(server, repo, digest_of(content))


@pytest.mark.parametrize(("signed", "media_type"), [
    (True, SCHEMA1_SIGNED), (False, SCHEMA1), (True, None), (False, OCI_MANIFEST)])
def test_docker_schema1_refused(client: httpx.Client, server: Server, repo: str, signed: bool,
                                media_type: str | None) -> None:
    content = schema1_manifest(signed=signed)
    r = _put(client, repo, "v1", content, media_type)
    assert_error(r, (400, 415), ("UNSUPPORTED", "MANIFEST_INVALID"))
    _assert_no_manifest(server, repo, digest_of(content))


@pytest.mark.parametrize("media_type", [
    OCI_INDEX,  # disagrees with the mediaType field
    DOCKER_LIST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
])
def test_content_type_disagrees_with_media_type(client: httpx.Client, server: Server,
                                                repo: str, media_type: str) -> None:
    m = simple_image("content-type")
    for b in m.blobs:
        push_blob(client, repo, b.content)
    r = _put(client, repo, "v1", m.content, media_type)
    assert_error(r, (400, 415), ("MANIFEST_INVALID", "UNSUPPORTED"))
    _assert_no_manifest(server, repo, m.digest)


@pytest.mark.parametrize("media_type", ["text/plain", "application/vnd.example.unknown+json"])
def test_unknown_media_type(client: httpx.Client, server: Server, repo: str,
                            media_type: str) -> None:
    cfg = config("unknown-type")
    push_blob(client, repo, cfg.content)
    content = encode(image_doc(cfg, [], media_type=None))
    assert_error(_put(client, repo, "v1", content, media_type), 400, "MANIFEST_INVALID")
    content = encode(image_doc(cfg, [], media_type=media_type))
    assert_error(_put(client, repo, "v1", content, media_type), 400, "MANIFEST_INVALID")
    _assert_no_manifest(server, repo, digest_of(content))


def test_manifest_put_by_wrong_digest(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("wrong-digest")
    for b in m.blobs:
        push_blob(client, repo, b.content)
    other = digest_of(b"other")
    assert_error(_put(client, repo, other, m.content), 400, "DIGEST_INVALID")
    _assert_no_manifest(server, repo, m.digest)


@pytest.mark.parametrize("tag", ["-dash", ".dot", "a" * 129, "tag%20space", "t%C3%A4g"])
def test_invalid_tag(client: httpx.Client, server: Server, repo: str, tag: str) -> None:
    m = simple_image("bad-tag")
    for b in m.blobs:
        push_blob(client, repo, b.content)
    r = raw_request(server, "PUT", f"/v2/{repo}/manifests/{tag}", m.content,
                    {"Content-Type": OCI_MANIFEST})
    assert_error(r, 400, ("NAME_INVALID", "TAG_INVALID", "MANIFEST_INVALID"))
    _assert_no_manifest(server, repo, m.digest)


# -- unknown things -------------------------------------------------------------------------------


def test_unknown_blob_manifest_upload(client: httpx.Client, repo: str) -> None:
    push_blob(client, repo, b"exists")
    unknown = digest_of(b"unknown " + repo.encode())
    assert_error(client.get(f"/v2/{repo}/blobs/{unknown}"), 404, "BLOB_UNKNOWN")
    r = client.head(f"/v2/{repo}/blobs/{unknown}")
    assert r.status_code == 404 and r.content == b""
    assert_error(client.delete(f"/v2/{repo}/blobs/{unknown}"), 404, "BLOB_UNKNOWN")
    for reference in ("nosuchtag", unknown):
        assert_error(client.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
        assert client.head(f"/v2/{repo}/manifests/{reference}").status_code == 404
        assert_error(client.delete(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    upload = f"/v2/{repo}/blobs/uploads/{secrets.token_hex(16)}"
    assert_error(client.get(upload), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(upload, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.put(upload, params={"digest": digest_of(b"x")}, content=b"x"),
                 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.delete(upload), 404, "BLOB_UPLOAD_UNKNOWN")


def test_unknown_repository(client: httpx.Client, server: Server, repo: str) -> None:
    d = digest_of(b"x")
    assert_error(client.get(f"/v2/{repo}/blobs/{d}"), 404, ("NAME_UNKNOWN", "BLOB_UNKNOWN"))
    assert_error(client.get(f"/v2/{repo}/manifests/latest"), 404,
                 ("NAME_UNKNOWN", "MANIFEST_UNKNOWN"))
    assert_error(client.get(f"/v2/{repo}/tags/list"), 404, "NAME_UNKNOWN")
    assert_error(client.delete(f"/v2/{repo}/manifests/latest"), 404,
                 ("NAME_UNKNOWN", "MANIFEST_UNKNOWN"))
    with server.registry() as reg:
        assert not reg.repository_exists(repo)


# -- names ----------------------------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64
BAD_PATHS = [
    ("GET", f"/v2/../../etc/blobs/{DIGEST}"),
    ("POST", "/v2/../../etc/blobs/uploads/"),
    ("POST", f"/v2/../../etc/blobs/uploads/?digest={DIGEST}"),
    ("PUT", "/v2/../../etc/manifests/latest"),
    ("GET", "/v2/../../../../etc/tags/list"),
    ("GET", "/v2/A/tags/list"),
    ("POST", "/v2/Upper/blobs/uploads/"),
    ("GET", "/v2/a//b/tags/list"),
    ("POST", "/v2/a//b/blobs/uploads/"),
    ("POST", "/v2//abs/blobs/uploads/"),
    ("POST", "/v2/%2e%2e/%2e%2e/escape/blobs/uploads/"),
    ("PUT", "/v2/%2e%2e/%2e%2e/escape/manifests/latest"),
    ("POST", "/v2/ok%2F..%2F..%2F..%2Fescape/blobs/uploads/"),
    ("POST", "/v2/ok/../../escape/blobs/uploads/"),
    ("POST", "/v2/./escape/blobs/uploads/"),
    ("POST", "/v2/escape/./x/blobs/uploads/"),
    ("POST", "/v2/a%00b/blobs/uploads/"),
    ("POST", "/v2/-a/blobs/uploads/"),
    ("POST", "/v2/a_/blobs/uploads/"),
    ("POST", "/v2/a/_repo/blobs/uploads/"),
    ("POST", "/v2/_catalog/blobs/uploads/"),
    ("GET", "/v2/" + "a" * 256 + "/tags/list"),
    ("POST", "/v2/" + "a" * 256 + "/blobs/uploads/"),
    ("POST", "/v2/" + "/".join(["ab"] * 86) + "/blobs/uploads/"),  # 257 characters
]


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize(("method", "path"), BAD_PATHS,
                         ids=[f"{m}-{p[:60]}" for m, p in BAD_PATHS])
def test_bad_names(server: Server, http_tmp: Path, method: str, path: str) -> None:
    before = sorted(os.listdir(http_tmp))
    m = simple_image("escape")
    body = m.content if method == "PUT" else b"payload"
    headers = {"Content-Type": OCI_MANIFEST} if method == "PUT" else {}
    r = raw_request(server, method, path, body, headers)
    assert r.status_code in (400, 404), (r.status_code, r.content)
    if r.status_code == 400:
        assert_error(r, 400, "NAME_INVALID")
    else:
        assert_error(r, 404, ("NAME_UNKNOWN", "NAME_INVALID"))
    assert sorted(os.listdir(http_tmp)) == before == ["root"]
    root = http_tmp / "root"
    names = {p.relative_to(root / "repositories").as_posix()
             for p in (root / "repositories").rglob("_repo")}
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._/-]*", name), name
        assert "escape" not in name and ".." not in name
    assert not any("escape" in p or "etc" in p.split("/") for p in _listing(root))


@pytest.mark.parametrize("source", ["../../etc", "Upper", "a//b", "x" * 256, ""])
def test_mount_from_a_bad_name(client: httpx.Client, server: Server, repo: str,
                               source: str) -> None:
    """'If a mount fails due to invalid repository or digest arguments, the registry will
    fall back to the standard upload behavior' (distribution spec): a client that always
    sends ``from`` must not see its push fail. An empty ``from`` is no ``from``."""
    digest = push_blob(client, f"{repo}/src", b"mount me")
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": source})
    with server.registry() as reg:
        if source == "":  # no source named: any repository the caller may read will do
            assert r.status_code == 201 and reg.is_linked(repo, digest)
            return
        assert r.status_code == 202 and "/blobs/uploads/" in r.headers["location"]
        assert not reg.is_linked(repo, digest)
        assert [s.id for s in open_uploads(reg, repo)] == [r.headers["docker-upload-uuid"]]


# -- upload ids that are not ours -----------------------------------------------------------------


@pytest.mark.parametrize("upload_id", [
    secrets.token_hex(16), "x", "..", "%2e%2e", "A" * 32, "a" * 31, "a" * 33, "0" * 32 + "%00",
    "%20" + "0" * 32])
def test_foreign_upload_ids(server: Server, repo: str, client: httpx.Client,
                            upload_id: str) -> None:
    mine = start_upload(client, repo)
    client.patch(mine, content=b"mine", headers={"Content-Range": "0-3"})
    path = f"/v2/{repo}/blobs/uploads/{upload_id}"
    for method, body, query in (("GET", b"", ""), ("PATCH", b"evil", ""),
                                ("PUT", b"evil", f"?digest={digest_of(b'evil')}"),
                                ("DELETE", b"", "")):
        r = raw_request(server, method, path + query, body)
        assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    assert _upload_offset(server, repo, mine) == 4
    assert not any(Path(server.root).parent.glob("**/evil*"))
    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(b"evil"))
    assert client.delete(mine).status_code == 204


@pytest.mark.parametrize("upload_id", ["../x", "..%2Fx", "%2e%2e%2f%2e%2e%2fetc", "a/b"])
def test_upload_id_with_a_slash(client: httpx.Client, server: Server, repo: str,
                                upload_id: str) -> None:
    """No route has such a path: a 404, whichever code it carries."""
    push_blob(client, repo, b"exists")
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        r = raw_request(server, method, f"/v2/{repo}/blobs/uploads/{upload_id}", b"evil")
        assert_error(r, 404, ("BLOB_UPLOAD_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"))
    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(b"evil"))
        assert open_uploads(reg, repo) == []


def test_upload_of_another_repository(client: httpx.Client, server: Server, repo: str) -> None:
    theirs = start_upload(client, f"{repo}/theirs")
    client.patch(theirs, content=b"theirs", headers={"Content-Range": "0-5"})
    upload_id = theirs.rsplit("/", 1)[1]
    push_blob(client, repo, b"mine exists")
    mine = f"/v2/{repo}/blobs/uploads/{upload_id}"
    assert_error(client.get(mine), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(mine, content=b"evil", headers={"Content-Range": "6-9"}),
                 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.put(mine, params={"digest": digest_of(b"theirs")}), 404,
                 "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.delete(mine), 404, "BLOB_UPLOAD_UNKNOWN")
    assert _upload_offset(server, f"{repo}/theirs", theirs) == 6
    with server.registry() as reg:
        assert not reg.is_linked(repo, digest_of(b"theirs"))
    assert client.delete(theirs).status_code == 204


# -- truncated bodies -----------------------------------------------------------------------------


def _server_still_serves(client: httpx.Client) -> None:
    assert client.get("/v2/").status_code == 200


def test_truncated_monolithic_upload(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("truncated", 3 << 20)
    digest = digest_of(content)
    sent = content[:1 << 20]
    got = send_truncated(server, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest}",
                         len(content), sent)
    assert not got.startswith(b"HTTP/1.1 2"), got[:200]
    _server_still_serves(client)
    assert wait_until(lambda: tmp_files(server) == []), tmp_files(server)
    assert_repo_clean(server, repo, digest, digest_of(sent))
    # the same push, complete, works
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=content)
    assert r.status_code == 201


def _patch_until_free(client: httpx.Client, location: str, content: bytes,
                      content_range: str) -> httpx.Response:
    """PATCH, retrying while the truncated request's lease is still being released."""
    deadline = time.monotonic() + 10
    while True:
        r = client.patch(location, content=content, headers={"Content-Range": content_range})
        if r.status_code != 409 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


@pytest.mark.parametrize("with_range", [True, False])
def test_truncated_patch(client: httpx.Client, server: Server, repo: str,
                         with_range: bool) -> None:
    first, rest = data("first", 1000), data("rest", 2 << 20)
    location = start_upload(client, repo)
    client.patch(location, content=first, headers={"Content-Range": "0-999"})
    headers = {"Content-Range": f"1000-{1000 + len(rest) - 1}"} if with_range else {}
    got = send_truncated(server, "PATCH", location, len(rest), rest[:600_000], headers)
    assert not got.startswith(b"HTTP/1.1 2"), got[:200]
    _server_still_serves(client)
    r = client.get(location)
    assert r.status_code == 204 and r.headers["range"] == "0-999"
    # the session continues where it was acknowledged; nothing of the lost chunk remains
    r = _patch_until_free(client, location, rest, f"1000-{1000 + len(rest) - 1}")
    assert r.status_code == 202, r.text
    content = first + rest
    assert client.put(location, params={"digest": digest_of(content)}).status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(content)}").content == content


def test_truncated_put_with_final_chunk(client: httpx.Client, server: Server, repo: str) -> None:
    first, last = b"f" * 100, data("last", 1 << 20)
    content = first + last
    location = start_upload(client, repo)
    client.patch(location, content=first, headers={"Content-Range": "0-99"})
    got = send_truncated(server, "PUT", f"{location}?digest={digest_of(content)}", len(last),
                         last[:300_000])
    assert not got.startswith(b"HTTP/1.1 2"), got[:200]
    _server_still_serves(client)
    with server.registry() as reg:
        assert not blob_stored(reg, digest_of(content))
    assert client.get(location).headers["range"] == "0-99"
    r = _patch_until_free(client, location, last, f"100-{len(content) - 1}")
    assert r.status_code == 202
    assert client.put(location, params={"digest": digest_of(content)}).status_code == 201


def test_truncated_manifest(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("truncated-manifest")
    for b in m.blobs:
        push_blob(client, repo, b.content)
    got = send_truncated(server, "PUT", f"/v2/{repo}/manifests/v1", m.size,
                         m.content[:m.size // 2], {"Content-Type": OCI_MANIFEST})
    assert not got.startswith(b"HTTP/1.1 2"), got[:200]
    _server_still_serves(client)
    _assert_no_manifest(server, repo, m.digest)


# -- methods and query parameters -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/v2/"),
    ("DELETE", "/v2/"),
    ("POST", "/v2/_catalog"),
    ("DELETE", "/v2/{repo}/tags/list"),
    ("POST", "/v2/{repo}/tags/list"),
    ("PATCH", "/v2/{repo}/blobs/" + DIGEST),
    ("PUT", "/v2/{repo}/blobs/" + DIGEST),
    ("POST", "/v2/{repo}/blobs/" + DIGEST),
    ("POST", "/v2/{repo}/manifests/latest"),
    ("PATCH", "/v2/{repo}/manifests/latest"),
    ("DELETE", "/v2/{repo}/referrers/" + DIGEST),
    ("POST", "/v2/{repo}/blobs/uploads/" + "a" * 32),
])
def test_unsupported_method(client: httpx.Client, repo: str, method: str, path: str) -> None:
    r = client.request(method, path.format(repo=repo))
    assert_error(r, 405, "UNSUPPORTED")


@pytest.mark.parametrize("n", ["abc", "-1", "1.5", "99999999999999999999", "0x10"])
def test_bad_page_size(client: httpx.Client, repo: str, n: str) -> None:
    m = simple_image("pages")
    push_manifest(client, repo, m, "v1")
    for path in (f"/v2/{repo}/tags/list", "/v2/_catalog"):
        r = client.get(path, params={"n": n})
        assert_error(r, 400, ("UNSUPPORTED", "PAGINATION_NUMBER_INVALID"))


def test_no_json_error_body_on_head(client: httpx.Client, repo: str) -> None:
    r = client.head(f"/v2/{repo}/blobs/sha256:abc")
    assert r.status_code == 400 and r.content == b""
    assert json.loads(client.get(f"/v2/{repo}/blobs/sha256:abc").content)["errors"]


def _expecting(server: Server, method: str, path: str, length: int,
               headers: dict[str, str] | None = None) -> tuple[socket.socket, bytes]:
    """Send a request's head with ``Expect: 100-continue`` and no body; the socket and the
    server's first answer."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{server.port}",
             f"Content-Length: {length}", "Expect: 100-continue"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s = socket.create_connection((HOST, server.port), timeout=10)
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s, s.recv(65536)


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("PUT", "/v2/{repo}/manifests/huge", 413, "MANIFEST_INVALID"),
    ("POST", "/v2/{repo}/blobs/uploads/?digest=sha256:zz", 400, "DIGEST_INVALID"),
])
def test_a_refusal_comes_before_any_100_continue(server: Server, repo: str, method: str,
                                                 path: str, status: int, code: str) -> None:
    """A client that waits for 100 Continue must not be told to send a body that will be
    refused: it gets the refusal instead, and sends nothing."""
    s, answer = _expecting(server, method, path.format(repo=repo), 8 << 20,
                           {"Content-Type": OCI_MANIFEST})
    with s:
        while chunk := s.recv(65536):  # to the close the refusal asks for
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert b"connection: close" in head.lower()
        assert code.encode() in body


def test_an_accepted_request_still_gets_its_100_continue(server: Server, repo: str) -> None:
    content = data("continue", 1000)
    s, answer = _expecting(server, "POST", f"/v2/{repo}/blobs/uploads/?digest={digest_of(content)}",
                           len(content))
    with s:
        assert answer.startswith(b"HTTP/1.1 100 "), answer
        s.sendall(content)
        assert s.recv(65536).startswith(b"HTTP/1.1 201 ")


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "br, chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused(server: Server, repo: str,
                                                        coding: str) -> None:
    """Stored as sent, a gzip-coded body would be a different blob from the one the client
    meant; the server says it does not understand the coding (RFC 9112 6.1) and stores
    nothing."""
    content = data("coded", 5000)
    sent = gzip.compress(content)
    path = f"/v2/{repo}/blobs/uploads/?digest={digest_of(content)}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{server.port}",
             f"Transfer-Encoding: {coding}", "Connection: close"]
    with socket.create_connection((HOST, server.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode()
                  + f"{len(sent):x}\r\n".encode() + sent + b"\r\n0\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 "), head
    assert b"UNSUPPORTED" in body
    _assert_no_blob(server, repo, digest_of(content))
    _assert_no_blob(server, repo, digest_of(sent))
    with server.registry() as reg:
        assert open_uploads(reg, repo) == []


def test_plain_chunked_transfer_coding_is_accepted(server: Server, repo: str) -> None:
    content = data("chunked", 5000)
    path = f"/v2/{repo}/blobs/uploads/?digest={digest_of(content)}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{server.port}",
             "Transfer-Encoding: chunked", "Connection: close"]
    with socket.create_connection((HOST, server.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode()
                  + f"{len(content):x}\r\n".encode() + content + b"\r\n0\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 201 ")
    with server.registry() as reg:
        assert blob_stored(reg, digest_of(content))
