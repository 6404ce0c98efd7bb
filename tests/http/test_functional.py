"""The OCI Distribution endpoints doing their job, against a real server on a local root.

Each test checks the status, the headers the spec asks for, the bytes, and then the store
itself through a fresh engine on the same root.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from casengine.gc import Collector
from casengine.registry.manifests import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.http.conftest import (
    Server,
    assert_error,
    blob_stored,
    digest_of,
    open_uploads,
    push_blob,
    push_manifest,
    raw_request,
    start_upload,
)
from tests.registry_helpers import config, data, index, layer, oci_manifest, simple_image

# -- base, health, metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
def test_base(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    assert r.json() == {}


def test_healthz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.text.strip() == "ok"


def _metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(m[1]) if m else None


def test_metrics(client: httpx.Client, repo: str) -> None:
    client.get("/v2/")
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    text = before.text
    assert "# TYPE casengine_http_requests_total counter" in text
    base = _metric(text, "casengine_http_requests_total",
                   '{route="base",method="GET",status="200"}')
    assert base is not None and base >= 1
    assert _metric(text, "casengine_http_bytes_in_total", '{route="base"}') is not None
    open_before = _metric(text, "casengine_upload_sessions_open")
    assert open_before is not None

    location = start_upload(client, repo)
    client.get("/v2/")
    after = client.get("/metrics").text
    assert _metric(after, "casengine_upload_sessions_open") == open_before + 1
    assert _metric(after, "casengine_http_requests_total",
                   '{route="base",method="GET",status="200"}') == base + 1
    assert (_metric(after, "casengine_http_requests_total",
                    '{route="uploads",method="POST",status="202"}') or 0) >= 1

    assert client.delete(location).status_code == 204
    assert _metric(client.get("/metrics").text, "casengine_upload_sessions_open") == open_before


# -- uploads -------------------------------------------------------------------------------------


def _assert_created(r: httpx.Response, repo: str, digest: str) -> None:
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v2/{repo}/blobs/{digest}"
    assert r.headers["docker-content-digest"] == digest


def _assert_stored(server: Server, repo: str, digest: str, content: bytes,
                   client: httpx.Client) -> None:
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200 and r.content == content
    with server.registry() as reg:
        assert reg.is_linked(repo, digest)
        assert reg.engine.stat(digest).size == len(content)
        assert open_uploads(reg, repo) == []


def test_monolithic_post(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("mono", 5000)
    digest = digest_of(content)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=content)
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_monolithic_post_streamed_body(client: httpx.Client, server: Server, repo: str) -> None:
    """No Content-Length: the body arrives chunked, the size is whatever it turns out to be."""
    content = data("mono-chunked", 3 << 20)
    digest = digest_of(content)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                    content=(content[i:i + 100_000] for i in range(0, len(content), 100_000)))
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_empty_blob(client: httpx.Client, server: Server, repo: str) -> None:
    digest = push_blob(client, repo, b"")
    r = client.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == "0"


def test_post_then_put_with_body(client: httpx.Client, server: Server, repo: str) -> None:
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["location"]
    upload_id = r.headers["docker-upload-uuid"]
    assert location == f"/v2/{repo}/blobs/uploads/{upload_id}"
    assert r.headers["range"] == "0-0"
    assert "oci-chunk-min-length" not in r.headers  # a local root takes chunks of any size
    content = data("post-put", 70_000)
    digest = digest_of(content)
    r = client.put(location, params={"digest": digest}, content=content)
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")  # the session is over


def test_chunked_upload_with_content_range(client: httpx.Client, server: Server,
                                           repo: str) -> None:
    content = data("chunked", 250_000)
    digest = digest_of(content)
    location = start_upload(client, repo)
    bounds = [(0, 100_000), (100_000, 200_000), (200_000, 250_000)]
    for start, end in bounds:
        r = client.patch(location, content=content[start:end],
                         headers={"Content-Range": f"{start}-{end - 1}",
                                  "Content-Type": "application/octet-stream"})
        assert r.status_code == 202, r.text
        assert r.headers["range"] == f"0-{end - 1}"
        assert r.headers["location"] == location
        assert r.headers["content-length"] == "0"
        status = client.get(location)
        assert status.status_code == 204
        assert status.headers["range"] == f"0-{end - 1}"
        assert status.headers["location"] == location
        with server.registry() as reg:
            [session] = open_uploads(reg, repo)
            assert session.offset == end
    r = client.put(location, params={"digest": digest})
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_chunked_upload_final_chunk_in_put(client: httpx.Client, server: Server,
                                           repo: str) -> None:
    content = data("chunk-put", 30_000)
    digest = digest_of(content)
    location = start_upload(client, repo)
    r = client.patch(location, content=content[:20_000], headers={"Content-Range": "0-19999"})
    assert r.status_code == 202
    r = client.put(location, params={"digest": digest}, content=content[20_000:],
                   headers={"Content-Range": "20000-29999"})
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_streamed_patch_without_content_range(client: httpx.Client, server: Server,
                                              repo: str) -> None:
    content = data("streamed", 2_500_000)
    digest = digest_of(content)
    location = start_upload(client, repo)
    half = 1_200_000

    def body(part: bytes) -> object:
        return (part[i:i + 65_536] for i in range(0, len(part), 65_536))

    r = client.patch(location, content=body(content[:half]))
    assert r.status_code == 202, r.text
    assert r.headers["range"] == f"0-{half - 1}"
    r = client.patch(location, content=body(content[half:]))
    assert r.status_code == 202, r.text
    assert r.headers["range"] == f"0-{len(content) - 1}"
    r = client.put(location, params={"digest": digest})
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_upload_status(client: httpx.Client, repo: str) -> None:
    r = client.post(f"/v2/{repo}/blobs/uploads/")
    location, upload_id = r.headers["location"], r.headers["docker-upload-uuid"]
    r = client.get(location)
    assert r.status_code == 204
    assert r.headers["range"] == "0-0"
    assert r.headers["location"] == location
    assert r.headers["docker-upload-uuid"] == upload_id
    assert r.content == b""
    client.patch(location, content=b"x" * 123, headers={"Content-Range": "0-122"})
    r = client.get(location)
    assert r.status_code == 204 and r.headers["range"] == "0-122"
    assert client.delete(location).status_code == 204


def test_cancel_upload(client: httpx.Client, server: Server, repo: str) -> None:
    location = start_upload(client, repo)
    upload_id = location.rsplit("/", 1)[1]
    content = b"cancel me" * 1000
    client.patch(location, content=content, headers={"Content-Range": f"0-{len(content) - 1}"})
    r = client.delete(location)
    assert r.status_code == 204
    assert r.content == b""
    assert_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.patch(location, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.put(location, params={"digest": digest_of(content)}), 404,
                 "BLOB_UPLOAD_UNKNOWN")
    assert_error(client.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")
    with server.registry() as reg:
        assert open_uploads(reg, repo) == []
        assert not blob_stored(reg, digest_of(content))
        assert list(reg.backend.list(f"uploads/{upload_id}")) == []


# -- blobs ---------------------------------------------------------------------------------------


@pytest.fixture
def blob(client: httpx.Client, repo: str) -> tuple[str, bytes]:
    content = data("ranges", 1000)
    return push_blob(client, repo, content), content


def test_blob_get_and_head(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    digest, content = blob
    for method in ("GET", "HEAD"):
        r = client.request(method, f"/v2/{repo}/blobs/{digest}")
        assert r.status_code == 200
        assert r.headers["content-length"] == str(len(content))
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["etag"] == f'"{digest}"'
        assert r.headers["accept-ranges"] == "bytes"
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.content == (content if method == "GET" else b"")


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=10-19", 10, 19),
    ("bytes=990-5000", 990, 999),  # an end past the blob is clipped
    ("bytes=-25", 975, 999),  # suffix
    ("bytes=-5000", 0, 999),  # a suffix longer than the blob is all of it
    ("bytes=900-", 900, 999),  # open-ended
    ("bytes=0-0", 0, 0),
    ("bytes=999-999", 999, 999),
])
def test_single_range(client: httpx.Client, repo: str, blob: tuple[str, bytes], header: str,
                      start: int, end: int) -> None:
    digest, content = blob
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(content)}"
    assert r.headers["content-length"] == str(end - start + 1)
    assert r.headers["docker-content-digest"] == digest
    assert r.content == content[start:end + 1]
    head = client.head(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-range"] == r.headers["content-range"]


def _multipart(r: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body, parsed strictly."""
    m = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", r.headers["content-type"])
    assert m, r.headers["content-type"]
    delimiter = b"--" + m[1].encode()
    body = r.content
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n")
    body = body[:-len(delimiter) - 6]
    chunks = body.split(b"\r\n" + delimiter + b"\r\n")
    assert chunks[0].startswith(delimiter + b"\r\n")
    chunks[0] = chunks[0][len(delimiter) + 2:]
    parts = []
    for chunk in chunks:
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        assert sep, chunk[:200]
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert headers["Content-Type"] == "application/octet-stream"
        parts.append((headers["Content-Range"], payload))
    return parts


