"""transcode through the Python API and the CLI, on real images with real gzip tar layers.

Images are OCI layouts built by :mod:`tests.interop.images` (tars made with tarfile,
gzipped, configs naming their diff_ids), loaded into a local root with the registry API;
tests/interop/test_transcode_skopeo.py pushes and pulls them with skopeo instead.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from pathlib import Path

import pytest
import zstandard

from casengine.check import Checker
from casengine.engine import Engine
from casengine.errors import DecompressionBomb, IntegrityError, LayerInvalid
from casengine.gc import Collector
from casengine.recompress import OUT_CHUNK, GzipToZstd, Limits
from casengine.registry import Registry
from casengine.transcode import (
    LAYER_ZSTD,
    SOURCE_ANNOTATION,
    lookup,
    made_by_transcode,
    needs_transcode,
    transcode,
)
from tests.helpers import one_line_error, run_cli
from tests.interop import images

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


# -- building and loading images --------------------------------------------------------------


def load(registry: Registry, layout: Path, digest: str, repo: str, tag: str) -> None:
    """Push everything reachable from ``digest`` in ``layout`` to ``repo:tag`` (blobs,
    then manifests children first), as a client would."""
    blobs = images.reachable(layout, digest)
    kinds = images.MANIFEST_TYPES + images.INDEX_TYPES
    for d, desc in blobs.items():
        if desc["mediaType"] not in kinds:
            registry.ingest_blob(repo, images.blob_path(layout, d))
    for d, desc in reversed(blobs.items()):  # reachable() lists parents before children
        if desc["mediaType"] in kinds:
            data = images.blob_path(layout, d).read_bytes()
            registry.put_manifest(repo, tag if d == digest else d, data, desc["mediaType"])


def image_of(layout: Path, layers: list[tuple[bytes, str]], *, config_type: str = images.OCI_CONFIG,
             manifest_type: str = images.OCI_MANIFEST,
             diff_ids: list[str] | None = None) -> dict:
    """A manifest over already compressed ``layers`` (bytes, media type); its descriptor."""
    lay = images.Layout(layout)
    if diff_ids is None:
        diff_ids = [images.sha256(images.decompress(data, mt)) for data, mt in layers]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": manifest_type,
                "config": lay.put(images.canonical(config), config_type),
                "layers": [lay.put(data, mt) for data, mt in layers]}
    return lay.put(images.canonical(manifest), manifest_type)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


@pytest.fixture
def registry(tmp_path: Path):
    with Engine.open(str(tmp_path / "root")) as engine:
        yield Registry(engine)


def manifest_of(registry: Registry, repo: str, ref: str) -> dict:
    data, _ = registry.get_manifest(repo, ref)
    return json.loads(data)


def tar_of(registry: Registry, digest: str, media_type: str) -> bytes:
    return images.decompress(registry.engine.read_bytes(digest), media_type)


def assert_converted(registry: Registry, repo: str, source: str, target: str) -> None:
    """``target`` is ``source`` with each gzip layer as zstd of exactly the same tar, the
    config unchanged, and an annotation naming the source."""
    old, new = manifest_of(registry, repo, source), manifest_of(registry, repo, target)
    assert new["mediaType"] == images.OCI_MANIFEST
    assert new["config"]["digest"] == old["config"]["digest"]
    assert new["config"]["mediaType"] == images.OCI_CONFIG
    assert new["annotations"][SOURCE_ANNOTATION] == source
    assert len(new["layers"]) == len(old["layers"])
    for before, after in zip(old["layers"], new["layers"], strict=True):
        if before["mediaType"].endswith("gzip") and before["mediaType"] != OCI_NONDIST:
            assert after["mediaType"] == LAYER_ZSTD
            assert registry.is_linked(repo, after["digest"])
            data = registry.engine.read_bytes(after["digest"])
            assert after["size"] == len(data) and images.sha256(data) == after["digest"]
            assert tar_of(registry, after["digest"], LAYER_ZSTD) == \
                tar_of(registry, before["digest"], before["mediaType"])
        else:
            assert after["digest"] == before["digest"]


# -- the stream --------------------------------------------------------------------------------


def test_stream_decodes_every_member_and_padding() -> None:
    """Concatenated gzip members (pigz, appended layers) and zero padding are one tar."""
    parts = [images.payload(f"m{i}", 300_000, compressible=True) for i in range(3)]
    source = gz(parts[0]) + gz(parts[1]) + b"\0" * 1000 + gz(parts[2])
    chunks = [source[i:i + 4096] for i in range(0, len(source), 4096)]
    stream = GzipToZstd(chunks)
    out = b"".join(stream)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(out) == b"".join(parts)
    assert stream.diff_id == images.sha256(b"".join(parts))
    assert (stream.bytes_in, stream.bytes_out, stream.size) == (len(source), len(out),
                                                               900_000)


@pytest.mark.parametrize(("data", "why"), [
    (b"", "empty"),
    (b"not gzip at all" * 100, "not valid gzip"),
    (gz(b"x" * 100_000)[:-9], "truncated"),
    (gz(b"x" * 100_000)[:20] + bytes(range(256)) * 50, "not valid gzip"),
])
def test_stream_refuses_broken_gzip(data: bytes, why: str) -> None:
    with pytest.raises(LayerInvalid, match=why):
        b"".join(GzipToZstd([data]))


def test_stream_stops_a_bomb_early() -> None:
    bomb = gz(bytes(64 << 20))  # 64 KiB of gzip
    read = []
    with pytest.raises(DecompressionBomb, match="more than 1048576 bytes"):
        b"".join(GzipToZstd([bomb[i:i + 1024] for i in range(0, len(bomb), 1024)],
                            limits=Limits(max_size=1 << 20), on_read=read.append))
    assert sum(read) < len(bomb)  # stopped before the end of the input
    with pytest.raises(DecompressionBomb, match="expands more than 100 times"):
        b"".join(GzipToZstd([bomb], limits=Limits(max_ratio=100, ratio_after=1 << 20)))
    # the same zeros are fine under the default limits (a small layer of zeros is legitimate)
    assert len(b"".join(GzipToZstd([bomb]))) < 64 << 10


def test_stream_steps_are_bounded_whatever_the_ratio() -> None:
    """I6: one 64 KiB chunk of gzip that expands to 64 MiB comes out in pieces of at most
    OUT_CHUNK, so no stage ever holds a whole layer."""
    stream = GzipToZstd([gz(bytes(64 << 20))])
    sizes = [len(piece) for piece in stream._gunzip(hashlib.sha256())]
    assert sum(sizes) == 64 << 20 and max(sizes) <= OUT_CHUNK and len(sizes) >= 16


# -- images ------------------------------------------------------------------------------------


def test_single_image(registry: Registry, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    seen: list[tuple[str, int]] = []
    report = transcode(registry, "team/app", "v1", progress=lambda e, n: seen.append((e, n)))

    assert report.tag == "v1-zstd" and report.count("converted") == 3
    assert registry.tag_map("team/app") == {"v1": image.digest, "v1-zstd": report.target}
    assert_converted(registry, "team/app", image.digest, report.target)
    assert report.source == image.digest and report.manifests == 1
    assert made_by_transcode(registry, "team/app", "v1-zstd")
    assert not made_by_transcode(registry, "team/app", "v1")
    gzip_bytes = sum(size for d, size in image.blobs.items()
                     if d in {la["digest"] for la in manifest_of(registry, "team/app", "v1")["layers"]})
    assert seen[0] == ("total", gzip_bytes)
    assert sum(n for e, n in seen if e == "read") == gzip_bytes == report.bytes_in
    for layer in report.layers:
        assert layer.diff_id == images.sha256(tar_of(registry, layer.target, LAYER_ZSTD))
        assert layer.bytes_out == registry.engine.stat(layer.target).size
    assert not needs_transcode(registry, "team/app", "v1-zstd")
    assert needs_transcode(registry, "team/app", "v1")
    assert Checker(registry, full=True).run().clean


def test_multi_platform_index(registry: Registry, tmp_path: Path) -> None:
    image, base = images.multi_platform(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/multi", "v1")
    report = transcode(registry, "team/multi", f"{image.digest}", tag="fast", level=5)

    assert report.tag == "fast" and report.manifests == 3
    assert report.count("converted") == 3  # the shared base once, and each platform's own
    assert [layer.source for layer in report.layers].count(base) == 1
    old, new = manifest_of(registry, "team/multi", image.digest), \
        manifest_of(registry, "team/multi", "fast")
    assert new["mediaType"] == images.OCI_INDEX
    assert new["annotations"][SOURCE_ANNOTATION] == image.digest
    assert [m["platform"] for m in new["manifests"]] == [m["platform"] for m in old["manifests"]]
    for before, after in zip(old["manifests"], new["manifests"], strict=True):
        assert after["size"] == registry.engine.stat(after["digest"]).size
        assert_converted(registry, "team/multi", before["digest"], after["digest"])
    assert lookup(registry, base, 5)["diff_id"] == \
        images.sha256(tar_of(registry, base, images.LAYER_GZIP))
    assert lookup(registry, base, 3) is None


def test_docker_manifest_and_list_become_oci(registry: Registry, tmp_path: Path) -> None:
    tars = [images.tar_bytes({"a": images.payload("d/a", 200_000, compressible=True)}),
            images.tar_bytes({"b": images.payload("d/b", 100_000)})]
    child = image_of(tmp_path / "src", [(gz(t), DOCKER_GZIP) for t in tars],
                     config_type=DOCKER_CONFIG, manifest_type=images.DOCKER_MANIFEST)
    lay = images.Layout(tmp_path / "src")
    top = lay.put(images.canonical({"schemaVersion": 2, "mediaType": images.DOCKER_LIST,
                                    "manifests": [{**child, "platform": {
                                        "architecture": "amd64", "os": "linux"}}]}),
                  images.DOCKER_LIST)
    load(registry, tmp_path / "src", top["digest"], "team/docker", "v1")
    report = transcode(registry, "team/docker", "v1")

    new = manifest_of(registry, "team/docker", "v1-zstd")
    assert new["mediaType"] == images.OCI_INDEX and report.media_type == images.OCI_INDEX
    assert new["manifests"][0]["mediaType"] == images.OCI_MANIFEST
    assert_converted(registry, "team/docker", child["digest"], new["manifests"][0]["digest"])
    assert registry.resolve("team/docker", "v1-zstd").media_type == images.OCI_INDEX


def test_kept_layers_and_artifacts(registry: Registry, tmp_path: Path) -> None:
    """Uncompressed, zstd and non-distributable layers stay; an artifact in an index stays."""
    tar = images.tar_bytes({"x": b"x" * 5000})
    zst = zstandard.ZstdCompressor().compress(tar)
    img = image_of(tmp_path / "src", [(tar, images.LAYER_TAR), (zst, LAYER_ZSTD),
                                      (gz(tar), OCI_NONDIST), (gz(tar), images.LAYER_GZIP)])
    lay = images.Layout(tmp_path / "src")
    artifact = lay.put(images.canonical({
        "schemaVersion": 2, "mediaType": images.OCI_MANIFEST,
        "config": lay.put(b"{}", "application/vnd.oci.empty.v1+json"),
        "layers": [lay.put(gz(b"chart"), images.LAYER_GZIP)]}), images.OCI_MANIFEST)
    top = lay.index([img, artifact])
    load(registry, tmp_path / "src", top["digest"], "team/kept", "v1")
    report = transcode(registry, "team/kept", "v1")

    assert [layer.action for layer in report.layers] == ["kept", "kept", "kept", "converted"]
    new = manifest_of(registry, "team/kept", "v1-zstd")
    assert new["manifests"][1] == {k: v for k, v in artifact.items()}
    assert_converted(registry, "team/kept", img["digest"], new["manifests"][0]["digest"])


def test_reuse_across_images_and_after_collection(registry: Registry, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/a", "v1")
    load(registry, image.layout, image.digest, "team/b", "v1")
    first = transcode(registry, "team/a", "v1")
    blobs = registry.engine.index.count_blobs()

    again = transcode(registry, "team/a", "v1")
    other = transcode(registry, "team/b", "v1")  # another repository: dedupe across images
    for report in (again, other):
        assert (report.count("converted"), report.count("reused")) == (0, 3)
        assert report.target == first.target
    assert registry.engine.index.count_blobs() == blobs  # nothing new stored
    assert_converted(registry, "team/b", image.digest, other.target)
    assert [layer.target for layer in other.layers] == [layer.target for layer in first.layers]

    # a converted blob that is gone is converted again, not trusted
    registry.delete_repository("team/a")
    registry.delete_repository("team/b")
    Collector(registry, grace=0).run()
    assert registry.engine.index.count_blobs() == 0
    load(registry, image.layout, image.digest, "team/c", "v1")
    third = transcode(registry, "team/c", "v1")
    assert (third.count("converted"), third.count("reused")) == (3, 0)
    assert third.target == first.target  # zstd output is deterministic
    assert_converted(registry, "team/c", image.digest, third.target)


def state(registry: Registry) -> tuple:
    """Everything a failed conversion must leave as it was."""
    repos = list(registry.repositories())
    return ({r: registry.tag_map(r) for r in repos},
            sorted((r, m.digest) for r in repos for m in registry.manifests(r)))


@pytest.mark.parametrize("kind", ["bomb", "corrupt", "truncated", "diff_id"])
def test_bad_layer_leaves_nothing_behind(registry: Registry, tmp_path: Path, kind: str) -> None:
    """A good first layer, then a bad one: an error, no manifest, no tag, the bad layer's
    conversion not stored; the good layer's is unreferenced and GC reclaims it."""
    good = images.tar_bytes({"ok": images.payload("good", 100_000, compressible=True)})
    small = images.tar_bytes({"small": images.payload("small", 300_000, compressible=True)})
    zeros = images.tar_bytes({"zero": bytes(8 << 20)})
    bad, tar = {"bomb": (gz(zeros), zeros),
                "corrupt": (gz(small)[:1000] + b"\xff" * 5000 + gz(small)[6000:], small),
                "truncated": (gz(small)[:-100], small),
                "diff_id": (gz(small), b"another tar")}[kind]
    img = image_of(tmp_path / "src", [(gz(good), images.LAYER_GZIP), (bad, images.LAYER_GZIP)],
                   diff_ids=[images.sha256(good), images.sha256(tar)])
    load(registry, tmp_path / "src", img["digest"], "team/bad", "v1")
    before, blobs = state(registry), {r.digest for r in registry.engine.list()}

    error = DecompressionBomb if kind == "bomb" else LayerInvalid
    with pytest.raises(error, match="config names" if kind == "diff_id" else "layer sha256:"):
        transcode(registry, "team/bad", "v1", limits=Limits(max_size=4 << 20))
    assert state(registry) == before
    new = {r.digest for r in registry.engine.list()} - blobs
    assert len(new) == 1  # the good layer's conversion
    assert Checker(registry, full=True).run().clean
    assert Collector(registry, grace=0).run().blobs == 1
    assert {r.digest for r in registry.engine.list()} == blobs


