"""The HTTP API on an S3 root (moto's server): a full round trip, redirects to presigned
URLs, and the chunk minimum S3's multipart uploads impose."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from casengine.registry.manifests import OCI_MANIFEST
from tests.http.conftest import (
    MIB,
    Server,
    assert_error,
    assert_repo_clean,
    blob_stored,
    digest_of,
    open_uploads,
    push_blob,
    push_manifest,
)
from tests.registry_helpers import Blob, config, data, layer, oci_manifest

PART = 5 * MIB  # the part_size the s3_server fixture sets


@pytest.fixture(scope="module")
def s3(s3_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=s3_server.url, timeout=60) as c:
        yield c


def test_round_trip(s3: httpx.Client, s3_server: Server, s3_endpoint: str, repo: str) -> None:
    # a chunked upload: full parts, a tail below one part, a final chunk in the PUT
    r = s3.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202
    assert r.headers["oci-chunk-min-length"] == str(PART)
    location = r.headers["location"]
    big = data("s3-big", 2 * PART + 300_000)
    bounds = [(0, PART), (PART, PART + 100_000), (PART + 100_000, 2 * PART + 200_000)]
    for start, end in bounds:
        r = s3.patch(location, content=big[start:end],
                     headers={"Content-Range": f"{start}-{end - 1}"})
        assert r.status_code == 202, r.text
        assert r.headers["range"] == f"0-{end - 1}"
    assert s3.get(location).headers["range"] == f"0-{bounds[-1][1] - 1}"
    r = s3.put(location, params={"digest": digest_of(big)}, content=big[bounds[-1][1]:])
    assert r.status_code == 201, r.text
    assert r.headers["docker-content-digest"] == digest_of(big)

    # a monolithic one, and a manifest over both
    cfg = config("s3")
    push_blob(s3, repo, cfg.content)
    small = layer("s3-small", 777)
    push_blob(s3, repo, small.content)
    m = oci_manifest(cfg, [small, Blob(big)])
    r = push_manifest(s3, repo, m, "v1")
    assert r.headers["docker-content-digest"] == m.digest

    got = s3.get(f"/v2/{repo}/manifests/v1")
    assert got.status_code == 200 and got.content == m.content
    assert got.headers["content-type"] == OCI_MANIFEST
    assert s3.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
    for content in (big, small.content):
        digest = digest_of(content)
        r = s3.get(f"/v2/{repo}/blobs/{digest}", follow_redirects=True)
        assert r.status_code == 200 and r.content == content
        assert urlsplit(str(r.url)).netloc == urlsplit(s3_endpoint).netloc
        head = s3.head(f"/v2/{repo}/blobs/{digest}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(content))
        part = s3.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=100-299"})
        assert part.status_code == 206 and part.content == content[100:300]
    with s3_server.registry() as reg:
        assert open_uploads(reg, repo) == []
        assert reg.engine.stat(digest_of(big)).size == len(big)
        assert reg.tag_map(repo) == {"v1": m.digest}


def test_redirect_to_presigned_url(s3: httpx.Client, s3_endpoint: str, repo: str) -> None:
    content = data("redirect", 123_456)
    digest = push_blob(s3, repo, content)
    r = s3.get(f"/v2/{repo}/blobs/{digest}")
    assert r.status_code == 307
    assert r.headers["docker-content-digest"] == digest
    assert r.headers["cache-control"] == "no-store"  # the URL expires; the bytes do not
    location = r.headers["location"]
    assert location.startswith(s3_endpoint + "/")
    assert "Signature" in location or "X-Amz-Signature" in location
    direct = httpx.get(location)
    assert direct.status_code == 200 and direct.content == content
    followed = s3.get(f"/v2/{repo}/blobs/{digest}", follow_redirects=True)
    assert followed.status_code == 200 and followed.content == content
    # HEAD and ranged GETs are answered by the registry itself
    assert s3.head(f"/v2/{repo}/blobs/{digest}").status_code == 200
    ranged = s3.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-10"})
    assert ranged.status_code == 206 and ranged.content == content[-10:]
    # and an unknown blob is still the registry's 404, not a redirect
    assert_error(s3.get(f"/v2/{repo}/blobs/{digest_of(b'absent')}"), 404, "BLOB_UNKNOWN")


def test_commit_mismatch_leaves_nothing_on_s3(s3: httpx.Client, s3_server: Server,
                                              repo: str) -> None:
    content = data("s3-mismatch", PART + 10)
    wrong = digest_of(b"wrong")
    r = s3.post(f"/v2/{repo}/blobs/uploads/", params={"digest": wrong}, content=content)
    assert_error(r, 400, "DIGEST_INVALID")
    assert_repo_clean(s3_server, repo, wrong, digest_of(content))
    location = s3.post(f"/v2/{repo}/blobs/uploads/").headers["location"]
    s3.patch(location, content=content, headers={"Content-Range": f"0-{len(content) - 1}"})
    assert_error(s3.put(location, params={"digest": wrong}), 400, "DIGEST_INVALID")
    with s3_server.registry() as reg:
        assert not blob_stored(reg, wrong) and not blob_stored(reg, digest_of(content))
    assert s3.delete(location).status_code == 204
    assert_repo_clean(s3_server, repo, wrong, digest_of(content))
