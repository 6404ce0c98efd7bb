"""The backend conformance suite. Every backend's test module subclasses it in a few lines::

    class TestMemory(BackendSuite):
        @pytest.fixture
        def backend(self):
            b = MemoryBackend("memory://")
            yield b
            b.close()

After every test it checks that nothing was left behind: no staged, temp or partial
objects (:meth:`BackendSuite.leftovers`, which a backend's subclass extends with what only it
can see, such as open S3 multipart uploads), and every listed key deletes cleanly.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from casengine.backend import Backend, ObjectInfo
from casengine.errors import InvalidKey, NotFound

BAD_KEYS = ["", "/abs", "../up", "a/../../up", "a//b", "a/", ".hidden", "a/./b", "a/..", "a\\b",
            "a\x00b", "ünï"]


def _read(backend: Backend, key: str, start: int = 0, length: int | None = None) -> bytes:
    return b"".join(backend.read(key, start, length))


class BackendSuite:
    """Subclass and provide a ``backend`` fixture."""

    @pytest.fixture
    def backend(self) -> Iterator[Backend]:  # pragma: no cover - overridden
        raise NotImplementedError("a backend's test class provides the 'backend' fixture")

    def leftovers(self, backend: Backend) -> list[str]:
        """Temp or partial state a backend can hold outside its listing; extend per backend."""
        return []

    @pytest.fixture(autouse=True)
    def _nothing_left_behind(self, backend: Backend) -> Iterator[None]:
        yield
        assert self.leftovers(backend) == [], "temp or partial objects were left behind"
        for key in list(backend.list("")):
            assert backend.delete(key), f"listed key {key!r} did not delete"
        assert list(backend.list("")) == []

    # -- put and read -------------------------------------------------------------------

    def test_put_and_read_back(self, backend: Backend) -> None:
        assert backend.put("a/b/c", b"hello")
        assert backend.get("a/b/c") == b"hello"
        assert backend.stat("a/b/c").size == 5

    def test_empty_object(self, backend: Backend) -> None:
        assert backend.put("empty", b"")
        assert backend.get("empty") == b""
        assert backend.stat("empty").size == 0

    def test_streamed_write_of_many_chunks(self, backend: Backend) -> None:
        data = os.urandom(3 << 20)
        with backend.writer() as w:
            for off in range(0, len(data), 100_000):
                w.write(memoryview(data)[off : off + 100_000])
            assert w.size == len(data)
            assert w.commit("big")
        assert _read(backend, "big") == data
        chunks = list(backend.read("big", chunk_size=1 << 20))
        assert all(len(c) <= 1 << 20 for c in chunks)

    def test_writer_buffer_may_be_reused(self, backend: Backend) -> None:
        buf = bytearray(b"x" * 1000)
        with backend.writer() as w:
            w.write(buf)
            buf[:] = b"y" * 1000
            w.write(buf)
            w.commit("reuse")
        assert backend.get("reuse") == b"x" * 1000 + b"y" * 1000

    def test_staged_bytes_are_invisible_until_commit(self, backend: Backend) -> None:
        with backend.writer() as w:
            w.write(b"partial")
            assert list(backend.list("")) == []
            assert not backend.exists("k")
            w.commit("k")
        assert backend.get("k") == b"partial"

    def test_abort_leaves_nothing(self, backend: Backend) -> None:
        with backend.writer() as w:
            w.write(os.urandom(1 << 20))
        assert list(backend.list("")) == []

    def test_exception_in_writer_block_leaves_nothing(self, backend: Backend) -> None:
        with pytest.raises(RuntimeError), backend.writer() as w:
            w.write(b"abc")
            raise RuntimeError("client went away")
        assert list(backend.list("")) == []

    # -- put-if-absent and overwrite -----------------------------------------------------

    def test_put_overwrites_atomically(self, backend: Backend) -> None:
        backend.put("k", b"one")
        assert backend.put("k", b"two")
        assert backend.get("k") == b"two"

    def test_exclusive_put_keeps_the_first(self, backend: Backend) -> None:
        assert backend.put("k", b"first", exclusive=True)
        assert not backend.put("k", b"second", exclusive=True)
        assert backend.get("k") == b"first"

    def test_concurrent_exclusive_puts_have_one_winner(self, backend: Backend) -> None:
        results: list[bool] = []
        barrier = threading.Barrier(6)

        def race(i: int) -> None:
            with backend.writer() as w:
                w.write(f"writer {i}".encode())
                barrier.wait()
                results.append(w.commit("contended", exclusive=True))

        threads = [threading.Thread(target=race, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 5 + [True]
        assert backend.get("contended").startswith(b"writer ")

    # -- ranged reads ----------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("start", "length"),
        [(0, None), (0, 1), (10, 100), (999_999, None), (500_000, 10), (0, 10**9), (10**6, None)],
    )
    def test_range_read(self, backend: Backend, start: int, length: int | None) -> None:
        data = bytes(range(256)) * 3907  # 1,000,192 bytes
        backend.put("r", data)
        want = data[start:] if length is None else data[start : start + length]
        assert _read(backend, "r", start, length) == want

    def test_read_missing_raises_not_found_eagerly(self, backend: Backend) -> None:
        with pytest.raises(NotFound):
            backend.read("nope")
        with pytest.raises(FileNotFoundError):
            backend.stat("nope")
        assert not backend.exists("nope")

    # -- stat, delete, list --------------------------------------------------------------

    def test_stat(self, backend: Backend) -> None:
        backend.put("s/t", b"12345")
        info = backend.stat("s/t")
        assert isinstance(info, ObjectInfo)
        assert (info.key, info.size) == ("s/t", 5)
        assert info.mtime > 0

    def test_delete(self, backend: Backend) -> None:
        backend.put("d", b"x")
        assert backend.delete("d")
        assert not backend.exists("d")
        assert not backend.delete("d")

    def test_list_by_prefix(self, backend: Backend) -> None:
        keys = ["blobs/sha256/ab/ab1", "blobs/sha256/ab/ab2", "blobs/sha256/cd/cd1",
                "blobs/sha512/ef/ef1", "other"]
        for k in keys:
            backend.put(k, b"x")
        assert sorted(backend.list("")) == sorted(keys)
        assert sorted(backend.list("blobs/")) == keys[:4]
        assert sorted(backend.list("blobs/sha256/")) == keys[:3]
        assert sorted(backend.list("blobs/sha256/a")) == keys[:2]
        assert sorted(backend.list("blobs/sha256/ab/ab2")) == keys[1:2]
        assert list(backend.list("nothing/")) == []

    # -- keys ------------------------------------------------------------------------------

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_bad_keys_are_refused(self, backend: Backend, key: str) -> None:
        with pytest.raises(InvalidKey):
            backend.put(key, b"x")
        with pytest.raises(InvalidKey):
            backend.read(key)
        with pytest.raises(InvalidKey):
            backend.stat(key)
        with pytest.raises(InvalidKey):
            backend.delete(key)
        assert list(backend.list("")) == []
