import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from backends.fsspec import FsspecBackend
from casengine.backend import Backend, open_backend
from casengine.errors import NotFound, UnknownScheme
from casengine.testing.backend_suite import BackendSuite


class TestFsspecBackend(BackendSuite):
    """fsspec's own local filesystem, as ``local://``: ``file://`` is casengine's local backend."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[FsspecBackend]:
        b = FsspecBackend(f"local://{tmp_path}/root")
        yield b
        b.close()

    def leftovers(self, backend: Backend) -> list[str]:
        assert isinstance(backend, FsspecBackend)
        return [str(p) for p in backend.fs.ls(backend.tmp_dir)]


def test_open_backend_picks_fsspec_for_other_protocols(tmp_path: Path) -> None:
    b = open_backend(f"local://{tmp_path}")
    assert isinstance(b, FsspecBackend)
    assert b.root == str(tmp_path)
    b.put("a/b", b"x")
    assert (tmp_path / "a" / "b").read_bytes() == b"x"


def test_local_put_if_absent_is_native(tmp_path: Path) -> None:
    assert FsspecBackend(f"local://{tmp_path}").atomic_exclusive


def test_check_then_move_when_there_is_no_native_way(tmp_path: Path) -> None:
    """The fallback for filesystems without ``link``: existing objects are still kept."""
    b = FsspecBackend(f"memory://casengine-{uuid.uuid4().hex}")  # fsspec's memory is global
    assert not b.atomic_exclusive
    assert isinstance(b.fs, fsspec.implementations.memory.MemoryFileSystem)
    try:
        assert b.put("k", b"first", exclusive=True)
        assert not b.put("k", b"second", exclusive=True)
        assert b.get("k") == b"first"
        assert list(b.list("")) == ["k"]
    finally:
        b.fs.rm(b.root, recursive=True)


def test_a_directory_is_no_object(tmp_path: Path) -> None:
    b = FsspecBackend(f"local://{tmp_path}")
    b.put("a/b", b"x")
    with pytest.raises(NotFound):
        b.stat("a")
    with pytest.raises(NotFound):
        b.read("a")
    assert not b.delete("a")
    assert list(b.list("a")) == ["a/b"]


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(UnknownScheme):
        open_backend("nosuchproto://bucket/path")
