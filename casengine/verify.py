"""How ``casengine check`` verifies one stored blob against its record.

- **fast**: the object exists, has the recorded stored size, and the xxh3-128 of its bytes
  matches the record (a record without one, from a chunked upload or a reindex, is hashed
  with its digest instead, and gets its xxh3 now).
- **full**: also re-hashes the logical bytes with the digest's own algorithm, decompressing
  a seekable zstd object in the same pass.

A size or xxh3 that disagrees with the record is not yet damage: the object is then hashed
against its digest, and if its bytes verify, the record is what is wrong
(``stale-record``); a raw object whose first ``size`` bytes verify has ``trailing-bytes``.
Repair acts on that difference: it rewrites a record, never quarantines intact bytes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import xxhash

from casengine.backend import Backend, LocalPaths
from casengine.digest import Digest, Hasher
from casengine.errors import IntegrityError, NotFound
from casengine.index import BlobRecord, Index, pack_blob, unpack_blob
from casengine.layout import RAW, ZST, blob_key
from casengine.seekable import FrameDecoder, read_table


def same_record(a: BlobRecord, b: BlobRecord) -> bool:
    """The same record, however often a dedupe has touched it since."""
    return replace(a, touched=0.0) == replace(b, touched=0.0)


@dataclass(slots=True)
class Verdict:
    """What checking one blob record found."""

    record: BlobRecord
    kind: str | None  #: the problem, or None
    detail: str = ""
    read: int = 0  #: bytes read
    fixed: BlobRecord | None = None  #: stale-record: what the verified object says


class Stopped(Exception):
    """The check's time ran out while this blob was read: no verdict on it."""


class Throttle:
    """At most ``rate`` bytes per second across all reading threads; and no more reading
    past ``deadline`` (a monotonic time), so a time limit holds within a chunk, not a blob."""

    def __init__(self, rate: float | None, deadline: float | None = None) -> None:
        self.rate = rate
        self.deadline = deadline
        self._start = time.monotonic()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Stopped
        if not self.rate:
            return
        with self._lock:
            self._bytes += n
            ahead = self._bytes / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            time.sleep(ahead)


