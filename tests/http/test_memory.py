"""Invariant I6 over HTTP: a 256 MiB blob streams in and out of the server while its peak
resident memory (VmHWM) grows by well under the blob's size."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.http.conftest import MIB, Server, start_server

SIZE = 256 * MIB
BLOCK = MIB
LIMIT = 100 * MIB


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[Server]:
    """A server of its own, so no other test's requests raise its peak first."""
    s = start_server(str(tmp_path_factory.mktemp("memory") / "root"), log_dir)
    yield s
    s.stop()


def _peak_growth_so_far(server: Server, baseline: int) -> int:
    return server.rss_peak() - baseline


def _baseline(server: Server) -> int:
    server.reset_rss_peak()  # where allowed; otherwise the peak so far is the baseline
    return server.rss_peak()


@pytest.mark.slow
def test_256_mib_in_and_out(fresh_server: Server) -> None:
    repo = "memory/big"
    block = os.urandom(BLOCK)
    hasher = hashlib.sha256()
    for _ in range(SIZE // BLOCK):
        hasher.update(block)
    digest = f"sha256:{hasher.hexdigest()}"

    with httpx.Client(base_url=fresh_server.url, timeout=120) as c:
        # warm up: imports, thread pools and buffers that any request needs
        small = os.urandom(3 * MIB)
        warm = f"sha256:{hashlib.sha256(small).hexdigest()}"
        assert c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": warm},
                      content=small).status_code == 201
        assert c.get(f"/v2/{repo}/blobs/{warm}").content == small

        baseline = _baseline(fresh_server)
        r = c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest},
                   content=(block for _ in range(SIZE // BLOCK)),
                   headers={"Content-Length": str(SIZE)})
        assert r.status_code == 201, r.text
        growth_in = _peak_growth_so_far(fresh_server, baseline)
        assert growth_in < LIMIT, f"ingest of 256 MiB raised the peak RSS by {growth_in >> 20} MiB"

        baseline = _baseline(fresh_server)
        got = hashlib.sha256()
        n = 0
        with c.stream("GET", f"/v2/{repo}/blobs/{digest}") as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(SIZE)
            for chunk in r.iter_raw(BLOCK):
                got.update(chunk)
                n += len(chunk)
        assert n == SIZE and f"sha256:{got.hexdigest()}" == digest
        growth_out = _peak_growth_so_far(fresh_server, baseline)
        assert growth_out < LIMIT, f"sending 256 MiB raised the peak RSS by {growth_out >> 20} MiB"


_FREED = """
import os, sys
from casengine.http.server import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
bufs = [bytearray(os.urandom(1 << 20)) for _ in range(16)]  # request-body-sized buffers
before = rss()
del bufs
print(applied, before - rss())
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_the_server_keeps_freed_body_buffers_for_reuse() -> None:
    """glibc would hand each freed MiB buffer back to the kernel (to fault it in again for
    the next request); a server process keeps them."""
    def run(mode: str) -> tuple[str, int]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", _FREED, mode], check=True, env=env,
                             capture_output=True, text=True).stdout.split()
        return out[0], int(out[1])

    applied, kept_dropped = run("keep")
    if applied != "True":
        pytest.skip("not glibc: nothing to tune")
    _, default_dropped = run("default")
    assert default_dropped >= 8 * MIB  # the control: glibc's default gives them back
    assert kept_dropped < 2 * MIB
