"""Chunked upload sessions that survive restarts and continue in any process.

A session's state lives in the index (one record per session) and its bytes in the
backend's upload staging (:meth:`casengine.backend.Backend.append`); nothing lives in
process memory, so any thread or process that opens the same store can continue it.

An append is three steps:

1. **claim**: one index transaction checks that the chunk starts at the session's offset
   and that no live append holds the session, then records a lease (pid, token, time).
   A chunk at the wrong offset is refused with the current offset; a concurrent append
   gets :class:`~casengine.errors.Conflict`. Bytes never interleave.
2. **write**: the chunk streams into the staged data at that offset, hashed on the way by
   a resumable hasher restored from the state saved after the previous chunk. The backend
   makes the bytes durable, and with them, where it can, a *journal* of the session's new
   state (offset and hash state; the local backend writes it into the same file, so one
   flush covers both). An append whose bytes are in hand at once (a bytes-like source, or
   a streamed one of a single chunk) is written by the calling thread while a worker
   hashes it. Up to :data:`FLUSH_ASIDE_MAX`, and beyond where its write ends well before its
   hash, it is also flushed meanwhile; its journal entry then holds the hash state where
   the append began and an xxh3 of its bytes, which recovery checks instead.
3. **release**: one transaction advances the offset and saves the hash state and the
   backend's state, if the lease is still ours. Only now is the chunk acknowledged.

The release is made durable (fsynced) only where the journal is not: a journaled release
survives ``kill -9`` of any process like every committed transaction, and a power cut that
loses it is repaired from the journal. Each record carries the boot it was written in; the
first access to a record from an earlier boot checks the journal's newer entries against
the staged bytes (re-hashing them from the record's own, durable, state), adopts the
newest that holds, and only then serves the session. A durable release every
:data:`RECOVERY_SPAN` bytes bounds that re-hash.

The first append also samples the blob's first bytes for the compression policy; a
compressible blob is handed to the engine's compactor once committed, and is compressed
after the acknowledgement like a large ingest (:mod:`casengine.compactor`).

A crash between 1 and 3 leaves the offset at the last acknowledged chunk. The lease of a
dead process is ignored, and the next append overwrites what the dead one left. A commit
takes its digest from the saved hash state and never reads the data again; only a session
without a usable state (another algorithm, or no libcrypto) is re-hashed from storage,
with a warning in the log. Before it publishes, a commit marks the session with the
verified digest. A commit that dies after publishing leaves a session whose retried commit
finds the blob and completes (with the caller's ``published`` step, which a registry links
the blob in); an append instead ends the session, reported gone, rather than add bytes to
a published object.
"""

from __future__ import annotations

import functools
import logging
import mmap
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casengine import hashstate, upload_recovery
from casengine.digest import Digest, Hasher, parse_digest
from casengine.errors import (
    BackendError,
    Conflict,
    DigestMismatch,
    InvalidInput,
    NotFound,
    OffsetMismatch,
    SizeMismatch,
    UploadNotFound,
)
from casengine.ingest import (
    POOL,
    BufferPool,
    HashAside,
    Source,
    WritePipeline,
    alongside,
    open_source,
)
from casengine.layout import RAW, UPLOADS, ZST, blob_key, upload_key
from casengine.leases import is_live, new_lease

if TYPE_CHECKING:
    from casengine.backend import Appender
    from casengine.engine import Engine, IngestResult

log = logging.getLogger(__name__)

#: Sessions idle longer than this are swept by :meth:`Uploads.purge` by default.
DEFAULT_TTL = 24 * 3600.0
_ID = re.compile(r"[a-f0-9]{32}")
#: Appends move in pieces this big: an append is acknowledged only once its last piece is
#: hashed, written and synced, and that tail is what hashing cannot overlap, so keep it
#: small. Larger pieces buy nothing once the per-piece overhead (microseconds) is paid.
APPEND_CHUNK = 1 << 20
#: An append of one chunk at least this long hashes on a worker while it is written: for
#: less, waking the worker costs about what the overlap saves.
ASIDE_AT = 256 << 10
#: Such an append up to this long flushes while it is still being hashed, vouched for by
#: an xxh3 of its bytes. A longer one does so only when its write ends well before its
#: hash (see :class:`HashAside`); else it journals its end state once hashed, as a
#: pipelined append does, and skips the xxh3.
FLUSH_ASIDE_MAX = 1 << 20
#: "Well before": more than this share of the hash still to go. The xxh3 costs about 4-8 %
#: of the sha256 of the same bytes, less the wake-up it saves.
FLUSH_AHEAD_SHARE = 0.05
#: A journaled release is still made durable when the offset crosses a multiple of this,
#: so recovery after a power cut re-hashes at most about this much of a session.
RECOVERY_SPAN = 1 << 30


