"""Image builders and audits for the registry-model tests.

Blobs are deterministic bytes; manifests and indexes are built as the *exact* bytes a
client would push (deliberately not in ``json.dumps`` default form: an odd indent and key
order, so any re-serialisation by the registry would change the digest and be caught).

Plain functions and classes only: fixtures live in the test modules.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from casengine.engine import Engine
from casengine.layout import REPOSITORIES
from casengine.registry import Registry
from casengine.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.helpers import digest_of

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

#: The per-repository tables of the index, keyed ``repo \0 ...``.
REPO_TABLES = ("links", "manifests", "tags", "refs", "referrers")


def data(label: str, size: int) -> bytes:
    """``size`` deterministic bytes, different per label."""
    return hashlib.shake_256(label.encode()).digest(size) if size else b""


def encode(doc: dict[str, Any]) -> bytes:
    """The exact bytes of a manifest as a (slightly unusual) client would send them."""
    return json.dumps(doc, indent=3).encode() + b"\n"


@dataclass(frozen=True)
class Blob:
    content: bytes
    media_type: str = OCI_LAYER

    @property
    def digest(self) -> str:
        return digest_of(self.content)

    @property
    def size(self) -> int:
        return len(self.content)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def __repr__(self) -> str:  # short, for hypothesis' reports
        return f"Blob({self.digest[7:19]}, {self.size} bytes, {self.media_type.rsplit('.', 1)[-1]})"


def layer(label: str, size: int = 100, media_type: str = OCI_LAYER) -> Blob:
    return Blob(data(f"layer-{label}", size), media_type)


def config(label: str, media_type: str = OCI_CONFIG, **fields: Any) -> Blob:
    body = {"architecture": "amd64", "os": "linux", "label": label, **fields}
    return Blob(json.dumps(body, sort_keys=True).encode(), media_type)


@dataclass(frozen=True)
class Manifest:
    """A manifest's exact bytes and what was used to build it."""

    content: bytes
    media_type: str
    blobs: tuple[Blob, ...] = ()  #: config first, then layers (empty for an index)
    children: tuple[Manifest, ...] = field(default=())

    @property
    def digest(self) -> str:
        return digest_of(self.content)

    @property
    def size(self) -> int:
        return len(self.content)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def __repr__(self) -> str:
        return f"Manifest({self.digest[7:19]}, {self.size} bytes, {self.media_type})"


def image_doc(cfg: Blob, layers: list[Blob], *, media_type: str | None = OCI_MANIFEST,
              **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"schemaVersion": 2}
    if media_type is not None:
        doc["mediaType"] = media_type
    doc["config"] = cfg.descriptor()
    doc["layers"] = [b.descriptor() for b in layers]
    doc.update(extra)
    return doc


def oci_manifest(cfg: Blob, layers: list[Blob], *, with_media_type: bool = True,
                 subject: Manifest | None = None, artifact_type: str | None = None,
                 annotations: dict[str, str] | None = None) -> Manifest:
    extra: dict[str, Any] = {}
    if artifact_type is not None:
        extra["artifactType"] = artifact_type
    if subject is not None:
        extra["subject"] = subject.descriptor()
    if annotations is not None:
        extra["annotations"] = annotations
    doc = image_doc(cfg, layers, media_type=OCI_MANIFEST if with_media_type else None, **extra)
    return Manifest(encode(doc), OCI_MANIFEST, (cfg, *layers))


def docker_manifest(cfg: Blob, layers: list[Blob]) -> Manifest:
    doc = image_doc(cfg, layers, media_type=DOCKER_MANIFEST)
    return Manifest(encode(doc), DOCKER_MANIFEST, (cfg, *layers))


PLATFORMS = [{"architecture": "amd64", "os": "linux"},
             {"architecture": "arm64", "os": "linux", "variant": "v8"}]


