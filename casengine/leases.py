"""Leases: a record in the index that says "this process is working on it".

A lease names its holder by host, pid and (where ``/proc`` tells it) the process's start
time. Everything that shares an LMDB index runs on one host, so a lease whose process is
gone is known to be dead at once and may be taken over. Gone includes a process that was
killed but not yet reaped (a zombie: a container's init that reaps nothing keeps killed
server workers so for good) and a new process that got the dead one's pid. A lease older
than :data:`LEASE_MAX` is stale whatever its pid says.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

#: A lease older than this is stale even if its pid is alive.
LEASE_MAX = 3600.0
_HOST = socket.gethostname()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """The state letter and start time (clock ticks since boot) of ``pid`` from
    ``/proc/<pid>/stat``; ("", "") if there is no such process, None without ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ("", "") if os.path.isdir("/proc/self") else None
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it
    fields = stat[stat.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


#: this process's pid and start time, looked up again in a child forked after it was read
_own = (0, "")


def new_lease() -> dict:
    global _own
    pid = os.getpid()
    if _own[0] != pid:
        _own = (pid, (_proc_stat(pid) or ("", ""))[1])
    lease = {"pid": pid, "host": _HOST, "token": secrets.token_hex(8), "since": time.time()}
    if _own[1]:
        lease["start"] = _own[1]
    return lease


def is_live(lease: dict | None, now: float | None = None) -> bool:
    if not lease or (now or time.time()) - lease["since"] > LEASE_MAX:
        return False
    if lease["host"] != _HOST or lease["pid"] == os.getpid():
        return True
    stat = _proc_stat(lease["pid"])
    if stat is not None:
        state, start = stat
        # gone, killed and unreaped, or another process under a reused pid
        return state not in ("", "Z", "X") and lease.get("start", start) == start
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
