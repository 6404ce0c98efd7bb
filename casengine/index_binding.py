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
"""

from __future__ import annotations

import json
import time

from casengine.backend import Backend
from casengine.errors import ConfigError
from casengine.index import Index
from casengine.layout import BLOBS, REPOSITORIES

_BOUND = b"bound"


def bind(index: Index) -> None:
    """Record that ``index`` describes its store."""
    with index.transaction(write=True) as txn:
        if txn.get("meta", _BOUND) is None:
            txn.put("meta", _BOUND, json.dumps({"since": time.time()}).encode())


def ensure_bound(backend: Backend, index: Index, where: str) -> None:
    """Bind ``index`` if it may be, else raise :class:`ConfigError`."""
    with index.transaction() as txn:
        if txn.get("meta", _BOUND) is not None:
            return
        recorded = txn.count("blobs") or txn.count("repos")
    if not recorded and any(_first(backend, prefix) for prefix in (BLOBS, REPOSITORIES)):
        raise ConfigError(
            f"the index at {where} is new, but the store holds objects it does not know: "
            "point --index (CASENGINE_INDEX) at the store's index, or rebuild one with "
            "'casengine reindex' (stop the registry first)")
    bind(index)


def _first(backend: Backend, prefix: str) -> bool:
    return next(iter(backend.list(prefix)), None) is not None