def test_verification_failure_publishes_nothing(registry: Registry, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """If the zstd output did not decompress to the gzip input's tar, the ingest is
    refused before anything is published (the check can fail: here the compressor lies)."""
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    blobs = registry.engine.index.count_blobs()
    real = GzipToZstd._zstd

    def lying(self: GzipToZstd, tar):
        return real(self, (chunk[:-1] + b"!" for chunk in tar))

    monkeypatch.setattr(GzipToZstd, "_zstd", lying)
    with pytest.raises(IntegrityError, match="decompresses to"):
        transcode(registry, "team/app", "v1")
    assert registry.engine.index.count_blobs() == blobs
    assert registry.tag_map("team/app") == {"v1": image.digest}


def test_nothing_to_convert_tags_the_same_image(registry: Registry, tmp_path: Path) -> None:
    image = images.zstd_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/z", "v1")
    report = transcode(registry, "team/z", "v1", tag="again")
    assert report.target == image.digest and report.manifests == 0
    assert registry.tag_map("team/z") == {"v1": image.digest, "again": image.digest}
    # the default tag only names a conversion: no v1-zstd alias of an image in zstd already
    report = transcode(registry, "team/z", "v1")
    assert (report.target, report.tag, report.manifests) == (image.digest, None, 0)
    assert registry.tag_map("team/z") == {"v1": image.digest, "again": image.digest}


# -- the command line --------------------------------------------------------------------------


def test_cli(registry: Registry, tmp_path: Path) -> None:
    image = images.single_image(tmp_path / "src")
    load(registry, image.layout, image.digest, "team/app", "v1")
    root = str(tmp_path / "root")
    registry.engine.close()
    env = {"CASENGINE_ROOT": root}
    for args, code, message in [
        (["transcode", "team/app:nope"], 3, "not found"),
        (["transcode", "team/app"], 4, "want repo:tag or repo@digest"),
        (["transcode", "team/app:v1", "--max-size", "1M"], 4, "decompresses to more than"),
        (["transcode", "team/app:v1", "--level", "30"], 2, "not in the range"),
    ]:
        proc = run_cli(args, cwd=tmp_path, env=env)
        if code == 2:  # a usage error: click's own message
            assert proc.returncode == 2 and message in proc.stderr.decode()
        else:
            assert message in one_line_error(proc, code)

    proc = run_cli(["transcode", "team/app:v1", "--to", "zstd", "--json"], cwd=tmp_path, env=env)
    assert proc.stderr == b""
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["tag"], out["converted"], out["reused"], out["kept"]) == ("v1-zstd", 3, 0, 0)
    assert out["bytes_in"] == sum(layer["bytes_in"] for layer in out["layers"])
    assert all(layer["ratio"] > 0 and layer["seconds"] >= 0 for layer in out["layers"])

    proc = run_cli(["transcode", f"team/app@{image.digest}", "--tag", "z1", "--level", "3"],
                   cwd=tmp_path, env=env)
    text = proc.stdout.decode()
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    assert f"team/app@{image.digest} -> team/app:z1 ({out['target']})" in text
    assert "0 converted, 3 reused, 0 kept" in text

    with Engine.open(root) as engine:
        reg = Registry(engine)
        assert reg.tag_map("team/app") == {"v1": image.digest, "v1-zstd": out["target"],
                                           "z1": out["target"]}
        assert_converted(reg, "team/app", image.digest, out["target"])


