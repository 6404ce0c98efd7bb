#!/usr/bin/env python3
"""The crash matrix: ``kill -9`` a real ``casengine serve`` (and a concurrent ``casengine gc``)
at random moments of pushes, chunked uploads, manifest puts and deletes, many times.

Each iteration starts the server if it is down, lets a few HTTP clients push images
(monolithic and chunked blob uploads, a third of the chunked ones with their last piece in
the PUT, a manifest under a fresh tag), delete manifests and abandon uploads, sometimes
runs ``casengine gc`` beside them, and then kills the server
(and the GC, if it still runs) with SIGKILL at a random moment. Everything the server
acknowledged with a 2xx is written down. After each restart, the chunked uploads the kill
cut off are resumed as a client would (ask for the offset, which must not be below what was
acknowledged, send the rest, commit), and what this iteration acknowledged must read back
byte for byte (a third of the layers compress, so some kills
land in the middle of a background compression); so must every manifest acknowledged so far and
not deleted since, and its blobs.

At the end: ``casengine check --full`` may report only unacknowledged work (objects or
backend records without an index record); once it is older than GC's minimum orphan age
(the tool moves the files' times back instead of waiting), ``uploads purge`` and
``gc --grace 0 --orphans`` reclaim it, then ``check --full`` is clean, no temp or staged file is left, and every
surviving acknowledged manifest and blob still reads back.

    tools/crash_matrix.py --iterations 200 --seed 1 [--root DIR] [--json]

Exit 0 when nothing acknowledged was lost and the store ends clean, 1 otherwise.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from casengine.gc import ORPHAN_MIN_AGE

HOST = "127.0.0.1"
CASENGINE = [sys.executable, "-c", "from casengine.cli import main; main()"]
REPOS = ("crash/a", "crash/b", "crash/team/c")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: check findings that unacknowledged work leaves (a crash between backend and index)
UNACKNOWLEDGED = {"orphan-object", "link-record", "manifest-record", "tag-record"}
#: GC during the run keeps anything younger: longer than an iteration, so what an
#: iteration acknowledged is still there when it is verified after the restart
RUN_GRACE = "5s"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Image:
    repo: str
    tag: str
    manifest: bytes
    blobs: dict[str, bytes]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def kept(self) -> Kept:
        return Kept(self.repo, self.tag, self.manifest, tuple(self.blobs))


@dataclass(frozen=True)
class Kept:
    """An acknowledged image as the ledger keeps it: the manifest, and its blobs' digests
    (a blob that hashes to its digest is the pushed one, byte for byte)."""

    repo: str
    tag: str
    manifest: bytes
    blobs: tuple[str, ...]

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


@dataclass
class Interrupted:
    """A chunked upload the kill cut off: where it was, and how far it was acknowledged."""

    repo: str
    digest: str
    data: bytes
    location: str
    acked: int  #: bytes acknowledged by 2xx PATCHes
    committing: bool  #: the PUT was sent


@dataclass
class Ledger:
    """What the server acknowledged, and what is known to have been deleted."""

    images: dict[str, Kept] = field(default_factory=dict)  # manifest digest -> image
    blob_acks: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest), this iteration
    interrupted: list[Interrupted] = field(default_factory=list)  # this iteration
    counts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class Store:
    """The store under test: how each casengine command is pointed at it."""

    args: list[str]  #: the global options (--root, and for S3 --index and -o ...)
    env: dict[str, str] = field(default_factory=dict)
    root: str | None = None  #: a local root's directory
    s3: dict[str, Any] | None = None  #: an S3 root's URL, index and Engine.open options

    @classmethod
    def local(cls, root: str) -> Store:
        return cls(["--root", root], root=root)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A casengine command on this store, running."""
        return subprocess.Popen([*CASENGINE, *self.args, *args],
                                env={**os.environ, **self.env}, **kwargs)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CASENGINE, *self.args, *args], capture_output=True, text=True,
                              timeout=600, check=False, env={**os.environ, **self.env})

    def leftovers(self) -> tuple[list[str], list[str]]:
        """Temp files, and staged data (S3: open multipart uploads too), once all is swept."""
        if self.root is not None:
            staged = Path(self.root, "uploads")
            return (sorted(os.listdir(Path(self.root, ".tmp"))),
                    sorted(str(p.relative_to(self.root)) for p in staged.rglob("*")
                           if p.is_file()) if staged.exists() else [])
        from casengine.engine import Engine

        assert self.s3 is not None
        with Engine.open(self.s3["url"], index=self.s3["index"], **self.s3["options"]) as e:
            return ([f"staging object {o.key}" for o in e.backend.staging_objects()],
                    [*e.backend.list("uploads/"),
                     *(f"multipart upload {u.key}" for u in e.backend.multipart_uploads())])


