"""Digests, repository names, tags and references against hostile text.

Each parser is held to a reference model written straight from the specs (the regular
expressions of the OCI image and distribution specs, anchored with ``\\Z`` so a trailing
newline cannot slip through), and to three properties: it never raises anything but the
project's own errors, it round-trips through its formatter, and what it accepts is safe
to use in a backend key (no ``..``, no absolute path, no backslash, no NUL).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from casengine.digest import ALGORITHMS, Digest, parse_digest
from casengine.errors import InvalidDigest, InvalidInput, InvalidName, UnsupportedAlgorithm
from casengine.registry.names import MAX_NAME, Reference, check_name, check_tag
from tests.fuzz.budget import fuzz

# -- reference models, from the specs -------------------------------------------------------

#: image-spec descriptor.md: the general digest grammar
SPEC_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")
#: the registered algorithms casengine implements
SPEC_REGISTERED = re.compile(r"(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})\Z")
#: distribution-spec: repository names and tags
SPEC_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*\Z")
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")

# -- strategies -----------------------------------------------------------------------------

#: characters that break paths, shells and parsers, mixed into otherwise plausible text
HOSTILE = st.sampled_from(["..", "/", "\\", "\x00", "%2e", "%2f", "\n", " ", ":", "@", "A",
                           "\u0663", "\uff0e", "\u212a", "-", "_", "__", ".", "*", "\udc80"])


def mutated(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid string with a hostile fragment inserted, replacing, or appended."""
    @st.composite
    def build(draw: st.DrawFn) -> str:
        text = draw(base)
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        return text[:at] + draw(HOSTILE) + text[at + cut:]
    return build()


HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
VALID_DIGESTS = st.one_of(
    HEX64.map(lambda h: f"sha256:{h}"),
    st.text("0123456789abcdef", min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
)
#: any digest of the general grammar (other algorithms, other encodings), built by hand:
#: from_regex is slow on it
GRAMMAR_DIGESTS = st.tuples(
    st.lists(st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=8),
             min_size=1, max_size=3),
    st.sampled_from("+._-"),
    st.text(string.ascii_letters + string.digits + "=_-", min_size=1, max_size=140),
).map(lambda t: t[1].join(t[0]) + ":" + t[2])
DIGEST_TEXT = st.one_of(st.text(), VALID_DIGESTS, mutated(VALID_DIGESTS), GRAMMAR_DIGESTS)
ALNUM = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
SEPARATOR = st.sampled_from([".", "_", "__", "-", "--", "---"])
#: built, not drawn from_regex(SPEC_NAME): that strategy is very slow on this grammar
COMPONENTS = st.tuples(ALNUM, st.lists(st.tuples(SEPARATOR, ALNUM), max_size=3)).map(
    lambda c: c[0] + "".join(sep + part for sep, part in c[1]))
VALID_NAMES = st.lists(COMPONENTS, min_size=1, max_size=5).map("/".join).filter(
    lambda n: len(n) <= MAX_NAME)
NAME_TEXT = st.one_of(st.text(), VALID_NAMES, mutated(VALID_NAMES))
VALID_TAGS = st.tuples(st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=1),
                       st.text(string.ascii_letters + string.digits + "._-", max_size=127)).map(
    "".join)
TAG_TEXT = st.one_of(st.text(), VALID_TAGS, mutated(VALID_TAGS))


def key_safe(text: str) -> bool:
    """Usable as (part of) a backend key as it is: it cannot leave the root."""
    return (not text.startswith("/") and "\\" not in text and "\x00" not in text
            and ".." not in text.split("/") and posixpath.normpath(text) == text)


# -- digests --------------------------------------------------------------------------------


@fuzz()
@given(DIGEST_TEXT)
@example("sha256:" + "a" * 64 + "\n")
@example("SHA256:" + "a" * 64)
@example("sha256:" + "A" * 64)
@example("sha256:" + "\u0663" * 64)
@example("sha384:" + "a" * 96)
@example("sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564")
def test_digest_parse_agrees_with_the_spec(text: str) -> None:
    try:
        d = Digest.parse(text)
    except UnsupportedAlgorithm:
        assert SPEC_DIGEST.match(text) and text.split(":", 1)[0] not in ALGORITHMS
        return
    except InvalidDigest:
        assert not SPEC_REGISTERED.match(text)
        return
    assert SPEC_REGISTERED.match(text), text
    assert str(d) == text and parse_digest(d) is d and Digest.parse(str(d)) == d
    assert key_safe(d.hex) and key_safe(d.algorithm)