def test_multi_range(client: httpx.Client, repo: str, blob: tuple[str, bytes]) -> None:
    digest, content = blob
    r = client.get(f"/v2/{repo}/blobs/{digest}",
                   headers={"Range": "bytes=0-9, 100-199,-30,500-"})
    assert r.status_code == 206
    assert int(r.headers["content-length"]) == len(r.content)
    assert "content-range" not in r.headers
    want = [(0, 9), (100, 199), (970, 999), (500, 999)]
    parts = _multipart(r)
    assert [p[0] for p in parts] == [f"bytes {s}-{e}/1000" for s, e in want]
    for (start, end), (_, payload) in zip(want, parts, strict=True):
        assert payload == content[start:end + 1]


@pytest.mark.parametrize("header", ["bytes=1000-1010", "bytes=2000-3000,1500-1600"])
def test_unsatisfiable_range(client: httpx.Client, repo: str, blob: tuple[str, bytes],
                             header: str) -> None:
    digest, _ = blob
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */1000"


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5000-", "bytes=2000-3000,1500-"])
def test_open_ended_range_at_the_end_is_unsatisfiable(
        client: httpx.Client, repo: str, blob: tuple[str, bytes], header: str) -> None:
    digest, _ = blob
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert r.status_code == 416  # a client resuming a finished download must not get it twice
    assert r.headers["content-range"] == "bytes */1000"


