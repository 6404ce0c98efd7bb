"""Shared helpers for the engine-core tests: engines on each kind of root, store audits,
deterministic data, wrappers that make a backend fail, and running the CLI.

Plain functions and classes only: fixtures live in the test modules (``conftest.py``
belongs to the backend tests).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Self

import httpx
import pytest

from casengine.backend import Backend, Buffer, ObjectInfo, Writer
from casengine.engine import Engine
from casengine.layout import BLOBS, RAW, parse_blob_key
from casengine.seekable import read_object

MIB = 1 << 20
KINDS = ("memory", "local")
REPO = Path(__file__).resolve().parent.parent


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode, or None where it has none."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


huge_pages = pytest.mark.skipif(
    thp_mode() not in ("madvise", "always") or not hasattr(mmap, "MADV_HUGEPAGE"),
    reason="the kernel gives no transparent huge pages here")


def huge_kib_at(addr: int) -> int:
    """AnonHugePages of this process's mapping that holds ``addr``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                for field_ in lines[i + 1:]:
                    if field_.startswith("AnonHugePages:"):
                        return int(field_.split()[1])
    raise AssertionError(f"no mapping holds {addr:#x}")


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def open_engine(kind: str, tmp_path: Path) -> Engine:
    """A fresh engine: ``memory://`` or a local root under ``tmp_path``."""
    if kind == "memory":
        return Engine.open("memory://")
    if kind == "local":
        return Engine.open(str(tmp_path / "root"))
    raise ValueError(kind)


def tmp_files(engine: Engine) -> list[str]:
    """Temp files a local root still holds in ``<root>/.tmp`` (always [] for other roots)."""
    tmp_dir = getattr(engine.backend, "tmp_dir", None)
    return sorted(os.listdir(tmp_dir)) if tmp_dir else []


def blob_objects(engine: Engine) -> list[str]:
    """Every object key under ``blobs/`` in the backend."""
    return sorted(engine.backend.list(BLOBS))


def assert_nothing_published(engine: Engine) -> None:
    """An empty store: no record, no object under blobs/, no temp file left behind."""
    assert list(engine.list()) == []
    assert engine.index.count_blobs() == 0
    assert blob_objects(engine) == []
    assert tmp_files(engine) == []


def hash_stream(chunks: Iterator[bytes], algorithm: str) -> tuple[str, int]:
    h = hashlib.new(algorithm)
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return f"{algorithm}:{h.hexdigest()}", size


def audit(engine: Engine) -> None:
    """I1 checked from both sides, streaming.

    Every indexed blob's bytes hash to its digest and have its size. Every object under
    ``blobs/`` has a record, or is a complete object whose bytes hash to its name (a publish
    whose record was never written), never a partial one.
    """
    recorded = {}
    for record in engine.list():
        actual, size = hash_stream(engine.read(record.digest), record.digest.split(":")[0])
        assert actual == record.digest, f"indexed blob {record.digest} has bytes of {actual}"
        assert size == record.size
        recorded[record.digest] = record
    for key in blob_objects(engine):
        parsed = parse_blob_key(key)
        assert parsed is not None, f"junk object {key!r} under blobs/"
        digest, codec = parsed
        if str(digest) in recorded:
            continue
        chunks = engine.backend.read(key) if codec == RAW else read_object(engine.backend, key)
        actual, _ = hash_stream(chunks, digest.algorithm)
        assert actual == str(digest), f"unrecorded object {key} is partial: bytes of {actual}"


