"""A repository's small backend records (links, manifests, tags), kept in step with the index.

The records exist so the index can be rebuilt from the backend alone (see
:mod:`casengine.layout`); the index is what was acknowledged. Two writers racing on one
record would otherwise leave it as the slower one's backend call left it, whatever order
their index transactions took. So every change to a record happens while the index's
writer lock is held (LMDB serialises write transactions across threads and processes):

- a push writes its records inside the transaction that records it, after every check,
  so records and rows change in the same order;
- a delete removes the row in its own transaction (the acknowledgement) and then, in a
  second one, removes the record only if the row is still absent (:func:`agree`).

A crash inside a pushing transaction leaves a record the index lacks, or a tag record
naming another manifest; a crash between a delete's two transactions leaves a record the
index lacks. Either way the backend is ahead of the index, never behind it, and garbage
collection's orphan pass puts it right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casengine.digest import Digest
from casengine.errors import NotFound
from casengine.layout import link_key, manifest_key, tag_key

if TYPE_CHECKING:
    from casengine.backend import Backend
    from casengine.index import Index, Txn


@dataclass(frozen=True, slots=True)
class Record:
    key: str  #: the backend object
    table: str  #: the index table of the row it mirrors
    row: bytes  #: the row's key
    carries_value: bool = False  #: a tag record holds the row's value; the others are empty

    def body(self, value: bytes) -> bytes:
        return value if self.carries_value else b""


def _row(repo: str, part: str) -> bytes:
    return f"{repo}\0{part}".encode()


def link_record(repo: str, digest: Digest) -> Record:
    return Record(link_key(repo, digest), "links", _row(repo, str(digest)))


def manifest_record(repo: str, digest: Digest) -> Record:
    return Record(manifest_key(repo, digest), "manifests", _row(repo, str(digest)))


def tag_record(repo: str, tag: str) -> Record:
    return Record(tag_key(repo, tag), "tags", _row(repo, tag), carries_value=True)


def write(backend: Backend, txn: Txn, records: Iterable[Record]) -> None:
    """Write ``records`` as ``txn`` (a write transaction, not yet committed) has them.

    Call it last in the transaction: a check that refuses after it leaves records the
    caller must take back with :func:`agree`.
    """
    for record in records:
        value = txn.get(record.table, record.row)
        if value is not None:
            backend.put(record.key, record.body(value))


def agree(index: Index, backend: Backend, records: Iterable[Record]) -> None:
    """Make each record say what the index says now: removed where the index has no row,
    written where it has one (a push recorded it since the caller looked)."""
    # nothing is written to the index, so the commit need not reach the disk
    with index.transaction(write=True, durable=False) as txn:
        for record in records:
            value = txn.get(record.table, record.row)
            if value is None:
                with contextlib.suppress(NotFound):
                    backend.delete(record.key)
            else:
                backend.put(record.key, record.body(value))
