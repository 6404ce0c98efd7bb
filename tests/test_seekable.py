"""The seekable zstd codec on its own: format, frame table parsing (fuzzed), bombs."""

from __future__ import annotations

import io
import struct
import tracemalloc

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from casengine.errors import IntegrityError
from casengine.seekable import (
    MAX_FRAME,
    SEEKABLE_MAGIC,
    SKIPPABLE_MAGIC,
    FrameDecoder,
    FrameEncoder,
    SeekTable,
    compress,
    decode_frame,
    encode_table,
    parse_table,
)

KIB = 1 << 10


def text(n: int) -> bytes:
    """Deterministic text-like bytes that compress well but not trivially."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%08d GET /v2/team/app/blobs/sha256:%064x 200 %d\n" % (i, i * 7919, i % 977)
        i += 1
    return bytes(out[:n])


def entries_of(table: SeekTable) -> list[tuple[int, int]]:
    c, d = table.compressed, table.logical
    return [(c[i + 1] - c[i], d[i + 1] - d[i]) for i in range(table.frames)]


def decode_all(obj: bytes) -> bytes:
    table = parse_table(obj, len(obj))
    decoder = FrameDecoder(table)
    out = b"".join(decoder.feed(obj))
    decoder.close()
    return out


def test_round_trip_is_one_valid_zstd_stream() -> None:
    data = text(1 << 20) + bytes(range(256)) * 100
    obj = compress(data, level=3, frame_size=256 * KIB)
    assert len(obj) < len(data) // 3
    # any zstd decoder reads it whole: frames one after another, the table skipped
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(obj), read_across_frames=True)
    assert reader.read() == data
    table = parse_table(obj, len(obj))
    assert table.logical_size == len(data)
    assert table.frames == -(-len(data) // (256 * KIB))
    assert decode_all(obj) == data
    # the footer is zstd's seekable format: frame count, descriptor, magic
    assert struct.unpack("<IBI", obj[-9:]) == (table.frames, 0, SEEKABLE_MAGIC)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 300 * KIB), max_size=8), st.integers(64 * KIB, 256 * KIB))
def test_any_write_pattern_gives_whole_frames(sizes: list[int], frame_size: int) -> None:
    data = text(sum(sizes))
    parts: list[bytes] = []
    encoder = FrameEncoder(parts.append, 1, frame_size)
    pos = 0
    for n in sizes:
        encoder.write(data[pos:pos + n])
        pos += n
    encoder.finish()
    obj = b"".join(parts)
    table = parse_table(obj, len(obj))
    assert all(d == frame_size for _, d in entries_of(table)[:-1])
    assert decode_all(obj) == data


def test_empty_input_is_a_table_of_no_frames() -> None:
    obj = compress(b"")
    assert parse_table(obj, len(obj)).logical_size == 0
    assert decode_all(obj) == b""


# -- hostile tables -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 40))
def test_parser_fuzz_random_bytes(tail: bytes, stored_size: int) -> None:
    """Whatever the bytes, parsing returns a consistent table or raises IntegrityError."""
    try:
        table = parse_table(tail, stored_size)
    except IntegrityError:
        return
    assert table.stored_size == stored_size and table.compressed[-1] <= stored_size
    assert all(0 < d <= MAX_FRAME for _, d in entries_of(table))


entry = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


@settings(max_examples=500, deadline=None)
@given(st.lists(entry, max_size=20), st.integers(0, 2), st.integers(-64, 64),
       st.integers(0, 255), st.sampled_from([0, 1, 2, 3]))
def test_parser_fuzz_structured(entries: list[tuple[int, int]], extra_frames: int,
                                size_delta: int, descriptor: int, damage: int) -> None:
    """Well-formed framing around hostile numbers: wrong counts, sizes that overflow or do
    not tile the object, reserved bits, a checksum flag with the wrong entry width."""
    body = b"".join(struct.pack("<II", c, d) for c, d in entries)
    count = len(entries) + (extra_frames if damage == 1 else 0)
    frame_size = len(body) + 9 + (size_delta if damage == 2 else 0)
    table = (struct.pack("<II", SKIPPABLE_MAGIC, frame_size & 0xFFFFFFFF) + body
             + struct.pack("<IBI", count, descriptor if damage == 3 else 0, SEEKABLE_MAGIC))
    stored = sum(c for c, _ in entries) + len(table) + (size_delta if damage == 0 else 0)
    try:
        parsed = parse_table(table, max(stored, 0))
    except IntegrityError:
        return
    # accepted: then it must describe exactly the object it came from
    assert parsed.compressed[-1] + len(table) == stored
    assert entries_of(parsed) == entries
    assert all(0 < d <= MAX_FRAME and c >= 9 for c, d in entries)


def test_a_valid_table_survives_the_structured_path() -> None:
    obj = compress(text(300 * KIB), frame_size=100 * KIB)
    table = parse_table(obj, len(obj))
    assert entries_of(table) == [tuple(e) for e in entries_of(table)]
    assert encode_table(entries_of(table)) == obj[table.compressed[-1]:]


@pytest.mark.parametrize("damage", ["magic", "reserved", "count", "tiling", "short"])
def test_damaged_tables_are_refused(damage: str) -> None:
    obj = bytearray(compress(text(300 * KIB), frame_size=100 * KIB))
    if damage == "magic":
        obj[-1] ^= 0xFF
    elif damage == "reserved":
        obj[-5] = 0x04
    elif damage == "count":
        obj[-9] += 1
    elif damage == "tiling":
        obj[-9 - 8 - 8] ^= 1  # the last frame's compressed size
    else:
        obj = obj[-5:]
    with pytest.raises(IntegrityError):
        parse_table(bytes(obj), len(obj))


# -- bombs and lying frames ------------------------------------------------------------------


def _zeros_stream(total: int) -> bytes:
    """A zstd frame without a content size that decompresses to ``total`` zero bytes."""
    obj = zstandard.ZstdCompressor(level=1).compressobj()
    block = bytes(16 << 20)
    out = [obj.compress(block) for _ in range(total // len(block))]
    out.append(obj.flush())
    return b"".join(out)


def test_a_frame_that_decompresses_to_more_than_the_table_says_is_a_bomb() -> None:
    bomb = _zeros_stream(512 << 20)  # ~16 KiB stored, 512 MiB if decompressed
    assert len(bomb) < 64 * KIB
    obj = bomb + encode_table([(len(bomb), 4 << 20)])
    table = parse_table(obj, len(obj))
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError):
            list(FrameDecoder(table).feed(obj))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20


def test_a_frame_header_claiming_a_huge_size_is_refused_before_allocating() -> None:
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(bytes(4 << 20)))
    fhd = frame[4]
    assert fhd >> 6 == 2  # a 4-byte content size
    at = 5 + (0 if fhd & 0x20 else 1)
    frame[at:at + 4] = struct.pack("<I", 0xFFFFFFF0)
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 0xFFFFFFF0
    with pytest.raises(IntegrityError, match="declares"):
        decode_frame(bytes(frame), 4 << 20, zstandard.ZstdDecompressor())


def test_a_table_claiming_frames_beyond_the_cap_is_refused() -> None:
    frame = zstandard.ZstdCompressor().compress(b"x" * 100)
    obj = frame + encode_table([(len(frame), MAX_FRAME + 1)])
    with pytest.raises(IntegrityError, match="claims"):
        parse_table(obj, len(obj))


def test_truncated_and_flipped_frames_fail_cleanly() -> None:
    data = text(400 * KIB)
    obj = compress(data, frame_size=128 * KIB)
    table = parse_table(obj, len(obj))
    decoder = FrameDecoder(table)
    list(decoder.feed(obj[:table.compressed[2] + 10]))
    with pytest.raises(IntegrityError, match="ends inside frame 2"):
        decoder.close()
    for at in (20, table.compressed[1] + 30, table.compressed[2] - 3):
        bad = bytearray(obj)
        bad[at] ^= 0x40
        with pytest.raises(IntegrityError):
            decode_all(bytes(bad))
