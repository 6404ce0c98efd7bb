"""Fixtures for the interop tests: a real ``casengine serve`` on 127.0.0.1, real clients.

- :func:`require_tool` / :func:`require_module` find a client. On a developer's machine a
  missing client skips its tests with the reason; under ``CI=true`` it fails them, naming
  the client and how to install it (house rule: no silent skips in CI).
- ``server`` starts ``casengine serve --host 127.0.0.1 --port <free>`` on a fresh root
  in a subprocess, waits until ``/v2/`` answers, and stops it after the test. A test
  can read the server's ``/metrics`` and open the same root with :class:`Engine`.
- ``skopeo`` runs the skopeo binary with no trust policy, TLS verification off (the
  server speaks plain HTTP on loopback) and a private environment: its own HOME and
  XDG directories (auth files, and the blob-info cache of a non-root user), and, as
  root, the test's own directory bind-mounted over ``/var/lib/containers/cache`` in a
  private mount namespace (root's blob-info cache lives there, shared with every other
  skopeo on the host). The cache is private to the test but kept across its skopeo
  runs, as it is for a user: a second push then mounts blobs the first one pushed.
  Without isolation, the cache would remember blobs at ``127.0.0.1:<port>`` from an
  earlier test whose server reused the port, and skopeo would try to mount them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from casengine.engine import Engine
from tests.clients import require_module, require_tool  # noqa: F401 - re-exported
from tests.helpers import ServeProcess

# -- the server -----------------------------------------------------------------------------


_METRIC = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


@dataclass(kw_only=True)
class Server(ServeProcess):
    """A ``casengine serve`` subprocess on ``127.0.0.1:port`` over ``root``."""

    @contextmanager
    def engine(self) -> Iterator[Engine]:
        """The server's store, opened beside it (several processes may share a root)."""
        with Engine.open(str(self.root)) as engine:
            yield engine

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The server's ``/metrics`` as ``(name, labels) -> value``."""
        response = httpx.get(f"{self.url}/metrics", timeout=10)
        response.raise_for_status()
        out = {}
        for line in response.text.splitlines():
            m = _METRIC.match(line)
            if m is None:
                continue
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            out[(m["name"], labels)] = float(m["value"])
        return out

    def requests(self, route: str, method: str, status: int | None = None) -> int:
        """How many requests the server has answered on ``route`` with ``method``
        (and ``status``)."""
        total = 0
        for (name, labels), value in self.metrics().items():
            lab = dict(labels)
            if (name == "casengine_http_requests_total" and lab.get("route") == route
                    and lab.get("method") == method
                    and (status is None or lab.get("status") == str(status))):
                total += int(value)
        return total


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """A running ``casengine serve`` over a fresh local root; stopped after the test, which
    then fails if the server logged a traceback (every 5xx the adapter answers is logged).
    Parametrize it indirectly with a list of options to add to the command."""
    srv = Server(root=tmp_path / "root", log=tmp_path / "serve.log",
                 args=getattr(request, "param", []))
    with srv.running():
        yield srv


# -- skopeo -----------------------------------------------------------------------------------

_CACHE_DIR = "/var/lib/containers/cache"
#: The variable naming the directory to mount over root's blob-info cache directory.
_CACHE_ENV = "SKOPEO_TEST_BLOB_INFO_CACHE"
_ISOLATE = (f'mkdir -p {_CACHE_DIR} && mount --bind "${_CACHE_ENV}" {_CACHE_DIR}'
            ' && exec "$0" "$@"')


@pytest.fixture(scope="session")
def skopeo_isolation(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The command prefix that gives root's skopeo the blob-info cache directory named by
    ``$SKOPEO_TEST_BLOB_INFO_CACHE``, or [] where none is needed (not root: the XDG
    directories isolate it) or none is possible (then it warns)."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        warnings.warn("no unshare: skopeo runs with the host's blob-info cache", stacklevel=1)
        return []
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-c", _ISOLATE]
    probe_dir = tmp_path_factory.mktemp("cache-probe")
    probe = subprocess.run(
        [*prefix, "sh", "-c", f'touch {_CACHE_DIR}/probe && test -f "${_CACHE_ENV}/probe"'],
        env={**os.environ, _CACHE_ENV: str(probe_dir)}, capture_output=True, timeout=30,
        check=False)
    if probe.returncode != 0:
        warnings.warn("cannot give skopeo a private blob-info cache (unshare/mount: "
                      f"{probe.stderr.decode(errors='replace').strip()}); it uses the host's",
                      stacklevel=1)
        return []
    return prefix


class SkopeoFailed(AssertionError):
    def __init__(self, result: subprocess.CompletedProcess) -> None:
        self.result = result
        self.stderr = result.stderr.decode(errors="replace")
        super().__init__(f"{' '.join(result.args)} exited {result.returncode}:\n"
                         f"{self.stderr[-3000:]}")


@dataclass
class Skopeo:
    """skopeo with a private environment; every call fails the test on a non-zero exit
    unless ``check=False``."""

    exe: str
    home: Path
    prefix: list[str]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("XDG_", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG"))}
        for name, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "home/.config"),
                          ("XDG_DATA_HOME", "home/.local/share"), ("XDG_CACHE_HOME", "cache"),
                          ("XDG_RUNTIME_DIR", "run"), ("TMPDIR", "tmp"),
                          (_CACHE_ENV, "blob-info-cache")):
            path = self.home / sub
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            env[name] = str(path)
        return env

    def run(self, *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """``skopeo ARGS``; stdout and stderr as bytes."""
        registries_d = self.home / "registries.d"
        registries_d.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, self.exe, "--insecure-policy", "--registries.d", str(registries_d),
               *args]
        result = subprocess.run(cmd, env=self.env(), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise SkopeoFailed(result)
        return result

    def copy(self, source: str, dest: str, *options: str,
             preserve_digests: bool = True) -> subprocess.CompletedProcess:
        """``skopeo copy [--preserve-digests]`` over plain HTTP, anonymous."""
        preserve = ["--preserve-digests"] if preserve_digests else []
        return self.run("copy", *preserve, "--src-tls-verify=false", "--dest-tls-verify=false",
                        "--src-no-creds", "--dest-no-creds", *options, source, dest)

    def inspect(self, ref: str, *options: str, arch: str | None = None) -> dict[str, Any]:
        """``skopeo inspect``: of the image for ``arch`` (default: this machine's) when
        ``ref`` is an index."""
        return json.loads(self.inspect_raw(ref, *options, raw=False, arch=arch))

    def inspect_raw(self, ref: str, *options: str, raw: bool = True,
                    arch: str | None = None) -> bytes:
        """What ``skopeo inspect --raw`` prints: the exact bytes of the stored manifest."""
        first = ["--override-arch", arch] if arch else []
        flags = ["--raw"] if raw else []
        return self.run(*first, "inspect", *flags, "--tls-verify=false", "--no-creds",
                        *options, ref).stdout

    def list_tags(self, repository: str) -> list[str]:
        out = self.run("list-tags", "--tls-verify=false", "--no-creds", repository).stdout
        return json.loads(out)["Tags"]

    def delete(self, ref: str) -> None:
        self.run("delete", "--tls-verify=false", "--no-creds", ref)


@pytest.fixture
def skopeo(tmp_path: Path, request: pytest.FixtureRequest) -> Skopeo:
    """skopeo (see :class:`Skopeo`). Name it before ``server`` in a test's arguments, so
    that a missing skopeo skips the test before a server starts."""
    exe = require_tool("skopeo")
    return Skopeo(exe, tmp_path / "skopeo", request.getfixturevalue("skopeo_isolation"))
