#!/usr/bin/env python3
"""Peer benchmark: ``casengine serve`` against Debian's ``docker-registry`` (CNCF distribution).

    python tools/peer_bench.py [--runs 5] [--scenarios http,skopeo-big,...] [--workers 1]
                               [--json out.json] [--keep] [--tmpdir DIR]

One command. It starts both registries on 127.0.0.1 (fresh temporary roots), builds its own
random, per-round salted images and payloads, runs every scenario against both servers in
alternation for --runs rounds (casengine first in odd rounds, distribution in even ones),
verifies every pull by digest, prints a table of MB/s, ms per blob, the casengine /
distribution ratio (median of the per-round ratios) and each server's CPU share, checks the
targets of issue 5, then stops both servers and removes every temporary directory (also on
Ctrl-C or SIGTERM). See tools/peer_bench.md for what is measured and how to read it.

Exit status: 0 every target met, 1 a target missed, 2 a pull failed verification or the
harness failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import raw_http

REPO_ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
KiB, MiB = 1 << 10, 1 << 20
TAG = "v1"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
# the bytes are random, not gzip: registries never look inside layers, and skopeo copies
# them untouched with --preserve-digests
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

BIG = 256 * MiB  # the raw-HTTP big blob
CHUNK = 8 * MiB  # PATCH size of the chunked upload
SMALL, NSMALL = 16 * KiB, 200  # the raw-HTTP small blobs

SCENARIOS = ["http-big-mono", "http-big-chunked", "http-small",
             "skopeo-big", "skopeo-many", "skopeo-multiarch"]
ALIASES = {"all": SCENARIOS, "http": SCENARIOS[:3], "skopeo": SCENARIOS[3:]}
#: (scenario, direction) -> minimum casengine/distribution ratio (issue 5, item 6)
TARGETS = {
    ("http-big-mono", "push"): 2.5, ("http-big-chunked", "push"): 2.5,
    ("http-big-mono", "pull"): 1.0, ("http-big-chunked", "pull"): 1.0,
    ("http-small", "push"): 1.0, ("http-small", "pull"): 1.0,
    **{(s, d): 1.0 for s in SCENARIOS[3:] for d in ("push", "pull")},
}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def sha256(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


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
        with open(self.log_path, "wb") as out:
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


# -- raw HTTP (OCI distribution API v2) -------------------------------------------------------

class HTTPClient:
    """One keep-alive connection to one registry, through the bare client of
    ``raw_http`` (see there for why not httpx)."""

    def __init__(self, server: Server, *, single_post: bool = True) -> None:
        url = urlsplit(server.url)
        self.conn = raw_http.Connection(url.hostname or "127.0.0.1", url.port or 80)
        self.single_post = single_post and self._probe_single_post()

    def close(self) -> None:
        self.conn.close()

    @staticmethod
    def _check(method: str, target: str, r: raw_http.Response, *ok: int) -> raw_http.Response:
        if r.status not in ok:
            raise RuntimeError(f"{method} {target} -> {r.status}: {r.body[:300]!r}")
        return r

    def _call(self, method: str, target: str, *ok: int, body: bytes | memoryview = b"",
              headers: dict[str, str] | None = None) -> raw_http.Response:
        return self._check(method, target, self.conn.request(method, target, body, headers), *ok)

    def _start(self, repo: str) -> str:
        return self._call("POST", f"/v2/{repo}/blobs/uploads/", 202).location()

    def _probe_single_post(self) -> bool:
        """Does the registry take a whole blob in one POST ?digest= (OCI "single POST")?
        Registries that do not answer 202 and open a session, which is cancelled here."""
        data = os.urandom(64)
        r = self._call("POST", f"/v2/probe/single-post/blobs/uploads/?digest={sha256(data)}",
                       201, 202, body=data)
        if r.status == 201:
            return True
        self._call("DELETE", r.location(), 204)
        return False

    def push_mono(self, repo: str, data: bytes | memoryview, digest: str) -> None:
        """Monolithic upload: one POST ?digest= with the body where the server supports it,
        else POST to open the session and one PUT ?digest= with the whole body."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.single_post:
            target = f"/v2/{repo}/blobs/uploads/?digest={digest}"
            method = "POST"
        else:
            target, method = _with_digest(self._start(repo), digest), "PUT"
        self._created(method, target, self._call(method, target, 201, body=data,
                                                 headers=headers), digest)

    @staticmethod
    def _created(method: str, target: str, r: raw_http.Response, digest: str) -> None:
        got = r.headers.get("docker-content-digest", digest)
        if got != digest:
            raise RuntimeError(f"{method} {target}: the registry stored {got}, not {digest}")

    def push_chunked(self, repo: str, chunks: list[bytes], digest: str) -> None:
        """POST, one PATCH per chunk with Content-Range, PUT ?digest= with no body."""
        loc, offset = self._start(repo), 0
        for chunk in chunks:
            loc = self._call("PATCH", loc, 202, body=chunk, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}"}).location()
            offset += len(chunk)
        target = _with_digest(loc, digest)
        self._created("PUT", target, self._call("PUT", target, 201), digest)

    def pull_into(self, repo: str, digest: str, buf: bytearray) -> int:
        """GET a blob straight into ``buf`` (pre-faulted); returns the byte count, hashed
        later by the caller."""
        target = f"/v2/{repo}/blobs/{digest}"
        self.conn.send("GET", target)
        status, fields = self.conn.read_head()
        if status != 200 or "content-length" not in fields:
            raise RuntimeError(f"GET {target} -> {status}, {fields}")
        return self.conn.read_body_into(fields, memoryview(buf))

    def pull(self, repo: str, digest: str) -> bytes:
        return self._call("GET", f"/v2/{repo}/blobs/{digest}", 200).body


