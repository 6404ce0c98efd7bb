"""Small, real OCI image layouts on disk, in the format skopeo's ``oci:`` transport reads.

Layers are real tar archives (made with :mod:`tarfile`) compressed with gzip or zstd; each
config lists the sha256 of its layers' *uncompressed* tars as ``rootfs.diff_ids``, the way
a build tool writes them, so a client that checks diff_ids (or converts layers) sees a
consistent image. Everything is deterministic: the same call writes the same bytes.

:func:`reachable` and :func:`verify_layout` read a layout back (ours, or one a client
pulled) and check it blob by blob.

Plain functions and classes only: fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
KIB, MIB = 1 << 10, 1 << 20


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def payload(label: str, size: int, *, compressible: bool = False) -> bytes:
    """``size`` deterministic bytes, different per label: random (incompressible), or
    text-like lines that gzip and zstd shrink a few times over."""
    if not compressible:
        return hashlib.shake_256(label.encode()).digest(size)
    words = [hashlib.sha256(f"{label}/{i}".encode()).hexdigest()[: 3 + i % 9]
             for i in range(512)]
    out, n, i = [], 0, 0
    while n < size:
        line = f"{i} " + " ".join(words[(i * 7 + j * j * 13) % len(words)] for j in range(12)) + "\n"
        out.append(line)
        n += len(line)
        i += 1
    return "".join(out).encode()[:size]


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """A reproducible tar: sorted entries, parent directories first, fixed owner, mode, time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


def compress(tar: bytes, compression: str) -> tuple[bytes, str]:
    """The layer bytes and media type for ``tar`` under ``compression`` (gzip, zstd, none)."""
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0), LAYER_GZIP
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar), LAYER_ZSTD
    if compression == "none":
        return tar, LAYER_TAR
    raise ValueError(f"unknown compression {compression!r}")


