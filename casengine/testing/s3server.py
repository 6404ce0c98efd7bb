"""A real S3 HTTP endpoint for tests and benchmarks: moto's server in a subprocess.

    with moto_server() as endpoint:      # "http://127.0.0.1:PORT"
        backend = open_backend("s3://bucket/prefix", endpoint_url=endpoint, key="k", secret="s")

The server runs in its own process, so a benchmark's client threads don't share a GIL with
it. It binds 127.0.0.1 on a free port, and :func:`moto_server` waits until it answers before
handing out the URL. Its state lives in that process only, and ends with it.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Self

from casengine.errors import CASError

HOST = "127.0.0.1"
#: Credentials moto accepts (it accepts any); tests pass them so no real ones are looked up.
DUMMY_CREDENTIALS = {"key": "testing", "secret": "testing"}


class ServerError(CASError, RuntimeError):
    """The S3 test endpoint did not start."""


def free_port(host: str = HOST) -> int:
    """A port nobody listens on right now (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, whatever it said
    except OSError:
        return False


class MotoServer:
    """``python -m moto.server`` bound to 127.0.0.1; :meth:`start` blocks until it answers."""

    def __init__(self, port: int | None = None, *, startup_timeout: float = 30.0) -> None:
        self.port = port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def endpoint(self) -> str:
        if self._proc is None or self.port is None:
            raise ServerError("the S3 test server is not running")
        return f"http://{HOST}:{self.port}"

    def start(self) -> str:
        fixed = self.port is not None
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            if self._try_start():
                return self.endpoint
        raise ServerError(f"moto's server did not start on {HOST}:{self.port} (exit status "
                          f"{self.returncode}; is moto[server] installed?)")

    def _try_start(self) -> bool:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://{HOST}:{self.port}"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:  # died: most likely the port was taken
                self.returncode, self._proc = self._proc.returncode, None
                return False
            if _answers(url):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[str]:
    """Run moto's S3 server for the duration of the block; yields its endpoint URL."""
    with MotoServer(port) as server:
        yield server.endpoint
