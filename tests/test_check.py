"""``casengine check`` and ``--repair`` against injected faults, on a local root and on S3.

Every fault is injected behind the engine's back (the object file or S3 object rewritten,
truncated or deleted; index rows written or deleted directly; data.mdb overwritten), then:

1. the check finds it, through the API and through the command line (``--json``, exit 1),
   with the finding's kind, digest and the ``repo:tag`` / ``repo@digest`` it affects;
2. ``--repair`` fixes what can be fixed: corrupt bytes go to ``quarantine/`` (and can be
   read back there), orphans that verify are re-indexed, dangling records are dropped;
3. a second check is clean, apart from ``missing-blob`` findings about the images that
   really lost data (precisely: only the lost digests, naming exactly the images that need
   them);
4. every blob that was intact before still reads back with its sha256.

The registry (see :func:`build_world`) has images sharing a base layer across three
repositories, a multi-platform index whose amd64 image also uses that base, and a referrer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xxhash

from casengine.backend import Backend, open_backend
from casengine.check import QUARANTINE, Checker, CheckReport, Finding
from casengine.cli import cli as casengine_cli
from casengine.cli.common import run_guarded
from casengine.compression import Policy
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import CASError, ConfigError
from casengine.gc import ORPHAN_MIN_AGE
from casengine.index import pack_blob
from casengine.layout import BLOBS, UPLOADS, blob_key
from casengine.registry import Registry, records
from casengine.reindex import rebuild
from casengine.testing.s3server import DUMMY_CREDENTIALS
from tests.conftest import REGION
from tests.helpers import casengine_command, digest_of, run_cli
from tests.registry_helpers import (
    Manifest,
    config,
    index,
    index_rows,
    layer,
    oci_manifest,
    push,
    simple_image,
)

# -- the store, reached around the engine -------------------------------------------------


@dataclass
class Store:
    """Where a test registry lives, and raw access to its objects behind the engine's back."""

    kind: str  #: "local" or "s3"
    url: str
    index: str  #: the LMDB index directory
    options: dict[str, Any] = field(default_factory=dict)
    s3: Any = None  #: a boto3 client (S3 only)
    bucket: str = ""
    prefix: str = ""  #: the S3 key prefix of the root, with its slash

    def engine(self) -> Engine:
        # raw objects: these tests damage stored bytes by hand (tests/test_compression.py
        # checks seekable zstd objects)
        return Engine.open(self.url, index=self.index, compression=Policy("never"),
                           **json.loads(json.dumps(self.options)))

    @contextmanager
    def registry(self) -> Iterator[Registry]:
        with self.engine() as engine:
            yield Registry(engine)

    def _path(self, key: str) -> Path:
        return Path(self.url) / key

    def get(self, key: str) -> bytes:
        if self.s3 is None:
            return self._path(key).read_bytes()
        return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        if self.s3 is None:
            self._path(key).parent.mkdir(parents=True, exist_ok=True)
            self._path(key).write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def delete(self, key: str) -> None:
        if self.s3 is None:
            self._path(key).unlink()
        else:
            self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self, prefix: str) -> list[str]:
        if self.s3 is None:  # (.index and .tmp are no objects)
            root = Path(self.url)
            names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            return sorted(n for n in names if n.startswith(prefix) and not n.startswith("."))
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix):
            out += [obj["Key"][len(self.prefix):] for obj in page.get("Contents", [])]
        return sorted(out)

    def cli_args(self) -> list[str]:
        """The global options that name this store on the command line."""
        if self.kind == "local":
            return ["--root", self.url]  # the index in its default place, inside the root
        return ["--root", self.url, "--index", self.index,
                "-o", f"endpoint_url={self.options['endpoint_url']}",
                "-o", f"key={DUMMY_CREDENTIALS['key']}",
                "-o", f"secret={DUMMY_CREDENTIALS['secret']}"]


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    if kind == "local":
        root = tmp_path / "root"
        return Store("local", str(root), str(root / ".index"))
    url, options = request.getfixturevalue("s3_url_and_options")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    return Store("s3", url, str(tmp_path / "index"), options,
                 request.getfixturevalue("s3_client"), bucket, prefix + "/")


# -- the registry under test ---------------------------------------------------------------


@dataclass
class World:
    store: Store
    images: dict[str, Manifest]  #: label -> manifest
    blobs: dict[str, bytes]  #: every stored blob, manifests included: digest -> bytes
    #: (repository, manifest digest) -> the tags naming it there
    holdings: dict[tuple[str, str], list[str]]

    def needs(self, digest: str, *, transitive: bool) -> set[str]:
        """What manifest ``digest`` needs: itself, its blobs, its children (and theirs)."""
        m = next(m for m in self.images.values() if m.digest == digest)
        out = {m.digest, *(b.digest for b in m.blobs)}
        for child in m.children:
            out |= self.needs(child.digest, transitive=True) if transitive else {child.digest}
        return out

    def refs(self, digest: str, *, transitive: bool) -> set[str]:
        """``repo@digest`` and ``repo:tag`` of every manifest that needs ``digest``; with
        ``transitive``, also of the indexes whose platform images need it."""
        out: set[str] = set()
        for (repo, m), tags in self.holdings.items():
            if digest in self.needs(m, transitive=transitive):
                out |= {f"{repo}@{m}", *(f"{repo}:{t}" for t in tags)}
        return out

    def key(self, digest: str) -> str:
        return blob_key(Digest.parse(digest))


PUSHES = [("team/app", "a1", "v1"), ("team/app", "a2", "v2"), ("team/app", "sig", None),
          ("other/svc", "a1", "latest"), ("other/svc", "s1", "solo"),
          ("team/multi", "multi", "latest")]