def decompress(data: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(data)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class Layout:
    """An OCI image layout directory being written: blobs, ``oci-layout``, ``index.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self._tags: list[dict[str, Any]] = []

    def put(self, data: bytes, media_type: str) -> dict[str, Any]:
        """Store ``data`` as a blob; its descriptor."""
        digest = sha256(data)
        path = self.root / "blobs" / "sha256" / digest[7:]
        if not path.exists():
            path.write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def tag(self, descriptor: dict[str, Any], tag: str) -> None:
        """List ``descriptor`` in ``index.json`` under ``tag`` (what ``oci:DIR:TAG`` finds)."""
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {REF_NAME: tag}
        self._tags.append(entry)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self._tags}
        (self.root / "index.json").write_bytes(canonical(index))

    def image(self, tars: list[bytes], *, compression: str = "gzip", os_: str = "linux",
              arch: str = "amd64", label: str = "") -> dict[str, Any]:
        """An image manifest over ``tars`` (uncompressed layer tars); its descriptor,
        with the platform set (for an index to use)."""
        layers = [self.put(*compress(t, compression)) for t in tars]
        config = {
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": os_,
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"test.label": label}},
            "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t in tars]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                        for i in range(len(tars))],
        }
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": self.put(canonical(config), OCI_CONFIG), "layers": layers}
        descriptor = self.put(canonical(manifest), OCI_MANIFEST)
        descriptor["platform"] = {"architecture": arch, "os": os_}
        return descriptor

    def index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        return self.put(canonical(doc), OCI_INDEX)


@dataclass(frozen=True)
class Image:
    """A layout on disk and what was put in it."""

    layout: Path
    tag: str
    digest: str  #: the tagged manifest or index
    media_type: str
    blobs: dict[str, int]  #: every blob reachable from the tag: digest -> size

    @property
    def ref(self) -> str:
        """The skopeo reference of the tagged image."""
        return f"oci:{self.layout}:{self.tag}"


def _finish(layout: Layout, descriptor: dict[str, Any], tag: str) -> Image:
    layout.tag(descriptor, tag)
    blobs = {d: desc["size"] for d, desc in reachable(layout.root, descriptor["digest"]).items()}
    return Image(layout.root, tag, descriptor["digest"], descriptor["mediaType"], blobs)


def single_image(root: Path, tag: str = "v1") -> Image:
    """One image: three gzip layers (random 3 MiB, text 2 MiB, a few small files)."""
    lay = Layout(root)
    tars = [
        tar_bytes({"opt/big.bin": payload("single/big", 3 * MIB)}),
        tar_bytes({"usr/share/doc/notes.txt": payload("single/text", 2 * MIB, compressible=True)}),
        tar_bytes({"etc/hostname": b"casengine\n", "etc/motd": b"hello\n",
                   "bin/tool": payload("single/tool", 40 * KIB)}),
    ]
    return _finish(lay, lay.image(tars, label="single"), tag)


def multi_platform(root: Path, tag: str = "v1") -> tuple[Image, str]:
    """An index of linux/amd64 and linux/arm64 images that share their base layer; the
    image and the digest of that shared (gzip) base layer."""
    lay = Layout(root)
    base = tar_bytes({"lib/base.so": payload("multi/base", 2 * MIB),
                      "etc/os-release": b"ID=test\n"})
    amd = lay.image([base, tar_bytes({"bin/app": payload("multi/amd64", MIB)})],
                    arch="amd64", label="amd64")
    arm = lay.image([base, tar_bytes({"bin/app": payload("multi/arm64", MIB)})],
                    arch="arm64", label="arm64")
    base_digest = sha256(compress(base, "gzip")[0])
    return _finish(lay, lay.index([amd, arm]), tag), base_digest


def zstd_image(root: Path, tag: str = "v1") -> Image:
    """One image whose layers are ``tar+zstd``."""
    lay = Layout(root)
    tars = [
        tar_bytes({"opt/data.bin": payload("zstd/random", 2 * MIB)}),
        tar_bytes({"srv/log.txt": payload("zstd/text", 2 * MIB, compressible=True)}),
    ]
    return _finish(lay, lay.image(tars, compression="zstd", label="zstd"), tag)


# -- reading a layout back ---------------------------------------------------------------------


def blob_path(root: Path, digest: str) -> Path:
    algorithm, hexdigest = digest.split(":", 1)
    return Path(root) / "blobs" / algorithm / hexdigest


def read_json(root: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(root, digest).read_bytes())


def tagged(root: Path, tag: str) -> dict[str, Any]:
    """The descriptor ``index.json`` lists under ``tag``."""
    index = json.loads((Path(root) / "index.json").read_bytes())
    found = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == tag]
    assert len(found) == 1, f"{root}/index.json lists {len(found)} manifests tagged {tag!r}"
    return found[0]


def reachable(root: Path, digest: str) -> dict[str, dict[str, Any]]:
    """Every blob reachable from the manifest or index ``digest``: digest -> descriptor."""
    seen: dict[str, dict[str, Any]] = {}

    def visit(desc: dict[str, Any]) -> None:
        if desc["digest"] in seen:
            return
        seen[desc["digest"]] = desc
        if desc["mediaType"] in INDEX_TYPES:
            for m in read_json(root, desc["digest"])["manifests"]:
                visit(m)
        elif desc["mediaType"] in MANIFEST_TYPES:
            doc = read_json(root, desc["digest"])
            for d in (doc["config"], *doc["layers"]):
                visit(d)

    top = json.loads(blob_path(root, digest).read_bytes())
    visit({"mediaType": top["mediaType"], "digest": digest,
           "size": blob_path(root, digest).stat().st_size})
    return seen


def layer_digests(root: Path, digest: str) -> set[str]:
    """The layers of every image reachable from ``digest``."""
    return {layer["digest"] for d, desc in reachable(root, digest).items()
            if desc["mediaType"] in MANIFEST_TYPES for layer in read_json(root, d)["layers"]}


def verify_layout(root: Path, digest: str) -> dict[str, dict[str, Any]]:
    """Check everything reachable from ``digest``: each blob's bytes hash to its name and
    have its descriptor's size, and each image's layers decompress to the tars its config
    names in ``rootfs.diff_ids``. Returns :func:`reachable`'s map."""
    blobs = reachable(root, digest)
    for d, desc in blobs.items():
        data = blob_path(root, d).read_bytes()
        assert sha256(data) == d, f"blob {d} in {root} has the bytes of {sha256(data)}"
        assert len(data) == desc["size"], f"blob {d}: {len(data)} bytes, descriptor says {desc['size']}"
    for d, desc in blobs.items():
        if desc["mediaType"] not in MANIFEST_TYPES:
            continue
        manifest = read_json(root, d)
        config = read_json(root, manifest["config"]["digest"])
        diff_ids = [sha256(decompress(blob_path(root, layer["digest"]).read_bytes(),
                                      layer["mediaType"])) for layer in manifest["layers"]]
        assert diff_ids == config["rootfs"]["diff_ids"], f"manifest {d}: layers do not match diff_ids"
    return blobs


def layout_files(root: Path) -> dict[str, int]:
    """Every file under ``blobs/`` of a layout, as digest -> size (what a pull wrote)."""
    out = {}
    for algorithm in sorted(os.listdir(Path(root) / "blobs")):
        for name in sorted(os.listdir(Path(root) / "blobs" / algorithm)):
            out[f"{algorithm}:{name}"] = (Path(root) / "blobs" / algorithm / name).stat().st_size
    return out
