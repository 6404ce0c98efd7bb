"""Helpers for the authentication tests: a ``casengine serve --auth FILE`` subprocess,
hand-made tokens, OCI error checks, a tiny OCI image layout, and the real clients.

Plain functions and classes only: fixtures live in the test modules.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from casengine.credentials import Credentials, Grant
from casengine.engine import Engine
from casengine.registry import Registry
from tests.clients import require_module, require_tool  # noqa: F401 - re-exported
from tests.helpers import ServeProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# -- digests, tokens, errors ----------------------------------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(key: bytes, claims: dict[str, Any]) -> str:
    """A token in the server's format (casengine/http/auth.py): ``b64url(claims JSON)`` ``.``
    ``b64url(HMAC-SHA256(key, that payload))``."""
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = b64url(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def token_claims(token: str) -> dict[str, Any]:
    return json.loads(unb64url(token.partition(".")[0]))


def error_code(response: httpx.Response) -> str:
    """The code of the OCI error body ``{"errors": [{"code": ..., "message": ...}]}``."""
    assert response.headers.get("content-type", "").startswith("application/json"), \
        response.headers
    doc = response.json()
    assert isinstance(doc.get("errors"), list) and doc["errors"], doc
    assert {"code", "message"} <= set(doc["errors"][0]), doc
    return doc["errors"][0]["code"]


def parse_challenge(header: str) -> dict[str, str]:
    """``Bearer realm="..",service="..",scope=".."`` -> {realm, service, scope, ...}."""
    scheme, _, rest = header.partition(" ")
    assert scheme == "Bearer", header
    out: dict[str, str] = {}
    while rest:
        name, _, rest = rest.partition("=")
        assert rest.startswith('"'), header
        value, _, rest = rest[1:].partition('"')
        out[name.strip()] = value
        rest = rest.lstrip(",").strip()
    return out


# -- the server -------------------------------------------------------------------------------


def clean_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASENGINE_")}
    env["CASENGINE_ROOT"] = str(root)
    return env


@dataclass(kw_only=True)
class AuthServer(ServeProcess):
    """``casengine serve --host 127.0.0.1 --port <free> --auth FILE`` over ``root``."""

    auth_file: Path
    secrets: dict[str, str] = field(default_factory=dict)
    # with auth on, /v2/ answers 401 to a request without credentials
    ready_status: ClassVar[int] = 401

    @property
    def key(self) -> bytes:
        """The server's token signing key (``<auth file>.key``, 64 hex digits)."""
        return bytes.fromhex(Path(f"{self.auth_file}.key").read_text().strip())

    def secret_id(self, user: str) -> str:
        """The fingerprint of ``user``'s stored secret that the server's tokens carry as
        ``sid``: ``b64url(HMAC-SHA256(key, stored hash)[:12])``."""
        stored = Credentials.load(str(self.auth_file)).users[user].secret_hash
        return b64url(hmac.new(self.key, stored.encode(), hashlib.sha256).digest()[:12])

    def add_users(self, users: dict[str, list[str]], anonymous: list[str]) -> None:
        creds = Credentials.load(str(self.auth_file), missing_ok=True)
        for name, grants in users.items():
            self.secrets[name] = creds.add(name, [Grant.parse(g) for g in grants])
        creds.anonymous.extend(Grant.parse(g) for g in anonymous)
        creds.save()

    def serve_args(self) -> list[str]:
        return ["--auth", str(self.auth_file), *self.args]

    def client(self, user: str | None = None, *, secret: str | None = None) -> httpx.Client:
        """An httpx client with HTTP Basic for ``user`` (anonymous for None)."""
        auth = None if user is None else (user, secret if secret is not None
                                          else self.secrets[user])
        return httpx.Client(base_url=self.url, auth=auth, timeout=30)

    def token(self, user: str | None, *scopes: str, secret: str | None = None) -> str:
        """A token from ``/token`` for ``scopes`` (``repository:NAME:ACTIONS``)."""
        with self.client(user, secret=secret) as c:
            r = c.get("/token", params=[("service", "casengine"),
                                        *(("scope", s) for s in scopes)])
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["token"] == doc["access_token"]
        return doc["token"]

    @contextmanager
    def registry(self) -> Iterator[Registry]:
        """The server's store, opened beside it (several processes may share a root)."""
        with Engine.open(str(self.root)) as engine:
            yield Registry(engine)

    def repositories(self) -> set[str]:
        with self.registry() as reg:
            return set(reg.repositories())

    def exists(self, repo: str) -> bool:
        with self.registry() as reg:
            return reg.repository_exists(repo)

    def linked(self, repo: str, digest: str) -> bool:
        with self.registry() as reg:
            return reg.repository_exists(repo) and reg.is_linked(repo, digest)

    def stored(self, digest: str) -> bool:
        with self.registry() as reg:
            return reg.engine.exists(digest)

    def open_uploads(self) -> int:
        with self.registry() as reg:
            return sum(1 for _ in reg.engine.uploads.list())