def _boot_id() -> str | None:
    """This boot of the machine, or None where it cannot be told (then nothing is
    journaled: a journal is only trusted with a way to know when it must be checked)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


BOOT = _boot_id()


def _buffer_size(source: Source) -> int | None:
    """The length of a bytes-like ``source``; None for anything read as it comes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    return None


class _Stale(Exception):
    """The record was written in an earlier boot: recover it before using it."""


@dataclass(frozen=True, slots=True)
class UploadStatus:
    id: str
    repository: str | None
    offset: int  #: bytes acknowledged so far; the next chunk must start here
    created: float
    updated: float
    owner: str | None = None  #: the user who started it, where there is authentication

    @classmethod
    def of(cls, rec: dict) -> UploadStatus:
        return cls(rec["id"], rec.get("repository"), rec["offset"], rec["created"],
                   rec["updated"], rec.get("owner"))


class _SharedBuffers:
    """Pool buffers read by two threads at once go back to the pool when both are done."""

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._holders: dict[int, int] = {}
        self._lock = threading.Lock()

    def hold(self, buf: mmap.mmap | None) -> None:
        if buf is not None:
            with self._lock:
                self._holders[id(buf)] = 2

    def release(self, buf: mmap.mmap | None) -> None:
        if buf is None:
            return
        with self._lock:
            left = self._holders.pop(id(buf)) - 1
            if left:
                self._holders[id(buf)] = left
                return
        self._pool.put(buf)


@dataclass(frozen=True, slots=True)
class PurgeReport:
    sessions: list[UploadStatus]
    bytes: int
    dry_run: bool
    #: what dead writers left that the backend dropped: temp files; on S3 multipart
    #: uploads and staging objects
    leftovers: int = 0
    #: sessions the backend failed on (logged): left as they were, the others swept
    failed: tuple[str, ...] = ()


