"""Where things live in a backend. Every key casengine writes is built here.

The layout is self-describing: the index can be rebuilt from the backend alone, because a
blob's key names its digest and the codec its bytes are stored in::

    <root>/                                  a directory, a bucket prefix, ...
    +-- blobs/
    |   +-- sha256/
    |   |   +-- 3f/                          first two hex digits: fan-out
    |   |       +-- 3fa9...c2.raw            the logical bytes, stored as they are
    |   |       +-- 3fa9...c2.zst            or: seekable zstd frames of those bytes
    |   +-- sha512/
    |       +-- ...
    +-- repositories/
    |   +-- team/project/app/                the repository's name, as it is
    |       +-- _repo                        JSON: created at
    |       +-- _links/sha256/3fa9...c2      empty: the blob is readable here
    |       +-- _manifests/sha256/77e0...1d  empty: a manifest of this repository
    |       +-- _tags/v1.2                   the digest the tag points at
    +-- uploads/
    |   +-- 9c1e...(32 hex)/                 one chunked upload session's staged bytes
    |       +-- data                         local: one file, appended in place; two slots
    |                                        past the bytes journal the session
    |       +-- 0000000000000000 ...         generic: one object per append, by offset
    |       +-- pending, data                S3: the tail below a part, the multipart target
    +-- index-mark                           JSON: the index used with the store, how far
    |                                        it had got (casengine.index_binding)
    +-- .tmp/                                local roots: temp files before rename
    +-- .index/                              local roots: the LMDB index (default place)

A blob is stored under exactly one codec at a time. Keys that start with a dot never name
an object (see :func:`casengine.backend.check_key`), so ``.tmp`` and ``.index`` cannot be
listed, read or overwritten through the backend.
"""

from __future__ import annotations

import re

from casengine.digest import ALGORITHMS, Digest

BLOBS = "blobs/"
UPLOADS = "uploads/"
REPOSITORIES = "repositories/"
INDEX_MARK = "index-mark"

#: Stored codecs and their key suffix.
RAW = "raw"
#: Seekable zstd frames of the logical bytes (see :mod:`casengine.seekable`).
ZST = "zst"
CODECS = (RAW, ZST)

_BLOB_KEY = re.compile(
    r"blobs/(?P<alg>[a-z0-9]+)/(?P<fan>[a-f0-9]{2})/(?P<hex>[a-f0-9]+)\.(?P<codec>[a-z0-9]+)"
)


def blob_key(digest: Digest, codec: str = RAW) -> str:
    return f"{BLOBS}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}.{codec}"


def upload_key(upload_id: str) -> str:
    """The prefix under which an upload session's bytes are staged."""
    return f"{UPLOADS}{upload_id}"


def repo_key(repository: str, *parts: str) -> str:
    """A repository's record keys. Names are validated OCI names, safe as key parts; no
    name component can start with '_', so ``_tags`` and friends never clash with one."""
    return "/".join((REPOSITORIES + repository, *parts))


def link_key(repository: str, digest: Digest) -> str:
    return repo_key(repository, "_links", digest.algorithm, digest.hex)


def manifest_key(repository: str, digest: Digest) -> str:
    return repo_key(repository, "_manifests", digest.algorithm, digest.hex)


def tag_key(repository: str, tag: str) -> str:
    return repo_key(repository, "_tags", tag)


def parse_blob_key(key: str) -> tuple[Digest, str] | None:
    """The digest and codec a blob key names, or None if ``key`` is not a blob key."""
    m = _BLOB_KEY.fullmatch(key)
    if not m or m["alg"] not in ALGORITHMS or len(m["hex"]) != ALGORITHMS[m["alg"]]:
        return None
    if m["fan"] != m["hex"][:2] or m["codec"] not in CODECS:
        return None
    return Digest(m["alg"], m["hex"]), m["codec"]


def parse_tag_record(data: bytes) -> str | None:
    """The digest a ``_tags/`` record names, or None if its bytes name none: a damaged
    record must read as unusable, never as a failure of whoever reads it."""
    try:
        return str(Digest.parse(data.decode("ascii").strip()))
    except ValueError:  # bytes that are no text (UnicodeDecodeError), or no digest
        return None
