"""casengine.index_binding: an index that knows nothing of a full store is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from casengine.backend import open_backend
from casengine.engine import Engine
from casengine.errors import ConfigError
from casengine.layout import INDEX_MARK
from casengine.reindex import rebuild


def _store(tmp_path: Path) -> tuple[str, str]:
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        digest = str(engine.ingest(b"kept bytes").digest)
    return str(root), digest


def test_a_new_index_on_a_full_store_is_refused_until_reindex(tmp_path: Path) -> None:
    root, digest = _store(tmp_path)
    shutil.rmtree(Path(root) / ".index")
    for index in (None, str(tmp_path / "typo")):
        with pytest.raises(ConfigError, match="reindex"):
            Engine.open(root, index=index)
    backend = open_backend(root)
    try:
        report = rebuild(backend, str(Path(root) / ".index"))
    finally:
        backend.close()
    assert report.blobs == 1
    with Engine.open(root) as engine:
        assert engine.exists(digest)


def test_a_fresh_store_binds_its_new_index_and_keeps_it(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    with Engine.open(root) as engine:
        with engine.index.transaction() as txn:
            assert txn.get("meta", b"bound") is not None
        engine.ingest(b"first")
    with Engine.open(root) as engine:  # an index with records: open as ever
        assert engine.index.count_blobs() == 1


def test_an_index_from_before_binding_is_adopted(tmp_path: Path) -> None:
    root, digest = _store(tmp_path)
    with Engine.open(root) as engine, engine.index.transaction(write=True) as txn:
        txn.delete("meta", b"bound")  # as an index made before binding existed
    (Path(root) / INDEX_MARK).unlink()  # in a store from before the mark
    with Engine.open(root) as engine:
        assert engine.exists(digest)
        with engine.index.transaction() as txn:
            assert txn.get("meta", b"bound") is not None


def _rebuild(root: str) -> None:
    backend = open_backend(root)
    try:
        rebuild(backend, str(Path(root) / ".index"))
    finally:
        backend.close()


def test_an_index_restored_from_a_backup_is_refused_until_reindex(tmp_path: Path) -> None:
    """An older copy of the index knows nothing of the pushes since: opened, GC's orphan
    pass would delete them as debris of crashed pushes."""
    root, first = _store(tmp_path)
    backup = tmp_path / "backup"
    shutil.copytree(Path(root) / ".index", backup)
    with Engine.open(root) as engine:
        later = str(engine.ingest(b"pushed after the backup").digest)
    shutil.rmtree(Path(root) / ".index")
    shutil.copytree(backup, Path(root) / ".index")
    with pytest.raises(ConfigError, match="older than the store.*reindex"):
        Engine.open(root)
    _rebuild(root)
    with Engine.open(root) as engine:
        assert engine.exists(first) and engine.exists(later)


def test_the_index_of_another_store_is_refused(tmp_path: Path) -> None:
    root_a, _ = _store(tmp_path / "a")
    root_b, digest_b = _store(tmp_path / "b")
    with pytest.raises(ConfigError, match="not the one this store was last used with"):
        Engine.open(root_b, index=str(Path(root_a) / ".index"))
    with Engine.open(root_b) as engine:  # its own index is still welcome
        assert engine.exists(digest_b)


def test_a_store_with_no_objects_takes_any_index(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    with Engine.open(root, index=str(tmp_path / "one")):
        pass
    with Engine.open(root, index=str(tmp_path / "two")) as engine:
        engine.ingest(b"now bound to two")
    with pytest.raises(ConfigError):
        Engine.open(root, index=str(tmp_path / "one"))


def test_each_close_brings_the_mark_up_to_date(tmp_path: Path) -> None:
    root, _ = _store(tmp_path)
    with Engine.open(root) as engine:
        for n in range(3):
            engine.ingest(f"blob {n}".encode())
        generation = engine.index.generation()
    mark = json.loads((Path(root) / INDEX_MARK).read_bytes())
    assert mark["generation"] >= generation > 0


def test_the_mark_never_runs_ahead_of_what_a_power_cut_keeps(tmp_path: Path) -> None:
    """Commits that need not survive a power cut (a lease, an upload's progress) are not
    flushed; a mark naming them would, after the cut, refuse the very index it was made
    from. So the index is flushed before the mark is written, up to what it names."""
    from casengine.index import LmdbIndex
    from casengine.index_binding import mark

    root, _ = _store(tmp_path)
    flushed: list[int] = []
    real_sync = LmdbIndex.sync

    def sync(self: LmdbIndex) -> None:
        real_sync(self)
        flushed.append(self.generation())

    with Engine.open(root) as engine:
        for n in range(3):  # as an upload's claim and release are
            with engine.index.transaction(write=True, durable=False) as txn:
                txn.put("meta", b"scratch", str(n).encode())
        LmdbIndex.sync = sync  # type: ignore[method-assign]
        try:
            mark(engine.backend, engine.index)
        finally:
            LmdbIndex.sync = real_sync  # type: ignore[method-assign]
        written = json.loads(engine.backend.get(INDEX_MARK))["generation"]
        assert flushed and written <= flushed[-1]


def test_an_emptied_store_forgets_the_mark_of_its_old_index(tmp_path: Path) -> None:
    """Emptied and taken up by a new index (reindex), a store kept the old index's mark
    until the new one's first close: killed before that, the new index was refused."""
    import subprocess
    import sys

    root, digest = _store(tmp_path)
    with Engine.open(root) as engine:
        assert engine.delete(digest)
    shutil.rmtree(Path(root) / ".index")
    with Engine.open(root):
        pass  # a new index on the empty store
    assert not (Path(root) / INDEX_MARK).exists()
    code = ("import os, sys; from casengine.engine import Engine\n"
            "e = Engine.open(sys.argv[1]); e.ingest(b'pushed, then killed'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, root], check=True)
    with Engine.open(root) as engine:  # no stale mark to refuse it
        assert engine.index.count_blobs() == 1
