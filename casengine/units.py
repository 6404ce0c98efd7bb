"""Human units at the edges: durations like ``30s``, ``15m``, ``1h``, ``7d`` and sizes like ``64M``."""

from __future__ import annotations

import re

from casengine.errors import InvalidInput

# ASCII digits only (``\d`` takes any Unicode digit), and few enough that the value stays
# finite: a thousand nines would make an infinite size or duration
_NUMBER = r"[0-9]{1,30}(?:\.[0-9]{1,30})?"
_DURATION = re.compile(rf"({_NUMBER})(ms|s|m|h|d|w)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(rf"({_NUMBER})\s*(?:([kmgt])i?b?|b?)", re.IGNORECASE)
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """``'90s'``, ``'15m'``, ``'1h30m'``, ``'7d'`` -> seconds. A bare number is seconds.

    Units go from largest to smallest, each at most once.
    """
    s = text.strip().lower()
    if re.fullmatch(_NUMBER, s):
        return float(s)
    parts = _DURATION.findall(s)
    units = [u for _, u in parts]
    ordered = units == sorted(set(units), key=lambda u: -_SECONDS[u])
    if not s or "".join(n + u for n, u in parts) != s or not ordered:
        raise InvalidInput(f"invalid duration {text!r}: write it like 30s, 15m, 1h30m or 7d")
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def format_duration(seconds: float) -> str:
    """Seconds as ``1d2h3m4s`` (largest units first); parse_duration reads it back."""
    if 0 < seconds < 60 and seconds != int(seconds):
        return f"{seconds:g}s"
    left = round(seconds)
    if left <= 0:
        return "0s"
    out = []
    for unit in ("d", "h", "m", "s"):
        n, left = divmod(left, _SECONDS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def parse_size(text: str) -> int:
    """``'64M'``, ``'1G'``, ``'512k'``, ``'100'`` -> bytes (binary multiples)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise InvalidInput(f"invalid size {text!r}: write it like 512k, 64M or 1G")
    return int(float(m[1]) * _BYTES[(m[2] or "").lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
