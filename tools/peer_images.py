"""The peer benchmark's images: OCI layouts with random, per-round salted layers, for
skopeo's ``oci:`` transport, and the check that a pulled layout holds what was pushed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB, MiB = 1 << 10, 1 << 20
TAG = "v1"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
# the bytes are random, not gzip: registries never look inside layers, and skopeo copies
# them untouched with --preserve-digests
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Layout:
    root: Path
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, every object
    top: str = ""

    def put(self, data: bytes, media_type: str) -> dict[str, Any]:
        d = sha256(data)
        path = self.root / "blobs" / "sha256" / d.split(":", 1)[1]
        if d not in self.blobs:
            path.write_bytes(data)
            self.blobs[d] = len(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    @property
    def nbytes(self) -> int:
        return sum(self.blobs.values())


class Images:
    """Random layer bytes made once; each round salts the first 32 bytes of every layer, so
    every round's push has new digests and uploads every byte."""

    def __init__(self, runid: str) -> None:
        self.runid = runid
        self.base: dict[str, bytes] = {}

    def layer(self, key: str, size: int, salt: str) -> bytes:
        if key not in self.base:
            self.base[key] = os.urandom(size)
        s = hashlib.sha256(f"{self.runid}:{salt}:{key}".encode()).digest()
        return s + self.base[key][len(s):]

    def _image(self, lay: Layout, layers: list[bytes], arch: str, salt: str) -> dict[str, Any]:
        ldescs = [lay.put(b, MT_LAYER) for b in layers]
        cfg = {"architecture": arch, "os": "linux", "config": {"Labels": {"bench.salt": salt}},
               "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in ldescs]}}
        man = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
               "config": lay.put(canon(cfg), MT_CONFIG), "layers": ldescs}
        return lay.put(canon(man), MT_MANIFEST)

    def build(self, scenario: str, root: Path, salt: str) -> Layout:
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        lay = Layout(root)
        if scenario == "skopeo-big":
            top = self._image(lay, [self.layer(f"big{i}", 64 * MiB, salt) for i in range(4)],
                              "amd64", salt)
        elif scenario == "skopeo-many":
            top = self._image(lay, [self.layer(f"many{i}", 16 * KiB, salt) for i in range(200)],
                              "amd64", salt)
        elif scenario == "skopeo-multiarch":
            shared = self.layer("multi-base", 16 * MiB, salt)
            manifests = []
            for arch in ("amd64", "arm64"):
                desc = self._image(lay, [shared, self.layer(f"multi-{arch}", 8 * MiB, salt)],
                                   arch, salt)
                manifests.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
            top = lay.put(canon({"schemaVersion": 2, "mediaType": MT_INDEX,
                                 "manifests": manifests}), MT_INDEX)
        else:
            raise ValueError(scenario)
        lay.top = top["digest"]
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
            {**top, "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
        (root / "index.json").write_bytes(canon(index))
        return lay


def verify_layout(expected: Layout, root: Path) -> str | None:
    """None if the pulled layout at ``root`` holds the same top digest and every object,
    each hashing to its name; else what is wrong."""
    try:
        index = json.loads((root / "index.json").read_bytes())
        top = index["manifests"][0]["digest"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return f"unreadable pulled layout: {exc}"
    if top != expected.top:
        return f"top digest {top}, pushed {expected.top}"
    for d, size in expected.blobs.items():
        path = root / "blobs" / "sha256" / d.split(":", 1)[1]
        h, n = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
                    n += len(block)
        except OSError:
            return f"{d} missing from the pull"
        if n != size or "sha256:" + h.hexdigest() != d:
            return f"{d} pulled with the wrong content ({n} bytes)"
    return None
