"""A base layer's uncompressed tar, kept beside it once a layer is stacked on it.

Every commit stacked on a full COPY layer needs the base's tar bytes from
its first changed member to the end, for the new diff_id (splice.py). Read
from the base's blob they must be decompressed: 0.4 s for 141 MB here, most
of such a commit. So the first commit stacked on a base also writes the tar
bytes it decompressed into the base's `tar` file, and the next ones read
them from there.

The file is a cache beside an immutable layer: written to the store's tmp/
by a thread of its own, past the page cache as blobs are (store/direct.py:
putting 141 MB into the cache cost the VM that first commit most of a CPU
core; later commits read it with direct.read_range), installed by a rename
(a reader that has it open keeps the version it opened), removed with its
layer; a write that fails (a full disk) drops it, never the commit. Its
bytes are checked as they are used: each member's against the CRC-32 in the
blob's gzip trailer. It costs the base's tar size again on disk, once per
base that has been stacked on.
"""

from __future__ import annotations

import os

from ..store.direct import DirectFile
from . import compress

TAR = "tar"                  # in the layer's directory, beside diff/ and tar-map


def size_of(layer_dir: str) -> int:
    """The bytes a layer's tar takes on disk (0 if it has none)."""
    try:
        return os.stat(os.path.join(layer_dir, TAR)).st_size
    except OSError:
        return 0


def open_tar(layer_dir: str, size: int) -> int | None:
    """A descriptor of the layer's tar if it has one of `size` bytes, else None."""
    try:
        fd = os.open(os.path.join(layer_dir, TAR), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(fd).st_size != size:
        os.close(fd)
        return None
    return fd


class TarWriter:
    """Writes a layer's tar, given in order, to a temp file; install() puts it in place."""

    def __init__(self, tmp_dir: str):
        self.path: str | None = os.path.join(tmp_dir, f"{TAR}-{os.urandom(6).hex()}")
        self.size = 0
        self._file = None
        self._writing = None
        try:
            self._file = DirectFile(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                            os.O_CLOEXEC, 0o600))
        except OSError:
            self.path = None
            return
        self._writing = compress.Stage(self._file.write, "pybuild-tar-write")

    def add(self, data: bytes) -> None:
        if self._writing is None:
            return
        try:
            self._writing.put(data)
            self.size += len(data)
        except OSError:
            self.abort()

    def install(self, layer_dir: str, size: int) -> bool:
        """Finish the file and rename it into `layer_dir` if it holds `size` bytes; False if
        it could not be (whoever comes last wins: the file holds the same bytes anyway)."""
        if self._writing is None or self.size != size:
            self.abort()
            return False
        try:
            writing, self._writing = self._writing, None
            writing.finish()
            self._file.close()
            self._file = None
            os.rename(self.path, os.path.join(layer_dir, TAR))
        except OSError:
            self.abort()
            return False
        self.path = None
        return True

    def abort(self) -> None:
        """Drop the file (the commit goes on without it)."""
        if self._writing is not None:
            self._writing.stop()
            self._writing = None
        if self._file is not None:
            self._file.discard()
            self._file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None
