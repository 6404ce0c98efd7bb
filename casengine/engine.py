"""The blob store: content-addressed blobs on a backend, with an index beside it.

An ingest is one pass over the data: the caller's thread reads and hashes while a writer
thread stores the bytes in a staged backend object (:mod:`casengine.ingest`). Only when the
digest and size check out is the object published under its key, and only then is it
recorded in the index. So a reader, who always goes through the index, never sees a
partial or unverified blob (I1), and a crash at any point leaves at worst an unrecorded
but complete object or an unpublished temp, which ``casengine check`` finds.

Compression at rest: the engine's :class:`~casengine.compression.Policy` decides per blob
whether the bytes are stored as they are (``.raw``) or as seekable zstd (``.zst``, see
:mod:`casengine.seekable`). Either way the digest and size are those of the logical bytes,
and the record's xxh3 and stored size those of the object; a range read of a ``.zst`` blob
decompresses only the frames it overlaps. Large blobs, and chunked uploads (whose commit
reads nothing again, see :meth:`Engine.publish_staged`), are stored raw and compressed after
the acknowledgement by :mod:`casengine.compactor`.

Dedupe: when the blob is already recorded, the bytes are hashed (so a wrong body is still
refused) but not written again. Two concurrent ingests of the same new content both write,
but only one publish wins (put-if-absent) and both succeed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Self

from casengine.backend import READ_CHUNK, Backend, LocalPaths, Writer, open_backend
from casengine.compactor import DEFER_AT, Compactor
from casengine.compression import BlobSink, Policy
from casengine.digest import DEFAULT_ALGORITHM, Digest, Hasher, parse_digest
from casengine.errors import (
    BackendError,
    BlobNotFound,
    CASError,
    ConfigError,
    Conflict,
    CorruptObject,
    DigestMismatch,
    InvalidInput,
    NotFound,
    SizeMismatch,
)
from casengine.index import BlobRecord, Index, LmdbIndex, Txn, unpack_blob
from casengine.index_binding import ensure_bound, ensure_current, mark
from casengine.ingest import CHUNK, POOL, BufferPool, Source, WritePipeline, open_source
from casengine.layout import RAW, ZST, blob_key
from casengine.leases import is_live, new_lease
from casengine.retry import retrying
from casengine.seekable import TableCache, read_range, read_table

if TYPE_CHECKING:
    from casengine.uploads import Uploads

DEFAULT_ROOT = "./casengine-data"
#: How long an ingest waits for a delete of the same digest before it gives up.
DELETE_WAIT = 30.0


log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IngestResult:
    digest: Digest
    size: int
    #: False when the blob was already stored (dedupe) or a concurrent ingest published it.
    created: bool


class Engine:
    """Open with :meth:`Engine.open`; thread-safe; close when done (or use ``with``)."""

    def __init__(self, backend: Backend, index: Index, *, chunk_size: int = CHUNK,
                 upload_ttl: float | None = None, compression: Policy | None = None) -> None:
        self.backend = backend
        self.index = index
        self.chunk_size = chunk_size
        self.compression = compression or Policy()
        self._upload_ttl = upload_ttl
        self._tables = TableCache()

    @functools.cached_property
    def compactor(self) -> Compactor:
        """Compresses large blobs after their ingest (see :mod:`casengine.compactor`)."""
        return Compactor(self)

    def wait_compacted(self, timeout: float | None = None) -> bool:
        """Wait until the blobs this engine ingested so far are stored compressed (or found
        not worth it); False on timeout. ``close`` waits too."""
        return "compactor" not in self.__dict__ or self.compactor.wait(timeout)

    @functools.cached_property
    def uploads(self) -> Uploads:
        """Chunked upload sessions (see :mod:`casengine.uploads`); imported when first used."""
        from casengine.uploads import DEFAULT_TTL, Uploads

        return Uploads(self, self._upload_ttl or DEFAULT_TTL)

    @classmethod
    def open(cls, url: str = DEFAULT_ROOT, *, index: str | None = None,
             compression: Policy | str | None = None, **storage_options: Any) -> Engine:
        """Open the store at ``url`` (a path, ``file://``, ``memory://``, ``s3://``, ...).

        ``index`` is the LMDB directory. By default a local root keeps it inside the root
        and ``memory://`` gets a temporary one; remote roots must name one.
        ``compression`` is how new blobs are stored: a Policy, or a mode name (default:
        ``Policy()``, mode auto).
        """
        if isinstance(compression, str):  # a mode, as the command line takes it
            compression = Policy.parse(compression)
        backend = retrying(open_backend(url, **storage_options))  # transient faults: retry
        try:
            path = index or backend.default_index_path()
            if path is not None:
                idx: Index = LmdbIndex(path)
            elif backend.ephemeral:
                idx = LmdbIndex.temporary()
            else:
                raise ConfigError(
                    f"{url} is not a local directory: name a local index directory with "
                    "--index PATH or CASENGINE_INDEX"
                )
        except BaseException:
            backend.close()
            raise
        try:
            ensure_bound(backend, idx, path or "a temporary directory")
            ensure_current(backend, idx, path or "a temporary directory")
        except BaseException:
            idx.close()
            backend.close()
            raise
        return cls(backend, idx, compression=compression)

    def close(self) -> None:
        if "compactor" in self.__dict__:
            self.compactor.close()
        try:
            self.mark_index()
        except CASError as exc:  # a damaged index is reported by whatever used it
            log.warning("cannot record the index's progress in the store: %s", exc)
        self.index.close()
        self.backend.close()

    def mark_index(self) -> None:
        """Record in the store how far the index has got, so that an older copy of it is
        refused (see :mod:`casengine.index_binding`)."""
        mark(self.backend, self.index)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------

    def ingest(self, source: Source, *, digest: str | Digest | None = None,
               size: int | None = None, algorithm: str = DEFAULT_ALGORITHM,
               check: Callable[[Digest, int], None] | None = None,
               media_type: str | None = None) -> IngestResult:
        """Store the bytes of ``source``; verify ``digest`` and ``size`` while streaming.

        On a mismatch nothing is published and :class:`~casengine.errors.DigestMismatch`
        or :class:`~casengine.errors.SizeMismatch` names what was expected and received.
        ``check(digest, size)`` runs once both are known and before anything is published;
        it may raise to refuse the blob (a quota), which then leaves nothing behind.
        ``media_type``, when known, helps the compression policy skip compressed formats.
        """
        expected = parse_digest(digest) if digest is not None else None
        hasher = Hasher(expected.algorithm if expected else algorithm)
        if size is not None and (not isinstance(size, int) or size < 0):
            raise InvalidInput(f"invalid size {size!r}: want a whole number of bytes >= 0")
        pool = BufferPool(POOL, self.chunk_size)
        known = self.index.get_blob(str(expected)) if expected else None
        with open_source(source, pool, self.chunk_size) as chunks:
            if known is not None:
                self._hash_only(chunks, hasher, pool, size)
                self._verify(hasher, expected, size)
                if check is not None:
                    check(hasher.digest(), hasher.size)
                if not self.index.touch_blob(known.digest):
                    # collected while we hashed: the bytes are gone and so is the stream
                    raise Conflict(f"blob {known.digest} was deleted during the upload; "
                                   "push it again")
                return IngestResult(hasher.digest(), hasher.size, created=False)

            def open_writer(codec: str) -> Writer:
                # the final key as hint: object stores upload straight to it
                return self.backend.writer(blob_key(expected, codec) if expected else None)

            defer_at = DEFER_AT if self.compression.defer else None
            with (BlobSink(open_writer, self.compression, media_type, defer_at=defer_at) as sink,
                  WritePipeline(sink, pool.put) as pipe):
                for chunk in chunks:
                    hasher.update(chunk[0])
                    if size is not None and hasher.size > size:
                        raise SizeMismatch(size, hasher.size)
                    pipe.put(chunk)
                pipe.finish()
                actual = self._verify(hasher, expected, size)
                if check is not None:
                    check(actual, hasher.size)
                writer = sink.finish()
                now = time.time()
                codec = sink.codec or RAW
                record = BlobRecord(str(actual), hasher.size, codec, writer.size,
                                    sink.xxh3.hexdigest(), now, now)
                if self.index.touch_blob(record.digest, now):  # stored already: dedupe
                    return IngestResult(actual, hasher.size, created=False)
                key = blob_key(actual, codec)
                created = self._publish(record, lambda: writer.commit(key, exclusive=True))
        if created and sink.deferred:
            self.compactor.submit(record.digest)
        return IngestResult(actual, hasher.size, created)

    def publish_staged(self, key: str, state: dict, digest: Digest, size: int) -> bool:
        """Publish verified upload staging under the blob's key and record it.

        The stored bytes are not read again, so the record's xxh3 stays empty until the
        first ``casengine check`` computes it. Returns whether a new blob was created.
        """
        if self.index.touch_blob(str(digest)):  # stored already: dedupe
            return False
        now = time.time()
        record = BlobRecord(str(digest), size, RAW, size, "", now, now)
        final = blob_key(digest, RAW)
        return self._publish(
            record, lambda: self.backend.publish_upload(key, state, size, final, exclusive=True))

    def _publish(self, record: BlobRecord, publish: Callable[[], bool]) -> bool:
        """The one way a blob becomes visible: object first, then its record.

        An object without a record is harmless (check finds it); a record without its
        object would be a lie. A lost publish race means the same bytes are already there
        -- unless a delete of the same digest is removing them right now. So: wait until no
        delete of this digest is running, publish, and record only if no delete began in
        between (then refuse with Conflict: the caller may retry, nothing was acknowledged).
        """
        key = record.digest.encode()
        deadline = time.monotonic() + DELETE_WAIT
        while (lease := self._deleting(key)) is not None:
            if time.monotonic() > deadline:
                raise Conflict(f"blob {record.digest} is being deleted; retry")
            time.sleep(0.01)
            del lease
        created = publish()

        def no_delete_began(txn: Txn) -> None:
            value = txn.get("deleting", key)
            if value is not None and is_live(json.loads(value)):
                raise Conflict(f"blob {record.digest} is being deleted; retry")

        if not self.index.add_blob(record, guard=no_delete_began) and created:
            current = self.index.get_blob(record.digest)
            if current is not None and current.codec != record.codec:
                # a concurrent ingest recorded the same bytes under the other codec first:
                # ours would be an orphan
                self.backend.delete(blob_key(parse_digest(record.digest), record.codec))
                return False
        return created

    def _deleting(self, key: bytes) -> dict | None:
        """The live lease of a delete of ``key``; a dead one is cleared."""
        with self.index.transaction() as txn:
            value = txn.get("deleting", key)
        if value is None:
            return None
        lease = json.loads(value)
        if is_live(lease):
            return lease
        with self.index.transaction(write=True) as txn:
            if txn.get("deleting", key) == value:
                txn.delete("deleting", key)
        return None

    @staticmethod
    def _hash_only(chunks: Iterator[Any], hasher: Hasher, pool: BufferPool,
                   size: int | None) -> None:
        for view, buf in chunks:
            hasher.update(view)
            if buf is not None:
                pool.put(buf)
            if size is not None and hasher.size > size:
                raise SizeMismatch(size, hasher.size)

    @staticmethod
    def _verify(hasher: Hasher, expected: Digest | None, size: int | None) -> Digest:
        actual = hasher.digest()
        if size is not None and hasher.size != size:
            raise SizeMismatch(size, hasher.size)
        if expected is not None and actual != expected:
            raise DigestMismatch(expected, actual)
        return actual

    def delete(self, digest: str | Digest) -> bool:
        """Forget the blob, then remove its bytes; return whether it was stored.

        While the bytes are being removed a ``deleting`` lease stands in the index, so an
        ingest of the same content waits instead of trusting an object about to vanish.
        """
        d = parse_digest(digest)
        key = str(d).encode()
        lease = new_lease()
        with self.index.transaction(write=True) as txn:
            value = txn.get("blobs", key)
            if value is None:
                return False
            record = unpack_blob(key, value)
            txn.delete("blobs", key)
            txn.put("deleting", key, json.dumps(lease).encode())
        try:
            self.backend.delete(blob_key(d, record.codec))
        finally:
            self._end_delete(key, lease)
        return True

    def delete_orphan(self, digest: Digest, codec: str, *, wait: float = 0.0) -> bool:
        """Delete the blob's ``codec`` object unless a record names it; return whether it
        was deleted. A ``deleting`` lease stands while it goes, so an ingest of the same
        bytes waits instead of adopting an object about to vanish.

        Another delete of the digest under way (a live lease) makes it give up, or with
        ``wait`` first wait up to that many seconds for that delete to end: it removes the
        object its record named, which need not be this one."""
        name = str(digest).encode()
        lease = new_lease()
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            with self.index.transaction(write=True) as txn:
                value = txn.get("blobs", name)
                if value is not None and unpack_blob(name, value).codec == codec:
                    return False  # recorded meanwhile
                held = txn.get("deleting", name)
                # a dead lease is what a collector killed mid-delete left
                if held is None or not is_live(json.loads(held)):
                    txn.put("deleting", name, json.dumps(lease).encode())
                    break
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            self.backend.delete(blob_key(digest, codec))
        finally:
            self._end_delete(name, lease)
        return True

    def _end_delete(self, key: bytes, lease: dict) -> None:
        with self.index.transaction(write=True) as txn:
            value = txn.get("deleting", key)
            if value is not None and json.loads(value)["token"] == lease["token"]:
                txn.delete("deleting", key)

    # -- reading ------------------------------------------------------------------------

    def stat(self, digest: str | Digest) -> BlobRecord:
        d = parse_digest(digest)
        record = self.index.get_blob(str(d))
        if record is None:
            raise BlobNotFound(d)
        return record

    def exists(self, digest: str | Digest) -> bool:
        return self.index.get_blob(str(parse_digest(digest))) is not None

    def read(self, digest: str | Digest, start: int = 0, length: int | None = None, *,
             chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Stream the logical bytes ``[start, start+length)``; the whole blob by default."""
        _whole("start", start)  # negative ones are refused as ranges, below
        if length is not None:
            _whole("length", length)
        _whole("chunk_size", chunk_size, least=1)  # 0 would end the stream at once
        record = self.stat(digest)
        if start < 0 or start > record.size or (length is not None and length < 0):
            raise InvalidInput(
                f"invalid range start={start} length={length} for a blob of {record.size} bytes"
            )
        end = record.size if length is None else min(start + length, record.size)
        record, chunks = self._open_stored(record, start, end - start, chunk_size)
        return self._resuming(record, chunks, start, end, chunk_size)

    def _open_stored(self, record: BlobRecord, start: int, length: int,
                     chunk_size: int) -> tuple[BlobRecord, Iterator[bytes]]:
        """The stored object of ``record`` from logical offset ``start``; if it is gone
        because the blob was stored again in another form (the compactor), that form."""
        while True:
            key = blob_key(parse_digest(record.digest), record.codec)
            try:
                if record.codec == ZST:
                    return record, self._read_zst(record, key, start, length, chunk_size)
                return record, self.backend.read(key, start, length, chunk_size=chunk_size)
            except NotFound as exc:
                current = self.index.get_blob(record.digest)
                if current is None or current.codec == record.codec:
                    raise BackendError(
                        f"blob {record.digest} is indexed but its object {key} is missing: "
                        "run 'casengine check'"
                    ) from exc
                record = current

    def _resuming(self, record: BlobRecord, chunks: Iterator[bytes], pos: int, end: int,
                  chunk_size: int) -> Iterator[bytes]:
        while True:
            try:
                for chunk in chunks:
                    pos += len(chunk)
                    yield chunk
                return
            except NotFound:  # the object went mid-read (s3fs reads in ranges): go on
                record, chunks = self._open_stored(record, pos, end - pos, chunk_size)

    def _read_zst(self, record: BlobRecord, key: str, start: int, length: int,
                  chunk_size: int) -> Iterator[bytes]:
        # the key (its codec) and the creation time tell a re-stored blob apart
        ident = (key, record.stored_size, record.created)
        table, tail = self._tables.get(ident), b""
        if table is None:
            table, tail = read_table(self.backend, key, record.stored_size)
            if table.logical_size != record.size:
                raise CorruptObject(f"stored object {key} holds {table.logical_size} bytes, "
                                     f"the index says {record.size}: run 'casengine check'")
            self._tables.put(ident, table)
        return read_range(self.backend, key, table, start, length, chunk_size=chunk_size,
                          tail=tail)

    def open_file(self, digest: str | Digest) -> IO[bytes] | None:
        """The blob's logical bytes as an open local file, for zero-copy sends (``sendfile``);
        None unless the backend keeps objects in local files and the blob is stored raw."""
        record = self.stat(digest)
        if record.codec != RAW or not isinstance(self.backend, LocalPaths):
            return None
        path = self.backend.local_path(blob_key(parse_digest(record.digest), RAW))
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return None  # read() tells the caller what is wrong
        size = os.fstat(f.fileno()).st_size
        if size != record.size:
            f.close()
            # a reader would get a 200 with the full length and then a short body
            raise CorruptObject(f"blob {record.digest} is damaged: its object has {size} "
                                f"bytes, the record says {record.size}; run 'casengine check'")
        if hasattr(os, "posix_fadvise"):
            # a blob not in the page cache (written with O_DIRECT, or evicted) is read
            # ahead twice as far
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return f

    def read_bytes(self, digest: str | Digest) -> bytes:
        """A whole small blob (manifest, config) in memory. Never use it for layers."""
        return b"".join(self.read(digest))

    def list(self, start: str = "") -> Iterator[BlobRecord]:
        """Stored blobs in digest order."""
        return self.index.iter_blobs(start)


def _whole(name: str, value: object, *, least: int | None = None) -> None:
    """Refuse what is not an int (bools and floats included), or is under ``least``."""
    if type(value) is not int or (least is not None and value < least):
        raise InvalidInput(f"invalid {name} {value!r}: want a whole number"
                           + (f" >= {least}" if least is not None else ""))
