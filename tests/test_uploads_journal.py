"""The local backend's upload journal: one flush per append, and power cuts.

A journaled append is made durable by one ``fdatasync`` of the staged file, which holds the
session's new offset and hash state beside the bytes; the index's record of it is not
synced. A power cut is simulated as it happens: the index goes back to what its last sync
made durable (every sync is snapshotted), the machine gets a new boot id, and the staged
file keeps what its own syncs made durable, or loses what the test says never got there.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest

from backends import local_staging as staging
from backends.local import LocalBackend
from casengine import Engine, ingest, uploads
from casengine.layout import blob_key, upload_key

CHUNK = 256 << 10
DATA = os.urandom(6 * CHUNK)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _SyncedEnv:
    """An LMDB environment that snapshots its data file whenever it is synced."""

    def __init__(self, env: lmdb.Environment, path: str) -> None:
        self._env = env
        self._file = Path(path, "data.mdb")
        self.syncs = 0
        self.durable = self._file.read_bytes()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    frozen = False  #: the power is already off: nothing syncs any more

    def sync(self, force: bool = False) -> None:
        self._env.sync(force)
        self.syncs += 1
        if not self.frozen:
            self.durable = self._file.read_bytes()


class PowerCut:
    """An engine on a local root whose power can be cut."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        self.engine = self.open()

    def open(self) -> Engine:
        engine = Engine.open(str(self.root))
        self.env = _SyncedEnv(engine.index.env, engine.index.path)
        engine.index.env = self.env  # type: ignore[attr-defined]
        return engine

    def cut(self) -> Engine:
        """Lose what the index never synced, reboot, and open the store again."""
        durable = self.env.durable
        self.engine.close()
        Path(self.engine.index.path, "data.mdb").write_bytes(durable)
        self.monkeypatch.setattr(uploads, "BOOT", f"{uploads.BOOT}-rebooted")
        self.engine = self.open()
        return self.engine

    def staged(self, upload_id: str) -> str:
        return str(self.root / upload_key(upload_id) / "data")


