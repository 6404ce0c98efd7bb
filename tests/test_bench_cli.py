"""``casengine bench``, run as a real subprocess on memory:// and on a local root.

The bench must print every figure next to its limit with a ratio, and leave nothing behind:
no blob, no upload staging, no temp file, no private index, and the root's own index and
blobs exactly as they were.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casengine.bench import FIGURES, LIMITS
from casengine.engine import Engine

#: The console script, with ``bench`` registered here if the CLI does not register it yet.
PROGRAM = (
    "from casengine.cli import cli, main\n"
    "from casengine.cli.bench import bench\n"
    "if 'bench' not in cli.commands:\n"
    "    cli.add_command(bench)\n"
    "main()\n"
)
SIZES = "64k,1M"


def command(root: str, *args: str) -> list[str]:
    return [sys.executable, "-c", PROGRAM, "--root", root, "bench", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}


def run_bench(root: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, *args), cwd=cwd, env=clean_env(), capture_output=True,
                          timeout=120, check=False)


def ok_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr == b""  # no progress bar when stderr is not a terminal
    return json.loads(proc.stdout)


def leaves(obj: object, path: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{path}/{i}")
    else:
        yield path, obj


def check_report(report: dict, sizes: list[int]) -> None:
    ratios = [(p, v) for p, v in leaves(report) if "ratio" in p]
    assert len(ratios) == len(sizes) * (len(FIGURES) + 2)  # + ingest, upload vs write
    for path, value in ratios:  # every field named for a ratio is a positive number
        assert type(value) in (int, float) and value > 0, (path, value)
    assert report["sizes"] == sizes
    assert {(x["name"], x["size"]) for x in report["limits"]} == {
        (name, size) for name in LIMITS for size in sizes}
    assert {(f["name"], f["size"]) for f in report["figures"]} == {
        (name, size) for name in FIGURES for size in sizes}
    for x in report["limits"]:
        assert isinstance(x["mbps"], float) and x["mbps"] > 0, x
    for f in report["figures"]:
        assert f["limit"] == FIGURES[f["name"]][1]
        for key in ("mbps", "limit_mbps", "ratio"):
            assert isinstance(f[key], float) and f[key] > 0, (key, f)
        assert f["reps"] >= 3  # pairs of limit and figure
        if f["name"] in ("ingest", "upload-8m"):
            assert f["ratio_vs_backend_write"] > 0
        else:
            assert "ratio_vs_backend_write" not in f  # never null: every ratio is a number


def tree(root: Path) -> set[str]:
    """Every file and directory under ``root``, but the index's own files."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.parent.name != ".index"}


def assert_nothing_left(root: Path, before: set[str]) -> None:
    """The root is as it was (``before``: its tree), plus at most a small index."""
    big = [(str(p), p.stat().st_size) for p in root.rglob("*")
           if p.is_file() and p.stat().st_size > 100 << 10]
    assert big == []
    assert tree(root) == before  # no blob, no staging, no temp, no private index, no new dir
    with Engine.open(str(root)) as engine:
        assert not [k for k in engine.backend.list("blobs/") if k not in before]
        assert list(engine.backend.list("uploads/")) == []
        assert list(engine.uploads.list()) == []


def test_json_on_memory(tmp_path: Path) -> None:
    report = ok_json(run_bench("memory://", "--sizes", SIZES, "--json", cwd=tmp_path))
    check_report(report, [64 << 10, 1 << 20])
    assert report["backend"] == "MemoryBackend"
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory


def test_run_leaves_memory_empty() -> None:
    """In process, where memory:// can be looked into afterwards."""
    from casengine.bench import run

    with Engine.open("memory://") as engine:
        report = run(engine, [9 << 20])  # two appends: parts of the generic appender
        assert len(report.figures) == len(FIGURES)
        assert list(engine.backend.list("")) == []
        assert engine.index.count_blobs() == 0


def test_json_on_local_root_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with Engine.open(str(root)) as engine:  # a blob of the root's own, which must stay
        mine = engine.ingest(b"the user's own blob")
    before = tree(root)
    report = ok_json(run_bench(str(root), "--sizes", SIZES, "--json", cwd=tmp_path))
    check_report(report, [64 << 10, 1 << 20])
    assert report["backend"] == "LocalBackend"
    assert_nothing_left(root, before)
    with Engine.open(str(root)) as engine:
        assert engine.read_bytes(mine.digest) == b"the user's own blob"
        assert engine.index.count_blobs() == 1


def test_fresh_local_root_keeps_only_its_index(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    proc = run_bench(str(root), "--sizes", "64k", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert_nothing_left(root, {".index", ".tmp"})
    out = proc.stdout.decode()
    for name in (*LIMITS, *FIGURES):
        assert name in out
    assert "ratio" in out and "limit MB/s" in out


def test_sigterm_cleans_up(tmp_path: Path) -> None:
    """``timeout`` sends SIGTERM: the bench stops like on Ctrl-C and removes what it wrote."""
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.Popen(command(str(root), "--sizes", "16M", "--json"), cwd=tmp_path,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        # the raw-limit object, the private index and the first ingested blob are there
        while not (root / "blobs").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert any(p.name.startswith(".casengine-bench-index-") for p in root.iterdir())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode() == "casengine: interrupted\n" and out == b""
    assert_nothing_left(root, {".index", ".tmp"})


@pytest.mark.parametrize("sizes", ["0", "abc", "1M,,2M"])
def test_bad_sizes(tmp_path: Path, sizes: str) -> None:
    proc = run_bench("memory://", "--sizes", sizes, cwd=tmp_path)
    assert proc.returncode == 2
    assert b"--sizes" in proc.stderr


def test_plot_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "root"
    hidden = "import sys\nsys.modules['matplotlib'] = None  # as if not installed\n" + PROGRAM
    proc = subprocess.run([sys.executable, "-c", hidden, "--root", str(root), "bench",
                           "--sizes", "64k", "--plot", str(tmp_path / "p.png")],
                          capture_output=True, env=clean_env(), cwd=tmp_path, timeout=120,
                          check=False)
    assert proc.returncode == 8 and proc.stdout == b""
    assert proc.stderr.decode() == ("casengine: error: --plot needs matplotlib: "
                                    "pip install matplotlib\n")
    assert not root.exists() and not (tmp_path / "p.png").exists()  # refused before any work


def test_plot(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    ok_json(run_bench("memory://", "--sizes", SIZES, "--json", "--plot", str(png),
                      cwd=tmp_path))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
