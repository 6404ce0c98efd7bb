"""The peer benchmark's servers: both registries as processes on 127.0.0.1, their CPU time
from /proc, and :func:`measure`, which times one step with both sides' CPU."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


_TAKEN: set[int] = set()


def free_port() -> int:
    """A free loopback port, never one handed out before in this run: the kernel may give
    a just-closed port again, and two servers on one port would measure one server twice
    (the second's requests answered by the first)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


# -- CPU accounting ---------------------------------------------------------------------------

def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, reaped children's CPU seconds) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime, stime, cutime, cstime are fields 14-17
    own = (int(fields[11]) + int(fields[12])) / TICK
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return int(fields[1]), own, reaped


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and every live descendant, plus what their
    reaped children used: a multi-worker uvicorn counts all its worker processes."""
    stats: dict[int, tuple[int, float, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1] + stats[pid][2]
        todo.extend(children.get(pid, []))
    return total


def host_load(seconds: float = 2.0) -> float:
    """How many cores' worth of CPU the host is busy with, over ``seconds``."""
    (t0, i0) = host_cpu()
    time.sleep(seconds)
    (t1, i1) = host_cpu()
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def host_cpu() -> tuple[int, int]:
    """(total, idle) jiffies of the whole host."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]


# -- the servers ------------------------------------------------------------------------------

class Server:
    """One registry process on 127.0.0.1, in its own process group, with a temp root."""

    key: str
    label: str

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.dir = work / self.key
        self.dir.mkdir()
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return clean_env()

    def start(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.url}/v2/").status_code == 200:
                        time.sleep(0.2)  # a server that lost its port exits at once
                        if self.proc.poll() is None:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label} did not answer /v2/ within {timeout:.0f}s:"
                                       f"\n{self.log_tail()}")
                time.sleep(0.1)

    def restart_empty(self) -> None:
        """Stop, delete the data root, start again on the same port."""
        self.stop()
        shutil.rmtree(self.dir / "root", ignore_errors=True)
        self.start()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        """SIGTERM to the process group this harness created, SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


class Casengine(Server):
    key, label = "casengine", "casengine"

    def __init__(self, work: Path, workers: int) -> None:
        self.workers = workers
        super().__init__(work)

    def command(self) -> list[str]:
        launcher = "import sys; from casengine.cli import main; sys.argv[0] = 'casengine'; main()"
        return [sys.executable, "-c", launcher, "--root", str(self.dir / "root"), "serve",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
                "--log-level", "warning"]

    def env(self) -> dict[str, str]:
        env = clean_env()
        # serve the checkout this tool lives in, whatever the editable install points at
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH"))
                                            if p)
        return env


class Distribution(Server):
    key, label = "distribution", "distribution"

    def __init__(self, work: Path, binary: str) -> None:
        self.binary = binary
        super().__init__(work)
        self.config = self.dir / "config.yml"
        # Debian's shipped config, minus auth and the health poller, bound to loopback
        self.config.write_text(f"""\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.dir / "root"}
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:{self.port}
""")

    def command(self) -> list[str]:
        return [self.binary, "serve", str(self.config)]


def clean_env() -> dict[str, str]:
    """The environment minus proxies: everything here talks to 127.0.0.1 directly."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# -- measuring one step -----------------------------------------------------------------------

@dataclass
class Sample:
    wall: float
    server_cpu: float
    client_cpu: float
    host_busy: float  # share of all cores busy during the step, 1.0 = every core

    @property
    def others(self) -> float:
        """CPU seconds used by everything but the server and the client: other tenants."""
        return max(0.0, self.host_busy * (os.cpu_count() or 1) * self.wall
                   - self.server_cpu - self.client_cpu)

    def as_dict(self) -> dict[str, float]:
        return {"wall": self.wall, "server_cpu": self.server_cpu,
                "client_cpu": self.client_cpu, "host_busy": self.host_busy,
                "others_cpu": self.others}


def measure(server: Server, fn: Callable[[], Any], *, sync: bool) -> Sample:
    """Time ``fn`` and account the server's CPU and the client's (this process, or the
    child it ran) over the same interval. With ``sync``, dirty pages are flushed first so
    one server's deferred writeback does not land in the other's timing."""
    if sync:
        os.sync()
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    h0, s0 = host_cpu(), server.cpu()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    s1, h1 = server.cpu(), host_cpu()
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    client = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0s, r1s), (r0c, r1c))
                 for f in ("ru_utime", "ru_stime"))
    total = max(1, h1[0] - h0[0])
    return Sample(wall, s1 - s0, client, 1 - (h1[1] - h0[1]) / total)
