"""``casengine reindex``: the index rebuilt from the backend alone gives the same answers.

The registry is the one of :mod:`tests.test_check` (repositories sharing layers, a
multi-platform index, a referrer), plus deletions, so that what was deleted must stay
deleted. Every answer the index gives is compared before and after: tag maps, manifest
records, referrers, links (both ways), reference counts, repository records, usage and
the blob records -- on a local root and on S3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from casengine.check import Checker
from casengine.cli import cli as casengine_cli
from casengine.cli.common import run_guarded
from casengine.gc import Collector
from casengine.registry import Registry, usage
from casengine.reindex import ReindexReport, rebuild
from tests.conftest import REGION
from tests.helpers import digest_of
from tests.registry_helpers import index_rows, layer, push, simple_image
from tests.test_check import Store, World, check, make_store, open_raw_backend, recheck, world_for

TABLES = ("links", "linked", "manifests", "tags", "refs", "referrers")


@pytest.fixture(params=["local", "s3"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    return world_for(request.param, tmp_path, request)


@pytest.fixture
def empty_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_store(request.param, tmp_path, request)


def answers(reg: Registry) -> dict[str, Any]:
    """Everything the index answers, by the API and table by table (link times aside: a
    rebuilt link is as old as the rebuild, which only makes GC more careful)."""
    out: dict[str, Any] = {"catalog": reg.catalog().items, "usage": usage(reg).to_json()}
    for repo in reg.repositories():
        manifests = sorted(reg.manifests(repo), key=lambda m: m.digest)
        out[repo] = {
            "record": reg.repository(repo),
            "tags": reg.tag_map(repo),
            "manifests": manifests,
            "by tag": {t: reg.get_manifest(repo, t) for t in reg.tag_map(repo)},
            "referrers": {m.digest: reg.referrers(repo, m.digest) for m in manifests},
            "links": sorted(index_rows(reg, repo, "links")),
            "refs": index_rows(reg, repo, "refs"),
            "referrer rows": index_rows(reg, repo, "referrers"),
        }
    with reg.index.transaction() as txn:
        out["linked"] = sorted(k for k, _ in txn.scan("linked"))
        out["counts"] = {t: txn.count(t) for t in TABLES}
    out["blobs"] = {r.digest: (r.size, r.codec, r.stored_size) for r in reg.engine.list()}
    return out


def snapshot(store: Store) -> dict[str, Any]:
    with store.registry() as reg:
        return answers(reg)


def reindex(store: Store) -> ReindexReport:
    backend = open_raw_backend(store)
    try:
        return rebuild(backend, store.index)
    finally:
        backend.close()


def test_reindex_keeps_the_quotas_of_a_readable_index(world: World) -> None:
    store = world.store
    with store.registry() as reg:
        reg.quotas.set("team/", 10 << 30)
        reg.quotas.set("other/svc", 1 << 20)
    report = reindex(store)
    assert report.quotas == 2 and report.to_json()["quotas"] == 2
    with store.registry() as reg:
        assert reg.quotas.all() == {"team/": 10 << 30, "other/svc": 1 << 20}
    shutil.rmtree(store.index)  # lost: nothing to keep
    assert reindex(store).quotas == 0


def test_reindex_restores_the_same_answers(world: World) -> None:
    """Deleted tags, manifests and repositories stay deleted; everything else comes back."""
    store = world.store
    with store.registry() as reg:
        reg.delete_tag("team/app", "v2")  # a2 stays, untagged
        reg.delete_manifest("other/svc", world.images["s1"].digest)  # and its tag solo
        push(reg, "tmp/gone", simple_image("gone"), "v1")
        reg.delete_repository("tmp/gone")
        push(reg, "team/app", simple_image("a3", base=layer("base", 3000)), "v3")
    before = snapshot(store)
    assert "tmp/gone" not in before["catalog"]
    assert before["team/app"]["tags"].keys() == {"v1", "v3"}
    assert before["team/app"]["referrers"][world.images["a1"].digest]  # the signature
    shutil.rmtree(store.index)

    report = reindex(store)
    assert report.skipped == []
    assert (report.repositories, report.tags) == (3, 4)
    assert report.blobs == len(before["blobs"])
    assert report.manifests == before["counts"]["manifests"]
    assert report.links == before["counts"]["links"]
    assert snapshot(store) == before


def test_reindexed_blobs_get_their_xxh3_from_the_next_check(world: World) -> None:
    store = world.store
    with store.engine() as engine:
        original = {r.digest: r.xxh3 for r in engine.list()}
    assert all(original.values())
    reindex(store)
    with store.registry() as reg:
        assert {r.digest: r.xxh3 for r in reg.engine.list()} == dict.fromkeys(original, "")
        assert Checker(reg, workers=8).run().clean
        assert {r.digest: r.xxh3 for r in reg.engine.list()} == original


@pytest.mark.parametrize("empty_store", ["local", "s3"], indirect=True)
def test_reindex_on_an_empty_backend(empty_store: Store) -> None:
    report = reindex(empty_store)
    assert report.to_json() == {"blobs": 0, "repositories": 0, "manifests": 0, "tags": 0,
                                "links": 0, "quotas": 0, "skipped": []}
    with empty_store.registry() as reg:
        assert list(reg.repositories()) == [] and list(reg.engine.list()) == []
        assert Checker(reg).run().clean


def test_reindex_skips_junk_keys_and_reports_them(world: World) -> None:
    """Keys that name nothing, and records whose target is gone, are skipped and named in
    the report; the rest is rebuilt as if they were not there."""
    store = world.store
    before = snapshot(store)
    hexdigest = digest_of(b"junk").split(":")[1]
    missing = digest_of(b"a manifest never stored")
    junk_blobs = ["blobs/README", f"blobs/sha256/{hexdigest[:2]}/{hexdigest}.zst",
                  f"blobs/sha256/00/{hexdigest}.raw", "blobs/sha256/ab/abc.raw",
                  f"blobs/md5/{hexdigest[:2]}/{hexdigest[:32]}.raw"]
    for key in junk_blobs:
        store.put(key, b"junk")
    store.put("repositories/team/app/stray", b"no record kind")
    store.put("repositories/team/app/_tags/ghost", missing.encode())
    store.put(f"repositories/team/app/_manifests/sha256/{missing.split(':')[1]}", b"")

    report = reindex(store)
    assert sorted(report.skipped or []) == sorted([
        *junk_blobs, "repositories/team/app/stray", f"team/app@{missing}",
        f"team/app:ghost -> {missing}"])
    assert snapshot(store) == before


def test_reindex_replaces_an_index_that_says_more(world: World) -> None:
    """Rebuilt over an existing index, it keeps nothing the backend cannot prove, and
    leaves no staging or old index behind."""
    store = world.store
    before = snapshot(store)
    with store.engine() as engine, engine.index.transaction(write=True) as txn:
        txn.put("tags", b"team/app\0index-only", world.images["a2"].digest.encode())
    reindex(store)
    assert snapshot(store) == before
    parent = Path(store.index).parent
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(Path(store.index).name)) \
        == [Path(store.index).name]


def test_reindex_keeps_a_missing_layer_needed_and_a_restored_one_linked(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The base layer's object lost before a reindex: the images that need it still show
    as missing it, and the layer restored from a backup is linked again, so GC keeps it."""
    world = world_for("local", tmp_path, request)
    store, base = world.store, world.images["a1"].blobs[1].digest
    store.delete(world.key(base))
    reindex(store)

    report = check(store)
    missing = {r for f in report.findings if (f.kind, f.digest) == ("missing-blob", base)
               for r in f.affected}
    assert world.refs(base, transitive=False) <= missing

    store.put(world.key(base), world.blobs[base])  # restored from a backup
    with store.registry() as reg:
        assert Checker(reg, repair=True).run().findings[0].repaired == "verified and re-indexed"
        assert Collector(reg, grace=0).run().blobs == 0
        assert all(reg.is_linked(repo, base) for repo in ("team/app", "other/svc", "team/multi"))
    recheck(world)


