"""casengine.registry.usage: exact logical, physical and shared bytes per repository,
namespace and in total, with blobs shared across repositories and namespaces; and quotas
that refuse the push (blob, upload, mount, manifest) that would cross them, leaving nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from casengine.engine import Engine
from casengine.errors import InvalidInput, ManifestBlobUnknown, QuotaExceeded
from casengine.registry import Registry, usage
from casengine.registry.usage import Usage
from tests.helpers import KINDS, digest_of, open_engine
from tests.registry_helpers import (
    Manifest,
    config,
    index,
    layer,
    oci_manifest,
    push,
    push_blobs,
    simple_image,
    snapshot,
)


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(request.param, tmp_path)
    yield e
    e.close()


@pytest.fixture
def reg(engine: Engine) -> Registry:
    return Registry(engine)


BASE = layer("base", 1000)


@dataclass
class Scenario:
    a: Manifest
    b: Manifest
    c: Manifest

    @staticmethod
    def own(m: Manifest) -> int:
        """Bytes of a manifest, its config and its layers other than BASE."""
        return m.size + sum(b.size for b in m.blobs if b != BASE)


def _scenario(reg: Registry) -> Scenario:
    """team/a, team/b and other/c, all three on the same 1000-byte base layer."""
    s = Scenario(
        a=oci_manifest(config("a"), [BASE, layer("a", 100)]),
        b=oci_manifest(config("b"), [BASE, layer("b", 200)]),
        c=oci_manifest(config("c"), [BASE]),
    )
    push(reg, "team/a", s.a, "v1")
    assert reg.mount("team/b", BASE.digest, from_repo="team/a")
    push_blobs(reg, "team/b", [s.b.blobs[0], s.b.blobs[2]])
    reg.put_manifest("team/b", "v1", s.b.content)
    push(reg, "other/c", s.c, "v1")
    return s


def _u(u: Usage) -> tuple[str, int, int, int, int]:
    return (u.name, u.repositories, u.logical, u.physical, u.shared)


def _check_report(reg: Registry, s: Scenario) -> None:
    a, b, c = (Scenario.own(m) for m in (s.a, s.b, s.c))
    report = usage(reg)
    assert [_u(u) for u in report.repositories] == [
        ("other/c", 1, c + 1000, c + 1000, 0),
        ("team/a", 1, a + 1000, a + 1000, 0),
        ("team/b", 1, b + 1000, b + 1000, 0),
    ]
    assert [_u(u) for u in report.namespaces] == [
        ("other/", 1, c + 1000, c + 1000, 0),
        ("team/", 2, a + b + 2000, a + b + 1000, 1000),
    ]
    assert _u(report.total) == ("", 3, a + b + c + 3000, a + b + c + 1000, 2000)
    # the running per-repository figure agrees with the report
    for u in report.repositories:
        assert reg.repository(u.name)["logical"] == u.logical == reg.quotas.used(u.name)
    assert reg.quotas.used("team/") == a + b + 2000
    assert reg.quotas.used("other/") == c + 1000


def test_usage_with_a_base_layer_shared_across_repositories_and_namespaces(
        reg: Registry) -> None:
    s = _scenario(reg)
    _check_report(reg, s)
    a, b = Scenario.own(s.a), Scenario.own(s.b)
    team = usage(reg, "team/")
    assert [u.name for u in team.repositories] == ["team/a", "team/b"]
    assert [_u(u) for u in team.namespaces] == [("team/", 2, a + b + 2000, a + b + 1000, 1000)]
    assert _u(team.total) == ("team/", 2, a + b + 2000, a + b + 1000, 1000)
    total = usage(reg, "team/a").to_json()["total"]
    assert 0 < total.pop("stored_bytes") <= a + 1000  # compressed blobs count compressed
    assert total == {"name": "team/a", "repositories": 1, "logical_bytes": a + 1000,
                     "physical_bytes": a + 1000, "shared_bytes": 0}
    assert _u(usage(reg, "nothing/").total) == ("nothing/", 0, 0, 0, 0)


def test_failed_and_abandoned_pushes_are_never_charged(reg: Registry) -> None:
    s = _scenario(reg)
    reg.ingest_blob("team/a", layer("loose", 5000).content)  # pushed, never referenced
    upload = reg.start_upload("team/b")
    reg.append_upload("team/b", upload.id, b"x" * 3000, 0)  # abandoned midway
    reg.ingest_blob("other/c", layer("half", 700).content)
    with pytest.raises(ManifestBlobUnknown):  # refers to a blob never pushed
        reg.put_manifest("other/c", "v2", oci_manifest(config("c2"), [layer("half", 700),
                                                                       layer("gone")]).content)
    _check_report(reg, s)


def test_usage_follows_tags_and_manifests(reg: Registry) -> None:
    s = _scenario(reg)
    a = Scenario.own(s.a)
    reg.put_manifest("team/a", "again", s.a.content)  # same manifest, another tag: no change
    retagged = oci_manifest(config("a"), [BASE, layer("a", 100)], annotations={"k": "v"})
    reg.put_manifest("team/a", "v2", retagged.content)  # same blobs: only its own bytes
    assert reg.repository("team/a")["logical"] == a + 1000 + retagged.size
    reg.delete_tag("team/a", "v2")  # a tag is not storage
    assert reg.repository("team/a")["logical"] == a + 1000 + retagged.size
    reg.delete_manifest("team/a", retagged.digest)
    _check_report(reg, s)
    reg.delete_manifest("team/a", s.a.digest)
    assert reg.repository("team/a")["logical"] == 0
    report = usage(reg)
    assert [_u(u) for u in report.namespaces][1][1:] == (2, Scenario.own(s.b) + 1000,
                                                         Scenario.own(s.b) + 1000, 0)
    reg.delete_repository("other/c")
    assert [u.name for u in usage(reg).repositories] == ["team/a", "team/b"]
    assert usage(reg).total.logical == Scenario.own(s.b) + 1000


def test_usage_of_an_index_and_nested_namespaces(reg: Registry) -> None:
    amd = oci_manifest(config("amd"), [BASE, layer("amd", 10)])
    arm = oci_manifest(config("arm"), [BASE, layer("arm", 20)])
    multi = index([amd, arm])
    push(reg, "team/sub/multi", multi, "latest")
    expected = multi.size + Scenario.own(amd) + Scenario.own(arm) + 1000  # base counted once
    assert reg.repository("team/sub/multi")["logical"] == expected
    report = usage(reg)
    assert [_u(u) for u in report.namespaces] == [
        ("team/", 1, expected, expected, 0), ("team/sub/", 1, expected, expected, 0)]
    push(reg, "team/x", oci_manifest(config("x"), [BASE]), "v1")
    x = Scenario.own(oci_manifest(config("x"), [BASE])) + 1000
    team = {u.name: _u(u) for u in usage(reg).namespaces}["team/"]
    assert team == ("team/", 2, expected + x, expected + x - 1000, 1000)


# -- quotas -------------------------------------------------------------------------------------


def test_quota_settings(reg: Registry) -> None:
    reg.quotas.set("team/", 1024)
    reg.quotas.set("other/c", 10)
    assert reg.quotas.all() == {"other/c": 10, "team/": 1024}
    reg.quotas.set("team/", None)
    assert reg.quotas.all() == {"other/c": 10}
    for prefix, limit in (("", 10), ("team/", -1)):
        with pytest.raises(InvalidInput):
            reg.quotas.set(prefix, limit)
    assert reg.quotas.all() == {"other/c": 10}


@pytest.fixture
def near_limit(reg: Registry) -> tuple[Registry, Scenario, int]:
    """The scenario, with a quota on team/ leaving exactly 50 bytes of room."""
    s = _scenario(reg)
    used = reg.quotas.used("team/")
    reg.quotas.set("team/", used + 50)
    reg.create_repository("team/new")
    return reg, s, used


def _refused(reg: Registry, call, *, stored: list[str] = ()) -> None:  # type: ignore[assignment]
    before = snapshot(reg)
    report = usage(reg).to_json()
    with pytest.raises(QuotaExceeded) as info:
        call()
    msg = str(info.value)
    assert "team/" in msg and "nothing was stored" in msg
    assert snapshot(reg) == before  # no link, no new blob, no record
    assert usage(reg).to_json() == report
    for d in stored:
        assert reg.engine.exists(d)


def test_quota_refuses_a_blob_push_that_would_cross_it(near_limit) -> None:
    reg, _, used = near_limit
    big = layer("big", 51)
    _refused(reg, lambda: reg.ingest_blob("team/new", big.content, size=big.size))
    _refused(reg, lambda: reg.ingest_blob("team/new", big.content))  # size learnt afterwards
    _refused(reg, lambda: reg.ingest_blob("team/a", big.content, digest=big.digest))
    assert not reg.engine.exists(big.digest)
    assert not reg.is_linked("team/new", big.digest)
    # a blob the store already holds for another namespace stays there
    reg.ingest_blob("other/c", big.content)
    _refused(reg, lambda: reg.ingest_blob("team/new", big.content), stored=[big.digest])
    assert b"".join(reg.read_blob("other/c", big.digest)) == big.content
    # within the quota: fine (and not charged until a manifest refers to it)
    fits = layer("fits", 50)
    reg.ingest_blob("team/new", fits.content, size=50)
    assert reg.is_linked("team/new", fits.digest)
    assert reg.quotas.used("team/") == used
    # outside the namespace the quota does not apply
    reg.ingest_blob("other/c", layer("huge", 5000).content)


def test_quota_refuses_an_upload_commit_that_would_cross_it(near_limit) -> None:
    reg, _, _ = near_limit
    data = b"u" * 51
    up = reg.start_upload("team/new")
    reg.append_upload("team/new", up.id, data, 0)
    _refused(reg, lambda: reg.commit_upload("team/new", up.id, digest_of(data)))
    up2 = reg.start_upload("team/new")
    reg.append_upload("team/new", up2.id, data[:40], 0)  # fits so far; the last chunk crosses
    _refused(reg, lambda: reg.commit_upload("team/new", up2.id, digest_of(data),
                                            last=data[40:]))
    assert not reg.engine.exists(digest_of(data))
    up3 = reg.start_upload("team/new")
    result = reg.commit_upload("team/new", up3.id, digest_of(data[:50]), last=data[:50])
    assert reg.is_linked("team/new", result.digest)


def test_quota_refuses_a_mount_that_would_cross_it(near_limit) -> None:
    reg, _, _ = near_limit
    big, small = layer("big", 51), layer("small", 50)
    for b in (big, small):
        reg.ingest_blob("other/c", b.content)
    _refused(reg, lambda: reg.mount("team/new", big.digest, from_repo="other/c"),
             stored=[big.digest])
    _refused(reg, lambda: reg.mount("team/new", big.digest), stored=[big.digest])
    assert not reg.is_linked("team/new", big.digest)
    assert reg.mount("team/new", small.digest, from_repo="other/c") is True


def test_quota_refuses_a_manifest_that_would_cross_it(reg: Registry) -> None:
    _scenario(reg)
    used = reg.quotas.used("team/")
    l1, l2, cfg = layer("m1", 40), layer("m2", 40), config("m")
    m = oci_manifest(cfg, [l1, l2])
    need = m.size + cfg.size + 80
    reg.quotas.set("team/", used + need - 1)
    push_blobs(reg, "team/new", [l1, l2, cfg])  # each blob fits on its own...
    assert reg.quotas.used("team/") == used  # ...and is not charged yet
    _refused(reg, lambda: reg.put_manifest("team/new", "v1", m.content))  # all together do not
    assert not reg.engine.exists(m.digest)
    assert reg.tags("team/new").items == []
    reg.quotas.set("team/", used + need)  # exactly at the limit is fine
    reg.put_manifest("team/new", "v1", m.content)
    assert reg.quotas.used("team/") == used + need
    assert reg.quotas.used("team/new") == need
    # now only a manifest's own bytes are new: even that is refused at the limit
    again = oci_manifest(cfg, [l1, l2], annotations={"p": "q"})
    _refused(reg, lambda: reg.put_manifest("team/new", "v2", again.content))
    reg.quotas.set("team/", used + need + again.size)
    reg.put_manifest("team/new", "v2", again.content)
    assert reg.quotas.used("team/") == used + need + again.size
    # the same manifest under another tag adds nothing: accepted at the limit
    reg.put_manifest("team/new", "v3", again.content)
    assert reg.tag_map("team/new") == {"v1": m.digest, "v2": again.digest, "v3": again.digest}


def test_a_quota_on_one_repository(reg: Registry) -> None:
    s = _scenario(reg)
    reg.quotas.set("team/a", reg.quotas.used("team/a"))
    big = layer("q", 10)
    with pytest.raises(QuotaExceeded, match="team/a"):
        reg.ingest_blob("team/a", big.content, size=big.size)
    reg.ingest_blob("team/b", big.content, size=big.size)  # team/b is not covered
    reg.ingest_blob("team/ab", big.content, size=big.size)  # nor is team/ab
    reg.delete_repository("team/ab")
    _check_report(reg, s)


def test_a_blob_already_referenced_adds_nothing(reg: Registry) -> None:
    s = _scenario(reg)
    reg.quotas.set("team/", reg.quotas.used("team/"))
    reg.ingest_blob("team/a", BASE.content, digest=BASE.digest, size=BASE.size)
    assert reg.mount("team/b", BASE.digest, from_repo="team/a")
    _check_report(reg, s)


def test_refused_pushes_leave_usage_unchanged(reg: Registry) -> None:
    s = _scenario(reg)
    reg.quotas.set("team/", 0)  # already over: every new byte is refused
    for call in (lambda: reg.ingest_blob("team/a", b"one byte"),
                 lambda: reg.put_manifest("team/a", "x", oci_manifest(
                     config("a"), [BASE], annotations={"new": "1"}).content)):
        before = snapshot(reg)
        with pytest.raises(QuotaExceeded):
            call()
        assert snapshot(reg) == before
    _check_report(reg, s)


def test_over_a_quota_a_push_that_adds_nothing_is_accepted(reg: Registry) -> None:
    """A quota lowered below what is used: new bytes are refused, but a client's retry of
    the same manifest, or a new tag of it, uses nothing more and must not fail."""
    _scenario(reg)
    m = oci_manifest(config("over"), [layer("over", 50)])
    push_blobs(reg, "team/new", [*m.blobs])
    reg.put_manifest("team/new", "v1", m.content)
    reg.quotas.set("team/", 1)  # far below what team/ uses now
    reg.put_manifest("team/new", "v1", m.content)  # the retry
    reg.put_manifest("team/new", "v2", m.content)  # another tag
    reg.ingest_blob("team/new", m.blobs[0].content, digest=m.blobs[0].digest)  # re-push
    assert reg.tag_map("team/new") == {"v1": m.digest, "v2": m.digest}
    with pytest.raises(QuotaExceeded):
        reg.ingest_blob("team/new", b"a new byte")


def test_repo_rm_of_a_repository_with_an_index(reg: Registry) -> None:
    """The children of an index are refused a delete while the index stands; removing the
    repository takes the index first, whatever the digests' order."""
    children = [simple_image(f"child-{n}") for n in range(4)]
    push(reg, "team/multi", index(children), "v1")
    reg.delete_repository("team/multi")
    assert not reg.repository_exists("team/multi")
    assert list(reg.backend.list("repositories/team/multi/")) == []
