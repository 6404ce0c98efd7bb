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

The servers and their CPU accounting are in ``peer_servers.py``, the images in
``peer_images.py``, the raw-HTTP client in ``raw_http.py``.

Exit status: 0 every target met, 1 a target missed, 2 a pull failed verification or the
harness failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
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
from peer_images import TAG, Images, KiB, MiB, sha256, verify_layout
from peer_servers import (
    REPO_ROOT,
    Casengine,
    Distribution,
    Sample,
    Server,
    clean_env,
    host_load,
    log,
    measure,
)

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

    def fresh_servers(self) -> None:
        """Both registries again, on empty roots; the last round's data is deleted."""
        self.close()
        self.clients = {}
        for server in self.servers:
            server.restart_empty()

    def run(self, scenarios: list[str]) -> None:
        first = True
        for scenario in scenarios:
            self.results[scenario] = Outcome()
            for rnd in range(1, self.args.runs + 1):
                if not (first or self.args.reuse_servers):
                    self.fresh_servers()
                first = False
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
    ap.add_argument("--reuse-servers", action="store_true",
                    help="one pair of registries for the whole run, instead of a fresh pair "
                         "on empty roots for every round (see tools/peer_bench.md)")
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
