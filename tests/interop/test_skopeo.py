"""skopeo (the real client, from the Debian package) against ``casengine serve``.

Images are real OCI layouts built by :mod:`tests.interop.images`: pushed from ``oci:``
to the server, pulled back to a new ``oci:`` layout, and checked blob by blob: every
pulled blob hashes to its name, the pulled set is exactly the pushed set, and the
layers still decompress to their configs' diff_ids.

skopeo uploads every blob as POST, one streamed PATCH (no Content-Length, chunked
transfer encoding) and PUT ?digest=; it has no option to split a blob into several
PATCHes (oras covers that, in test_oras.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from casengine.registry import Registry
from tests.interop import images
from tests.interop.conftest import Server, Skopeo, SkopeoFailed

pytestmark = pytest.mark.interop


def push(skopeo: Skopeo, image: images.Image, dest: str, *options: str) -> None:
    skopeo.copy(image.ref, f"docker://{dest}", *options)


def pull(skopeo: Skopeo, source: str, out: Path, *options: str,
         preserve_digests: bool = True) -> str:
    """Pull ``docker://source`` into the layout ``out`` as tag v1; the tagged digest."""
    skopeo.copy(f"docker://{source}", f"oci:{out}:v1", *options,
                preserve_digests=preserve_digests)
    return images.tagged(out, "v1")["digest"]


def assert_same_blobs(pulled: Path, image: images.Image) -> None:
    """``pulled`` holds exactly ``image``'s blobs, each hashing to its name (I1 from the
    outside), and its images' layers match their diff_ids."""
    got = images.verify_layout(pulled, image.digest)
    assert {d: desc["size"] for d, desc in got.items()} == image.blobs
    assert images.layout_files(pulled) == image.blobs, "the pull wrote blobs nobody asked for"


def assert_stored(server: Server, image: images.Image, repository: str) -> None:
    """The server's store holds each of ``image``'s blobs once, with the bytes pushed, and
    ``repository`` links them."""
    with server.engine() as engine:
        keys = list(engine.backend.list("blobs/"))
        for digest, size in image.blobs.items():
            hexdigest = digest.split(":", 1)[1]
            assert len([k for k in keys if hexdigest in k]) == 1, f"{digest} stored {keys}"
            assert engine.stat(digest).size == size
            h = hashlib.sha256()
            for chunk in engine.read(digest):
                h.update(chunk)
            assert "sha256:" + h.hexdigest() == digest
            assert Registry(engine).is_linked(repository, digest), f"{digest} not in {repository}"


