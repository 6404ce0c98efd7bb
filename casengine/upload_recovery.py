"""Which journal entry an upload session recovers to after a power cut.

The index's record of a session may lag its staged bytes after a power cut: a journaled
append's release is not synced (see :mod:`casengine.uploads`). The backend's journal holds
the session's newer states; each entry is only a claim, checked here against the staged
bytes before it is adopted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import xxhash

from casengine import hashstate
from casengine.layout import upload_key

if TYPE_CHECKING:
    from casengine.backend import Backend


def journaled(backend: Backend, rec: dict) -> dict:
    """The updates that bring ``rec`` to the newest journal entry whose bytes are all
    on disk: the entry's hash state must be what the record's state becomes over the
    staged bytes in between. Nothing, where there is no such entry."""
    saved = rec.get("hash")
    key = upload_key(rec["id"])
    journal = backend.upload_journal(key, rec.get("backend") or {})
    if saved is None or journal is None:
        return {}
    entries = [e for e in journal.entries if e[1]["offset"] > rec["offset"]
               and e[1]["hash"]["algorithm"] == saved["algorithm"]]
    if not entries:
        return {}
    hasher = hashstate.ResumableHash.restore(saved["algorithm"],
                                             bytes.fromhex(saved["state"]), rec["offset"])
    best: dict = {}
    for state, entry in entries:
        # an entry vouches with the hash state at its offset, or (an append of one chunk,
        # finished before its hash was) with the state where it began and an xxh3 of
        # the bytes it added
        vouched = entry.get("from", entry["offset"])
        for chunk in journal.read(hasher.size, vouched):
            hasher.update(chunk)
        claimed = hashstate.ResumableHash.restore(
            saved["algorithm"], bytes.fromhex(entry["hash"]["state"]), vouched)
        if hasher.size != vouched or hasher.digest() != claimed.digest():
            break  # an append the power cut caught half written: later ones cannot hold
        if "tail" in entry:
            tail = xxhash.xxh3_64()
            for chunk in journal.read(vouched, entry["offset"]):
                tail.update(chunk)
                hasher.update(chunk)
            if hasher.size != entry["offset"] or tail.hexdigest() != entry["tail"]:
                break
        best = {"offset": entry["offset"], "backend": state,
                "hash": {"algorithm": hasher.algorithm, "state": hasher.state().hex()}}
        if "compress" in entry:
            best["compress"] = entry["compress"]
    return best
