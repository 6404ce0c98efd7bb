"""Seekable zstd at rest: what compression costs an ingest, and what a range read decompresses.

    python benchmarks/compression.py [--size 256M] [--big 1G] [--levels 1,2,3] [--rounds 5]
                                     [--data text|tar:DIR] [--dir DIR]
                                     [--cases memory,local,range] [--json]

Same run, same bytes, A B A B ... pairs, medians of the per-pair ratios (as ingest.py):

  memory, local  ingest of compressible bytes with ``--compression never`` (A) against
                 ``auto`` at each level (B), into memory:// or a fresh local root.
                 Target: B runs at >= 0.6x of A. B is timed to the acknowledgement (large
                 blobs are compressed after it, casengine/compactor.py); the table also
                 shows B until the blob is stored compressed, and ``auto`` compressing
                 inline (``Policy(defer=False)``), both against the same A. ``--data text`` (default): JSON log lines
                 with random words and numbers (~4x smaller at level 1); ``--data tar:DIR``:
                 an uncompressed tar of DIR's files, like a layer (e.g. a Python install).
  range          a 1 MiB range read in the middle of a ``--big`` compressed blob (B) against
                 the same range of the same bytes stored raw (A), with a cold table cache
                 (a fresh Engine on the same store) and a warm one. Reports how many frames
                 each read decompressed (target: at most 2).

The machine's limits are measured in the same run and printed beside the figures: sha256
over the bytes, and zstd compressing them into frames on one thread and with the policy's
workers, at each level.

Everything is written under a fresh temp directory (in ``--dir``) that is removed at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pairs import MB, human, parse_size

from casengine import seekable
from casengine.compression import Policy
from casengine.engine import Engine

MIB = 1 << 20
TARGET_INGEST = 0.6
TARGET_FRAMES = 2


def text_like(size: int, seed: int = 7) -> bytes:
    """JSON log lines with random words and numbers: compresses like real text, not like
    zeros. A 64 MiB pool is generated and repeated: each 4 MiB frame is compressed on its
    own, so the repetition changes nothing for zstd."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    lines, n = [], 0
    pool_size = min(size, 64 * MIB)
    while n < pool_size:
        line = (f'{{"ts": {1_700_000_000 + n // 97}, "user": "{rng.choice(words)}", "path": '
                f'"/v2/{rng.choice(words)}/{rng.choice(words)}", "status": '
                f'{rng.choice((200, 200, 200, 404, 500))}, "ms": {rng.random() * 100:.3f}}}\n')
        lines.append(line.encode())
        n += len(lines[-1])
    pool = b"".join(lines)[:pool_size]
    return (pool * (size // len(pool) + 1))[:size]


def tar_of(directory: str, size: int) -> bytes:
    """An uncompressed tar of the files under ``directory``, cut or repeated to ``size``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, _, names in sorted(os.walk(directory)):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    tar.add(path, arcname=os.path.relpath(path, directory), recursive=False)
                if buf.tell() >= size:
                    break
            if buf.tell() >= size:
                break
    data = buf.getvalue()
    if not data:
        raise SystemExit(f"no files under {directory}")
    return (data * (size // len(data) + 1))[:size]


def make_data(kind: str, size: int) -> bytes:
    if kind == "text":
        return text_like(size)
    if kind.startswith("tar:"):
        return tar_of(kind[4:], size)
    raise SystemExit(f"--data {kind!r}: want text or tar:DIR")


def pairs(rounds: int, a: Callable[[], float], b: Callable[[], float],
          label: str) -> dict[str, Any]:
    """One warm-up pair, then ``rounds`` pairs; medians of times and of the ratios a/b."""
    ta, tb = [], []
    for i in range(rounds + 1):
        x, y = a(), b()
        print(f"  {label} {'warm-up' if not i else f'round {i}'}: {x * 1e3:8.1f} ms vs "
              f"{y * 1e3:8.1f} ms, ratio {x / y:.2f}", file=sys.stderr)
        if i:
            ta.append(x)
            tb.append(y)
    return {"a_seconds": statistics.median(ta), "b_seconds": statistics.median(tb),
            "ratio": statistics.median(x / y for x, y in zip(ta, tb, strict=True)),
            "ratios": [round(x / y, 3) for x, y in zip(ta, tb, strict=True)]}


def limits(data: bytes, levels: list[int], rounds: int) -> dict[str, float]:
    """MB/s of sha256 and of the frame encoder alone (one thread, and the default workers)."""
    import hashlib

    def speed(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return len(data) / statistics.median(times) / MB

    def encode(level: int, threads: int) -> None:
        encoder = seekable.FrameEncoder(lambda b: None, level, seekable.FRAME_SIZE, threads)
        encoder.write(data)
        encoder.finish()

    out = {"sha256": speed(lambda: hashlib.sha256(data).digest())}
    for level in levels:
        for threads in sorted({0, Policy().threads}):
            out[f"zstd-{level}-t{threads}"] = speed(lambda lv=level, th=threads: encode(lv, th))
    return out


def ingest_case(kind: str, data: bytes, level: int, rounds: int, base: str) -> dict[str, Any]:
    """``never`` (A) against ``auto`` (B, compressed after the acknowledgement) and ``auto``
    compressing inline (C), in rounds A B C. B's time is the ingest call, what a client's
    push waits for; its *settled* time also includes the background compression, which is
    waited for before the next ingest starts, so no round pays for another's work."""
    stored: dict[str, int] = {}
    settled: list[float] = []

    def run(policy: Policy, name: str) -> Callable[[], float]:
        def once() -> float:
            url = "memory://" if kind == "memory" else tempfile.mkdtemp(dir=base)
            with Engine.open(url, compression=policy) as engine:
                t0 = time.perf_counter()
                engine.ingest(data)
                dt = time.perf_counter() - t0
                engine.wait_compacted()
                if name == "auto":
                    settled.append(time.perf_counter() - t0)
                stored[name] = next(iter(engine.list())).stored_size
            if kind != "memory":
                shutil.rmtree(url)
            return dt
        return once

    never = run(Policy("never"), "never")
    auto = run(Policy("auto", level), "auto")
    inline = run(Policy("auto", level, defer=False), "inline")
    ta, tb, tc = [], [], []
    for i in range(rounds + 1):
        x, y, z = never(), auto(), inline()
        print(f"  {kind} level {level} {'warm-up' if not i else f'round {i}'}: never "
              f"{x * 1e3:7.1f} ms, auto {y * 1e3:7.1f} ms (settled {settled[-1] * 1e3:7.1f}), "
              f"inline {z * 1e3:7.1f} ms", file=sys.stderr)
        if i:
            ta.append(x)
            tb.append(y)
            tc.append(z)
        else:
            settled.clear()

    def ratio(b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(ta, b, strict=True))

    out: dict[str, Any] = {
        "case": kind, "level": level, "threads": Policy().threads, "bytes": len(data),
        "a_seconds": statistics.median(ta), "b_seconds": statistics.median(tb),
        "ratio": ratio(tb), "ratios": [round(x / y, 3) for x, y in zip(ta, tb, strict=True)],
        "settled_ratio": ratio(settled), "inline_ratio": ratio(tc),
        "stored_ratio": stored["auto"] / len(data),
        "inline_stored_ratio": stored["inline"] / len(data),
        "never_MBps": len(data) / statistics.median(ta) / MB,
        "auto_MBps": len(data) / statistics.median(tb) / MB,
        "settled_MBps": len(data) / statistics.median(settled) / MB,
        "inline_MBps": len(data) / statistics.median(tc) / MB,
        "target": TARGET_INGEST}
    out["meets_target"] = out["ratio"] >= TARGET_INGEST
    return out


def range_case(size: int, level: int, rounds: int, base: str, kind: str) -> dict[str, Any]:
    data = make_data(kind, size)
    start = size // 2 - 300_000  # across the boundary of two 4 MiB frames
    want = data[start:start + MIB]
    roots = {}
    for mode in ("never", "always"):
        roots[mode] = tempfile.mkdtemp(dir=base)
        with Engine.open(roots[mode], compression=Policy(mode, level)) as engine:
            digest = str(engine.ingest(data).digest)
    del data
    decoded: list[int] = []
    frames: dict[str, int] = {}
    real = seekable.decode_frame

    def counted(*args: Any) -> bytes:
        out = real(*args)
        decoded.append(len(out))
        return out

    seekable.decode_frame = counted
    engines = {mode: Engine.open(root) for mode, root in roots.items()}
    try:
        def read(mode: str, cold: bool) -> Callable[[], float]:
            def once() -> float:
                engine = engines[mode]
                if cold:  # a fresh engine on the same store: the table is read again
                    engine = Engine(engine.backend, engine.index)
                decoded.clear()
                t0 = time.perf_counter()
                got = b"".join(engine.read(digest, start, MIB))
                dt = time.perf_counter() - t0
                if got != want:
                    raise SystemExit(f"range read of {mode} returned wrong bytes")
                frames[mode] = len(decoded)
                return dt
            return once

        out = {"case": "range", "bytes": size, "level": level,
               "stored_ratio": engines["always"].stat(digest).stored_size / size}
        for cold in (True, False):
            name = "cold" if cold else "warm"
            out[name] = pairs(rounds, read("never", cold), read("always", cold), f"range {name}")
            out[name]["frames"] = frames["always"]
        out["frames"] = max(out["cold"]["frames"], out["warm"]["frames"])
        out["meets_target"] = out["frames"] <= TARGET_FRAMES
        return out
    finally:
        seekable.decode_frame = real
        for engine in engines.values():
            engine.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=parse_size, default=parse_size("256M"))
    p.add_argument("--big", type=parse_size, default=parse_size("1G"))
    p.add_argument("--levels", default="1,2,3")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None)
    p.add_argument("--cases", default="memory,local,range")
    p.add_argument("--data", default="text", help="text, or tar:DIR")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    cases = args.cases.split(",")
    base = tempfile.mkdtemp(prefix="casengine-zstd-bench-", dir=args.dir)
    results = []
    try:
        data = make_data(args.data, args.size)
        results.append({"case": "limits", **limits(data, levels, args.rounds)})
        for kind in ("memory", "local"):
            if kind in cases:
                results += [ingest_case(kind, data, lvl, args.rounds, base) for lvl in levels]
        del data
        if "range" in cases:
            results.append(range_case(args.big, Policy().level, args.rounds, base, args.data))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        if r["case"] == "limits":
            print("limits  " + ", ".join(f"{k} {v:.0f} MB/s" for k, v in r.items() if k != "case"))
        elif r["case"] == "range":
            print(f"range   1 MiB in the middle of {human(r['bytes'])} (level {r['level']}, "
                  f"stored {r['stored_ratio']:.2f}x): {r['frames']} frames decompressed "
                  f"(target <= {TARGET_FRAMES}); time zst vs raw: cold table "
                  f"{r['cold']['b_seconds'] * 1e3:.1f} vs {r['cold']['a_seconds'] * 1e3:.1f} ms"
                  f" (ratio {r['cold']['ratio']:.2f}), warm "
                  f"{r['warm']['b_seconds'] * 1e3:.1f} vs {r['warm']['a_seconds'] * 1e3:.1f} ms"
                  f" (ratio {r['warm']['ratio']:.2f})")
        else:
            print(f"{r['case']:<7} ingest {human(r['bytes'])} level {r['level']}: auto "
                  f"{r['auto_MBps']:6.0f} MB/s vs never {r['never_MBps']:6.0f} MB/s, ratio "
                  f"{r['ratio']:.2f} (target >= {TARGET_INGEST}: "
                  f"{'met' if r['meets_target'] else 'MISSED'}), stored {r['stored_ratio']:.2f}x"
                  f"; until stored compressed {r['settled_MBps']:6.0f} MB/s "
                  f"(ratio {r['settled_ratio']:.2f}); compressing inline "
                  f"{r['inline_MBps']:6.0f} MB/s (ratio {r['inline_ratio']:.2f}, stored "
                  f"{r['inline_stored_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
