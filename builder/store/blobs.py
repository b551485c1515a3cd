"""Content-addressed blobs: `blobs/sha256/<hex>` of an OCI image layout.

The interface is deliberately small (put, open, stat, delete, list); every
write goes to a temp file on the same filesystem, is verified against its
digest, and is renamed into place, so a reader never sees a partial blob and a
crash leaves at most a stray temp file (cleaned by the store).
"""

from __future__ import annotations

import hashlib
import os
import re

from ..errors import StoreError
from .direct import DirectFile, read_range
from .lock import new_temp_file

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not _DIGEST.match(digest or ""):
        raise StoreError(f"invalid digest {digest!r} (expected sha256:<64 hex digits>)")
    return digest


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: str, tmp_dir: str):
        self.dir = os.path.join(root, "blobs", "sha256")
        self.tmp_dir = tmp_dir

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, check_digest(digest)[7:])

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    def size(self, digest: str) -> int:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store") from None

    def put_bytes(self, data: bytes, expected: str | None = None) -> str:
        digest = sha256_digest(data)
        if expected and expected != digest:
            raise StoreError(f"blob content does not match its digest: expected {expected}, got {digest}")
        if self.has(digest):
            return digest
        fd, tmp = new_temp_file(self.tmp_dir, "blob-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._install(tmp, digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest

    def writer(self, direct: bool = False) -> "BlobWriter":
        """A file-like sink that hashes as it writes; commit() verifies and renames.
        `direct`: past the page cache while the disk keeps up (direct.py), for big blobs."""
        return BlobWriter(self, direct)

    def put_file(self, tmp_path: str, digest: str) -> None:
        """Install a temp file (already hashed by the caller) under `digest`."""
        self._install(tmp_path, digest)

    def _install(self, tmp_path: str, digest: str) -> None:
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, self.path(digest))

    def read(self, digest: str) -> bytes:
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store") from None
        if sha256_digest(data) != digest:
            raise StoreError(f"blob {digest} is corrupt: its content does not match its digest")
        return data

    def open(self, digest: str):
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is missing from the store") from None

    def verify(self, digest: str) -> bool:
        h = hashlib.sha256()
        with self.open(digest) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "sha256:" + h.hexdigest() == digest

    def delete(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def list(self) -> list[str]:
        return ["sha256:" + n for n in os.listdir(self.dir) if len(n) == 64]


class BlobWriter:
    """Streams bytes to a temp file while hashing them."""

    def __init__(self, blobs: BlobStore, direct: bool = False):
        self.blobs = blobs
        fd, self.tmp = new_temp_file(blobs.tmp_dir, "blob-")
        self.f = DirectFile(fd) if direct else os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.new = False

    def write(self, data) -> int:
        self.hash.update(data)
        self.f.write(data)
        self.size += len(data)
        return len(data)

    def resume(self, fd: int, length: int, hash_state) -> None:
        """Begin the blob with the first `length` bytes of the file open at `fd` (at offset
        0), whose hash (`hash_state`, a resumable.Sha256 of them) the caller has: not
        hashed here, and copied in the kernel (fileops.copy_data, a reflink where the
        file system has them), or, by a writer past the page cache, read past it
        (direct.read_range) unless it holds them. Only before the first write()."""
        if self.size:
            raise ValueError("resume() after a write")
        if isinstance(self.f, DirectFile) and self.f.direct:
            # (A blob DirectFile wrote is read past the page cache too, unless it is there.)
            for piece in read_range(fd, 0, length):
                self.f.write(piece)
        else:
            from ..fileops import copy_data   # (only a spliced COPY commit comes here)
            self.f.flush()
            if copy_data(fd, self.f.fileno(), length):
                raise OSError("the blob a layer's first members come from ends early")
        self.hash = hash_state
        self.size = length

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()

    def commit(self, expected: str | None = None) -> str:
        """Verify and install the blob; `self.new` tells whether the store lacked it."""
        self.f.close()
        digest = self.digest
        if expected and expected != digest:
            self.abort()
            raise StoreError(f"blob content does not match its digest: expected {expected}, got {digest}")
        self.new = not self.blobs.has(digest)
        self.blobs._install(self.tmp, digest)
        return digest

    def abort(self) -> None:
        if isinstance(self.f, DirectFile):
            self.f.discard()
        elif not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
