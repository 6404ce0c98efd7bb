"""Manifests: parse the exact bytes a client pushed, and find what they refer to.

Accepted: OCI image manifest and index, Docker schema 2 manifest and manifest list.
Refused with a clear error: Docker schema 1, and anything else. The bytes are never
re-serialised: their digest is the digest of what the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from casengine.digest import Digest
from casengine.errors import InvalidDigest, ManifestInvalid, ManifestTooLarge, Unsupported

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
SUPPORTED = (*MANIFEST_TYPES, *INDEX_TYPES)

#: Layers a client may legitimately not push (they live elsewhere, named by URL).
FOREIGN_LAYERS = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

DEFAULT_MAX_SIZE = 4 << 20
OCI_EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    urls: tuple[str, ...] = ()
    platform: dict[str, Any] | None = None

    @property
    def foreign(self) -> bool:
        return self.media_type in FOREIGN_LAYERS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                               "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a manifest says, beside its exact bytes."""

    media_type: str
    digest: Digest
    size: int
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    children: tuple[Descriptor, ...] = ()  #: index entries: manifests this index lists
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = field(default=None)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Config and layers: the blobs that must be in the repository."""
        return ((self.config,) if self.config else ()) + self.layers

    def referrer_descriptor(self) -> dict[str, Any]:
        """This manifest as the referrers API lists it."""
        artifact = self.artifact_type or (self.config.media_type if self.config else None)
        return Descriptor(self.media_type, self.digest, self.size, artifact,
                          self.annotations).to_json()


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestInvalid(f"{where} is not a descriptor object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where} has no mediaType")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where} has no valid size")
    try:
        parsed = Digest.parse(digest)
    except InvalidDigest as exc:
        raise ManifestInvalid(f"{where}: {exc}") from exc
    annotations = _string_map(obj.get("annotations"), f"{where}.annotations")
    artifact_type = _optional_string(obj.get("artifactType"), f"{where}.artifactType")
    urls = obj.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid(f"{where}.urls is not a list of strings")
    platform = obj.get("platform")
    return Descriptor(media_type, parsed, size, artifact_type, annotations, tuple(urls),
                      platform if isinstance(platform, dict) else None)


def _media_type(doc: dict[str, Any], content_type: str | None) -> str:
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    header = (content_type or "").split(";")[0].strip() or None
    if declared in DOCKER_SCHEMA1 or header in DOCKER_SCHEMA1:
        raise Unsupported("Docker schema 1 manifests are not supported: push schema 2 or OCI")
    if declared and header and declared != header and header != "application/json":
        raise ManifestInvalid(
            f"the manifest says mediaType {declared!r} but was sent as {header!r}")
    media_type = declared or header
    if media_type is None or media_type == "application/json":
        # OCI allows mediaType to be absent: tell the two OCI kinds apart by their fields
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type not in SUPPORTED:
        raise ManifestInvalid(f"unsupported manifest media type {media_type!r}")
    return media_type


def _string_map(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not (isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise ManifestInvalid(f"{where} is not a string map")
    return value


def _optional_string(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ManifestInvalid(f"{where} must be a string")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_manifest(data: bytes, content_type: str | None = None, *,
                   max_size: int = DEFAULT_MAX_SIZE, algorithm: str = "sha256") -> Manifest:
    """Validate ``data`` as a manifest and return what it refers to.

    ``algorithm`` is the digest algorithm the manifest is addressed by (sha256 unless it
    was pushed by a digest of another algorithm).
    """
    if len(data) > max_size:
        raise ManifestTooLarge(f"manifest of {len(data)} bytes is over the {max_size} byte limit")
    try:
        # JSON as RFC 8259 has it, which other clients parse: UTF-8 without a BOM (given
        # bytes, json.loads would also take UTF-16 and UTF-32), and no NaN or Infinity
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as exc:  # bad JSON or UTF-8, and ints of more than 4300 digits
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc
    except RecursionError:  # a few thousand nested brackets fit well within the size limit
        raise ManifestInvalid("manifest is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid("manifest is not a JSON object")
    version = doc.get("schemaVersion")
    if version == 1 and not isinstance(version, bool):
        raise Unsupported("Docker schema 1 manifests are not supported: push schema 2 or OCI")
    if type(version) is not int or version != 2:
        raise ManifestInvalid("manifest schemaVersion must be 2 (the integer)")
    media_type = _media_type(doc, content_type)
    subject = _descriptor(doc["subject"], "subject") if doc.get("subject") is not None else None
    common = {"media_type": media_type, "digest": Digest.of(data, algorithm), "size": len(data),
              "subject": subject,
              "artifact_type": _optional_string(doc.get("artifactType"), "artifactType"),
              "annotations": _string_map(doc.get("annotations"), "annotations")}
    if media_type in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestInvalid("an index needs a 'manifests' list")
        children = tuple(_descriptor(m, f"manifests[{i}]") for i, m in enumerate(entries))
        return Manifest(children=children, **common)
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestInvalid("an image manifest needs a 'layers' list")
    config = _descriptor(doc.get("config"), "config")
    parsed = tuple(_descriptor(layer, f"layers[{i}]") for i, layer in enumerate(layers))
    return Manifest(config=config, layers=parsed, **common)
