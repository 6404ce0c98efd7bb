"""casengine.registry: two writers racing on one repository, with the interleaving forced.

A test-only backend wrapper holds one thread at a chosen backend call (a record's put or
delete) while a second thread pushes or deletes on the same registry, then lets the first
go on. Without the writer lock ordering the backend records, the second writer finishes
inside that pause and the first one's late backend call leaves the records disagreeing
with the index (or a quota crossed). With it, the second writer waits for the first, and
both end as the index says. Threads on a local root and on memory://; nothing stubbed but
the pause.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from casengine.backend import Buffer
from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import QuotaExceeded
from casengine.layout import link_key, manifest_key, tag_key
from casengine.registry import Registry
from tests.helpers import KINDS, WrappedBackend, open_engine
from tests.registry_helpers import (
    backend_records,
    config,
    index_records,
    layer,
    oci_manifest,
    push,
    push_blobs,
    simple_image,
)

#: How long the second writer gets to finish while the first is held. Where the fix
#: holds, the second writer is blocked for all of it; so this is the cost of each test.
RIVAL_TIME = 0.5


class Pausing(WrappedBackend):
    """Holds the first call of ``op`` ("put" or "delete") on ``key`` from the thread that
    armed it, until the test releases it: a put once it has landed, a delete before."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.tmp_dir = getattr(inner, "tmp_dir", None)
        self._armed: tuple[str, str, int] | None = None
        self.held = threading.Event()
        self.release = threading.Event()

    def arm(self, op: str, key: str) -> None:
        self._armed = (op, key, threading.get_ident())

    def _maybe_hold(self, op: str, key: str) -> None:
        if self._armed == (op, key, threading.get_ident()):
            self._armed = None
            self.held.set()
            assert self.release.wait(10), "the test never released the held call"

    def put(self, key: str, data: Buffer, *, exclusive: bool = False) -> bool:
        done = self.inner.put(key, data, exclusive=exclusive)
        self._maybe_hold("put", key)
        return done

    def delete(self, key: str) -> bool:
        self._maybe_hold("delete", key)
        return self.inner.delete(key)


@pytest.fixture(params=KINDS)
def pausing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Registry, Pausing]]:
    inner = open_engine(request.param, tmp_path)
    backend = Pausing(inner.backend)
    try:
        yield Registry(Engine(backend, inner.index)), backend
    finally:
        backend.release.set()
        inner.close()


def race(backend: Pausing, op: str, key: str, first: Callable[[], object],
         rival: Callable[[], object]) -> list[BaseException]:
    """Run ``first`` until it reaches ``op`` on ``key``; hold it there while ``rival`` runs
    (for up to RIVAL_TIME); then let both finish. Returns what each raised, if anything."""
    errors: list[BaseException] = []

    def run(fn: Callable[[], object], arm: bool) -> None:
        if arm:
            backend.arm(op, key)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(exc)

    a = threading.Thread(target=run, args=(first, True))
    a.start()
    assert backend.held.wait(5), f"the first writer never reached {op} {key}"
    b = threading.Thread(target=run, args=(rival, False))
    b.start()
    b.join(RIVAL_TIME)
    backend.release.set()
    a.join(10)
    b.join(10)
    assert not a.is_alive() and not b.is_alive(), "a writer is stuck"
    return errors


def assert_records_agree(reg: Registry, repo: str) -> None:
    assert backend_records(reg.engine, repo) == index_records(reg, repo)


def test_two_pushes_of_one_tag_leave_the_record_as_the_index(
        pausing: tuple[Registry, Pausing]) -> None:
    """t3: A writes tag record X, B pushes Y completely, A commits X: index X, backend Y."""
    reg, backend = pausing
    x, y = simple_image("x"), simple_image("y")
    push_blobs(reg, "a", (*x.blobs, *y.blobs))
    errors = race(backend, "put", tag_key("a", "v1"),
                  lambda: reg.put_manifest("a", "v1", x.content, x.media_type),
                  lambda: reg.put_manifest("a", "v1", y.content, y.media_type))
    assert errors == []
    assert reg.tag_map("a")["v1"] in (x.digest, y.digest)
    assert_records_agree(reg, "a")


@pytest.mark.parametrize("what", ["tag", "manifest", "link"])
def test_a_delete_racing_a_push_keeps_what_the_index_keeps(
        pausing: tuple[Registry, Pausing], what: str) -> None:
    """t7b and friends: a delete removes the row, then (held here) its backend record;
    meanwhile a push records the same thing again. The record must stay: the index has
    it, and reindex would otherwise lose what the push acknowledged."""
    reg, backend = pausing
    m = simple_image("m")
    push(reg, "a", m, "v1")
    d = Digest.parse(m.digest)
    loose = layer("loose")
    push_blobs(reg, "a", [loose])
    delete, key, again = {
        "tag": (lambda: reg.delete_tag("a", "v1"), tag_key("a", "v1"),
                lambda: reg.put_manifest("a", "v1", m.content, m.media_type)),
        "manifest": (lambda: reg.delete_manifest("a", m.digest), manifest_key("a", d),
                     lambda: reg.put_manifest("a", m.digest, m.content, m.media_type)),
        "link": (lambda: reg.unlink("a", loose.digest),
                 link_key("a", Digest.parse(loose.digest)),
                 lambda: reg.link("a", loose.digest)),
    }[what]
    if what == "manifest":
        reg.delete_tag("a", "v1")  # else the manifest delete takes the tag first
    errors = race(backend, "delete", key, delete, again)
    assert errors == []
    assert_records_agree(reg, "a")