def _with_digest(location: str, digest: str) -> str:
    """The upload URL plus ?digest=, keeping the query the server put there (distribution
    carries its upload state in ``_state``)."""
    return f"{location}{'&' if '?' in location else '?'}digest={quote(digest)}"


# -- images (OCI layouts for skopeo's oci: transport) -----------------------------------------

@dataclass
class Layout:
    root: Path
    blobs: dict[str, int] = field(default_factory=dict)  # digest -> size, every object
    top: str = ""

    def put(self, data: bytes, media_type: str) -> dict[str, Any]:
        d = sha256(data)
        path = self.root / "blobs" / "sha256" / d.split(":", 1)[1]
        if d not in self.blobs:
            path.write_bytes(data)
            self.blobs[d] = len(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    @property
    def nbytes(self) -> int:
        return sum(self.blobs.values())


class Images:
    """Random layer bytes made once; each round salts the first 32 bytes of every layer, so
    every round's push has new digests and uploads every byte."""

    def __init__(self, runid: str) -> None:
        self.runid = runid
        self.base: dict[str, bytes] = {}

    def layer(self, key: str, size: int, salt: str) -> bytes:
        if key not in self.base:
            self.base[key] = os.urandom(size)
        s = hashlib.sha256(f"{self.runid}:{salt}:{key}".encode()).digest()
        return s + self.base[key][len(s):]

    def _image(self, lay: Layout, layers: list[bytes], arch: str, salt: str) -> dict[str, Any]:
        ldescs = [lay.put(b, MT_LAYER) for b in layers]
        cfg = {"architecture": arch, "os": "linux", "config": {"Labels": {"bench.salt": salt}},
               "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in ldescs]}}
        man = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
               "config": lay.put(canon(cfg), MT_CONFIG), "layers": ldescs}
        return lay.put(canon(man), MT_MANIFEST)

    def build(self, scenario: str, root: Path, salt: str) -> Layout:
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        lay = Layout(root)
        if scenario == "skopeo-big":
            top = self._image(lay, [self.layer(f"big{i}", 64 * MiB, salt) for i in range(4)],
                              "amd64", salt)
        elif scenario == "skopeo-many":
            top = self._image(lay, [self.layer(f"many{i}", 16 * KiB, salt) for i in range(200)],
                              "amd64", salt)
        elif scenario == "skopeo-multiarch":
            shared = self.layer("multi-base", 16 * MiB, salt)
            manifests = []
            for arch in ("amd64", "arm64"):
                desc = self._image(lay, [shared, self.layer(f"multi-{arch}", 8 * MiB, salt)],
                                   arch, salt)
                manifests.append({**desc, "platform": {"architecture": arch, "os": "linux"}})
            top = lay.put(canon({"schemaVersion": 2, "mediaType": MT_INDEX,
                                 "manifests": manifests}), MT_INDEX)
        else:
            raise ValueError(scenario)
        lay.top = top["digest"]
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
            {**top, "annotations": {"org.opencontainers.image.ref.name": TAG}}]}
        (root / "index.json").write_bytes(canon(index))
        return lay