def pipeline_threads() -> list[str]:
    names = ("casengine-gunzip", "casengine-zstd", "casengine-verify")
    return [t.name for t in threading.enumerate() if t.name in names]


def test_stopping_early_ends_every_stage() -> None:
    """A consumer that stops (an ingest whose write failed) leaves no stage running."""
    source = gz(images.payload("early", 20 << 20))
    stream = iter(GzipToZstd([source[i:i + 65536] for i in range(0, len(source), 65536)]))
    next(stream)
    assert pipeline_threads()
    stream.close()
    assert pipeline_threads() == []


def test_failed_write_publishes_nothing(tmp_path: Path) -> None:
    from tests.helpers import FailingBackend, tmp_files

    image = images.single_image(tmp_path / "src")
    with Engine.open(str(tmp_path / "root")) as engine:
        load(Registry(engine), image.layout, image.digest, "team/app", "v1")
        blobs = engine.index.count_blobs()
        failing = Engine(FailingBackend(engine.backend, fail_after=1 << 20), engine.index)
        with pytest.raises(OSError, match="injected"):
            transcode(Registry(failing), "team/app", "v1")
        assert engine.index.count_blobs() == blobs
        assert Registry(engine).tag_map("team/app") == {"v1": image.digest}
        assert pipeline_threads() == []
        assert tmp_files(engine) == []
        assert Checker(Registry(engine)).run().clean
