"""casengine.units: durations and sizes written by humans."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casengine.errors import InvalidInput
from casengine.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("1h", 3600), ("7d", 7 * 86400), ("1h30m", 5400),
    ("2w", 14 * 86400), ("250ms", 0.25), ("1.5h", 5400), ("90", 90), ("0s", 0),
    (" 15m ", 900), ("1D", 86400), ("1d12h", 36 * 3600), ("1m30s", 90),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", " ", "s", "h1", "30x", "-5s", "1h 30m", "1.h", "1,5h", "30 s", "1e3s", "abc", "30s!",
    "forever", "1hh",
])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(("seconds", "text"), [
    (30, "30s"), (900, "15m"), (3600, "1h"), (7 * 86400, "7d"), (86400, "1d"), (5400, "1h30m"),
    (1.5, "1.5s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


@given(st.integers(min_value=0, max_value=999_999))
def test_duration_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**4).map(lambda n: n * 60))
def test_whole_minutes_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("seconds", [1_000_001, 12_345_678])
def test_large_durations_round_trip(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(("text", "size"), [
    ("100", 100), ("0", 0), ("512k", 512 << 10), ("512K", 512 << 10), ("64M", 64 << 20),
    ("1G", 1 << 30), ("2T", 2 << 40), ("64MiB", 64 << 20), ("64MB", 64 << 20), ("64Mi", 64 << 20),
    ("1.5k", 1536), ("10 M", 10 << 20), ("100B", 100), (" 1g ", 1 << 30),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "1X", "1 GB extra", "1e6", "one", "1..5k",
                                  "0x10", "12kk"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["100i", "5ib"])
def test_binary_suffix_without_a_unit_is_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_size(text)


@pytest.mark.parametrize("text", ["1m1m", "1s1h"])
def test_repeated_or_unordered_units_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(text)


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (64 << 20, "64.0 MiB"),
    (1 << 30, "1.0 GiB"), (3 << 40, "3.0 TiB"), (5000 << 40, "5000.0 TiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