def verify_layout(expected: Layout, root: Path) -> str | None:
    """None if the pulled layout at ``root`` holds the same top digest and every object,
    each hashing to its name; else what is wrong."""
    try:
        index = json.loads((root / "index.json").read_bytes())
        top = index["manifests"][0]["digest"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return f"unreadable pulled layout: {exc}"
    if top != expected.top:
        return f"top digest {top}, pushed {expected.top}"
    for d, size in expected.blobs.items():
        path = root / "blobs" / "sha256" / d.split(":", 1)[1]
        h, n = hashlib.sha256(), 0
        try:
            with open(path, "rb") as f:
                while block := f.read(4 * MiB):
                    h.update(block)
                    n += len(block)
        except OSError:
            return f"{d} missing from the pull"
        if n != size or "sha256:" + h.hexdigest() != d:
            return f"{d} pulled with the wrong content ({n} bytes)"
    return None


# -- the benchmark ----------------------------------------------------------------------------

@dataclass
class Outcome:
    """Per server: one Sample per round for push and pull."""

    nbytes: int = 0
    objects: int = 0
    protocol: dict[str, str] = field(default_factory=dict)
    samples: dict[str, dict[str, list[Sample]]] = field(
        default_factory=lambda: {"push": {}, "pull": {}})


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, servers: list[Server]) -> None:
        self.args = args
        self.work = work
        self.servers = servers
        self.runid = time.strftime("%Y%m%d%H%M%S") + f"-{os.getpid()}"
        self.images = Images(self.runid)
        self.clients: dict[str, HTTPClient] = {}
        self.failures: list[str] = []
        self.results: dict[str, Outcome] = {}
        self._buf: bytearray | None = None  #: see pull_buffer
        self.skopeo = self._skopeo_command()

    def order(self, rnd: int) -> list[Server]:
        """Who goes first alternates by round: the first of a pair may pay for a cold
        cache or a busy disk the second does not."""
        return self.servers if rnd % 2 else self.servers[::-1]

    def pull_buffer(self) -> bytearray:
        """One buffer for every big pull, its pages touched once here: a fresh one would
        make whoever pulls first pay the client's page faults (~65 thousand per pull)."""
        if self._buf is None:
            self._buf = bytearray(BIG)
            self._buf[::4096] = b"\xff" * len(range(0, BIG, 4096))
        return self._buf

    def client(self, server: Server) -> HTTPClient:
        if server.key not in self.clients:
            self.clients[server.key] = HTTPClient(server, single_post=self.args.single_post)
        return self.clients[server.key]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def _skopeo_command(self) -> list[str]:
        """skopeo with a private tmpfs blob-info cache where possible (root + unshare): no
        cross-repository mount hints from earlier runs or other users, and the cache's
        BoltDB fsyncs and lock stay out of the timings."""
        skopeo = shutil.which(self.args.skopeo) or self.args.skopeo
        script = ("mount -t tmpfs -o size=64m tmpfs /var/lib/containers/cache && "
                  'exec "$0" "$@"')
        wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, skopeo]
        if (self.args.isolate_skopeo and os.geteuid() == 0 and shutil.which("unshare")
                and os.path.isdir("/var/lib/containers/cache")):
            probe = subprocess.run([*wrapped, "--version"], capture_output=True, check=False,
                                   env=clean_env())
            if probe.returncode == 0:
                return wrapped
            log("skopeo isolation unavailable (unshare failed); using plain skopeo")
        return [skopeo]

    def record(self, scenario: str, direction: str, server: Server, sample: Sample) -> None:
        out = self.results[scenario]
        out.samples[direction].setdefault(server.key, []).append(sample)

    def run(self, scenarios: list[str]) -> None:
        for scenario in scenarios:
            self.results[scenario] = Outcome()
            for rnd in range(1, self.args.runs + 1):
                t0 = time.perf_counter()
                if scenario.startswith("http-"):
                    self.http_round(scenario, rnd)
                else:
                    self.skopeo_round(scenario, rnd)
                line = " ".join(
                    f"{s.key} push {self.results[scenario].samples['push'][s.key][-1].wall:.3f}s"
                    f" pull {self.results[scenario].samples['pull'][s.key][-1].wall:.3f}s"
                    for s in self.servers)
                log(f"  {scenario} round {rnd}: {line} ({time.perf_counter() - t0:.1f}s)")

    # -- raw HTTP ---------------------------------------------------------------------------

    def http_round(self, scenario: str, rnd: int) -> None:
        out, sync = self.results[scenario], not self.args.no_sync
        repo = f"bench/{scenario}-r{rnd}"
        salt = f"{self.runid}:{scenario}:{rnd}".encode()
        if scenario == "http-small":
            blobs = [hashlib.sha256(salt + b"%d" % i).digest() + os.urandom(SMALL - 32)
                     for i in range(NSMALL)]
            digests = [sha256(b) for b in blobs]
            out.nbytes, out.objects = NSMALL * SMALL, NSMALL
            for server in self.order(rnd):
                c = self.client(server)
                out.protocol[server.key] = "POST ?digest=" if c.single_post else "POST + PUT"

                def push(c: HTTPClient = c) -> None:
                    for b, d in zip(blobs, digests, strict=True):
                        c.push_mono(repo, b, d)

                got: list[bytes] = []

                def pull(c: HTTPClient = c, got: list[bytes] = got) -> None:
                    got.extend(c.pull(repo, d) for d in digests)

                self.record(scenario, "push", server, measure(server, push, sync=sync))
                self.record(scenario, "pull", server, measure(server, pull, sync=sync))
                bad = sum(g != b for g, b in zip(got, blobs, strict=True))
                if bad:
                    self.failures.append(f"{scenario} round {rnd} {server.key}: {bad} small "
                                         "blobs pulled with the wrong content")
            return
        data = self.images.layer("http-big", BIG, f"{scenario}:{rnd}")
        digest = sha256(data)
        chunks = [data[i:i + CHUNK] for i in range(0, BIG, CHUNK)] if "chunked" in scenario else []
        buf = self.pull_buffer()
        out.nbytes, out.objects = BIG, 1
        for server in self.order(rnd):
            c = self.client(server)
            if scenario == "http-big-mono":
                out.protocol[server.key] = "POST ?digest=" if c.single_post else "POST + PUT"

                def push(c: HTTPClient = c) -> None:
                    c.push_mono(repo, data, digest)
            else:
                out.protocol[server.key] = f"POST + {len(chunks)} PATCH + PUT"

                def push(c: HTTPClient = c) -> None:
                    c.push_chunked(repo, chunks, digest)

            count = [0]

            def pull(c: HTTPClient = c, count: list[int] = count) -> None:
                count[0] = c.pull_into(repo, digest, buf)

            self.record(scenario, "push", server, measure(server, push, sync=sync))
            self.record(scenario, "pull", server, measure(server, pull, sync=sync))
            if count[0] != BIG or sha256(memoryview(buf)[:count[0]]) != digest:
                self.failures.append(f"{scenario} round {rnd} {server.key}: GET returned "
                                     f"{count[0]} bytes that do not hash to {digest}")
            buf[:32] = bytes(32)  # so a short read next time cannot pass on stale bytes

    # -- skopeo -----------------------------------------------------------------------------

    def _skopeo(self, *args: str) -> Callable[[], None]:
        cmd = [*self.skopeo, "copy", "--quiet", "--all", "--preserve-digests", *args]

        def run() -> None:
            p = subprocess.run(cmd, capture_output=True, text=True, check=False, env=clean_env())
            if p.returncode != 0:
                raise RuntimeError(f"skopeo failed ({p.returncode}): {' '.join(cmd)}\n"
                                   f"{p.stderr[-2000:]}")
        return run

    def skopeo_round(self, scenario: str, rnd: int) -> None:
        out, sync = self.results[scenario], not self.args.no_sync
        rdir = self.work / "images" / f"{scenario}-r{rnd}"
        lay = self.images.build(scenario, rdir / "src", f"{rnd}")
        out.nbytes, out.objects = lay.nbytes, len(lay.blobs)
        repo = f"bench/{scenario}-r{rnd}"
        try:
            for server in self.order(rnd):
                out.protocol[server.key] = "skopeo copy --all"
                ref = f"docker://{server.host}/{repo}:{TAG}"
                dest = rdir / f"pull-{server.key}"
                push = self._skopeo("--dest-tls-verify=false", f"oci:{lay.root}:{TAG}", ref)
                pull = self._skopeo("--src-tls-verify=false", ref, f"oci:{dest}:{TAG}")
                self.record(scenario, "push", server, measure(server, push, sync=sync))
                self.record(scenario, "pull", server, measure(server, pull, sync=sync))
                if (why := verify_layout(lay, dest)) is not None:
                    self.failures.append(f"{scenario} round {rnd} {server.key}: {why}")
                shutil.rmtree(dest, ignore_errors=True)
        finally:
            shutil.rmtree(rdir, ignore_errors=True)


