from collections.abc import Iterator

import pytest

from backends.memory import MemoryBackend
from casengine.testing.backend_suite import BackendSuite


class TestMemoryBackend(BackendSuite):
    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        b = MemoryBackend("memory://")
        yield b
        b.close()


def test_instances_share_nothing() -> None:
    a, b = MemoryBackend(), MemoryBackend()
    a.put("k", b"x")
    assert not b.exists("k")
