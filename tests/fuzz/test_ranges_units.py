"""``Range`` and ``Content-Range`` headers, and the CLI's durations and sizes, against
hostile text.

The properties: a header either parses into ranges inside the blob, or is ignored (the
whole blob is sent, as RFC 9110 allows), or is a clean 416; never another exception.
Well-formed headers, built from the numbers they carry, parse back to those numbers.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from casengine.errors import InvalidInput
from casengine.http.asgi import HTTPError
from casengine.http.ranges import MAX_RANGES, parse_content_range, parse_range
from casengine.units import format_duration, format_size, parse_duration, parse_size
from tests.fuzz.budget import fuzz

HUGE = "9" * 5000  # past int()'s 4300-digit limit: once a ValueError, a 500 over HTTP
POSITIONS = st.one_of(st.integers(0, 2000), st.integers(0, 1 << 70))
SIZES = st.integers(0, 2000)
NUMBERISH = st.one_of(POSITIONS.map(str), st.just(""), st.just(HUGE), st.sampled_from(
    ["\u0663", "\u00b2", "-1", " 1", "1 ", "0x10", "1e3", "+1", "\t2"]))


@st.composite
def range_headers(draw: st.DrawFn) -> str:
    """``bytes=a-b, c-, -d`` with hostile numbers and separators mixed in."""
    specs = draw(st.lists(st.tuples(NUMBERISH, NUMBERISH), min_size=0, max_size=6))
    prefix = draw(st.sampled_from(["bytes=", "BYTES=", " bytes=", "bytes =", "items=", ""]))
    sep = draw(st.sampled_from([",", ", ", " ,", ";"]))
    return prefix + sep.join(f"{a}-{b}" for a, b in specs)


RANGE_TEXT = st.one_of(st.text(), range_headers())


@fuzz()
@given(RANGE_TEXT, SIZES)
@example("bytes=" + HUGE + "-", 10)
@example("bytes=0-" + HUGE, 10)
@example("bytes=-" + HUGE, 10)
@example("bytes=-5", 0)
@example("bytes=0-", 0)
@example("bytes=\u0663-\u0664", 10)
@example("bytes=" + ",".join(["0-0"] * (MAX_RANGES + 1)), 10)
def test_parse_range_stays_inside_the_blob(header: str, size: int) -> None:
    try:
        ranges = parse_range(header, size)
    except HTTPError as exc:
        assert exc.status == 416 and exc.headers["Content-Range"] == f"bytes */{size}"
        return
    if ranges is None:
        return
    assert 1 <= len(ranges) <= MAX_RANGES
    for start, end in ranges:
        assert 0 <= start <= end < size, (header, size, ranges)


@fuzz()
@given(st.lists(st.tuples(POSITIONS, st.one_of(st.none(), POSITIONS)), min_size=1, max_size=5),
       SIZES)
def test_parse_range_model(specs: list[tuple[int, int | None]], size: int) -> None:
    """Well-formed ``first-last`` and ``first-`` specs mean exactly what RFC 9110 says."""
    header = "bytes=" + ",".join(f"{a}-{'' if b is None else b}" for a, b in specs)
    if any(b is not None and b < a for a, b in specs):
        assert parse_range(header, size) is None  # invalid: ignored, the whole blob is sent
        return
    want = [(a, size - 1 if b is None else min(b, size - 1)) for a, b in specs if a < size]
    if not want:
        with pytest.raises(HTTPError) as refused:
            parse_range(header, size)
        assert refused.value.status == 416
        return
    assert parse_range(header, size) == want


@fuzz(0.5)
@given(st.integers(1, 1 << 40), st.integers(1, 1 << 40))
def test_parse_range_suffix_model(n: int, size: int) -> None:
    assert parse_range(f"bytes=-{n}", size) == [(max(0, size - n), size - 1)]


def test_suffix_range_of_an_empty_blob_sends_it_all() -> None:
    """Regression: ``bytes=-5`` on a 0-byte blob gave the range (0, -1), so a response with
    ``Content-Range: bytes 0--1/0``."""
    assert parse_range("bytes=-5", 0) is None


def test_huge_positions_are_not_a_value_error() -> None:
    """Regression: 5000 digits made int() raise ValueError, which HTTP turned into a 500."""
    assert parse_range(f"bytes=0-{HUGE}", 10) == [(0, 9)]
    assert parse_range(f"bytes=-{HUGE}", 10) == [(0, 9)]
    with pytest.raises(HTTPError) as refused:
        parse_range(f"bytes={HUGE}-", 10)
    assert refused.value.status == 416
    with pytest.raises(HTTPError) as refused:
        parse_content_range(f"{HUGE}-{HUGE}")
    assert refused.value.status == 416


CONTENT_RANGE_TEXT = st.one_of(
    st.text(),
    st.tuples(st.sampled_from(["", "bytes ", "bytes=", "bytes  "]), NUMBERISH, NUMBERISH,
              st.sampled_from(["", "/*", "/10", "/" + HUGE, "/x"])).map(
        lambda t: f"{t[0]}{t[1]}-{t[2]}{t[3]}"),
)


@fuzz()
@given(CONTENT_RANGE_TEXT)
@example("\u0663-\u0664")
@example("0-" + HUGE)
def test_parse_content_range_is_a_range_or_a_416(header: str) -> None:
    try:
        start, end = parse_content_range(header)
    except HTTPError as exc:
        assert (exc.status, exc.code) == (416, "BLOB_UPLOAD_INVALID")
        return
    assert 0 <= start <= end
    assert header.strip().endswith(str(end)) or "/" in header


@fuzz(0.5)
@given(POSITIONS, st.integers(0, 1 << 40), st.sampled_from(["{s}-{e}", "bytes {s}-{e}/*",
                                                            "bytes {s}-{e}/{t}", "bytes={s}-{e}"]))
def test_parse_content_range_round_trip(start: int, length: int, form: str) -> None:
    end = start + length
    if len(str(end)) > 19:
        return  # beyond any real blob: refused (see test_huge_positions_are_not_a_value_error)
    assert parse_content_range(form.format(s=start, e=end, t=end + 1)) == (start, end)


# -- durations and sizes ---------------------------------------------------------------------

UNIT_TEXT = st.one_of(
    st.text(),
    st.lists(st.tuples(NUMBERISH, st.sampled_from(["ms", "s", "m", "h", "d", "w", "k", "M", "G",
                                                   "KiB", "kb", "T", "", " ", "x"])),
             max_size=4).map(lambda parts: "".join(n + u for n, u in parts)),
)


@fuzz()
@given(UNIT_TEXT)
@example(HUGE)
@example(HUGE + "s")
@example("9" * 400 + "G")
@example("\u0663k")
@example("1.5.5s")
def test_parse_duration_is_finite_or_refused(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except InvalidInput:
        return
    assert math.isfinite(seconds) and seconds >= 0, (text, seconds)
    assert text.strip().isascii()
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-9, abs=0.5)


@fuzz()
@given(UNIT_TEXT)
@example(HUGE)
@example("9" * 400)
@example("9" * 400 + "T")
@example("\u0663k")
def test_parse_size_is_a_whole_number_or_refused(text: str) -> None:
    """Regression: 400 nines was float('inf') and then an OverflowError, a CLI traceback."""
    try:
        n = parse_size(text)
    except InvalidInput:
        return
    assert isinstance(n, int) and n >= 0
    assert text.strip().isascii()


@fuzz(0.5)
@given(st.integers(0, 10 * 365 * 86400))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@fuzz(0.5)
@given(st.integers(0, 1 << 50))
def test_size_round_trip_within_the_rounding(n: int) -> None:
    """format_size shows one decimal: it parses back to within 5 %."""
    assert parse_size(format_size(n)) == pytest.approx(n, rel=0.05, abs=1)
