"""Layer conversion (``casengine transcode``) next to ``gzip -dc | zstd -T0``, in the same run.

    python benchmarks/transcode.py [--size 256M] [--rounds 5] [--level 3] [--dir DIR]
                                   [--json] [--strict]

Builds one layer: a tar of ``--size`` bytes of semi-compressible files (text-like lines,
structured binary and random bytes, in varied sizes), compressed with Debian's
``gzip -6``. It is pushed once into a local root and once into a ``memory://`` root. Then
each round runs these on the same layer, pipeline and local back to back (in alternating
order), so the pair sees the same machine:

  pipeline   /usr/bin/gzip -dc layer.tar.gz | /usr/bin/zstd -3 -T0 -q -o out.zst
  gunzip     /usr/bin/gzip -dc layer.tar.gz > /dev/null (the pipeline's single-threaded stage)
  local      transcode() of the image in the local root: gunzip, zstd, the verifying
             decompression, and the ingest of the result (sha256, write, fsync)
  memory     the same in the memory:// root (no disk)

Before each casengine round the previous result and its conversion record are removed, so
every round converts (nothing is reused). Figures are medians (MB = 10^6 bytes of gzip
input per second); the ratio is the median of the per-round ratios pipeline time / local
time. Target (issue 9): local >= 0.9 x the pipeline. CPU seconds (all threads, or all
processes of the pipeline) are printed too: on a machine shared with other work, wall
time follows the CPU share a run gets, and the CPU a conversion needs is the steadier
figure.

Everything lives in a fresh temp directory (in ``--dir``), removed at exit, also on Ctrl-C
or SIGTERM. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

from casengine.engine import Engine
from casengine.registry import Registry
from casengine.transcode import forget, transcode

MB = 1_000_000
TARGET = 0.9
GZIP, ZSTD = "/usr/bin/gzip", "/usr/bin/zstd"
REPO = "bench/layer"


def parse_size(text: str) -> int:
    from casengine.units import parse_size as parse

    return parse(text)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the layer --------------------------------------------------------------------------------


def make_tar(path: str, size: int, seed: int = 9) -> None:
    """Files of 64 KiB to 4 MiB: half text-like lines, a quarter structured binary (small
    numbers, compressible a few times), a quarter random."""
    rng = random.Random(seed)
    words = [hashlib.sha256(str(i).encode()).hexdigest()[: 3 + i % 9] for i in range(4096)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40_000)]
    text = ("\n".join(lines) + "\n").encode()
    structured = bytes(min(255, int(rng.expovariate(0.05))) for _ in range(1 << 20))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        total, i = 0, 0
        while total < size:
            n = min(rng.randrange(64 << 10, 4 << 20), size - total)
            kind = i % 4
            if kind < 2:
                start = rng.randrange(len(text) - n) if n < len(text) else 0
                data = (text[start:] + text)[:n]
            elif kind == 2:
                start = rng.randrange(len(structured))
                data = ((structured[start:] + structured) * (n // len(structured) + 1))[:n]
            else:
                data = rng.randbytes(n)
            info = tarfile.TarInfo(f"usr/share/f{i:05d}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
            total += n
            i += 1


def push(registry: Registry, layer: str, tar_digest: str) -> None:
    """The layer as a one-layer image tagged v1 in ``REPO``."""
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [tar_digest]}}).encode()
    c = registry.ingest_blob(REPO, config)
    blob = registry.ingest_blob(REPO, layer)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": str(c.digest), "size": c.size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": str(blob.digest), "size": blob.size}]}
    registry.put_manifest(REPO, "v1", json.dumps(manifest).encode())


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


# -- the runs ---------------------------------------------------------------------------------


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def shell(cmd: str) -> tuple[float, float]:
    """Wall and CPU seconds of ``cmd``."""
    c, t = cpu_seconds(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, shell=True, check=True)
    return time.perf_counter() - t, cpu_seconds(resource.RUSAGE_CHILDREN) - c


def convert(registry: Registry, level: int) -> tuple[tuple[float, float], Any]:
    """One real conversion: the previous result and its record are removed first."""
    source = registry.resolve(REPO, "v1")
    layer = json.loads(registry.engine.read_bytes(source.digest))["layers"][0]["digest"]
    forget(registry, layer, level)
    if "v1-zstd" in registry.tag_map(REPO):
        old = registry.resolve(REPO, "v1-zstd")
        zstd_layer = json.loads(registry.engine.read_bytes(old.digest))["layers"][0]["digest"]
        registry.delete_manifest(REPO, old.digest)
        registry.unlink(REPO, zstd_layer)
        registry.engine.delete(zstd_layer)
    c, t = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
    report = transcode(registry, REPO, "v1", level=level)
    seconds = time.perf_counter() - t, cpu_seconds(resource.RUSAGE_SELF) - c
    assert report.count("converted") == 1, report.to_json()
    return seconds, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("256M"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent of the scratch directory")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    args = ap.parse_args()
    for tool in (GZIP, ZSTD):
        if not os.access(tool, os.X_OK):
            ap.error(f"{tool} is missing: apt-get install gzip zstd")
    scratch = tempfile.mkdtemp(prefix="casengine-transcode-bench-", dir=args.dir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: str) -> int:
    tar, layer = os.path.join(scratch, "layer.tar"), os.path.join(scratch, "layer.tar.gz")
    log(f"building a {args.size / 2**20:.0f} MiB tar in {scratch}")
    make_tar(tar, args.size)
    tar_digest = file_digest(tar)
    shell(f"{GZIP} -6 -n -c {tar} > {layer}")
    gz_size = os.path.getsize(layer)
    os.remove(tar)
    log(f"  gzip -6: {gz_size / MB:.1f} MB ({gz_size / args.size:.2f} of the tar)")
    with Engine.open(os.path.join(scratch, "root")) as local, Engine.open("memory://") as mem:
        registries = {"local": Registry(local), "memory": Registry(mem)}
        for registry in registries.values():
            push(registry, layer, tar_digest)
        out = os.path.join(scratch, "out.zst")
        pipeline = (f"{GZIP} -dc {layer} | {ZSTD} -{args.level} -T0 -q -f -o {out}")
        times: dict[str, list[float]] = {k: [] for k in ("pipeline", "gunzip", "local", "memory")}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        ratios: list[float] = []
        report = None
        for i in range(args.rounds + 1):  # round 0 warms caches and is not counted
            # the pair that makes the ratio runs back to back, in alternating order
            row: dict[str, tuple[float, float]] = {}
            if i % 2:
                row["local"], report = convert(registries["local"], args.level)
                row["pipeline"] = shell(pipeline)
            else:
                row["pipeline"] = shell(pipeline)
                row["local"], report = convert(registries["local"], args.level)
            row["memory"], _ = convert(registries["memory"], args.level)
            row["gunzip"] = shell(f"{GZIP} -dc {layer} > /dev/null")
            log(f"  round {i}{' (warm-up)' if i == 0 else ''}: "
                + "  ".join(f"{k} {gz_size / v[0] / MB:.0f} MB/s ({v[1]:.2f} s cpu)"
                            for k, v in row.items())
                + f"  ratio {row['pipeline'][0] / row['local'][0]:.2f}")
            if i:
                for k, (wall, used) in row.items():
                    times[k].append(wall)
                    cpu[k].append(used)
                ratios.append(row["pipeline"][0] / row["local"][0])
        pipeline_out = os.path.getsize(out)
    assert report is not None
    layer_report = report.layers[0]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "layer": {"tar": args.size, "gzip": gz_size, "level": args.level,
                  "zstd_casengine": layer_report.bytes_out, "zstd_pipeline": pipeline_out},
        "rounds": args.rounds,
        "mb_per_s": {k: round(gz_size / statistics.median(v) / MB, 1) for k, v in times.items()},
        "seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "load_average": os.getloadavg(),
        "ratio_local_vs_pipeline": round(statistics.median(ratios), 3),
        "ratio_memory_vs_pipeline": round(statistics.median(
            [p / m for p, m in zip(times["pipeline"], times["memory"], strict=True)]), 3),
        "target": TARGET,
    }
    met = result["ratio_local_vs_pipeline"] >= TARGET
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"layer: {args.size / 2**20:.0f} MiB tar, {gz_size / MB:.1f} MB gzip -6 -> "
              f"{layer_report.bytes_out / MB:.1f} MB zstd -{args.level} "
              f"(pipeline {pipeline_out / MB:.1f} MB); medians of {args.rounds} rounds")
        for k in times:
            print(f"  {k:9s} {result['seconds'][k]:7.3f} s  {result['mb_per_s'][k]:7.1f} MB/s"
                  f"  {result['cpu_seconds'][k]:6.2f} s of CPU")
        print(f"casengine (local) / pipeline: {result['ratio_local_vs_pipeline']:.2f}x "
              f"(memory:// {result['ratio_memory_vs_pipeline']:.2f}x); target >= {TARGET}x: "
              + ("met" if met else "MISSED"))
    return 1 if args.strict and not met else 0


if __name__ == "__main__":
    sys.exit(main())