class Uploads:
    """Upload sessions of one engine (``engine.uploads``)."""

    def __init__(self, engine: Engine, ttl: float = DEFAULT_TTL) -> None:
        self.engine = engine
        self.ttl = ttl

    @property
    def min_chunk(self) -> int:
        """The smallest chunk worth sending (for ``OCI-Chunk-Min-Length``); 0 means any."""
        return self.engine.backend.min_chunk

    # -- session records ------------------------------------------------------------------

    def _change(self, upload_id: str, change: Callable[[dict], dict | None], *,
                durable: bool = True) -> dict | None:
        def guarded(old: dict | None) -> dict | None:
            if old is None:
                raise UploadNotFound(upload_id)
            return change(old)

        return self.engine.index.update_upload(self._check_id(upload_id), guarded,
                                               durable=durable)

    @staticmethod
    def _check_id(upload_id: str) -> str:
        # ids are ours: anything else cannot name a session, and must never reach a key
        if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
            raise UploadNotFound(upload_id)
        return upload_id

    def _claim(self, upload_id: str, offset: int | None) -> tuple[dict, str]:
        lease = new_lease()

        def claim(rec: dict) -> dict:
            if rec.get("boot") != BOOT:
                raise _Stale
            if offset is not None and offset != rec["offset"]:
                raise OffsetMismatch(upload_id, offset, rec["offset"])
            if is_live(rec.get("lease")):
                raise Conflict(f"upload {upload_id} is busy with another request; retry")
            return {**rec, "lease": lease}

        # a lease lost in a power cut is harmless: its holder died with the machine
        try:
            rec = self._change(upload_id, claim, durable=False)
        except _Stale:
            self._recover(upload_id)
            rec = self._change(upload_id, claim, durable=False)
        assert rec is not None
        return rec, lease["token"]

    def _release(self, upload_id: str, token: str, *, durable: bool = True,
                 hold: bool = False, **updates: object) -> dict | None:
        """Apply ``updates`` to the session this request claimed and let it go (with
        ``hold``, keep it)."""
        def release(rec: dict) -> dict:
            if (rec.get("lease") or {}).get("token") != token:
                raise Conflict(f"upload {upload_id} was taken over while this request ran")
            return {**rec, **updates, "lease": rec["lease"] if hold else None,
                    "updated": time.time()}

        return self._change(upload_id, release, durable=durable)

    def _published(self, rec: dict) -> bool:
        """Whether a commit published this session's bytes and died before it forgot the
        session: its mark names their digest, verified at the session's offset, and that
        blob is stored (in the index, or as an object the dead commit had yet to record)."""
        marked = rec.get("published")
        if marked is None or marked["offset"] != rec["offset"]:
            return False  # none, or of fewer bytes (a record recovered from the journal)
        digest = parse_digest(marked["digest"])
        return self.engine.exists(digest) or self.engine.backend.exists(blob_key(digest, RAW))

    # -- recovery after a power cut -------------------------------------------------------

    def _recover(self, upload_id: str) -> None:
        """Bring a record from an earlier boot up to the journal's newest sound entry."""
        rec = self.engine.index.get_upload(upload_id)
        if rec is None:
            raise UploadNotFound(upload_id)
        updates = upload_recovery.journaled(self.engine.backend, rec)
        if updates:
            log.warning("upload %s: recovered offset %d (the index had %d) from its journal",
                        upload_id, updates["offset"], rec["offset"])

        def recovered(cur: dict) -> dict:
            if cur.get("boot") == BOOT:
                return cur  # another process got here first
            if cur["offset"] != rec["offset"] or cur.get("backend") != rec.get("backend"):
                raise Conflict(f"upload {upload_id} changed while it was recovered; retry")
            # no process of this boot has claimed it, so its lease died with the old boot
            return {**cur, **updates, "boot": BOOT, "lease": None}

        self._change(upload_id, recovered)

    # -- the session API ------------------------------------------------------------------

    def start(self, repository: str | None = None, owner: str | None = None) -> UploadStatus:
        upload_id = secrets.token_hex(16)
        now = time.time()
        hashed = hashstate.available()
        rec = {"id": upload_id, "repository": repository, "owner": owner, "offset": 0,
               "created": now,
               "updated": now, "lease": None, "backend": {}, "boot": BOOT,
               "hash": {"algorithm": "sha256", "state": hashstate.ResumableHash().state().hex()}
               if hashed else None}
        self.engine.index.update_upload(upload_id, lambda _: rec)
        return UploadStatus.of(rec)

    def status(self, upload_id: str) -> UploadStatus:
        rec = self.engine.index.get_upload(self._check_id(upload_id))
        if rec is None:
            raise UploadNotFound(upload_id)
        if rec.get("boot") != BOOT:
            self._recover(upload_id)
            return self.status(upload_id)
        return UploadStatus.of(rec)

    def list(self) -> Iterator[UploadStatus]:
        return (UploadStatus.of(r) for r in self.engine.index.iter_uploads())

    def append(self, upload_id: str, source: Source, offset: int, *,
               length: int | None = None) -> UploadStatus:
        """Append ``source`` at ``offset``; ``length``, if known, is verified."""
        if not isinstance(offset, int) or offset < 0:
            raise InvalidInput(f"invalid offset {offset!r}")
        rec, token = self._claim(upload_id, offset)
        if self._published(rec):
            # the blob is out: more bytes would change a published object (a local one
            # shares the staged file) or go nowhere
            self._forget(upload_id, rec)
            raise UploadNotFound(upload_id)
        try:
            updates, journaled = self._write(rec, source, length)
        except BaseException:
            self._release(upload_id, token)
            raise
        if "published" in rec:
            updates["published"] = None  # the mark is of the bytes before this append
        end = updates["offset"]
        assert isinstance(end, int)
        durable = not journaled or end // RECOVERY_SPAN != offset // RECOVERY_SPAN
        new = self._release(upload_id, token, durable=durable, **updates)
        assert new is not None
        return UploadStatus.of(new)

    def _write(self, rec: dict, source: Source,
               length: int | None) -> tuple[dict[str, object], bool]:
        """Append; return the record's updates (offset, the backend's and the hash's new
        state and, for the session's first bytes, whether the policy would compress the
        blob) and whether the backend journaled them with the bytes."""
        saved = rec.get("hash")
        hasher: hashstate.ResumableHash | None = None
        if saved is not None:
            hasher = hashstate.ResumableHash.restore(
                saved["algorithm"], bytes.fromhex(saved["state"]), rec["offset"])
        held = _buffer_size(source)
        size = length if length is not None else held
        if hasher is not None and held is not None and held == size and held >= ASIDE_AT:
            # bytes the caller already holds arrive at memory speed: written in one go while
            # a worker hashes them, so the append takes as long as the slower of disk and
            # hash; without the buffers and pipeline a stream needs (their setup was 1-3 %
            # of a 1 MiB append)
            assert isinstance(source, (bytes, bytearray, memoryview))
            data = memoryview(source).cast("B")
            compress = self._compress(rec, data)
            with self._appender(rec, held, in_memory=True) as appender:
                done = self._write_one(rec, appender, data, hasher, compress)
                return self._updates(rec, held, hasher, compress, appender, done)
        pool = BufferPool(POOL, APPEND_CHUNK)
        shared = _SharedBuffers(pool)
        n = 0
        head: bool | None = None
        finished: dict | None = None  #: the backend's state, where the append finished early
        with (open_source(source, pool, APPEND_CHUNK) as chunks,
              self._appender(rec, size) as appender,
              WritePipeline(appender, shared.release, size) as pipe):
            for chunk in chunks:
                n += len(chunk[0])
                if length is not None and n > length:
                    raise SizeMismatch(length, n)
                if n == len(chunk[0]):
                    head = self._compress(rec, chunk[0])
                # the bytes are written and hashed at the same time: an append then takes as
                # long as the slower of the two, not their sum
                shared.hold(chunk[1])
                if hasher is not None and n == size == len(chunk[0]) >= ASIDE_AT:
                    # the whole append in one chunk, as if its bytes had been handed over
                    if (extra := next(chunks, None)) is not None:
                        raise SizeMismatch(size, n + len(extra[0]))
                    finished = self._write_one(rec, appender, chunk[0], hasher, head)
                    shared.release(chunk[1])
                else:  # written on a worker, hashed here
                    pipe.put(chunk)
                    if hasher is not None:
                        hasher.update(chunk[0])
                shared.release(chunk[1])
            pipe.finish()
            if length is not None and n != length:
                raise SizeMismatch(length, n)
            return self._updates(rec, n, hasher, head, appender, finished)

    def _appender(self, rec: dict, size: int | None, *,
                  in_memory: bool = False) -> Appender:
        appender = self.engine.backend.append(upload_key(rec["id"]), rec["backend"],
                                              rec["offset"])
        if size is not None:
            appender.expect(size, in_memory=in_memory)
        return appender

    def _compress(self, rec: dict, head: memoryview) -> bool | None:
        """For the blob's first bytes, whether the compression policy would compress it: a
        commit then hands only compressible blobs to the compactor."""
        if rec["offset"] != 0:
            return None
        return self.engine.compression.choose(head) == ZST

    def _write_one(self, rec: dict, appender: Appender, data: memoryview,
                   hasher: hashstate.ResumableHash, compress: bool | None) -> dict | None:
        """Write (and, if short, flush) an append of one chunk here while a worker hashes
        it; the backend's state where it finished, else None (see :meth:`_write_whole`)."""
        long = len(data) > FLUSH_ASIDE_MAX
        # the worker takes the xxh3 first only where an entry will want it
        hashing = HashAside(hasher, data, tail=not long and BOOT is not None)
        return alongside(
            functools.partial(self._write_whole, rec, appender, hashing, compress,
                              unless_nearly_done=long),
            hashing, apart=long)

    @staticmethod
    def _updates(rec: dict, n: int, hasher: hashstate.ResumableHash | None,
                 compress: bool | None, appender: Appender,
                 finished: dict | None) -> tuple[dict[str, object], bool]:
        """The record's updates after ``n`` bytes, finishing the append unless that is done."""
        updates: dict[str, object] = {"offset": rec["offset"] + n, "hash": None}
        if hasher is not None:
            updates["hash"] = {"algorithm": hasher.algorithm, "state": hasher.state().hex()}
        if compress is not None:
            updates["compress"] = compress
        if finished is not None:
            updates["backend"] = finished
        else:
            # only a hash state can vouch for a journal entry, and only a boot id tells
            # when one must be checked
            journal = dict(updates) if hasher is not None and BOOT is not None else None
            updates["backend"] = appender.finish(journal)
        return updates, appender.journaled

    @staticmethod
    def _write_whole(rec: dict, appender: Appender, hashing: HashAside,
                     compress: bool | None, *, unless_nearly_done: bool) -> dict | None:
        """Write and finish an append of one chunk while its hash is still being computed:
        its journal entry vouches with the hash state *before* the append, which the record
        has, and an xxh3 of the bytes; recovery checks both (see
        :func:`casengine.upload_recovery.journaled`).

        With ``unless_nearly_done``, only if that hash is far from done once the bytes are
        written; else return None: the append is finished with its end state after it."""
        data = hashing.data
        appender.write(data)
        if unless_nearly_done and hashing.nearly_done(FLUSH_AHEAD_SHARE):
            return None
        journal = None
        if BOOT is not None:
            journal = {"offset": rec["offset"] + len(data), "from": rec["offset"],
                       "hash": rec["hash"], "tail": hashing.tail()}
            if compress is not None:
                journal["compress"] = compress
        return appender.finish(journal)

    def commit(self, upload_id: str, digest: str | Digest, *, last: Source | None = None,
               last_length: int | None = None, size: int | None = None,
               check: Callable[[Digest, int], None] | None = None,
               published: Callable[[Digest], None] | None = None) -> IngestResult:
        """Verify and publish the session as a blob, optionally appending ``last`` first.

        ``check(digest, size)`` runs after verification, before anything is published, and
        may raise to refuse. A refused commit leaves the session as it was before the call,
        ``last`` not appended, so the client can retry. ``published(digest)`` runs once the
        blob is stored, before the session is forgotten (a registry links the blob into the
        repository there): should it fail, or the process die in it, a retried commit finds
        the session and the blob and runs it again.
        """
        from casengine.engine import IngestResult

        expected = parse_digest(digest)
        before = None
        if last is not None:
            before = self.engine.index.get_upload(self._check_id(upload_id))
            self.append(upload_id, last, self.status(upload_id).offset, length=last_length)
        rec, token = self._claim(upload_id, None)
        try:
            total = rec["offset"]
            if size is not None and size != total:
                raise SizeMismatch(size, total)
            actual = self._digest_of(rec, expected.algorithm)
            if actual != expected:
                raise DigestMismatch(expected, actual)
            if check is not None:
                check(actual, total)
            # the mark lets a later request tell whether this one died having published
            # the blob (see _published); a power cut that loses it finds the local file
            # still shared with the blob, which the backend refuses to write into
            self._release(upload_id, token, durable=False, hold=True,
                          published={"digest": str(actual), "offset": total})
            created = self.engine.publish_staged(upload_key(upload_id), rec["backend"], actual,
                                                 total)
        except BaseException:
            restore = {} if before is None else {
                k: before[k] for k in ("offset", "backend", "hash")}
            self._release(upload_id, token, published=None, **restore)
            raise
        if published is not None:
            try:
                published(actual)
            except BaseException:
                self._release(upload_id, token)  # the mark stays: the blob is stored
                raise
        self._forget(upload_id, rec)
        if created and rec.get("compress") and self.engine.compression.mode != "never":
            # compressed after the acknowledgement, as a large ingest is: the commit itself
            # reads nothing back (casengine.compactor)
            self.engine.compactor.submit(str(actual))
        return IngestResult(actual, total, created)

    def _digest_of(self, rec: dict, algorithm: str) -> Digest:
        saved = rec.get("hash")
        if saved is not None and saved["algorithm"] == algorithm:
            return hashstate.ResumableHash.restore(
                algorithm, bytes.fromhex(saved["state"]), rec["offset"]).digest()
        log.warning("upload %s has no saved %s state: re-hashing %d bytes from storage",
                    rec["id"], algorithm, rec["offset"])
        hasher = Hasher(algorithm)
        for chunk in self.engine.backend.read_upload(upload_key(rec["id"]), rec["backend"]):
            hasher.update(chunk)
        if hasher.size != rec["offset"]:
            raise SizeMismatch(rec["offset"], hasher.size)
        return hasher.digest()

    def cancel(self, upload_id: str) -> None:
        """Drop the session and its staged bytes; unknown ids raise UploadNotFound."""
        rec, _ = self._claim(upload_id, None)
        self._forget(upload_id, rec)

    def _forget(self, upload_id: str, rec: dict) -> bool:
        """Drop the session; whether its staged bytes went too."""
        # record first: a crash after it leaves only staged bytes, which purge finds; so
        # does a failure to discard them, which must not fail a commit already published
        self.engine.index.update_upload(upload_id, lambda _: None)
        try:
            self.engine.backend.discard_upload(upload_key(upload_id), rec["backend"])
        except BackendError as exc:
            log.warning("upload %s: staged data left for purge: %s", upload_id, exc)
            return False
        return True

    def purge(self, older_than: float | None = None, *, dry_run: bool = False,
              writers_idle: float | None = None) -> PurgeReport:
        """Sweep sessions idle longer than ``older_than`` (default: the TTL).

        Also removes staged bytes that no session record names (left by a crash), and lets
        the backend drop what dead writers left as long ago (temp files, S3 multipart
        uploads; and idle for ``writers_idle``, by default an hour: a live writer's look
        the same), which a dry run does not count.
        """
        cutoff = time.time() - (self.ttl if older_than is None else older_than)
        swept: list[UploadStatus] = []
        failed: list[str] = []
        reclaimed = 0
        for rec in self.engine.index.iter_uploads():
            if rec["updated"] > cutoff or is_live(rec.get("lease"), time.time()):
                continue
            if not dry_run:
                try:
                    rec, _ = self._claim(rec["id"], None)
                except (Conflict, UploadNotFound):
                    continue
                except BackendError as exc:
                    # one session's staging unreadable (recovering its journal) must not
                    # keep the sweep from the others
                    log.warning("upload %s: not purged: %s", rec["id"], exc)
                    failed.append(rec["id"])
                    continue
                if rec["updated"] > cutoff:
                    continue  # touched meanwhile
            staged = self._staged_bytes(rec)
            if not dry_run and not self._forget(rec["id"], rec):
                failed.append(rec["id"])  # its record went: the bytes are the next purge's
                continue
            reclaimed += staged
            swept.append(UploadStatus.of(rec))
        leftovers = 0
        if not dry_run:
            failed += self._purge_orphans(cutoff)
            index = self.engine.index
            leftovers = self.engine.backend.purge_staging(
                cutoff, lambda key: index.get_upload(key.rpartition("/")[2]) is not None,
                writers_before=None if writers_idle is None else time.time() - writers_idle)
        return PurgeReport(swept, reclaimed, dry_run, leftovers, tuple(failed))

    def _staged_bytes(self, rec: dict) -> int:
        """What the session's staging takes: at least its acknowledged bytes, more where a
        cut-off append left some past them."""
        try:
            staged = self.engine.backend.staged_bytes(upload_key(rec["id"]), rec["backend"])
        except BackendError:
            staged = 0
        return max(staged, rec["offset"])

    def _purge_orphans(self, cutoff: float) -> list[str]:
        """Discard staged bytes no session names, idle since ``cutoff``; the ids of those
        the backend failed to discard (logged, left for the next purge)."""
        backend = self.engine.backend
        seen: set[str] = set()
        failed = []
        for key in backend.list(UPLOADS):
            upload_id = key[len(UPLOADS):].split("/", 1)[0]
            if upload_id in seen or self.engine.index.get_upload(upload_id) is not None:
                continue
            try:
                mtime = backend.stat(key).mtime
            except NotFound:
                continue  # committed or cancelled while we looked
            if mtime <= cutoff:
                seen.add(upload_id)
                try:
                    backend.discard_upload(upload_key(upload_id), {})
                except BackendError as exc:
                    log.warning("upload %s: staged data not discarded: %s", upload_id, exc)
                    failed.append(upload_id)
        return failed