@contextlib.contextmanager
def s3_store(work: Path) -> Iterator[Store]:
    """A fresh bucket on moto's S3 server, started here on loopback; the index in ``work``."""
    import boto3

    from casengine.testing.s3server import DUMMY_CREDENTIALS, moto_server

    region = "us-east-1"
    with moto_server() as endpoint:
        bucket = f"crash-{os.urandom(6).hex()}"
        boto3.client("s3", endpoint_url=endpoint, region_name=region,
                     aws_access_key_id=DUMMY_CREDENTIALS["key"],
                     aws_secret_access_key=DUMMY_CREDENTIALS["secret"]).create_bucket(Bucket=bucket)
        index = str(work / "index")
        # 5 MiB parts, S3's smallest: uploads of a few MiB then span parts and tails
        options = {"endpoint_url": endpoint, **DUMMY_CREDENTIALS, "part_size": str(5 << 20)}
        args = ["--root", f"s3://{bucket}/root", "--index", index]
        for key, value in options.items():
            args += ["-o", f"{key}={value}"]
        env = {"AWS_DEFAULT_REGION": region, "AWS_ACCESS_KEY_ID": DUMMY_CREDENTIALS["key"],
               "AWS_SECRET_ACCESS_KEY": DUMMY_CREDENTIALS["secret"]}
        yield Store(args, env, s3={"url": f"s3://{bucket}/root", "index": index, "options": {
            **options, "part_size": 5 << 20, "client_kwargs": {"region_name": region}}})


class Server:
    def __init__(self, store: Store, log: Path, workers: int = 1) -> None:
        self.store, self.log, self.workers = store, log, workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://{HOST}:{port}"
        with self.log.open("ab") as out:
            self.proc = self.store.popen(
                "serve", "--host", HOST, "--port", str(port), "--workers", str(self.workers),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/", timeout=2).status_code == 200:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"casengine serve did not start: see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def _layer(rng: random.Random, size: int) -> bytes:
    """Random bytes, or (one layer in three) text-like bytes that the server stores raw when
    they are large and compresses after the acknowledgement: kills then land in the middle
    of compressions too (casengine/compactor.py)."""
    if rng.random() < 2 / 3:
        return rng.randbytes(size)
    words = [rng.randbytes(6).hex() for _ in range(64)]
    lines = (f"{rng.choice(words)} {rng.choice(words)} {i}\n".encode() for i in range(size))
    out = bytearray()
    for line in lines:
        out += line
        if len(out) >= size:
            return bytes(out[:size])
    return bytes(out)


def _image(rng: random.Random, repo: str, tag: str) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "n": rng.getrandbits(64)}).encode()
    layers = [_layer(rng, rng.choice([1 << 10, 16 << 10, 300 << 10, 1 << 20, 3 << 20]))
              for _ in range(rng.randint(1, 3))]
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                       "digest": digest_of(b), "size": len(b)} for b in layers]}
    blobs = {digest_of(b): b for b in (config, *layers)}
    return Image(repo, tag, json.dumps(doc).encode(), blobs)


