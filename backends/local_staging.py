"""Upload staging for local roots: one file per session, one flush per append.

Mixed into :class:`backends.local.LocalBackend`. A session's bytes are appended in place to
``<key>/data``. Past them, at the end of the file, two 4 KiB slots journal the session (its
offset and hash state, see :mod:`casengine.uploads`)::

    uploads/<id>/data   [ blob bytes ... ][ hole ... ][ slot 0 ][ slot 1 ]
                        0                             P = a power of two, 16 MiB or more

An append writes its bytes and its journal entry, then makes both durable with one
``fdatasync`` of the file; the caller then need not sync its own record of the append.
Consecutive appends use alternate slots, so an entry torn by a power cut never spoils the
one before it. Entries are only claims (the cut may have kept an entry but not all its
bytes): :mod:`casengine.uploads` checks them against the bytes before adopting one.

The slots stay ahead of the bytes: before an append would write over them, it copies them
to the next power of two past its end and syncs that copy first (a second flush, a few
times per upload: at 16, 32, 64 MiB ...), so the file is at most about twice the bytes
(sparse, the hole takes no space). Publishing cuts the file to the blob's size, which drops
the slots, and links it; its pages stay in the page cache for the pulls that follow.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import xxhash

from backends.local_files import FileSink, fsync_dir, translated
from casengine.backend import Appender, Buffer, UploadJournal
from casengine.errors import BackendError

_BLOCK = 4096
SLOTS = 2 * _BLOCK
#: Where the first slots go; later ones at the next power of two past the bytes.
FIRST_SLOTS = 16 << 20
_MAGIC = b"casjrnl1"
#: Appends up to this long write their bytes direct (see :mod:`backends.local_files`):
#: their flush is most of what they cost. So do longer ones whose bytes the caller holds
#: (:meth:`LocalAppender.expect`); longer streamed ones go through the page cache.
DIRECT_APPEND = 1 << 20
#: Slots that cannot be written (a file system without sparse files, or too small for the
#: offset) only mean the append is not journaled: the caller records it durably itself.
_NO_JOURNAL = (errno.EFBIG, errno.EINVAL, errno.ENOSPC, errno.EOPNOTSUPP)


def slots_past(end: int) -> int:
    """Where the slots go for bytes up to ``end``."""
    at = FIRST_SLOTS
    while at < end:
        at *= 2
    return at


def _payload(block: bytes) -> bytes | None:
    """A slot's payload, or None for a slot never written or torn."""
    n = int.from_bytes(block[8:12], "little")
    payload, check = block[12:12 + n], block[12 + n:20 + n]
    if block[:8] != _MAGIC or len(check) != 8 or xxhash.xxh3_64_digest(payload) != check:
        return None
    return payload


def _find_slots(fd: int, size: int) -> tuple[int | None, list[bytes]]:
    """Where the slots of the file of ``size`` bytes are, and the payloads of the intact ones.

    They are at the end of the file, unless a power cut tore the copy an append was moving
    them with: then the copy it moved them from, at a lower power of two, still holds.
    """
    at = slots_past(size)
    while at >= _BLOCK:  # not FIRST_SLOTS: a file may come from a version with another
        if at + SLOTS <= size:
            found = [p for i in (0, 1) if (p := _payload(os.pread(fd, _BLOCK, at + i * _BLOCK)))]
            if found:
                return at, found
        at //= 2
    return None, []


