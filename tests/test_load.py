"""The load test, short: 8 clients push and pull for a few seconds against ``casengine serve
--workers 2``, with zero errors and zero digest mismatches, and a store that checks clean;
then the same against a backend failing 5 % of its calls, throttling included, where
the clients retry the 503s they get and still see no error. ``tools/loadtest.py`` is the
full 60-second run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "tools"))
import loadtest


def _assert_clean_run(result: dict) -> None:
    assert result["errors"] == 0, result["samples"]
    assert result["digest_mismatches"] == 0, result["samples"]
    assert result["check"]["unexpected"] == [], result["check"]
    assert result["ok"]
    routes = result["routes"]
    for route in ("blob HEAD", "blob push (monolithic)", "manifest PUT", "manifest GET",
                  "blob GET"):
        assert routes[route]["requests"] > 0, (route, routes)
    assert result["pushes"] > 10 and result["pulls"] > 5, result


@pytest.mark.timeout(120)
def test_short_load_has_no_errors_and_no_mismatches() -> None:
    result = loadtest.run(duration=4, clients=8, seed=3)
    _assert_clean_run(result)
    assert result["retried_503"] == 0
    assert result["routes"].get("upload commit", {}).get("requests", 0) > 0, result["routes"]


@pytest.mark.timeout(120)
def test_short_load_over_five_percent_backend_faults(tmp_path: Path) -> None:
    root = f"faulty+file://{tmp_path}/root?rate=0.05&seed=9"
    result = loadtest.run(duration=4, clients=8, seed=4, root=root)
    _assert_clean_run(result)
    assert result["retried_503"] > 0, "no fault reached a client: nothing was tested"
