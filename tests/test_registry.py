"""casengine.registry.model: repositories, blob links, manifests of every kind, tags,
referrers, pagination, deletes, and the durable records in the backend; on memory:// and a
local root."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from casengine.compression import Policy
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import (
    BackendError,
    BlobNotFound,
    CorruptObject,
    DigestMismatch,
    InUse,
    InvalidDigest,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestNotFound,
    ManifestTooLarge,
    RepositoryNotFound,
    Unsupported,
    UploadNotFound,
)
from casengine.layout import REPOSITORIES, blob_key, link_key, manifest_key, repo_key, tag_key
from casengine.registry import Registry
from casengine.registry.manifests import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tests.helpers import KINDS, blob_objects, digest_of, open_engine
from tests.registry_helpers import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    OCI_LAYER,
    REPO_TABLES,
    SCHEMA1_SIGNED,
    Manifest,
    backend_records,
    config,
    docker_manifest,
    encode,
    image_doc,
    index,
    index_records,
    index_rows,
    layer,
    oci_manifest,
    own_keys,
    push,
    push_blobs,
    schema1_manifest,
    simple_image,
    snapshot,
)
from tests.registry_helpers import (
    Blob as B,
)


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(request.param, tmp_path)
    yield e
    e.close()


@pytest.fixture
def reg(engine: Engine) -> Registry:
    return Registry(engine)


def _digest(d: object) -> str:
    return str(d)


# -- repositories -----------------------------------------------------------------------------


def test_create_and_inspect_repositories(reg: Registry) -> None:
    assert reg.create_repository("team/app") is True
    assert reg.create_repository("team/app") is False
    assert reg.repository_exists("team/app") and not reg.repository_exists("team")
    info = reg.repository("team/app")
    assert info["name"] == "team/app" and info["logical"] == 0 and info["created"] > 0
    assert reg.engine.backend.exists(repo_key("team/app", "_repo"))
    with pytest.raises(RepositoryNotFound, match="'nope'"):
        reg.repository("nope")
    for read in (lambda: reg.tags("nope"), lambda: reg.resolve("nope", "v1"),
                 lambda: reg.stat_blob("nope", digest_of(b"x")), lambda: reg.manifests("nope"),
                 lambda: reg.referrers("nope", digest_of(b"x")), lambda: reg.tag_map("nope"),
                 lambda: reg.delete_tag("nope", "v1"), lambda: reg.delete_repository("nope")):
        with pytest.raises(RepositoryNotFound):
            read()
    assert not reg.repository_exists("nope")


def test_push_creates_the_repository_unless_told_not_to(engine: Engine) -> None:
    strict = Registry(engine, create_on_push=False)
    before = snapshot(strict)
    image = simple_image("x")
    with pytest.raises(RepositoryNotFound):
        strict.ingest_blob("app", image.blobs[1].content)
    with pytest.raises(RepositoryNotFound):
        strict.start_upload("app")
    assert snapshot(strict) == before
    strict.create_repository("app")
    push(strict, "app", image, "v1")
    assert strict.tags("app").items == ["v1"]
    push(Registry(engine), "auto", image, "v1")  # the default creates on push
    assert list(strict.repositories()) == ["app", "auto"]


# -- every manifest kind ------------------------------------------------------------------------


def _images() -> dict[str, tuple[Manifest, str | None]]:
    base = layer("base", 1000)
    return {
        "oci": (oci_manifest(config("oci"), [base, layer("oci")]), OCI_MANIFEST),
        "oci-no-media-type": (oci_manifest(config("bare"), [base], with_media_type=False),
                              None),
        "oci-no-media-type-json": (oci_manifest(config("bare2"), [base], with_media_type=False),
                                   "application/json"),
        "docker": (docker_manifest(config("dk", DOCKER_CONFIG),
                                   [layer("dk1", 10, DOCKER_LAYER), layer("dk2", 20, DOCKER_LAYER)]),
                   DOCKER_MANIFEST),
    }


@pytest.mark.parametrize("kind", list(_images()))
def test_image_manifest_round_trip(reg: Registry, kind: str) -> None:
    image, content_type = _images()[kind]
    push_blobs(reg, "team/app", image.blobs)
    parsed = reg.put_manifest("team/app", "v1", image.content, content_type)
    assert _digest(parsed.digest) == image.digest
    for ref in ("v1", image.digest):
        data, record = reg.get_manifest("team/app", ref)
        assert data == image.content  # the exact bytes, never re-serialised
        assert record.digest == image.digest and record.size == image.size
        assert record.media_type == image.media_type  # inferred when the field is absent
        assert record.refs == tuple(b.digest for b in image.blobs)
        assert record.subject is None
    assert reg.manifests("team/app") == [reg.resolve("team/app", "v1")]
    assert reg.tag_map("team/app") == {"v1": image.digest}
    assert reg.is_linked("team/app", image.digest)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_multi_platform_index_sharing_a_base_layer(reg: Registry, docker: bool) -> None:
    base = layer("base", 1000)
    mt, lt = (DOCKER_MANIFEST, DOCKER_LAYER) if docker else (OCI_MANIFEST, OCI_LAYER)
    builder = docker_manifest if docker else oci_manifest
    amd = builder(config("amd"), [base, layer("amd", 10, lt)])
    arm = builder(config("arm"), [base, layer("arm", 20, lt)])
    blobs_before = reg.engine.index.count_blobs()
    for platform in (amd, arm):  # both platform manifests by digest, then the index
        push_blobs(reg, "team/app", platform.blobs)
        reg.put_manifest("team/app", platform.digest, platform.content, mt)
    multi = index([amd, arm], docker=docker)
    reg.put_manifest("team/app", "latest", multi.content, multi.media_type)
    data, record = reg.get_manifest("team/app", "latest")
    assert data == multi.content
    assert record.media_type == (DOCKER_LIST if docker else OCI_INDEX)
    assert record.refs == (amd.digest, arm.digest)
    # base once: 2 configs + base + 2 platform layers + 3 manifests
    assert reg.engine.index.count_blobs() - blobs_before == 8
    assert reg.tag_map("team/app") == {"latest": multi.digest}
    assert {r.digest for r in reg.manifests("team/app")} == {amd.digest, arm.digest, multi.digest}


def test_an_index_refers_only_to_manifests_of_its_repository(reg: Registry) -> None:
    amd, arm = simple_image("amd"), simple_image("arm")
    push(reg, "team/full", amd)
    push(reg, "team/full", arm)
    push(reg, "team/half", amd)
    reg.ingest_blob("team/half", arm.content)  # arm's bytes linked, but as a blob, not a manifest
    multi = index([amd, arm])
    before = snapshot(reg)
    with pytest.raises(ManifestBlobUnknown) as info:
        reg.put_manifest("team/half", "latest", multi.content, OCI_INDEX)
    assert _digest(info.value.digest) == arm.digest
    assert "team/half" in str(info.value) and arm.digest in str(info.value)
    assert snapshot(reg) == before
    reg.put_manifest("team/full", "latest", multi.content, OCI_INDEX)  # there it is complete


def test_schema1_and_media_type_mismatch_refused_through_the_registry(reg: Registry) -> None:
    image = simple_image("x")
    push_blobs(reg, "app", image.blobs)
    before = snapshot(reg)
    with pytest.raises(Unsupported, match="schema 1"):
        reg.put_manifest("app", "v1", schema1_manifest(), SCHEMA1_SIGNED)
    with pytest.raises(ManifestInvalid, match="mediaType"):
        reg.put_manifest("app", "v1", image.content, DOCKER_MANIFEST)
    assert snapshot(reg) == before


# -- referrers ----------------------------------------------------------------------------------

SIG = "application/vnd.example.signature.v1"
SBOM_CONFIG = "application/vnd.example.sbom.config.v1+json"


def test_referrers_with_and_without_an_artifact_type_filter(reg: Registry) -> None:
    image = simple_image("subject")
    payload = layer("payload", 30)
    sig = oci_manifest(config("sig", "application/vnd.oci.empty.v1+json"), [payload],
                       subject=image, artifact_type=SIG, annotations={"created-by": "test"})
    sbom = oci_manifest(config("sbom", SBOM_CONFIG), [payload], subject=image)
    unrelated = oci_manifest(config("other", SBOM_CONFIG), [payload], subject=simple_image("y"))
    # referrers first: accepted while the subject is not in the repository yet
    push(reg, "app", sig)
    sig_desc = {"mediaType": OCI_MANIFEST, "digest": sig.digest, "size": sig.size,
                "artifactType": SIG, "annotations": {"created-by": "test"}}
    assert reg.referrers("app", image.digest) == [sig_desc]
    push(reg, "app", sbom, "sbom")
    push(reg, "app", unrelated)
    push(reg, "app", image, "v1")
    sbom_desc = {"mediaType": OCI_MANIFEST, "digest": sbom.digest, "size": sbom.size,
                 "artifactType": SBOM_CONFIG}  # falls back to config.mediaType
    by_digest = sorted([sig_desc, sbom_desc], key=lambda d: d["digest"])
    assert reg.referrers("app", image.digest) == by_digest
    assert reg.referrers("app", image.digest, SIG) == [sig_desc]
    assert reg.referrers("app", image.digest, SBOM_CONFIG) == [sbom_desc]
    assert reg.referrers("app", image.digest, "application/nothing") == []
    assert reg.referrers("app", sig.digest) == []
    assert reg.resolve("app", sig.digest).subject == image.digest
    assert reg.resolve("app", sbom.digest).artifact_type is None
    reg.create_repository("elsewhere")
    assert reg.referrers("elsewhere", image.digest) == []  # per repository
    # deleting a referrer removes it from the listing
    reg.delete_manifest("app", sig.digest)
    assert reg.referrers("app", image.digest) == [sbom_desc]
    assert reg.referrers("app", image.digest, SIG) == []
    reg.delete_manifest("app", sbom.digest)  # deleting it also deletes its tag
    assert reg.referrers("app", image.digest) == []
    assert reg.tags("app").items == ["v1"]


def test_an_index_as_a_referrer(reg: Registry) -> None:
    image = simple_image("subject")
    child = simple_image("attached")
    push(reg, "app", child)
    attached = index([child], subject=image, artifact_type="application/vnd.example.bundle")
    reg.put_manifest("app", attached.digest, attached.content)
    assert reg.referrers("app", image.digest) == [{
        "mediaType": OCI_INDEX, "digest": attached.digest, "size": attached.size,
        "artifactType": "application/vnd.example.bundle"}]


# -- pagination ---------------------------------------------------------------------------------

NAMES = ["a", "b", "c"]


@pytest.fixture
def tagged(reg: Registry) -> Registry:
    image = simple_image("p")
    push(reg, "app", image, NAMES[0])
    for name in NAMES[1:]:
        reg.put_manifest("app", name, image.content)
    reg.create_repository("empty")
    return reg


def _pager(kind: str, reg: Registry) -> Callable[..., object]:
    if kind == "tags":
        return lambda n=None, last=None: reg.tags("app", n=n, last=last)
    for name in NAMES:
        reg.create_repository(name)
    reg.delete_repository("app")
    reg.delete_repository("empty")
    return lambda n=None, last=None: reg.catalog(n=n, last=last)


CASES = [  # n, last, items, next_last
    (None, None, NAMES, None),
    (3, None, NAMES, None),  # exactly one page: no "next" (no Link header)
    (10, None, NAMES, None),
    (2, None, ["a", "b"], "b"),
    (2, "b", ["c"], None),
    (1, "b", ["c"], None),  # exactly the last item: no next page
    (1, None, ["a"], "a"),
    (None, "a", ["b", "c"], None),
    (None, "aa", ["b", "c"], None),  # last need not exist
    (2, "0", ["a", "b"], "b"),  # last before the start
    (None, "0", NAMES, None),
    (3, "0", NAMES, None),
    (None, "c", [], None),  # last is the last item
    (None, "z", [], None),  # last past the end
    (5, "z", [], None),
    (0, None, [], None),  # n=0: an empty page and no next
    (0, "a", [], None),
]


@pytest.mark.parametrize("kind", ["tags", "catalog"])
@pytest.mark.parametrize(("n", "last", "items", "next_last"), CASES)
def test_pagination(tagged: Registry, kind: str, n: int | None, last: str | None,
                    items: list[str], next_last: str | None) -> None:
    page = _pager(kind, tagged)(n=n, last=last)
    assert (page.items, page.next_last) == (items, next_last)


@pytest.mark.parametrize("kind", ["tags", "catalog"])
def test_pagination_walks_without_an_empty_last_page(tagged: Registry, kind: str) -> None:
    pager = _pager(kind, tagged)
    for n in range(1, 6):
        seen, last, pages = [], None, 0
        while True:
            page = pager(n=n, last=last)
            pages += 1
            assert page.items, f"n={n}: an empty page after {seen}"
            seen += page.items
            if page.next_last is None:
                break
            assert page.next_last == page.items[-1]
            last = page.next_last
        assert seen == NAMES
        assert pages == -(-len(NAMES) // n)


def test_pagination_of_nothing(reg: Registry) -> None:
    for n in (None, 0, 1, 5):
        assert (reg.catalog(n=n).items, reg.catalog(n=n).next_last) == ([], None)
    reg.create_repository("empty")
    for n in (None, 0, 1, 5):
        page = reg.tags("empty", n=n, last="x")
        assert (page.items, page.next_last) == ([], None)
        page = reg.tags("empty", n=n)
        assert (page.items, page.next_last) == ([], None)


def test_catalog_is_in_lexical_order_with_nested_names(reg: Registry) -> None:
    names = ["b", "a/b", "a", "a-b", "a/b/c", "a.b", "a0"]
    for name in names:
        reg.create_repository(name)
    assert reg.catalog().items == sorted(names)
    assert reg.catalog(n=2, last="a").items == sorted(names)[1:3]
    assert list(reg.repositories("a/")) == ["a/b", "a/b/c"]


# -- refused manifests leave nothing -------------------------------------------------------------

CFG = config("good")
LAYER = layer("good", 200)
MISSING = layer("missing", 50)
ELSEWHERE = layer("elsewhere", 60)  # in the store, linked in another repository only


def _bad_cases() -> dict[str, tuple[bytes, str | None, type[Exception], str]]:
    good = image_doc(CFG, [LAYER])

    def changed(path: tuple, value: object) -> bytes:
        doc = image_doc(CFG, [LAYER])
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
        return encode(doc)

    absent_child = index([simple_image("never-pushed")])
    pushed = oci_manifest(CFG, [LAYER])  # pushed as v0
    wrong_child_size = json.loads(index([pushed]).content)
    wrong_child_size["manifests"][0]["size"] = pushed.size + 1
    return {
        "unknown-blob": (encode(image_doc(CFG, [LAYER, MISSING])), OCI_MANIFEST,
                         ManifestBlobUnknown, MISSING.digest),
        "blob-of-another-repo": (encode(image_doc(CFG, [ELSEWHERE])), OCI_MANIFEST,
                                 ManifestBlobUnknown, ELSEWHERE.digest),
        "unknown-config": (encode(image_doc(config("nope"), [LAYER])), None,
                           ManifestBlobUnknown, config("nope").digest),
        "absent-child": (absent_child.content, OCI_INDEX, ManifestBlobUnknown,
                         absent_child.children[0].digest),
        "child-size-disagrees": (encode(wrong_child_size), OCI_INDEX, ManifestInvalid,
                                 f"the manifest has {pushed.size}"),
        "too-large": (encode({**good, "annotations": {"pad": "x" * 5000}}), OCI_MANIFEST,
                      ManifestTooLarge, "limit"),
        "malformed-json": (encode(good)[:-5], OCI_MANIFEST, ManifestInvalid, "not valid JSON"),
        "not-an-object": (b'["schemaVersion", 2]', OCI_MANIFEST, ManifestInvalid,
                          "not a JSON object"),
        "schema-version-3": (changed(("schemaVersion",), 3), None, ManifestInvalid,
                             "schemaVersion"),
        "wrong-media-type": (changed(("mediaType",), "application/vnd.oci.image.config.v1+json"),
                             None, ManifestInvalid, "unsupported manifest media type"),
        "content-type-mismatch": (encode({**good, "annotations": {"k": "v"}}), DOCKER_MANIFEST, ManifestInvalid, "mediaType"),
        "bad-digest": (changed(("layers", 0, "digest"), "sha256:1234"), None, ManifestInvalid,
                       "layers[0]"),
        "negative-size": (changed(("layers", 0, "size"), -1), None, ManifestInvalid,
                          "layers[0] has no valid size"),
        "config-size-disagrees": (changed(("config", "size"), CFG.size + 1), None,
                                  ManifestInvalid, f"the blob has {CFG.size}"),
        "layer-size-disagrees": (changed(("layers", 0, "size"), 199), None, ManifestInvalid,
                                 f"says 199 bytes, the blob has {LAYER.size}"),
        "schema1": (schema1_manifest(), None, Unsupported, "schema 1"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
@pytest.mark.parametrize("reference", ["tag", "digest"])
def test_a_refused_manifest_leaves_nothing(engine: Engine, case: str, reference: str) -> None:
    reg = Registry(engine, max_manifest_size=4096)
    push(reg, "team/app", oci_manifest(CFG, [LAYER]), "v0")
    reg.ingest_blob("team/other", ELSEWHERE.content)
    body, content_type, error, fragment = _bad_cases()[case]
    before = snapshot(reg)
    keys_before = own_keys(engine, "team/app")
    ref = "v1" if reference == "tag" else digest_of(body)
    with pytest.raises(error) as info:
        reg.put_manifest("team/app", ref, body, content_type)
    assert fragment in str(info.value), str(info.value)
    assert snapshot(reg) == before  # no tag, no record, no link, no new blob, usage as it was
    assert own_keys(engine, "team/app") == keys_before
    assert not engine.exists(digest_of(body))
    assert reg.tag_map("team/app") == {"v0": oci_manifest(CFG, [LAYER]).digest}
    with pytest.raises(ManifestNotFound):
        reg.resolve("team/app", digest_of(body))


def test_a_refused_manifest_creates_no_repository(reg: Registry) -> None:
    before = snapshot(reg)
    with pytest.raises(ManifestBlobUnknown):
        reg.put_manifest("fresh", "v1", oci_manifest(CFG, [LAYER]).content)
    assert not reg.repository_exists("fresh")
    assert snapshot(reg) == before


def test_put_by_digest(reg: Registry) -> None:
    image, other = simple_image("a"), simple_image("b")
    push_blobs(reg, "app", image.blobs)
    before = snapshot(reg)
    with pytest.raises(DigestMismatch) as info:
        reg.put_manifest("app", other.digest, image.content)
    assert (str(info.value.expected), str(info.value.actual)) == (other.digest, image.digest)
    with pytest.raises(InvalidDigest):
        reg.put_manifest("app", "sha256:abc", image.content)
    assert snapshot(reg) == before
    reg.put_manifest("app", image.digest, image.content)
    assert reg.tags("app").items == []  # by digest: no tag
    assert reg.get_manifest("app", image.digest)[0] == image.content
    # the same bytes again, now by tag: one record, one more tag
    reg.put_manifest("app", "v1", image.content)
    assert [r.digest for r in reg.manifests("app")] == [image.digest]
    assert reg.tag_map("app") == {"v1": image.digest}


@pytest.mark.parametrize("rot", ["same size", "truncated"])
def test_a_damaged_manifest_is_never_returned(reg: Registry, rot: str) -> None:
    """Bit rot in a manifest's stored bytes: a pull must fail, never get other bytes
    under the digest it asked for."""
    reg.engine.compression = Policy.parse("never")  # raw: no zstd frame check to trip
    m = simple_image("rot")
    push(reg, "a", m, "v1")
    record = reg.engine.stat(m.digest)
    assert record.codec == "raw"
    rotten = m.content.replace(b"schemaVersion", b"schemaVersioN") if rot == "same size" \
        else m.content[:-1]
    reg.engine.backend.put(blob_key(Digest.parse(m.digest), "raw"), rotten)
    for reference in ("v1", m.digest):
        with pytest.raises(CorruptObject, match="casengine check"):
            reg.get_manifest("a", reference)


def test_foreign_layers_need_not_be_pushed(reg: Registry) -> None:
    foreign = B(b"windows base", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    cfg = config("win", DOCKER_CONFIG)
    m = docker_manifest(cfg, [foreign, layer("app", 10, DOCKER_LAYER)])
    push_blobs(reg, "win", m.blobs[::2])
    reg.put_manifest("win", "v1", m.content)
    assert reg.resolve("win", "v1").refs == (cfg.digest, m.blobs[2].digest)


# -- blob membership ----------------------------------------------------------------------------


def test_a_blob_is_readable_only_where_it_is_linked(reg: Registry) -> None:
    data = b"layer bytes" * 100
    d = _digest(reg.ingest_blob("a", data).digest)
    reg.create_repository("b")
    assert b"".join(reg.read_blob("a", d)) == data
    assert b"".join(reg.read_blob("a", d, 6, 5)) == data[6:11]
    assert reg.stat_blob("a", d).size == len(data)
    assert reg.engine.exists(d)  # in the global store...
    with pytest.raises(BlobNotFound):  # ...but not in b
        reg.stat_blob("b", d)
    with pytest.raises(BlobNotFound):
        reg.read_blob("b", d)
    assert not reg.is_linked("b", d)
    assert reg.unlink("a", d) is True
    assert reg.unlink("a", d) is False
    with pytest.raises(BlobNotFound):
        reg.read_blob("a", d)
    assert reg.engine.exists(d)  # unlink never deletes bytes
    assert not reg.engine.backend.exists(link_key("a", Digest.parse(d)))


def test_a_manifest_refused_in_its_transaction_leaves_no_records(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob swept between the reference check and the recording transaction: the push
    is refused, and the backend's records (which reindex reads) still agree with the index,
    the tag it would have moved included."""
    old = simple_image("old")
    push(reg, "a", old, "v1")
    new = simple_image("new")
    push_blobs(reg, "a", new.blobs)
    check = reg._check_references

    def then_swept(repo: str, manifest: Any) -> tuple[str, ...]:
        refs = check(repo, manifest)
        reg.unlink(repo, new.blobs[0].digest)  # as GC would, just after the check
        return refs

    monkeypatch.setattr(reg, "_check_references", then_swept)
    with pytest.raises(ManifestBlobUnknown):
        reg.put_manifest("a", "v1", new.content, new.media_type)
    assert backend_records(reg.engine, "a") == index_records(reg, "a")
    assert reg.tag_map("a") == {"v1": old.digest}