class LocalAppender(Appender):
    """Bytes at ``offset`` of the session's file; the journal in the slots past them.

    The file is opened with the first write, in the thread that writes: the open and the
    search for the slots then overlap the hashing of the first chunk. What an unfinished
    append leaves past the offset is overwritten by the next one, or cut off on publishing.
    """

    def __init__(self, key: str, path: str, offset: int, state: dict) -> None:
        self._key = key
        self._path = path
        self._offset = offset
        self._seq = state.get("seq", 0)
        self._sink: FileSink | None = None
        self._slots: int | None = None
        self._bounced = False
        self._closed = False
        self.size = 0

    def _opened(self) -> FileSink:
        if self._closed:
            raise BackendError("write after finish or abort")
        if self._sink is None:
            with translated(f"staging {self._key}"):
                # only a session's start creates its file: a later append to a file that has
                # gone must fail, not write after a hole
                create = os.O_CREAT if self._offset == 0 else 0
                fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC | create, 0o644)
                try:
                    st = os.fstat(fd)
                    if st.st_nlink > 1:
                        # published by a commit whose end a power cut lost (or hard-linked
                        # by a backup): a write here would change the other file too
                        raise BackendError(f"the staged data of {self._key} is also linked "
                                           "elsewhere, likely as a published blob: not "
                                           "writing into it")
                    if self._offset == 0:
                        os.ftruncate(fd, 0)  # nothing is acknowledged yet: drop what is there
                        fsync_dir(os.path.dirname(self._path))
                    else:
                        self._slots, _ = _find_slots(fd, st.st_size)
                except BaseException:
                    os.close(fd)
                    raise
            self._sink = FileSink(self._path, self._offset, fd=fd)
            self._sink.bounced = self._bounced
        return self._sink

    def expect(self, size: int, *, in_memory: bool = False) -> None:
        # bytes in memory come at memory speed: a page-cache page costs the writer a fault
        # on the host wherever the VM has given its free memory back, which took up to
        # 2.4 ms per MiB here; a streamed body arrives slower than that, and leaves the
        # blob cached for the pull that follows
        self._bounced = 0 < size and (size <= DIRECT_APPEND or in_memory)

    def write(self, data: Buffer) -> None:
        sink = self._opened()
        end = sink.pos + memoryview(data).nbytes
        if self._slots is not None and end > self._slots:
            self._move_slots(end)
        sink.write(data)
        self.size = sink.pos - sink.start

    def _move_slots(self, end: int) -> None:
        """Copy the slots past ``end`` and make the copy durable before bytes cover them."""
        assert self._sink is not None and self._slots is not None
        fd, new = self._sink.fd, slots_past(end)
        with translated(f"moving the journal of {self._sink.path}"):
            os.pwrite(fd, os.pread(fd, SLOTS, self._slots), new)
            os.fdatasync(fd)
        self._slots = new

    def finish(self, journal: dict | None = None) -> dict:
        sink = self._opened()
        # every append advances seq, journaled or not: an entry is newer than a record
        # exactly when its seq is higher
        state = {"seq": self._seq + 1, "size": sink.pos}
        if journal is not None:
            self.journaled = self._write_slot(state, journal)
        sink.sync()
        self.abort()
        return state

    def _write_slot(self, state: dict, journal: dict) -> bool:
        assert self._sink is not None
        payload = json.dumps({"state": state, "journal": journal},
                             separators=(",", ":")).encode()
        slot = _MAGIC + len(payload).to_bytes(4, "little") + payload + xxhash.xxh3_64_digest(
            payload)
        if len(slot) > _BLOCK:
            return False
        try:
            if self._slots is None:
                # the first slots: the file ends with both, whatever lay past the bytes
                self._slots = slots_past(self._sink.pos)
                os.ftruncate(self._sink.fd, self._slots + SLOTS)
            os.pwrite(self._sink.fd, slot, self._slots + state["seq"] % 2 * _BLOCK)
        except OSError as exc:
            if exc.errno in _NO_JOURNAL:
                return False
            raise
        return True

    def abort(self) -> None:
        self._closed = True
        if self._sink is not None:
            self._sink.close()
            self._sink = None


class LocalUploadStaging:
    """The upload staging methods of :class:`backends.local.LocalBackend`."""

    if TYPE_CHECKING:  # what the backend provides
        def path(self, key: str) -> str: ...
        def make_parents(self, path: str) -> None: ...
        def publish_file(self, src: str, key: str, *, exclusive: bool) -> bool: ...
        def read(self, key: str, start: int = 0, length: int | None = None) -> Iterator[bytes]: ...

    def _upload_file(self, key: str) -> str:
        return self.path(f"{key}/data")

    def append(self, key: str, state: dict, offset: int) -> Appender:
        path = self._upload_file(key)
        with translated(f"staging {key}"):
            self.make_parents(path)
        return LocalAppender(key, path, offset, state)

    def publish_upload(self, key: str, state: dict, size: int, final: str, *,
                       exclusive: bool = False) -> bool:
        path = self._upload_file(key)
        with translated(f"publishing {key}"):
            self.make_parents(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                have = os.fstat(fd).st_size
                if have < size:
                    raise BackendError(f"staged data of {key} has {have} bytes, expected {size}")
                if have > size:  # the journal, and any unacknowledged tail
                    os.ftruncate(fd, size)
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        return self.publish_file(path, final, exclusive=exclusive)

    def read_upload(self, key: str, state: dict) -> Iterator[bytes]:
        # the size bounds it: past the bytes lie a hole and the journal
        return self.read(f"{key}/data", 0, state.get("size"))

    def upload_journal(self, key: str, state: dict) -> UploadJournal:
        with translated(f"reading the journal of {key}"):
            try:
                fd = os.open(self._upload_file(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                entries: list[tuple[dict, dict]] = []
            else:
                try:
                    _, found = _find_slots(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
                entries = sorted(((e["state"], e["journal"]) for e in map(json.loads, found)),
                                 key=lambda e: e[0]["seq"])
        seq = state.get("seq", 0)
        return UploadJournal([e for e in entries if e[0]["seq"] > seq],
                             lambda start, end: self.read(f"{key}/data", start, end - start))

    def staged_bytes(self, key: str, state: dict) -> int:
        with translated(f"sizing the staged data of {key}"):
            try:
                fd = os.open(self._upload_file(key), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return 0
            try:
                if os.fstat(fd).st_nlink > 1:
                    return 0  # also linked as a published blob: discarding it frees nothing
                # where the bytes written from the start end, to a block: past them lies a
                # hole up to the journal
                end = os.lseek(fd, 0, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                end = 0  # empty: its first append died between creating it and writing
            finally:
                os.close(fd)
        size = state.get("size", 0)
        # beyond the block the acknowledged bytes end in lie those of a cut-off append
        return end if end > -(-size // _BLOCK) * _BLOCK else size

    def discard_upload(self, key: str, state: dict) -> None:
        top = self.path(key)
        with translated(f"discarding {key}"), contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(top, "data"))
        with contextlib.suppress(OSError):  # gone, or not empty: purge sweeps it once empty
            os.rmdir(top)
