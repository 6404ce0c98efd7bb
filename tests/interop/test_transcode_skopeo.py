"""transcode against skopeo: images with real gzip tar layers pushed with skopeo, converted
(by the CLI, the Python API, or ``serve --transcode-on-push``), pulled back with skopeo.

Each pulled image is checked from the outside: every blob hashes to its name, the layers
carry the zstd media type and decompress to exactly the tars the gzip originals held
(and so to the config's diff_ids), and the config is the original one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from casengine.registry import Registry
from casengine.transcode import LAYER_ZSTD, SOURCE_ANNOTATION, transcode
from tests.helpers import run_cli
from tests.interop import images
from tests.interop.conftest import Server, Skopeo
from tests.interop.test_skopeo import pull, push

pytestmark = pytest.mark.interop


def assert_zstd_of(pulled: Path, digest: str, source: Path, source_digest: str) -> None:
    """The image ``digest`` pulled into ``pulled`` is the gzip image ``source_digest`` of the
    layout ``source`` with zstd layers of the same tars, platform by platform."""
    images.verify_layout(pulled, digest)  # blobs hash to their names; layers to diff_ids
    new, old = images.read_json(pulled, digest), images.read_json(source, source_digest)
    if old["mediaType"] in images.INDEX_TYPES:
        assert new["mediaType"] == images.OCI_INDEX
        assert new["annotations"][SOURCE_ANNOTATION] == source_digest
        assert [m["platform"] for m in new["manifests"]] == [m["platform"] for m in old["manifests"]]
        for after, before in zip(new["manifests"], old["manifests"], strict=True):
            assert_zstd_of(pulled, after["digest"], source, before["digest"])
        return
    assert new["mediaType"] == images.OCI_MANIFEST
    assert new["config"]["digest"] == old["config"]["digest"]
    assert [layer["mediaType"] for layer in new["layers"]] == [LAYER_ZSTD] * len(old["layers"])
    for after, before in zip(new["layers"], old["layers"], strict=True):
        tar = images.decompress(images.blob_path(pulled, after["digest"]).read_bytes(), LAYER_ZSTD)
        assert tar == images.decompress(images.blob_path(source, before["digest"]).read_bytes(),
                                        before["mediaType"])


def test_cli_converts_a_pushed_image(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    push(skopeo, image, f"{server.host}/team/app:v1")

    proc = run_cli(["transcode", "team/app:v1", "--json"], cwd=tmp_path,
                   env={"CASENGINE_ROOT": str(server.root)})  # beside the running server
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["tag"], report["converted"]) == ("v1-zstd", 3)

    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/app:v1-zstd", out) == report["target"]
    assert_zstd_of(out, report["target"], image.layout, image.digest)
    # the pushed tag is untouched
    assert pull(skopeo, f"{server.host}/team/app:v1", tmp_path / "orig") == image.digest


def test_multi_platform_index_converts_as_a_whole(skopeo: Skopeo, server: Server,
                                                  tmp_path: Path) -> None:
    image, _ = images.multi_platform(tmp_path / "src")
    push(skopeo, image, f"{server.host}/team/multi:v1", "--all")
    with server.engine() as engine:
        report = transcode(Registry(engine), "team/multi", "v1")
    assert (report.count("converted"), report.manifests) == (3, 3)

    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/multi:v1-zstd", out, "--all") == report.target
    assert_zstd_of(out, report.target, image.layout, image.digest)
    for arch in ("amd64", "arm64"):
        info = skopeo.inspect(f"docker://{server.host}/team/multi:v1-zstd", arch=arch)
        assert info["Architecture"] == arch


def test_docker_schema2_becomes_oci(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    skopeo.copy(image.ref, f"docker://{server.host}/team/docker:v1", "--format", "v2s2",
                preserve_digests=False)
    raw = json.loads(skopeo.inspect_raw(f"docker://{server.host}/team/docker:v1"))
    assert raw["mediaType"] == images.DOCKER_MANIFEST

    with server.engine() as engine:
        report = transcode(Registry(engine), "team/docker", "v1")
    new = json.loads(skopeo.inspect_raw(f"docker://{server.host}/team/docker:v1-zstd"))
    assert new["mediaType"] == images.OCI_MANIFEST
    assert new["config"] == {**raw["config"], "mediaType": "application/vnd.oci.image.config.v1+json"}
    out = tmp_path / "pulled"
    assert pull(skopeo, f"{server.host}/team/docker:v1-zstd", out) == report.target
    assert_zstd_of(out, report.target, image.layout, image.digest)


def wait_for_tag(server: Server, repo: str, tag: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{server.url}/v2/{repo}/tags/list", timeout=10)
        if tag in (response.json().get("tags") or []):
            return
        time.sleep(0.1)
    raise AssertionError(f"{repo}:{tag} did not appear in {timeout} s:\n{server.log_text()}")


@pytest.mark.parametrize("server", [["--transcode-on-push", "zstd"]], indirect=True)
def test_transcode_on_push(skopeo: Skopeo, server: Server, tmp_path: Path) -> None:
    zstd = images.zstd_image(tmp_path / "zstd")
    push(skopeo, zstd, f"{server.host}/team/z:v1")  # nothing to convert: no v1-zstd
    image, _ = images.multi_platform(tmp_path / "src")
    push(skopeo, image, f"{server.host}/team/app:v1", "--all")
    wait_for_tag(server, "team/app", "v1-zstd")

    assert sorted(skopeo.list_tags(f"docker://{server.host}/team/app")) == ["v1", "v1-zstd"]
    assert skopeo.list_tags(f"docker://{server.host}/team/z") == ["v1"]  # (queued first)
    out = tmp_path / "pulled"
    digest = pull(skopeo, f"{server.host}/team/app:v1-zstd", out, "--all")
    assert_zstd_of(out, digest, image.layout, image.digest)
    assert pull(skopeo, f"{server.host}/team/app:v1", tmp_path / "orig", "--all") == image.digest

    # a push of another tag of the same image converts nothing again and tags it too
    with server.engine() as engine:
        blobs = engine.index.count_blobs()
    push(skopeo, image, f"{server.host}/team/app:v2", "--all")
    wait_for_tag(server, "team/app", "v2-zstd")
    with server.engine() as engine:
        assert engine.index.count_blobs() == blobs
        registry = Registry(engine)
        tags = registry.tag_map("team/app")
        assert tags["v2-zstd"] == tags["v1-zstd"] == digest
        assert tags["v1"] == tags["v2"] == image.digest