@pytest.fixture
def power(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PowerCut:
    if uploads.BOOT is None:
        pytest.skip("no boot id on this system: nothing is journaled")
    return PowerCut(tmp_path / "store", monkeypatch)


def append_chunks(engine: Engine, upload_id: str, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        engine.uploads.append(upload_id, DATA[i * CHUNK:(i + 1) * CHUNK], i * CHUNK)


def finish_upload(engine: Engine, upload_id: str, start: int) -> None:
    """Append DATA's chunks from ``start`` on, commit, and read the whole blob back."""
    append_chunks(engine, upload_id, len(DATA) // CHUNK - start, start=start)
    result = engine.uploads.commit(upload_id, digest(DATA))
    assert result.created and result.size == len(DATA)
    assert b"".join(engine.read(digest(DATA))) == DATA


def count_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors of every ``fdatasync`` from now on."""
    flushes: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (flushes.append(fd), real(fd))[1])
    return flushes


def test_an_append_costs_one_flush(power: PowerCut, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = power.engine
    upload_id = engine.uploads.start("a/b").id
    flushes = count_flushes(monkeypatch)
    syncs = power.env.syncs
    append_chunks(engine, upload_id, 3)
    assert len(flushes) == 3  # the staged file's, one per append
    assert power.env.syncs == syncs  # and none of the index
    assert engine.uploads.commit(upload_id, digest(DATA[:3 * CHUNK])).created


def test_a_power_cut_keeps_every_acknowledged_append(power: PowerCut,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 4)
    engine = power.cut()
    # the index lost every append: the journal must bring them back
    assert engine.index.get_upload(upload_id)["offset"] == 0
    with caplog.at_level(logging.WARNING, logger="casengine.uploads"):
        assert engine.uploads.status(upload_id).offset == 4 * CHUNK
    assert "recovered offset" in caplog.text
    finish_upload(engine, upload_id, 4)


def test_an_append_after_the_cut_recovers_without_asking(power: PowerCut) -> None:
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 3)
    engine = power.cut()
    finish_upload(engine, upload_id, 3)  # at the acknowledged offset, not the index's


def test_bytes_that_never_reached_the_disk_are_not_adopted(power: PowerCut) -> None:
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 4)
    # the last append's journal entry got to the disk, its bytes did not
    with open(power.staged(upload_id), "r+b") as f:
        f.seek(3 * CHUNK + 1000)
        f.write(bytes(100))
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == 3 * CHUNK
    finish_upload(engine, upload_id, 3)


def journal_kinds(power: PowerCut, upload_id: str) -> list[bool]:
    """Whether each of the two newest entries vouches with an xxh3 of its bytes."""
    with open(power.staged(upload_id), "rb") as f:
        _, found = staging._find_slots(f.fileno(), os.fstat(f.fileno()).st_size)
    entries = sorted(map(json.loads, found), key=lambda e: e["state"]["seq"])
    return ["tail" in e["journal"] for e in entries]


@pytest.mark.parametrize("ahead", [False, True], ids=["hash-first", "write-first"])
def test_entries_of_one_chunk_and_of_several_recover_alike(
        power: PowerCut, monkeypatch: pytest.MonkeyPatch, ahead: bool) -> None:
    """An append of one chunk journals the hash state where it began and an xxh3 of its
    bytes (it is flushed before its hash is done); a longer one does too if its write
    ends well before its hash, else it journals the state where it ends."""
    monkeypatch.setattr(ingest.HashAside, "nearly_done", lambda self, share: not ahead)
    data = os.urandom(CHUNK + (3 << 20) + CHUNK)
    upload_id = power.engine.uploads.start("a/b").id
    bounds = [0, CHUNK, CHUNK + (3 << 20), len(data)]
    for start, end in itertools.pairwise(bounds):
        power.engine.uploads.append(upload_id, data[start:end], start)
    assert journal_kinds(power, upload_id) == [ahead, True]  # the last two
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == len(data)
    result = engine.uploads.commit(upload_id, digest(data))
    assert result.created and b"".join(engine.read(digest(data))) == data



def test_a_long_append_flushes_ahead_of_a_slow_hash_not_of_a_slow_write(
        power: PowerCut, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(6 << 20)
    real_update = uploads.hashstate.ResumableHash.update
    real_write = staging.LocalAppender.write
    monkeypatch.setattr(ingest.HashAside, "rate", 0.0)  # no pace known: only "done" counts

    def slow_hash(self: Any, chunk: memoryview) -> None:
        time.sleep(0.2)
        real_update(self, chunk)

    def slow_write(self: Any, chunk: memoryview) -> None:
        time.sleep(0.2)
        real_write(self, chunk)

    upload_id = power.engine.uploads.start("a/b").id
    with monkeypatch.context() as m:
        m.setattr(uploads.hashstate.ResumableHash, "update", slow_hash)
        power.engine.uploads.append(upload_id, data[:3 << 20], 0)
    with monkeypatch.context() as m:
        m.setattr(staging.LocalAppender, "write", slow_write)
        power.engine.uploads.append(upload_id, data[3 << 20:], 3 << 20)
    assert journal_kinds(power, upload_id) == [True, False]
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == len(data)
    assert engine.uploads.commit(upload_id, digest(data)).created


def test_nearly_done_follows_the_last_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    hashing = ingest.HashAside(uploads.hashstate.ResumableHash(), memoryview(bytes(1000)))
    monkeypatch.setattr(ingest.HashAside, "rate", 1000.0)  # this hash takes 1 s
    assert not hashing.nearly_done(0.05)  # not started: all of it to go
    now = time.perf_counter()
    hashing.started = now - 0.5
    assert not hashing.nearly_done(0.05)
    hashing.started = now - 0.975
    assert hashing.nearly_done(0.05)
    assert not hashing.nearly_done(0.01)
    hashing.started = now - 0.5
    hashing.done = True
    assert hashing.nearly_done(0.05)

def test_a_torn_journal_entry_falls_back_to_the_one_before(power: PowerCut) -> None:
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 4)
    newest = staging.FIRST_SLOTS + 4 % 2 * 4096  # the 4th append's slot
    with open(power.staged(upload_id), "r+b") as f:
        f.seek(newest + 40)
        f.write(b"torn")
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == 3 * CHUNK
    finish_upload(engine, upload_id, 3)


def test_recovery_rehashes_at_most_a_span(power: PowerCut, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "RECOVERY_SPAN", 2 * CHUNK)
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 5)
    engine = power.cut()
    # the appends that crossed a span boundary were synced
    assert engine.index.get_upload(upload_id)["offset"] == 4 * CHUNK
    read: list[int] = []
    real = LocalBackend.read

    def counted(self: Any, key: str, start: int = 0, length: int | None = None,
                **kw: Any) -> Any:
        read.append(length or 0)
        return real(self, key, start, length, **kw)

    monkeypatch.setattr(LocalBackend, "read", counted)
    assert engine.uploads.status(upload_id).offset == 5 * CHUNK
    assert sum(read) == CHUNK


def test_the_same_boot_trusts_the_index(power: PowerCut) -> None:
    """A process that dies leaves the index's unsynced commits in place: no recovery."""
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 2)
    power.engine.close()
    engine = power.open()
    power.engine = engine
    assert engine.index.get_upload(upload_id)["boot"] == uploads.BOOT
    assert engine.uploads.status(upload_id).offset == 2 * CHUNK


def test_without_room_for_slots_the_index_is_synced(
        power: PowerCut, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that cannot hold the slots where they go journals nothing."""
    real = os.pwrite

    def small_files(fd: int, data: Any, offset: int) -> int:
        if offset >= staging.FIRST_SLOTS:
            raise OSError(errno.EFBIG, "File too large")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", small_files)
    upload_id = power.engine.uploads.start("a/b").id
    syncs = power.env.syncs
    append_chunks(power.engine, upload_id, 3)
    assert power.env.syncs == syncs + 3
    engine = power.cut()
    assert engine.index.get_upload(upload_id)["offset"] == 3 * CHUNK
    finish_upload(engine, upload_id, 3)


def test_the_slots_move_ahead_of_the_bytes(power: PowerCut,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "FIRST_SLOTS", 2 * CHUNK)
    upload_id = power.engine.uploads.start("a/b").id
    flushes = count_flushes(monkeypatch)
    append_chunks(power.engine, upload_id, 6)
    # moved before the 3rd append (to 4 chunks) and the 5th (to 8): one flush each
    assert len(flushes) == 6 + 2
    assert os.stat(power.staged(upload_id)).st_size == 8 * CHUNK + staging.SLOTS
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == 6 * CHUNK
    finish_upload(engine, upload_id, 6)


def test_a_torn_move_falls_back_to_the_slots_it_copied(power: PowerCut,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "FIRST_SLOTS", 4 * CHUNK)
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 3)
    # a move to 8 chunks that the power cut caught half written, before any byte covered
    # the slots it copied
    with open(power.staged(upload_id), "r+b") as f:
        f.seek(8 * CHUNK)
        f.write(os.urandom(staging.SLOTS))
    engine = power.cut()
    assert engine.uploads.status(upload_id).offset == 3 * CHUNK
    finish_upload(engine, upload_id, 3)


def test_a_cut_after_a_move_finds_the_copied_slots(power: PowerCut,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The power goes while an append that moved the slots writes over the old ones."""
    monkeypatch.setattr(staging, "FIRST_SLOTS", 2 * CHUNK)
    upload_id = power.engine.uploads.start("a/b").id
    append_chunks(power.engine, upload_id, 2)

    def power_off(self: Any, journal: Any = None) -> dict:
        power.env.frozen = True
        raise RuntimeError("the power went")

    with monkeypatch.context() as m, pytest.raises(RuntimeError):
        m.setattr(staging.LocalAppender, "finish", power_off)
        append_chunks(power.engine, upload_id, 1, start=2)
    engine = power.cut()
    assert engine.index.get_upload(upload_id)["offset"] == 0
    assert engine.uploads.status(upload_id).offset == 2 * CHUNK
    finish_upload(engine, upload_id, 2)


def test_the_staged_file_is_cut_to_the_blob_on_commit(power: PowerCut) -> None:
    engine = power.engine
    upload_id = engine.uploads.start("a/b").id
    append_chunks(engine, upload_id, 2)
    assert os.stat(power.staged(upload_id)).st_size == staging.FIRST_SLOTS + staging.SLOTS
    result = engine.uploads.commit(upload_id, digest(DATA[:2 * CHUNK]))
    assert os.stat(power.root / blob_key(result.digest)).st_size == 2 * CHUNK
    assert b"".join(engine.read(result.digest)) == DATA[:2 * CHUNK]
    assert not Path(power.staged(upload_id)).exists()
