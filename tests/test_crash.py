"""I2 and I1 under ``kill -9``: a child process ingests into a local root and is killed at
random moments; the store it leaves must open, show no partial blob, keep everything it
acknowledged, and take the same data again."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from casengine.engine import Engine
from casengine.layout import BLOBS, INDEX_MARK
from tests.helpers import (
    MIB,
    REPO,
    audit,
    digest_of,
    pattern,
    pattern_digest,
    pattern_stream,
)

CHUNK = 256 * 1024
COUNT = 128  # 32 MiB per stream

#: Ingests a slow generator (or stdin), says "ready" before and "done <digest>" after.
_STREAM_CHILD = textwrap.dedent("""
    import sys, time
    from casengine import Engine
    from tests.helpers import pattern_stream

    root, source, seed, count, size, pause, digest = sys.argv[1:8]
    seed, count, size, pause = int(seed), int(count), int(size), float(pause)

    def slow():
        for chunk in pattern_stream(seed, count, size):
            if pause:
                time.sleep(pause)
            yield chunk

    engine = Engine.open(root)
    print("ready", flush=True)
    src = sys.stdin.buffer if source == "stdin" else slow()
    result = engine.ingest(src, digest=digest if digest != "-" else None, size=count * size)
    print("done", result.digest, flush=True)
    time.sleep(120)  # stay alive until killed
""")

#: Ingests one blob after another and acknowledges each by printing its digest.
_LOOP_CHILD = textwrap.dedent("""
    import random, sys
    from casengine import Engine
    from tests.helpers import pattern

    root, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    engine = Engine.open(root)
    print("ready", flush=True)
    for i in range(100000):
        data = pattern(seed, i, rng.randrange(0, 1 << 20))
        result = engine.ingest(data if i % 2 else iter([data]))
        print(result.digest, flush=True)