def test_single_image_round_trip(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    images.verify_layout(image.layout, image.digest)  # the builder itself is right
    layers = len(image.blobs) - 2  # the manifest and the config

    push(skopeo, image, f"{server.host}/team/x:v1")

    # each blob (layers and config) went POST, PATCH (the whole stream), PUT ?digest=
    assert server.requests("uploads", "POST", 202) == layers + 1
    assert server.requests("uploads", "PATCH", 202) == layers + 1
    assert server.requests("uploads", "PUT", 201) == layers + 1
    assert_stored(server, image, "team/x")

    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/x:v1", out) == image.digest
    assert_same_blobs(out, image)


def test_multi_platform_index_shares_its_base_layer(skopeo: Skopeo, server: Server,
                                                    tmp_path: Path) -> None:
    image, base = images.multi_platform(tmp_path / "src")
    index = images.read_json(image.layout, image.digest)
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    uploaded = len(image.blobs) - 3  # all but the index and its two manifests

    push(skopeo, image, f"{server.host}/team/multi:v1", "--all")

    # the second platform found the shared base already there and did not send it again
    assert server.requests("uploads", "PUT", 201) == uploaded
    assert server.requests("blobs", "HEAD", 200) >= 1
    with server.engine() as engine:
        base_objects = [k for k in engine.backend.list("blobs/") if base.split(":")[1] in k]
        assert len(base_objects) == 1
        stored = {r.digest for r in engine.list()}
    assert set(image.blobs) <= stored
    assert_stored(server, image, "team/multi")

    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/multi:v1", out, "--all") == image.digest
    assert_same_blobs(out, image)

    # each platform resolves to its own image through the index
    for arch in ("amd64", "arm64"):
        info = skopeo.inspect(f"docker://{server.host}/team/multi:v1", arch=arch)
        assert info["Architecture"] == arch
        assert info["Labels"] == {"test.label": arch}
        assert info["Layers"][0] == base


def test_docker_manifest_list_round_trip(skopeo: Skopeo, server: Server,
                                         tmp_path: Path) -> None:
    """The multi-platform image converted by skopeo to Docker schema 2 (a manifest list of
    two v2s2 manifests): it pushes, reads back byte for byte, and pulls with every blob.

    skopeo sends each manifest type it accepts on an Accept line of its own, the Docker
    list's type not last: the server must read them all (RFC 9110: one list)."""
    image, _ = images.multi_platform(tmp_path / "src")
    digest_file = tmp_path / "pushed-digest"
    skopeo.copy(image.ref, f"docker://{server.host}/team/docker:v1", "--all", "--format",
                "v2s2", "--digestfile", str(digest_file), preserve_digests=False)
    pushed = digest_file.read_text().strip()

    raw = skopeo.inspect_raw(f"docker://{server.host}/team/docker:v1")
    assert images.sha256(raw) == pushed
    doc = json.loads(raw)
    assert doc["mediaType"] == images.DOCKER_LIST
    assert {m["mediaType"] for m in doc["manifests"]} == {images.DOCKER_MANIFEST}

    out = tmp_path / "pulled"
    # (an oci: layout holds OCI types: skopeo converts the manifests back)
    digest = pull(skopeo, f"{server.host}/team/docker:v1", out, "--all",
                  preserve_digests=False)
    images.verify_layout(out, digest)
    # the layers are the same blobs; manifests and configs were rewritten
    assert images.layer_digests(out, digest) == images.layer_digests(image.layout, image.digest)


def test_zstd_layers_round_trip(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.zstd_image(tmp_path / "src")
    push(skopeo, image, f"{server.host}/team/zstd:v1")
    assert_stored(server, image, "team/zstd")

    out = tmp_path / "pulled"
    digest = pull(skopeo, f"{server.host}/team/zstd:v1", out)
    assert digest == image.digest
    assert_same_blobs(out, image)  # includes: each zstd layer decompresses to its diff_id
    manifest = images.read_json(out, digest)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {images.LAYER_ZSTD}


def test_inspect_and_list_tags(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    for tag in ("v1", "v2", "latest"):
        push(skopeo, image, f"{server.host}/team/x:{tag}")
    # the later pushes found every blob in place: one upload per blob in all
    assert server.requests("uploads", "PUT", 201) == len(image.blobs) - 1

    assert sorted(skopeo.list_tags(f"docker://{server.host}/team/x")) == ["latest", "v1", "v2"]

    manifest = images.read_json(image.layout, image.digest)
    info = skopeo.inspect(f"docker://{server.host}/team/x:v2")
    assert info["Digest"] == image.digest
    assert info["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert info["Labels"] == {"test.label": "single"}
    assert sorted(info["RepoTags"]) == ["latest", "v1", "v2"]

    # the stored manifest and config come back byte for byte
    raw = skopeo.inspect_raw(f"docker://{server.host}/team/x@{image.digest}")
    assert raw == images.blob_path(image.layout, image.digest).read_bytes()
    config = skopeo.inspect_raw(f"docker://{server.host}/team/x:v1", "--config")
    assert config == images.blob_path(image.layout, manifest["config"]["digest"]).read_bytes()


def test_cross_repository_push_mounts(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    """skopeo remembers where it pushed each blob; pushing the image to a second repository
    mounts its layers from the first (POST ?mount=&from=, 201) instead of uploading them.
    (skopeo 1.9 sends the config again whatever the registry holds: it never tries to
    reuse a config blob.)"""
    image = images.single_image(tmp_path / "src")
    blobs = len(image.blobs) - 1  # layers and config
    push(skopeo, image, f"{server.host}/team/a:v1")
    assert server.requests("uploads", "PUT", 201) == blobs
    push(skopeo, image, f"{server.host}/team/b:v1")
    mounted = server.requests("uploads", "POST", 201)
    assert mounted >= blobs - 1  # every layer
    assert server.requests("uploads", "PUT", 201) == blobs + (blobs - mounted)
    assert_stored(server, image, "team/b")
    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/b:v1", out) == image.digest
    assert_same_blobs(out, image)


def test_delete(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    push(skopeo, image, f"{server.host}/team/x:v1")
    push(skopeo, image, f"{server.host}/team/x:v2")
    push(skopeo, image, f"{server.host}/team/y:v1")

    # skopeo resolves the tag and deletes the manifest by digest, with every tag on it
    skopeo.delete(f"docker://{server.host}/team/x:v1")
    assert server.requests("manifests", "DELETE", 202) == 1
    for ref in ("team/x:v1", "team/x:v2", f"team/x@{image.digest}"):
        with pytest.raises(SkopeoFailed) as failed:
            skopeo.inspect(f"docker://{server.host}/{ref}")
        assert "manifest unknown" in failed.value.stderr, failed.value.stderr
    assert skopeo.list_tags(f"docker://{server.host}/team/x") == []

    # the other repository still has the image, and every blob of it
    assert skopeo.inspect(f"docker://{server.host}/team/y:v1")["Digest"] == image.digest
    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/y:v1", out) == image.digest
    assert_same_blobs(out, image)

    # deleting it again is an error, not a silent success
    with pytest.raises(SkopeoFailed):
        skopeo.delete(f"docker://{server.host}/team/x@{image.digest}")
