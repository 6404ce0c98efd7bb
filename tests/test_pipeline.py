"""WritePipeline: every chunk written in order before finish returns, errors raised, and a
worker that stops by itself when the length is known."""

import ctypes
import hashlib
import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from backends.local_staging import LocalAppender
from casengine import hashstate, ingest
from casengine.engine import Engine
from casengine.ingest import THREAD_AT, BufferPool, WritePipeline, alongside
from casengine.uploads import ASIDE_AT
from tests.helpers import MIB, huge_kib_at, huge_pages

BIG = THREAD_AT  # a chunk this long starts the worker


class Recorder:
    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.chunks: list[bytes] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail_at = fail_at

    def write(self, data: memoryview) -> None:
        if self.fail_at is not None and len(self.chunks) == self.fail_at:
            raise OSError(28, "No space left on device")
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        self.chunks.append(bytes(data))


def chunks(n: int, size: int = BIG) -> list[bytes]:
    return [bytes([i]) * size for i in range(n)]


@pytest.mark.parametrize("announced", [False, True])
@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_every_chunk_is_written_in_order_before_finish_returns(announced: bool,
                                                               delay: float) -> None:
    data = [b"small"] + chunks(4)
    target = Recorder(delay)
    size = sum(map(len, data)) if announced else None
    with WritePipeline(target, lambda buf: None, size) as pipe:
        for chunk in data:
            pipe.put((memoryview(chunk), None))
        pipe.finish()
        assert target.chunks == data
    assert target.threads == {"casengine-writer"}


def test_one_small_chunk_is_written_by_the_caller() -> None:
    target = Recorder()
    with WritePipeline(target, lambda buf: None, 5) as pipe:
        pipe.put((memoryview(b"small"), None))
        pipe.finish()
    assert target.chunks == [b"small"]
    assert target.threads == {threading.current_thread().name}


def test_a_write_error_is_raised_and_later_chunks_are_not_written() -> None:
    target = Recorder(fail_at=1)
    with pytest.raises(OSError, match="No space"), WritePipeline(target, lambda b: None) as pipe:
        for chunk in chunks(4):
            pipe.put((memoryview(chunk), None))
        pipe.finish()
    assert target.chunks == chunks(1)


def test_leaving_early_waits_for_the_worker() -> None:
    target = Recorder(delay=0.01)
    with pytest.raises(RuntimeError), WritePipeline(target, lambda b: None) as pipe:
        for chunk in chunks(3):
            pipe.put((memoryview(chunk), None))
        raise RuntimeError("the caller failed")
    written = len(target.chunks)
    time.sleep(0.05)
    assert len(target.chunks) == written  # nothing is written after the block is left


def test_with_the_length_known_the_worker_stops_with_the_last_chunk() -> None:
    # the worker goes back to the pool before finish is called: nobody has to wake it
    data = chunks(2)
    with WritePipeline(Recorder(), lambda b: None, sum(map(len, data))) as pipe:
        for chunk in data:
            pipe.put((memoryview(chunk), None))
        deadline = time.monotonic() + 5
        while not pipe._done.is_set():  # set when the worker has left its loop
            assert time.monotonic() < deadline, "the worker waits for a stop marker"
            time.sleep(0.001)
        pipe.finish()


def test_more_than_the_announced_length_is_refused() -> None:
    with WritePipeline(Recorder(), lambda b: None, BIG) as pipe:
        pipe.put((memoryview(bytes(BIG)), None))
        with pytest.raises(ValueError, match="announced"):
            pipe.put((memoryview(b"x"), None))
        pipe.finish()


def test_workers_are_reused() -> None:
    for _ in range(3):
        with WritePipeline(Recorder(), lambda b: None, 2 * BIG) as pipe:
            for chunk in chunks(2):
                pipe.put((memoryview(chunk), None))
            pipe.finish()
    time.sleep(0.01)
    assert ingest._workers._idle >= 1


def test_alongside_runs_here_and_runs_the_other_job_on_a_worker() -> None:
    target = Recorder(delay=0.01)
    ran: list[str] = []
    aside_done = threading.Event()

    def aside() -> None:
        time.sleep(0.02)  # longer than the write: the call must wait for it
        ran.append(threading.current_thread().name)
        aside_done.set()

    assert alongside(lambda: target.write(memoryview(b"chunk")) or 7, aside) == 7
    assert aside_done.is_set()
    assert target.chunks == [b"chunk"]
    assert target.threads == {threading.current_thread().name}
    assert ran == ["casengine-writer"]


def test_alongside_raises_either_error_after_both_are_done() -> None:
    def bad_aside() -> None:
        raise ValueError("hash failed")

    with pytest.raises(ValueError, match="hash failed"):
        alongside(lambda: Recorder().write(memoryview(b"x")), bad_aside)
    finished = threading.Event()

    def slow_aside() -> None:
        time.sleep(0.02)
        finished.set()

    with pytest.raises(OSError, match="No space"):
        alongside(lambda: Recorder(fail_at=0).write(memoryview(b"x")), slow_aside)
    assert finished.is_set()


