"""SHA-256 whose state can be kept and taken up again: hashing a layer from its middle.

A COPY rebuilt after one file changed has the same tar bytes as its base
layer up to the member holding that file, and the same blob bytes (splice.py).
hashlib cannot hand out its state, so those bytes would have to be read and
hashed again for the diff_id and the blob digest. OpenSSL's SHA-256 context
is a plain structure (`SHA256_CTX`, 112 bytes): its bytes, saved where a
member ends, are the hash of everything before, and a context made from them
hashes on from there. The library is the one Python's hashlib uses, called
through ctypes (which lets go of the GIL during each call, as hashlib does).

A saved state is only taken up by the same library (`LIBRARY` names it and
is kept beside the states); without the library (or on any doubt at load,
checked with a known value) `available()` is False and callers hash from the
start, which gives the same digests.
"""

from __future__ import annotations

import hashlib

STATE_SIZE = 112            # sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len
_lib = None
_loaded = False
LIBRARY: str | None = None   # the library's own name and version, once loaded


def _load() -> None:
    """Find libcrypto's SHA256_* functions and check them against hashlib (once)."""
    global _lib, _loaded, LIBRARY
    if _loaded:
        return
    _loaded = True
    import ctypes            # (only a commit that keeps states pays for the import)
    try:
        lib = ctypes.CDLL("libcrypto.so.3")
        for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
            getattr(lib, name).restype = ctypes.c_int
        lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.SHA256_Init.argtypes = [ctypes.c_void_p]
        lib.OpenSSL_version.restype = ctypes.c_char_p
        lib.OpenSSL_version.argtypes = [ctypes.c_int]
        name = lib.OpenSSL_version(0).decode("ascii", "replace")
    except (OSError, AttributeError):
        return
    _lib = lib
    # A state saved halfway and taken up again must give hashlib's digest.
    probe = Sha256()
    probe.update(b"a" * 100)
    resumed = Sha256(probe.state())
    resumed.update(b"b" * 50)
    if resumed.hexdigest() != hashlib.sha256(b"a" * 100 + b"b" * 50).hexdigest():
        _lib = None
        return
    LIBRARY = f"{name} ctx {STATE_SIZE}"


def available() -> bool:
    _load()
    return _lib is not None


class Sha256:
    """hashlib.sha256()'s update/digest/hexdigest, plus state() and Sha256(state).

    Only made when available() is True.
    """

    __slots__ = ("_ctx",)

    def __init__(self, state: bytes | None = None):
        import ctypes
        self._ctx = ctypes.create_string_buffer(STATE_SIZE)
        if state is None:
            _lib.SHA256_Init(self._ctx)
        else:
            if len(state) != STATE_SIZE:
                raise ValueError("not a SHA-256 state")
            ctypes.memmove(self._ctx, state, STATE_SIZE)

    def update(self, data) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        _lib.SHA256_Update(self._ctx, data, len(data))

    def state(self) -> bytes:
        """The hash of what was given so far, to take up again with Sha256(state)."""
        return self._ctx.raw

    def digest(self) -> bytes:
        import ctypes
        ctx = ctypes.create_string_buffer(self._ctx.raw, STATE_SIZE)    # (Final ends a context)
        out = ctypes.create_string_buffer(32)
        _lib.SHA256_Final(out, ctx)
        return out.raw

    def hexdigest(self) -> str:
        return self.digest().hex()


def new():
    """A Sha256 if states can be kept here, else hashlib's."""
    return Sha256() if available() else hashlib.sha256()