class Verifier:
    """Verifies blobs of one store; thread-safe (each thread reads into its own buffer)."""

    def __init__(self, backend: Backend, index: Index, *, full: bool = False,
                 max_rate: float | None = None, deadline: float | None = None) -> None:
        self.backend = backend
        self.index = index
        self.full = full
        self.throttle = Throttle(max_rate, deadline)
        self._local = threading.local()

    def verify(self, record: BlobRecord) -> Verdict:
        verdict = self._verify_stored(record)
        if verdict.kind is not None:
            current = self.index.get_blob(record.digest)
            if current is None:
                # deleted while we looked (blob rm, GC): no record, so nothing to vouch for
                return Verdict(record, None, "", verdict.read)
            if not same_record(current, record):
                # compressed or repaired while we looked: check what the record says now
                return self._verify_stored(current)
        return verdict

    def _verify_stored(self, record: BlobRecord) -> Verdict:
        key = blob_key(Digest.parse(record.digest), record.codec)
        try:
            info = self.backend.stat(key)
        except NotFound:
            return Verdict(record, "missing-object", f"object {key} is gone")
        if info.size != record.stored_size:
            kind = "truncated" if info.size < record.stored_size else "corrupt"
            return self._judge_by_digest(key, info.size, Verdict(
                record, kind, f"object has {info.size} bytes, the record says {record.stored_size}"))
        # without a recorded xxh3 (chunked uploads, reindex) only the digest can vouch
        verify = self.full or not record.xxh3
        hasher = Hasher(record.digest.split(":", 1)[0]) if verify else None
        try:
            xxh, n = self.scan(key, record.codec, record.stored_size, hasher)
        except IntegrityError as exc:
            return Verdict(record, "corrupt", str(exc))
        except NotFound:
            return Verdict(record, "missing-object", f"object {key} went while it was read")
        if hasher is not None and str(hasher.digest()) != record.digest:
            return Verdict(record, "corrupt", f"the bytes hash to {hasher.digest()}", n)
        if hasher is not None and hasher.size != record.size:
            return Verdict(record, "corrupt",
                           f"{hasher.size} logical bytes, the record says {record.size}", n)
        if record.xxh3 and xxh != record.xxh3:
            wrong = Verdict(record, "corrupt",
                            "xxh3 of the stored bytes does not match the record", n)
            if hasher is None:
                return self._judge_by_digest(key, info.size, wrong)
            return self._stale(wrong, replace(record, xxh3=xxh))
        if not record.xxh3:
            self._fill_xxh3(record, xxh)
        return Verdict(record, None, "", n)

    def _judge_by_digest(self, key: str, size: int, wrong: Verdict) -> Verdict:
        """``wrong`` was found without hashing: before the object is called damaged (and
        repair quarantines it), see whether its bytes verify against the digest -- then
        it is the record that is wrong -- or, for a raw object, its first ``size``."""
        record = wrong.record
        hasher = Hasher(record.digest.split(":", 1)[0])
        try:
            xxh, n = self.scan(key, record.codec, size, hasher)
        except IntegrityError:
            return wrong  # a seek table or frame that does not decode: damaged bytes
        except NotFound:
            return Verdict(record, "missing-object", f"object {key} went while it was read")
        wrong.read += n
        if str(hasher.digest()) == record.digest:
            return self._stale(wrong, replace(record, size=hasher.size, stored_size=n, xxh3=xxh))
        if record.codec == RAW and size > record.size:
            prefix = Hasher(record.digest.split(":", 1)[0])
            for chunk in self.backend.read(key, 0, record.size, chunk_size=4 << 20):
                prefix.update(chunk)
                wrong.read += len(chunk)
            if str(prefix.digest()) == record.digest and prefix.size == record.size:
                return Verdict(record, "trailing-bytes",
                               f"object has {size - record.size} bytes after the blob's "
                               f"{record.size}, which verify against its digest",
                               wrong.read)
        return wrong

    @staticmethod
    def _stale(wrong: Verdict, fixed: BlobRecord) -> Verdict:
        return Verdict(wrong.record, "stale-record",
                       f"{wrong.detail}, but the object verifies against its digest: the "
                       "record is wrong, not the bytes", wrong.read, fixed)

    def scan(self, key: str, codec: str, stored_size: int,
             hasher: Hasher | None) -> tuple[str, int]:
        """One pass over a stored object: the xxh3 of its bytes and their count; ``hasher``
        (if any) gets the logical bytes, decompressed from a ``zst`` object on the way."""
        decoder = None
        if codec == ZST and hasher is not None:
            decoder = FrameDecoder(read_table(self.backend, key, stored_size)[0], key=key)
        xxh, n = xxhash.xxh3_128(), 0
        for chunk in self._stored_bytes(key):
            xxh.update(chunk)
            n += len(chunk)
            self.throttle(len(chunk))
            if decoder is not None:
                for frame in decoder.feed(chunk):
                    hasher.update(frame)  # type: ignore[union-attr]
            elif hasher is not None:
                hasher.update(chunk)
        if decoder is not None:
            decoder.close()
        return xxh.hexdigest(), n

    def _stored_bytes(self, key: str) -> Iterator[memoryview | bytes]:
        """The object's bytes; a local file is read into one reused buffer per thread,
        which is twice as fast here as a new bytes object per chunk."""
        if not isinstance(self.backend, LocalPaths):
            yield from self.backend.read(key, chunk_size=4 << 20)
            return
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(4 << 20)
        view = memoryview(buf)
        try:
            f = open(self.backend.local_path(key), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError as exc:
            raise NotFound(f"object {key} is gone") from exc
        with f:
            while n := f.readinto(buf):
                yield view[:n]

    def _fill_xxh3(self, record: BlobRecord, xxh3: str) -> None:
        key = record.digest.encode()
        with self.index.transaction(write=True) as txn:
            value = txn.get("blobs", key)
            if value is not None and not unpack_blob(key, value).xxh3:
                current = unpack_blob(key, value)
                txn.put("blobs", key, pack_blob(BlobRecord(
                    current.digest, current.size, current.codec, current.stored_size, xxh3,
                    current.created, current.touched)))
