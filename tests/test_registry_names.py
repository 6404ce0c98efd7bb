"""casengine.registry.names: repository names, tags and references per the OCI grammar, and
that a bad name reaching the registry is refused before anything is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from casengine.digest import Digest
from casengine.engine import Engine
from casengine.errors import InvalidDigest, InvalidInput, InvalidName
from casengine.registry import Reference, Registry, check_name, check_tag
from casengine.registry.manifests import OCI_INDEX
from tests.helpers import KINDS, digest_of, open_engine
from tests.registry_helpers import snapshot

GOOD_NAMES = [
    "a", "0", "library/ubuntu", "team/project/app", "a__b", "a--b", "a---b", "a-b", "a.b",
    "a_b", "a.b-c_d__e", "9/8/7", "a" * 255, ("ab/" * 85)[:-1],
]

# name -> a fragment the error message must contain (what is wrong)
BAD_NAMES = {
    "../x": "'..'",
    "A": "uppercase",
    "Team/app": "uppercase",
    "a//b": "empty path component",
    "/a": "empty path component",
    "a/": "empty path component",
    "-a": "'-a'",
    "a-": "'a-'",
    "_a": "'_a'",
    "a_": "'a_'",
    ".a": "'.a'",
    "a.": "'a.'",
    "a___b": "'a___b'",
    "a..b": "'a..b'",
    "a._b": "'a._b'",
    "a b": "'a b'",
    "a:b": "'a:b'",
    "a@b": "'a@b'",
    "a/../b": "'..'",
    "a/./b": "'.'",
    "a\\b": "'a\\\\b'",
    "ü": "'ü'",
    "a\0b": "component",
    "a\nb": "component",
    "": "empty",
    "a" * 256: "256 characters, at most 255",
}


@pytest.mark.parametrize("name", GOOD_NAMES, ids=lambda n: n if len(n) < 20 else f"len{len(n)}")
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(("name", "why"), BAD_NAMES.items(),
                         ids=[repr(n) if len(n) < 20 else f"len{len(n)}" for n in BAD_NAMES])
def test_bad_names_quote_the_name_and_say_why(name: str, why: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_name(name)
    msg = str(info.value)
    assert msg.startswith("invalid repository name ")
    shown = repr(name) if len(name) <= 80 else repr(name[:80] + "...")
    assert shown in msg, msg
    assert why in msg.split(": ", 1)[1], msg
    assert "\n" not in msg  # one line, even for a name with a newline in it
    assert isinstance(info.value, InvalidInput)  # exit code 4 in the CLI


def test_name_length_limit_is_255() -> None:
    check_name("a" * 255)
    check_name("a/" * 127 + "a")  # 255 with separators
    with pytest.raises(InvalidName, match="256 characters"):
        check_name("a/" * 127 + "ab")
    with pytest.raises(InvalidName, match="1000 characters"):
        check_name("a" * 1000)


@pytest.mark.parametrize("value", [None, 3, b"abc", ["a"]])
def test_name_that_is_not_a_string(value: object) -> None:
    with pytest.raises(InvalidName, match="not a string"):
        check_name(value)  # type: ignore[arg-type]


# An independent reading of the grammar, written without a regular expression.
_ALNUM = set("abcdefghijklmnopqrstuvwxyz0123456789")


def _component_ok(part: str) -> bool:
    if not part or part[0] not in _ALNUM or part[-1] not in _ALNUM:
        return False
    separator = ""
    for ch in part + "a":
        if ch in _ALNUM:
            if separator and separator not in (".", "_", "__") and set(separator) != {"-"}:
                return False
            separator = ""
        else:
            separator += ch
    return True


def _reference_ok(name: str) -> bool:
    return 0 < len(name) <= 255 and all(_component_ok(p) for p in name.split("/"))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab9._-/A:", max_size=10))
def test_grammar_agrees_with_an_independent_reading(name: str) -> None:
    accepted = True
    try:
        check_name(name)
    except InvalidName:
        accepted = False
    assert accepted == _reference_ok(name), name


# -- tags ------------------------------------------------------------------------------------

GOOD_TAGS = ["latest", "v1.2.3", "V1", "_", "a", "1", "a-b_c.d", "x" * 128, "_x.", "a..b",
             "a--", "sha256-abc"]
BAD_TAGS = ["", ".hidden", "-rc", "x" * 129, "a/b", "a:b", "a@b", "a b", "ü", "a\nb", "..",
            "a+b"]


@pytest.mark.parametrize("tag", GOOD_TAGS, ids=lambda t: t if len(t) < 20 else f"len{len(t)}")
def test_good_tags(tag: str) -> None:
    assert check_tag(tag) == tag


@pytest.mark.parametrize("tag", BAD_TAGS, ids=lambda t: repr(t) if len(t) < 20 else f"len{len(t)}")
def test_bad_tags(tag: str) -> None:
    with pytest.raises(InvalidName) as info:
        check_tag(tag)
    msg = str(info.value)
    assert msg.startswith("invalid tag ")
    assert repr(tag) in msg
    assert "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}" in msg  # says what a tag may be


# -- references ------------------------------------------------------------------------------

D = digest_of(b"x")


@pytest.mark.parametrize(("text", "repo", "tag", "digest"), [
    ("a:b", "a", "b", None),
    ("team/app:v1.0", "team/app", "v1.0", None),
    (f"team/app@{D}", "team/app", None, D),
    ("a/b/c:_", "a/b/c", "_", None),
])
def test_reference_parse(text: str, repo: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert ref.repository == repo
    assert ref.tag == tag
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert ref.ref == (tag or digest)
    assert str(ref) == text


@pytest.mark.parametrize(("text", "error"), [
    ("app", InvalidName),  # neither tag nor digest
    ("App:v1", InvalidName),
    ("../x:v1", InvalidName),
    ("app:", InvalidName),
    ("app:.v1", InvalidName),
    ("app:v1/x", InvalidName),
    ("app@sha256:abc", InvalidDigest),
    ("app@latest", InvalidDigest),
])
def test_bad_references(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Reference.parse(text)


# -- bad names through the registry: refused before anything is written ----------------------


@pytest.fixture(params=KINDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(request.param, tmp_path)
    yield e
    e.close()


@pytest.mark.parametrize("name", ["../x", "A", "a//b", "-a", "a-", "a/", "a" * 256, "a___b",
                                  "a..b", "..", "../../etc"])
def test_registry_refuses_bad_names_and_writes_nothing(engine: Engine, tmp_path: Path,
                                                       name: str) -> None:
    reg = Registry(engine)
    before = snapshot(reg)
    outside = sorted(p.name for p in tmp_path.iterdir())
    calls = [
        lambda: reg.create_repository(name),
        lambda: reg.ingest_blob(name, b"layer"),
        lambda: reg.start_upload(name),
        lambda: reg.mount(name, digest_of(b"layer")),
        lambda: reg.put_manifest(name, "v1", b"{}"),
        lambda: reg.tags(name),
        lambda: reg.resolve(name, "v1"),
        lambda: reg.repository_exists(name),
    ]
    for call in calls:
        with pytest.raises(InvalidName) as info:
            call()
        assert repr(name if len(name) <= 80 else name[:80] + "...") in str(info.value)
    assert snapshot(reg) == before
    assert list(engine.uploads.list()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == outside  # nothing escaped the root


def test_registry_refuses_bad_tags_and_writes_nothing(engine: Engine) -> None:
    reg = Registry(engine)
    reg.create_repository("app")
    empty_index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    reg.put_manifest("team/ok", "v1", empty_index.encode())  # the manifest itself is fine
    before = snapshot(reg)
    for repo in ("app", "new"):
        for tag in (".x", "-x", "x" * 129, "a/b", ""):
            with pytest.raises(InvalidName) as info:
                reg.put_manifest(repo, tag, empty_index.encode())
            assert repr(tag) in str(info.value)
    assert snapshot(reg) == before
