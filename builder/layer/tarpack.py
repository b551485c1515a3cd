"""A base layer's tar entries kept in one file, so that stacked commits need not open its files.

A COPY layer stacked on a full one (donor.py) is committed as the full
layer's tar with the changed files in it: the diff_id needs every byte, so
the walk used to open, read and close each of the base's 30,000 unchanged
files and make their tar headers again (0.3 s of a one-file rebuild's
commit, ~10 us a file). Those entries are the same bytes every time: the
base's diff dir never changes, and a header depends only on the file's row
(size, mtime, mode bits, owner) and the build's mtime clamp. So the first
commit stacked on a base also writes the entries it read into the base's
`tar-entries` file (header blocks, content, padding, in tar order), and the
next ones take them from there with a few large reads.

The file is a cache beside an immutable layer: it is installed by a rename
(a reader that has it open keeps the version it opened), removed with its
layer, and an entry is used only when the row it was made from and the
clamp are the current ones; anything else (a file it does not hold, a
damaged index) is read from the base's diff dir as before. It costs the
base's size again on disk, once per base that has been stacked on.

Layout: the entries, then a marshalled index (the clamp, the names, and per
name its offset, header length and row), then 8 bytes: the index's offset.
"""

from __future__ import annotations

import array
import marshal
import os
import struct

from . import compress

PACK = "tar-entries"          # in the layer's directory, beside diff/ and layer.json

# Per entry in the index: where it is, and the row (donor.TableView.attributes) it was made
# from, from ROW on (size, mtime_ns, mode bits, uid, gid).
OFFSET, HEADER, ROW = 0, 1, 2
NUMBERS = 7
_TRAILER = struct.Struct("<Q")
_WINDOW = 1 << 20             # bytes read at once
_CHUNK = 1 << 20              # bytes written at once


def size_of(layer_dir: str) -> int:
    """The bytes a layer's pack takes on disk (0 if it has none)."""
    try:
        return os.stat(os.path.join(layer_dir, PACK)).st_size
    except OSError:
        return 0


class PackReader:
    """Entries of a base layer's pack by name, read forward in large windows."""

    def __init__(self, fd: int, clamp: int | None, names: list[str], numbers: array.array):
        self.fd = fd
        self.clamp = clamp
        self.index = {name: i for i, name in enumerate(names)}
        self.numbers = numbers
        self._window = b""
        self._start = 0

    @classmethod
    def open(cls, layer_dir: str, clamp: int | None) -> "PackReader | None":
        """The layer's pack if it has one made with this mtime clamp (SOURCE_DATE_EPOCH, or
        None) and it is whole, else None."""
        try:
            fd = os.open(os.path.join(layer_dir, PACK), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            (at,) = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
            index = marshal.loads(os.pread(fd, size - _TRAILER.size - at, at))
            numbers = array.array("q")
            numbers.frombytes(index["numbers"])
            names = index["names"]
            if index["clamp"] != clamp or not isinstance(names, list) \
                    or len(numbers) != NUMBERS * len(names):
                os.close(fd)
                return None
            ends = [numbers[k + OFFSET] + numbers[k + HEADER] + numbers[k + ROW]
                    for k in range(0, len(numbers), NUMBERS)]
            if ends and max(ends) > at:
                os.close(fd)
                return None
        except (OSError, EOFError, ValueError, TypeError, KeyError, struct.error):
            os.close(fd)
            return None
        return cls(fd, clamp, names, numbers)

    def entry(self, name: str, row) -> tuple[bytes, memoryview] | None:
        """(header blocks, the whole entry) of the file `name` (the walk's name) made from
        `row` (size, mtime_ns, mode bits, uid, gid: an array('q'), as a table keeps its
        rows, or a tuple), or None if the pack has no such entry."""
        i = self.index.get(name)
        if i is None:
            return None
        k = i * NUMBERS
        numbers = self.numbers
        if not isinstance(row, array.array):
            row = array.array("q", row)
        if numbers[k + ROW:k + NUMBERS] != row:
            return None
        return self.read(numbers[k + OFFSET], numbers[k + HEADER], row[0])

    def read(self, offset: int, header: int, size: int) -> tuple[bytes, memoryview]:
        """(header blocks, the whole entry) of the entry at `offset` with `header` bytes of
        header and `size` of content (entry() found them in the index)."""
        length = header + size + (-size % 512)
        start = offset - self._start
        if start < 0 or start + length > len(self._window):
            self._window = os.pread(self.fd, max(_WINDOW, length), offset)
            self._start, start = offset, 0
            if len(self._window) < length:
                raise OSError(f"{PACK} ends early (at byte {offset})")
        view = memoryview(self._window)[start:start + length]
        return bytes(view[:header]), view

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PackWriter:
    """Collects the entries a stacked commit read from its base, for PackReader.

    It is a cache: a write that fails (a full disk) drops the pack, never the commit.
    """

    def __init__(self, tmp_dir: str, clamp: int | None):
        self.clamp = clamp
        self.path = os.path.join(tmp_dir, f"{PACK}-{os.urandom(6).hex()}")
        self._file = None
        self._names: list[str] = []
        self._numbers = array.array("q")
        self._offset = 0
        self._pieces: list[bytes] = []
        self._pending = 0
        self._writing = None
        try:
            self._file = open(self.path, "xb", buffering=0)
        except OSError:
            return
        self._writing = compress.Stage(self._file.write, "pybuild-pack-write")

    def add(self, name: str, row: tuple, header: bytes, entry: bytes) -> None:
        """The entry of the file `name`, made from `row`: `header` then content and padding."""
        if self._file is None:
            return
        self._pieces.append(entry)
        self._pending += len(entry)
        if self._pending >= _CHUNK and not self._put():
            return
        self._names.append(name)
        self._numbers.extend((self._offset, len(header), *row))
        self._offset += len(entry)

    def _put(self) -> bool:
        """Hand the pieces to the writing thread; False (and the pack dropped) if it failed."""
        data, self._pieces, self._pending = b"".join(self._pieces), [], 0
        try:
            self._writing.put(data)
        except OSError:
            self.abort()
            return False
        return True

    def install(self, layer_dir: str) -> bool:
        """Finish the file and rename it into `layer_dir`; False if it could not be (whoever
        comes last wins: a pack holds the same bytes whoever made it)."""
        if self._file is None or not self._names:
            self.abort()
            return False
        index = marshal.dumps({"clamp": self.clamp, "names": self._names,
                               "numbers": self._numbers.tobytes()})
        self._pieces.append(index + _TRAILER.pack(self._offset))
        try:
            if not self._put():
                return False
            writing, self._writing = self._writing, None
            writing.finish()
            self._file.close()
            self._file = None
            os.rename(self.path, os.path.join(layer_dir, PACK))
        except OSError:
            self.abort()
            return False
        self.path = None
        return True

    def abort(self) -> None:
        """Drop the pack (the commit goes on without it)."""
        if self._writing is not None:
            self._writing.stop()
            self._writing = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None