def index(children: list[Manifest], *, docker: bool = False, with_media_type: bool = True,
          subject: Manifest | None = None, artifact_type: str | None = None) -> Manifest:
    media_type = DOCKER_LIST if docker else OCI_INDEX
    doc: dict[str, Any] = {"schemaVersion": 2}
    if with_media_type:
        doc["mediaType"] = media_type
    if artifact_type is not None:
        doc["artifactType"] = artifact_type
    doc["manifests"] = [c.descriptor(platform=PLATFORMS[i % len(PLATFORMS)])
                        for i, c in enumerate(children)]
    if subject is not None:
        doc["subject"] = subject.descriptor()
    return Manifest(encode(doc), media_type, (), tuple(children))


def schema1_manifest(*, signed: bool = True) -> bytes:
    doc = {"schemaVersion": 1, "name": "team/app", "tag": "v1", "architecture": "amd64",
           "fsLayers": [{"blobSum": layer("s1").digest}],
           "history": [{"v1Compatibility": "{}"}]}
    if signed:
        doc["signatures"] = [{"header": {"alg": "ES256"}, "signature": "c2lnbg",
                              "protected": "e30"}]
    return encode(doc)


# -- pushing --------------------------------------------------------------------------------


def push_blobs(reg: Registry, repo: str, blobs: tuple[Blob, ...] | list[Blob]) -> None:
    for b in blobs:
        reg.ingest_blob(repo, b.content, digest=b.digest, size=b.size)


def push(reg: Registry, repo: str, m: Manifest, reference: str | None = None) -> None:
    """Push everything ``m`` needs (children first), then ``m`` under ``reference`` (its
    digest by default)."""
    for child in m.children:
        push(reg, repo, child)
    push_blobs(reg, repo, m.blobs)
    reg.put_manifest(repo, reference or m.digest, m.content, m.media_type)


def simple_image(label: str, *, base: Blob | None = None, layer_size: int = 100) -> Manifest:
    layers = [base] if base is not None else []
    layers.append(layer(label, layer_size))
    return oci_manifest(config(label), layers)


# -- looking behind the registry's back ------------------------------------------------------


def own_keys(engine: Engine, repo: str) -> list[str]:
    """Backend keys that belong to ``repo`` itself (not to ``repo/child`` repositories):
    every record of a repository sits under a part starting with '_'."""
    prefix = f"{REPOSITORIES}{repo}/"
    return sorted(k for k in engine.backend.list(prefix) if k[len(prefix):].startswith("_"))


def backend_records(engine: Engine, repo: str) -> dict[str, Any]:
    """What the backend's small objects say about ``repo``: links, manifests and tags."""
    prefix = f"{REPOSITORIES}{repo}/"
    out: dict[str, Any] = {"links": set(), "manifests": set(), "tags": {}}
    for key in own_keys(engine, repo):
        kind, _, rest = key[len(prefix):].partition("/")
        if kind == "_links":
            out["links"].add(rest.replace("/", ":", 1))
        elif kind == "_manifests":
            out["manifests"].add(rest.replace("/", ":", 1))
        elif kind == "_tags":
            out["tags"][rest] = engine.backend.get(key).decode()
    return out


def index_rows(reg: Registry, repo: str, table: str) -> dict[str, bytes]:
    """The rows of a per-repository index table, keyed by what follows ``repo \\0``."""
    with reg.index.transaction() as txn:
        return {k.split(b"\0", 1)[1].decode(): v
                for k, v in txn.scan(table, (repo + "\0").encode())}


def index_records(reg: Registry, repo: str) -> dict[str, Any]:
    """The same facts as :func:`backend_records`, from the index."""
    return {"links": set(index_rows(reg, repo, "links")),
            "manifests": set(index_rows(reg, repo, "manifests")),
            "tags": {t: v.decode() for t, v in index_rows(reg, repo, "tags").items()}}


def snapshot(reg: Registry) -> dict[str, Any]:
    """Everything the registry holds: blobs, every index table, every repository object."""
    engine = reg.engine
    with reg.index.transaction() as txn:
        tables = {t: dict(txn.scan(t)) for t in ("repos", *REPO_TABLES, "quotas")}
    return {"blobs": sorted(r.digest for r in engine.list()),
            "blob_objects": sorted(engine.backend.list("blobs/")),
            "repo_objects": sorted(engine.backend.list(REPOSITORIES)),
            "tables": tables}
