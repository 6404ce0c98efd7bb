"""Byte ranges: ``Range`` on blob GETs (RFC 9110) and ``Content-Range`` on upload PATCHes."""

from __future__ import annotations

import re

from casengine.http.asgi import HTTPError

_SPEC = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?\s*(\d+)-(\d+)(?:/(?:\d+|\*))?")
#: More ranges than this in one request is an abuse, not a partial pull.
MAX_RANGES = 100


def parse_range(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """``[(start, end_inclusive), ...]`` for a satisfiable Range, None to send it all.

    A header we cannot parse is ignored (the whole blob is sent), as RFC 9110 allows; a
    syntactically fine one that no byte of the blob satisfies is a 416.
    """
    if not header or not header.strip().lower().startswith("bytes="):
        return None
    specs = header.strip()[6:].split(",")
    if len(specs) > MAX_RANGES:
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        m = _SPEC.fullmatch(spec)
        if not m or (not m[1] and not m[2]):
            return None
        if not m[1]:  # suffix: the last N bytes
            n = int(m[2])
            if n == 0:
                continue
            ranges.append((max(0, size - n), size - 1))
            continue
        start = int(m[1])
        if m[2] and int(m[2]) < start:
            return None  # malformed: ignored, the whole blob is sent
        if start >= size:
            continue  # unsatisfiable on its own
        end = int(m[2]) if m[2] else size - 1
        ranges.append((start, min(end, size - 1)))
    if not ranges:
        raise HTTPError(416, "BLOB_UNKNOWN", f"no byte of the range {header!r} is in a blob of "
                        f"{size} bytes", headers={"Content-Range": f"bytes */{size}"})
    return ranges


def parse_content_range(header: str) -> tuple[int, int]:
    """``start-end`` (inclusive) of an upload chunk; the spec's form and RFC 9110's both."""
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m or int(m[2]) < int(m[1]):
        raise HTTPError(416, "BLOB_UPLOAD_INVALID", f"invalid Content-Range {header!r}: "
                        "want <start>-<end>")
    return int(m[1]), int(m[2])
