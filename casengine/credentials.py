"""The credentials file: users, hashed secrets, and grants on repository patterns.

A JSON file, written atomically with mode 0600::

    {"version": 1,
     "users": {"ci": {"secret": "scrypt$16384$8$1$<salt b64>$<hash b64>",
                      "grants": ["team/project/*:pull,push"], "created": 1790000000.0}},
     "anonymous": ["public/*:pull"]}

A grant is ``PATTERN:ACTIONS``: actions are ``pull``, ``push`` and ``delete``; in the pattern
``*`` matches any run of characters, slashes included, so ``team/*`` covers ``team/a`` and
``team/a/b``. Secrets are random, shown once, and stored only as an scrypt hash with a
per-entry salt; they are compared in constant time.

Every edit (:meth:`Credentials.edit`) holds an exclusive ``flock`` on ``<file>.lock`` from
load to save: the save replaces the file by rename, so a lock on the file itself would be
on an inode that a concurrent edit has already swapped out, and an unlocked
read-modify-write lets a parallel ``auth add`` write back a user that ``auth rm`` removed.
"""

from __future__ import annotations

import base64
import fcntl
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from casengine.errors import Busy, ConfigError, Conflict, InvalidInput, NotFound

ACTIONS = ("pull", "push", "delete")
_SCRYPT = {"n": 1 << 14, "r": 8, "p": 1}
#: The most work a stored hash may ask for, as n * r * p: 16 times ours. A tampered or
#: mistyped file (p=10401, found by the fuzzer, took minutes) must not stall every login.
_MAX_COST = 16 * _SCRYPT["n"] * _SCRYPT["r"] * _SCRYPT["p"]
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_PATTERN = re.compile(r"[a-z0-9*][a-z0-9._/*-]*")


@dataclass(frozen=True, slots=True)
class Grant:
    pattern: str
    actions: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Grant:
        pattern, sep, actions = text.rpartition(":")
        names = frozenset(a.strip() for a in actions.split(",") if a.strip())
        if not sep or not _PATTERN.fullmatch(pattern) or not names or not names <= set(ACTIONS):
            raise InvalidInput(f"invalid grant {text!r}: want PATTERN:ACTIONS, e.g. "
                               "'team/project/*:pull,push' (actions: pull, push, delete)")
        return cls(pattern, names)

    def covers(self, repository: str) -> bool:
        return fnmatch.fnmatchcase(repository, self.pattern)

    def __str__(self) -> str:
        return f"{self.pattern}:{','.join(a for a in ACTIONS if a in self.actions)}"


def allowed(grants: list[Grant], repository: str) -> frozenset[str]:
    """The actions ``grants`` allow on ``repository``."""
    out: set[str] = set()
    for g in grants:
        if g.covers(repository):
            out |= g.actions
    return frozenset(out)


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return (f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}$"
            f"{b64(salt).decode()}${b64(digest).decode()}")


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """n, r, p, salt and hash of a stored ``scrypt$n$r$p$salt$hash``; ValueError if it is
    not one, or asks for more work than :data:`_MAX_COST`; TypeError if not a string."""
    if not isinstance(stored, str):
        raise TypeError(f"a stored secret is a string, not {type(stored).__name__}")
    try:
        scheme, n_, r_, p_, salt, want = stored.split("$")
        n, r, p = int(n_), int(r_), int(p_)
        parsed = (n, r, p, base64.b64decode(salt, validate=True),
                  base64.b64decode(want, validate=True))
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise ValueError("a stored secret is 'scrypt$N$R$P$SALT$HASH'") from exc
    if scheme != "scrypt" or min(n, r, p) < 1 or n * r * p > _MAX_COST:
        raise ValueError("a stored secret is 'scrypt$N$R$P$SALT$HASH' with a sane cost")
    return parsed


