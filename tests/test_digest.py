"""casengine.digest: parsing per the OCI digest grammar, and the streaming hasher."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casengine.digest import ALGORITHMS, Digest, Hasher, check_algorithm, parse_digest
from casengine.errors import InvalidDigest, InvalidInput, UnsupportedAlgorithm

SHA256_EMPTY = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SHA512_EMPTY = (
    "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
)


@pytest.mark.parametrize("text", [SHA256_EMPTY, SHA512_EMPTY, "sha256:" + "0" * 64,
                                  "sha512:" + "f" * 128])
def test_valid_digests_parse_and_print_back(text: str) -> None:
    d = Digest.parse(text)
    alg, hex_ = text.split(":")
    assert (d.algorithm, d.hex) == (alg, hex_)
    assert str(d) == text
    assert parse_digest(text) == d
    assert parse_digest(d) is d


BAD = [
    ("sha256:" + "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855", InvalidDigest),
    ("sha256:" + "e3b0C44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", InvalidDigest),
    ("sha256:" + "a" * 63, InvalidDigest),
    ("sha256:" + "a" * 65, InvalidDigest),
    ("sha256:" + "a" * 128, InvalidDigest),
    ("sha512:" + "a" * 64, InvalidDigest),
    ("sha256:" + "g" * 64, InvalidDigest),
    ("sha256:", InvalidDigest),
    ("", InvalidDigest),
    ("sha256", InvalidDigest),
    ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", InvalidDigest),
    (":" + "a" * 64, InvalidDigest),
    ("SHA256:" + "a" * 64, InvalidDigest),
    ("sha256:" + "a" * 64 + "\n", InvalidDigest),
    (" sha256:" + "a" * 64, InvalidDigest),
    ("sha256::" + "a" * 64, InvalidDigest),
    ("md5:d41d8cd98f00b204e9800998ecf8427e", UnsupportedAlgorithm),
    ("sha1:da39a3ee5e6b4b0d3255bfef95601890afd80709", UnsupportedAlgorithm),
    ("sha384:" + "a" * 96, UnsupportedAlgorithm),
    ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", UnsupportedAlgorithm),
]


@pytest.mark.parametrize(("text", "error"), BAD, ids=[repr(t)[:40] for t, _ in BAD])
def test_bad_digest_is_refused_and_quoted(text: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Digest.parse(text)
    assert type(info.value) is error
    assert repr(text) in str(info.value), "the error must quote the bad input"
    assert isinstance(info.value, InvalidInput)  # exit code 4 in the CLI
    assert isinstance(info.value, ValueError)


def test_unsupported_is_told_apart_from_malformed() -> None:
    with pytest.raises(UnsupportedAlgorithm, match="sha256, sha512"):
        Digest.parse("sha1:" + "a" * 40)
    assert not issubclass(InvalidDigest, UnsupportedAlgorithm)


def test_long_bad_input_is_quoted_shortened() -> None:
    text = "sha256:" + "Z" * 5000
    with pytest.raises(InvalidDigest) as info:
        Digest.parse(text)
    assert len(str(info.value)) < 500
    assert "sha256:ZZZ" in str(info.value)


@pytest.mark.parametrize("value", [None, 42, b"sha256:" + b"a" * 64, ["sha256:" + "a" * 64]])
def test_non_string_is_refused(value: object) -> None:
    with pytest.raises(InvalidDigest, match=type(value).__name__):
        Digest.parse(value)  # type: ignore[arg-type]


def test_check_algorithm() -> None:
    assert check_algorithm("sha512") == "sha512"
    with pytest.raises(UnsupportedAlgorithm, match="'md5'"):
        check_algorithm("md5")
    with pytest.raises(UnsupportedAlgorithm):
        Hasher("sha1")


def test_digests_order_and_hash_as_values() -> None:
    a, b = Digest.parse("sha256:" + "0" * 64), Digest.parse("sha256:" + "1" * 64)
    assert a < b
    assert {a, Digest.parse(str(a))} == {a}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_hasher_equals_hashlib(algorithm: str) -> None:
    data = bytes(range(256)) * 1000
    h = Hasher(algorithm)
    h.update(data[:1])
    h.update(memoryview(data)[1:70_000])
    h.update(bytearray(data[70_000:]))
    h.update(b"")
    assert h.size == len(data)
    assert str(h.digest()) == f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    assert Digest.of(data, algorithm) == h.digest()
    assert len(h.digest().hex) == ALGORITHMS[algorithm]


def test_hasher_of_nothing() -> None:
    assert str(Hasher().digest()) == SHA256_EMPTY
    assert str(Hasher("sha512").digest()) == SHA512_EMPTY
    assert Hasher().size == 0


@given(data=st.binary(max_size=4096), algorithm=st.sampled_from(sorted(ALGORITHMS)),
       cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=5))
def test_round_trip(data: bytes, algorithm: str, cuts: list[int]) -> None:
    h = Hasher(algorithm)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for lo, hi in itertools.pairwise(bounds):
        h.update(data[lo:hi])
    d = h.digest()
    assert d == Digest.of(data, algorithm)
    assert str(d) == f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    assert Digest.parse(str(d)) == d


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_invalid_digest(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest:
        return
    assert str(d) == text
    assert d.algorithm in ALGORITHMS
