"""The metadata index beside the backend: what is stored, how, and since when.

:class:`Index` is the small interface the engine talks to; :class:`LmdbIndex` implements it
on LMDB, which gives ordered keys, readers that never block, and one writer at a time
across every thread and process that opens the same directory. Another metadata store can
be added by implementing :class:`Index`.

The index is a cache of facts the backend can prove: everything in it can be rebuilt from
the backend's keys and objects (see :mod:`casengine.layout`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import lmdb

from casengine.errors import BackendError, ConfigError

#: Virtual size of the LMDB map. The file grows as needed; this only bounds it.
DEFAULT_MAP_SIZE = 64 << 30


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """What the index knows of one stored blob."""

    digest: str  #: ``algorithm:hex`` of the logical bytes
    size: int  #: logical size in bytes
    codec: str  #: how the bytes are stored (``raw``, ``zst``)
    stored_size: int  #: size of the stored object
    xxh3: str  #: xxh3-128 of the stored bytes, hex; "" until first computed (see check)
    created: float  #: unix time the blob was first stored
    touched: float  #: unix time it was last stored again or referenced


class Index(ABC):
    """Blob records keyed by digest string. Implementations are thread- and process-safe."""

    @abstractmethod
    def get_blob(self, digest: str) -> BlobRecord | None: ...

    @abstractmethod
    def add_blob(self, record: BlobRecord) -> bool:
        """Insert ``record`` unless the digest is present; then touch it and return False."""

    @abstractmethod
    def touch_blob(self, digest: str, when: float | None = None) -> bool: ...

    @abstractmethod
    def delete_blob(self, digest: str) -> bool: ...

    @abstractmethod
    def iter_blobs(self, start: str = "") -> Iterator[BlobRecord]:
        """Records in digest order, from the first digest >= ``start``."""

    @abstractmethod
    def count_blobs(self) -> int: ...

    # Upload sessions: JSON-able records keyed by upload id. ``update_upload`` is the one
    # atomic read-modify-write every session change goes through.

    @abstractmethod
    def get_upload(self, upload_id: str) -> dict | None: ...

    @abstractmethod
    def update_upload(self, upload_id: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Atomically replace the record with ``change(old)``; None deletes it.

        ``change`` runs inside the write transaction, so no other thread or process can
        change the record in between; it may raise to leave the record as it was.
        """

    @abstractmethod
    def iter_uploads(self) -> Iterator[dict]: ...

    def close(self) -> None:
        """Release the store. The default has nothing to release."""


# version, codec, size, stored size, xxh3-128, created, touched
_BLOB = struct.Struct("<B7sQQ16sdd")
_VERSION = 1


_NO_XXH3 = bytes(16)


def _pack(r: BlobRecord) -> bytes:
    xxh = bytes.fromhex(r.xxh3) if r.xxh3 else _NO_XXH3
    return _BLOB.pack(_VERSION, r.codec.encode(), r.size, r.stored_size, xxh, r.created, r.touched)


def _unpack(key: bytes, value: bytes) -> BlobRecord:
    version, codec, size, stored, xxh, created, touched = _BLOB.unpack(value)
    if version != _VERSION:
        raise BackendError(f"index record of {key.decode()} has unknown version {version}")
    return BlobRecord(key.decode(), size, codec.rstrip(b"\0").decode(), stored,
                      "" if xxh == _NO_XXH3 else xxh.hex(), created, touched)


class LmdbIndex(Index):
    """An LMDB environment in a directory; ``temporary`` ones are removed on close."""

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE, temporary: bool = False):
        self.path = path
        self._temporary = temporary
        try:
            os.makedirs(path, exist_ok=True)
            self.env = lmdb.open(
                path, map_size=map_size, max_dbs=16, max_readers=1024, subdir=True,
                # a temporary index dies with the process: no point paying for fsync
                sync=not temporary, metasync=not temporary,
            )
        except (OSError, lmdb.Error) as exc:
            raise ConfigError(f"cannot open the index at {path}: {exc}") from exc
        self._blobs = self.env.open_db(b"blobs")
        self._uploads = self.env.open_db(b"uploads")

    @classmethod
    def temporary(cls) -> LmdbIndex:
        return cls(tempfile.mkdtemp(prefix="casengine-index-"), temporary=True)

    def get_blob(self, digest: str) -> BlobRecord | None:
        key = digest.encode()
        with self.env.begin(db=self._blobs) as txn:
            value = txn.get(key)
        return None if value is None else _unpack(key, value)

    def add_blob(self, record: BlobRecord) -> bool:
        key = record.digest.encode()
        with self.env.begin(db=self._blobs, write=True) as txn:
            old = txn.get(key)
            if old is None:
                txn.put(key, _pack(record))
                return True
            txn.put(key, _pack(replace(_unpack(key, old), touched=record.touched)))
            return False

    def touch_blob(self, digest: str, when: float | None = None) -> bool:
        key = digest.encode()
        with self.env.begin(db=self._blobs, write=True) as txn:
            old = txn.get(key)
            if old is None:
                return False
            txn.put(key, _pack(replace(_unpack(key, old), touched=time.time() if when is None else when)))
            return True

    def delete_blob(self, digest: str) -> bool:
        with self.env.begin(db=self._blobs, write=True) as txn:
            return txn.delete(digest.encode())

    def iter_blobs(self, start: str = "") -> Iterator[BlobRecord]:
        # One short read transaction per batch, so a long walk never pins old pages.
        key = start.encode()
        first = True
        while True:
            batch: list[BlobRecord] = []
            with self.env.begin(db=self._blobs) as txn:
                cur = txn.cursor()
                if not cur.set_range(key):
                    break
                if not first and cur.key() == key and not cur.next():
                    break
                for k, v in cur:
                    batch.append(_unpack(k, v))
                    if len(batch) == 1000:
                        break
            if not batch:
                break
            yield from batch
            key = batch[-1].digest.encode()
            first = False

    def count_blobs(self) -> int:
        with self.env.begin(db=self._blobs) as txn:
            return txn.stat(self._blobs)["entries"]

    def get_upload(self, upload_id: str) -> dict | None:
        with self.env.begin(db=self._uploads) as txn:
            value = txn.get(upload_id.encode())
        return None if value is None else json.loads(value)

    def update_upload(self, upload_id: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        key = upload_id.encode()
        with self.env.begin(db=self._uploads, write=True) as txn:
            old = txn.get(key)
            new = change(None if old is None else json.loads(old))
            if new is None:
                txn.delete(key)
            else:
                txn.put(key, json.dumps(new, separators=(",", ":")).encode())
            return new

    def iter_uploads(self) -> Iterator[dict]:
        with self.env.begin(db=self._uploads) as txn:
            values = [json.loads(v) for _, v in txn.cursor()]
        return iter(values)

    def close(self) -> None:
        self.env.close()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)
