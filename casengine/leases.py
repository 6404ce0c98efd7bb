"""Leases: a record in the index that says "this process is working on it".

A lease names its holder by host and pid. Everything that shares an LMDB index runs on one
host, so a lease whose process is gone is known to be dead at once and may be taken over;
a lease older than :data:`LEASE_MAX` is stale whatever its pid says, since pids are reused.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

#: A lease older than this is stale even if its pid is alive.
LEASE_MAX = 3600.0
_HOST = socket.gethostname()


def new_lease() -> dict:
    return {"pid": os.getpid(), "host": _HOST, "token": secrets.token_hex(8), "since": time.time()}


def is_live(lease: dict | None, now: float | None = None) -> bool:
    if not lease or (now or time.time()) - lease["since"] > LEASE_MAX:
        return False
    if lease["host"] != _HOST or lease["pid"] == os.getpid():
        return True
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