def test_reindex_skips_an_unusable_tag_record(tmp_path: Path,
                                              request: pytest.FixtureRequest) -> None:
    world = world_for("local", tmp_path, request)
    store = world.store
    store.put("repositories/team/app/_tags/v1", b"\xffgarbage")
    report = reindex(store)
    assert report.skipped == ["team/app:v1 (an unusable tag record)"]
    with store.registry() as reg:
        assert "v1" not in reg.tag_map("team/app")
        assert reg.tag_map("team/app")["v2"] == world.images["a2"].digest


def test_an_interrupted_reindex_leaves_no_staging_and_the_old_index(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    world = world_for("local", tmp_path, request)
    store = world.store
    before = snapshot(store)

    def interrupt(stage: str, n: int) -> None:
        if stage == "repositories":
            raise KeyboardInterrupt

    backend = open_raw_backend(store)
    try:
        with pytest.raises(KeyboardInterrupt):
            rebuild(backend, store.index, progress=interrupt)
    finally:
        backend.close()
    parent = Path(store.index).parent
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith(Path(store.index).name)) \
        == [Path(store.index).name]
    assert snapshot(store) == before


def _reindex_killed(store: Store, at: str) -> None:
    """Run a reindex in a child killed (``kill -9`` alike) at ``at``: ``rename`` kills it
    between moving the old index aside and moving the new one in, ``mark`` before either."""
    code = textwrap.dedent(f"""
        import os
        import casengine.reindex as rx
        from casengine.backend import open_backend
        renamed = []
        def rename(src, dst):
            if renamed:
                os._exit(9)
            renamed.append(src)
            os.rename(src, dst)
        if {at!r} == "rename":
            rx.os = type("os", (), {{**vars(os), "rename": staticmethod(rename)}})
        else:
            rx.mark = lambda *_: os._exit(9)
        rx.rebuild(open_backend({store.url!r}), {store.index!r})
    """)
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 9


