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
