"""Convert an image's gzip layers to zstd, producing a new image beside the original.

An operation over the registry model (the model never calls it). For each manifest
reachable from the reference, an index's platforms included:

- every gzip layer (OCI ``tar+gzip`` or Docker ``tar.gzip``) is streamed through
  :class:`~casengine.recompress.GzipToZstd` into a new blob of media type
  ``application/vnd.oci.image.layer.v1.tar+zstd``, verified before it is published;
- uncompressed, zstd, non-distributable (foreign) and unknown layers are kept as they are;
- Docker schema 2 manifests and lists become OCI manifests and indexes; the config blob is
  reused unchanged, since the tars, and so the ``diff_ids``, are identical;
- manifests that are not images (artifacts: their config is not an image config) are kept.

Every converted manifest carries the annotation :data:`SOURCE_ANNOTATION` naming the
manifest it was made from. Children are stored by digest, the top manifest under the new
tag (by default ``<tag>-zstd``).

A conversion is remembered in the index (table ``transcodes``: source digest and level ->
the zstd blob and the tar's digest), so a layer shared by several images or pushed again
is converted once; the record is a cache, trusted only while its blob is still stored.
A failure (corrupt gzip, a bomb, a layer that does not match its ``diff_id``) raises
before any manifest or tag is written; zstd layers already converted by the run stay
linked, unreferenced, until garbage collection reclaims them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from casengine.errors import Conflict, InvalidInput, LayerInvalid
from casengine.recompress import DEFAULT_LIMITS, GzipToZstd, Limits
from casengine.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    parse_manifest,
)
from casengine.registry.names import check_tag, is_digest

if TYPE_CHECKING:
    from casengine.registry import Registry

LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
#: gzip layers that are converted.
GZIP_LAYERS = ("application/vnd.oci.image.layer.v1.tar+gzip",
               "application/vnd.docker.image.rootfs.diff.tar.gzip")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
IMAGE_CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)
#: Docker media types kept as they are and their OCI names, for a manifest that becomes OCI.
DOCKER_TO_OCI = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    DOCKER_LIST: OCI_INDEX,
    DOCKER_CONFIG: OCI_CONFIG,
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
SOURCE_ANNOTATION = "io.casengine.transcode.source"
TARGETS = ("zstd",)
TABLE = "transcodes"
#: A config larger than this is not read to check diff_ids (I6: no big blob in memory).
MAX_CONFIG = 4 << 20

#: ``progress(event, n)``: ``("total", bytes)`` once the work is known, then ``("read", n)``
#: as gzip bytes are consumed (a reused layer counts as read at once).
Progress = Callable[[str, int], None]


@dataclass(slots=True)
class LayerReport:
    source: str
    target: str
    media_type: str  #: of the layer in the new manifest
    action: str  #: converted, reused (an earlier conversion) or kept
    bytes_in: int
    bytes_out: int
    seconds: float = 0.0
    diff_id: str | None = None  #: sha256 of the tar, for converted and reused layers

    @property
    def ratio(self) -> float:
        return self.bytes_out / self.bytes_in if self.bytes_in else 1.0


@dataclass(slots=True)
class Report:
    repository: str
    source: str  #: digest of the manifest or index converted
    target: str = ""  #: digest of the new one (the same when nothing changed)
    tag: str | None = None  #: the new tag (None: stored by digest only)
    media_type: str = ""
    layers: list[LayerReport] = field(default_factory=list)  #: each layer once
    manifests: int = 0  #: manifests and indexes written
    seconds: float = 0.0

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    @property
    def bytes_in(self) -> int:
        return sum(layer.bytes_in for layer in self.layers if layer.action != "kept")

    @property
    def bytes_out(self) -> int:
        return sum(layer.bytes_out for layer in self.layers if layer.action != "kept")

    def to_json(self) -> dict[str, Any]:
        return {"repository": self.repository, "source": self.source, "target": self.target,
                "tag": self.tag, "mediaType": self.media_type, "manifests": self.manifests,
                "seconds": round(self.seconds, 3), "converted": self.count("converted"),
                "reused": self.count("reused"), "kept": self.count("kept"),
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "layers": [{**asdict(layer), "seconds": round(layer.seconds, 3),
                            "ratio": round(layer.ratio, 4)} for layer in self.layers]}


def default_tag(tag: str, to: str = "zstd") -> str:
    """``<tag>-zstd``, cut to the 128 characters a tag may have."""
    suffix = f"-{to}"
    return check_tag(tag[: 128 - len(suffix)] + suffix)


def transcode(registry: Registry, repo: str, reference: str, *, to: str = "zstd",
              level: int = 3, tag: str | None = None, limits: Limits = DEFAULT_LIMITS,
              progress: Progress | None = None) -> Report:
    """Convert ``repo:reference`` (a tag or a digest) and store the result in ``repo``.

    The result is tagged ``tag``, by default ``<reference>-zstd`` when ``reference`` is a
    tag; a digest reference without ``tag`` stores the result by digest only.
    """
    if to not in TARGETS:
        raise InvalidInput(f"cannot transcode to {to!r}: want one of {', '.join(TARGETS)}")
    if not 1 <= level <= 22:
        raise InvalidInput(f"invalid zstd level {level}: want 1 to 22")
    named = tag is not None
    if tag is None and not is_digest(reference):
        tag = default_tag(reference, to)
    elif tag is not None:
        check_tag(tag)
    return _Run(registry, repo, level, limits, progress).run(reference, tag, always_tag=named)


def needs_transcode(registry: Registry, repo: str, reference: str) -> bool:
    """Whether any image reachable from ``repo:reference`` has a gzip layer."""
    run = _Run(registry, repo, 3, DEFAULT_LIMITS, None)
    record = registry.resolve(repo, reference)
    return any(layer["mediaType"] in GZIP_LAYERS
               for doc in run.images(record.digest) for layer in doc["layers"])


def made_by_transcode(registry: Registry, repo: str, reference: str) -> bool:
    """Whether ``repo:reference`` is the output of a conversion (it names its source)."""
    data, _ = registry.get_manifest(repo, reference)
    annotations = json.loads(data).get("annotations") or {}
    return SOURCE_ANNOTATION in annotations


class _Run:
    def __init__(self, registry: Registry, repo: str, level: int, limits: Limits,
                 progress: Progress | None) -> None:
        self.registry = registry
        self.repo = repo
        self.level = level
        self.limits = limits
        self.progress = progress or (lambda event, n: None)
        self.docs: dict[str, dict[str, Any]] = {}  # manifests read, by digest
        self.layers: dict[str, LayerReport] = {}  # this run's gzip layers, by source digest
        self.kept: set[tuple[str, str]] = set()  # layers kept: digest, media type
        #: manifests to write, children first: digest -> (bytes, media type)
        self.pending: dict[str, tuple[bytes, str]] = {}
        self.report: Report | None = None

    def run(self, reference: str, tag: str | None, *, always_tag: bool = True) -> Report:
        """Convert; tag the result ``tag`` (a default one only if something changed: an
        image already in zstd gets no ``-zstd-zstd`` alias)."""
        start = time.monotonic()
        record = self.registry.resolve(self.repo, reference)
        report = self.report = Report(self.repo, record.digest, tag=tag)
        self.progress("total", sum(layer["size"] for layer in self._gzip_layers(record.digest)))
        report.target, report.media_type = self._convert(record.digest)
        # manifests are written only once every layer is in place (I5: all or nothing)
        for digest, (data, media_type) in self.pending.items():
            self.registry.put_manifest(self.repo, digest, data, media_type)
            report.manifests += 1
        if tag is not None and not always_tag and report.target == record.digest:
            report.tag = tag = None
        if tag is not None:
            data, stored = self.registry.get_manifest(self.repo, report.target)
            self.registry.put_manifest(self.repo, tag, data, stored.media_type)
        report.seconds = time.monotonic() - start
        return report

    # -- reading the tree ------------------------------------------------------------------

    def doc(self, digest: str) -> dict[str, Any]:
        if digest not in self.docs:
            data, record = self.registry.get_manifest(self.repo, digest)
            parse_manifest(data, record.media_type)  # validated when pushed; cheap to redo
            doc = json.loads(data)
            doc["mediaType"] = record.media_type
            self.docs[digest] = doc
        return self.docs[digest]

    def images(self, digest: str) -> list[dict[str, Any]]:
        """The image manifests reachable from ``digest`` (artifacts left out)."""
        doc = self.doc(digest)
        if doc["mediaType"] in INDEX_TYPES:
            return [img for child in doc["manifests"] for img in self.images(child["digest"])]
        config = doc.get("config") or {}
        return [doc] if config.get("mediaType") in IMAGE_CONFIGS else []

    def _gzip_layers(self, digest: str) -> list[dict[str, Any]]:
        unique = {layer["digest"]: layer for doc in self.images(digest)
                  for layer in doc["layers"] if layer["mediaType"] in GZIP_LAYERS}
        return list(unique.values())

    # -- converting ------------------------------------------------------------------------

    def _convert(self, digest: str) -> tuple[str, str]:
        """Convert the manifest ``digest``, queueing what must be written; its new digest
        and media type (the same ones when nothing changes)."""
        doc = self.doc(digest)
        media_type = doc["mediaType"]
        if media_type in INDEX_TYPES:
            new = dict(doc)
            new["manifests"] = []
            for child in doc["manifests"]:
                child_digest, child_type = self._convert(child["digest"])
                entry = dict(child)
                entry["mediaType"], entry["digest"] = child_type, child_digest
                if child_digest != child["digest"]:
                    entry["size"] = len(self.pending[child_digest][0])
                new["manifests"].append(entry)
        elif (doc.get("config") or {}).get("mediaType") in IMAGE_CONFIGS:
            new = dict(doc)
            new["config"] = _oci_descriptor(doc["config"])
            new["layers"] = [self._layer(layer, doc) for layer in doc["layers"]]
        else:
            return digest, media_type  # an artifact, not an image
        new["mediaType"] = DOCKER_TO_OCI.get(media_type, media_type)
        if new == doc:
            return digest, media_type
        new["annotations"] = {**(doc.get("annotations") or {}), SOURCE_ANNOTATION: digest}
        data = _serialize(new)
        manifest = parse_manifest(data, new["mediaType"])
        self.pending[str(manifest.digest)] = (data, new["mediaType"])
        return str(manifest.digest), new["mediaType"]

    def _layer(self, layer: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        if layer["mediaType"] not in GZIP_LAYERS:
            if (layer["digest"], layer["mediaType"]) not in self.kept:
                self.kept.add((layer["digest"], layer["mediaType"]))
                kept = _oci_descriptor(layer)
                self._report(LayerReport(layer["digest"], layer["digest"], kept["mediaType"],
                                         "kept", layer["size"], layer["size"]))
            return _oci_descriptor(layer)
        expected = self._diff_id(doc, layer)
        done = self.layers.get(layer["digest"]) or self._reuse(layer) \
            or self._compress(layer, expected)
        if expected is not None and done.diff_id != expected:
            raise LayerInvalid(f"layer {layer['digest']} holds the tar {done.diff_id}, but "
                               f"its config names {expected}")
        out = {k: v for k, v in layer.items() if k not in ("mediaType", "digest", "size")}
        return {"mediaType": LAYER_ZSTD, "digest": done.target, "size": done.bytes_out, **out}

    def _report(self, layer: LayerReport) -> None:
        assert self.report is not None
        self.report.layers.append(layer)

    def _reuse(self, layer: dict[str, Any]) -> LayerReport | None:
        """An earlier conversion of this layer at this level, if its blob is still stored."""
        known = lookup(self.registry, layer["digest"], self.level)
        if known is None or not self.registry.engine.exists(known["digest"]):
            return None
        try:
            self.registry.link(self.repo, known["digest"])
        except Conflict:  # collected just now: convert again
            return None
        self.progress("read", layer["size"])
        done = LayerReport(layer["digest"], known["digest"], LAYER_ZSTD, "reused",
                           layer["size"], known["size"], 0.0, known["diff_id"])
        self.layers[layer["digest"]] = done
        self._report(done)
        return done

    def _compress(self, layer: dict[str, Any], diff_id: str | None) -> LayerReport:
        start = time.monotonic()
        source = self.registry.read_blob(self.repo, layer["digest"])
        stream = GzipToZstd(source, level=self.level, limits=self.limits, diff_id=diff_id,
                            what=f"layer {layer['digest']}",
                            on_read=lambda n: self.progress("read", n))
        result = self.registry.ingest_blob(self.repo, stream)
        assert stream.diff_id is not None  # set once the stream was read to its end
        done = LayerReport(layer["digest"], str(result.digest), LAYER_ZSTD, "converted",
                           stream.bytes_in, result.size, time.monotonic() - start,
                           stream.diff_id)
        remember(self.registry, layer["digest"], self.level,
                 {"digest": done.target, "size": done.bytes_out, "diff_id": done.diff_id})
        self.layers[layer["digest"]] = done
        self._report(done)
        return done

    def _diff_id(self, doc: dict[str, Any], layer: dict[str, Any]) -> str | None:
        """The tar the image's config names for ``layer``, if it names one. A layer must
        hold it, or the new image would be refused at pull (the source was broken)."""
        diff_ids = self._diff_ids(doc["config"]["digest"])
        position = [entry["digest"] for entry in doc["layers"]].index(layer["digest"])
        if diff_ids is None or position >= len(diff_ids):
            return None
        return str(diff_ids[position])

    def _diff_ids(self, config: str) -> list[str] | None:
        key = f"config:{config}"
        if key not in self.docs:
            try:
                if self.registry.stat_blob(self.repo, config).size > MAX_CONFIG:
                    raise ValueError("too large to read whole")
                value = json.loads(self.registry.engine.read_bytes(config))
                ids = value["rootfs"]["diff_ids"]
                self.docs[key] = {"ids": ids if isinstance(ids, list) else None}
            except (ValueError, KeyError, TypeError):
                self.docs[key] = {"ids": None}
        return self.docs[key]["ids"]


def _oci_descriptor(desc: dict[str, Any]) -> dict[str, Any]:
    return {**desc, "mediaType": DOCKER_TO_OCI.get(desc["mediaType"], desc["mediaType"])}


def _serialize(doc: dict[str, Any]) -> bytes:
    """Manifest JSON in the usual field order: schemaVersion, mediaType, then the rest."""
    head = {k: doc[k] for k in ("schemaVersion", "mediaType") if k in doc}
    return json.dumps({**head, **doc}, separators=(",", ":")).encode()


# -- the conversion records --------------------------------------------------------------


def _key(source: str, level: int) -> bytes:
    return f"{source}\0zstd:{level}".encode()


def lookup(registry: Registry, source: str, level: int) -> dict[str, Any] | None:
    """What ``source`` was converted to at ``level`` (the blob may be gone since)."""
    with registry.index.transaction() as txn:
        value = txn.get(TABLE, _key(source, level))
    return None if value is None else json.loads(value)


def remember(registry: Registry, source: str, level: int, target: dict[str, Any]) -> None:
    with registry.index.transaction(write=True) as txn:
        txn.put(TABLE, _key(source, level), json.dumps(target).encode())


def forget(registry: Registry, source: str, level: int) -> None:
    """Drop the record, so the next conversion of ``source`` at ``level`` compresses again."""
    with registry.index.transaction(write=True) as txn:
        txn.delete(TABLE, _key(source, level))