def test_a_tag_delete_waits_for_a_push_held_writing_the_tag(
        pausing: tuple[Registry, Pausing]) -> None:
    """The other order: the push has written its tag record and is held before it
    commits; a delete of the tag runs then. Unordered, the delete took the record the push
    had just written and the push then committed the tag: the index had it, not the
    backend."""
    reg, backend = pausing
    m = simple_image("m")
    push(reg, "a", m, "v1")
    n = simple_image("n")
    push_blobs(reg, "a", n.blobs)
    errors = race(backend, "put", tag_key("a", "v1"),
                  lambda: reg.put_manifest("a", "v1", n.content, n.media_type),
                  lambda: reg.delete_tag("a", "v1"))
    assert errors == []
    assert_records_agree(reg, "a")


def test_parallel_manifests_cannot_jointly_cross_a_quota(
        pausing: tuple[Registry, Pausing]) -> None:
    """t4: two manifests under one namespace quota, each within it alone, together over.
    Both pass the early check; the one recorded second must be refused, and leave no
    records behind."""
    reg, backend = pausing
    cfg = config("q")
    images = {repo: oci_manifest(cfg, [layer(repo, 600)]) for repo in ("q/r0", "q/r1")}
    each = max(m.size + sum(b.size for b in m.blobs) for m in images.values())
    limit = each * 3 // 2
    reg.quotas.set("q/", limit)
    for repo, m in images.items():
        push_blobs(reg, repo, m.blobs)
    first, second = images.items()
    errors = race(backend, "put", link_key(first[0], Digest.parse(first[1].digest)),
                  lambda: reg.put_manifest(first[0], "v", first[1].content, first[1].media_type),
                  lambda: reg.put_manifest(second[0], "v", second[1].content,
                                           second[1].media_type))
    assert len(errors) == 1 and isinstance(errors[0], QuotaExceeded), errors
    assert reg.quotas.used("q/") <= limit
    recorded = [repo for repo in images if reg.manifests(repo)]
    assert len(recorded) == 1
    for repo in images:
        assert_records_agree(reg, repo)


def test_a_push_held_at_its_backend_write_blocks_no_other_writer(
        pausing: tuple[Registry, Pausing]) -> None:
    """The record locks are the records' own: a push whose tag record's put is slow (an S3
    round trip, retried) holds up no other push, as the index's writer lock would."""
    reg, backend = pausing
    m, other = simple_image("m"), simple_image("other")
    push_blobs(reg, "a", m.blobs)
    push_blobs(reg, "b", other.blobs)
    finished: list[bool] = []

    def rival() -> None:
        reg.put_manifest("b", "v1", other.content, other.media_type)
        reg.ingest_blob("b", b"and a blob")
        finished.append(not backend.release.is_set())  # while the first was still held

    errors = race(backend, "put", tag_key("a", "v1"),
                  lambda: reg.put_manifest("a", "v1", m.content, m.media_type), rival)
    assert errors == []
    assert finished == [True], "the other push waited for the held one"
    assert_records_agree(reg, "a")
    assert_records_agree(reg, "b")


def assert_whole(reg: Registry, repo: str) -> None:
    """Every tag names a recorded manifest, whose blobs are all linked; and the backend's
    records say what the index says, the repository's own record included."""
    rows = index_records(reg, repo)
    for tag, digest in rows["tags"].items():
        assert digest in rows["manifests"], (tag, digest)
    with reg.index.transaction() as txn:
        refs = {k.split(b"\0", 1)[1].decode() for k, _ in txn.scan("refs", f"{repo}\0".encode())}
    assert refs <= rows["links"], refs - rows["links"]
    assert_records_agree(reg, repo)
    assert reg.repository_exists(repo) == reg.backend.exists(f"repositories/{repo}/_repo")


@pytest.mark.parametrize("held", ["link", "tag"])
def test_repo_rm_racing_a_push_leaves_it_gone_or_whole(pausing: tuple[Registry, Pausing],
                                                       held: str) -> None:
    """repo rm deleted manifests one by one and then the rest, and swept the backend
    without the record locks: a push in between kept its tag and lost its links (GC took
    its layers), or kept its rows and lost its records (reindex dropped it)."""
    reg, backend = pausing
    m, n = simple_image("m"), simple_image("n")
    push(reg, "a", m, "v1")
    key = (link_key("a", Digest.parse(m.blobs[0].digest)) if held == "link"
           else tag_key("a", "v1"))

    def again() -> None:
        push(reg, "a", n, "v2")

    errors = race(backend, "delete", key, lambda: reg.delete_repository("a"), again)
    assert errors == []
    assert reg.tag_map("a") == {"v2": n.digest}
    assert_whole(reg, "a")


def test_a_tag_pushed_while_its_manifest_is_deleted_is_not_left_dangling(
        pausing: tuple[Registry, Pausing]) -> None:
    reg, backend = pausing
    m = simple_image("m")
    push(reg, "a", m, "v1")
    # held at the record of the tag it removes: before, that came before the manifest's
    # transaction, and a tag pushed then was left naming the deleted manifest
    errors = race(backend, "delete", tag_key("a", "v1"),
                  lambda: reg.delete_manifest("a", m.digest),
                  lambda: reg.put_manifest("a", "latest", m.content, m.media_type))
    assert errors == []
    assert_whole(reg, "a")