def describe_world(store: Store) -> World:
    """The images (deterministic bytes) and where they are pushed; nothing is stored yet."""
    base = layer("base", 3000)
    a1 = simple_image("a1", base=base)
    amd, arm = simple_image("amd", base=base), simple_image("arm", layer_size=500)
    images = {"a1": a1, "a2": simple_image("a2", base=base),
              "s1": simple_image("s1", layer_size=700), "amd": amd, "arm": arm,
              "multi": index([amd, arm]),
              "sig": oci_manifest(config("sig"), [layer("sig", 64)], subject=a1,
                                  artifact_type="application/vnd.example.signature")}
    holdings: dict[tuple[str, str], list[str]] = {}
    for repo, label, tag in PUSHES:
        holdings.setdefault((repo, images[label].digest), []).extend([tag] if tag else [])
    for child in images["multi"].children:
        holdings.setdefault(("team/multi", child.digest), [])
    blobs: dict[str, bytes] = {}
    for m in images.values():
        blobs[m.digest] = m.content
        for b in m.blobs:
            blobs[b.digest] = b.content
    return World(store, images, blobs, holdings)


def build_world(store: Store) -> World:
    """Push the world into ``store``, through the registry model."""
    world = describe_world(store)
    with store.registry() as reg:
        for repo, label, tag in PUSHES:
            push(reg, repo, world.images[label], tag)
    return world


#: One pushed world per kind of store (and S3 endpoint), cloned for every test: pushing
#: through the model fsyncs every object, and that is most of a test's time otherwise.
_TEMPLATES: dict[tuple[str, str], Store] = {}


def _template(kind: str, request: pytest.FixtureRequest) -> Store:
    endpoint = request.getfixturevalue("s3_endpoint") if kind == "s3" else ""
    if (kind, endpoint) not in _TEMPLATES:
        where = request.getfixturevalue("tmp_path_factory").mktemp(f"check-template-{kind}")
        if kind == "local":
            store = Store("local", str(where / "root"), str(where / "root" / ".index"))
        else:  # a bucket of its own, gone with the moto server at the end of the session
            client = request.getfixturevalue("s3_client")
            bucket = f"check-template-{uuid.uuid4().hex}"
            client.create_bucket(Bucket=bucket)
            options = {"endpoint_url": endpoint, **DUMMY_CREDENTIALS,
                       "client_kwargs": {"region_name": REGION}}
            store = Store("s3", f"s3://{bucket}/root", str(where / "index"), options, client,
                          bucket, "root/")
        build_world(store)
        _TEMPLATES[kind, endpoint] = store
    return _TEMPLATES[kind, endpoint]


def world_for(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> World:
    """A fresh copy of the pushed world in a store of its own (a local root, or a bucket)."""
    template = _template(kind, request)
    store = make_store(kind, tmp_path, request)
    if kind == "local":
        shutil.copytree(template.url, store.url, ignore=shutil.ignore_patterns("lock.mdb"))
    else:
        def copy(key: str) -> None:
            store.s3.copy_object(Bucket=store.bucket, Key=store.prefix + key,
                                 CopySource={"Bucket": template.bucket,
                                             "Key": template.prefix + key})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(copy, template.keys("")))
        shutil.copytree(template.index, store.index, ignore=shutil.ignore_patterns("lock.mdb"))
    return describe_world(store)