@fuzz(0.3)
@given(st.binary(max_size=4096), st.sampled_from(sorted(ALGORITHMS)))
def test_digest_of_round_trips_and_matches_hashlib(data: bytes, algorithm: str) -> None:
    d = Digest.of(data, algorithm)
    assert d.hex == hashlib.new(algorithm, data).hexdigest()
    assert Digest.parse(str(d)) == d


@fuzz(0.3)
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_digest_parse_refuses_non_strings_with_its_own_error(value: object) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(value)  # type: ignore[arg-type]


# -- repository names and tags ---------------------------------------------------------------


@fuzz()
@given(NAME_TEXT)
@example("..")
@example("a/../b")
@example("a/./b")
@example("/etc/passwd")
@example("a\\..\\b")
@example("a\x00b")
@example("a/b\n")
@example("a" * (MAX_NAME + 1))
@example("a--b/c__d/e.f")
@example("a___b")
def test_check_name_agrees_with_the_spec(text: str) -> None:
    want = bool(SPEC_NAME.match(text)) and len(text) <= MAX_NAME
    try:
        assert check_name(text) == text
    except InvalidName as exc:
        assert not want, f"refused a valid name {text!r}: {exc}"
        assert len(str(exc)) < 400  # the message quotes the name, but not all of a huge one
        return
    assert want, f"accepted {text!r}, which the spec refuses"
    assert key_safe(text)


@fuzz()
@given(TAG_TEXT)
@example("a" * 129)
@example(".hidden")
@example("-x")
@example("v1\n")
@example("..")
def test_check_tag_agrees_with_the_spec(text: str) -> None:
    want = bool(SPEC_TAG.match(text))
    try:
        assert check_tag(text) == text
    except InvalidName:
        assert not want, text
        return
    assert want, text
    assert "/" not in text and key_safe(text)


# -- references ------------------------------------------------------------------------------

REFERENCE_TEXT = st.one_of(
    st.text(),
    st.tuples(VALID_NAMES, VALID_TAGS).map(":".join),
    st.tuples(VALID_NAMES, VALID_DIGESTS).map("@".join),
    mutated(st.tuples(VALID_NAMES, VALID_TAGS).map(":".join)),
    mutated(st.tuples(VALID_NAMES, VALID_DIGESTS).map("@".join)),
)


@fuzz()
@given(REFERENCE_TEXT)
@example("localhost:5000/a:b")
@example("a@sha256:" + "0" * 64 + "@x")
@example("a:b@sha256:" + "0" * 64)
@example(":")
@example("@")
def test_reference_parse_round_trips_or_refuses(text: str) -> None:
    try:
        ref = Reference.parse(text)
    except InvalidInput:
        return
    assert str(ref) == text
    assert Reference.parse(str(ref)) == ref
    assert SPEC_NAME.match(ref.repository)
    if ref.tag is not None:
        assert ref.digest is None and SPEC_TAG.match(ref.tag) and ref.ref == ref.tag
    else:
        assert ref.digest is not None and SPEC_REGISTERED.match(ref.ref)


@fuzz(0.5)
@given(VALID_NAMES, st.one_of(VALID_TAGS, VALID_DIGESTS))
def test_every_valid_reference_parses(name: str, ref: str) -> None:
    text = f"{name}@{ref}" if ":" in ref else f"{name}:{ref}"
    parsed = Reference.parse(text)
    assert (parsed.repository, parsed.ref) == (name, ref)


def test_reference_parse_refuses_non_strings_with_its_own_error() -> None:
    """Regression: ``Reference.parse(5)`` was a TypeError, outside the error root."""
    with pytest.raises(InvalidName):
        Reference.parse(5)  # type: ignore[arg-type]
