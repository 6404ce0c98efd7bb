"""The engine against a dict model, driven by hypothesis' stateful testing.

One machine holds an Engine on ``memory://``, a subclass the same on a local root. Rules
ingest (sometimes with a right or wrong expected digest or size), read whole and by range,
stat, check existence, delete and list; the invariants say the engine lists exactly the
model's keys and every stored blob hashes to its key (I1).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from casengine.engine import Engine
from casengine.errors import BlobNotFound, DigestMismatch, InvalidInput, SizeMismatch
from casengine.layout import BLOBS, CODECS
from tests.helpers import audit, digest_of, tmp_files

#: Payloads that come back often, so dedupe and re-ingest after delete happen a lot.
POOL = [b"", b"a", b"hello world", bytes(range(256)) * 40, b"\0" * 9000, b"x" * 4096]
payloads = st.one_of(st.sampled_from(POOL), st.binary(max_size=12_000))
modes = st.sampled_from(["plain", "digest", "wrong-digest", "size", "wrong-size", "sha512",
                         "sha512-digest"])
sources = st.sampled_from(["bytes", "file", "chunks"])


def _source(data: bytes, how: str, cut: int) -> object:
    if how == "bytes":
        return data
    if how == "file":
        return io.BytesIO(data)
    cut = min(cut, len(data))
    return iter([data[:cut], data[cut:]])


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = self.open()
        self.engine.chunk_size = 4096  # many chunks per blob: the writer thread runs too
        self.model: dict[str, bytes] = {}

    def open(self) -> Engine:
        return Engine.open("memory://")

    def teardown(self) -> None:
        self.engine.close()

    def _any_digest(self, data: st.DataObject) -> str:
        stored = sorted(self.model)
        if stored and data.draw(st.booleans(), label="stored"):
            return data.draw(st.sampled_from(stored), label="digest")
        return digest_of(data.draw(st.binary(max_size=8), label="unknown") + b"-unknown")

    # -- rules ---------------------------------------------------------------------------

    @rule(payload=payloads, mode=modes, how=sources, cut=st.integers(0, 12_000))
    def ingest(self, payload: bytes, mode: str, how: str, cut: int) -> None:
        algorithm = "sha512" if mode.startswith("sha512") else "sha256"
        digest = digest_of(payload, algorithm)
        kwargs: dict[str, object] = {}
        if mode in ("digest", "sha512-digest"):
            kwargs["digest"] = digest
        elif mode == "wrong-digest":
            kwargs["digest"] = digest_of(payload + b"!")
        elif mode == "size":
            kwargs["size"] = len(payload)
        elif mode == "wrong-size":
            kwargs["size"] = len(payload) + (1 if cut % 2 or not payload else -1)
        elif mode == "sha512":
            kwargs["algorithm"] = "sha512"
        source = _source(payload, how, cut)
        if mode == "wrong-digest":
            with pytest.raises(DigestMismatch):
                self.engine.ingest(source, **kwargs)  # type: ignore[arg-type]
            return
        if mode == "wrong-size":
            with pytest.raises(SizeMismatch):
                self.engine.ingest(source, **kwargs)  # type: ignore[arg-type]
            return
        result = self.engine.ingest(source, **kwargs)  # type: ignore[arg-type]
        assert str(result.digest) == digest and result.size == len(payload)
        assert result.created is (digest not in self.model)
        self.model[digest] = payload

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def ingest_stored_with_a_wrong_body(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(sorted(self.model)))
        wrong = self.model[digest] + data.draw(st.binary(min_size=1, max_size=10))
        with pytest.raises(DigestMismatch):
            self.engine.ingest(wrong, digest=digest)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_whole(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(sorted(self.model)))
        assert b"".join(self.engine.read(digest)) == self.model[digest]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(sorted(self.model)))
        blob = self.model[digest]
        start = data.draw(st.integers(-2, len(blob) + 2), label="start")
        length = data.draw(st.none() | st.integers(-2, len(blob) + 10), label="length")
        if start < 0 or start > len(blob) or (length is not None and length < 0):
            with pytest.raises(InvalidInput):
                self.engine.read(digest, start, length)
            return
        want = blob[start:] if length is None else blob[start : start + length]
        assert b"".join(self.engine.read(digest, start, length)) == want

    @rule(data=st.data())
    def stat(self, data: st.DataObject) -> None:
        digest = self._any_digest(data)
        if digest in self.model:
            record = self.engine.stat(digest)
            assert (record.digest, record.size) == (digest, len(self.model[digest]))
            assert record.codec in CODECS
        else:
            with pytest.raises(BlobNotFound):
                self.engine.stat(digest)
            with pytest.raises(BlobNotFound):
                self.engine.read(digest)

    @rule(data=st.data())
    def exists(self, data: st.DataObject) -> None:
        digest = self._any_digest(data)
        assert self.engine.exists(digest) is (digest in self.model)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        digest = self._any_digest(data)
        assert self.engine.delete(digest) is (digest in self.model)
        self.model.pop(digest, None)

    @rule(data=st.data())
    def list_from(self, data: st.DataObject) -> None:
        start = self._any_digest(data)
        assert [r.digest for r in self.engine.list(start)] == sorted(
            d for d in self.model if d >= start)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def lists_the_model(self) -> None:
        assert [r.digest for r in self.engine.list()] == sorted(self.model)
        assert self.engine.index.count_blobs() == len(self.model)
        assert len(list(self.engine.backend.list(BLOBS))) == len(self.model)
        assert tmp_files(self.engine) == []

    @invariant()
    def every_blob_hashes_to_its_key(self) -> None:
        audit(self.engine)
        for digest, blob in self.model.items():
            algorithm, hex_ = digest.split(":")
            assert hashlib.new(algorithm, b"".join(self.engine.read(digest))).hexdigest() == hex_
            assert self.engine.stat(digest).size == len(blob)


class LocalEngineMachine(EngineMachine):
    def open(self) -> Engine:
        self.tmp = tempfile.mkdtemp(prefix="casengine-stateful-")
        return Engine.open(f"{self.tmp}/root")

    def teardown(self) -> None:
        super().teardown()
        shutil.rmtree(self.tmp, ignore_errors=True)


_settings = settings(max_examples=20, stateful_step_count=20, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

TestMemoryEngine = EngineMachine.TestCase
TestMemoryEngine.settings = _settings
TestLocalEngine = LocalEngineMachine.TestCase
TestLocalEngine.settings = _settings
