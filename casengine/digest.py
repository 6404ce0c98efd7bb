"""Content digests per the OCI image spec (``algorithm:encoded``), and a streaming hasher.

Grammar (image-spec descriptor.md)::

    digest      ::= algorithm ":" encoded
    algorithm   ::= component (separator component)*
    component   ::= [a-z0-9]+
    separator   ::= [+._-]
    encoded     ::= [a-zA-Z0-9=_-]+

For the registered algorithms the encoded part is lowercase hex of a fixed length. A string
that matches the general grammar but names another algorithm is well formed yet unsupported,
and gets its own error so the HTTP layer can tell the two apart.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from casengine.errors import InvalidDigest, UnsupportedAlgorithm

#: Supported algorithms and the length of their hex encoding.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
DEFAULT_ALGORITHM = "sha256"

_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HEX = {alg: re.compile(f"[a-f0-9]{{{n}}}") for alg, n in ALGORITHMS.items()}


def _quote(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 hex>`` or ``sha512:<128 hex>``; anything else raises."""
        if not isinstance(text, str):
            raise InvalidDigest(f"digest must be a string, not {type(text).__name__}")
        if not _GRAMMAR.fullmatch(text):
            raise InvalidDigest(f"invalid digest {_quote(text)}: want algorithm:hex, e.g. sha256:<64 hex>")
        algorithm, encoded = text.split(":", 1)
        pattern = _HEX.get(algorithm)
        if pattern is None:
            raise UnsupportedAlgorithm(
                f"unsupported digest algorithm in {_quote(text)}: use one of {', '.join(ALGORITHMS)}"
            )
        if not pattern.fullmatch(encoded):
            raise InvalidDigest(
                f"invalid digest {_quote(text)}: {algorithm} wants {ALGORITHMS[algorithm]} "
                "lowercase hex characters"
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes | memoryview, algorithm: str = DEFAULT_ALGORITHM) -> Digest:
        """The digest of bytes already in memory (small objects: manifests, tests)."""
        h = Hasher(algorithm)
        h.update(data)
        return h.digest()

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(text: str | Digest) -> Digest:
    """Accept a :class:`Digest` as is, or parse a string."""
    return text if isinstance(text, Digest) else Digest.parse(text)


def check_algorithm(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise UnsupportedAlgorithm(
            f"unsupported digest algorithm {_quote(algorithm)}: use one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


class Hasher:
    """Streaming digest that also counts bytes; ``hashlib`` releases the GIL on large updates."""

    __slots__ = ("_h", "algorithm", "size")

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM) -> None:
        self.algorithm = check_algorithm(algorithm)
        self._h = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self.algorithm, self._h.hexdigest())
