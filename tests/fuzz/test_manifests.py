"""Manifests and indexes against hostile bytes.

``parse_manifest`` takes the exact bytes a client pushed. Whatever they are, it returns a
:class:`Manifest` or raises the project's own error (ManifestInvalid, or Unsupported for
schema 1); never a RecursionError, a ValueError of the int parser, or a KeyError. What it
returns describes those bytes: their digest and size, and the descriptors they list.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from casengine.digest import Digest
from casengine.errors import CASError, InvalidInput, Unsupported
from casengine.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    SUPPORTED,
    parse_manifest,
)
from tests.fuzz.budget import fuzz
from tests.fuzz.test_digest_names import DIGEST_TEXT, HEX64

MEDIA_TYPES = st.sampled_from([*SUPPORTED, "application/json", "text/plain", "",
                               "application/vnd.docker.distribution.manifest.v1+json"])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)


def descriptors() -> st.SearchStrategy[dict[str, Any]]:
    good = st.fixed_dictionaries(
        {"mediaType": st.sampled_from(["application/vnd.oci.image.layer.v1.tar+gzip",
                                       OCI_MANIFEST, "x/y"]),
         "digest": HEX64.map(lambda h: f"sha256:{h}"),
         "size": st.integers(0, 1 << 40)},
        optional={"annotations": st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                 max_size=2),
                  "artifactType": st.text(max_size=10),
                  "urls": st.lists(st.text(max_size=10), max_size=2),
                  "platform": st.dictionaries(st.text(max_size=5), st.text(max_size=5))})
    return st.one_of(good, good.flatmap(_spoil))


def _spoil(d: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """One field of a good descriptor replaced by something hostile."""
    return st.tuples(st.sampled_from(["mediaType", "digest", "size", "annotations",
                                      "artifactType"]),
                     st.one_of(JSON_VALUES, DIGEST_TEXT, st.just(-1), st.just(True))).map(
        lambda kv: {**d, kv[0]: kv[1]})


@st.composite
def manifest_docs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST, None]))
    doc: dict[str, Any] = {"schemaVersion": draw(st.sampled_from([2, 2, 2, 1, "2", 2.0, True]))}
    if kind is not None:
        doc["mediaType"] = kind
    if kind in (OCI_INDEX, DOCKER_LIST) or (kind is None and draw(st.booleans())):
        doc["manifests"] = draw(st.lists(descriptors(), max_size=3))
    else:
        doc["config"] = draw(descriptors())
        doc["layers"] = draw(st.lists(descriptors(), max_size=3))
    if draw(st.booleans()):
        doc["subject"] = draw(descriptors())
    if draw(st.booleans()):
        doc["annotations"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=2), JSON_VALUES))
    if draw(st.booleans()):  # drop or replace one top-level field
        field = draw(st.sampled_from(sorted(doc)))
        if draw(st.booleans()):
            del doc[field]
        else:
            doc[field] = draw(JSON_VALUES)
    return doc


DOCS_AS_BYTES = manifest_docs().map(lambda d: json.dumps(d).encode())
MANIFEST_BYTES = st.one_of(
    st.binary(max_size=512),
    DOCS_AS_BYTES,
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    # cut or corrupt a plausible manifest somewhere
    st.tuples(DOCS_AS_BYTES, st.integers(0, 400), st.binary(max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]),
)
DEEP = b"[" * 100_000
BIG_INT = b'{"schemaVersion": ' + b"9" * 5000 + b"}"


@fuzz()
@given(MANIFEST_BYTES, MEDIA_TYPES)
@example(DEEP, OCI_MANIFEST)
@example(BIG_INT, OCI_MANIFEST)
@example(b'{"schemaVersion": 2, "layers": [], "config": {"mediaType": "x", "size": 1, '
         b'"digest": "sha256:' + b"0" * 64 + b'", "annotations": {"a": "\\ud800"}}}', "")
@example(b"\xef\xbb\xbf{}", "")
@example(b'{"schemaVersion": 2, "manifests": {}}', OCI_INDEX)
def test_parse_manifest_never_escapes_the_error_root(data: bytes, content_type: str) -> None:
    try:
        m = parse_manifest(data, content_type)
    except (InvalidInput, Unsupported):
        return
    except CASError as exc:  # pragma: no cover - a failure message, not a branch
        raise AssertionError(f"unexpected error class {type(exc).__name__}") from exc
    assert m.digest == Digest.of(data) and m.size == len(data)
    assert m.media_type in SUPPORTED
    doc = json.loads(data)
    listed = doc["manifests"] if m.is_index else [doc["config"], *doc["layers"]]
    found = m.children if m.is_index else m.blobs
    assert [(d["digest"], d["size"], d["mediaType"]) for d in listed] == \
        [(str(d.digest), d.size, d.media_type) for d in found]


def test_deep_nesting_and_huge_numbers_are_invalid_manifests() -> None:
    """Regression: 100 000 brackets raised RecursionError and a 5000-digit number a
    ValueError of the int parser; both were 500s over HTTP."""
    from casengine.errors import ManifestInvalid

    for data in (DEEP, BIG_INT):
        try:
            parse_manifest(data, OCI_MANIFEST)
        except ManifestInvalid as exc:
            assert "not valid JSON" in str(exc)
        else:
            raise AssertionError("accepted")


@fuzz(0.2)
@given(st.lists(descriptors().filter(lambda d: isinstance(d.get("size"), int)), max_size=4))
def test_a_valid_index_lists_its_children_in_order(entries: list[dict[str, Any]]) -> None:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    data = json.dumps(doc).encode()
    try:
        m = parse_manifest(data, OCI_INDEX)
    except InvalidInput:
        return  # a spoiled entry
    assert [str(c.digest) for c in m.children] == [e["digest"] for e in entries]
    assert not m.blobs and m.is_index