def test_unlink_refuses_a_blob_a_manifest_needs(reg: Registry) -> None:
    m = simple_image("needs")
    push(reg, "a", m, "v1")
    for d in (m.digest, *(b.digest for b in m.blobs)):
        with pytest.raises(InUse):
            reg.unlink("a", d)
        assert reg.is_linked("a", d)
    push_blobs(reg, "b", m.blobs)  # another repository's links are its own
    assert all(reg.unlink("b", b.digest) for b in m.blobs)
    reg.delete_manifest("a", m.digest)
    assert all(reg.unlink("a", b.digest) for b in m.blobs)


def test_an_index_child_is_deleted_only_after_its_index(reg: Registry) -> None:
    child = simple_image("child")
    idx = index([child])
    push(reg, "a", idx, "v1")
    with pytest.raises(InUse, match="child of an index"):
        reg.delete_manifest("a", child.digest)
    assert reg.tag_map("a") == {"v1": idx.digest}
    assert reg.resolve("a", child.digest).digest == child.digest
    assert reg.delete_manifest("a", idx.digest) and reg.delete_manifest("a", child.digest)


def test_mount(reg: Registry) -> None:
    data = b"base layer" * 1000
    d = _digest(reg.ingest_blob("team/a", data).digest)
    reg.create_repository("team/lacks")
    blobs, objects = reg.engine.index.count_blobs(), blob_objects(reg.engine)
    assert reg.mount("team/b", d, from_repo="team/a") is True
    assert b"".join(reg.read_blob("team/b", d)) == data
    assert (reg.engine.index.count_blobs(), blob_objects(reg.engine)) == (blobs, objects)  # no copy
    assert backend_records(reg.engine, "team/b")["links"] == {d}
    # from a repository that lacks it, or does not exist: False, nothing linked
    assert reg.mount("team/c", d, from_repo="team/lacks") is False
    assert reg.mount("team/c", d, from_repo="team/nowhere") is False
    assert not reg.is_linked("team/c", d)
    with pytest.raises((BlobNotFound, RepositoryNotFound)):  # a failed mount creates nothing
        reg.stat_blob("team/c", d)
    # readable applies to a named source as well
    assert reg.mount("team/c", d, from_repo="team/a", readable=lambda r: False) is False
    assert not reg.is_linked("team/c", d)


