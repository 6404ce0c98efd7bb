"""Upload staging for local roots: one file per session, one flush per append.

Mixed into :class:`backends.local.LocalBackend`. A session's bytes are appended in place to
``<key>/data``, after a header that journals the session (its offset and hash state, see
:mod:`casengine.uploads`)::

    uploads/<id>/data   block 0    marker: magic and the session's nonce
                        block 1    journal slot, odd appends
                        block 2    journal slot, even appends
                        HEADER...  the blob's bytes

An append writes its bytes and its journal entry, then makes both durable with one
``fdatasync`` of the file; the caller then need not sync its own record of the append.
Consecutive appends use alternate slots, so an entry torn by a power cut never spoils the
one before it. Entries are only claims (the cut may have kept an entry but not all its
bytes): :mod:`casengine.uploads` checks them against the bytes before adopting one.

Publishing collapses the header away (``FALLOC_FL_COLLAPSE_RANGE``: the file's extents
shift, no byte moves), cuts off any unacknowledged tail and links the file as the blob.
A publish that crashed after the collapse left a file without its marker; the nonce,
random per session and never sent to a client, is what tells a header from a blob that
merely starts like one. File systems without the collapse (tmpfs, btrfs) get no header and
no journal: their appends are recorded with a synced index commit, as on other backends.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import uuid
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING

import xxhash

from backends.local_files import FileSink, fsync_dir, linux_call, read_file, translated
from casengine.backend import READ_CHUNK, Appender, Buffer, UploadJournal
from casengine.errors import BackendError

#: The header: marker and two slots, padded so that the bytes stay aligned for O_DIRECT
#: and the collapse fits file systems with blocks of up to 64 KiB.
HEADER = 64 << 10
_BLOCK = 4096
_MARKER = b"casengine-upload\n"
_SLOT_MAGIC = b"casjrnl1"
_FALLOC_FL_COLLAPSE_RANGE = 0x08


_fallocate = linux_call("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                        ctypes.c_longlong)


def _collapse_header(fd: int) -> None:
    """Remove the file's first HEADER bytes; the rest moves up without being copied."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "no fallocate here")
    if _fallocate(fd, _FALLOC_FL_COLLAPSE_RANGE, 0, HEADER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _marker(nonce: str) -> bytes:
    return _MARKER + nonce.encode() + b"\n"


def _header_of(fd: int) -> str | None:
    """The nonce in the file's marker, or None for a file that has no header (any more)."""
    head = os.pread(fd, _BLOCK, 0)
    if not head.startswith(_MARKER):
        return None
    nonce, sep, _ = head[len(_MARKER):].partition(b"\n")
    return nonce.decode("ascii", "replace") if sep else None


def _base(fd: int, state: dict) -> int:
    """Where the session's bytes start in its file: after the header while it is there."""
    nonce = state.get("nonce")
    return HEADER if nonce is not None and _header_of(fd) == nonce else 0


class LocalAppender(Appender):
    """Bytes at ``base + offset`` of the session's file; the journal in its header.

    What an unfinished append leaves past the offset is overwritten by the next one, or cut
    off on publishing.
    """

    def __init__(self, path: str, base: int, offset: int, state: dict) -> None:
        self._sink: FileSink | None = FileSink(path, base + offset, create=False)
        self._base = base
        self._state = state
        self.size = 0

    def write(self, data: Buffer) -> None:
        if self._sink is None:
            raise BackendError("write after finish or abort")
        self._sink.write(data)
        self.size = self._sink.pos - self._sink.start

    def finish(self, journal: dict | None = None) -> dict:
        if self._sink is None:
            raise BackendError("finish after finish or abort")
        # every append advances seq, journaled or not: an entry is newer than a record
        # exactly when its seq is higher
        state: dict = {"seq": self._state.get("seq", 0) + 1, "size": self._sink.pos - self._base}
        if self._base:
            state["nonce"] = self._state["nonce"]
            if journal is not None:
                self.journaled = self._write_slot(state, journal)
        self._sink.sync()
        self._sink.close()
        self._sink = None
        return state

    def _write_slot(self, state: dict, journal: dict) -> bool:
        assert self._sink is not None
        payload = json.dumps({"state": state, "journal": journal},
                             separators=(",", ":")).encode()
        slot = (_SLOT_MAGIC + len(payload).to_bytes(4, "little") + payload
                + xxhash.xxh3_64_digest(payload))
        if len(slot) > _BLOCK:
            return False
        with translated(f"journaling {self._sink.path}"):
            os.pwrite(self._sink.fd, slot, _BLOCK * (1 + state["seq"] % 2))
        return True

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


def _read_slots(fd: int) -> list[tuple[dict, dict]]:
    """The intact journal entries of the file's current header, oldest first."""
    nonce = _header_of(fd)
    if nonce is None:
        return []
    entries = []
    for i in (1, 2):
        slot = os.pread(fd, _BLOCK, i * _BLOCK)
        n = int.from_bytes(slot[8:12], "little")
        payload, check = slot[12:12 + n], slot[12 + n:20 + n]
        if (slot[:8] != _SLOT_MAGIC or len(check) != 8
                or xxhash.xxh3_64_digest(payload) != check):
            continue  # never written, or torn by a power cut
        entry = json.loads(payload)
        if entry["state"].get("nonce") == nonce:  # not left by an earlier start at 0
            entries.append((entry["state"], entry["journal"]))
    return sorted(entries, key=lambda e: e[0]["seq"])


class LocalUploadStaging:
    """The upload staging methods of :class:`backends.local.LocalBackend`."""

    if TYPE_CHECKING:  # what the backend provides
        tmp_dir: str

        def path(self, key: str) -> str: ...
        def make_parents(self, path: str) -> None: ...
        def publish_file(self, src: str, key: str, *, exclusive: bool) -> bool: ...

    def _upload_file(self, key: str) -> str:
        return self.path(f"{key}/data")

    @cached_property
    def journals(self) -> bool:
        """Whether this root's file system can collapse a header away: probed once."""
        probe = os.path.join(self.tmp_dir, f"collapse-{uuid.uuid4().hex}")
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError:
            return False
        try:
            os.pwrite(fd, b"x", HEADER + _BLOCK - 1)
            _collapse_header(fd)
            return os.fstat(fd).st_size == _BLOCK
        except OSError:
            return False
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def append(self, key: str, state: dict, offset: int) -> Appender:
        path = self._upload_file(key)
        with translated(f"staging {key}"):
            self.make_parents(path)
            # only a session's start creates its file: a later append to a file that has gone
            # must fail, not write after a hole
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if offset == 0 else 0),
                         0o644)
            try:
                if offset == 0:
                    fsync_dir(os.path.dirname(path))
                    state = {"seq": state.get("seq", 0)}
                    if self.journals:
                        # a fresh header; its nonce sets apart what an earlier start left
                        state["nonce"] = secrets.token_hex(16)
                        os.pwrite(fd, _marker(state["nonce"]).ljust(_BLOCK, b"\0"), 0)
                    base = HEADER if "nonce" in state else 0
                else:
                    base = _base(fd, state)
                    if not base:  # collapsed by a publish that then crashed: go on without
                        state = {k: v for k, v in state.items() if k != "nonce"}
            finally:
                os.close(fd)
        return LocalAppender(path, base, offset, state)

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        path = self._upload_file(key)
        with translated(f"publishing {key}"):
            self.make_parents(path)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if _base(fd, state):
                    if os.fstat(fd).st_size > HEADER:
                        _collapse_header(fd)
                    else:
                        os.ftruncate(fd, 0)  # an empty blob: there is nothing but the header
                have = os.fstat(fd).st_size
                if have < size:
                    raise BackendError(f"staged data of {key} has {have} bytes, expected {size}")
                if have > size:  # the tail of an append that was never acknowledged
                    os.ftruncate(fd, size)
                os.fdatasync(fd)
            finally:
                os.close(fd)
        return self.publish_file(path, final, exclusive=exclusive)

    def _read_staged(self, key: str, state: dict, start: int, length: int | None
                     ) -> Iterator[bytes]:
        with translated(f"reading {key}"):
            f = open(self._upload_file(key), "rb", buffering=0)  # noqa: SIM115 - read_file closes
            try:
                base = _base(f.fileno(), state)
            except BaseException:
                f.close()
                raise
        return read_file(f, base + start, length, READ_CHUNK)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        return self._read_staged(key, state, 0, state.get("size"))

    def upload_journal(self, key: str, state: dict) -> UploadJournal | None:
        if not self.journals:
            return None
        with translated(f"reading the journal of {key}"):
            try:
                fd = os.open(self._upload_file(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return UploadJournal([], lambda start, end: iter(()))
            try:
                entries = _read_slots(fd)
            finally:
                os.close(fd)
        seq = state.get("seq", 0)
        newer = [e for e in entries if e[0]["seq"] > seq]

        def read(start: int, end: int) -> Iterator[bytes]:
            # the entries' state, not the record's: a stale record may predate the header
            return self._read_staged(key, newer[-1][0] if newer else state, start, end - start)

        return UploadJournal(newer, read)

    def discard_upload(self, key: str, state: dict) -> None:
        top = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(top, "data"))
        with contextlib.suppress(FileNotFoundError, OSError):
            os.rmdir(top)

