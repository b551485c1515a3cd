"""Tar headers, written by hand so that layers are deterministic and cheap per entry.

`tarfile` spends most of a small file's time building a TarInfo and
formatting it; a layer of 30,000 files is mostly headers. This module packs
USTAR headers with one precompiled struct and falls back to a PAX extended
header only for what USTAR cannot say (long or non-ASCII names, large sizes
or ids, xattrs), the choice Go's archive/tar makes for Docker and BuildKit.
No user or group names, no access or change times: only what an image needs.
"""

from __future__ import annotations

import struct
from zlib import adler32

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)

REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"
PAX_HEADER = b"x"

_MAX_OCTAL_7 = 0o7777777
_MAX_OCTAL_11 = 0o77777777777


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for a path USTAR can hold, or None."""
    if len(name) <= 100:
        return b"", name
    cut = name.rfind(b"/", 0, 156)
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1:]
        cut = name.rfind(b"/", 0, cut)
    return None


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pad(size: int) -> bytes:
    rem = size % BLOCK
    return b"\0" * (BLOCK - rem) if rem else b""


def header(name: str, *, typeflag: bytes, mode: int, uid: int = 0, gid: int = 0, size: int = 0,
           mtime: int = 0, linkname: str = "", devmajor: int = 0, devminor: int = 0,
           xattrs: dict[str, bytes] | None = None) -> bytes:
    """The bytes of one entry's header (a PAX header first where needed)."""
    raw_name = name.encode("utf-8", "surrogateescape")
    if (not xattrs and not linkname and len(raw_name) <= 100 and raw_name.isascii()
            and uid <= _MAX_OCTAL_7 and gid <= _MAX_OCTAL_7 and size <= _MAX_OCTAL_11
            and 0 <= mtime <= _MAX_OCTAL_11):
        # Most entries of most layers: one USTAR block, nothing to decide.
        return _block(raw_name, typeflag, mode, uid, gid, size, mtime, b"", devmajor, devminor, b"")
    pax: list[bytes] = []
    raw_link = linkname.encode("utf-8", "surrogateescape")
    split = _split_ustar(raw_name) if raw_name.isascii() else None
    if split is None:
        pax.append(_pax_record("path", raw_name))
        split = (b"", raw_name[:100])
    if len(raw_link) > 100 or not raw_link.isascii():
        pax.append(_pax_record("linkpath", raw_link))
        raw_link = raw_link[:100]
    if size > _MAX_OCTAL_11:
        pax.append(_pax_record("size", str(size).encode()))
    if uid > _MAX_OCTAL_7:
        pax.append(_pax_record("uid", str(uid).encode()))
    if gid > _MAX_OCTAL_7:
        pax.append(_pax_record("gid", str(gid).encode()))
    if mtime < 0 or mtime > _MAX_OCTAL_11:
        pax.append(_pax_record("mtime", str(mtime).encode()))
    if xattrs:
        for key in sorted(xattrs):
            pax.append(_pax_record("SCHILY.xattr." + key, xattrs[key]))
    out = b""
    if pax:
        data = b"".join(pax)
        base = raw_name.rstrip(b"/").rsplit(b"/", 1)[-1][:80]
        out = _block(b"PaxHeaders.0/" + base, PAX_HEADER, 0o644, 0, 0, len(data), 0, b"", 0, 0, b"")
        out += data + pad(len(data))
    prefix, short = split
    out += _block(short, typeflag, mode,
                  uid if uid <= _MAX_OCTAL_7 else 0, gid if gid <= _MAX_OCTAL_7 else 0,
                  size if size <= _MAX_OCTAL_11 else 0,
                  mtime if 0 <= mtime <= _MAX_OCTAL_11 else 0,
                  raw_link, devmajor, devminor, prefix)
    return out


# name[100] | mode uid gid size mtime | chksum | type | linkname[100] | magic version | names | dev | prefix
_NUMBERS = b"%07o\0%07o\0%07o\0%011o\0%011o\0"
_MAGIC_AND_NAMES = b"ustar\x0000" + b"\0" * 64
_TAIL = struct.Struct("155s12x")
_CHECKSUM_FIELD = 8 * 32                      # the checksum field counts as spaces
_tails: dict[tuple, tuple[bytes, int]] = {}   # most entries share one tail: built once


def _block(name: bytes, typeflag: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
           linkname: bytes, devmajor: int, devminor: int, prefix: bytes) -> bytes:
    # Concatenated pieces instead of one struct with sixteen fields: this runs once per
    # file of every layer, and the fewer Python-level operations the better. The checksum
    # is the sum of all bytes; zero padding adds nothing, so only the pieces are summed.
    name = name[:100]
    key = (typeflag, linkname, devmajor, devminor, prefix)
    tail = _tails.get(key)
    if tail is None:
        data = (typeflag + linkname.ljust(100, b"\0") + _MAGIC_AND_NAMES +
                b"%07o\0%07o\0" % (devmajor, devminor) + _TAIL.pack(prefix))
        tail = (data, sum(data))
        if len(_tails) < 256:
            _tails[key] = tail
    numbers = _NUMBERS % (mode & 0o7777, uid, gid, size, mtime)
    checksum = sum(name) + sum(numbers) + tail[1] + _CHECKSUM_FIELD
    return name.ljust(100, b"\0")[:100] + numbers + b"%06o\0 " % checksum + tail[0]


_REGULAR_TAIL = _block(b"", REGULAR, 0, 0, 0, 0, 0, b"", 0, 0, b"")[156:]   # (type on)
_REGULAR_TAIL_SUM = sum(_REGULAR_TAIL)


def regular(name: str, mode: int, uid: int, gid: int, size: int, mtime: int) -> bytes:
    """header() of a regular file: the same bytes, made faster for the usual case (a short
    ASCII name, small numbers), which is most entries of most layers.

    The checksum of the name and numbers is the low half of their Adler-32 less one: that
    half is 1 + the sum of the bytes modulo 65521, and 100 ASCII bytes and 48 bytes of
    octal digits sum to less than that."""
    raw = name.encode("utf-8", "surrogateescape")
    if (len(raw) <= 100 and raw.isascii() and uid <= _MAX_OCTAL_7 and gid <= _MAX_OCTAL_7
            and size <= _MAX_OCTAL_11 and 0 <= mtime <= _MAX_OCTAL_11):
        numbers = _NUMBERS % (mode & 0o7777, uid, gid, size, mtime)
        checksum = (adler32(numbers, adler32(raw)) & 0xFFFF) - 1 + _REGULAR_TAIL_SUM \
            + _CHECKSUM_FIELD
        return raw.ljust(100, b"\0") + numbers + b"%06o\0 " % checksum + _REGULAR_TAIL
    return header(name, typeflag=REGULAR, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime)
