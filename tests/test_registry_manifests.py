"""casengine.registry.manifests: parsing the exact bytes of every manifest kind, and refusing
schema 1, malformed documents and bad descriptors with the right error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from casengine.digest import Digest
from casengine.errors import (
    CASError,
    ManifestInvalid,
    ManifestTooLarge,
    Unsupported,
)
from casengine.registry import parse_manifest
from casengine.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.helpers import digest_of
from tests.registry_helpers import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    OCI_CONFIG,
    OCI_LAYER,
    SCHEMA1,
    SCHEMA1_SIGNED,
    config,
    docker_manifest,
    encode,
    image_doc,
    index,
    layer,
    oci_manifest,
    schema1_manifest,
)

CFG = config("c")
L1, L2 = layer("1"), layer("2", 300)
IMAGE = oci_manifest(CFG, [L1, L2])


def _refs(m: Any) -> list[tuple[str, str, int]]:
    return [(d.media_type, str(d.digest), d.size) for d in m]


# -- every accepted kind ----------------------------------------------------------------------


def test_oci_image_manifest() -> None:
    m = parse_manifest(IMAGE.content, OCI_MANIFEST)
    assert m.media_type == OCI_MANIFEST
    assert str(m.digest) == digest_of(IMAGE.content) and m.size == len(IMAGE.content)
    assert not m.is_index
    assert _refs(m.blobs) == [(OCI_CONFIG, CFG.digest, CFG.size), (OCI_LAYER, L1.digest, 100),
                              (OCI_LAYER, L2.digest, 300)]
    assert m.children == () and m.subject is None


def test_docker_schema2_manifest() -> None:
    cfg, lay = config("d", DOCKER_CONFIG), layer("d", 50, DOCKER_LAYER)
    built = docker_manifest(cfg, [lay])
    m = parse_manifest(built.content, DOCKER_MANIFEST)
    assert m.media_type == DOCKER_MANIFEST
    assert _refs(m.blobs) == [(DOCKER_CONFIG, cfg.digest, cfg.size), (DOCKER_LAYER, lay.digest, 50)]
    assert parse_manifest(built.content).media_type == DOCKER_MANIFEST  # from the field alone


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_index_and_manifest_list(docker: bool) -> None:
    amd, arm = oci_manifest(config("amd"), [L1]), oci_manifest(config("arm"), [L1])
    built = index([amd, arm], docker=docker)
    m = parse_manifest(built.content, built.media_type)
    assert m.media_type == (DOCKER_LIST if docker else OCI_INDEX)
    assert m.is_index and m.blobs == ()
    assert _refs(m.children) == [(OCI_MANIFEST, amd.digest, amd.size),
                                 (OCI_MANIFEST, arm.digest, arm.size)]
    assert m.children[1].platform == {"architecture": "arm64", "os": "linux", "variant": "v8"}


def test_the_digest_is_of_the_bytes_as_sent() -> None:
    # same document, other whitespace: another manifest, another digest
    compact = json.dumps(json.loads(IMAGE.content), separators=(",", ":")).encode()
    assert parse_manifest(compact).digest != parse_manifest(IMAGE.content).digest
    assert str(parse_manifest(compact).digest) == digest_of(compact)


# -- media type: inferred, from the header, and mismatches -------------------------------------


@pytest.mark.parametrize("content_type", [None, "", "application/json",
                                          "application/json; charset=utf-8"])
def test_oci_manifest_without_media_type_is_inferred(content_type: str | None) -> None:
    bare = oci_manifest(CFG, [L1], with_media_type=False)
    assert b"mediaType\": \"application/vnd.oci.image.manifest" not in bare.content
    assert parse_manifest(bare.content, content_type).media_type == OCI_MANIFEST
    bare_index = index([IMAGE], with_media_type=False)
    assert parse_manifest(bare_index.content, content_type).media_type == OCI_INDEX


def test_media_type_from_the_header_when_the_field_is_absent() -> None:
    bare = oci_manifest(CFG, [L1], with_media_type=False)
    assert parse_manifest(bare.content, OCI_MANIFEST).media_type == OCI_MANIFEST
    assert parse_manifest(bare.content, f"{OCI_MANIFEST}; charset=utf-8").media_type == \
        OCI_MANIFEST


@pytest.mark.parametrize(("body", "header"), [
    (IMAGE.content, OCI_INDEX),
    (IMAGE.content, DOCKER_MANIFEST),
    (index([IMAGE]).content, OCI_MANIFEST),
    (docker_manifest(CFG, [L1]).content, OCI_MANIFEST),
])
def test_media_type_and_content_type_mismatch_is_refused(body: bytes, header: str) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(body, header)
    assert header in str(info.value)
    assert "mediaType" in str(info.value)


@pytest.mark.parametrize("media_type", [OCI_CONFIG, "application/octet-stream", "text/plain",
                                        "application/vnd.oci.artifact.manifest.v1+json"])
def test_unsupported_media_types(media_type: str) -> None:
    doc = image_doc(CFG, [L1], media_type=media_type)
    with pytest.raises(ManifestInvalid, match="unsupported manifest media type"):
        parse_manifest(encode(doc))
    bare = oci_manifest(CFG, [L1], with_media_type=False)
    with pytest.raises(ManifestInvalid, match="unsupported manifest media type"):
        parse_manifest(bare.content, media_type)


def test_media_type_must_be_a_string() -> None:
    doc = image_doc(CFG, [L1], media_type=None)
    doc["mediaType"] = 7
    with pytest.raises(ManifestInvalid, match="mediaType must be a string"):
        parse_manifest(encode(doc))


# -- Docker schema 1 ------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "header"), [
    (schema1_manifest(signed=True), SCHEMA1_SIGNED),
    (schema1_manifest(signed=False), SCHEMA1),
    (schema1_manifest(), None),  # by schemaVersion 1 alone
    (schema1_manifest(), "application/json"),
    (encode({"schemaVersion": 1, "mediaType": SCHEMA1, "fsLayers": []}), None),
    (IMAGE.content, SCHEMA1_SIGNED),  # a schema 2 body sent as schema 1 is refused as well
])
def test_docker_schema1_is_refused_as_unsupported(body: bytes, header: str | None) -> None:
    with pytest.raises(Unsupported) as info:
        parse_manifest(body, header)
    msg = str(info.value)
    assert "schema 1" in msg and "not supported" in msg
    assert isinstance(info.value, CASError) and info.value.exit_code == 9


# -- malformed documents ----------------------------------------------------------------------


def test_too_large() -> None:
    assert parse_manifest(IMAGE.content, max_size=len(IMAGE.content)).size == len(IMAGE.content)
    with pytest.raises(ManifestTooLarge) as info:
        parse_manifest(IMAGE.content, max_size=len(IMAGE.content) - 1)
    assert str(len(IMAGE.content)) in str(info.value)
    # checked before parsing: even garbage over the limit is "too large"
    with pytest.raises(ManifestTooLarge):
        parse_manifest(b"\xff" * 100, max_size=99)
    with pytest.raises(ManifestTooLarge):
        parse_manifest(b" " * (4 << 20) + b"{}")  # the default limit is 4 MiB


@pytest.mark.parametrize(("body", "fragment"), [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"{'schemaVersion': 2}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b'"manifest"', "not a JSON object"),
    (b"2", "not a JSON object"),
    (b"null", "not a JSON object"),
    # what Python's json takes and other clients' parsers refuse (RFC 8259)
    (b"\xef\xbb\xbf" + IMAGE.content, "not valid JSON"),
    (IMAGE.content.decode().encode("utf-16"), "not valid JSON"),
    (IMAGE.content.decode().encode("utf-32-le"), "not valid JSON"),
    (b'{"schemaVersion": 2, "x": NaN}', "NaN is not JSON"),
    (b'{"schemaVersion": 2, "x": -Infinity}', "-Infinity is not JSON"),
])
def test_malformed_documents(body: bytes, fragment: str) -> None:
    with pytest.raises(ManifestInvalid, match=fragment):
        parse_manifest(body, OCI_MANIFEST)


@pytest.mark.parametrize("version", [None, 0, 3, "2", 2.5, [2]])
def test_wrong_schema_version(version: object) -> None:
    doc = image_doc(CFG, [L1])
    if version is None:
        del doc["schemaVersion"]
    else:
        doc["schemaVersion"] = version
    with pytest.raises(ManifestInvalid, match="schemaVersion must be 2"):
        parse_manifest(encode(doc))


def _with(path: tuple[Any, ...], value: Any, *, doc: dict[str, Any] | None = None) -> bytes:
    doc = json.loads(IMAGE.content) if doc is None else doc
    target = doc
    for part in path[:-1]:
        target = target[part]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return encode(doc)


_DELETE = object()
GOOD_HEX = "a" * 64


@pytest.mark.parametrize(("path", "value", "fragment"), [
    (("layers",), _DELETE, "'layers' list"),
    (("layers",), {}, "'layers' list"),
    (("config",), _DELETE, "config is not a descriptor"),
    (("config",), "sha256:" + GOOD_HEX, "config is not a descriptor"),
    (("layers", 0), [1], "layers[0] is not a descriptor"),
    (("config", "digest"), "sha256:abc", "config"),
    (("config", "digest"), "sha256:" + GOOD_HEX.upper(), "config"),
    (("config", "digest"), "md5:" + GOOD_HEX[:32], "config"),
    (("config", "digest"), None, "config"),
    (("layers", 1, "digest"), "sha256" + GOOD_HEX, "layers[1]"),
    (("layers", 1, "digest"), 12, "layers[1]"),
    (("layers", 0, "size"), -1, "layers[0] has no valid size"),
    (("layers", 0, "size"), "100", "layers[0] has no valid size"),
    (("layers", 0, "size"), 1.5, "layers[0] has no valid size"),
    (("layers", 0, "size"), True, "layers[0] has no valid size"),
    (("layers", 0, "size"), _DELETE, "layers[0] has no valid size"),
    (("config", "size"), -5, "config has no valid size"),
    (("layers", 0, "mediaType"), _DELETE, "layers[0] has no mediaType"),
    (("layers", 0, "mediaType"), "", "layers[0] has no mediaType"),
    (("layers", 0, "annotations"), {"a": 1}, "not a string map"),
    (("layers", 0, "urls"), "https://example.com/l", "layers[0].urls is not a list of strings"),
    (("layers", 0, "urls"), [1], "layers[0].urls is not a list of strings"),
    (("subject",), {"mediaType": OCI_MANIFEST, "digest": "bad", "size": 1}, "subject"),
    (("subject",), {"mediaType": OCI_MANIFEST, "digest": "sha256:" + GOOD_HEX, "size": -1},
     "subject has no valid size"),
])
def test_bad_descriptors(path: tuple[Any, ...], value: Any, fragment: str) -> None:
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(_with(path, value), OCI_MANIFEST)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(("manifests", "fragment"), [
    (None, "'manifests' list"),
    ({"a": 1}, "'manifests' list"),
    ([{"mediaType": OCI_MANIFEST, "digest": "sha256:nothex", "size": 1}], "manifests[0]"),
    ([{"mediaType": OCI_MANIFEST, "digest": "sha256:" + GOOD_HEX, "size": -1}], "manifests[0]"),
    (["sha256:" + GOOD_HEX], "manifests[0] is not a descriptor"),
])
def test_bad_index_entries(manifests: Any, fragment: str) -> None:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    with pytest.raises(ManifestInvalid) as info:
        parse_manifest(encode(doc))
    assert fragment in str(info.value)


def test_a_zero_size_and_an_empty_index_are_fine() -> None:
    empty = layer("empty", 0)
    assert parse_manifest(oci_manifest(CFG, [empty]).content).layers[0].size == 0
    m = parse_manifest(encode({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}))
    assert m.is_index and m.children == ()


# -- referrer descriptors ---------------------------------------------------------------------


def test_referrer_descriptor_carries_artifact_type() -> None:
    sig = oci_manifest(config("sig", "application/vnd.example.sig.config+json"), [L1],
                       subject=IMAGE, artifact_type="application/vnd.example.sig",
                       annotations={"org.example.k": "v"})
    m = parse_manifest(sig.content)
    assert m.subject is not None and str(m.subject.digest) == IMAGE.digest
    assert m.referrer_descriptor() == {
        "mediaType": OCI_MANIFEST, "digest": sig.digest, "size": sig.size,
        "artifactType": "application/vnd.example.sig", "annotations": {"org.example.k": "v"}}


def test_referrer_descriptor_falls_back_to_the_config_media_type() -> None:
    sbom = oci_manifest(config("sbom", "application/vnd.example.sbom"), [L1], subject=IMAGE)
    d = parse_manifest(sbom.content).referrer_descriptor()
    assert d == {"mediaType": OCI_MANIFEST, "digest": sbom.digest, "size": sbom.size,
                 "artifactType": "application/vnd.example.sbom"}
    assert Digest.parse(d["digest"]) == Digest.parse(sbom.digest)


@pytest.mark.parametrize(("field", "value"), [("annotations", ["x"]),
                                              ("annotations", {"k": 1}),
                                              ("artifactType", 5),
                                              ("artifactType", {"a": "b"})])
def test_manifest_level_annotations_and_artifact_type_are_validated(field: str,
                                                                    value: object) -> None:
    doc = image_doc(CFG, [L1], subject=IMAGE.descriptor())
    doc[field] = value
    with pytest.raises(ManifestInvalid, match=field):
        parse_manifest(encode(doc))
