"""Compression after the acknowledgement: large compressible blobs are stored raw by the
ingest that receives them, then rewritten as seekable zstd here, on a background thread.

Why: sha256 runs at about 1.8 GB/s on one core of the reference machine and zstd's fastest
levels at 0.3-0.6 GB/s, so on two cores an ingest that compresses as it goes runs at about
0.4x the speed of one that does not (``benchmarks/compression.py``). Deferred, a push is
acknowledged at raw speed and the compression happens between pushes. Small blobs (under
:data:`DEFER_AT`), whose compression costs little, are still compressed inline.

The protocol is safe against ``kill -9`` at any step and against other processes doing
the same work:

1. The ingest publishes the blob raw and records it (I1, I2 as for any blob), then marks
   the digest in the index table ``compact``. The mark need not be durable: losing it
   leaves a correct raw blob.
2. :meth:`Compactor.compact` takes the mark with a lease, so two processes never compress
   the same blob at once; a dead process's lease is taken over.
3. It reads the raw object, verifying it against the record's xxh3 (or its digest), and
   stores the zstd object (synced, under the blob's ``.zst`` key). A blob that does not shrink by the
   policy's margin stays raw.
4. One transaction replaces the record, only if it is still the raw record that was read.
5. The object no record names any more -- the raw one, or the zstd one if step 4 lost to
   a delete -- goes as an orphan, under the same ``deleting`` lease GC takes.

A crash between 3 and 4 leaves a zstd orphan, one between 4 and 5 a raw orphan; both are
what ``casengine gc --orphans`` removes and ``casengine check`` reports. A reader that
opened the raw object before step 5 keeps reading it, and one whose object vanishes under
it resumes from the new form at the same offset (:meth:`Engine.read`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import xxhash

from casengine.compression import BlobSink
from casengine.digest import Hasher, parse_digest
from casengine.errors import CASError, CorruptObject
from casengine.index import BlobRecord, Txn, pack_blob, unpack_blob
from casengine.ingest import CHUNK, WritePipeline
from casengine.layout import RAW, ZST, blob_key
from casengine.leases import is_live, new_lease

if TYPE_CHECKING:
    from casengine.engine import Engine

log = logging.getLogger(__name__)

#: Blobs whose first chunk is at least this big are compressed after the acknowledgement.
DEFER_AT = 1 << 20
#: How long step 5 waits for a delete of the same blob that holds the ``deleting`` lease.
ORPHAN_WAIT = 30.0


class Compactor:
    """The background compressor of one engine (``engine.compactor``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._queued = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._skip = False  #: closing without finishing: queued blobs stay marked

    def submit(self, digest: str) -> None:
        """Mark ``digest`` for compression and queue it for this engine's thread."""
        with self.engine.index.transaction(write=True, durable=False) as txn:
            if txn.get("compact", digest.encode()) is None:
                txn.put("compact", digest.encode(), b"")
        self._enqueue(digest)

    def resume(self) -> int:
        """Queue every marked blob no live process is compressing (after a restart)."""
        with self.engine.index.transaction() as txn:
            marked = [(k.decode(), v) for k, v in txn.scan("compact")]
        todo = [d for d, v in marked if not v or not is_live(json.loads(v))]
        for digest in todo:
            self._enqueue(digest)
        return len(todo)

    def _enqueue(self, digest: str) -> None:
        with self._lock:
            if self._closed:
                return  # the mark stays for the next process
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="casengine-compactor",
                                                daemon=True)
                self._thread.start()
        self._queue.put(digest)

    def _run(self) -> None:
        while (digest := self._queue.get()) is not None:
            try:
                if not self._skip:
                    self.compact(digest)
            except CASError as exc:  # the blob stays raw and correct
                log.warning("compressing %s failed, it stays uncompressed: %s", digest, exc)
            except Exception:
                log.exception("compressing %s failed, it stays uncompressed", digest)
            finally:
                with self._lock:
                    self._queued -= 1
                    self._lock.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is done; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._queued == 0, timeout)

    def close(self, *, finish: bool = True) -> None:
        """Stop the thread: after what is queued, or with ``finish=False`` after the blob at
        hand, leaving the rest marked for the next process that resumes (a server's quick
        restart)."""
        with self._lock:
            self._closed = True
            self._skip = not finish
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()

    # -- one blob -------------------------------------------------------------------------

    def compact(self, digest: str) -> bool:
        """Store the blob as zstd now; return whether its record now says so."""
        key = str(parse_digest(digest)).encode()
        lease = new_lease()
        with self.engine.index.transaction(write=True, durable=False) as txn:
            held = txn.get("compact", key)
            if held and is_live(json.loads(held)):
                return False  # another thread or process is on it
            txn.put("compact", key, json.dumps(lease).encode())
        try:
            record = self.engine.index.get_blob(key.decode())
            if record is None or record.codec != RAW or self.engine.compression.mode == "never":
                return False
            return self._rewrite(record)
        finally:
            with self.engine.index.transaction(write=True, durable=False) as txn:
                value = txn.get("compact", key)
                if value and json.loads(value)["token"] == lease["token"]:
                    txn.delete("compact", key)

    def _rewrite(self, record: BlobRecord) -> bool:
        engine, backend = self.engine, self.engine.backend
        digest = parse_digest(record.digest)
        zst_key = blob_key(digest, ZST)
        policy = replace(engine.compression, mode="always")
        # the raw bytes must be the blob's before they are compressed: the record's xxh3 of
        # them vouches as it does for check, at ten times sha256's speed; without one
        # (a chunked upload's blob), the digest does
        hasher: Any = xxhash.xxh3_128() if record.xxh3 else Hasher(digest.algorithm)
        # a .zst object while the record says raw is what a compactor killed between steps
        # 3 and 4 left: an orphan, removed first so that ours can be published exclusively
        # (looked for first: the removal takes a deleting lease and two index commits)
        if backend.exists(zst_key):
            engine.delete_orphan(digest, ZST)
        with (BlobSink(lambda codec: backend.writer(zst_key), policy) as sink,
              WritePipeline(sink, lambda buf: None) as pipe):
            # as in an ingest: this thread hashes while the pipeline's compresses
            n = 0
            for chunk in backend.read(blob_key(digest, RAW), chunk_size=CHUNK):
                pipe.put((memoryview(chunk), None))
                hasher.update(chunk)
                n += len(chunk)
            pipe.finish()
            writer = sink.finish()
            if record.xxh3:
                intact = hasher.hexdigest() == record.xxh3 and n == record.size
            else:
                intact = hasher.digest() == digest and hasher.size == record.size
            if not intact:
                raise CorruptObject(f"stored object of {digest} does not hash to its name: "
                                    "run 'casengine check'")
            if (engine.compression.mode == "auto"
                    and writer.size > record.size * (1 - policy.margin)):
                return False  # the sample promised more than the blob holds: keep it raw
            if not writer.commit(zst_key, exclusive=True):
                return False  # stored meanwhile by another hand: never replace live bytes
        new = replace(record, codec=ZST, stored_size=writer.size, xxh3=sink.xxh3.hexdigest())

        def swap(txn: Txn) -> bool:
            value = txn.get("blobs", record.digest.encode())
            current = None if value is None else unpack_blob(record.digest.encode(), value)
            if current is None or current.codec != RAW or current.created != record.created:
                return False  # deleted, or deleted and stored again, meanwhile
            txn.put("blobs", record.digest.encode(),
                    pack_blob(replace(new, touched=current.touched)))
            return True

        with engine.index.transaction(write=True) as txn:
            swapped = swap(txn)
        # a delete of the blob that ran meanwhile removed the object its record named (the
        # raw one): ours is left to us, once that delete is done
        engine.delete_orphan(digest, RAW if swapped else ZST, wait=ORPHAN_WAIT)
        return swapped
