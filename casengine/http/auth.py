"""Credentials and per-namespace access: HTTP Basic and the Docker token flow.

The flow ``docker login``, skopeo and oras follow:

1. A request without credentials gets ``401 UNAUTHORIZED`` with
   ``WWW-Authenticate: Bearer realm="<this server>/token",service="casengine",scope="repository:team/app:pull,push"``.
2. The client asks ``GET /token?service=casengine&scope=...`` with HTTP Basic credentials,
   or ``POST /token`` with an OAuth2 password grant (containerd). For each repository the
   scope names, the token carries every action the user's grants allow there (however few
   were asked for: oras-py keeps its first token for a whole push), never more; for
   ``registry:catalog:*``, the catalog of what the grants let the user pull. It is signed
   with HMAC-SHA256 under a server key kept beside the credentials file (``<file>.key``),
   names a fingerprint of the user's stored secret, and expires after five minutes.
3. The client repeats its request with ``Authorization: Bearer <token>``. A token that
   lacks an action the user's grants do allow gets another 401 (``insufficient_scope``),
   so the client fetches a wider token; one the grants do not allow gets ``403 DENIED``.

HTTP Basic on any route works too. Anonymous requests get the file's anonymous grants
(pull only). The file is re-read when it changes, so ``casengine auth`` edits take effect
without a restart: grant changes apply to live tokens, and a rotated or removed secret
ends the tokens issued for it (also for a user later re-created under the same name).
While the file is missing or malformed, requests that need it get ``503 UNAVAILABLE``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from casengine.credentials import Credentials, Grant, User, allowed
from casengine.errors import ConfigError
from casengine.http.asgi import HTTPError, Request, Send, blocking, respond_json

log = logging.getLogger("casengine.http.auth")

SERVICE = "casengine"
TOKEN_TTL = 300
CATALOG_SCOPE = "registry:catalog:*"
#: The largest ``POST /token`` form: a scope list for many repositories, not a blob.
FORM_LIMIT = 64 << 10
#: How long a verified Basic secret is remembered, so scrypt runs once per client, not per request.
BASIC_CACHE_TTL = 60.0


#: A Host header fit to be quoted into a challenge: a name or address, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def _host_of(request: Request) -> str:
    """Where the client reached us: its Host header, or the address it connected to when
    the header is missing or could break out of the challenge's quoted realm."""
    host = request.header("host")
    if host and _HOST.fullmatch(host):
        return host
    server = request.scope.get("server") or ("127.0.0.1", None)
    name = f"[{server[0]}]" if ":" in server[0] else server[0]
    return name if server[1] is None else f"{name}:{server[1]}"


@dataclass(frozen=True, slots=True)
class Identity:
    user: str | None  #: None for anonymous
    #: for a Bearer token: repository -> actions the token carries; None otherwise
    token_access: dict[str, frozenset[str]] | None = None
    #: a token's fingerprint of the secret it was issued for (see TokenAuth.secret_id)
    secret_id: str | None = None
    #: a token issued for ``registry:catalog:*``
    catalog: bool = False


