"""Resumable sha256/sha512: a hash whose state can be saved as bytes and restored later.

Upload sessions hash each chunk as it arrives and save the state with its offset, so that
a commit, in any process and after any restart, never reads the uploaded data again.
``hashlib`` cannot export its state, so this uses OpenSSL's low-level ``SHA256_CTX`` and
``SHA512_CTX`` through ctypes: plain structs that can be copied out and back, and the same
assembly (SHA-NI where the CPU has it) that ``hashlib`` runs. ctypes releases the GIL for
the duration of each call.

Where libcrypto cannot be loaded, :func:`available` is False and callers fall back to
re-hashing from the stored data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from casengine.digest import Digest, check_algorithm

# struct sizes: SHA256_CTX is 8+2+16 words of 4 bytes plus num and md_len (112 bytes);
# SHA512_CTX is 8+2+16 words of 8 bytes plus num and md_len (216 bytes). Rounded up.
_CTX_SIZE = {"sha256": 128, "sha512": 256}
_DIGEST_SIZE = {"sha256": 32, "sha512": 64}
_PREFIX = {"sha256": "SHA256", "sha512": "SHA512"}


@functools.cache
def _lib() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypto")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        for alg, prefix in _PREFIX.items():
            for fn in ("Init", "Update", "Final"):
                getattr(lib, f"{prefix}_{fn}").restype = ctypes.c_int
            getattr(lib, f"{prefix}_Update").argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                        ctypes.c_size_t]
            del alg
    except (OSError, AttributeError):
        return None
    return lib


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PyBUF_SIMPLE = 0


def available() -> bool:
    return _lib() is not None


class ResumableHash:
    """``update`` like hashlib; ``state()`` and ``ResumableHash.restore`` to suspend it."""

    __slots__ = ("_ctx", "_fn", "algorithm", "size")

    def __init__(self, algorithm: str = "sha256", *, _state: bytes | None = None,
                 _size: int = 0) -> None:
        lib = _lib()
        if lib is None:
            raise RuntimeError("resumable hashing needs OpenSSL's libcrypto, which is missing")
        self.algorithm = check_algorithm(algorithm)
        prefix = _PREFIX[algorithm]
        self._fn = (getattr(lib, f"{prefix}_Update"), getattr(lib, f"{prefix}_Final"))
        self._ctx = ctypes.create_string_buffer(_CTX_SIZE[algorithm])
        self.size = _size
        if _state is None:
            getattr(lib, f"{prefix}_Init")(self._ctx)
        else:
            if len(_state) != _CTX_SIZE[algorithm]:
                raise ValueError(f"a saved {algorithm} state has {_CTX_SIZE[algorithm]} bytes")
            ctypes.memmove(self._ctx, _state, len(_state))

    @classmethod
    def restore(cls, algorithm: str, state: bytes, size: int) -> ResumableHash:
        return cls(algorithm, _state=state, _size=size)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        # Borrow the buffer's address without copying, read-only buffers included.
        buf = _PyBuffer()
        _get_buffer(data, ctypes.byref(buf), _PyBUF_SIMPLE)
        try:
            if buf.len:
                self._fn[0](self._ctx, buf.buf, buf.len)
            self.size += buf.len
        finally:
            _release_buffer(ctypes.byref(buf))

    def state(self) -> bytes:
        """The context as bytes: save it beside ``size``."""
        return self._ctx.raw

    def digest(self) -> Digest:
        """The digest so far; the hash can go on being updated afterwards."""
        ctx = ctypes.create_string_buffer(self._ctx.raw, len(self._ctx))
        out = ctypes.create_string_buffer(_DIGEST_SIZE[self.algorithm])
        self._fn[1](out, ctx)
        return Digest(self.algorithm, out.raw.hex())
