"""oras-py (the OCI artifact client from PyPI, ``import oras.client``) against
``casengine serve``: artifacts pushed monolithic (POST, PUT with the body) and chunked
(POST, PATCH per chunk with Content-Range, PUT), pulled back byte for byte, and referrers
(manifests with a ``subject``) found through ``GET /v2/<name>/referrers/<digest>``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.interop.conftest import Server, require_module
from tests.interop.images import OCI_INDEX, OCI_MANIFEST, payload, sha256

pytestmark = pytest.mark.interop

KIB, MIB = 1 << 10, 1 << 20
SBOM = "application/spdx+json"
SIGNATURE = "application/vnd.example.signature.v1+json"


@pytest.fixture
def oras_client_class() -> Any:
    """oras-py's client class (skips or, under CI, fails the test without oras-py)."""
    return require_module("oras.client").OrasClient


@pytest.fixture
def client(oras_client_class: Any, server: Server, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Any:
    """An oras-py client of the server, working in a fresh directory (oras-py only pushes
    files under the current one) with a HOME of its own (it reads docker auth files)."""

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    return oras_client_class(hostname=server.host, insecure=True)


def manifest(server: Server, repository: str, reference: str) -> tuple[bytes, str, str]:
    """The manifest's bytes, the digest the server gives for it, and its media type; the
    bytes are checked against that digest."""
    r = httpx.get(f"{server.url}/v2/{repository}/manifests/{reference}",
                  headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == sha256(r.content)
    return r.content, r.headers["Docker-Content-Digest"], r.headers["Content-Type"]


def push_file(client: Any, server: Server, target: str, name: str, data: bytes,
              **options: Any) -> Any:
    Path(name).write_bytes(data)
    response = client.push(target=f"{server.host}/{target}", files=[name], quiet=True, **options)
    assert response.status_code == 201, response.text
    return response


def pull_file(client: Any, server: Server, target: str, name: str, out: Path) -> bytes:
    files = client.pull(target=f"{server.host}/{target}", outdir=str(out))
    assert [Path(f).name for f in files] == [name]
    return Path(files[0]).read_bytes()


def test_monolithic_push_and_pull(client: Any, server: Server, tmp_path: Path) -> None:
    data = payload("oras/mono", 5 * MIB + 17)
    push_file(client, server, "team/oras/art:mono", "artifact.bin", data)
    # the file and oras' empty config: POST then one PUT with the body, no PATCH
    assert server.requests("uploads", "PUT", 201) == 2
    assert server.requests("uploads", "PATCH") == 0

    assert pull_file(client, server, "team/oras/art:mono", "artifact.bin", tmp_path / "out") == data
    doc = json.loads(manifest(server, "team/oras/art", "mono")[0])
    assert doc["layers"][0]["digest"] == sha256(data)
    assert doc["layers"][0]["size"] == len(data)


@pytest.mark.parametrize(("size", "chunk"), [
    (5 * MIB + 123, MIB),  # a short last chunk
    (2 * MIB, 512 * KIB),  # chunks that divide the blob exactly
    (100 * KIB, MIB),  # one chunk bigger than the blob
])
def test_chunked_push_and_pull(client: Any, server: Server, tmp_path: Path, size: int,
                               chunk: int) -> None:
    data = payload(f"oras/chunked/{size}", size)
    push_file(client, server, "team/oras/art:chunked", "artifact.bin", data,
              do_chunked=True, chunk_size=chunk)
    # the file went as one PATCH per chunk (the config goes monolithic)
    assert server.requests("uploads", "PATCH", 202) == math.ceil(size / chunk)
    assert server.requests("uploads", "PATCH") == math.ceil(size / chunk)

    got = pull_file(client, server, "team/oras/art:chunked", "artifact.bin", tmp_path / "out")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest() and got == data
    with server.engine() as engine:
        assert engine.stat(sha256(data)).size == size
        assert engine.index.count("uploads") == 0  # the session was committed and gone


def test_referrers(client: Any, server: Server, tmp_path: Path) -> None:
    from oras.oci import Subject

    push_file(client, server, "team/oras/app:v1", "app.bin", payload("oras/app", 64 * KIB))
    subject_bytes, subject_digest, subject_type = manifest(server, "team/oras/app", "v1")
    subject = Subject(mediaType=subject_type, digest=subject_digest,
                               size=len(subject_bytes))

    # two referrers of different artifact types (oras-py sets the type as the config's)
    pushed = {}
    for kind, artifact_type, name in (("sbom", SBOM, "sbom.json"),
                                      ("sig", SIGNATURE, "signature.json")):
        Path(f"{kind}-config.json").write_text(json.dumps({"kind": kind}))
        response = push_file(client, server, f"team/oras/app:{kind}", name,
                             json.dumps({kind: True}).encode(), subject=subject,
                             manifest_config=f"{kind}-config.json:{artifact_type}")
        assert response.headers.get("OCI-Subject") == subject_digest
        body, digest, _ = manifest(server, "team/oras/app", kind)
        assert digest == response.headers["Docker-Content-Digest"]
        pushed[artifact_type] = {"digest": digest, "size": len(body)}

    url = f"{server.url}/v2/team/oras/app/referrers/{subject_digest}"
    r = httpx.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == OCI_INDEX
    index = r.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    found = {d["artifactType"]: d for d in index["manifests"]}
    assert set(found) == {SBOM, SIGNATURE}
    for artifact_type, want in pushed.items():
        assert found[artifact_type]["digest"] == want["digest"]
        assert found[artifact_type]["size"] == want["size"]
        assert found[artifact_type]["mediaType"] == OCI_MANIFEST

    # filtered by artifact type, and saying so
    r = httpx.get(url, params={"artifactType": SBOM})
    assert r.status_code == 200
    assert r.headers.get("OCI-Filters-Applied") == "artifactType"
    assert [d["digest"] for d in r.json()["manifests"]] == [pushed[SBOM]["digest"]]
    r = httpx.get(url, params={"artifactType": "application/vnd.example.none"})
    assert r.status_code == 200 and r.json()["manifests"] == []

    # a manifest nobody refers to has an empty list, not an error
    r = httpx.get(f"{server.url}/v2/team/oras/app/referrers/{pushed[SBOM]['digest']}")
    assert r.status_code == 200 and r.json()["manifests"] == []

    # the referrer pulls like any artifact
    got = pull_file(client, server, "team/oras/app:sbom", "sbom.json", tmp_path / "out")
    assert json.loads(got) == {"sbom": True}


def test_tags_and_delete_tag(client: Any, server: Server) -> None:
    """oras-py lists tags, and deletes a tag the way it does: HEAD the tag for its digest,
    then DELETE the manifest by digest (which removes every tag on it)."""
    for tag in ("t1", "t2"):
        push_file(client, server, f"team/oras/tags:{tag}", "one.bin", b"one")
    push_file(client, server, "team/oras/tags:t3", "two.bin", b"two")
    assert sorted(client.get_tags(f"{server.host}/team/oras/tags")) == ["t1", "t2", "t3"]
    assert client.get_tags(f"{server.host}/team/oras/tags", N=2) == ["t1", "t2"]

    assert client.delete_tag(f"{server.host}/team/oras/tags", "t1") is True
    assert client.get_tags(f"{server.host}/team/oras/tags") == ["t3"]
    r = httpx.get(f"{server.url}/v2/team/oras/tags/manifests/t2", headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 404 and r.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert client.delete_tag(f"{server.host}/team/oras/tags", "t1") is False