ANONYMOUS = Identity(None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_key(path: str) -> bytes:
    """The server's token key, created on first use (mode 0600, shared by all workers)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    for _ in range(50):  # another worker may be writing it right now
        with open(path) as f:
            text = f.read().strip()
        if len(text) == 64:
            return bytes.fromhex(text)
        time.sleep(0.01)
    raise OSError(f"token key file {path} is not 64 hex digits")


def parse_scopes(values: list[str]) -> dict[str, frozenset[str]]:
    """``repository:team/app:pull,push`` (repeatable) -> {repository: actions}."""
    out: dict[str, set[str]] = {}
    for value in values:
        for scope in value.split(" "):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            out.setdefault(name, set()).update(a for a in actions.split(",") if a)
    return {k: frozenset(v) for k, v in out.items()}


def wants_catalog(values: list[str]) -> bool:
    return any(CATALOG_SCOPE in value.split(" ") for value in values)


class OAuthError(HTTPError):
    """An error of ``POST /token``, in OAuth2's shape (RFC 6749 5.2), not the registry's."""

    def body(self) -> bytes:
        return json.dumps({"error": self.code, "error_description": self.message}).encode()


class TokenAuth:
    """The :class:`~casengine.http.app.Authorizer` for ``casengine serve --auth FILE``."""

    def __init__(self, path: str, *, token_ttl: int = TOKEN_TTL,
                 public_url: str | None = None) -> None:
        self.path = path
        self.token_ttl = token_ttl
        #: where clients reach this server (``serve --public-url``); else from each request
        self.public_url = public_url
        self._cache_key = os.urandom(32)
        self._basic: dict[bytes, tuple[str, float]] = {}
        self._stat: tuple[int, ...] | None = None
        self._broken: str | None = None  #: why the file cannot be used now, once logged
        self._creds = Credentials(path)
        self._refresh()  # first: a missing file is an error before any key is made
        self.key = load_key(path + ".key")

    @classmethod
    def from_file(cls, path: str, public_url: str | None = None) -> TokenAuth:
        return cls(path, public_url=public_url)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ConfigError(f"credentials file {self.path} does not exist: create it with "
                              "'casengine auth add --file PATH USER --grant ...'") from None
        except OSError as exc:
            raise ConfigError(f"cannot read the credentials file {self.path}: {exc}") from exc
        stat = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        if stat != self._stat:
            self._creds = Credentials.load(self.path)
            self._stat = stat
            self._basic.clear()

    def _reload(self) -> None:
        """The file as it is now. While it is missing or malformed nobody can be checked,
        so every request that needs it fails closed with a 503 (the last good copy might
        hold a user just removed), and the cause is logged once, not once per request."""
        try:
            self._refresh()
        except ConfigError as exc:
            if self._broken != str(exc):
                self._broken = str(exc)
                log.error("%s: answering 503 until it is mended", exc)
            raise HTTPError(503, "UNAVAILABLE", "the registry cannot check credentials now: "
                            "its credentials file is missing or malformed (see its log)",
                            headers={"Retry-After": "10"}) from None
        if self._broken is not None:
            self._broken = None
            log.warning("the credentials file %s is readable again", self.path)

    # -- who is asking --------------------------------------------------------------------

    def _anonymous(self) -> list[Grant]:
        return [g for g in self._creds.anonymous if g.actions <= {"pull"}]

    def _grants(self, identity: Identity) -> list[Grant]:
        # what anyone may pull, a signed-in user may pull too
        if identity.user is None:
            return self._anonymous()
        user = self._creds.users.get(identity.user)
        return (user.grants if user else []) + self._anonymous()

    def secret_id(self, user: User) -> str:
        """A short fingerprint of ``user``'s stored secret, which every token of the user
        names: a rotation or a new user of the same name (a fresh salt) changes it, and so
        ends the tokens issued before. Keyed, so a token tells nothing of the hash."""
        return _b64(hmac.new(self.key, user.secret_hash.encode(), hashlib.sha256).digest()[:12])

    def allowed(self, identity: Identity, repository: str) -> frozenset[str]:
        if identity.token_access is not None:
            # a token can never carry more than its user's grants allow now
            return identity.token_access.get(repository, frozenset()) & \
                allowed(self._grants(identity), repository)
        return allowed(self._grants(identity), repository)

    def can_read(self, identity: Identity | None, repository: str) -> bool:
        return "pull" in self.allowed(identity or ANONYMOUS, repository)

    def can_list(self, identity: Identity | None, repository: str) -> bool:
        """Whether the catalog shows ``repository``: what the grants let the caller pull,
        or for a token issued without ``registry:catalog:*``, what the token may pull."""
        identity = identity or ANONYMOUS
        if identity.token_access is not None and not identity.catalog:
            return self.can_read(identity, repository)
        return "pull" in allowed(self._grants(identity), repository)

    async def _basic_user(self, name: str, secret: str, request: Request | None) -> str:
        key = hmac.new(self._cache_key, f"{name}\0{secret}".encode(), hashlib.sha256).digest()
        hit = self._basic.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        user = await blocking(self._creds.check, name, secret)  # scrypt: off the event loop
        if user is None:
            raise self._challenge(None, "wrong user name or secret", request=request)
        self._basic[key] = (user.name, time.monotonic() + BASIC_CACHE_TTL)
        return user.name

    def _bearer(self, token: str, request: Request | None = None) -> Identity:
        try:
            payload, _, signature = token.partition(".")
            want = hmac.new(self.key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(want, _unb64(signature)):
                raise ValueError("bad signature")
            claims = json.loads(_unb64(payload))
            exp, sub, acc = claims["exp"], claims["sub"], claims["acc"]
            sid, catalog = claims.get("sid"), claims.get("cat", False)
            if not isinstance(exp, (int, float)) or not math.isfinite(exp) or exp < time.time():
                raise ValueError("expired")
            if not (sub is None or isinstance(sub, str)) or not isinstance(acc, dict) \
                    or not (sid is None or isinstance(sid, str)) or not isinstance(catalog, bool):
                raise ValueError("malformed claims")
            access = {k: frozenset(v.split(",")) for k, v in acc.items()}
            return Identity(sub, access, sid, catalog)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._challenge(None, "invalid or expired token", request=request) from None

    async def identify(self, request: Request) -> Identity:
        self._reload()
        header = request.header("authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise self._challenge(None, "malformed Basic credentials",
                                      request=request) from None
            name, _, secret = decoded.partition(":")
            return Identity(await self._basic_user(name, secret, request))
        if scheme.lower() == "bearer":
            identity = self._bearer(value.strip(), request)
            if identity.user is not None:
                user = self._creds.users.get(identity.user)
                if user is None or identity.secret_id is None or not hmac.compare_digest(
                        identity.secret_id, self.secret_id(user)):
                    raise self._challenge(None, "the token's user was removed or its secret "
                                          "rotated since it was issued", request=request)
            return identity
        return ANONYMOUS

    # -- the Authorizer protocol -------------------------------------------------------------

    def _challenge(self, scope: str | None, message: str, *, request: Request | None = None,
                   error: str | None = None) -> HTTPError:
        realm = "/token"
        if self.public_url is not None:
            realm = f"{self.public_url}/token"
        elif request is not None:
            realm = f"{request.scope.get('scheme', 'http')}://{_host_of(request)}/token"
        parts = [f'realm="{realm}"', f'service="{SERVICE}"']
        if scope:
            parts.append(f'scope="{scope}"')
        if error:
            parts.append(f'error="{error}"')
        return HTTPError(401, "UNAUTHORIZED", message,
                         headers={"WWW-Authenticate": "Bearer " + ",".join(parts)})

    async def authorize(self, request: Request, repository: str | None,
                        actions: frozenset[str]) -> Identity:
        identity = await self.identify(request)
        if repository is None:
            path = request.path.rstrip("/")
            if path == "/v2" and identity.user is None:
                raise self._challenge(None, "authentication required", request=request)
            # with nothing anonymous may pull, an anonymous catalog is always empty: say
            # instead how to sign in, so a client with credentials uses them
            if path == "/v2/_catalog" and identity.user is None and not self._anonymous():
                raise self._challenge(CATALOG_SCOPE, "authentication required",
                                      request=request)
            return identity
        if actions <= self.allowed(identity, repository):
            return identity
        scope = f"repository:{repository}:{','.join(sorted(actions | {'pull'}))}"
        if identity.user is None:
            raise self._challenge(scope, "authentication required", request=request)
        if identity.token_access is not None and actions <= allowed(self._grants(identity),
                                                                    repository):
            raise self._challenge(scope, "the token does not cover this", request=request,
                                  error="insufficient_scope")
        raise HTTPError(403, "DENIED", f"{identity.user} may not "
                        f"{'/'.join(sorted(actions))} {repository}")

    # -- the token endpoint ---------------------------------------------------------------

    async def token_endpoint(self, request: Request, send: Send, identity: Any) -> None:
        """``GET /token`` (the Docker token flow, with Basic credentials or none) and
        ``POST /token`` (its OAuth2 form: a password grant)."""
        if request.method == "POST":
            self._reload()
            who, scopes = await self._password_grant(request)
        else:
            scheme = (request.header("authorization") or "").partition(" ")[0].lower()
            if scheme == "bearer":  # a token is never traded for another, possibly wider, one
                raise self._challenge(None, "the token endpoint takes Basic credentials",
                                      request=request)
            who, scopes = await self.identify(request), request.query_all("scope")
        grants = self._grants(who)
        # every action the grants allow, not just those asked for: oras-py keeps the token
        # of its first (pull) request for the whole push, and another client asks again
        granted = {repo: allowed(grants, repo) for repo, wanted in parse_scopes(scopes).items()
                   if wanted}
        acc = {repo: ",".join(sorted(a)) for repo, a in granted.items() if a}
        catalog = wants_catalog(scopes) and (who.user is not None or bool(self._anonymous()))
        now = time.time()
        claims: dict[str, Any] = {"sub": who.user, "iat": now, "exp": now + self.token_ttl,
                                  "acc": acc}
        if who.user is not None:
            claims["sid"] = self.secret_id(self._creds.users[who.user])
        if catalog:
            claims["cat"] = True
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())
        token = f"{payload}.{signature}"
        scope = [f"repository:{repo}:{a}" for repo, a in acc.items()]
        await respond_json(send, 200, {
            "token": token, "access_token": token, "expires_in": self.token_ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "scope": " ".join(scope + ([CATALOG_SCOPE] if catalog else []))})

    async def _password_grant(self, request: Request) -> tuple[Identity, list[str]]:
        """The user and scopes of an OAuth2 password grant (the distribution token spec's
        OAuth2 section): a form with grant_type=password, username, password, and
        optionally scope (space-separated), service and client_id. Any other grant is a
        400 ``unsupported_grant_type``, on which containerd falls back to ``GET``."""
        def bad(code: str, message: str) -> OAuthError:
            return OAuthError(400, code, message)

        media_type = (request.header("content-type") or "").partition(";")[0].strip().lower()
        if media_type != "application/x-www-form-urlencoded":
            raise bad("invalid_request", "POST /token takes an "
                      "application/x-www-form-urlencoded form")
        body = await request.body(FORM_LIMIT, bad("invalid_request",
                                                  f"the form is over {FORM_LIMIT} bytes"))
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise bad("invalid_request", "the form is not UTF-8") from None
        grant_type = (form.get("grant_type") or [""])[-1]
        if grant_type != "password":
            if not grant_type:
                raise bad("invalid_request", "the form has no grant_type")
            raise bad("unsupported_grant_type", f"grant_type {grant_type!r} is not "
                      "supported: use 'password', or GET /token with Basic credentials")
        name, secret = (form.get("username") or [""])[-1], form.get("password")
        if not name or secret is None:
            raise bad("invalid_request", "a password grant needs username and password")
        try:
            who = await self._basic_user(name, secret[-1], request)
        except HTTPError as exc:
            raise OAuthError(401, "invalid_grant", exc.message, headers=exc.headers) from None
        return Identity(who), form.get("scope", [])
