"""Whether a blob is stored compressed: the engine's policy, and the sink that applies it.

A :class:`Policy` is parsed once at the edge (``Engine.open(compression=...)``, the CLI's
``--compression`` options) and holds for every ingest of the engine:

- ``never``: store the logical bytes as they are (codec ``raw``).
- ``always``: store every non-empty blob as seekable zstd (codec ``zst``).
- ``auto`` (the default): seekable zstd, unless the blob is already compressed -- its
  media type says so, or its first bytes are the magic number of a compressed format
  (gzip, zstd, xz, bzip2, lz4, zip, 7z, png, jpeg, gif, webp) -- or a sample of its first
  chunk does not shrink by at least ``margin`` (10%) at the policy's level.

The choice is made on the writer thread from the first chunk, before the backend object is
opened, so the object goes straight to its final key (``.raw`` or ``.zst``). A blob whose
first chunk is large is stored raw and compressed after the acknowledgement, on the
engine's background thread (:mod:`casengine.compactor`), unless ``defer`` is off; a small
one is compressed on the writer thread, off the thread that hashes (:mod:`casengine.ingest`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import xxhash
import zstandard

from casengine.backend import Buffer, Writer
from casengine.errors import InvalidInput
from casengine.layout import RAW, ZST
from casengine.seekable import FRAME_SIZE, MAX_FRAME, FrameEncoder

MODES = ("auto", "never", "always")
#: zstd level 1: the fastest level that still compresses text well. On this project's
#: 2-core machines level 3 compresses about 40% slower for ~10% smaller output, and the
#: compressing thread is what bounds a compressed ingest (see benchmarks/compression.py).
DEFAULT_LEVEL = 1
DEFAULT_MARGIN = 0.10
#: zstd workers per compressing ingest. The thread that hashes needs a fraction of a core
#: (sha256 runs several times faster than zstd), so compressing on every core is what
#: brings a compressed ingest near an uncompressed one.
DEFAULT_THREADS = min(os.cpu_count() or 1, 4)
#: How much of the first chunk ``auto`` compresses to decide.
SAMPLE = 256 << 10
#: What a seekable object adds to its frames: the seek table of one frame.
_OVERHEAD = 25

_MAGICS = (
    b"\x1f\x8b",  # gzip
    b"\x28\xb5\x2f\xfd",  # zstd
    b"\xfd7zXZ\x00",  # xz
    b"BZh",  # bzip2
    b"\x04\x22\x4d\x18",  # lz4
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08",  # zip (jar, docx, apk, ...)
    b"7z\xbc\xaf\x27\x1c",  # 7z
    b"\x89PNG\r\n\x1a\n",  # png
    b"\xff\xd8\xff",  # jpeg
    b"GIF87a", b"GIF89a",  # gif
)
_COMPRESSED_TYPES = re.compile(
    r"""(application/(gzip|x-gzip|zstd|x-xz|x-bzip2|zip|x-7z-compressed|x-lz4)
        |image/(png|jpeg|gif|webp|avif|heic)|video/.*|audio/.*
        |.*[+.](gzip|zstd|xz|bzip2|zip))(\s*;.*)?""", re.VERBOSE | re.IGNORECASE)


def already_compressed(media_type: str | None, head: Buffer) -> bool:
    """Whether a blob of ``media_type`` starting with ``head`` is a compressed format."""
    if media_type and _COMPRESSED_TYPES.fullmatch(media_type.strip()):
        return True
    start = bytes(memoryview(head)[:16])
    if start[:4] == b"RIFF" and start[8:12] == b"WEBP":
        return True
    # zstd skippable frames (0x184D2A50-5F): a seekable or otherwise framed zstd stream
    if len(start) >= 4 and start[1:4] == b"\x2a\x4d\x18" and start[0] & 0xF0 == 0x50:
        return True
    return start.startswith(_MAGICS)


@dataclass(frozen=True, slots=True)
class Policy:
    """How an engine stores the blobs it ingests (see the module docstring)."""

    mode: str = "auto"
    level: int = DEFAULT_LEVEL
    margin: float = DEFAULT_MARGIN
    frame_size: int = FRAME_SIZE
    threads: int = DEFAULT_THREADS  #: frames compressed at once; 0 or 1: the writer thread only
    #: compress large blobs after the acknowledgement; False: while they are ingested
    defer: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInput(f"invalid compression mode {self.mode!r}: want one of "
                               + ", ".join(MODES))
        if not isinstance(self.level, int) or not -7 <= self.level <= 22:
            raise InvalidInput(f"invalid zstd level {self.level!r}: want -7 to 22")
        if not 0 <= self.margin < 1:
            raise InvalidInput(f"invalid compression margin {self.margin!r}: want 0 <= m < 1")
        if not 64 << 10 <= self.frame_size <= MAX_FRAME:
            raise InvalidInput(f"invalid frame size {self.frame_size}: want 64 KiB to "
                               f"{MAX_FRAME >> 20} MiB")
        if not isinstance(self.threads, int) or not 0 <= self.threads <= 64:
            raise InvalidInput(f"invalid zstd thread count {self.threads!r}: want 0 to 64")

    @classmethod
    def parse(cls, mode: str | None = None, level: int | str | None = None) -> Self:
        """From command-line or environment text; None keeps the default."""
        try:
            lvl = DEFAULT_LEVEL if level in (None, "") else int(level)
        except ValueError:
            raise InvalidInput(f"invalid zstd level {level!r}: want a number") from None
        return cls(mode or "auto", lvl)

    def choose(self, head: Buffer, media_type: str | None = None) -> str:
        """The codec for a blob whose first chunk is ``head`` (non-empty)."""
        if self.mode == "never":
            return RAW
        if self.mode == "always":
            return ZST
        if already_compressed(media_type, head):
            return RAW
        sample = memoryview(head)[:SAMPLE]
        out = zstandard.ZstdCompressor(level=self.level).compress(sample)
        return ZST if len(out) + _OVERHEAD <= len(sample) * (1 - self.margin) else RAW


class BlobSink:
    """Where an ingest's chunks go: the codec is chosen on the first chunk, then the
    backend writer is opened for that codec's key and gets the bytes, raw or compressed.
    With ``defer_at``, a blob whose first chunk is that big is written raw even where the
    policy chose zstd, and ``deferred`` says so (see :mod:`casengine.compactor`).

    ``xxh3`` and ``size`` cover the stored bytes. Use as a context manager: leaving the
    block aborts the writer unless it was committed.
    """

    def __init__(self, open_writer: Callable[[str], Writer], policy: Policy,
                 media_type: str | None = None, *, defer_at: int | None = None) -> None:
        self._open_writer = open_writer
        self._policy = policy
        self._media_type = media_type
        self._defer_at = defer_at
        self.codec: str | None = None
        #: stored raw although the policy chose zstd: the caller compresses it later
        self.deferred = False
        self.writer: Writer | None = None
        self.xxh3 = xxhash.xxh3_128()
        self._encoder: FrameEncoder | None = None

    @property
    def size(self) -> int:
        return 0 if self.writer is None else self.writer.size

    def _start(self, codec: str) -> None:
        self.codec = codec
        self.writer = self._open_writer(codec)
        if codec == ZST:
            p = self._policy
            self._encoder = FrameEncoder(self._emit, p.level, p.frame_size, p.threads)

    def _emit(self, data: Buffer) -> None:
        assert self.writer is not None
        self.xxh3.update(data)
        self.writer.write(data)

    def write(self, data: Buffer) -> None:
        if self.codec is None:
            codec = self._policy.choose(data, self._media_type)
            if (codec == ZST and self._defer_at is not None
                    and memoryview(data).nbytes >= self._defer_at):
                codec, self.deferred = RAW, True
            self._start(codec)
        if self._encoder is not None:
            self._encoder.write(data)
        else:
            self._emit(data)

    def finish(self) -> Writer:
        """End the stored form (the last frame and the seek table); an empty blob is raw."""
        if self.codec is None:
            self._start(RAW)
        if self._encoder is not None:
            self._encoder.finish()
        assert self.writer is not None
        return self.writer

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.abort()
