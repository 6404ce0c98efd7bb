"""The metadata index beside the backend: what is stored, how, and since when.

An index is a set of named tables of ordered byte keys, changed in transactions that are
atomic across every thread and process using it. :class:`Index` asks an implementation
for just that (:meth:`Index.transaction` returning a :class:`Txn`) and builds the typed
operations the engine uses on top; :class:`LmdbIndex` implements it on LMDB, which gives
ordered keys, readers that never block, and one writer at a time across processes.

The index is a cache of facts the backend can prove: everything in it can be rebuilt from
the backend's keys and objects (see :mod:`casengine.layout`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Protocol

import lmdb

from casengine.errors import BackendError, Closed, ConfigError

#: Virtual size of the LMDB map. The file grows as needed; this only bounds it.
DEFAULT_MAP_SIZE = 64 << 30

#: Every table an index holds. Adding one is adding a name here.
TABLES = (
    "blobs",  # digest -> BlobRecord
    "deleting",  # digest -> lease of the process deleting the blob's object
    "uploads",  # upload id -> session record (JSON)
    "repos",  # repository name -> repository record (JSON)
    "links",  # repo \0 digest -> when linked (float64): the blob is readable through the repo
    "linked",  # digest \0 repo -> b"": the same links, by blob (what GC asks)
    "manifests",  # repo \0 digest -> manifest record (JSON)
    "tags",  # repo \0 tag -> digest
    "compact",  # digest -> b"" or the lease of the process compressing it (casengine.compactor)
    "refs",  # repo \0 digest -> reference count from the repo's manifests
    "referrers",  # repo \0 subject \0 digest -> descriptor (JSON)
    "quotas",  # namespace prefix -> limit in bytes
    "locks",  # name -> lease of the process holding it (one GC at a time)
    "transcodes",  # source digest \0 zstd:level -> converted layer (JSON; a cache)
    "meta",  # name -> facts about the index itself (casengine.index_binding)
)


class Txn(Protocol):
    """One transaction over the index's tables. Keys and values are bytes."""

    def get(self, table: str, key: bytes) -> bytes | None: ...

    def put(self, table: str, key: bytes, value: bytes) -> None: ...

    def delete(self, table: str, key: bytes) -> bool: ...

    def scan(self, table: str, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Entries whose key starts with ``prefix``, in key order, from ``start`` on."""
        ...

    def count(self, table: str) -> int: ...


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


# version, codec, size, stored size, xxh3-128, created, touched
_BLOB = struct.Struct("<B7sQQ16sdd")
_VERSION = 1
_NO_XXH3 = bytes(16)


def pack_blob(r: BlobRecord) -> bytes:
    xxh = bytes.fromhex(r.xxh3) if r.xxh3 else _NO_XXH3
    return _BLOB.pack(_VERSION, r.codec.encode(), r.size, r.stored_size, xxh, r.created, r.touched)


def unpack_blob(key: bytes, value: bytes) -> BlobRecord:
    version, codec, size, stored, xxh, created, touched = _BLOB.unpack(value)
    if version != _VERSION:
        raise BackendError(f"index record of {key.decode()} has unknown version {version}")
    return BlobRecord(key.decode(), size, codec.rstrip(b"\0").decode(), stored,
                      "" if xxh == _NO_XXH3 else xxh.hex(), created, touched)


class Index(ABC):
    """Tables in transactions; the typed operations below are built on :meth:`transaction`."""

    @abstractmethod
    def transaction(self, *, write: bool = False,
                    durable: bool = True) -> AbstractContextManager[Txn]:
        """A transaction; a write one commits when the block ends without an exception.

        A durable commit is on disk when the block ends. ``durable=False`` is for records
        whose loss in a power cut is harmless (a lease); it still survives ``kill -9``.
        """

    def close(self) -> None:
        """Release the store. The default has nothing to release."""

    def generation(self) -> int:
        """How many write transactions this index has committed: it only grows (0: an
        index that does not count)."""
        return 0

    def sync(self) -> None:
        """Make every committed transaction durable. The default keeps nothing to flush."""

    @contextlib.contextmanager
    def locks(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the named locks, shared with every thread and process using this index
        (taken in sorted order, so two holders of several never deadlock). The default
        serves one process: an index no other process opens."""
        table: dict[str, threading.Lock] = self.__dict__.setdefault("_named_locks", {})
        held = [table.setdefault(n, threading.Lock()) for n in sorted(set(names))]
        for lock in held:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(held):
                lock.release()

    # -- blobs ---------------------------------------------------------------------------

    def get_blob(self, digest: str) -> BlobRecord | None:
        key = digest.encode()
        with self.transaction() as txn:
            value = txn.get("blobs", key)
        return None if value is None else unpack_blob(key, value)

    def add_blob(self, record: BlobRecord,
                 guard: Callable[[Txn], None] | None = None) -> bool:
        """Insert ``record`` unless the digest is present; then touch it and return False.

        ``guard`` runs first inside the same transaction and may raise to refuse.
        """
        key = record.digest.encode()
        with self.transaction(write=True) as txn:
            if guard is not None:
                guard(txn)
            old = txn.get("blobs", key)
            if old is None:
                txn.put("blobs", key, pack_blob(record))
                return True
            txn.put("blobs", key, pack_blob(replace(unpack_blob(key, old), touched=record.touched)))
            return False

    def touch_blob(self, digest: str, when: float | None = None) -> bool:
        key = digest.encode()
        with self.transaction(write=True) as txn:
            old = txn.get("blobs", key)
            if old is None:
                return False
            touched = time.time() if when is None else when
            txn.put("blobs", key, pack_blob(replace(unpack_blob(key, old), touched=touched)))
            return True

    def delete_blob(self, digest: str) -> bool:
        with self.transaction(write=True) as txn:
            return txn.delete("blobs", digest.encode())

    def iter_blobs(self, start: str = "") -> Iterator[BlobRecord]:
        """Records in digest order, from the first digest >= ``start``.

        One short read transaction per batch, so a long walk never pins old pages.
        """
        key = start.encode()
        skip_first = False
        while True:
            with self.transaction() as txn:
                batch = []
                for k, v in txn.scan("blobs", start=key):
                    if skip_first and k == key:
                        continue
                    batch.append(unpack_blob(k, v))
                    if len(batch) == 1000:
                        break
            yield from batch
            if len(batch) < 1000:
                return
            key, skip_first = batch[-1].digest.encode(), True

    def count(self, table: str) -> int:
        with self.transaction() as txn:
            return txn.count(table)

    def count_blobs(self) -> int:
        return self.count("blobs")

    # -- upload sessions: JSON records; update_upload is their one read-modify-write -----

    def get_upload(self, upload_id: str) -> dict | None:
        with self.transaction() as txn:
            value = txn.get("uploads", upload_id.encode())
        return None if value is None else json.loads(value)

    def update_upload(self, upload_id: str, change: Callable[[dict | None], dict | None],
                      *, durable: bool = True) -> dict | None:
        """Atomically replace the record with ``change(old)``; None deletes it.

        ``change`` runs inside the write transaction, so no other thread or process can
        change the record in between; it may raise to leave the record as it was.
        """
        key = upload_id.encode()
        with self.transaction(write=True, durable=durable) as txn:
            old = txn.get("uploads", key)
            new = change(None if old is None else json.loads(old))
            if new is None:
                txn.delete("uploads", key)
            else:
                txn.put("uploads", key, json.dumps(new, separators=(",", ":")).encode())
            return new

    def iter_uploads(self) -> Iterator[dict]:
        with self.transaction() as txn:
            values = [json.loads(v) for _, v in txn.scan("uploads")]
        return iter(values)


class _LmdbTxn:
    __slots__ = ("_dbs", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]) -> None:
        self._txn = txn
        self._dbs = dbs

    def get(self, table: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._dbs[table])

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._txn.put(key, value, db=self._dbs[table])

    def delete(self, table: str, key: bytes) -> bool:
        return self._txn.delete(key, db=self._dbs[table])

    def scan(self, table: str, prefix: bytes = b"", start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cur = self._txn.cursor(db=self._dbs[table])
        if not cur.set_range(max(prefix, start)):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                return
            yield k, v

    def count(self, table: str) -> int:
        return self._txn.stat(self._dbs[table])["entries"]


_OPENING = threading.Lock()


class LmdbIndex(Index):
    """An LMDB environment in a directory; ``temporary`` ones are removed on close."""

    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE, temporary: bool = False):
        self.path = path
        self._temporary = temporary
        self._closed = False
        try:
            os.makedirs(path, exist_ok=True)
            # lmdb refuses a second environment on one file per process, but its check is
            # not atomic: two threads opening at once could both get one, and then hang
            with _OPENING:
                # Commits are flushed explicitly (env.sync) when durable, so a transaction
                # that need not survive a power cut skips the fsync; a temporary index never
                # syncs.
                self.env = lmdb.open(
                    path, map_size=map_size, max_dbs=len(TABLES) + 4, max_readers=1024,
                    subdir=True, sync=False, metasync=False,
                )
                self._check_length()
                self._dbs = {name: self.env.open_db(name.encode()) for name in TABLES}
        except (OSError, lmdb.Error) as exc:
            raise ConfigError(f"cannot open the index at {path}: {exc}") from exc

    def _check_length(self) -> None:
        """A data file cut short (a failed copy, a full disk) still opens, and the first
        read past its end kills the process with SIGBUS: refuse it here instead."""
        needed = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        have = os.path.getsize(os.path.join(self.path, "data.mdb"))
        if have < needed:
            self.env.close()
            raise ConfigError(
                f"the index at {self.path} is damaged: data.mdb has {have} bytes of the "
                f"{needed} its pages need: stop the registry and run 'casengine reindex'")

    @classmethod
    def temporary(cls) -> LmdbIndex:
        return cls(tempfile.mkdtemp(prefix="casengine-index-"), temporary=True)

    @contextlib.contextmanager
    def transaction(self, *, write: bool = False, durable: bool = True) -> Iterator[Txn]:
        if self._closed:  # else lmdb's error would pass for a damaged index
            raise Closed(f"the index at {self.path} was closed with its engine")
        try:
            with self.env.begin(write=write) as txn:
                yield _LmdbTxn(txn, self._dbs)
            if write and durable and not self._temporary:
                self.env.sync(True)
        except lmdb.Error as exc:
            raise BackendError(f"the index at {self.path} is damaged ({exc}): stop the "
                               "registry and run 'casengine reindex'") from exc

    def generation(self) -> int:
        return int(self.env.info()["last_txnid"])

    def sync(self) -> None:
        if not self._temporary:
            self.env.sync(True)

    @contextlib.contextmanager
    def locks(self, names: Iterable[str]) -> Iterator[None]:
        # flock on a file of its own per name, beside the data: an open file description
        # each, so threads of one process exclude each other as processes do
        directory = os.path.join(self.path, "locks")
        fds: list[int] = []
        try:
            for name in sorted(set(names)):
                try:
                    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT, 0o600)
                except FileNotFoundError:
                    os.makedirs(directory, exist_ok=True)
                    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT, 0o600)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            for fd in reversed(fds):
                os.close(fd)  # closing the last descriptor releases its flock

    def close(self) -> None:
        self._closed = True
        with _OPENING:
            self.env.close()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)