@huge_pages
def test_pool_buffers_are_huge_pages() -> None:
    """Ingest's buffers are written direct from: whole huge pages make each write one disk
    request (and a fresh buffer two page faults instead of 1024)."""
    pool = BufferPool(2, ingest.CHUNK)
    buf = pool.get()
    buf[:] = b"\x01" * len(buf)  # the pages exist once touched
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert addr % mmap.PAGESIZE == 0
    # at least the whole huge pages inside it (all of them where the kernel aligns it)
    assert huge_kib_at(addr) >= (len(buf) - (-addr % ingest.HUGE)) // ingest.HUGE * 2048 > 0


def test_a_short_held_append_takes_its_xxh3_on_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller writes and flushes; the worker takes the xxh3 its journal entry needs,
    then the sha256, so the caller's write is not held up by either."""
    taken_in: list[str] = []
    real = ingest.xxhash.xxh3_64_hexdigest

    def spy(data: memoryview) -> str:
        taken_in.append(threading.current_thread().name)
        return real(data)

    monkeypatch.setattr(ingest.xxhash, "xxh3_64_hexdigest", spy)
    data = os.urandom(ASIDE_AT)
    with Engine.open(str(tmp_path / "root")) as engine:
        upload = engine.uploads.start()
        engine.uploads.append(upload.id, data, 0)
        engine.uploads.commit(upload.id, "sha256:" + hashlib.sha256(data).hexdigest())
    assert taken_in == ["casengine-writer"]


two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or ingest._sched_getcpu is None, reason="needs Linux and two CPUs to choose from")


@two_cpus
def test_alongside_apart_runs_the_two_jobs_on_different_cpus_and_restores_masks() -> None:
    here_mask = os.sched_getaffinity(0)
    seen: dict[str, set[int]] = {}

    def job(name: str) -> None:
        seen[name] = os.sched_getaffinity(0)
        time.sleep(0.01)  # both run at once

    alongside(lambda: job("here"), lambda: job("aside"), apart=True)
    assert len(seen["here"]) == 1
    assert seen["aside"] and not seen["aside"] & seen["here"]
    assert seen["here"] | seen["aside"] == here_mask
    assert os.sched_getaffinity(0) == here_mask
    # the worker got its mask back too: without apart, it may run anywhere again
    alongside(lambda: None, lambda: job("after"))
    assert seen["after"] == here_mask


@two_cpus
def test_alongside_apart_restores_masks_when_a_job_fails() -> None:
    here_mask = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    def bad() -> None:
        raise ValueError("write failed")

    with pytest.raises(ValueError, match="write failed"):
        alongside(bad, lambda: time.sleep(0.01), apart=True)
    assert os.sched_getaffinity(0) == here_mask
    alongside(lambda: None, lambda: seen.append(os.sched_getaffinity(0)))
    assert seen == [here_mask]


@two_cpus
def test_a_held_append_over_a_mib_hashes_on_another_cpu_than_it_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    masks: dict[str, set[int]] = {}
    real_update = hashstate.ResumableHash.update

    def update(self: hashstate.ResumableHash, data: memoryview) -> None:
        masks["hash"] = os.sched_getaffinity(0)
        real_update(self, data)

    def write(self: LocalAppender, chunk: memoryview) -> None:
        masks["write"] = os.sched_getaffinity(0)
        real_write(self, chunk)

    real_write = LocalAppender.write
    monkeypatch.setattr(hashstate.ResumableHash, "update", update)
    monkeypatch.setattr(LocalAppender, "write", write)
    data = os.urandom(4 * MIB)
    with Engine.open(str(tmp_path / "root")) as engine:
        upload = engine.uploads.start()
        engine.uploads.append(upload.id, data, 0)
        engine.uploads.commit(upload.id, "sha256:" + hashlib.sha256(data).hexdigest())
    assert len(masks["write"]) == 1 and not masks["write"] & masks["hash"]


def test_an_append_in_one_chunk_is_hashed_aside_and_written_by_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hashed_in: list[str] = []
    real_update = hashstate.ResumableHash.update

    def update(self: hashstate.ResumableHash, data: memoryview) -> None:
        hashed_in.append(threading.current_thread().name)
        real_update(self, data)

    monkeypatch.setattr(hashstate.ResumableHash, "update", update)
    here = threading.current_thread().name
    data = os.urandom(ASIDE_AT + 6 * MIB)
    held, streamed = ASIDE_AT + 4096, ASIDE_AT + 3 * MIB
    with Engine.open(str(tmp_path / "root")) as engine:
        upload = engine.uploads.start()
        engine.uploads.append(upload.id, data[:ASIDE_AT], 0)  # one chunk: hashed aside
        engine.uploads.append(upload.id, data[ASIDE_AT:held], ASIDE_AT)  # short
        engine.uploads.append(upload.id, data[held:streamed], held)  # held: one call, aside
        chunks = iter([data[at:at + MIB] for at in range(streamed, len(data), MIB)])
        engine.uploads.append(upload.id, chunks, streamed)  # streamed: pipelined, 3 chunks
        result = engine.uploads.commit(upload.id, "sha256:" + hashlib.sha256(data).hexdigest())
    assert result.size == len(data)
    assert hashed_in == ["casengine-writer", here, "casengine-writer", here, here, here]
