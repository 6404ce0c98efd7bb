"""``casengine check --repair`` (:mod:`casengine.repair`): safe while the registry serves,
never mistaking a wrong record for damaged bytes, keeping what a restore needs, and making
the backend's records say what the index (the acknowledged truth) says.

The registry is the one of :mod:`tests.test_check`. What a serving registry does while a
repair runs is done for real, through the model, at the moment the check reaches a given
step (a hook on the real backend's listing or file lookup), so that the interleaving that
lost data is the one that happens every time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from casengine.check import Checker
from casengine.index import pack_blob
from casengine.layout import repo_key, tag_key
from casengine.repair import Left
from casengine.verify import Verdict
from tests.helpers import digest_of
from tests.registry_helpers import config, layer, oci_manifest, push, simple_image
from tests.test_check import (
    WORKERS,
    Run,
    World,
    age,
    check,
    kinds,
    one,
    quarantined,
    recheck,
    world_for,
)
from tests.test_check import cli as cli  # noqa: PLC0414 (the fixture, under its name)


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> World:
    return world_for("local", tmp_path, request)


# -- while the registry serves ---------------------------------------------------------------


def test_a_tag_and_a_referrer_pushed_while_repair_runs_stay(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push lands after check has looked at the repository's manifests and before it
    looks at its tags and referrer entries: neither is taken for dangling."""
    store = world.store
    fresh = simple_image("fresh")
    sig = oci_manifest(config("fresh-sig"), [layer("fresh-sig", 64)], subject=fresh,
                       artifact_type="application/vnd.example.signature")
    with store.registry() as reg:
        real_list, pushed = reg.backend.list, []

        def list_(prefix: str = "") -> Any:
            if prefix == repo_key("team/app", "_tags/") and not pushed:
                pushed.append(True)
                push(reg, "team/app", fresh, "fresh")
                push(reg, "team/app", sig)
            return real_list(prefix)

        monkeypatch.setattr(reg.backend, "list", list_)
        report = Checker(reg, repair=True).run()
        assert pushed
        assert reg.tag_map("team/app")["fresh"] == fresh.digest
        assert [d["digest"] for d in reg.referrers("team/app", fresh.digest)] == [sig.digest]
    assert report.clean, report.to_json()


