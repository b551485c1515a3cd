"""Segmented COPY blobs: a rebuilt COPY copies the compressed members it shares with the last one.

A COPY rebuilt after one of its 30,000 files changed links the other 29,999
from its last layer (donor.py), but its blob was compressed from scratch:
the compressing thread's 0.35 s of CPU competed with the tar walk on two
cores. So the gzip blob of a COPY layer is a series of gzip members (as
valid a gzip file as one member: every reader reads on to the end), and the
layer keeps an index of them. The tar is still walked and hashed in full
(the diff_id needs every byte); a member whose tar bytes are known to be
those of a member of the donor's blob is copied from that blob instead of
compressed again.

Where a member ends depends only on the tar: after an entry, once
SEGMENT_MIN bytes have been written since the last cut, if the CRC-32 of the
entry's name has its low three bits zero. A change moves cuts at most up to
the next one both streams agree on, and the compressor is fed the same
pieces within a member however the layer was made (ISA-L's output depends
on how its input is split), so a cold commit and an incremental one of the
same files give the same blob, byte for byte.

A member's signature is the SHA-256 of its entries' tar headers and, for
each file with content, the content digest the COPY recorded for it (its
`copied-2` table): together they determine the member's tar bytes. A
member with a file whose digest is not known has no signature and is never
copied. Before copying, the sink also checks the CRC-32 and length in the
donor member's gzip trailer against the bytes it is replacing, so an index
that does not describe its blob can only cost a compression, never a
wrong blob.

The index is `layers/<id>/segments`, JSON: the compressor, the blob's
digest, and [signature or null, tar bytes, blob bytes] per member.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import struct
import zlib

import isal

from ..store import direct
from . import compress, resumable, tarformat

INDEX = "segments"          # in the layer's directory, beside diff/ and layer.json
SEGMENT_MIN = 1 << 20       # tar bytes: gzip restarts its dictionary at each member
_CUT_MASK = 7               # then a cut after one entry in eight, on average
# What a member's bytes depend on besides its tar bytes: a member made otherwise is not copied.
COMPRESSOR = f"isal {isal.__version__} gzip level {compress.GZIP_LEVEL} pieces {compress._FLUSH_AT}"


class Segmenter:
    """Told of every entry the tar walk writes (diff.py); cuts the sink's stream into members.

    `digests.get(image path)` (`/app/x`) gives the content digest of the file
    there (hex, as bytes) or None; `digests` is None when nothing is known (no
    member is then signed).
    """

    def __init__(self, sink, digests, mapped: bool = False):
        self.sink = sink
        self.digests = digests
        self._since_cut = 0
        self._parts: list[bytes] = []
        self._signable = digests is not None
        # With `mapped`, where each entry lies (splice.py's tar map): its name, tar bytes and
        # content bytes, the whole entry of each one without content, entries per member.
        self.names: list[str] | None = [] if mapped else None
        self.lengths = array.array("q")
        self.sizes = array.array("q")
        self.empty: dict[str, bytes] = {}
        self.counts: list[int] = []
        self._counted = 0

    def entry(self, name: str, header: bytes, size: int) -> None:
        """An entry of `size` content bytes was written after `header` (all its header blocks)."""
        length = len(header) + size + (-size % tarformat.BLOCK)
        self._since_cut += length
        if self.names is not None:
            self.names.append(name)
            self.lengths.append(length)
            self.sizes.append(size)
            if not size:
                self.empty[name] = header
        if self._signable:
            self._parts.append(header)
            if size:
                digest = self.digests.get("/" + name)
                if digest is None:
                    self._signable = False
                else:
                    self._parts.append(digest)
        if self._since_cut >= SEGMENT_MIN and \
                not zlib.crc32(name.encode("utf-8", "surrogateescape")) & _CUT_MASK:
            self._cut()

    @property
    def at_cut(self) -> bool:
        """Was the stream just cut (after the last entry)?"""
        return self._since_cut == 0

    def end(self) -> None:
        """The end-of-archive blocks were written: the last member ends with them."""
        self._parts.append(tarformat.END_OF_ARCHIVE)
        self._cut()

    def _cut(self) -> None:
        if self.names is not None:
            self.counts.append(len(self.names) - self._counted)
            self._counted = len(self.names)
        signature = hashlib.sha256(b"".join(self._parts)).hexdigest() if self._signable else None
        self.sink.cut(signature)
        self._since_cut = 0
        self._parts = []
        self._signable = self.digests is not None


def encode_index(blob_digest: str, members: list[tuple[str | None, int, int]]) -> bytes:
    return json.dumps({"compressor": COMPRESSOR, "blob": blob_digest,
                       "members": [list(m) for m in members]}).encode()


class DonorBlob:
    """The members of the last layer of this COPY, by signature, and its blob held open.

    Holding the blob open keeps it readable while the commit copies from it,
    even if a prune removes the layer meanwhile.
    """

    def __init__(self, fd: int, members: dict[str, tuple[int, int, int]]):
        self.fd = fd
        self.members = members       # signature -> (offset in the blob, blob bytes, tar bytes)

    @classmethod
    def open(cls, layer_dir: str, blob_path: str, blob_digest: str) -> "DonorBlob | None":
        """The donor layer's members, or None if it has no usable index."""
        try:
            with open(os.path.join(layer_dir, INDEX), "rb") as f:
                index = json.loads(f.read())
            if index.get("compressor") != COMPRESSOR or index.get("blob") != blob_digest:
                return None
            members, offset = {}, 0
            for signature, tar_size, blob_size in index["members"]:
                if signature is not None:
                    members[signature] = (offset, int(blob_size), int(tar_size))
                offset += int(blob_size)
            fd = os.open(blob_path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None
        if os.fstat(fd).st_size != offset:
            os.close(fd)
            return None
        return cls(fd, members)

    def member(self, signature: str, tar_size: int, crc: int) -> tuple[int, int] | None:
        """(offset, size) of the member holding exactly these tar bytes, or None.

        The gzip trailer's CRC-32 and length of the tar bytes must be those
        the caller computed of the bytes it is about to replace.
        """
        found = self.members.get(signature)
        if found is None or found[2] != tar_size:
            return None
        offset, size, _ = found
        with contextlib.suppress(OSError):
            trailer = os.pread(self.fd, 8, offset + size - 8)
            if len(trailer) == 8 and struct.unpack("<II", trailer) == (crc, tar_size & 0xFFFFFFFF):
                return offset, size
        return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


HOLD_MAX = 8 << 20          # tar bytes of one member held back while it may still be copied


class SegmentedSink(compress.LayerSink):
    """A gzip LayerSink whose stream is cut into members where a Segmenter says.

    The compressing thread hashes the tar (diff_id): when members are copied
    it has little else to do, and the walking thread is the slowest.
    With a `donor`, the caller's thread holds back the pieces of the current
    member (up to HOLD_MAX) until its cut; a member the donor has is then
    copied from the donor's blob, and the held pieces are only hashed. Either
    way the compressing thread is fed the same pieces of a member, from its
    first byte, so what it makes does not depend on how the layer was made.
    `members` lists (signature, tar bytes, blob bytes) per member, for the index;
    `reused` counts the members copied. Where hash states can be kept
    (resumable.py), `states` lists, per member, the diff_id's and the blob
    digest's SHA-256 states where it ends (splice.py takes a layer up there).
    """

    def __init__(self, blob_writer, donor: DonorBlob | None = None):
        super().__init__(blob_writer, algorithm="gzip")
        self.donor = donor
        self.members: list[tuple[str | None, int, int]] = []    # (written by the writing thread)
        self.states: list[tuple[bytes, bytes]] | None = None
        if resumable.available():            # (nothing is hashed yet)
            self.diff_hash = resumable.Sha256()
            blob_writer.hash = resumable.Sha256()
            self.states = []
        self.reused = 0
        self._member_tar = 0                       # tar bytes of the current member
        self._held: list[bytes] | None = [] if donor is not None else None
        self._held_size = 0
        self._crc = 0
        self._blob_bytes = 0                       # of the current member (writing thread)
        self._start_stages()

    def _start_stages(self) -> None:
        self._write = compress.Stage(self._write_one, "pybuild-blob-write")
        self._compress = compress.Stage(self._compress_one, "pybuild-compress")

    # ---- the caller's thread

    def resume(self, fd: int, members: list[tuple[str | None, int, int]],
               states: list[tuple[bytes, bytes]]) -> None:
        """Begin with the first members of another layer's blob (open at `fd`), whose index
        entries and hash states where each ends are `members` and `states`: their bytes
        are copied in the kernel, not read or hashed. Only before anything else."""
        if self.tar_size or self.states is None:
            raise ValueError("resume() after a write, or without hash states")
        diff_state, blob_state = states[-1]
        self.diff_hash = resumable.Sha256(diff_state)
        self.out.resume(fd, sum(m[2] for m in members), resumable.Sha256(blob_state))
        self.members.extend(members)
        self.states.extend(states)
        self.tar_size += sum(m[1] for m in members)

    def add_member(self, tar: bytes, fd: int, offset: int, size: int,
                   signature: str | None, blob: bytes | None = None) -> None:
        """Add a whole member of another layer's blob as it is: the `size` bytes at `offset`
        of the blob open at `fd` (or `blob`, those bytes, if the caller has read them), and
        `tar`, the bytes it holds (the caller has them: splice.py). Only where the stream
        was just cut (a Segmenter's since-cut count is 0)."""
        self._flush()
        if self._member_tar or self._pieces:
            raise ValueError("add_member() inside a member")
        self.tar_size += len(tar)
        self._compress.put(("member", tar, signature, (offset, size), fd, blob))

    def _flush(self, last: bool = False) -> None:
        if not self._pieces:
            return
        data = self._take()
        self._member_tar += len(data)
        if self._held is None:
            self._compress.put(data)
            return
        self._held.append(data)
        self._held_size += len(data)
        self._crc = compress.isal_zlib.crc32(data, self._crc)
        if self._held_size > HOLD_MAX:           # too big to hold: compressed after all
            self._release()
            self._held = None

    def _release(self) -> None:
        for piece in self._held:
            self._compress.put(piece)
        self._held = []
        self._held_size = 0

    def cut(self, signature: str | None) -> None:
        """End the current member here; `signature` says what it holds (None: unknown)."""
        self._flush()
        found = None
        if self._held is not None and signature is not None and self._member_tar:
            found = self.donor.member(signature, self._member_tar, self._crc)
        if found is not None:
            for piece in self._held:
                self._compress.put(("hash", piece))
            self._compress.put(("copy", signature, self._member_tar, found, self.donor.fd, None))
            self.reused += 1
        else:
            if self._held:
                self._release()
            self._compress.put(("cut", signature, self._member_tar))
        self._member_tar = 0
        self._crc = 0
        self._held = [] if self.donor is not None else None
        self._held_size = 0

    def close(self) -> None:
        if self._closed:
            return
        self._flush()
        if self._member_tar:                     # (the walk ends every layer with a cut)
            self.cut(None)
        self._closed = True
        try:
            try:
                self._compress.finish()
            finally:
                self._write.finish()          # (after the compressing thread: it writes to it)
        finally:
            self._compress = self._write = None

    # ---- the compressing thread

    def _compress_one(self, item) -> None:
        if isinstance(item, tuple):
            kind = item[0]
            if kind == "hash":                 # a piece of a member copied from the donor
                self.diff_hash.update(item[1])
                return
            if kind == "member":                 # copied from its blob by the writing thread
                _, tar, signature, where, fd, blob = item
                self.diff_hash.update(tar)
                item = ("copy", signature, len(tar), where, fd, blob)
            elif kind == "cut":
                out = self._compressor.flush()
                self._compressor = compress._compressor("gzip")
                if out:
                    self._write.put(out)
            if self.states is not None:        # (the diff_id's state where the member ends)
                item += (self.diff_hash.state(),)
            self._write.put(item)
            return
        self.diff_hash.update(item)
        out = self._compressor.compress(item)
        if out:
            self._write.put(out)

    # ---- the writing thread

    def _write_one(self, item) -> None:
        if not isinstance(item, tuple):
            self.out.write(item)
            self._blob_bytes += len(item)
            return
        kind = item[0]
        if kind == "copy":                       # (from the donor's blob, or another's)
            _, signature, tar_size, (offset, size), fd, blob = item[:6]
            if blob is not None:
                self.out.write(blob)
            else:
                for piece in direct.read_range(fd, offset, size):
                    self.out.write(piece)
            self.members.append((signature, tar_size, size))
        else:
            _, signature, tar_size = item[:3]
            self.members.append((signature, tar_size, self._blob_bytes))
        self._blob_bytes = 0
        if self.states is not None:
            self.states.append((item[-1], self.out.hash.state()))
