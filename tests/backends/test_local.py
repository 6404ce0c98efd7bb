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
