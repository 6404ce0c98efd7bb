"""The coverage-guided harnesses in fuzz/ run for a few seconds each in CI.

Each run starts from the seeds in fuzz/corpus/, which hold every input that once crashed a
parser, so the run replays those first. A harness exits non-zero and leaves a crash file
when a parser raises anything outside the project's errors; the test then fails with
libFuzzer's report. Longer runs are for
developers: ``python3 fuzz/fuzz_parsers.py -max_total_time=600``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clients import require_module

ROOT = Path(__file__).resolve().parents[2]
HARNESSES = sorted((ROOT / "fuzz").glob("fuzz_*.py"))
SECONDS = int(os.environ.get("CASENGINE_FUZZ_SECONDS", "6"))


def test_there_are_harnesses() -> None:
    assert HARNESSES, "fuzz/ holds no fuzz_*.py harness"


@pytest.mark.parametrize("harness", HARNESSES, ids=lambda p: p.stem)
def test_harness_runs_clean(harness: Path, tmp_path: Path) -> None:
    require_module("atheris")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    found = tmp_path / "corpus"  # libFuzzer adds what it finds to the first folder
    found.mkdir()
    seeds = ROOT / "fuzz" / "corpus"
    run = subprocess.run(
        [sys.executable, str(harness), str(found), str(seeds), f"-max_total_time={SECONDS}",
         "-rss_limit_mb=1024", "-timeout=10",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=SECONDS + 120)
    report = run.stdout[-3000:] + run.stderr[-6000:]
    crashes = [p.name for p in tmp_path.iterdir() if p != found]
    assert run.returncode == 0 and not crashes, f"{harness.name} found a crash {crashes}:\n{report}"
    assert "Done" in run.stderr, report
