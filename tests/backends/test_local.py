import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.local import LocalBackend
from casengine.backend import Backend, LocalPaths
from casengine.testing.backend_suite import BackendSuite


class TestLocalBackend(BackendSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[LocalBackend]:
        b = LocalBackend(f"file://{tmp_path}/root")
        yield b
        b.close()

    def leftovers(self, backend: Backend) -> list[str]:
        assert isinstance(backend, LocalBackend)
        return os.listdir(backend.tmp_dir)


def test_plain_path_and_file_url_are_the_same_root(tmp_path: Path) -> None:
    LocalBackend(str(tmp_path)).put("k", b"x")
    assert LocalBackend(f"file://{tmp_path}").get("k") == b"x"


def test_keys_stay_inside_the_root(tmp_path: Path) -> None:
    b = LocalBackend(str(tmp_path / "root"))
    b.put("a/b", b"x")
    assert Path(b.local_path("a/b")).resolve().is_relative_to((tmp_path / "root").resolve())
    assert isinstance(b, LocalPaths)
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_relative_file_url_is_refused(tmp_path: Path) -> None:
    from casengine.errors import BackendError

    with pytest.raises(BackendError, match="absolute"):
        LocalBackend("file://relative/path")


def test_a_purge_leaves_a_live_writers_temp_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """'uploads purge --older-than 0s' while a monolithic push streams its body: its temp
    file is young, and its writer, for all the purge can tell, alive."""
    import time

    from casengine import backend as backend_module

    backend = LocalBackend(str(tmp_path))
    writer = backend.writer()
    writer.write(b"the first half, ")
    assert backend.purge_staging(time.time() + 1) == 0
    writer.write(b"then the rest")
    assert writer.commit("blobs/x")
    assert backend.get("blobs/x") == b"the first half, then the rest"
    left = backend.writer()  # a writer killed mid-body, an hour ago
    left.write(b"partial")
    monkeypatch.setattr(backend_module, "WRITER_MIN_IDLE", 0.0)
    assert backend.purge_staging(time.time() + 1) == 1