# -- the report -------------------------------------------------------------------------------

def summarize(bench: Bench) -> list[dict[str, Any]]:
    a, b = (s.key for s in bench.servers)
    rows = []
    for scenario, out in bench.results.items():
        for direction in ("push", "pull"):
            sa, sb = out.samples[direction].get(a, []), out.samples[direction].get(b, [])
            if not sa or not sb:
                continue
            mbps = {k: [out.nbytes / s.wall / 1e6 for s in ss] for k, ss in ((a, sa), (b, sb))}
            ratios = [y.wall / x.wall for x, y in zip(sa, sb, strict=True)]  # = MB/s a / MB/s b
            ratio = statistics.median(ratios)
            target = TARGETS.get((scenario, direction))
            rows.append({
                "scenario": scenario, "direction": direction, "bytes": out.nbytes,
                "objects": out.objects, "protocol": out.protocol,
                "mbps": {k: statistics.median(v) for k, v in mbps.items()},
                "mbps_min_max": {k: [min(v), max(v)] for k, v in mbps.items()},
                "ms_per_blob": {k: statistics.median(s.wall for s in ss) * 1000 / out.objects
                                for k, ss in ((a, sa), (b, sb))},
                "server_cpu_share": {k: statistics.median(s.server_cpu / s.wall for s in ss)
                                     for k, ss in ((a, sa), (b, sb))},
                "server_cpu_s": {k: statistics.median(s.server_cpu for s in ss)
                                 for k, ss in ((a, sa), (b, sb))},
                "client_cpu_share": {k: statistics.median(s.client_cpu / s.wall for s in ss)
                                     for k, ss in ((a, sa), (b, sb))},
                "host_busy": {k: statistics.median(s.host_busy for s in ss)
                              for k, ss in ((a, sa), (b, sb))},
                "others_cpu_share": {k: statistics.median(s.others / s.wall for s in ss)
                                     for k, ss in ((a, sa), (b, sb))},
                "ratio": ratio, "ratios": ratios, "target": target,
                "pass": None if target is None else ratio >= target,
                "rounds": {k: [s.as_dict() for s in ss] for k, ss in ((a, sa), (b, sb))},
            })
    return rows


