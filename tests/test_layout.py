"""casengine.layout: blob keys and their inverse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from casengine.backend import check_key
from casengine.digest import ALGORITHMS, Digest
from casengine.layout import RAW, blob_key, parse_blob_key

HEX64 = "3fa9" + "0123456789abcdef" * 3 + "beefcafe00c2"
assert len(HEX64) == 64


def test_blob_key_shape() -> None:
    d = Digest("sha256", HEX64)
    assert blob_key(d) == f"blobs/sha256/3f/{HEX64}.raw"
    assert blob_key(d, RAW) == blob_key(d)
    assert check_key(blob_key(d)) == blob_key(d)
    assert parse_blob_key(blob_key(d)) == (d, RAW)


@given(alg=st.sampled_from(sorted(ALGORITHMS)), data=st.data())
def test_round_trip(alg: str, data: st.DataObject) -> None:
    hex_ = data.draw(st.text("0123456789abcdef", min_size=ALGORITHMS[alg],
                             max_size=ALGORITHMS[alg]))
    d = Digest(alg, hex_)
    key = blob_key(d)
    check_key(key)
    assert key.startswith(f"blobs/{alg}/{hex_[:2]}/")
    assert parse_blob_key(key) == (d, RAW)


JUNK = [
    f"blobs/sha256/00/{HEX64}.raw",  # fan-out does not match the digest
    f"blobs/sha256/3/{HEX64}.raw",  # fan-out of one digit
    f"blobs/sha256/3fa/{HEX64}.raw",
    f"blobs/sha256/{HEX64}.raw",  # no fan-out
    f"blobs/sha256/3f/{HEX64}.gz",  # unknown codec
    f"blobs/sha256/3f/{HEX64}",  # no codec
    f"blobs/sha256/3f/{HEX64}.raw.tmp",
    f"blobs/sha256/3f/{HEX64[:-1]}.raw",  # one digit short
    f"blobs/sha256/3f/{HEX64}0.raw",  # one digit long
    f"blobs/sha512/3f/{HEX64}.raw",  # sha512 wants 128 digits
    "blobs/sha1/da/da39a3ee5e6b4b0d3255bfef95601890afd80709.raw",  # unsupported algorithm
    f"blobs/md5/3f/{HEX64}.raw",
    f"blobs/sha256/3F/{HEX64.upper()}.raw",  # uppercase hex
    f"blob/sha256/3f/{HEX64}.raw",
    f"x/blobs/sha256/3f/{HEX64}.raw",
    f"/blobs/sha256/3f/{HEX64}.raw",
    f"blobs/sha256/3f/{HEX64}.raw/",
    "",
    "blobs/",
    "repositories/x/tags/latest",
]


@pytest.mark.parametrize("key", JUNK)
def test_junk_is_not_a_blob_key(key: str) -> None:
    assert parse_blob_key(key) is None