@pytest.fixture(params=["local", "s3"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    return world_for(request.param, tmp_path, request)


@pytest.fixture
def local_world(tmp_path: Path, request: pytest.FixtureRequest) -> World:
    return world_for("local", tmp_path, request)


# -- running the check ----------------------------------------------------------------------


#: S3 requests are mostly waiting: more readers than the default two keep the tests short.
WORKERS = ("--workers", "8")


def check(store: Store, **options: Any) -> CheckReport:
    with store.registry() as reg:
        return Checker(reg, **{"workers": 8, **options}).run()


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Callable[..., Run]:
    """``casengine ARGS`` in this process, through the console script's own error path."""
    for name in [n for n in os.environ if n.startswith("CASENGINE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)

    def run(store: Store, *args: str) -> Run:
        monkeypatch.setattr(sys, "argv", ["casengine", *store.cli_args(), *args])
        capsys.readouterr()
        code = run_guarded(casengine_cli)
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return Run(code, out, err)

    return run


def subprocess_cli(store: Store, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``casengine ARGS`` as a real process: a corrupt index must not crash the interpreter."""
    return run_cli([*store.cli_args(), *args], cwd=tmp_path, env={"AWS_DEFAULT_REGION": REGION})


def one(report: CheckReport | dict[str, Any], kind: str, digest: str | None = None
        ) -> Finding | dict[str, Any]:
    """The single finding of ``kind`` (and ``digest``)."""
    findings = report["findings"] if isinstance(report, dict) else report.findings

    def get(f: Any, name: str) -> Any:
        return f[name] if isinstance(f, dict) else getattr(f, name)

    found = [f for f in findings if get(f, "kind") == kind
             and (digest is None or get(f, "digest") == digest)]
    assert len(found) == 1, (kind, digest, findings)
    return found[0]


def kinds(report: CheckReport | dict[str, Any]) -> list[tuple[str, str | None]]:
    findings = report["findings"] if isinstance(report, dict) else [f.to_json() for f in
                                                                     report.findings]
    return sorted((f["kind"], f["digest"]) for f in findings)


def assert_affected(world: World, affected: list[str], digest: str) -> None:
    """``affected`` names every image that needs ``digest`` directly, and nothing that
    does not need it (indexes over such an image may be named: see the xfail below)."""
    got = set(affected)
    assert world.refs(digest, transitive=False) <= got, (digest, got)
    assert got <= world.refs(digest, transitive=True), (digest, got)


def assert_only_lost(world: World, report: CheckReport, lost: set[str]) -> None:
    """Clean apart from images that really lost data: every finding is a ``missing-blob``
    of a lost digest (or its link, kept for a restore), and each lost digest is reported
    with every image that needs it."""
    for f in report.findings:
        assert f.kind in ("missing-blob", "dangling-link") and f.digest in lost, f
    for digest in lost:
        named = {r for f in report.findings if f.digest == digest for r in f.affected}
        assert_affected(world, sorted(named), digest)


def assert_intact(world: World, engine: Engine,
                  lost: frozenset[str] | set[str] = frozenset()) -> None:
    """Every blob that was intact still reads back, through the engine, with its sha256."""
    for digest, content in world.blobs.items():
        if digest in lost:
            continue
        data = b"".join(engine.read(digest))
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == digest
        assert data == content


def recheck(world: World, lost: frozenset[str] | set[str] = frozenset()) -> CheckReport:
    """The check after a repair, in full (so fast's sizes and xxh3 too): clean apart from
    the images that lost ``lost``; and every other blob reads back intact."""
    with world.store.registry() as reg:
        report = Checker(reg, full=True, workers=8).run()
        assert_only_lost(world, report, set(lost))
        assert_intact(world, reg.engine, lost)
    return report


def quarantined(store: Store) -> dict[str, bytes]:
    return {k: store.get(k) for k in store.keys(QUARANTINE)}


def assert_quarantined(store: Store, digest: str, data: bytes) -> None:
    """The bytes of ``digest``'s object are under quarantine/, named after the object."""
    hexdigest = digest.split(":", 1)[1]
    found = {k: v for k, v in quarantined(store).items()
             if k.startswith(f"{QUARANTINE}sha256/{hexdigest[:2]}/{hexdigest}.raw")}
    assert list(found.values()) == [data], found.keys()


def age(store: Store, key: str, seconds: float = ORPHAN_MIN_AGE + 60) -> None:
    """Move a local object's time back, as if written ``seconds`` ago."""
    path = store._path(key)
    st = path.stat()
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x40
    return bytes(b)


# -- faults in blob objects -------------------------------------------------------------------


def test_flipped_byte(world: World, cli: Callable[..., Run]) -> None:
    """A flipped byte in the base layer three repositories and an index share."""
    store, base = world.store, world.images["a1"].blobs[1].digest
    bad = flip(world.blobs[base], 1234)
    store.put(world.key(base), bad)

    report = check(store)
    assert kinds(report) == [("corrupt", base)]
    assert_affected(world, one(report, "corrupt", base).affected, base)
    assert world.refs(base, transitive=False) >= {"team/app:v1", "team/app:v2",
                                                  "other/svc:latest"}
    run = cli(store, "check", *WORKERS, "--json")
    assert run.code == 1
    assert kinds(run.json) == [("corrupt", base)]
    assert set(one(run.json, "corrupt", base)["affected"]) == set(one(report, "corrupt",
                                                                       base).affected)

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1  # the broken images stay broken: reported, not repairable
    fixed = one(run.json, "corrupt", base)
    assert fixed["repaired"] == "record dropped, object quarantined"
    broken = {r for f in run.json["findings"] if f["kind"] == "missing-blob" for r in f["affected"]}
    assert world.refs(base, transitive=False) <= broken
    assert_quarantined(store, base, bad)
    assert world.key(base) not in store.keys(BLOBS)

    recheck(world, {base})


def test_truncated_blob(world: World, cli: Callable[..., Run]) -> None:
    store, cfg = world.store, world.images["a2"].blobs[0].digest
    short = world.blobs[cfg][:-7]
    store.put(world.key(cfg), short)

    report = check(store)
    assert kinds(report) == [("truncated", cfg)]
    assert set(one(report, "truncated", cfg).affected) == {"team/app:v2",
                                                            f"team/app@{world.images['a2'].digest}"}
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, [("truncated", cfg)])

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1
    assert one(run.json, "truncated", cfg)["repaired"] == "record dropped, object quarantined"
    assert_quarantined(store, cfg, short)

    recheck(world, {cfg})


def test_deleted_blob_object(world: World, cli: Callable[..., Run]) -> None:
    """The arm64 image's layer, under the multi-platform index."""
    store, arm_layer = world.store, world.images["arm"].blobs[1].digest
    store.delete(world.key(arm_layer))

    report = check(store)
    assert kinds(report) == [("missing-object", arm_layer)]
    affected = one(report, "missing-object", arm_layer).affected
    assert f"team/multi@{world.images['arm'].digest}" in affected
    assert_affected(world, affected, arm_layer)
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, [("missing-object", arm_layer)])

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1
    assert one(run.json, "missing-object", arm_layer)["repaired"] == "record dropped"
    assert quarantined(store) == {}  # nothing to quarantine: the bytes were gone

    recheck(world, {arm_layer})


def test_manifest_referencing_a_missing_blob(world: World, cli: Callable[..., Run]) -> None:
    """Record and object of s1's layer gone: the manifest other/svc:solo needs a missing blob."""
    store, s1 = world.store, world.images["s1"]
    gone = s1.blobs[1].digest
    store.delete(world.key(gone))
    with store.engine() as engine:
        assert engine.index.delete_blob(gone)

    report = check(store)
    assert kinds(report) == [("dangling-link", gone), ("missing-blob", gone)]
    assert set(one(report, "missing-blob", gone).affected) == {"other/svc:solo",
                                                                f"other/svc@{s1.digest}"}
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, kinds(report))

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1
    # the link stays: the manifest needs it, and the bytes may come back from a backup
    assert one(run.json, "dangling-link", gone)["repaired"] is None
    assert "restore" in one(run.json, "dangling-link", gone)["detail"]
    assert one(run.json, "missing-blob", gone)["repaired"] is None  # reported: the image is lost

    recheck(world, {gone})

    # the bytes restored from a backup: re-indexed, still linked, and GC keeps them
    store.put(world.key(gone), world.blobs[gone])
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json
    assert kinds(run.json) == [("orphan-object", gone)]
    run = cli(store, "gc", "--grace", "0", "--json")
    assert run.code == 0 and run.json["blobs"] == 0
    recheck(world)


def test_manifest_whose_blob_record_was_deleted(world: World, cli: Callable[..., Run]) -> None:
    """a1's config record gone, its object intact: repair re-indexes it and loses nothing."""
    store, a1 = world.store, world.images["a1"]
    cfg = a1.blobs[0].digest
    with store.engine() as engine:
        assert engine.index.delete_blob(cfg)

    report = check(store)
    assert kinds(report) == [("dangling-link", cfg), ("dangling-link", cfg),
                             ("missing-blob", cfg), ("missing-blob", cfg),
                             ("orphan-object", cfg)]
    needs = {"team/app:v1", f"team/app@{a1.digest}", "other/svc:latest", f"other/svc@{a1.digest}"}
    assert set(one(report, "orphan-object", cfg).affected) == needs
    assert {r for f in report.findings if f.kind == "missing-blob" for r in f.affected} == needs
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, kinds(report))

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0, run.json  # everything found was repaired
    assert kinds(run.json) == [("orphan-object", cfg)]
    assert one(run.json, "orphan-object", cfg)["repaired"] == "verified and re-indexed"

    recheck(world)
    assert quarantined(store) == {}
    with store.registry() as reg:  # still linked in both repositories
        assert reg.is_linked("team/app", cfg) and reg.is_linked("other/svc", cfg)


def test_orphan_objects(world: World, cli: Callable[..., Run]) -> None:
    """Objects no record names: one whose bytes match its name, one whose bytes do not."""
    store = world.store
    good = b"an object nobody recorded" * 40
    good_digest = digest_of(good)
    store.put(world.key(good_digest), good)
    wrong = b"these bytes are not what the name says" * 10
    wrong_digest = digest_of(b"the name")
    store.put(world.key(wrong_digest), wrong)

    report = check(store)
    assert kinds(report) == sorted([("orphan-object", good_digest),
                                    ("orphan-object", wrong_digest)])
    assert one(report, "orphan-object", good_digest).affected == []  # nothing needs it
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, kinds(report))

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 1  # the one that does not verify is young: a publish may be under way
    assert one(run.json, "orphan-object", good_digest)["repaired"] == "verified and re-indexed"
    young = one(run.json, "orphan-object", wrong_digest)
    assert young["repaired"] is None and "left: younger than 10 minutes" in young["detail"]
    assert store.get(world.key(wrong_digest)) == wrong

    if store.kind == "local":
        age(store, world.key(wrong_digest))
        run = cli(store, "check", *WORKERS, "--repair", "--json")
        assert run.code == 0
        repaired = one(run.json, "orphan-object", wrong_digest)["repaired"]
    else:  # an S3 object cannot be aged: the minimum age is lowered instead
        repaired = one(check(store, repair=True, orphan_min_age=0), "orphan-object",
                       wrong_digest).repaired
    assert repaired.startswith(f"quarantined as {QUARANTINE}")
    assert_quarantined(store, wrong_digest, wrong)
    assert world.key(wrong_digest) not in store.keys(BLOBS)

    world.blobs[good_digest] = good  # now an intact, recorded blob like the others
    recheck(world)


# -- faults in the index ----------------------------------------------------------------------


def test_dangling_tag(world: World, cli: Callable[..., Run]) -> None:
    store = world.store
    ghost = simple_image("ghost").digest  # never pushed
    with store.engine() as engine, engine.index.transaction(write=True) as txn:
        txn.put("tags", b"team/app\0ghost", ghost.encode())

    # written to the index alone, the tag also disagrees with the backend's records
    expected = {("dangling-tag", ghost), ("tag-record", ghost)}
    report = check(store)
    assert set(kinds(report)) == expected
    assert one(report, "dangling-tag", ghost).affected == ["team/app:ghost"]
    run = cli(store, "check", *WORKERS, "--json")
    assert run.code == 1 and set(kinds(run.json)) == expected
    assert one(run.json, "dangling-tag", ghost)["affected"] == ["team/app:ghost"]

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert run.code == 0
    assert one(run.json, "dangling-tag", ghost)["repaired"] == "tag removed"

    recheck(world)
    with store.registry() as reg:
        assert reg.tag_map("team/app") == {"v1": world.images["a1"].digest,
                                           "v2": world.images["a2"].digest}


def test_bad_referrer_entry(local_world: World, cli: Callable[..., Run]) -> None:
    world = local_world
    store, a2 = world.store, world.images["a2"]
    fake = digest_of(b"no such referrer")
    with store.engine() as engine, engine.index.transaction(write=True) as txn:
        txn.put("referrers", f"team/app\0{a2.digest}\0{fake}".encode(), b"{}")

    report = check(store)
    assert kinds(report) == [("bad-referrer", fake)]
    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert (run.code, one(run.json, "bad-referrer", fake)["repaired"]) == (0, "entry removed")
    assert check(store).clean
    with store.registry() as reg:  # the real referrer is still there
        assert reg.referrers("team/app", a2.digest) == []
        assert [d["digest"] for d in reg.referrers("team/app", world.images["a1"].digest)] == \
            [world.images["sig"].digest]


def test_stale_upload_session(world: World, cli: Callable[..., Run]) -> None:
    store = world.store
    with store.registry() as reg:
        stale = reg.start_upload("team/app")
        reg.append_upload("team/app", stale.id, b"x" * 1000, 0)
        fresh = reg.start_upload("other/svc")
        reg.engine.index.update_upload(
            stale.id, lambda rec: {**rec, "updated": rec["updated"] - 3 * 86400})

    report = check(store)
    assert kinds(report) == [("stale-upload", None)]
    detail = one(report, "stale-upload").detail
    assert stale.id in detail and "team/app" in detail
    run = cli(store, "check", *WORKERS, "--json")
    assert (run.code, kinds(run.json)) == (1, [("stale-upload", None)])

    run = cli(store, "check", *WORKERS, "--repair", "--json")
    assert (run.code, one(run.json, "stale-upload")["repaired"]) == (0, "session purged")
    recheck(world)
    with store.engine() as engine:
        assert [s.id for s in engine.uploads.list()] == [fresh.id]  # the live one stays
    assert not [k for k in store.keys(UPLOADS) if k.startswith(f"{UPLOADS}{stale.id}")]


def listings(store: Store) -> dict[str, Any]:
    """What a client can see: tags, manifest records, referrers, links, per repository."""
    out: dict[str, Any] = {}
    with store.registry() as reg:
        for repo in reg.repositories():
            manifests = sorted(reg.manifests(repo), key=lambda m: m.digest)
            out[repo] = {"tags": reg.tag_map(repo), "manifests": manifests,
                         "referrers": {m.digest: reg.referrers(repo, m.digest)
                                       for m in manifests},
                         "links": sorted(index_rows(reg, repo, "links"))}
    return out


def test_deleted_index(world: World, cli: Callable[..., Run]) -> None:
    """The index directory deleted: a fresh index would take every object for an orphan,
    which gc --orphans and check --repair act on, so every command but reindex refuses it
    (exit 8; check's own 2) and says how to recover; ``casengine reindex`` brings back the same answers,
    and check passes."""
    store = world.store
    before = listings(store)
    objects = store.keys("")
    shutil.rmtree(store.index)

    for args, code in ((["check", "--repair"], 2),  # check's own code for "it failed"
                       (["gc", "--orphans", "--grace", "0"], 8),
                       (["uploads", "purge", "--older-than", "0s"], 8), (["blob", "ls"], 8)):
        run = cli(store, *args)
        assert run.code == code, (args, run.err)
        assert "is new, but the store holds objects" in run.err and "reindex" in run.err
        assert run.out == ""
    assert store.keys("") == objects  # nothing was deleted or quarantined

    run = cli(store, "reindex", "--json")
    assert run.code == 0, run.err
    assert run.json["blobs"] == len(world.blobs) and run.json["skipped"] == []
    assert listings(store) == before
    recheck(world)


def _overwrite_header(store: Store) -> None:
    data_mdb = Path(store.index) / "data.mdb"
    with data_mdb.open("r+b") as f:
        f.write(b"\xa5" * 8192)  # both meta pages


def test_corrupted_index(world: World, tmp_path: Path) -> None:
    """data.mdb's header overwritten: the check fails cleanly (exit 2, one line, no
    traceback), the API raises ConfigError, and reindex recovers everything."""
    store = world.store
    before = listings(store)
    _overwrite_header(store)

    proc = subprocess_cli(store, tmp_path, "check", "--json")
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("casengine: check failed: ")
    assert "Traceback" not in err and proc.stdout == b""
    with pytest.raises(ConfigError, match="cannot open the index"):
        store.engine()

    backend = open_raw_backend(store)
    try:
        report = rebuild(backend, store.index)
    finally:
        backend.close()
    assert report.blobs == len(world.blobs)
    assert listings(store) == before
    recheck(world)


def open_raw_backend(store: Store) -> Backend:
    return open_backend(store.url, **json.loads(json.dumps(store.options)))


# -- the LMDB page of one table, to corrupt the index where opening it does not look ----------

_PAGE = 4096


def table_root_page(data_mdb: Path, table: str) -> int:
    """The root page of ``table`` in an LMDB file (64-bit layout, 4 KiB pages): the newer
    meta page names the main database's root, whose leaf holds each table's MDB_db."""
    data = data_mdb.read_bytes()
    metas = []
    for pg in (0, 1):
        base = pg * _PAGE + 16  # page header: pgno u64, pad u16, flags u16, lower, upper
        magic, _version = struct.unpack_from("<II", data, base)
        assert magic == 0xBEEFC0DE
        dbs = base + 24  # magic, version, address, mapsize
        main_root = struct.unpack_from("<Q", data, dbs + 48 + 40)[0]
        txnid = struct.unpack_from("<Q", data, dbs + 96 + 8)[0]
        metas.append((txnid, main_root))
    root = max(metas)[1]
    off = root * _PAGE
    pgno, _, flags, lower, _upper = struct.unpack_from("<QHHHH", data, off)
    assert pgno == root and flags & 0x02  # a leaf
    for i in range((lower - 16) // 2):
        node = off + struct.unpack_from("<H", data, off + 16 + 2 * i)[0]
        ksize = struct.unpack_from("<H", data, node + 6)[0]
        if data[node + 8:node + 8 + ksize] == table.encode():
            return struct.unpack_from("<Q", data, node + 8 + ksize + 40)[0]
    raise KeyError(table)


def _corrupt_blobs_table(store: Store) -> None:
    data_mdb = Path(store.index) / "data.mdb"
    page = table_root_page(data_mdb, "blobs")
    with data_mdb.open("r+b") as f:
        f.seek(page * _PAGE)
        f.write(b"\xa5" * _PAGE)


def test_corrupted_index_page_fails_cleanly_and_reindex_recovers(
        local_world: World, tmp_path: Path) -> None:
    """A data page of the index overwritten: opening works, reading the blobs table does
    not. The check fails without a traceback; reindex recovers."""
    store = local_world.store
    before = listings(store)
    _corrupt_blobs_table(store)
    proc = subprocess_cli(store, tmp_path, "check")
    err = proc.stderr.decode()
    assert proc.returncode not in (0, 1), err
    assert err.count("\n") == 1 and err.startswith("casengine: ") and "Traceback" not in err

    proc = subprocess_cli(store, tmp_path, "reindex")
    assert proc.returncode == 0, proc.stderr
    assert listings(store) == before
    assert check(store).clean


def test_corrupted_index_page_exits_2(local_world: World, tmp_path: Path) -> None:
    store = local_world.store
    _corrupt_blobs_table(store)
    proc = subprocess_cli(store, tmp_path, "check")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode().startswith("casengine: check failed: ")


# -- full against fast -------------------------------------------------------------------------


def _forge_xxh3(store: Store, digest: str, data: bytes) -> None:
    """Replace the object's bytes and make the record's xxh3 match them."""
    store.put(blob_key(Digest.parse(digest)), data)
    with store.engine() as engine:
        record = engine.stat(digest)
        with engine.index.transaction(write=True) as txn:
            txn.put("blobs", digest.encode(), pack_blob(
                type(record)(record.digest, record.size, record.codec, record.stored_size,
                             xxhash.xxh3_128(data).hexdigest(), record.created,
                             record.touched)))


def test_full_catches_what_fast_cannot(local_world: World, cli: Callable[..., Run]) -> None:
    """Same size, xxh3 forged to match: fast passes, full re-hashes and finds it -- in a
    layer, a config and a manifest alike."""
    world = local_world
    store = world.store
    targets = [world.images["a2"].blobs[1].digest, world.images["s1"].blobs[0].digest,
               world.images["sig"].digest]
    for digest in targets:
        _forge_xxh3(store, digest, flip(world.blobs[digest], 5))

    assert check(store).clean
    assert cli(store, "check", *WORKERS, "--fast", "--json").code == 0
    full = check(store, full=True)
    corrupt = [f for f in full.findings if f.kind == "corrupt"]
    assert sorted(f.digest for f in corrupt) == sorted(targets)
    for f in corrupt:
        assert "the bytes hash to" in f.detail
        assert_affected(world, f.affected, f.digest)
    run = cli(store, "check", *WORKERS, "--full", "--json")
    assert run.code == 1
    assert sorted(f["digest"] for f in run.json["findings"] if f["kind"] == "corrupt") == \
        sorted(targets)


def test_fast_after_reindex_still_catches_a_flipped_byte(local_world: World) -> None:
    store, world = local_world.store, local_world
    base = world.images["a1"].blobs[1].digest
    backend = open_raw_backend(store)
    rebuild(backend, store.index)  # records come back without xxh3
    backend.close()
    store.put(world.key(base), flip(world.blobs[base], 99))
    first = check(store)
    assert kinds(first) == [("corrupt", base)]


# -- how the check reads -------------------------------------------------------------------------


def _count_reads(monkeypatch: pytest.MonkeyPatch, engine: Engine, delay: float = 0.0
                 ) -> tuple[dict[str, int], list[int]]:
    """Count backend reads per key, and the most running at once."""
    counts: dict[str, int] = {}
    running = [0, 0]  # now, most
    real = engine.backend.read

    def read(key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        if not key.startswith("blobs/"):  # repository records are small, not blob reads
            yield from real(key, *args, **kwargs)
            return
        counts[key] = counts.get(key, 0) + 1
        running[0] += 1
        running[1] = max(running[1], running[0])
        try:
            time.sleep(delay)
            yield from real(key, *args, **kwargs)
        finally:
            running[0] -= 1

    monkeypatch.setattr(engine.backend, "read", read)
    real_path = getattr(engine.backend, "local_path", None)
    if real_path is not None:  # check reads local objects straight from their files

        def local_path(key: str) -> str:
            if key.startswith("blobs/"):
                counts[key] = counts.get(key, 0) + 1
                running[0] += 1
                running[1] = max(running[1], running[0])
                time.sleep(delay)
                running[0] -= 1
            return real_path(key)

        monkeypatch.setattr(engine.backend, "local_path", local_path)
    return counts, running


def test_each_unique_blob_is_read_once(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The base layer is linked in three repositories and needed by four images: one read.
    Every blob is read exactly once, fast and full, and reads run in parallel."""
    with world.store.registry() as reg:
        counts, running = _count_reads(monkeypatch, reg.engine, delay=0.02)
        for full in (False, True):
            counts.clear()
            report = Checker(reg, full=full, workers=4).run()
            assert report.clean and report.blobs == len(world.blobs)
            assert report.bytes == sum(len(b) for b in world.blobs.values())
            assert counts[world.key(world.images["a1"].blobs[1].digest)] == 1
            assert counts == {world.key(d): 1 for d in world.blobs}
    assert running[1] > 1


def test_repo_limits_the_scope(local_world: World, cli: Callable[..., Run]) -> None:
    world = local_world
    store = world.store
    s1_layer = world.images["s1"].blobs[1].digest  # only in other/svc
    store.put(world.key(s1_layer), flip(world.blobs[s1_layer], 0))
    store.put(world.key(digest_of(b"orphan")), b"orphan")  # orphans belong to no repository
    ghost = simple_image("ghost").digest
    with store.engine() as engine, engine.index.transaction(write=True) as txn:
        txn.put("tags", b"team/multi\0ghost", ghost.encode())

    team = check(store, repo="team/*")
    with store.registry() as reg:
        in_team = {d for r in ("team/app", "team/multi") for d in index_rows(reg, r, "links")}
    assert team.blobs == len(in_team) < len(world.blobs)
    assert set(kinds(team)) == {("dangling-tag", ghost), ("tag-record", ghost)}
    app = check(store, repo="team/app")
    assert app.clean
    svc = cli(store, "check", *WORKERS, "--repo", "other/*", "--json")
    assert (svc.code, kinds(svc.json)) == (1, [("corrupt", s1_layer)])
    assert set(one(svc.json, "corrupt")["affected"]) == {"other/svc:solo",
                                                         f"other/svc@{world.images['s1'].digest}"}
    everything = check(store)
    assert {k for k, _ in kinds(everything)} == {"corrupt", "dangling-tag", "tag-record",
                                                 "orphan-object"}
    # a pattern that matches nothing is a mistake, not a clean bill of health
    none = cli(store, "check", *WORKERS, "--repo", "tema/*")
    assert (none.code, none.out) == (2, "")
    assert none.err == "casengine: check failed: no repository matches 'tema/*'\n"


def _stop_after_first_blob(reg: Registry) -> CheckReport:
    """A check whose time is up once the first blob is checked (one reader: it has handed
    out the next few blobs by then, and collects those before it stops)."""
    checker = Checker(reg, workers=1, deadline=time.monotonic() + 3600)

    def time_is_up(stage: str, n: int) -> None:
        checker.deadline = 0.0

    checker.progress = time_is_up
    return checker.run()


def test_time_limit_then_resume(local_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after the first blobs, the check keeps what it found; resume goes on from
    there, reads none of the checked blobs again, and ends with every finding once -- even
    one whose blob was put right in between (it was found, and is not checked again)."""
    world, store = local_world, local_world.store
    order = sorted(world.blobs)
    first, last = order[0], order[-1]
    for digest in (first, last):
        store.put(world.key(digest), flip(world.blobs[digest], 3))

    with store.registry() as reg:
        counts, _ = _count_reads(monkeypatch, reg.engine)
        stopped = _stop_after_first_blob(reg)
        assert not stopped.complete
        assert 0 < stopped.blobs < len(order)
        assert [(f.kind, f.digest) for f in stopped.findings] == [("corrupt", first)]
        assert set(counts) == {world.key(d) for d in order[:stopped.blobs]}

        store.put(world.key(first), world.blobs[first])
        counts.clear()
        resumed = Checker(reg, workers=1, resume=True).run()
    assert resumed.complete and resumed.blobs == len(order)
    assert set(counts) == {world.key(d) for d in order[stopped.blobs:]}  # none read twice
    assert sorted(f.digest for f in resumed.findings if f.kind == "corrupt") == \
        sorted([first, last])


def test_time_limit_and_resume_on_the_command_line(local_world: World,
                                                   cli: Callable[..., Run]) -> None:
    world, store = local_world, local_world.store
    order = sorted(world.blobs)
    first, last = order[0], order[-1]
    for digest in (first, last):
        store.put(world.key(digest), flip(world.blobs[digest], 3))

    stopped = cli(store, "check", *WORKERS, "--time-limit", "0", "--json")
    assert (stopped.json["complete"], stopped.json["blobs"]) == (False, 0)
    with store.registry() as reg:  # a run stopped half-way, then the first blob put right
        assert [f.digest for f in _stop_after_first_blob(reg).findings] == [first]
    store.put(world.key(first), world.blobs[first])

    resumed = cli(store, "check", *WORKERS, "--resume", "--json")
    assert resumed.code == 1 and resumed.json["complete"] is True
    assert resumed.json["blobs"] == len(world.blobs)
    assert sorted(f["digest"] for f in resumed.json["findings"] if f["kind"] == "corrupt") == \
        sorted([first, last])
    again = check(store)  # a new run starts over, and reads the first blob again
    assert [f.digest for f in again.findings if f.kind == "corrupt"] == [last]


def test_a_check_stopped_early_is_never_clean(local_world: World,
                                             cli: Callable[..., Run]) -> None:
    """Stopped before it read the damaged blob, a check cannot vouch for the store: not
    clean, and its own exit code (3), apart from 0 and from 1 (problems found)."""
    world, store = local_world, local_world.store
    base = world.images["a1"].blobs[1].digest
    store.put(world.key(base), flip(world.blobs[base], 7))

    stopped = cli(store, "check", *WORKERS, "--time-limit", "0", "--json")
    assert (stopped.code, stopped.json["complete"], stopped.json["clean"]) == (3, False, False)
    text = cli(store, "check", *WORKERS, "--time-limit", "0")
    assert text.code == 3 and "clean" not in text.out and "--resume goes on" in text.out
    with store.registry() as reg:
        assert not _stop_after_first_blob(reg).clean
    assert cli(store, "check", *WORKERS, "--resume").code == 1


def test_progress_bar_on_a_terminal_and_max_rate(local_world: World, tmp_path: Path,
                                                cli: Callable[..., Run]) -> None:
    """A bar on stderr when it is a terminal, nothing otherwise; --max-rate holds the reads
    to that many bytes per second."""
    store = local_world.store
    quiet = cli(store, "check")
    assert quiet.code == 0 and quiet.err == ""  # not a terminal: no bar
    total = sum(len(b) for b in local_world.blobs.values())

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
    proc = subprocess.Popen([*casengine_command(), *store.cli_args(), "check", "--max-rate",
                             str(total)], stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path,
                            env=env)
    os.close(slave)
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the process has gone
        while chunk := os.read(master, 4096):
            screen += chunk
    os.close(master)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out
    assert b"\rchecking: " in screen and b"B/s]" in screen
    seconds = float(re.search(r"read in ([0-9.]+) s", out)[1])  # type: ignore[index]
    assert seconds >= 0.9  # a second's worth of bytes at --max-rate


# -- when the check itself fails -------------------------------------------------------------


def test_unreadable_root_exits_2(tmp_path: Path, cli: Callable[..., Run]) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"not a directory")
    run = cli(Store("local", str(not_a_dir), ""), "check", "--json")
    assert run.code == 2 and run.out == ""
    assert run.err.startswith("casengine: check failed: ") and run.err.count("\n") == 1


def test_unreadable_bucket_exits_2(tmp_path: Path, s3_url_and_options: tuple[str, dict],
                                   cli: Callable[..., Run]) -> None:
    _, options = s3_url_and_options
    store = Store("s3", "s3://no-such-bucket-for-check/root", str(tmp_path / "index"), options)
    run = cli(store, "check", *WORKERS, "--json")
    assert run.code == 2 and run.out == "", run.err
    assert run.err.startswith("casengine: check failed: ") and run.err.count("\n") == 1


def test_read_error_during_check_exits_2(local_world: World, cli: Callable[..., Run],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that fails mid-check: exit 2, and the API raises the CASError."""
    from casengine.errors import BackendError

    def broken(self: Any, key: str, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        raise BackendError(f"reading {key}: Input/output error")

    store = local_world.store
    backend = open_raw_backend(store)
    backend_class = type(backend)
    backend.close()
    monkeypatch.setattr(backend_class, "read", broken)
    with pytest.raises(CASError, match="Input/output error"):
        check(store)
    run = cli(store, "check", *WORKERS)
    assert run.code == 2
    assert run.err.startswith("casengine: check failed: ") and "Input/output" in run.err


# -- what a finding names ----------------------------------------------------------------------


def test_affected_names_the_indexes_over_a_broken_image(local_world: World) -> None:
    world = local_world
    base = world.images["amd"].blobs[1].digest
    world.store.delete(world.key(base))
    report = check(world.store)
    affected = set(one(report, "missing-object", base).affected)
    assert {"team/multi:latest", f"team/multi@{world.images['multi'].digest}"} <= affected
    assert affected == world.refs(base, transitive=True)


# -- the backend's repository records against the index ------------------------------------------


def test_tag_only_in_the_backend_is_reported(local_world: World) -> None:
    world = local_world
    world.store.put("repositories/team/app/_tags/v3", world.images["a1"].digest.encode())
    report = check(world.store)
    assert any("team/app:v3" in f.affected or "team/app:v3" in f.detail
               for f in report.findings), report.findings


def test_tag_only_in_the_index_is_reported(local_world: World) -> None:
    world = local_world
    world.store.delete("repositories/team/app/_tags/v1")
    report = check(world.store)
    assert any("team/app:v1" in f.affected or "team/app:v1" in f.detail
               for f in report.findings), report.findings


# -- a check while the registry serves: writes in flight are not findings ----------------


def test_a_push_between_its_records_and_its_index_transaction_is_no_finding(
        local_world: World) -> None:
    """A push writes its link and tag records, then records them in the index. A check
    that lists the backend in between waits for the push (its records' locks) instead of
    reporting an unacknowledged link and tag."""
    world = local_world
    digest = world.images["a1"].digest
    blob = Digest.parse(world.images["s1"].blobs[1].digest)  # only in other/svc so far
    with world.store.registry() as reg, ThreadPoolExecutor(1) as pool:
        index = reg.index
        pushed = [records.link_record("team/app", blob), records.tag_record("team/app", "v9")]
        with records.writing(index, reg.backend, pushed, digest.encode()):
            running = pool.submit(Checker(reg, workers=2).run)
            with contextlib.suppress(TimeoutError):
                running.result(timeout=1)  # without waiting, it would be done by now
            with index.transaction(write=True) as txn:  # the push's acknowledgement
                for record in pushed:
                    txn.put(record.table, record.row, record.body(digest.encode()))
        report = running.result(timeout=60)
    assert report.clean, [f.to_json() for f in report.findings]


def test_a_publish_between_its_object_and_its_record_is_no_orphan(
        local_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish puts its object, then records it: one seen unrecorded is judged only once
    it had a moment to be recorded."""
    world = local_world
    data = b"published while the check ran"
    digest = digest_of(data)
    world.store.put(world.key(digest), data)  # the object is out; its record is not yet
    with world.store.registry() as reg, ThreadPoolExecutor(1) as pool:
        listing = reg.backend.list
        recorded: list[Future[Any]] = []

        def list_then_record(prefix: str) -> Iterator[str]:
            yield from listing(prefix)
            if prefix == BLOBS and not recorded:  # its record lands a little later
                recorded.append(pool.submit(
                    lambda: time.sleep(0.3) or reg.engine.ingest(data, digest=digest)))

        monkeypatch.setattr(reg.backend, "list", list_then_record)
        report = Checker(reg, workers=2).run()
        recorded[0].result()
    assert report.clean, [f.to_json() for f in report.findings]


def test_a_time_limit_holds_inside_a_blob(tmp_path: Path) -> None:
    """The limit used to be looked at only between blobs, with four per worker already
    queued: a check of a few big blobs ran to the end, however short its limit."""
    from casengine.registry import Registry

    with Engine.open(str(tmp_path / "root"), compression="never") as engine:
        digests = sorted(str(engine.ingest(os.urandom(16 << 20)).digest) for _ in range(3))
        reg = Registry(engine)
        start = time.monotonic()
        report = Checker(reg, full=True, workers=1, max_rate=8 << 20,
                         deadline=start + 0.5).run()
        took = time.monotonic() - start
        assert not report.complete and not report.clean
        assert took < 4, took  # the whole check would take 6 s at that rate
        assert report.blobs < 3
        resumed = Checker(reg, full=True, workers=1, resume=True).run()
        assert resumed.complete and resumed.clean
        assert report.blobs + resumed.blobs >= len(digests)