class Client(threading.Thread):
    """Pushes, deletes and abandons until stopped or the server goes away."""

    def __init__(self, url: str, ledger: Ledger, rng: random.Random, name: str,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.ledger, self.rng, self.label, self.stop = url, ledger, rng, name, stop

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c, contextlib.suppress(
                httpx.HTTPError):
            n = 0
            while not self.stop.is_set():
                n += 1
                op = self.rng.random()
                if op < 0.7:
                    self.push(c, _image(self.rng, self.rng.choice(REPOS), f"{self.label}-{n}"))
                elif op < 0.9:
                    self.delete(c)
                else:
                    self.abandon(c)

    def push_blob(self, c: httpx.Client, repo: str, digest: str, data: bytes) -> None:
        if self.rng.random() < 0.5:
            r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
            self.ledger.count("monolithic")
        else:
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            r.raise_for_status()
            loc = r.headers["location"]
            step = max(1, len(data) // self.rng.randint(1, 4))
            # a third of them send their last piece with the PUT that commits
            last = len(data) - step if len(data) > step and self.rng.random() < 1 / 3 \
                else len(data)
            acked, committing = 0, False
            try:
                for off in range(0, last, step):
                    piece = data[off:min(off + step, last)]
                    r = c.patch(loc, content=piece, headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{off}-{off + len(piece) - 1}"})
                    r.raise_for_status()
                    loc, acked = r.headers["location"], off + len(piece)
                committing = True
                r = c.put(loc, params={"digest": digest}, content=data[last:],
                          headers={"Content-Type": "application/octet-stream"})
            except httpx.TransportError:
                # the server went away: resumed once it is back (see resume)
                with self.ledger.lock:
                    self.ledger.interrupted.append(
                        Interrupted(repo, digest, data, loc, acked, committing))
                raise
            self.ledger.count("chunked")
        r.raise_for_status()
        with self.ledger.lock:
            self.ledger.blob_acks.append((repo, digest))

    def push(self, c: httpx.Client, image: Image) -> None:
        for digest, data in image.blobs.items():
            self.push_blob(c, image.repo, digest, data)
        r = c.put(f"/v2/{image.repo}/manifests/{image.tag}", content=image.manifest,
                  headers={"Content-Type": OCI_MANIFEST})
        if r.status_code == 400 and "MANIFEST_BLOB_UNKNOWN" in r.text:
            return  # a GC took a blob before the manifest came: the push failed, cleanly
        r.raise_for_status()
        with self.ledger.lock:
            self.ledger.images[image.digest] = image.kept()
        self.ledger.count("manifests")

    def delete(self, c: httpx.Client) -> None:
        with self.ledger.lock:
            if not self.ledger.images:
                return
            image = self.ledger.images.pop(self.rng.choice(sorted(self.ledger.images)))
        # from here its fate is unknown until acknowledged: it is no longer expected
        r = c.delete(f"/v2/{image.repo}/manifests/{image.digest}")
        r.raise_for_status()
        self.ledger.count("deletes")

    def abandon(self, c: httpx.Client) -> None:
        repo = self.rng.choice(REPOS)
        r = c.post(f"/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        c.patch(r.headers["location"], content=self.rng.randbytes(50_000),
                headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        self.ledger.count("abandoned")


def verify(url: str, images: list[Kept], blob_acks: list[tuple[str, str]]) -> list[str]:
    """What no longer reads back byte for byte (as its digest says)."""
    lost = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for repo, digest in blob_acks:
            r = c.get(f"/v2/{repo}/blobs/{digest}")
            if r.status_code != 200 or digest_of(r.content) != digest:
                lost.append(f"blob {repo}@{digest}: {r.status_code}")
        for image in images:
            for ref in (image.tag, image.digest):
                r = c.get(f"/v2/{image.repo}/manifests/{ref}",
                          headers={"Accept": OCI_MANIFEST})
                if r.status_code != 200 or r.content != image.manifest:
                    lost.append(f"manifest {image.repo}:{ref}: {r.status_code}")
            for digest in image.blobs:
                r = c.get(f"/v2/{image.repo}/blobs/{digest}")
                if r.status_code != 200 or digest_of(r.content) != digest:
                    lost.append(f"blob {image.repo}@{digest} of {image.tag}: {r.status_code}")
    return lost


def resume(url: str, uploads: list[Interrupted]) -> list[str]:
    """Finish each interrupted chunked upload as a client would after the restart: ask where
    it stands, send the rest, commit. It must stand at or past what was acknowledged (and at
    most at the end), and the blob must read back; only an upload whose commit was in
    flight may have finished (its session gone, its blob there)."""
    lost = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for up in uploads:
            name = f"upload {up.repo}@{up.digest}"
            r = c.get(up.location)
            if r.status_code == 404 and up.committing:
                r = c.head(f"/v2/{up.repo}/blobs/{up.digest}")
                if r.status_code != 200:
                    lost.append(f"{name}: session gone after its commit, blob {r.status_code}")
                continue
            if r.status_code != 204:
                lost.append(f"{name}: status {r.status_code}, {up.acked} bytes acknowledged")
                continue
            end = int(r.headers["range"].split("-")[1])
            offset = end + 1 if end else 0  # "0-0" is how a registry says 0 (or 1) bytes
            if not up.acked <= offset <= len(up.data):
                lost.append(f"{name}: stands at {offset}, {up.acked} acknowledged")
                continue
            loc = r.headers.get("location", up.location)
            if offset < len(up.data):
                r = c.patch(loc, content=up.data[offset:], headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{len(up.data) - 1}"})
                if r.status_code != 202:
                    lost.append(f"{name}: resuming at {offset}: {r.status_code}")
                    continue
                loc = r.headers["location"]
            r = c.put(loc, params={"digest": up.digest})
            got = c.get(f"/v2/{up.repo}/blobs/{up.digest}")
            if r.status_code != 201 or digest_of(got.content) != up.digest:
                lost.append(f"{name}: commit {r.status_code}, read {got.status_code}")
    return lost


def age(root: str, seconds: float) -> None:
    """Move every object's mtime back: GC leaves orphans younger than ORPHAN_MIN_AGE alone
    (a publish may be in progress), and this stands for the wait an operator would have."""
    for path in Path(root).rglob("*"):
        if path.is_file() and ".index" not in path.parts:
            st = path.stat()
            os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def run(iterations: int, seed: int, root: str, *, clients: int = 3, max_delay: float = 1.0,
        gc_chance: float = 0.3, workers: int = 1, s3: bool = False,
        log: Any = None) -> dict[str, Any]:
    """The matrix on a local root at ``root``, or (``s3``) on moto's S3 with the index and
    the server's log next to ``root``."""
    Path(root).parent.mkdir(parents=True, exist_ok=True)  # the server's log goes there
    if not s3:
        return _run(iterations, seed, Store.local(root), Path(root), clients=clients,
                    max_delay=max_delay, gc_chance=gc_chance, workers=workers, log=log)
    Path(root).mkdir(parents=True, exist_ok=True)
    with s3_store(Path(root)) as store:
        return _run(iterations, seed, store, Path(root), clients=clients, max_delay=max_delay,
                    gc_chance=gc_chance, workers=workers, log=log)


def _run(iterations: int, seed: int, store: Store, where: Path, *, clients: int,
         max_delay: float, gc_chance: float, workers: int, log: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    ledger = Ledger()
    server = Server(store, where.parent / f"{where.name}-serve.log", workers)
    lost: list[str] = []
    kills = {"server": 0, "gc": 0}
    started = time.monotonic()
    try:
        for i in range(iterations):
            if server.proc is None:
                server.start()
            stop = threading.Event()
            threads = [Client(server.url, ledger, random.Random(rng.getrandbits(64)),
                              f"i{i}c{k}", stop) for k in range(clients)]
            for t in threads:
                t.start()
            delay = rng.uniform(0.05, max_delay)
            gc: subprocess.Popen[bytes] | None = None
            if rng.random() < gc_chance:
                time.sleep(delay * rng.random())
                gc = store.popen("gc", "--grace", RUN_GRACE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
                time.sleep(rng.uniform(0.05, 1.5))
            else:
                time.sleep(delay)
            server.kill()
            kills["server"] += 1
            if gc is not None:
                if gc.poll() is None:
                    gc.send_signal(signal.SIGKILL)
                    kills["gc"] += 1
                gc.wait()
            stop.set()
            for t in threads:
                t.join(60)
            server.start()
            with ledger.lock:
                acks, ledger.blob_acks = ledger.blob_acks, []
                cut, ledger.interrupted = ledger.interrupted, []
                images = list(ledger.images.values())
            recent = [im for im in images if im.tag.startswith(f"i{i}c")]
            sample = rng.sample(images, min(10, len(images)))
            found = verify(server.url, [*recent, *sample], acks)
            found += resume(server.url, cut)
            ledger.counts["resumed"] = ledger.counts.get("resumed", 0) + len(cut)
            lost += [f"iteration {i}: {x}" for x in found]
            if log is not None:
                print(f"iteration {i}: {len(acks)} blob acks, {len(images)} images kept, "
                      f"{'gc, ' if gc else ''}lost {len(found)}", file=log, flush=True)
        server.stop()
        before = json.loads(store.run("check", "--full", "--json").stdout)
        unexpected = [f for f in before["findings"] if f["kind"] not in UNACKNOWLEDGED]
        if store.root is not None:
            age(store.root, ORPHAN_MIN_AGE + 60)
        # the server is stopped: no writer lives, whatever its leftovers' age
        purge = store.run("uploads", "purge", "--older-than", "0s", "--writers-idle", "0s")
        gc_run = store.run("gc", "--grace", "0s", "--orphans")
        after = json.loads(store.run("check", "--full", "--json").stdout)
        # S3's objects cannot be aged: orphans younger than GC's minimum age stay, reported
        swept = after["clean"] if store.root is not None else all(
            f["kind"] in UNACKNOWLEDGED for f in after["findings"])
        leftovers, staged = store.leftovers()
        server.start()
        final = verify(server.url, list(ledger.images.values()), [])
        lost += [f"final: {x}" for x in final]
    finally:
        server.stop()
    return {
        "iterations": iterations, "seed": seed, "seconds": round(time.monotonic() - started, 1),
        "kills": kills, "counts": ledger.counts, "images_kept": len(ledger.images),
        "lost": lost,
        "check_before_gc": {"clean": before["clean"],
                            "kinds": sorted({f["kind"] for f in before["findings"]}),
                            "unexpected": unexpected},
        "purge_exit": purge.returncode, "purge_output": (purge.stdout + purge.stderr).strip(),
        "gc_exit": gc_run.returncode,
        "gc_output": gc_run.stdout.strip(),
        "check_after_gc": after, "tmp_left": leftovers, "staged_left": staged,
        "ok": not lost and not unexpected and swept and not leftovers and not staged
              and purge.returncode == 0 and gc_run.returncode == 0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="server processes (all killed)")
    parser.add_argument("--root", help="store directory (default: a fresh temp directory); "
                        "with --s3, where the index and the server's log go")
    parser.add_argument("--s3", action="store_true",
                        help="an S3 root on moto's server, started here on loopback")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crash-matrix-") as tmp:
        root = args.root or str(Path(tmp, "root"))
        report = run(args.iterations, args.seed, root, clients=args.clients,
                     workers=args.workers, s3=args.s3, log=None if args.json else sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['iterations']} iterations in {report['seconds']} s: "
              f"{report['kills']['server']} server kills, {report['kills']['gc']} gc kills, "
              f"{report['counts']}; lost {len(report['lost'])}; check before gc: "
              f"{report['check_before_gc']['kinds'] or 'clean'}; after gc: "
              f"{sorted({f['kind'] for f in report['check_after_gc']['findings']}) or 'clean'}; "
              f"{'OK' if report['ok'] else 'FAILED'}")
        for line in report["lost"][:20]:
            print("  lost:", line)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