def test_automatic_mount_respects_readable(reg: Registry) -> None:
    d = _digest(reg.ingest_blob("secret/only", b"private layer").digest)
    reg.create_repository("public/x")
    assert reg.mount("me/app", d, readable=lambda r: not r.startswith("secret/")) is False
    assert not reg.is_linked("me/app", d)
    assert reg.mount("me/app", digest_of(b"never stored")) is False
    assert reg.mount("me/app", d, readable=lambda r: r == "secret/only") is True
    assert reg.is_linked("me/app", d)
    # now me/app holds it too: a mount from there works where secret/ is not readable
    assert reg.mount("you/app", d, readable=lambda r: not r.startswith("secret/")) is True
    assert reg.engine.index.count_blobs() == 1


# -- upload sessions bound to a repository ------------------------------------------------------


def test_upload_sessions_are_bound_to_their_repository(reg: Registry) -> None:
    reg.create_repository("b")
    status = reg.start_upload("a")
    uid = status.id
    assert status.repository == "a" and status.offset == 0
    for wrong in (lambda: reg.upload_status("b", uid),
                  lambda: reg.append_upload("b", uid, b"x", 0),
                  lambda: reg.commit_upload("b", uid, digest_of(b""), last=b""),
                  lambda: reg.cancel_upload("b", uid)):
        with pytest.raises(UploadNotFound):
            wrong()
    assert reg.engine.uploads.status(uid).offset == 0  # untouched by the refused calls
    assert reg.append_upload("a", uid, b"hello ", 0).offset == 6
    result = reg.commit_upload("a", uid, digest_of(b"hello world"), last=b"world")
    assert (_digest(result.digest), result.size) == (digest_of(b"hello world"), 11)
    assert reg.is_linked("a", result.digest) and not reg.is_linked("b", result.digest)
    assert b"".join(reg.read_blob("a", result.digest)) == b"hello world"
    with pytest.raises(UploadNotFound):
        reg.upload_status("a", uid)  # finished


