"""Leases die with their process: also when it is killed and left unreaped (a zombie), and
when another process gets its pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from casengine import leases
from casengine.leases import is_live, new_lease

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")

HOLDER = "import json, time; from casengine.leases import new_lease; " \
         "print(json.dumps(new_lease()), flush=True); time.sleep(120)"


def _holder() -> tuple[subprocess.Popen[bytes], dict]:
    """A process that takes a lease and keeps running; its lease."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def _state(pid: int) -> str:
    stat = leases._proc_stat(pid)
    assert stat is not None
    return stat[0]


def test_the_lease_of_a_killed_unreaped_process_is_dead() -> None:
    p, lease = _holder()
    try:
        assert lease["pid"] == p.pid and lease["start"]
        assert is_live(lease)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _state(p.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(p.pid) == "Z"  # not waited for: a zombie, as under an init that never reaps
        assert not is_live(lease)
    finally:
        p.kill()
        p.wait()
    assert not is_live(lease)  # reaped: gone


def test_a_reused_pid_does_not_keep_a_dead_lease_alive() -> None:
    p, lease = _holder()
    try:
        # the lease of an earlier process that had this pid: another start time
        assert not is_live({**lease, "start": str(int(lease["start"]) - 1)})
        assert is_live({k: v for k, v in lease.items() if k != "start"})  # an older lease
    finally:
        p.kill()
        p.wait()


def test_a_forked_child_leases_with_its_own_start_time() -> None:
    parent = new_lease()  # reads this process's start time first
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            time.sleep(0.05)  # a tick or more after the fork
            os.write(w, json.dumps(new_lease()).encode())
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    try:
        child = json.loads(os.read(r, 4096))
        assert child["pid"] == pid and child["start"] == leases._proc_stat(pid)[1]
        assert child["start"] != parent["start"] and is_live(child)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