def _mbps(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def print_table(rows: list[dict[str, Any]], a: str, b: str) -> None:
    head = ["scenario", "dir", f"{a} MB/s", f"{b} MB/s", "ratio", "target", f"{a} ms/blob",
            f"{b} ms/blob", f"{a} CPU", f"{b} CPU", "others"]
    table = [head]
    for r in rows:
        t = r["target"]
        table.append([
            r["scenario"], r["direction"], _mbps(r["mbps"][a]), _mbps(r["mbps"][b]),
            f"{r['ratio']:.2f}",
            "" if t is None else f">={t:g} {'ok' if r['pass'] else 'MISS'}",
            f"{r['ms_per_blob'][a]:.2f}", f"{r['ms_per_blob'][b]:.2f}",
            f"{r['server_cpu_share'][a]:.0%} {r['server_cpu_s'][a]:.2f}s",
            f"{r['server_cpu_share'][b]:.0%} {r['server_cpu_s'][b]:.2f}s",
            f"{r['others_cpu_share'][a]:.0%}/{r['others_cpu_share'][b]:.0%}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


# -- main -------------------------------------------------------------------------------------

def versions(binary: str, skopeo: str) -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False,
                               cwd=REPO_ROOT)
        except (OSError, subprocess.SubprocessError):
            return "?"
        return (p.stdout or p.stderr).strip().splitlines()[0] if p.returncode == 0 else "?"

    return {"casengine": out(["git", "describe", "--always", "--dirty"]),
            "distribution": out([binary, "--version"]), "skopeo": out([skopeo, "--version"]),
            "httpx": httpx.__version__, "python": platform.python_version(),
            "kernel": platform.release()}


def parse_scenarios(text: str) -> list[str]:
    names: list[str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        for name in ALIASES.get(part, [part]):
            if name not in SCENARIOS:
                raise argparse.ArgumentTypeError(
                    f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} or "
                    f"{', '.join(ALIASES)}")
            if name not in names:
                names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"scenarios: {', '.join(SCENARIOS)}; aliases: "
                                        + ", ".join(f"{k}" for k in ALIASES))
    ap.add_argument("--runs", type=int, default=5, help="rounds per scenario (default 5)")
    ap.add_argument("--scenarios", type=parse_scenarios, default=SCENARIOS,
                    help="comma-separated scenarios or aliases (default all)")
    ap.add_argument("--workers", type=int, default=1, help="casengine serve --workers")
    ap.add_argument("--json", help="write the summary and every round's samples here")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (server roots and logs)")
    ap.add_argument("--tmpdir", help="where the temporary directory goes (default: $TMPDIR)")
    ap.add_argument("--single-post", choices=["auto", "off"], default="auto",
                    help="raw-HTTP monolithic pushes: one POST ?digest= where the registry "
                         "supports it (auto, the default), or POST + PUT everywhere (off)")
    ap.add_argument("--no-sync", action="store_true",
                    help="do not sync(2) before each timed step")
    ap.add_argument("--no-isolate-skopeo", dest="isolate_skopeo", action="store_false",
                    help="use the host's skopeo blob-info cache")
    ap.add_argument("--docker-registry", default="docker-registry",
                    help="the distribution binary (default: docker-registry on PATH)")
    ap.add_argument("--skopeo", default="skopeo")
    args = ap.parse_args(argv)
    args.single_post = args.single_post == "auto"
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    binary = shutil.which(args.docker_registry)
    if binary is None:
        ap.error(f"{args.docker_registry} not found (apt-get install docker-registry)")
    if any(s.startswith("skopeo") for s in args.scenarios) and not shutil.which(args.skopeo):
        ap.error(f"{args.skopeo} not found (apt-get install skopeo)")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    load = host_load()
    log(f"host busy before start: {load:.2f} of {os.cpu_count()} cores"
        + ("  (a busy host makes the ratios noisy: see the 'others' column)"
           if load > 0.25 else ""))
    work = Path(tempfile.mkdtemp(prefix="peer_bench-", dir=args.tmpdir))
    servers: list[Server] = []
    bench: Bench | None = None
    status = 2
    try:
        servers = [Casengine(work, args.workers), Distribution(work, binary)]
        for s in servers:
            s.start()
            log(f"{s.label}: {s.url} pid {s.proc.pid}")
        bench = Bench(args, work, servers)
        log(f"run {bench.runid}: {args.runs} rounds of {', '.join(args.scenarios)}; "
            f"{os.cpu_count()} CPUs; temp {work}")
        bench.run(args.scenarios)
        rows = summarize(bench)
        a, b = servers[0].key, servers[1].key
        print()
        print(f"peer benchmark: {a} (--workers {args.workers}) vs {b}, median of {args.runs} "
              f"rounds, ratio = {a} MB/s / {b} MB/s (>1: {a} faster), MB = 10^6 bytes")
        print_table(rows, a, b)
        protocols = {(r["scenario"], k, v) for r in rows for k, v in r["protocol"].items()
                     if r["scenario"].startswith("http")}
        for scenario in dict.fromkeys(p[0] for p in sorted(protocols)):
            print(f"  {scenario} push: " + "; ".join(f"{k}: {v}" for s, k, v in sorted(protocols)
                                                     if s == scenario))
        checked = [r for r in rows if r["target"] is not None]
        missed = [f"{r['scenario']} {r['direction']} {r['ratio']:.2f} < {r['target']:g}"
                  for r in checked if not r["pass"]]
        verify = "ok" if not bench.failures else f"FAILED ({len(bench.failures)})"
        print(f"summary: targets {'PASS' if not missed else 'FAIL'} "
              f"({len(checked) - len(missed)}/{len(checked)} met)"
              + (f"; missed: {', '.join(missed)}" if missed else "")
              + f"; pulls verified: {verify}")
        for f in bench.failures:
            print(f"  verify: {f}")
        if args.json:
            doc = {"runid": bench.runid, "runs": args.runs, "workers": args.workers,
                   "scenarios": args.scenarios, "cpus": os.cpu_count(),
                   "host_load_before": load,
                   "versions": versions(binary, args.skopeo),
                   "servers": {s.key: {"url": s.url, "command": s.command()} for s in servers},
                   "targets_met": not missed, "missed": missed, "failures": bench.failures,
                   "rows": rows}
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        status = 2 if bench.failures else (1 if missed else 0)
    except KeyboardInterrupt:
        log("interrupted: stopping the servers and cleaning up")
        status = 130
    except Exception as exc:  # noqa: BLE001 - one line, then clean up
        log(f"peer_bench: error: {exc}")
        status = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if bench is not None:
            bench.close()
        for s in servers:
            s.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
