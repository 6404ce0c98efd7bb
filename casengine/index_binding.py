"""Whether an index knows the store it is opened with.

Everything destructive trusts the index: GC's orphan pass removes the objects no record
names, the upload sweep the staged bytes no session names, ``check --repair`` re-indexes
what it finds unrecorded. Opened on an index that is new (deleted, or a mistyped
``--index``), every object of a full store would look like an orphan. So an index is
*bound*: it records that it was made for its store, when it is first opened on an empty
one, or rebuilt by ``casengine reindex``. An unbound index opened on a store that already
holds objects is refused, and the error says how to recover.

An index made before binding existed, with records in it, is bound as it is: it was
opened on its store before.

A bound index can still be the wrong one: an older copy restored from a backup knows
nothing of the pushes since, and to GC's orphan pass their blobs and records look like
debris of crashed pushes. So the store keeps a *mark* (:data:`~casengine.layout.INDEX_MARK`):
which index it is used with (a random id made at binding) and how far that index had got
(its count of committed write transactions). Every open, close and, while serving, every
:data:`MARK_INTERVAL` seconds, the mark is brought up to date. An index whose id is not the
mark's, or that is behind the mark, is refused like an unbound one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time

from casengine.backend import Backend
from casengine.errors import BackendError, ConfigError, NotFound
from casengine.index import Index, Txn
from casengine.layout import BLOBS, INDEX_MARK, REPOSITORIES

log = logging.getLogger(__name__)

_BOUND = b"bound"
#: Seconds between marks while serving: an index restored from a backup older than this
#: is found out.
MARK_INTERVAL = 60.0


def is_bound(txn: Txn) -> bool:
    """Whether the index of ``txn`` was bound to a store (else it is new)."""
    return txn.get("meta", _BOUND) is not None


def bind(index: Index) -> str:
    """Record that ``index`` describes its store; its id."""
    with index.transaction() as txn:  # every open asks: a write (and a flush) only once
        value = txn.get("meta", _BOUND)
    if value is not None and "id" in (facts := json.loads(value)):
        return facts["id"]
    with index.transaction(write=True) as txn:
        value = txn.get("meta", _BOUND)
        facts = json.loads(value) if value is not None else {"since": time.time()}
        if "id" not in facts:  # bound before ids existed, or new
            facts["id"] = secrets.token_hex(16)
            txn.put("meta", _BOUND, json.dumps(facts).encode())
        return facts["id"]


def mark(backend: Backend, index: Index) -> None:
    """Record in the store how far ``index`` has got. A mark that cannot be written (a
    read-only store) only weakens the check, so it is logged, not raised. A store with no
    objects needs none (any index may take it up), and loses one it had."""
    with index.transaction() as txn:
        value = txn.get("meta", _BOUND)
    if value is None:
        return
    if not _holds_objects(backend):
        # emptied: a mark of the index it had would refuse whichever takes it up next
        with contextlib.suppress(NotFound, BackendError):
            backend.delete(INDEX_MARK)
        return
    ident = json.loads(value).get("id")
    generation = index.generation()
    # what the mark says must survive a power cut: commits that need not (a lease, an
    # upload's progress) are flushed first, else the index would come back behind it
    index.sync()
    current = _read_mark(backend)
    if current is not None and current["index"] == ident and current["generation"] >= generation:
        return  # another process of this index got as far or further
    body = {"index": ident, "generation": generation, "time": time.time()}
    try:
        backend.put(INDEX_MARK, json.dumps(body).encode())
    except BackendError as exc:
        log.warning("cannot record the index's progress in the store: %s", exc)


def ensure_bound(backend: Backend, index: Index, where: str) -> None:
    """Bind ``index`` if it may be, else raise :class:`ConfigError`."""
    with index.transaction() as txn:
        if txn.get("meta", _BOUND) is not None:
            return
        recorded = txn.count("blobs") or txn.count("repos")
    if not recorded and _holds_objects(backend):
        raise ConfigError(
            f"the index at {where} is new, but the store holds objects it does not know: "
            "point --index (CASENGINE_INDEX) at the store's index, or rebuild one with "
            "'casengine reindex' (stop the registry first)")
    bind(index)


def ensure_current(backend: Backend, index: Index, where: str) -> None:
    """Raise :class:`ConfigError` if the store's mark names another index, or a later
    state of this one, and the store holds objects; then mark it."""
    ident = bind(index)
    current = _read_mark(backend)
    if current is not None and _holds_objects(backend):
        recover = ("the store may hold pushes it does not know: rebuild the index from the "
                   "store with 'casengine reindex' (stop the registry first)")
        if current["index"] != ident:
            raise ConfigError(f"the index at {where} is not the one this store was last used "
                              f"with (index {current['index'][:12]}): {recover}")
        if current["generation"] > index.generation():
            raise ConfigError(
                f"the index at {where} is older than the store: it has committed "
                f"{index.generation()} transactions, the store has seen it at "
                f"{current['generation']} (restored from a backup?): {recover}")
    mark(backend, index)


def _read_mark(backend: Backend) -> dict | None:
    try:
        value = json.loads(backend.get(INDEX_MARK))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("the store's index mark %s is unreadable; writing it again", INDEX_MARK)
        return None
    if not (isinstance(value, dict) and isinstance(value.get("index"), str)
            and isinstance(value.get("generation"), int)):
        return None
    return value


def _holds_objects(backend: Backend) -> bool:
    return any(_first(backend, prefix) for prefix in (BLOBS, REPOSITORIES))


def _first(backend: Backend, prefix: str) -> bool:
    return next(iter(backend.list(prefix)), None) is not None