""")


def _spawn(script: str, *args: object, stdin: int | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = _readline(proc)
    if line != "ready":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"child did not start: {line!r} {err.decode(errors='replace')}")
    return proc


def _readline(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().decode().strip()


def _kill(proc: subprocess.Popen[bytes]) -> list[str]:
    """SIGKILL the child; return the complete lines it printed before it died."""
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
    return [line.decode().strip() for line in out.splitlines(keepends=True)
            if line.endswith(b"\n")]


def _check_after_crash(root: Path) -> Engine:
    """The store opens, holds no partial blob, and shows no temp object as a key."""
    engine = Engine.open(str(root))  # the index opens fine after a kill
    audit(engine)
    for key in engine.backend.list(""):
        assert key.startswith(BLOBS) or key == INDEX_MARK, f"unexpected object {key!r}"
    return engine


@pytest.mark.timeout(180)
def test_kill_during_a_streamed_ingest(tmp_path: Path) -> None:
    root = tmp_path / "root"
    rng = random.Random(20240601)
    delays = [0.0, 0.05, 0.2, 0.4, 0.7]
    rng.shuffle(delays)
    outcomes = []
    for i, delay in enumerate(delays):
        seed = 1000 + i
        digest = pattern_digest(seed, COUNT, CHUNK)
        expected = digest if i % 2 else "-"
        proc = _spawn(_STREAM_CHILD, root, "generator", seed, COUNT, CHUNK, 0.004, expected)
        time.sleep(delay + rng.random() * 0.05)
        lines = _kill(proc)
        done = any(line.startswith("done") for line in lines)
        outcomes.append(done)
        print(f"kill after {delay:.2f}s: {'acknowledged' if done else 'mid-ingest'}")
        with _check_after_crash(root) as engine:
            if done:  # acknowledged: it must be there in full (I2)
                assert engine.stat(digest).size == COUNT * CHUNK
            # a fresh ingest of the same data succeeds, whatever the kill left
            result = engine.ingest(pattern_stream(seed, COUNT, CHUNK), digest=digest)
            assert str(result.digest) == digest
            if done:
                assert not result.created
            audit(engine)
    assert not all(outcomes), "every child finished before the kill: nothing was tested"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cut", [0, 1, 3 * MIB + 5, 20 * MIB, 32 * MIB - 1, 32 * MIB])
def test_kill_while_feeding_a_pipe(tmp_path: Path, cut: int) -> None:
    root = tmp_path / "root"
    seed = 77
    digest = pattern_digest(seed, COUNT, CHUNK)
    proc = _spawn(_STREAM_CHILD, root, "stdin", seed, COUNT, CHUNK, 0, digest,
                  stdin=subprocess.PIPE)
    assert proc.stdin is not None
    sent = 0
    for chunk in pattern_stream(seed, COUNT, CHUNK):
        if sent >= cut:
            break
        piece = chunk[: cut - sent]
        proc.stdin.write(piece)
        sent += len(piece)
    proc.stdin.flush()
    if cut == COUNT * CHUNK:  # the whole body: wait for the acknowledgement, then kill
        proc.stdin.close()
        assert _readline(proc).split() == ["done", digest]
    else:
        time.sleep(0.1)  # let the child take in what it was sent
    _kill(proc)
    with _check_after_crash(root) as engine:
        assert engine.exists(digest) is (cut == COUNT * CHUNK)
        assert engine.ingest(pattern_stream(seed, COUNT, CHUNK), digest=digest).size == \
            COUNT * CHUNK
        audit(engine)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acknowledged_ingests_survive_a_kill(tmp_path: Path, seed: int) -> None:
    root = tmp_path / "root"
    proc = _spawn(_LOOP_CHILD, root, seed)
    time.sleep(0.2 + 0.15 * seed)
    acknowledged = _kill(proc)
    assert acknowledged, "the child acknowledged nothing before the kill"
    rng = random.Random(seed)
    sizes = [rng.randrange(0, 1 << 20) for _ in range(len(acknowledged) + 1)]
    with _check_after_crash(root) as engine:
        for i, digest in enumerate(acknowledged):
            data = pattern(seed, i, sizes[i])
            assert digest == digest_of(data)
            assert b"".join(engine.read(digest)) == data, f"acknowledged blob {i} lost"
        # the blob being ingested at the kill is either absent or complete (audit), and
        # it can be ingested again
        nxt = pattern(seed, len(acknowledged), sizes[len(acknowledged)])
        assert str(engine.ingest(nxt).digest) == digest_of(nxt)
        assert engine.index.count_blobs() >= len(set(acknowledged))


@pytest.mark.timeout(120)
def test_acknowledged_then_killed_mid_next_ingest(tmp_path: Path) -> None:
    """The child acknowledges one ingest, starts a second, large one and is killed in it."""
    root = tmp_path / "root"
    first = pattern(5, 0, 8 * MIB + 3)
    script = textwrap.dedent("""
        import sys, time
        from casengine import Engine
        from tests.helpers import pattern, pattern_stream

        engine = Engine.open(sys.argv[1])
        print("ready", flush=True)
        print(engine.ingest(pattern(5, 0, 8 * 2**20 + 3)).digest, flush=True)

        def slow():
            for chunk in pattern_stream(6, 4096, 64 * 1024):
                time.sleep(0.001)
                yield chunk

        engine.ingest(slow())
        print("second done", flush=True)
    """)
    proc = _spawn(script, root)
    ack = _readline(proc)
    assert ack == digest_of(first)
    time.sleep(0.2)
    rest = _kill(proc)
    assert rest == [], "the second ingest finished before the kill"
    with _check_after_crash(root) as engine:
        assert b"".join(engine.read(ack)) == first
        assert [r.digest for r in engine.list()] == [ack]


def test_index_is_usable_by_another_process_while_one_is_killed(tmp_path: Path) -> None:
    """A killed writer leaves no lock behind that blocks the next one (LMDB's reader table)."""
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:
        engine.ingest(b"before")
    proc = _spawn(_LOOP_CHILD, root, 9)
    results: list[object] = []

    def meanwhile() -> None:
        with Engine.open(str(root)) as other:
            for i in range(20):
                results.append(other.ingest(f"parent {i}".encode()).digest)

    t = threading.Thread(target=meanwhile)
    t.start()
    time.sleep(0.2)
    _kill(proc)
    t.join(timeout=60)
    assert len(results) == 20
    with _check_after_crash(root) as engine:
        for i in range(20):
            assert engine.exists(digest_of(f"parent {i}".encode()))
        assert engine.exists(digest_of(b"before"))


def test_the_audit_finds_what_a_crash_could_leave(tmp_path: Path) -> None:
    """The checks above can fail: a planted partial object, or a record over wrong bytes."""
    from casengine.compression import Policy
    from casengine.digest import Digest
    from casengine.layout import blob_key

    with Engine.open(str(tmp_path / "root"), compression=Policy("never")) as engine:
        data = pattern(1, 0, 100_000)
        engine.ingest(data)
        audit(engine)
        partial = Digest.parse(digest_of(pattern(2, 0, 100_000)))
        engine.backend.put(blob_key(partial), pattern(2, 0, 100_000)[:50_000])
        with pytest.raises(AssertionError, match="partial"):
            audit(engine)
        engine.backend.delete(blob_key(partial))
        engine.backend.put(blob_key(Digest.parse(digest_of(data))), data[:-1])
        with pytest.raises(AssertionError, match="has bytes of"):
            audit(engine)