def test_a_commit_that_fails_to_link_leaves_its_session_for_the_retry(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob is published before it is linked into the repository: a failure (or a
    crash) in between must not leave the client without both the session and the blob."""
    uid = reg.start_upload("a").id
    reg.append_upload("a", uid, b"hello world", 0)
    d = digest_of(b"hello world")

    def unreachable(repo: str, digest: object) -> None:
        raise BackendError("the backend went away")

    with monkeypatch.context() as m:
        m.setattr(reg, "link", unreachable)
        with pytest.raises(BackendError):
            reg.commit_upload("a", uid, d)
    assert reg.engine.exists(d) and not reg.is_linked("a", d)
    assert reg.upload_status("a", uid).offset == 11
    assert not reg.commit_upload("a", uid, d).created  # the retried PUT
    assert reg.is_linked("a", d) and b"".join(reg.read_blob("a", d)) == b"hello world"
    with pytest.raises(UploadNotFound):
        reg.upload_status("a", uid)


def test_cancel_and_unbound_uploads(reg: Registry) -> None:
    status = reg.start_upload("a")
    reg.append_upload("a", status.id, b"abc", 0)
    reg.cancel_upload("a", status.id)
    with pytest.raises(UploadNotFound):
        reg.append_upload("a", status.id, b"d", 3)
    assert list(reg.engine.uploads.list()) == []
    unbound = reg.engine.uploads.start()  # a session of the bare store belongs to no repo
    with pytest.raises(UploadNotFound):
        reg.commit_upload("a", unbound.id, digest_of(b""))
    with pytest.raises(UploadNotFound):
        reg.upload_status("a", "not-an-id")


# -- deletes ------------------------------------------------------------------------------------


def test_delete_manifest_removes_its_tags(reg: Registry) -> None:
    one, two = simple_image("one"), simple_image("two")
    push(reg, "app", one, "v1")
    reg.put_manifest("app", "latest", one.content)
    push(reg, "app", two, "v2")
    blobs = sorted(r.digest for r in reg.engine.list())
    reg.delete_manifest("app", one.digest)
    assert reg.tag_map("app") == {"v2": two.digest}
    for ref in ("v1", "latest", one.digest):
        with pytest.raises(ManifestNotFound):
            reg.resolve("app", ref)
    assert [r.digest for r in reg.manifests("app")] == [two.digest]
    records = backend_records(reg.engine, "app")
    assert records["tags"] == {"v2": two.digest}
    assert records["manifests"] == {two.digest}
    assert sorted(r.digest for r in reg.engine.list()) == blobs  # bytes stay for GC
    with pytest.raises(ManifestNotFound):
        reg.delete_manifest("app", one.digest)


def test_delete_tag_leaves_the_manifest(reg: Registry) -> None:
    image = simple_image("x")
    push(reg, "app", image, "v1")
    reg.put_manifest("app", "v2", image.content)
    reg.delete_tag("app", "v1")
    assert reg.tag_map("app") == {"v2": image.digest}
    assert reg.get_manifest("app", image.digest)[0] == image.content
    assert backend_records(reg.engine, "app")["tags"] == {"v2": image.digest}
    with pytest.raises(ManifestNotFound):
        reg.delete_tag("app", "v1")
    reg.delete_tag("app", "v2")
    assert reg.tags("app").items == []
    assert reg.resolve("app", image.digest).digest == image.digest
    assert not reg.engine.backend.exists(tag_key("app", "v2"))


def test_retag_moves_the_tag(reg: Registry) -> None:
    one, two = simple_image("one"), simple_image("two")
    push(reg, "app", one, "latest")
    push(reg, "app", two, "latest")
    assert reg.tag_map("app") == {"latest": two.digest}
    assert reg.engine.backend.get(tag_key("app", "latest")).decode() == two.digest
    assert {r.digest for r in reg.manifests("app")} == {one.digest, two.digest}


def test_delete_repository_removes_everything_of_it_but_the_blobs(reg: Registry) -> None:
    image = simple_image("img", base=layer("base", 500))
    sig = oci_manifest(config("sig"), [layer("sig")], subject=image, artifact_type=SIG)
    for repo in ("team/app", "team/keep"):
        push(reg, repo, image, "v1")
        push(reg, repo, sig, "sig")
        reg.ingest_blob(repo, b"pushed, never referenced")
    keep = (index_records(reg, "team/keep"), backend_records(reg.engine, "team/keep"),
            reg.repository("team/keep"))
    blobs = sorted(r.digest for r in reg.engine.list())
    reg.delete_repository("team/app")
    assert not reg.repository_exists("team/app")
    assert list(reg.repositories()) == ["team/keep"]
    for table in REPO_TABLES:
        assert index_rows(reg, "team/app", table) == {}, table
    assert list(reg.engine.backend.list(f"{REPOSITORIES}team/app/")) == []
    assert sorted(r.digest for r in reg.engine.list()) == blobs
    assert (index_records(reg, "team/keep"), backend_records(reg.engine, "team/keep"),
            reg.repository("team/keep")) == keep
    with pytest.raises(RepositoryNotFound):
        reg.tags("team/app")
    # the name can be used again, from scratch
    push(reg, "team/app", simple_image("again"), "v1")
    assert reg.tags("team/app").items == ["v1"]
    assert reg.referrers("team/app", image.digest) == []


def test_delete_repository_spares_nested_repositories(reg: Registry) -> None:
    push(reg, "team/app", simple_image("nested"), "v1")
    reg.create_repository("team")
    records = backend_records(reg.engine, "team/app")
    keys = own_keys(reg.engine, "team/app")
    reg.delete_repository("team")
    assert reg.tags("team/app").items == ["v1"]  # the index still has it...
    assert own_keys(reg.engine, "team/app") == keys  # ...and so must the backend
    assert backend_records(reg.engine, "team/app") == records


# -- durable records ----------------------------------------------------------------------------


def test_backend_records_match_the_index(reg: Registry) -> None:
    base = layer("base", 400)
    amd, arm = simple_image("amd", base=base), simple_image("arm", base=base)
    push(reg, "team/a", amd, "amd")
    push(reg, "team/a", arm)
    push(reg, "team/a", index([amd, arm]), "latest")
    push(reg, "team/a", simple_image("old"), "old")
    reg.delete_tag("team/a", "amd")
    reg.ingest_blob("team/a", b"loose blob")
    reg.mount("team/b", base.digest, from_repo="team/a")
    b_image = simple_image("b", base=base)
    push(reg, "team/b", b_image, "v1")
    push(reg, "team/b", simple_image("b2"), "v1")  # retag
    reg.delete_manifest("team/b", simple_image("b2").digest)
    reg.create_repository("team/empty")
    reg.unlink("team/a", digest_of(b"loose blob"))
    for repo in reg.repositories():
        from_backend, from_index = backend_records(reg.engine, repo), index_records(reg, repo)
        assert from_backend == from_index, repo
        assert reg.engine.backend.exists(repo_key(repo, "_repo"))
    a = backend_records(reg.engine, "team/a")
    assert a["tags"] == {"latest": index([amd, arm]).digest, "old": simple_image("old").digest}
    assert {amd.digest, arm.digest, base.digest} <= a["links"]
    assert digest_of(b"loose blob") not in a["links"]
    assert backend_records(reg.engine, "team/b")["tags"] == {}
    for repo, m in (("team/a", amd.digest), ("team/b", b_image.digest)):
        assert reg.resolve(repo, m).digest == m
        assert reg.engine.backend.exists(manifest_key(repo, Digest.parse(m)))
