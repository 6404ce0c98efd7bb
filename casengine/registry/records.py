"""A repository's small backend records (links, manifests, tags), kept in step with the index.

The records exist so the index can be rebuilt from the backend alone (see
:mod:`casengine.layout`); the index is what was acknowledged. Two writers racing on one
record would otherwise leave it as the slower one's backend call left it, whatever order
their index transactions took. So a writer holds the record's lock (:func:`locked`, a lock
of the index shared by every thread and process) from its backend call to its index
transaction:

- a push writes its records, then records them in the index; a refusal in that
  transaction takes the records back (:func:`agree`) before the lock goes;
- a delete removes the row (the acknowledgement), then the record.

The locks are per record (by bucket), not the index's writer lock: a backend call (an S3
PUT) under that one would stall every writer of the registry for its round trip.

A crash between the backend call and the index transaction leaves a record the index
lacks, or a tag record naming another manifest: the backend is ahead of the index, never
behind it, and garbage collection's orphan pass puts it right.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casengine.digest import Digest
from casengine.errors import CASError, NotFound
from casengine.layout import REPOSITORIES, link_key, manifest_key, tag_key

if TYPE_CHECKING:
    from casengine.backend import Backend
    from casengine.index import Index

#: Records share this many locks: writers of unrelated records rarely wait on each other.
BUCKETS = 4096


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


def of_key(key: str) -> Record | None:
    """The record the backend object ``key`` is (None: not a link, manifest or tag)."""
    rel = key.removeprefix(REPOSITORIES)
    for part in ("/_links/", "/_manifests/", "/_tags/"):
        repo, sep, rest = rel.partition(part)
        if not sep or "/_" in repo or not rest:
            continue
        if part == "/_tags/":
            return tag_record(repo, rest)
        # the row as the key spells it, unchecked: a malformed one names no row, and goes
        table = "links" if part == "/_links/" else "manifests"
        return Record(key, table, _row(repo, rest.replace("/", ":", 1)))
    return None


@contextlib.contextmanager
def locked(index: Index, keys: Iterable[str]) -> Iterator[None]:
    """Hold the locks of the records with these backend keys. Never taken inside a write
    transaction: a holder may wait for the index's writer lock, never the other way."""
    with index.locks(f"record-{zlib.crc32(key.encode()) % BUCKETS:03x}" for key in keys):
        yield


@contextlib.contextmanager
def writing(index: Index, backend: Backend, records: Iterable[Record],
            value: bytes) -> Iterator[None]:
    """A push's records: locked, written ahead of the index (a tag's with ``value``), then
    the block records them in the index. If the block fails (refused, or the index
    unwritable), the records are taken back before the locks go."""
    records = list(records)
    with locked(index, (r.key for r in records)):
        try:
            for record in records:
                backend.put(record.key, record.body(value))
            yield
        except BaseException:
            # else they would outlive the refusal, and reindex would bring the push back
            with contextlib.suppress(CASError):
                agree(index, backend, records)
            raise


def agree(index: Index, backend: Backend, records: Iterable[Record]) -> None:
    """Make each record say what the index says now: removed where the index has no row,
    written where it has one. The caller holds the records' locks."""
    records = list(records)
    with index.transaction() as txn:
        values = [txn.get(r.table, r.row) for r in records]
    for record, value in zip(records, values, strict=True):
        if value is None:
            with contextlib.suppress(NotFound):
                backend.delete(record.key)
        else:
            backend.put(record.key, record.body(value))