def test_a_reindex_killed_in_its_swap_loses_no_quota_and_leaves_nothing(
        tmp_path: Path, request: pytest.FixtureRequest,
        cli: Callable[..., tuple[int, str, str]]) -> None:
    """Killed between moving the old index aside and the new one in, a reindex leaves no
    index (a command then makes a new one, which it refuses) and the old one aside: the
    next reindex keeps the quotas the old one holds, and removes what the dead ones left."""
    world = world_for("local", tmp_path, request)
    store = world.store
    with store.registry() as reg:
        reg.quotas.set("team/", 10 << 30)
    before = snapshot(store)
    _reindex_killed(store, "mark")
    _reindex_killed(store, "rename")
    assert not os.path.exists(store.index)
    code, _, err = cli([*store.cli_args(), "quota", "ls"])
    assert code == 8 and "reindex" in err
    code, out, err = cli([*store.cli_args(), "reindex"])
    assert (code, err) == (0, "") and out.splitlines()[0].endswith("; kept 1 quotas")
    with store.registry() as reg:
        assert reg.quotas.all() == {"team/": 10 << 30}
    assert snapshot(store) == before
    parent = Path(store.index).parent
    assert [p.name for p in parent.iterdir() if p.name.startswith(".index")] == [".index"]


# -- the command ------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., tuple[int, str, str]]:
    for name in [n for n in os.environ if n.startswith("CASENGINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)

    def run(args: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["casengine", *args])
        capsys.readouterr()
        code = run_guarded(casengine_cli)
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


def test_reindex_command(world: World, cli: Callable[..., tuple[int, str, str]]) -> None:
    store = world.store
    before = snapshot(store)
    store.put("blobs/README", b"junk")
    shutil.rmtree(store.index)
    code, out, err = cli([*store.cli_args(), "reindex"])
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (f"rebuilt: {len(before['blobs'])} blobs, 3 repositories, "
                        f"{before['counts']['manifests']} manifests, 5 tags, "
                        f"{before['counts']['links']} links")
    assert lines[1:] == ["skipped: blobs/README"]
    assert snapshot(store) == before


def test_reindex_of_a_remote_root_needs_an_index(
        s3_url_and_options: tuple[str, dict], cli: Callable[..., tuple[int, str, str]]) -> None:
    url, options = s3_url_and_options
    code, out, err = cli(["--root", url, "-o", f"endpoint_url={options['endpoint_url']}",
                          "reindex"])
    assert code == 8 and out == ""
    assert err.startswith("casengine: error: ") and "--index" in err and err.count("\n") == 1
