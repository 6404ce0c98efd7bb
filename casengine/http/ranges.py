"""Byte ranges: ``Range`` on blob GETs (RFC 9110) and ``Content-Range`` on upload PATCHes."""

from __future__ import annotations

import re

from casengine.http.asgi import HTTPError

# ASCII digits only: RFC 9110's DIGIT (``\d`` takes any Unicode digit)
_SPEC = re.compile(r"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?[ \t]*([0-9]+)-([0-9]+)(?:/(?:[0-9]+|\*))?")
#: Past any real offset; stands for positions of more than 19 digits.
_BEYOND = 1 << 64
#: More ranges than this in one request is an abuse, not a partial pull.
MAX_RANGES = 100


def _pos(digits: str) -> int:
    """A byte position; int() would refuse thousands of digits (a ValueError, so a 500)."""
    return int(digits) if len(digits) <= 19 else _BEYOND


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
            n = _pos(m[2])
            if n == 0:
                continue
            if size == 0:
                return None  # satisfiable, but there is no byte to range over: send it all
            ranges.append((max(0, size - n), size - 1))
            continue
        start = _pos(m[1])
        if m[2] and _pos(m[2]) < start:
            return None  # malformed: ignored, the whole blob is sent
        if start >= size:
            continue  # unsatisfiable on its own
        end = _pos(m[2]) if m[2] else size - 1
        ranges.append((start, min(end, size - 1)))
    if not ranges:
        raise HTTPError(416, "BLOB_UNKNOWN", f"no byte of the range {header[:200]!r} is in a "
                        f"blob of {size} bytes", headers={"Content-Range": f"bytes */{size}"})
    return ranges


def parse_content_range(header: str) -> tuple[int, int]:
    """``start-end`` (inclusive) of an upload chunk; the spec's form and RFC 9110's both."""
    m = _CONTENT_RANGE.fullmatch(header.strip())
    if not m or _pos(m[2]) < _pos(m[1]) or _pos(m[2]) == _BEYOND:
        raise HTTPError(416, "BLOB_UPLOAD_INVALID", f"invalid Content-Range {header[:200]!r}: "
                        "want <start>-<end>")
    return _pos(m[1]), _pos(m[2])
