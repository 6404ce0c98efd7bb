"""The benchmark scripts run end to end at a small size (their figures are not checked
here: timing belongs to the benchmarks themselves)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_upload_benchmark_runs_and_reports_every_column(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "uploads.py"), "--size", "16M",
         "--rounds", "1", "--warmup", "0", "--cases", "local-8m,local-1m", "--json",
         "--dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [r["case"] for r in report["results"]] == ["local-8m", "local-1m"]
    for r in report["results"]:
        assert r["bytes"] == 16 << 20 and len(r["ratios"]) == 1
        # the disk reference ran in the same round, and the commit read nothing back
        assert r["disk_ratio"] > 0 and r["engine_vs_disk"] > 0 and r["commit_ms"] >= 0
    assert list(tmp_path.iterdir()) == []  # the scratch space is removed


def test_a_missed_upload_target_says_how_near_the_bare_disk_it_had_to_come() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import uploads as bench  # the script, imported for its report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # sha256 1.0 s, the upload 2.5 s (0.40 of sha256), the disk alone 1.6 s (0.625)
    missed = bench.Result("local-1m", "upload in 1 MiB appends -> local", 1 << 30, 1 << 20,
                          0.50, [1.0], [2.5], [0.002], [1.6])
    met = bench.Result("local-8m", "upload in 8 MiB appends -> local", 1 << 30, 8 << 20,
                       0.80, [1.0], [1.2], [0.002], [1.0])
    info = {"python": "3", "openssl": "OpenSSL"}
    report = bench.table([met, missed], info, 1 << 30, 5, 1)
    assert "local-1m: the disk alone ran at 0.62 of sha256; meeting 0.50 needed B/D >= 0.80" \
        in report
    assert "local-8m: the disk" not in report
    assert missed.as_dict()["needed_vs_disk"] == 0.8
