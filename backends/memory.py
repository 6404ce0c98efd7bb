"""``memory://``: objects in this backend instance's own dict, for tests and scratch engines.

Each instance has its own data; two ``MemoryBackend("memory://")`` never share anything.
An object is kept as the list of chunks it was written in, so storing a large blob costs
one copy of each chunk and no final join.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
import time
from collections.abc import Iterator

from casengine.backend import (
    READ_CHUNK,
    Backend,
    Buffer,
    ObjectInfo,
    Writer,
    check_key,
    check_prefix,
)
from casengine.errors import BackendError, NotFound


class _Object:
    __slots__ = ("chunks", "mtime", "size", "starts")

    def __init__(self, chunks: list[Buffer]) -> None:
        self.chunks = chunks
        self.starts: list[int] = []
        pos = 0
        for c in chunks:
            self.starts.append(pos)
            pos += len(c)
        self.size = pos
        self.mtime = time.time()


class MemoryWriter(Writer):
    def __init__(self, backend: MemoryBackend) -> None:
        self._backend = backend
        self._chunks: list[Buffer] = []
        self.size = 0

    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if not view:
            return
        if isinstance(view.obj, bytes):
            chunk: Buffer = view  # immutable: keep a reference, copy nothing
        elif view.readonly:
            chunk = bytes(view)
        else:  # the caller may reuse its buffer: copy, with the GIL released (ctypes)
            chunk = bytearray(len(view))
            ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(chunk)),
                           ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view))
        self._chunks.append(chunk)
        self.size += len(view)

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        check_key(key)
        obj, self._chunks = _Object(self._chunks), []
        return self._backend._publish(key, obj, exclusive)

    def abort(self) -> None:
        self._chunks = []


class MemoryBackend(Backend):
    schemes = ("memory",)
    ephemeral = True

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        self._objects: dict[str, _Object] = {}
        self._lock = threading.Lock()

    def _publish(self, key: str, obj: _Object, exclusive: bool) -> bool:
        with self._lock:
            if exclusive and key in self._objects:
                return False
            self._objects[key] = obj
            return True

    def _get(self, key: str) -> _Object:
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise NotFound(f"no object {key!r} in {self.url}")
        return obj

    def writer(self, key_hint: str | None = None) -> Writer:
        return MemoryWriter(self)

    def read(
        self, key: str, start: int = 0, length: int | None = None, *, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        obj = self._get(key)
        end = obj.size if length is None else min(obj.size, start + length)
        return self._iter(obj, start, end, chunk_size)

    @staticmethod
    def _iter(obj: _Object, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        i = max(0, bisect.bisect_right(obj.starts, start) - 1)
        pos = start
        while pos < end and i < len(obj.chunks):
            chunk, base = obj.chunks[i], obj.starts[i]
            view = memoryview(chunk)[pos - base : min(len(chunk), end - base)]
            for off in range(0, len(view), chunk_size):
                yield bytes(view[off : off + chunk_size])
            pos += len(view)
            i += 1

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        """Join the parts' chunk lists: no byte is copied."""
        chunks: list[Buffer] = []
        for offset, _ in state.get("parts", []):
            chunks.extend(self._get(f"{key}/{offset:016x}").chunks)
        obj = _Object(chunks)
        if obj.size != size:
            raise BackendError(f"staged data of {key} has {obj.size} bytes, expected {size}")
        return self._publish(check_key(final), obj, exclusive)

    def stat(self, key: str) -> ObjectInfo:
        obj = self._get(key)
        return ObjectInfo(key, obj.size, obj.mtime)

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return self._objects.pop(key, None) is not None

    def list(self, prefix: str = "") -> Iterator[str]:
        check_prefix(prefix)
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return iter(keys)