class Bearer(httpx.Auth):
    """``Authorization: Bearer TOKEN`` on every request."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


# -- pushing and pulling over plain HTTP ----------------------------------------------------


def push_blob(c: httpx.Client, repo: str, data: bytes, **kw: Any) -> httpx.Response:
    """A monolithic push: ``POST /v2/<repo>/blobs/uploads/?digest=`` with the body."""
    return c.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)}, content=data,
                  headers={"Content-Type": "application/octet-stream"}, **kw)


def image(label: str) -> tuple[bytes, bytes, bytes]:
    """A config blob, a layer blob and an OCI manifest referring to both, unique per label."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "label": label,
                         "nonce": os.urandom(8).hex()}).encode()
    layer = os.urandom(1000) + label.encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    return config, layer, manifest


def push_image(c: httpx.Client, repo: str, tag: str, label: str) -> tuple[bytes, bytes, bytes]:
    """Push :func:`image` (both blobs, then the manifest under ``tag``); assert each step."""
    config, layer, manifest = image(label)
    for blob in (config, layer):
        r = push_blob(c, repo, blob)
        assert r.status_code == 201, r.text
    r = c.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
              headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return config, layer, manifest


# -- a small OCI image layout, the format skopeo's oci: transport reads -----------------------


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_layout(root: Path, tag: str = "v1") -> dict[str, Any]:
    """An OCI layout at ``root``: a config, one gzip tar layer (random content, so no client
    cache remembers it) and a manifest tagged ``tag``. Returns the descriptors."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes, media_type: str) -> dict[str, Any]:
        digest = sha256(data)
        (blobs / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = os.urandom(2048)
        info = tarfile.TarInfo("data/random.bin")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tar.addfile(info, io.BytesIO(content))
    tar_data = buf.getvalue()
    layer = put(gzip.compress(tar_data, mtime=0), LAYER_GZIP)
    config = put(canonical({"architecture": "amd64", "os": "linux",
                            "rootfs": {"type": "layers", "diff_ids": [sha256(tar_data)]},
                            "config": {}}), OCI_CONFIG)
    manifest = put(canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                              "layers": [layer]}), OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**manifest, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (root / "index.json").write_bytes(canonical(index))
    return {"manifest": manifest, "config": config, "layer": layer}


# -- skopeo in a private environment ------------------------------------------------------------

_CACHE_DIR = "/var/lib/containers/cache"
_ISOLATE = (f"mkdir -p {_CACHE_DIR} && mount -t tmpfs -o size=16m tmpfs {_CACHE_DIR}"
            ' && exec "$0" "$@"')


def skopeo_prefix() -> list[str]:
    """As root, a private mount namespace with a tmpfs over skopeo's blob-info cache (so no
    other skopeo's cache leaks in, nor ours out); [] where not root or not possible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _ISOLATE]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30, check=False)
    return prefix if probe.returncode == 0 else []


@dataclass
class Skopeo:
    exe: str
    home: Path
    prefix: list[str]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("XDG_", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG"))}
        for name, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "home/.config"),
                          ("XDG_DATA_HOME", "home/.local/share"), ("XDG_CACHE_HOME", "cache"),
                          ("XDG_RUNTIME_DIR", "run"), ("TMPDIR", "tmp")):
            path = self.home / sub
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            env[name] = str(path)
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        registries_d = self.home / "registries.d"
        registries_d.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, self.exe, "--insecure-policy", "--registries.d", str(registries_d),
               *args]
        return subprocess.run(cmd, env=self.env(), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)
