"""casengine.index_binding: an index that knows nothing of a full store is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from casengine.backend import open_backend
from casengine.engine import Engine
from casengine.errors import ConfigError
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
    with Engine.open(root) as engine:
        assert engine.exists(digest)
        with engine.index.transaction() as txn:
            assert txn.get("meta", b"bound") is not None
