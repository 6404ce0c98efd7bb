"""Coverage-guided fuzzing of casengine's parsers with atheris (libFuzzer for Python).

Run it for as long as you like; CI runs it for a few seconds (tests/fuzz/test_atheris.py)::

    mkdir -p /tmp/corpus
    python3 fuzz/fuzz_parsers.py /tmp/corpus fuzz/corpus -max_total_time=300 -artifact_prefix=/tmp/crash-

The first byte of each input picks a parser, the rest is its input; fuzz/corpus/ holds
seeds, among them every input that once crashed a parser. A parser may return
or raise the project's own errors (:class:`casengine.errors.CASError`, and
:class:`casengine.http.asgi.HTTPError` for headers); anything else is a crash, and
libFuzzer writes the input that caused it next to ``-artifact_prefix``. Replay one with
``python3 fuzz/fuzz_parsers.py CRASH-FILE``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["casengine"]):
    from casengine.credentials import Grant, verify_secret
    from casengine.digest import Digest
    from casengine.errors import CASError
    from casengine.http.asgi import HTTPError
    from casengine.http.auth import parse_scopes
    from casengine.http.ranges import parse_content_range, parse_range
    from casengine.registry.manifests import parse_manifest
    from casengine.registry.names import Reference, check_name, check_tag
    from casengine.units import parse_duration, parse_size

#: Stand-in blob sizes for Range: empty, tiny, and large.
_SIZES = (0, 1, 10, 1 << 40)
_CONTENT_TYPES = ("", "application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.oci.image.index.v1+json", "application/json")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _range(data: bytes) -> None:
    size = _SIZES[data[0] % len(_SIZES)] if data else 0
    ranges = parse_range(_text(data[1:]), size)
    for start, end in ranges or ():
        if not 0 <= start <= end < size:
            raise AssertionError(f"range {start}-{end} outside a blob of {size} bytes")


def _content_range(data: bytes) -> None:
    start, end = parse_content_range(_text(data))
    if not 0 <= start <= end:
        raise AssertionError(f"content range {start}-{end}")


def _digest(data: bytes) -> None:
    text = _text(data)
    if str(Digest.parse(text)) != text:
        raise AssertionError(f"digest {text!r} does not round-trip")


def _reference(data: bytes) -> None:
    text = _text(data)
    if str(Reference.parse(text)) != text:
        raise AssertionError(f"reference {text!r} does not round-trip")


def _name(data: bytes) -> None:
    text = _text(data)
    check_name(text)
    if ".." in text.split("/") or text.startswith("/") or "\\" in text or "\0" in text:
        raise AssertionError(f"accepted the unsafe name {text!r}")


def _manifest(data: bytes) -> None:
    content_type = _CONTENT_TYPES[data[0] % len(_CONTENT_TYPES)] if data else None
    parse_manifest(data[1:], content_type)


def _grant(data: bytes) -> None:
    text = _text(data)
    grant = Grant.parse(text)
    if Grant.parse(str(grant)) != grant:
        raise AssertionError(f"grant {text!r} does not round-trip")


def _secret(data: bytes) -> None:
    secret, _, stored = _text(data).partition("\n")
    if stored.split("$")[1:2] != ["16384"] and verify_secret(secret, stored):  # no slow costs
        raise AssertionError(f"{secret!r} verified against {stored!r}")


#: The first byte of an input picks the target (its index modulo the count): keep the
#: order, the seeds in fuzz/corpus/ depend on it.
TARGETS = (
    _range, _content_range, _digest, _reference, _name, _manifest, _grant, _secret,
    lambda data: check_tag(_text(data)),
    lambda data: parse_scopes(_text(data).split("\n")),
    lambda data: parse_duration(_text(data)),
    lambda data: parse_size(_text(data)),
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    try:
        TARGETS[data[0] % len(TARGETS)](data[1:])
    except (CASError, HTTPError):
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