@pytest.mark.parametrize("header", ["bytes=abc", "items=0-5", "bytes=9-3", "bytes=-"])
def test_unparsable_range_sends_everything(client: httpx.Client, repo: str,
                                           blob: tuple[str, bytes], header: str) -> None:
    digest, content = blob
    r = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert r.status_code == 200 and r.content == content


def test_blob_delete(client: httpx.Client, server: Server, repo: str,
                     blob: tuple[str, bytes]) -> None:
    digest, content = blob
    r = client.delete(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 202
    assert_error(client.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    assert_error(client.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    with server.registry() as reg:
        assert not reg.is_linked(repo, digest)
    # pushing it again links it again
    assert push_blob(client, repo, content) == digest
    assert client.get(f"/v2/{repo}/blobs/{digest}").content == content


def test_delete_refuses_what_a_manifest_needs(client: httpx.Client, server: Server,
                                                  repo: str) -> None:
    child = simple_image("needed")
    idx = index([child])
    push_manifest(client, repo, idx, "v1")
    needed = [child.digest, idx.digest, *(b.digest for b in child.blobs)]
    for digest in needed:
        r = client.delete(f"/v2/{repo}/blobs/{digest}")
        assert_error(r, 405, "DENIED")
        assert "manifest" in r.json()["errors"][0]["message"]
    # nothing was unlinked: GC keeps it all, and the image still pulls
    with server.registry() as reg:
        Collector(reg, grace=0).run()
        assert all(reg.is_linked(repo, d) and reg.engine.exists(d) for d in needed)
    assert client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": idx.media_type}).content \
        == idx.content
    # the child goes after its index, not before
    assert_error(client.delete(f"/v2/{repo}/manifests/{child.digest}"), 405, "DENIED")
    assert client.get(f"/v2/{repo}/manifests/{child.digest}").status_code == 200
    # once the manifests are gone, so is the refusal
    assert client.delete(f"/v2/{repo}/manifests/{idx.digest}").status_code == 202
    assert client.delete(f"/v2/{repo}/manifests/{child.digest}").status_code == 202
    for digest in (b.digest for b in child.blobs):
        assert client.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202


# -- mounts --------------------------------------------------------------------------------------


def test_mount_from(client: httpx.Client, server: Server, repo: str) -> None:
    source = f"{repo}/source"
    content = data("mount-from", 4000)
    digest = push_blob(client, source, content)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": source})
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


def test_mount_without_from(client: httpx.Client, server: Server, repo: str) -> None:
    content = data("mount-auto", 4000)
    digest = push_blob(client, f"{repo}/elsewhere", content)
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest})
    _assert_created(r, repo, digest)
    _assert_stored(server, repo, digest, content, client)


@pytest.mark.parametrize("source", [None, "self", "missing"])
def test_mount_of_unknown_blob_opens_a_session(client: httpx.Client, server: Server, repo: str,
                                               source: str | None) -> None:
    digest = digest_of(b"nobody has this " + repo.encode())
    params = {"mount": digest}
    if source == "self":
        push_blob(client, f"{repo}/src", b"something else")
        params["from"] = f"{repo}/src"
    elif source == "missing":
        params["from"] = f"{repo}/no-such-repo"
    r = client.post(f"/v2/{repo}/blobs/uploads/", params=params)
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/")
    assert r.headers["range"] == "0-0"
    with server.registry() as reg:
        assert not reg.is_linked(repo, digest)
        assert [s.id for s in open_uploads(reg, repo)] == [location.rsplit("/", 1)[1]]
    assert client.delete(location).status_code == 204


# -- manifests -----------------------------------------------------------------------------------


def test_manifest_put_by_tag(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("by-tag")
    r = push_manifest(client, repo, m, "v1")
    assert r.headers["location"] == f"/v2/{repo}/manifests/{m.digest}"
    assert r.headers["docker-content-digest"] == m.digest
    assert "oci-subject" not in r.headers
    for reference in ("v1", m.digest):
        g = client.get(f"/v2/{repo}/manifests/{reference}")
        assert g.status_code == 200
        assert g.content == m.content
        assert g.headers["content-type"] == OCI_MANIFEST
        assert g.headers["docker-content-digest"] == m.digest
        assert g.headers["content-length"] == str(m.size)
        h = client.head(f"/v2/{repo}/manifests/{reference}")
        assert h.status_code == 200 and h.content == b""
        assert h.headers["content-type"] == OCI_MANIFEST
        assert h.headers["docker-content-digest"] == m.digest
        assert h.headers["content-length"] == str(m.size)
    with server.registry() as reg:
        assert reg.tag_map(repo) == {"v1": m.digest}


def test_manifest_put_by_digest(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("by-digest")
    r = push_manifest(client, repo, m)
    assert r.headers["location"] == f"/v2/{repo}/manifests/{m.digest}"
    assert r.headers["docker-content-digest"] == m.digest
    assert client.get(f"/v2/{repo}/manifests/{m.digest}").content == m.content
    assert client.get(f"/v2/{repo}/tags/list").json()["tags"] == []


def test_docker_manifest_keeps_its_media_type(client: httpx.Client, repo: str) -> None:
    from tests.registry_helpers import DOCKER_CONFIG, DOCKER_LAYER, docker_manifest

    m = docker_manifest(config("docker", DOCKER_CONFIG), [layer("docker", 300, DOCKER_LAYER)])
    push_manifest(client, repo, m, "latest")
    r = client.get(f"/v2/{repo}/manifests/latest")
    assert r.headers["content-type"] == DOCKER_MANIFEST and r.content == m.content


def test_manifest_with_subject(client: httpx.Client, repo: str) -> None:
    subject = simple_image("subject")
    push_manifest(client, repo, subject, "v1")
    sbom = oci_manifest(config("sbom"), [layer("sbom", 50)], subject=subject,
                        artifact_type="application/vnd.example.sbom")
    r = push_manifest(client, repo, sbom)
    assert r.headers["oci-subject"] == subject.digest
    # a subject that is not (yet) in the repository is allowed too
    orphan = oci_manifest(config("orphan"), [], subject=simple_image("absent"))
    r = push_manifest(client, repo, orphan)
    assert r.headers["oci-subject"] == simple_image("absent").digest


@pytest.fixture
def pushed_index(client: httpx.Client, repo: str) -> tuple[str, bytes]:
    idx = index([simple_image("amd"), simple_image("arm")])
    push_manifest(client, repo, idx, "multi")
    return idx.digest, idx.content


@pytest.mark.parametrize(("accept", "ok"), [
    (None, True),
    ("*/*", True),
    (OCI_INDEX, True),
    (f"{OCI_MANIFEST}, {OCI_INDEX}", True),
    (f"{OCI_MANIFEST};q=0.9, */*;q=0.1", True),
    (OCI_MANIFEST, False),
    (f"{OCI_MANIFEST}, {DOCKER_MANIFEST}", False),
    (DOCKER_LIST, False),
])
def test_index_accept_negotiation(client: httpx.Client, repo: str,
                                  pushed_index: tuple[str, bytes], accept: str | None,
                                  ok: bool) -> None:
    digest, content = pushed_index
    headers = {"Accept": accept} if accept is not None else {}
    for reference in ("multi", digest):
        r = client.get(f"/v2/{repo}/manifests/{reference}", headers=headers)
        h = client.head(f"/v2/{repo}/manifests/{reference}", headers=headers)
        if ok:
            assert r.status_code == 200 and r.content == content
            assert r.headers["content-type"] == OCI_INDEX
            assert h.status_code == 200 and h.headers["docker-content-digest"] == digest
        else:
            assert_error(r, 404, "MANIFEST_UNKNOWN")
            assert h.status_code == 404 and h.content == b""


def test_index_accept_as_repeated_header_lines(client: httpx.Client, repo: str,
                                               pushed_index: tuple[str, bytes]) -> None:
    """Accept sent one media type per line (as skopeo and Docker's Go client do) is one
    list: an index is served if any line names its type, and refused if none does."""
    _, content = pushed_index
    r = client.get(f"/v2/{repo}/manifests/multi",
                   headers=[("Accept", OCI_INDEX), ("Accept", OCI_MANIFEST)])
    assert r.status_code == 200 and r.content == content
    r = client.get(f"/v2/{repo}/manifests/multi",
                   headers=[("Accept", OCI_MANIFEST), ("Accept", OCI_INDEX)])
    assert r.status_code == 200 and r.content == content
    r = client.get(f"/v2/{repo}/manifests/multi",
                   headers=[("Accept", OCI_MANIFEST), ("Accept", DOCKER_MANIFEST)])
    assert_error(r, 404, "MANIFEST_UNKNOWN")


def test_manifest_delete_by_digest(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("delete-digest")
    push_manifest(client, repo, m, "a")
    push_manifest(client, repo, m, "b")
    keep = simple_image("keep")
    push_manifest(client, repo, keep, "keep")
    r = client.delete(f"/v2/{repo}/manifests/{m.digest}")
    assert r.status_code == 202
    assert_error(client.get(f"/v2/{repo}/manifests/{m.digest}"), 404, "MANIFEST_UNKNOWN")
    for tag in ("a", "b"):
        assert_error(client.get(f"/v2/{repo}/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    assert client.get(f"/v2/{repo}/tags/list").json()["tags"] == ["keep"]
    assert_error(client.delete(f"/v2/{repo}/manifests/{m.digest}"), 404, "MANIFEST_UNKNOWN")
    with server.registry() as reg:
        assert reg.tag_map(repo) == {"keep": keep.digest}
        assert [r.digest for r in reg.manifests(repo)] == [keep.digest]


def test_manifest_delete_by_tag(client: httpx.Client, server: Server, repo: str) -> None:
    m = simple_image("delete-tag")
    push_manifest(client, repo, m, "old")
    r = client.delete(f"/v2/{repo}/manifests/old")
    assert r.status_code == 202
    assert_error(client.get(f"/v2/{repo}/manifests/old"), 404, "MANIFEST_UNKNOWN")
    assert client.get(f"/v2/{repo}/manifests/{m.digest}").content == m.content
    assert_error(client.delete(f"/v2/{repo}/manifests/old"), 404, "MANIFEST_UNKNOWN")
    with server.registry() as reg:
        assert reg.tag_map(repo) == {}
        assert [r.digest for r in reg.manifests(repo)] == [m.digest]


# -- tags, catalog, referrers --------------------------------------------------------------------


def _next(r: httpx.Response) -> str | None:
    link = r.headers.get("link")
    if link is None:
        return None
    m = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert m, link
    return m[1]


def test_tags_list_pagination(client: httpx.Client, repo: str) -> None:
    m = simple_image("tags")
    tags = ["a1", "b2", "c3", "d4", "e5"]
    for tag in reversed(tags):
        push_manifest(client, repo, m, tag)
    r = client.get(f"/v2/{repo}/tags/list")
    assert r.status_code == 200
    assert r.json() == {"name": repo, "tags": tags}
    assert "link" not in r.headers

    pages, url = [], f"/v2/{repo}/tags/list?n=2"
    while url is not None:
        r = client.get(url)
        assert r.status_code == 200 and r.json()["name"] == repo
        pages.append(r.json()["tags"])
        url = _next(r)
        if url is not None:
            parts = urlsplit(url)
            assert parts.path == f"/v2/{repo}/tags/list"
            assert parse_qs(parts.query) == {"n": ["2"], "last": [pages[-1][-1]]}
    assert pages == [["a1", "b2"], ["c3", "d4"], ["e5"]]

    exact = client.get(f"/v2/{repo}/tags/list", params={"n": 5})
    assert exact.json()["tags"] == tags and "link" not in exact.headers
    after = client.get(f"/v2/{repo}/tags/list", params={"last": "b2"})
    assert after.json()["tags"] == ["c3", "d4", "e5"] and "link" not in after.headers
    page = client.get(f"/v2/{repo}/tags/list", params={"n": 2, "last": "c3"})
    assert page.json()["tags"] == ["d4", "e5"] and "link" not in page.headers
    assert client.get(f"/v2/{repo}/tags/list", params={"last": "e5"}).json()["tags"] == []


def test_catalog_pagination(client: httpx.Client, repo: str) -> None:
    names = [f"{repo}/c1", f"{repo}/c2", f"{repo}/c3"]
    for name in names:
        push_blob(client, name, name.encode())
    everything = client.get("/v2/_catalog")
    assert everything.status_code == 200
    listed = everything.json()["repositories"]
    assert listed == sorted(listed)
    assert set(names) <= set(listed)
    r = client.get("/v2/_catalog", params={"n": 2, "last": repo})
    assert r.json()["repositories"] == names[:2]
    url = _next(r)
    assert url is not None
    parts = urlsplit(url)
    assert parts.path == "/v2/_catalog"
    assert parse_qs(parts.query) == {"n": ["2"], "last": [names[1]]}
    assert client.get(url).json()["repositories"][0] == names[2]


def _all_referrers(client: httpx.Client, url: str, **params: str) -> list[list[str]]:
    """Every page of a referrers list, following Link: the digests of each page."""
    pages: list[list[str]] = []
    r = client.get(url, params=params)
    while True:
        assert r.status_code == 200 and r.headers["content-type"] == OCI_INDEX
        pages.append([d["digest"] for d in r.json()["manifests"]])
        nxt = _next(r)
        if nxt is None:
            return pages
        assert urlsplit(nxt).path == url
        r = client.get(nxt)


def test_referrers_pages(client: httpx.Client, repo: str) -> None:
    """A list too long for one response comes in pages linked by Link, in digest order:
    by n, and by size (clients read the list with their manifest limit, 4 MiB)."""
    subject = simple_image("many-referrers")
    push_manifest(client, repo, subject, "v1")
    big = "x" * 1_500_000  # three of these are over 4 MB
    refs = [oci_manifest(config(f"r{i}"), [], subject=subject,
                         artifact_type="application/vnd.example.big",
                         annotations={"big": big, "i": str(i)}) for i in range(4)]
    for m in refs:
        push_manifest(client, repo, m)
    url = f"/v2/{repo}/referrers/{subject.digest}"
    every = sorted(m.digest for m in refs)

    pages = _all_referrers(client, url)
    assert [d for page in pages for d in page] == every
    assert [len(p) for p in pages] == [2, 2]  # by size
    pages = _all_referrers(client, url, n="3", artifactType="application/vnd.example.big")
    assert [d for page in pages for d in page] == every and len(pages) >= 2
    assert _all_referrers(client, url, artifactType="application/vnd.none") == [[]]


def test_referrers(client: httpx.Client, repo: str) -> None:
    subject = simple_image("referred")
    push_manifest(client, repo, subject, "v1")
    sbom = oci_manifest(config("sbom"), [layer("sbom-data", 70)], subject=subject,
                        artifact_type="application/vnd.example.sbom+json")
    sig = oci_manifest(config("sig"), [layer("sig-data", 30)], subject=subject,
                       artifact_type="application/vnd.example.sig",
                       annotations={"org.example.signer": "me"})
    unrelated = oci_manifest(config("x"), [], artifact_type="application/vnd.example.sbom+json")
    for m in (sbom, sig, unrelated):
        push_manifest(client, repo, m)

    r = client.get(f"/v2/{repo}/referrers/{subject.digest}")
    assert r.status_code == 200
    assert r.headers["content-type"] == OCI_INDEX
    assert "oci-filters-applied" not in r.headers
    body = r.json()
    assert body["schemaVersion"] == 2 and body["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in body["manifests"]}
    assert set(by_digest) == {sbom.digest, sig.digest}
    assert by_digest[sbom.digest] == {"mediaType": OCI_MANIFEST, "digest": sbom.digest,
                                      "size": sbom.size,
                                      "artifactType": "application/vnd.example.sbom+json"}
    assert by_digest[sig.digest]["annotations"] == {"org.example.signer": "me"}

    r = client.get(f"/v2/{repo}/referrers/{subject.digest}",
                   params={"artifactType": "application/vnd.example.sbom+json"})
    assert r.status_code == 200
    assert r.headers["oci-filters-applied"] == "artifactType"
    assert [d["digest"] for d in r.json()["manifests"]] == [sbom.digest]
    r = client.get(f"/v2/{repo}/referrers/{subject.digest}",
                   params={"artifactType": "application/vnd.none"})
    assert r.json()["manifests"] == [] and r.headers["oci-filters-applied"] == "artifactType"
    # an empty filter names no type: everything, unfiltered
    r = client.get(f"/v2/{repo}/referrers/{subject.digest}", params={"artifactType": ""})
    assert {d["digest"] for d in r.json()["manifests"]} == {sbom.digest, sig.digest}
    assert "oci-filters-applied" not in r.headers

    # an unknown subject has no referrers, and that is a 200; in an unknown repository too
    for where in (repo, f"{repo}/never-pushed"):
        r = client.get(f"/v2/{where}/referrers/{digest_of(b'no such subject')}")
        assert r.status_code == 200 and r.json()["manifests"] == []
        assert r.headers["content-type"] == OCI_INDEX

    # deleting a referrer takes it off the list
    assert client.delete(f"/v2/{repo}/manifests/{sig.digest}").status_code == 202
    r = client.get(f"/v2/{repo}/referrers/{subject.digest}")
    assert [d["digest"] for d in r.json()["manifests"]] == [sbom.digest]


@pytest.mark.parametrize("bad", ["sha256:abc", "sha256:" + "G" * 64, "md5:" + "a" * 32,
                                 "notadigest"])
def test_referrers_bad_digest(client: httpx.Client, repo: str, bad: str) -> None:
    push_blob(client, repo, b"make the repository exist")
    assert_error(client.get(f"/v2/{repo}/referrers/{bad}"), 400, "DIGEST_INVALID")


# -- conditional requests ---------------------------------------------------------------------


def test_if_none_match_answers_304_for_blobs_and_manifests(client: httpx.Client,
                                                           server: Server, repo: str) -> None:
    image = simple_image("conditional")
    push_manifest(client, repo, image, "v1")
    layer_digest = image.blobs[-1].digest
    for path, digest in ((f"/v2/{repo}/blobs/{layer_digest}", layer_digest),
                         (f"/v2/{repo}/manifests/v1", image.digest)):
        for method in ("GET", "HEAD"):
            r = client.request(method, path, headers={"If-None-Match": f'"{digest}"',
                                                      "Accept": OCI_MANIFEST})
            assert r.status_code == 304 and r.content == b"", (method, path)
            assert r.headers["etag"] == f'"{digest}"'
            assert "content-length" not in r.headers
        r = client.get(path, headers={"If-None-Match": '"sha256:other"', "Accept": OCI_MANIFEST})
        assert r.status_code == 200 and r.headers["docker-content-digest"] == digest


def test_blobs_may_be_cached_and_manifests_by_tag_may_not(client: httpx.Client,
                                                          repo: str) -> None:
    """A blob's bytes never change under its digest: caches may keep them (for a year, as
    the reference registry says; a response to a request with credentials stays out of
    shared caches all the same). A tag moves, so its manifest must be asked for again."""
    image = simple_image("cacheable")
    push_manifest(client, repo, image, "v1")
    for method in ("GET", "HEAD"):
        r = client.request(method, f"/v2/{repo}/blobs/{image.blobs[-1].digest}")
        assert r.status_code == 200 and r.headers["cache-control"] == "max-age=31536000"
        r = client.request(method, f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert r.status_code == 200 and "cache-control" not in r.headers


def test_if_range_with_another_validator_sends_the_whole_blob(client: httpx.Client,
                                                              repo: str) -> None:
    content = data("if-range", 4096)
    digest = push_blob(client, repo, content)
    r = client.get(f"/v2/{repo}/blobs/{digest}",
                   headers={"Range": "bytes=0-9", "If-Range": '"sha256:stale"'})
    assert r.status_code == 200 and r.content == content
    r = client.get(f"/v2/{repo}/blobs/{digest}",
                   headers={"Range": "bytes=0-9", "If-Range": f'"{digest}"'})
    assert r.status_code == 206 and r.content == content[:10]


def test_a_204_has_no_content_length(server: Server, client: httpx.Client, repo: str) -> None:
    """RFC 9110 8.6: a server MUST NOT send Content-Length in a 204."""
    location = start_upload(client, repo)
    for method in ("GET", "DELETE"):
        r = raw_request(server, method, location)
        assert r.status_code == 204 and "content-length" not in r.headers, (method, r.headers)


def test_a_cancelled_upload_leaves_no_repository(client: httpx.Client, server: Server,
                                                repo: str) -> None:
    """The repository comes with its first blob, not with a session that may be cancelled
    (or a mount that fell back to one): the catalog does not list an empty one."""
    location = start_upload(client, repo)
    assert client.delete(location).status_code == 204
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest_of(b"nowhere"),
                                                          "from": "some/where"})
    assert r.status_code == 202
    assert client.delete(r.headers["location"]).status_code == 204
    assert repo not in client.get("/v2/_catalog").json()["repositories"]
    assert_error(client.get(f"/v2/{repo}/tags/list"), 404, "NAME_UNKNOWN")
    content = data("first blob", 100)
    location = start_upload(client, repo)
    r = client.put(location, params={"digest": digest_of(content)}, content=content)
    assert r.status_code == 201
    assert repo in client.get("/v2/_catalog").json()["repositories"]
