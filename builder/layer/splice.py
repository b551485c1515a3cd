"""A stacked COPY layer's tar and blob, spliced from its base's: only what changed is walked.

A COPY rebuilt after one of its 30,000 files changed is stacked on its last
full layer (donor.py): its diff dir holds the changed files and the
directories. Its tar is still a full layer tar, and walking it entry by
entry, even from a pack of ready entries, cost 0.5 s of Python for 30,000
entries. But that tar is the base layer's tar with a few entries replaced or
added (a layer is stacked only if it has every entry of its base), and the
base's blob is a series of gzip members cut where the tar's entries say
(segments.py), the same cuts a walk of the new tree makes wherever the two
trees agree. So a full layer also keeps a map of its tar (`tar-map`): each
entry's name, tar bytes and content bytes, the whole entry of each one
without content (directories), how many entries each member holds, and the
SHA-256 states of the diff_id and the blob where each member ends
(resumable.py). A commit stacked on it then:

* walks only its own diff dir (a few files, the directories), keeping the
  entries it makes, and finds each one's place among the base's entries (a
  directory whose entry is the base's is no change);
* takes the members before the first change as they are: their blob bytes
  copied in the kernel, both hashes taken up from the saved states;
* writes the members with a change entry by entry, as the walk would have
  (the base's entries cut out of the member's tar bytes, the new ones merged
  in by name), until its stream is cut where the base's is again;
* adds each later member without a change whole: its tar bytes hashed for
  the diff_id by the compressing thread, its blob bytes copied as they are
  by the writing thread.

The members' tar bytes come from the base's tar file (basetar.py), or,
before a commit has written it, from the base's blob, decompressed.
The result is byte for byte the tar and blob a full walk gives (tests
compare them). Anything the map does not cover (another SOURCE_DATE_EPOCH,
another compressor, a damaged map, entries other than directories and plain
files, more than CAPTURE_MAX bytes of changed files) leaves the commit to the
full walk.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import json
import marshal
import os
import struct
import threading

from ..store import direct
from . import basetar, diff, resumable, segments, tarformat

MAP = "tar-map"                  # in the layer's directory, beside diff/ and segments
_VERSION = 1
CAPTURE_MAX = 64 << 20           # changed files' bytes held in memory while spliced


def encode_map(seg: segments.Segmenter, sink: segments.SegmentedSink, clamp: int | None,
               blob_digest: str) -> bytes:
    """The tar map of a layer just walked with a mapped Segmenter into `sink`."""
    states = b"".join(d + b for d, b in sink.states) \
        if sink.states is not None and len(sink.states) == len(seg.counts) else b""
    return marshal.dumps({
        "version": _VERSION, "compressor": segments.COMPRESSOR, "clamp": clamp,
        "blob": blob_digest, "library": resumable.LIBRARY if states else None,
        "names": seg.names, "lengths": seg.lengths.tobytes(), "sizes": seg.sizes.tobytes(),
        "empty": seg.empty, "counts": seg.counts, "states": states})


class Base:
    """A full layer's tar map, its members (from its segments index), its blob held open and
    its tar (basetar.py): read from its file if it has one, else decompressed and written."""

    def __init__(self, data: dict, members: list, fd: int, layer_dir: str):
        self.layer_dir = layer_dir
        self.names: list[str] = data["names"]
        self.lengths = array.array("q", data["lengths"])
        self.sizes = array.array("q", data["sizes"])
        self.empty: dict[str, bytes] = data["empty"]
        self.counts: list[int] = data["counts"]
        self.members = members                  # (signature, tar bytes, blob bytes) each
        self.fd = fd
        states, size = data["states"], resumable.STATE_SIZE
        self.states = None
        if states and resumable.available() and data["library"] == resumable.LIBRARY:
            self.states = [(states[i:i + size], states[i + size:i + 2 * size])
                           for i in range(0, len(states), 2 * size)]
        self.starts = [0]                       # the index of each member's first entry
        self.tar_at, self.blob_at = [0], [0]    # and where it begins in the tar, the blob
        for n, (_, tar_size, blob_size) in zip(self.counts, members):
            self.starts.append(self.starts[-1] + n)
            self.tar_at.append(self.tar_at[-1] + tar_size)
            self.blob_at.append(self.blob_at[-1] + blob_size)
        self.tar_fd = self.tar_writer = None
        self.last_blob: tuple[int, bytes] | None = None     # (member, its blob bytes): tar()
        self._ahead: _MembersAhead | None = None

    def consistent(self) -> bool:
        """Do the map's entries add up to each member's tar bytes (the last one's with the
        end-of-archive blocks)?"""
        lengths, last = self.lengths, len(self.members) - 1
        return all(sum(lengths[self.starts[k]:self.starts[k + 1]])
                   + (len(tarformat.END_OF_ARCHIVE) if k == last else 0) == tar_size
                   for k, (_, tar_size, _) in enumerate(self.members))

    @classmethod
    def open(cls, layer_dir: str, blob_path: str, blob_digest: str, clamp: int | None,
             tmp_dir: str) -> "Base | None":
        """The base layer's map, or None if it has none this commit can use."""
        try:
            with open(os.path.join(layer_dir, MAP), "rb") as f:
                data = marshal.loads(f.read())
            with open(os.path.join(layer_dir, segments.INDEX), "rb") as f:
                index = json.loads(f.read())
            if data.get("version") != _VERSION or data["compressor"] != segments.COMPRESSOR \
                    or data["clamp"] != clamp or data["blob"] != blob_digest \
                    or index.get("compressor") != segments.COMPRESSOR \
                    or index.get("blob") != blob_digest:
                return None
            members = [(m[0], int(m[1]), int(m[2])) for m in index["members"]]
            if len(members) != len(data["counts"]) or sum(data["counts"]) != len(data["names"]) \
                    or len(data["lengths"]) != 8 * len(data["names"]) \
                    or len(data["states"]) not in (0, 2 * resumable.STATE_SIZE * len(members)):
                return None
            fd = os.open(blob_path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, TypeError, KeyError, EOFError):
            return None
        base = cls(data, members, fd, layer_dir)
        if os.fstat(fd).st_size != base.blob_at[-1] or not base.consistent():
            base.close()
            return None
        base.tar_fd = basetar.open_tar(layer_dir, base.tar_at[-1])
        if base.tar_fd is None:
            base.tar_writer = basetar.TarWriter(tmp_dir)
        return base

    def entries(self, k: int) -> list[tuple[str, bytes, int]]:
        """Member k's entries: (name, tar bytes, content bytes)."""
        tar = self.tar(k)
        out, at = [], 0
        for i in range(self.starts[k], self.starts[k + 1]):
            length = self.lengths[i]
            out.append((self.names[i], tar[at:at + length], self.sizes[i]))
            at += length
        return out

    def read_ahead(self, first: int) -> None:
        """Members `first` to the last will be asked for in order (tar()): read their bytes
        (from the tar file, or else the blob) in a thread of its own, a few members ahead.
        Both are read past the page cache (store/direct.py), and waiting for the disk
        was a third of the first stacked commit's main thread."""
        last = len(self.members)
        if first >= last:
            return
        if self.tar_fd is not None:
            ranges = [(self.tar_fd, self.tar_at[k], self.members[k][1]) for k in range(first, last)]
        else:
            ranges = [(self.fd, self.blob_at[k], self.members[k][2]) for k in range(first, last)]
        self._ahead = _MembersAhead(first, ranges)

    def _read(self, k: int, fd: int, offset: int, size: int) -> bytes:
        """Member k's bytes at `offset` of `fd` (its tar's or its blob's): read ahead, or now."""
        if self._ahead is not None:
            data = self._ahead.take(k, fd)
            if data is not None:
                return data
        return _read_range(fd, offset, size)

    def tar(self, k: int) -> bytes:
        """Member k's tar bytes, checked against its gzip trailer (CRC-32 and length)."""
        tar_size = self.members[k][1]
        if self.tar_fd is not None:
            tar = self._read(k, self.tar_fd, self.tar_at[k], tar_size)
            trailer = _pread_exactly(self.fd, 8, self.blob_at[k + 1] - 8)
            if struct.unpack("<II", trailer) == (segments.compress.isal_zlib.crc32(tar),
                                                 tar_size & 0xFFFFFFFF):
                return tar
            # Not the layer's tar (a damaged disk): dropped, the blob is decompressed instead.
            self._stop_ahead()
            os.close(self.tar_fd)
            self.tar_fd = None
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.layer_dir, basetar.TAR))
        # (Past the page cache unless it holds the blob: a blob is written past it, and read
        # here once, to make the base's tar; the writing thread gets the bytes, blob_read.)
        blob = self._read(k, self.fd, self.blob_at[k], self.members[k][2])
        self.last_blob = (k, blob)
        tar = segments.compress.isal_zlib.decompress(blob, segments.compress._GZIP_WBITS)
        if len(tar) != tar_size:
            raise OSError(f"a member of the layer blob a commit is spliced from holds "
                          f"{len(tar)} tar bytes, not {tar_size}")
        if self.tar_writer is not None:
            self.tar_writer.add(tar)
        return tar

    def blob_read(self, k: int) -> bytes | None:
        """Member k's blob bytes, if tar(k) has just read them (else None)."""
        last, self.last_blob = self.last_blob, None
        return last[1] if last is not None and last[0] == k else None

    def keep_tar(self) -> None:
        """The commit succeeded: install the tar written on the way, if one was."""
        if self.tar_writer is not None:
            self.tar_writer.install(self.layer_dir, self.tar_at[-1])
            self.tar_writer = None

    def _stop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def close(self) -> None:
        self._stop_ahead()            # (before the descriptors it reads are closed)
        if self.tar_writer is not None:
            self.tar_writer.abort()
            self.tar_writer = None
        for fd in (self.fd, self.tar_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd, self.tar_fd = -1, None


def _read_range(fd: int, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the base's blob or tar file, past the page cache unless
    they are in it (direct.read_range)."""
    return b"".join([bytes(piece) for piece in direct.read_range(fd, offset, size)])


class _MembersAhead:
    """A thread that reads byte ranges (fd, offset, size), one per member from member
    `first` on, in order, and hands them to take(), up to AHEAD_BYTES ahead of it."""

    def __init__(self, first: int, ranges: list[tuple[int, int, int]]):
        self._ready = threading.Condition()
        self._items: collections.deque = collections.deque()     # (k, fd, bytes or OSError)
        self._held = 0                                             # bytes in _items
        self._stopping = self._done = False
        self._thread = threading.Thread(target=self._run, args=(first, ranges),
                                        name="pybuild-members-ahead", daemon=True)
        self._thread.start()

    def _run(self, first: int, ranges) -> None:
        try:
            self._read_all(first, ranges)
        finally:
            with self._ready:
                self._done = True
                self._ready.notify_all()

    def _read_all(self, first: int, ranges) -> None:
        for k, (fd, offset, size) in enumerate(ranges, first):
            with self._ready:
                while self._held and self._held + size > AHEAD_BYTES and not self._stopping:
                    self._ready.wait()
                if self._stopping:
                    return
            try:
                data = _read_range(fd, offset, size)
            except OSError as e:
                data = e
            with self._ready:
                self._items.append((k, fd, data))
                self._held += len(data) if isinstance(data, bytes) else 0
                self._ready.notify_all()
            if isinstance(data, OSError):
                return

    def take(self, k: int, fd: int) -> bytes | None:
        """Member k's bytes if they are the next ones read from `fd` (else None: the caller
        reads them itself); an error the thread met reading them is raised."""
        with self._ready:
            while True:
                while not self._items and not self._done:
                    self._ready.wait()
                if not self._items:
                    return None
                got, from_fd, data = self._items.popleft()
                self._held -= len(data) if isinstance(data, bytes) else 0
                self._ready.notify_all()
                if got >= k:
                    break                  # (an earlier member nobody asked for is skipped)
        if got > k or from_fd != fd:
            self.close()
            return None
        if isinstance(data, OSError):
            raise data
        return data

    def close(self) -> None:
        """Stop the thread and wait for it: the descriptors it reads may be closed next."""
        with self._ready:
            self._stopping = True
            self._items.clear()
            self._held = 0
            self._ready.notify_all()
        self._thread.join()


AHEAD_BYTES = 4 << 20       # member bytes read ahead at most (but always the next member)


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` of the base's blob or tar file."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(f"a file a layer is spliced from ends early "
                          f"(at byte {offset + len(data)})")
        data += more
    return data


class _TooBig(Exception):
    pass


class _Capture:
    """A sink and segmenter for diff.write_tar that keeps each entry's bytes."""

    def __init__(self):
        self.entries: list[tuple[str, bytes, int]] = []     # (name, tar bytes, content bytes)
        self._pieces: list[bytes] = []
        self._held = 0

    def write(self, data) -> None:
        self._pieces.append(data)
        self._held += len(data)
        if self._held > CAPTURE_MAX:
            raise _TooBig

    def entry(self, name: str, header: bytes, size: int) -> None:
        self.entries.append((name, b"".join(self._pieces), size))
        self._pieces = []

    def end(self) -> None:
        pass


def _key(name: str) -> list[str]:
    """A name's place in tar order: each directory's entries sorted, right after it."""
    return name.split("/")


def write_spliced(upper: str, sink: segments.SegmentedSink, seg: segments.Segmenter,
                  base: Base, view, clamp: int | None) -> diff.DiffStats | None:
    """Write the layer of `upper` stacked on `base` (diff.write_tar's `stacked_on` view) to
    `sink`, as write_tar would; None, with nothing written, if this cannot."""
    capture = _Capture()
    try:
        own = diff.write_tar(upper, capture, clamp_mtime=clamp, segmenter=capture, census=True)
    except _TooBig:
        return None
    if own.others:
        return None
    names = base.names
    # The changes: (position among the base's entries, replaces the entry there?, entry), in
    # tar order as the walk gave them (an added entry before the base's entry at the same
    # position). Nothing of the base is left out (checked below).
    changes = []
    kept = len(view.base_files()) + len(view.base_dirs())     # (the base's entries kept)
    for entry in capture.entries:
        name, data, size = entry
        p = bisect.bisect_left(names, _key(name), key=_key)
        same = p < len(names) and names[p] == name
        kept += same
        if same and not size and base.empty.get(name) == data:
            continue                                  # (a directory as the base has it)
        changes.append((p, same, entry))
    if kept != len(names):
        # (The base leaves to the layer only what its diff dir lacks, and a layer is stacked
        # only if it has every entry of its base, donor.py: so this does not happen.)
        return None
    last = len(base.members) - 1
    by_member: dict[int, list] = {}
    for change in changes:
        k = min(bisect.bisect_right(base.starts, change[0]) - 1, last)
        by_member.setdefault(k, []).append(change)

    stats = diff.DiffStats()
    first = min(by_member, default=last + 1)
    begin = 0
    # The members before the first change as they are, unless the base's tar is still to be
    # written (from every member, decompressed).
    if first and base.states is not None and base.tar_writer is None:
        sink.resume(base.fd, base.members[:first], base.states[:first])
        begin = first
        stats.entries = base.starts[first]
        stats.content_bytes = sum(base.sizes[:base.starts[first]])
    in_step = True                   # the stream was cut where the base's was
    base.read_ahead(begin)
    for k in range(begin, last + 1):
        start, end = base.starts[k], base.starts[k + 1]
        if in_step and k not in by_member:
            signature, _, blob_size = base.members[k]
            tar = base.tar(k)
            sink.add_member(tar, base.fd, base.blob_at[k], blob_size, signature, base.blob_read(k))
            stats.entries += end - start
            stats.content_bytes += sum(base.sizes[start:end])
        else:
            _write_entries(sink, seg, stats, base.entries(k), start, by_member.get(k, ()))
            if k == last:
                sink.write(tarformat.END_OF_ARCHIVE)
                seg.end()
            in_step = seg.at_cut
    return stats


def _write_entries(sink, seg, stats, entries, start: int, changes) -> None:
    """Write a member's entries of the base (the first is entry `start`) with `changes`."""
    at = 0
    for p, replaces, entry in changes:
        for name, data, size in entries[at:p - start]:
            _write(sink, seg, stats, name, data, size)
        at = p - start + replaces          # (past the base's entry it replaces)
        _write(sink, seg, stats, *entry)
    for name, data, size in entries[at:]:
        _write(sink, seg, stats, name, data, size)


def _write(sink, seg, stats, name: str, data: bytes, size: int) -> None:
    """Write one entry as the walk does (diff._write_file): ISA-L's output depends on how its
    input comes in pieces, so a file bigger than diff._READ goes as its header, its content
    in pieces of that size, and its padding."""
    pad = -size % tarformat.BLOCK
    header = data[:len(data) - size - pad]
    if size <= diff._READ:
        sink.write(data)
    else:
        view = memoryview(data)
        sink.write(header)
        for at in range(len(header), len(header) + size, diff._READ):
            sink.write(bytes(view[at:min(at + diff._READ, len(header) + size)]))
        sink.write(bytes(view[len(data) - pad:]))
    seg.entry(name, header, size)
    stats.entries += 1
    stats.content_bytes += size
