"""Who uses how much storage, and quotas per namespace.

- **logical** bytes of a repository: the sum of the sizes of the blobs its manifests
  reference, manifests included, each blob counted once per repository. Kept up to date
  by :mod:`casengine.registry.model` as manifests come and go, so it is cheap to read.
- **physical** bytes of a set of repositories: what storing them takes, each blob once
  however many of them reference it. ``shared`` is the difference. **stored** bytes are
  the same blobs as the backend holds them: smaller where a blob is stored compressed
  (see :mod:`casengine.compression`).

Blobs pushed but never referenced by a manifest (a failed or abandoned push) count
nowhere; garbage collection reclaims them.

A quota is a limit on the logical bytes under a namespace prefix (``team/`` covers
``team/a`` and ``team/b/c``; a full name covers that repository). A blob push, mount or
manifest that would take a covered namespace over its limit is refused and stores nothing.

The checks read the index in a transaction of their own, except a manifest's final one,
which runs in the transaction that records the manifest: two manifests pushed at once
into one namespace are then charged one after the other, and the second sees the first.
(Blob checks only refuse early: blobs are charged when a manifest references them.)
"""

from __future__ import annotations

import contextlib
import json
import struct
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from casengine.errors import InvalidInput, QuotaExceeded
from casengine.index import unpack_blob
from casengine.registry.names import check_name
from casengine.units import format_size

if TYPE_CHECKING:
    from casengine.index import Txn
    from casengine.registry.model import Registry

_REF = struct.Struct("<IQ")


@dataclass(frozen=True, slots=True)
class Usage:
    name: str  #: a repository name, or a namespace prefix ending in '/', or '' for all
    repositories: int
    logical: int
    physical: int
    stored: int = 0  #: the physical blobs' stored sizes (compressed ones count compressed)

    @property
    def shared(self) -> int:
        return self.logical - self.physical


@dataclass(frozen=True, slots=True)
class UsageReport:
    total: Usage
    repositories: list[Usage] = field(default_factory=list)
    namespaces: list[Usage] = field(default_factory=list)

    def to_json(self) -> dict:
        def one(u: Usage) -> dict:
            return {"name": u.name, "repositories": u.repositories, "logical_bytes": u.logical,
                    "physical_bytes": u.physical, "shared_bytes": u.shared,
                    "stored_bytes": u.stored}

        return {"total": one(self.total), "repositories": [one(u) for u in self.repositories],
                "namespaces": [one(u) for u in self.namespaces]}


def _namespaces(repo: str) -> list[str]:
    parts = repo.split("/")
    return ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]


def usage(registry: Registry, prefix: str = "") -> UsageReport:
    """Logical and physical bytes per repository and per namespace under ``prefix``."""
    repos: dict[str, dict[bytes, int]] = {}
    stored: dict[bytes, int] = {}
    with registry.index.transaction() as txn:
        for name in registry.repositories(prefix):
            blobs = {}
            for k, v in txn.scan("refs", (name + "\0").encode()):
                count, size = _REF.unpack(v)
                if count:
                    digest = k.split(b"\0", 1)[1]
                    blobs[digest] = size
                    if digest not in stored:
                        record = txn.get("blobs", digest)
                        stored[digest] = size if record is None else unpack_blob(
                            digest, record).stored_size
            repos[name] = blobs

    def combined(name: str, members: list[str]) -> Usage:
        union: dict[bytes, int] = {}
        logical = 0
        for m in members:
            logical += sum(repos[m].values())
            union.update(repos[m])
        return Usage(name, len(members), logical, sum(union.values()),
                     sum(stored[d] for d in union))

    per_repo = [combined(r, [r]) for r in repos]
    spaces: dict[str, list[str]] = {}
    for r in repos:
        for ns in _namespaces(r):
            if ns.startswith(prefix) or prefix.startswith(ns):
                spaces.setdefault(ns, []).append(r)
    per_ns = [combined(ns, members) for ns, members in sorted(spaces.items())]
    return UsageReport(combined(prefix, list(repos)), per_repo, per_ns)


class Quotas:
    """Limits on logical bytes per namespace prefix, kept in the index."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def set(self, prefix: str, limit: int | None) -> bool:
        """Set (or, with None, remove) the quota of ``prefix``; False if there was none to
        remove."""
        if not prefix or limit is not None and limit < 0:
            raise InvalidInput("a quota needs a namespace prefix and a limit >= 0")
        check_name(prefix.removesuffix("/"))  # a quota no repository can fall under is a typo
        with self.registry.index.transaction(write=True) as txn:
            if limit is None:
                return txn.delete("quotas", prefix.encode())
            txn.put("quotas", prefix.encode(), str(limit).encode())
            return True

    def _reading(self, txn: Txn | None) -> AbstractContextManager[Txn]:
        return contextlib.nullcontext(txn) if txn is not None \
            else self.registry.index.transaction()

    def all(self, txn: Txn | None = None) -> dict[str, int]:
        with self._reading(txn) as t:
            return {k.decode(): int(v) for k, v in t.scan("quotas")}

    def _covering(self, repo: str, txn: Txn | None = None) -> dict[str, int]:
        return {p: limit for p, limit in self.all(txn).items()
                if repo == p or (p.endswith("/") and repo.startswith(p))}

    def used(self, prefix: str, txn: Txn | None = None) -> int:
        """Logical bytes charged to ``prefix`` now (as ``txn`` sees them, if given)."""
        with self._reading(txn) as t:
            if not prefix.endswith("/"):
                value = t.get("repos", prefix.encode())
                return json.loads(value).get("logical", 0) if value else 0
            return sum(json.loads(v).get("logical", 0)
                       for _, v in t.scan("repos", prefix.encode()))

    def _check(self, repo: str, delta: int, txn: Txn | None = None) -> None:
        if delta <= 0:  # a retried push, a new tag: nothing more is used, so nothing crosses
            return
        for prefix, limit in self._covering(repo, txn).items():
            used = self.used(prefix, txn)
            if used + delta > limit:
                raise QuotaExceeded(
                    f"quota of {prefix} exceeded: {format_size(used)} used + {format_size(delta)} "
                    f"new > {format_size(limit)} allowed; nothing was stored")

    def check_blob(self, repo: str, size: int, digest: object = None) -> None:
        """Refuse a blob that could not be referenced without crossing a quota; one the
        repository already references adds nothing."""
        if not self._covering(repo):
            return
        if digest is not None:
            with self.registry.index.transaction() as txn:
                if txn.get("refs", f"{repo}\0{digest}".encode()) is not None:
                    return
        self._check(repo, size)

    def check_manifest(self, repo: str, digests: list[str], sizes: dict[str, int],
                       txn: Txn | None = None) -> None:
        """Refuse a manifest whose newly referenced blobs would cross a quota. Only a check
        in ``txn``, the transaction that records the manifest, holds: others may record
        theirs between a check in its own transaction and that one."""
        with self._reading(txn) as t:
            if not self._covering(repo, t):
                return
            new = sum(sizes[d] for d in dict.fromkeys(digests)
                      if t.get("refs", f"{repo}\0{d}".encode()) is None)
            self._check(repo, new, t)