#: scrypt checks at once, and checks running or waiting: each costs ~40 ms and 16 MiB,
#: and a flood of wrong passwords must neither fill memory nor hold every server thread.
SCRYPT_AT_ONCE = 2
SCRYPT_QUEUE = 16
_scrypt_running = threading.BoundedSemaphore(SCRYPT_AT_ONCE)
_scrypt_queued = threading.BoundedSemaphore(SCRYPT_QUEUE)


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` is the one ``stored`` hashes; :class:`Busy` when too many checks
    are under way already."""
    if not _scrypt_queued.acquire(blocking=False):
        raise Busy("too many logins at once: retry shortly")
    try:
        n, r, p, salt, expected = _parse_hash(stored)
        with _scrypt_running:
            got = hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    except (ValueError, TypeError, OverflowError):  # a malformed stored hash verifies nothing
        return False
    finally:
        _scrypt_queued.release()
    return hmac.compare_digest(got, expected)


@dataclass(slots=True)
class User:
    name: str
    secret_hash: str
    grants: list[Grant]
    created: float


@dataclass(slots=True)
class Credentials:
    """The parsed file. Change it through the methods, then :meth:`save`."""

    path: str
    users: dict[str, User] = field(default_factory=dict)
    anonymous: list[Grant] = field(default_factory=list)

    @classmethod
    def load(cls, path: str, *, missing_ok: bool = False) -> Credentials:
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            if missing_ok:
                return cls(path)
            raise ConfigError(f"credentials file {path} does not exist: create it with "
                              "'casengine auth add --file PATH USER --grant ...'") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the credentials file {path}: {exc}") from exc
        try:
            users = {name: _user_of(name, u) for name, u in doc["users"].items()}
            anonymous = [Grant.parse(g) for g in doc.get("anonymous", [])]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # InvalidInput too
            raise ConfigError(f"the credentials file {path} is malformed: {exc}") from exc
        return cls(path, users, anonymous)

    @classmethod
    @contextmanager
    def edit(cls, path: str, *, missing_ok: bool = False) -> Iterator[Credentials]:
        """The file, loaded under ``<file>.lock`` and saved when the block ends without an
        exception; edits by other processes wait for the lock."""
        if not missing_ok:
            cls.load(path)  # a missing file is refused before a lock file appears beside it
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise NotFound(f"no directory {folder} for the credentials file {path}: "
                           "create it first")
        try:
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot lock the credentials file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            creds = cls.load(path, missing_ok=missing_ok)
            yield creds
            creds.save()
        finally:
            os.close(fd)  # and with it the lock

    def save(self) -> None:
        doc = {"version": 1,
               "users": {u.name: {"secret": u.secret_hash, "grants": [str(g) for g in u.grants],
                                  "created": u.created} for u in self.users.values()},
               "anonymous": [str(g) for g in self.anonymous]}
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".credentials-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def add(self, name: str, grants: list[Grant]) -> str:
        """Add ``name`` with ``grants``; return its new secret (shown once, never stored)."""
        if not _USER.fullmatch(name):
            raise InvalidInput(f"invalid user name {name!r}: letters, digits and ._@- only")
        if name in self.users:
            raise Conflict(f"user {name!r} exists: use 'auth rotate' for a new secret")
        secret = secrets.token_urlsafe(32)
        self.users[name] = User(name, hash_secret(secret), grants, time.time())
        return secret

    def rotate(self, name: str) -> str:
        user = self._user(name)
        secret = secrets.token_urlsafe(32)
        user.secret_hash = hash_secret(secret)
        return secret

    def remove(self, name: str) -> None:
        self._user(name)
        del self.users[name]

    def _user(self, name: str) -> User:
        if name not in self.users:
            raise NotFound(f"no user {name!r} in {self.path}")
        return self.users[name]

    def check(self, name: str, secret: str) -> User | None:
        """The user whose secret this is, or None. Unknown users cost the same time."""
        user = self.users.get(name)
        if user is None:
            verify_secret(secret, _DUMMY)  # the same work, so timing tells nothing
            return None
        return user if verify_secret(secret, user.secret_hash) else None


def _user_of(name: str, entry: dict) -> User:
    """One user's entry of the file, checked: a secret that is not a stored hash would
    otherwise surface as an error at every login instead of once, here."""
    if not isinstance(name, str) or not _USER.fullmatch(name):
        raise ValueError(f"invalid user name {name!r}")
    try:
        _parse_hash(entry["secret"])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"user {name!r}: {exc}") from None
    grants = entry["grants"]
    if not isinstance(grants, list):
        raise TypeError(f"user {name!r}: grants are a list of 'PATTERN:ACTIONS'")
    created = entry.get("created", 0.0)
    if not isinstance(created, (int, float)):
        raise TypeError(f"user {name!r}: created is a number")
    return User(name, entry["secret"], [Grant.parse(g) for g in grants], created)


_DUMMY = hash_secret(secrets.token_urlsafe(32))
