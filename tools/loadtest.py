#!/usr/bin/env python3
"""Load test: concurrent clients push and pull images over the v2 API for a fixed time.

By default it starts ``casengine serve --workers 2`` on loopback over a fresh temp root
(``--root`` picks another, ``faulty+file://...?rate=0.05`` included; ``--url`` uses a
running registry), then runs ``--clients`` threads for ``--duration`` seconds. Each client
pushes images (a config and 1-3 layers from 16 KiB to 4 MiB, some shared between images;
HEAD first as docker does; monolithic or chunked uploads; the manifest under a tag) or
pulls one pushed earlier by tag (the manifest, then every blob). Every pulled body is
hashed and compared with its digest.

It reports requests and bytes per second, latency p50/p99/max per route, errors and digest
mismatches; ``--json`` for scripts. A 503 with Retry-After (a faulty backend's throttling
after the server's own retries) is retried like a registry client does, at most
``--retries`` times, and counted; anything else unexpected is an error. Exit 0 only with
zero errors and zero mismatches.

    tools/loadtest.py --duration 60 --clients 32 [--root URL | --url URL] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

HOST = "127.0.0.1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
KIB, MIB = 1 << 10, 1 << 20
#: layer sizes and their weights: mostly small, a few of several MiB
SIZES = ((16 * KIB, 40), (256 * KIB, 30), (1 * MIB, 20), (4 * MIB, 10))
CHUNK = 1 * MIB  # the PATCH size of chunked uploads


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Pushed:
    repo: str
    tag: str
    digest: str
    blobs: tuple[str, ...]


class Unexpected(Exception):
    """A response that should not have happened (after retries)."""


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: list[str] = field(default_factory=list)
    retries: int = 0
    mismatches: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    pushes: int = 0
    pulls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, route: str, message: str) -> None:
        with self.lock:
            self.errors[route] += 1
            if len(self.samples) < 20:
                self.samples.append(f"{route}: {message[:300]}")


class Shared:
    """What the clients share: pushed images to pull, base layers to reuse."""

    def __init__(self, rng: random.Random) -> None:
        self.lock = threading.Lock()
        self.images: list[Pushed] = []
        self.bases = [rng.randbytes(size) for size in (16 * KIB, 256 * KIB, 1 * MIB)]


class Client(threading.Thread):
    def __init__(self, url: str, n: int, seed: int, stats: Stats, shared: Shared,
                 deadline: float, retries: int) -> None:
        super().__init__(daemon=True, name=f"client-{n}")
        self.url, self.n, self.stats, self.shared = url, n, stats, shared
        self.rng = random.Random(seed)
        self.deadline, self.max_retries = deadline, retries
        self.repo = f"load/r{n % 8}"
        self.http: httpx.Client

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as self.http:
            i = 0
            while time.monotonic() < self.deadline:
                i += 1
                with self.shared.lock:
                    have = len(self.shared.images)
                try:
                    if have < 8 or self.rng.random() < 0.5:
                        self.push(f"c{self.n}-{i}")
                    else:
                        self.pull()
                except Unexpected:
                    continue  # counted where it happened
                except httpx.HTTPError as exc:
                    self.stats.error("connection", f"{type(exc).__name__}: {exc}")

    # -- one request, timed, with the retries a client makes on 503 ---------------------------

    def request(self, route: str, method: str, path: str, ok: tuple[int, ...], *,
                content: bytes | None = None, params: dict[str, str] | None = None,
                headers: dict[str, str] | None = None,
                stream_to: Callable[[Iterator[bytes]], None] | None = None) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            started = time.perf_counter()
            if stream_to is None:
                r = self.http.request(method, path, content=content, params=params,
                                      headers=headers)
            else:
                with self.http.stream(method, path, headers=headers) as r:
                    if r.status_code in ok:
                        stream_to(r.iter_bytes(CHUNK))
                    else:
                        r.read()
            elapsed = time.perf_counter() - started
            with self.stats.lock:
                self.stats.latencies[route].append(elapsed)
                self.stats.bytes_up += len(content or b"")
                self.stats.bytes_down += r.num_bytes_downloaded
            if r.status_code in ok:
                return r
            if r.status_code == 503 and "retry-after" in r.headers and attempt < self.max_retries:
                with self.stats.lock:
                    self.stats.retries += 1
                time.sleep(min(float(r.headers["retry-after"]), 1.0) * self.rng.random())
                continue
            break
        self.stats.error(route, f"{method} {path}: {r.status_code} {r.text[:200]}")
        raise Unexpected(route)

    # -- push -----------------------------------------------------------------------------------

    def layer(self) -> bytes:
        if self.rng.random() < 0.2:
            return self.rng.choice(self.shared.bases)
        sizes, weights = zip(*SIZES, strict=True)
        return self.rng.randbytes(self.rng.choices(sizes, weights)[0])

    def push_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        base = f"/v2/{self.repo}/blobs"
        r = self.request("blob HEAD", "HEAD", f"{base}/{digest}", (200, 404))
        if r.status_code == 200:
            return digest
        if len(data) <= CHUNK or self.rng.random() < 0.6:
            self.request("blob push (monolithic)", "POST", f"{base}/uploads/", (201,),
                         content=data, params={"digest": digest})
            return digest
        loc = self.request("upload start", "POST", f"{base}/uploads/", (202,)).headers["location"]
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            loc = self.request("upload PATCH", "PATCH", loc, (202,), content=piece, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{off}-{off + len(piece) - 1}"}).headers["location"]
        self.request("upload commit", "PUT", loc, (201,), params={"digest": digest})
        return digest

    def push(self, tag: str) -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux", "client": self.n,
                             "tag": tag, "salt": self.rng.getrandbits(64)}).encode()
        layers = [self.layer() for _ in range(self.rng.randint(1, 3))]
        descriptors = []
        for data, media in [(config, "application/vnd.oci.image.config.v1+json"),
                            *((b, "application/vnd.oci.image.layer.v1.tar") for b in layers)]:
            descriptors.append({"mediaType": media, "digest": self.push_blob(data),
                                "size": len(data)})
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": descriptors[0], "layers": descriptors[1:]}).encode()
        self.request("manifest PUT", "PUT", f"/v2/{self.repo}/manifests/{tag}", (201,),
                     content=manifest, headers={"Content-Type": OCI_MANIFEST})
        pushed = Pushed(self.repo, tag, digest_of(manifest), tuple(d["digest"] for d in descriptors))
        with self.shared.lock:
            self.shared.images.append(pushed)
        with self.stats.lock:
            self.stats.pushes += 1

    # -- pull -----------------------------------------------------------------------------------

    def pull(self) -> None:
        with self.shared.lock:
            image = self.rng.choice(self.shared.images)
        r = self.request("manifest GET", "GET", f"/v2/{image.repo}/manifests/{image.tag}",
                         (200,), headers={"Accept": OCI_MANIFEST})
        doc = json.loads(r.content)
        got = [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
        if digest_of(r.content) != image.digest or tuple(got) != image.blobs:
            self.mismatch(f"manifest {image.repo}:{image.tag}")
        for digest in image.blobs:
            h = hashlib.sha256()

            def consume(chunks: Iterator[bytes], h: Any = h) -> None:
                for chunk in chunks:
                    h.update(chunk)

            self.request("blob GET", "GET", f"/v2/{image.repo}/blobs/{digest}", (200,),
                         stream_to=consume)
            if "sha256:" + h.hexdigest() != digest:
                self.mismatch(f"blob {image.repo}@{digest}")
        with self.stats.lock:
            self.stats.pulls += 1

    def mismatch(self, what: str) -> None:
        with self.stats.lock:
            self.stats.mismatches += 1
            if len(self.stats.samples) < 20:
                self.stats.samples.append(f"digest mismatch: {what}")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def report(stats: Stats, seconds: float, clients: int, root: str | None) -> dict[str, Any]:
    routes = {}
    for route, values in sorted(stats.latencies.items()):
        v = sorted(values)
        routes[route] = {"requests": len(v), "errors": stats.errors.get(route, 0),
                         "p50_ms": round(_percentile(v, 0.50) * 1000, 1),
                         "p99_ms": round(_percentile(v, 0.99) * 1000, 1),
                         "max_ms": round(v[-1] * 1000, 1)}
    requests = sum(len(v) for v in stats.latencies.values())
    errors = sum(stats.errors.values())
    return {
        "seconds": round(seconds, 1), "clients": clients, "root": root,
        "requests": requests, "requests_per_s": round(requests / seconds, 1),
        "bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down,
        "mb_per_s_up": round(stats.bytes_up / seconds / 1e6, 1),
        "mb_per_s_down": round(stats.bytes_down / seconds / 1e6, 1),
        "pushes": stats.pushes, "pulls": stats.pulls, "retried_503": stats.retries,
        "errors": errors, "digest_mismatches": stats.mismatches, "routes": routes,
        "samples": stats.samples, "ok": errors == 0 and stats.mismatches == 0,
    }


@contextlib.contextmanager
def serving(root: str, workers: int, log_path: str) -> Iterator[str]:
    """``casengine serve --workers N`` on a free loopback port, stopped afterwards."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from casengine.cli import main; main()", "--root", root,
             "serve", "--host", HOST, "--port", str(port), "--workers", str(workers)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v2/", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"casengine serve did not start; see {log_path}")
            time.sleep(0.05)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_load(url: str, *, duration: float, clients: int, seed: int = 1,
             retries: int = 5) -> tuple[Stats, float]:
    rng = random.Random(seed)
    stats, shared = Stats(), Shared(rng)
    started = time.monotonic()
    threads = [Client(url, n, rng.getrandbits(64), stats, shared, started + duration, retries)
               for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, time.monotonic() - started


def run(*, duration: float, clients: int, seed: int = 1, url: str | None = None,
        root: str | None = None, workers: int = 2, retries: int = 5) -> dict[str, Any]:
    if url is not None:
        stats, seconds = run_load(url, duration=duration, clients=clients, seed=seed,
                                  retries=retries)
        return report(stats, seconds, clients, None)
    with tempfile.TemporaryDirectory(prefix="loadtest-") as tmp:
        store = root or os.path.join(tmp, "root")
        with serving(store, workers, os.path.join(tmp, "serve.log")) as served:
            stats, seconds = run_load(served, duration=duration, clients=clients, seed=seed,
                                      retries=retries)
        result = report(stats, seconds, clients, store)
        result["check"] = check(store)
        result["ok"] = result["ok"] and result["check"]["unexpected"] == []
        return result


#: what check may report after a load: work a failed request left (GC reclaims it)
UNACKNOWLEDGED = {"orphan-object", "link-record", "manifest-record", "tag-record"}


def check(store: str) -> dict[str, Any]:
    """``casengine check`` of the store the server left (a faulty root's inner store)."""
    if store.startswith("faulty+"):
        store = store[len("faulty+"):].partition("?")[0]
    proc = subprocess.run([sys.executable, "-c", "from casengine.cli import main; main()",
                           "--root", store, "check", "--json"],
                          capture_output=True, text=True, timeout=600, check=False)
    found = json.loads(proc.stdout)["findings"] if proc.stdout else []
    return {"exit": proc.returncode, "kinds": sorted({f["kind"] for f in found}),
            "unexpected": [f for f in found if f["kind"] not in UNACKNOWLEDGED]
            + ([proc.stderr.strip()] if proc.returncode not in (0, 1) else [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--retries", type=int, default=5, help="retries of a 503 per request")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running registry (else one is started)")
    where.add_argument("--root", help="store URL for the started server, e.g. "
                                      "'faulty+file:///tmp/x?rate=0.05&seed=1'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(duration=args.duration, clients=args.clients, seed=args.seed, url=args.url,
                 root=args.root, workers=args.workers, retries=args.retries)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['seconds']} s, {result['clients']} clients: {result['requests']} requests "
              f"({result['requests_per_s']}/s), up {result['mb_per_s_up']} MB/s, down "
              f"{result['mb_per_s_down']} MB/s, {result['pushes']} pushes, {result['pulls']} "
              f"pulls, {result['retried_503']} retried 503s, {result['errors']} errors, "
              f"{result['digest_mismatches']} digest mismatches"
              + (f"; check: {result['check']['kinds'] or 'clean'}" if "check" in result else ""))
        print(f"{'route':<24} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'max ms':>8}")
        for route, r in result["routes"].items():
            print(f"{route:<24} {r['requests']:>9} {r['errors']:>7} {r['p50_ms']:>8} "
                  f"{r['p99_ms']:>8} {r['max_ms']:>8}")
        for line in result["samples"]:
            print("  ", line)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