def pattern(seed: int, index: int, size: int) -> bytes:
    """Chunk ``index`` of a deterministic stream: cheap to make, different per seed and index."""
    unit = f"<{seed}:{index}>".encode()
    return (unit * (size // len(unit) + 1))[:size]


def pattern_stream(seed: int, count: int, size: int) -> Iterator[bytes]:
    for i in range(count):
        yield pattern(seed, i, size)


def pattern_digest(seed: int, count: int, size: int, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    for chunk in pattern_stream(seed, count, size):
        h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def pipe_from(data: bytes, *, piece: int = 65_537, close_early_at: int | None = None):
    """A binary file object reading from a real pipe that a thread feeds with ``data``.

    With ``close_early_at`` the writer stops there and closes: a truncated body. Returns the
    reader and the thread (join it after the ingest).
    """
    r, w = os.pipe()
    end = len(data) if close_early_at is None else close_early_at

    def feed() -> None:
        try:
            view = memoryview(data)[:end]
            for off in range(0, len(view), piece):
                os.write(w, view[off : off + piece])
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return os.fdopen(r, "rb"), thread


# -- backends that fail on purpose (wrappers: the engine is what is under test) -----------


class FailingWriter(Writer):
    """Passes writes through until ``fail_after`` bytes, then raises OSError."""

    def __init__(self, inner: Writer, fail_after: int | None, fail_commit: bool) -> None:
        self.inner = inner
        self.fail_after = fail_after
        self.fail_commit = fail_commit
        self.size = 0

    def write(self, data: Buffer) -> None:
        n = len(memoryview(data).cast("B"))
        if self.fail_after is not None and self.size + n > self.fail_after:
            raise OSError(28, "No space left on device (injected)")
        self.inner.write(data)
        self.size += n

    def commit(self, key: str, *, exclusive: bool = False) -> bool:
        if self.fail_commit:
            raise OSError(5, "Input/output error (injected at commit)")
        return self.inner.commit(key, exclusive=exclusive)

    def abort(self) -> None:
        self.inner.abort()


class WrappedBackend(Backend):
    """Delegates everything to ``inner``; subclasses override :meth:`wrap_writer`."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.url)
        self.inner = inner

    def wrap_writer(self, writer: Writer) -> Writer:
        return writer

    def writer(self, key_hint: str | None = None) -> Writer:
        return self.wrap_writer(self.inner.writer(key_hint))

    def read(self, key: str, start: int = 0, length: int | None = None, *,
             chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self.inner.read(key, start, length, chunk_size=chunk_size)

    def stat(self, key: str) -> ObjectInfo:
        return self.inner.stat(key)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()


class FailingBackend(WrappedBackend):
    def __init__(self, inner: Backend, *, fail_after: int | None = None,
                 fail_commit: bool = False) -> None:
        super().__init__(inner)
        self.fail_after = fail_after
        self.fail_commit = fail_commit
        # Engine.audit helpers look for a local root's temp directory here.
        self.tmp_dir = getattr(inner, "tmp_dir", None)

    def wrap_writer(self, writer: Writer) -> Writer:
        return FailingWriter(writer, self.fail_after, self.fail_commit)


# -- the command line ----------------------------------------------------------------------


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr == b""
    return proc.stdout.decode()


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """Exit ``code``, nothing on stdout, exactly one line on stderr, no traceback."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"want one line, got {err!r}"
    assert err.startswith("casengine: error: "), err
    assert proc.stdout == b""
    return err


def stop_process(process: subprocess.Popen, log_file: IO[bytes]) -> int:
    """Stop a server: SIGTERM, then SIGKILL after 15 s; close its log; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)
    log_file.close()
    return process.returncode


def casengine_command() -> list[str]:
    """The installed console script of this Python (not a pyenv shim), else the entry point."""
    beside = Path(sys.executable).parent / "casengine"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    exe = shutil.which("casengine")
    if exe:
        return [exe]
    return [sys.executable, "-c", "from casengine.cli import main; main()"]


def run_cli(args: list[str], *, cwd: Path, input: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``casengine ARGS`` in a clean environment (no CASENGINE_* from the caller)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
    base.update(env or {})
    return subprocess.run(casengine_command() + args, cwd=cwd, input=input, env=base,
                          capture_output=True, timeout=timeout, check=False)


# -- index writers in other processes -------------------------------------------------------


def make_record(digest: str, *, size: int = 1, when: float = 1_700_000_000.0):
    from casengine.index import BlobRecord

    return BlobRecord(digest, size, "raw", size, "5a" * 16, when, when)


def fake_digest(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


def index_writer(path: str, worker: int, count: int, shared: int, start, results) -> None:
    """Insert ``count`` own digests and ``shared`` digests every worker also inserts.

    Runs in a child process (multiprocessing, spawn): opens its own index on ``path``, waits
    for ``start`` so the workers really overlap, and reports which shared digests it created.
    """
    from casengine.index import LmdbIndex

    try:
        index = LmdbIndex(path)
        try:
            start.wait(timeout=30)
            created = []
            for i in range(count):
                if not index.add_blob(make_record(fake_digest(f"w{worker}-{i}"), size=i)):
                    raise AssertionError(f"worker {worker}: own digest {i} already present")
                if i < shared and index.add_blob(make_record(fake_digest(f"shared-{i}"), size=i)):
                    created.append(i)
            results.put((worker, created))
        finally:
            index.close()
    except BaseException as exc:  # report it instead of leaving the parent waiting
        results.put((worker, f"error: {exc!r}"))
        raise


LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass(kw_only=True)
class ServeProcess:
    """``casengine serve --host 127.0.0.1 --port <free>`` over ``root``, logging to ``log``;
    subclasses add options (:meth:`serve_args`) and say what a ready ``/v2/`` answers."""

    root: Path
    log: Path
    port: int = 0
    args: list[str] = field(default_factory=list)  #: more options for ``casengine serve``
    process: subprocess.Popen | None = None
    _log_file: Any = field(default=None, repr=False)
    #: what ``GET /v2/`` without credentials answers once the server is up
    ready_status: ClassVar[int] = 200

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def serve_args(self) -> list[str]:
        return self.args

    def start(self, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
        env["CASENGINE_ROOT"] = str(self.root)
        for _attempt in range(3):  # another process may take the free port before we bind it
            self.port = free_port()
            self._log_file = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
            self.process = subprocess.Popen(
                [*casengine_command(), "serve", "--host", LOOPBACK, "--port", str(self.port),
                 *self.serve_args()],
                env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT)
            if self._wait_ready(timeout):
                return
            self.stop()
            if "address already in use" not in self.log_text().lower():
                break
        raise RuntimeError(f"casengine serve did not start:\n{self.log_text()[-2000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/v2/", timeout=2).status_code == self.ready_status:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False

    @contextlib.contextmanager
    def running(self) -> Iterator[Self]:
        """Started for the block and stopped after it, which then fails if the server
        logged a traceback (every 5xx the adapter answers is logged)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()
        log = self.log_text()
        assert "Traceback" not in log, f"casengine serve logged an error:\n{log[-4000:]}"

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after 15 s); its exit code."""
        if self.process is None:
            return None
        code, self.process = stop_process(self.process, self._log_file), None
        return code

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