def test_an_object_whose_record_lands_while_repair_hashes_it_stays(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ingest between publishing its object and recording it: check finds the object
    unrecorded, and the ingest records it (and is acknowledged) while check re-hashes it."""
    store = world.store
    data = b"a blob whose ingest is between its publish and its record" * 100
    digest = digest_of(data)
    store.put(world.key(digest), data)  # published, not yet recorded
    with store.registry() as reg:
        real_path, ingested = reg.backend.local_path, []

        def local_path(key: str) -> str:
            if key == world.key(digest) and not ingested:
                ingested.append(reg.engine.ingest(data, digest=digest))
            return real_path(key)

        monkeypatch.setattr(reg.backend, "local_path", local_path)
        report = Checker(reg, repair=True).run()
        assert ingested
        assert b"".join(reg.engine.read(digest)) == data
    assert quarantined(store) == {}
    assert [f.repaired for f in report.findings] == [
        "recorded meanwhile (its publish was in progress)"]


def test_a_blob_deleted_while_check_reads_it_is_no_finding(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """``blob rm`` (or GC) takes an unlinked blob while check reads it: its record went
    with its object, so nothing is wrong, and repair has nothing to do."""
    store = world.store
    data = b"an unlinked blob, deleted while it is checked" * 50
    with store.registry() as reg:
        digest = str(reg.engine.ingest(data).digest)
        real_path, deleted = reg.backend.local_path, []

        def local_path(key: str) -> str:
            if key == world.key(digest) and not deleted:
                deleted.append(reg.engine.delete(digest))
            return real_path(key)

        monkeypatch.setattr(reg.backend, "local_path", local_path)
        report = Checker(reg, repair=True).run()
    assert deleted == [True]
    assert report.clean, report.to_json()


def test_each_repair_looks_again_where_it_acts(world: World) -> None:
    """What check found has changed by the time repair acts: each step sees it inside its
    own transaction, and holds back."""
    store = world.store
    a1, sig = world.images["a1"], world.images["sig"]
    cfg, lay = a1.blobs[0].digest, world.images["s1"].blobs[1].digest
    ghost = simple_image("ghost").digest
    with store.registry() as reg:
        fixer = Checker(reg, repair=True).fixer
        with pytest.raises(Left, match="moved"):  # re-tagged meanwhile
            fixer.drop_tag("team/app", "v1", ghost)
        assert fixer.unlink("team/app", cfg) == "the blob was stored meanwhile"
        assert fixer.drop_referrer("team/app", a1.digest, sig.digest) == \
            "its manifest was recorded meanwhile"
        found = replace(reg.engine.stat(lay), stored_size=1)  # the record check saw
        with pytest.raises(Left, match="record changed"):
            fixer.blob(Verdict(found, "truncated", "object has 700 bytes, the record says 1"))
        assert reg.tag_map("team/app")["v1"] == a1.digest and reg.is_linked("team/app", cfg)
        assert [d["digest"] for d in reg.referrers("team/app", a1.digest)] == [sig.digest]
    assert quarantined(store) == {}
    recheck(world)


# -- a wrong record over intact bytes ----------------------------------------------------------


def test_a_stale_record_over_an_intact_object_is_rewritten_not_quarantined(
        world: World, cli: Callable[..., Run]) -> None:
    """Records from an older copy of the index: one with another stored size and xxh3 (the
    blob since stored again at another zstd level), one with only another xxh3."""
    store = world.store
    cfg, lay = world.images["a2"].blobs[0].digest, world.images["s1"].blobs[1].digest
    with store.engine() as engine, engine.index.transaction(write=True) as txn:
        for digest, extra in ((cfg, 10), (lay, 0)):
            r = engine.stat(digest)
            txn.put("blobs", digest.encode(), pack_blob(type(r)(
                r.digest, r.size, r.codec, r.stored_size + extra, "1" * 32, r.created,
                r.touched)))

    assert kinds(check(store)) == sorted([("stale-record", cfg), ("stale-record", lay)])
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json
    for digest in (cfg, lay):
        assert one(run.json, "stale-record", digest)["repaired"] == \
            "record rewritten from the object, which verifies against its digest"
    assert quarantined(store) == {}
    recheck(world)


def test_trailing_bytes_are_cut_and_the_whole_object_quarantined(
        world: World, cli: Callable[..., Run]) -> None:
    store, lay = world.store, world.images["s1"].blobs[1].digest
    longer = world.blobs[lay] + b"appended by accident"
    store.put(world.key(lay), longer)

    assert kinds(check(store)) == [("trailing-bytes", lay)]
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json
    assert one(run.json, "trailing-bytes", lay)["repaired"].startswith(
        f"object cut to its first {len(world.blobs[lay])} bytes")
    assert list(quarantined(store).values()) == [longer]
    assert store.get(world.key(lay)) == world.blobs[lay]
    recheck(world)


# -- what a restore needs ------------------------------------------------------------------------


def test_the_tags_of_a_manifest_kept_for_restore_stay(world: World,
                                                      cli: Callable[..., Run]) -> None:
    """a1's manifest object lost: repair keeps its record, link and tags, so the bytes
    restored from a backup bring team/app:v1 and other/svc:latest back."""
    store, a1 = world.store, world.images["a1"]
    store.delete(world.key(a1.digest))

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1  # the image is broken until the bytes come back
    tags = [f for f in run.json["findings"] if f["kind"] == "dangling-tag"]
    assert len(tags) == 2 and all(f["repaired"] is None for f in tags)
    with store.registry() as reg:
        assert reg.tag_map("team/app")["v1"] == reg.tag_map("other/svc")["latest"] == a1.digest

    store.put(world.key(a1.digest), a1.content)
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert (run.code, kinds(run.json)) == (0, [("orphan-object", a1.digest)])
    with store.registry() as reg:
        assert reg.get_manifest("team/app", "v1")[0] == a1.content
        assert reg.get_manifest("other/svc", "latest")[0] == a1.content
    recheck(world)


# -- the backend's tag records against the index ---------------------------------------------


def test_a_tag_record_that_disagrees_is_written_from_the_index(
        world: World, cli: Callable[..., Run]) -> None:
    """The backend says team/app:v1 is a2 (a re-tag never acknowledged), the index says a1:
    the index wins, as in gc --orphans -- once the record is too old to be a push in flight."""
    store, a1, a2 = world.store, world.images["a1"], world.images["a2"]
    key = tag_key("team/app", "v1")
    store.put(key, a2.digest.encode())

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1
    young = one(run.json, "tag-record")
    assert young["repaired"] is None and "younger than 10 minutes" in young["detail"]
    assert store.get(key) == a2.digest.encode()

    age(store, key)
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json
    assert one(run.json, "tag-record")["repaired"] == "backend record written from the index"
    assert store.get(key) == a1.digest.encode()
    with store.registry() as reg:
        assert reg.tag_map("team/app")["v1"] == a1.digest
    recheck(world)


@pytest.mark.parametrize("damage", [b"", b"\xffgarbage", b"sha256:not-a-digest\n"])
def test_an_unusable_tag_record_is_written_from_the_index_and_survives_reindex(
        world: World, cli: Callable[..., Run], damage: bytes) -> None:
    store, a1 = world.store, world.images["a1"]
    key = tag_key("team/app", "v1")
    store.put(key, damage)

    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, [("tag-record", a1.digest)])
    assert "unusable" in run.json["findings"][0]["detail"]
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json
    assert store.get(key) == a1.digest.encode()
    assert cli(store, "reindex").code == 0
    with store.registry() as reg:
        assert reg.tag_map("team/app")["v1"] == a1.digest
    recheck(world)


def test_repair_exits_1_when_it_leaves_a_finding(world: World, cli: Callable[..., Run]) -> None:
    """A tag only the backend records, naming a manifest the index lacks: nothing to repair
    from, so the finding stays, says why, and the exit code says so."""
    store = world.store
    store.put(tag_key("team/app", "v9"), simple_image("never acknowledged").digest.encode())
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1
    left = one(run.json, "tag-record")
    assert left["repaired"] is None and "left: " in left["detail"]
