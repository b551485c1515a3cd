"""Writing layer blobs (and base tars) past the page cache (O_DIRECT), while the disk keeps up.

A blob is written once and read rarely (a push, a save, the next build of
its COPY): kept in the page cache, it only pushes out the files the next
steps read. On a VM, putting it there is also the dearest part of a commit:
each page the guest touches for the first time in a while is faulted in by
the host (here 2.4 ms per MB: a 140 MB blob cost 0.36 s of CPU, a third of
its commit), while the same bytes written with O_DIRECT went at 1.4-2.1 GB/s
for almost no CPU. A slow disk is the opposite case: there the page cache
absorbs the write and the kernel flushes it later. So DirectFile writes
directly while the device takes at least DIRECT_MIN_RATE, measured over the
first writes (once per file system and process); through the page cache
otherwise, and wherever the file system refuses O_DIRECT (EINVAL: tmpfs
before Linux 6.6, some FUSE and network file systems). read_range() reads
such files back the same way, unless they are in the page cache after all.

O_DIRECT wants the buffer, the length and the file offset aligned to the
device's block: bytes are gathered in a page-aligned buffer (an anonymous
mapping) and written a whole buffer at a time; the tail is written through
the page cache once O_DIRECT is switched off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import time

CHUNK = 4 << 20             # bytes per direct write: a multiple of any block size
JUDGED_AFTER = 16 << 20     # bytes written directly before the rate is judged
DIRECT_MIN_RATE = 800e6     # bytes per second: slower than this, the page cache does better
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_slow_devices: set[int] = set()     # st_dev of file systems judged too slow, in this process


class DirectFile:
    """Write-only: write(data) in order, then close() (or discard()); as much of a file object
    as BlobWriter uses."""

    def __init__(self, fd: int):
        self.fd = fd
        self._buf: mmap.mmap | None = None
        self._used = 0
        self._direct_bytes = 0
        self._direct_seconds = 0.0
        self._device = os.fstat(fd).st_dev
        if _O_DIRECT and self._device not in _slow_devices:
            # (The buffer first: O_DIRECT is never left on without one.)
            with contextlib.suppress(OSError):
                buf = mmap.mmap(-1, CHUNK)
                try:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
                    self._buf = buf
                except OSError:
                    _close(buf)

    @property
    def direct(self) -> bool:
        return self._buf is not None

    def write(self, data) -> None:
        if self._buf is None:
            write_all(self.fd, data)
            return
        view = memoryview(data)
        while view:
            n = min(len(view), CHUNK - self._used)
            self._buf[self._used:self._used + n] = view[:n]
            self._used += n
            view = view[n:]
            if self._used == CHUNK:
                self._write_chunk()
                if self._buf is None:            # (became buffered: the rest goes as it is)
                    write_all(self.fd, view)
                    return

    def _write_chunk(self) -> None:
        t0 = time.perf_counter()
        done, refused = 0, False
        with memoryview(self._buf) as view:
            while done < CHUNK:
                try:
                    done += os.write(self.fd, view[done:CHUNK])
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    refused = True
                    break
        if refused:
            # Refused after all (an alignment this device does not take, or what a short
            # write left): the rest goes through the page cache.
            self._to_buffered(done)
            return
        self._used = 0
        self._direct_bytes += CHUNK
        self._direct_seconds += time.perf_counter() - t0
        if self._direct_bytes == JUDGED_AFTER and \
                self._direct_bytes < DIRECT_MIN_RATE * self._direct_seconds:
            _slow_devices.add(self._device)      # (the next blobs there start buffered)
            self._to_buffered()

    def _to_buffered(self, start: int = 0) -> None:
        """Switch O_DIRECT off, writing what the buffer holds from `start` through the page
        cache."""
        buf, used = self._buf, self._used
        self._buf, self._used = None, 0
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        try:
            write_all(self.fd, memoryview(buf)[start:used])
        finally:
            _close(buf)

    def flush(self) -> None:
        """Write what is buffered, and go on through the page cache (before anything else
        writes to the file, or reads it: fileops.copy_data)."""
        if self._buf is not None:
            self._to_buffered()

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Close without writing what is buffered (the file is about to be removed)."""
        if self._buf is not None:
            _close(self._buf)
            self._buf = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def write_all(fd: int, data) -> None:
    """os.write() until all of `data` is written (a write may take less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close(buf: mmap.mmap) -> None:
    """Unmap `buf`, unless a view of it is still alive (an error is on its way up: the
    mapping then goes with the last view)."""
    with contextlib.suppress(BufferError):
        buf.close()


_BLOCK = 4096               # offsets and lengths of direct reads: a multiple of any block size


class BlobEndsEarly(OSError):
    """A file read_range() was asked for more of than it holds."""


def read_range(fd: int, offset: int, length: int):
    """The `length` bytes at `offset` of the file open at `fd`, in pieces (each one to be
    used before the next is asked for: they may share a buffer).

    For copying a blob's bytes into another (segments.py, BlobWriter.resume), or
    out (save, push: read_chunks): a blob written by DirectFile is not in the
    page cache, and reading it through the cache fills fresh pages as writing
    it that way would have. So where its first page is not cached (a read with
    RWF_NOWAIT says so), it is read past the cache, in aligned pieces;
    otherwise, or where O_DIRECT is refused, through it.
    """
    end = offset + length
    direct_fd = _direct_reader(fd, offset) if length > 0 else None
    if direct_fd is not None:
        at = offset - offset % _BLOCK          # aligned; the bytes before `offset` are skipped
        buf = mmap.mmap(-1, min(CHUNK, -(-(end - at) // _BLOCK) * _BLOCK))
        try:
            while offset < end:
                want = min(len(buf), -(-(end - at) // _BLOCK) * _BLOCK)
                try:
                    got = os.preadv(direct_fd, [memoryview(buf)[:want]], at)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    break                      # refused after all: the rest through the cache
                if got <= offset - at:
                    raise BlobEndsEarly(f"a blob ends early (at byte {at + got})")
                take = min(at + got, end) - offset
                yield memoryview(buf)[offset - at:offset - at + take]
                offset += take
                at += got
                if got % _BLOCK:               # (a short read only at the end of the file)
                    break
        finally:
            os.close(direct_fd)
            _close(buf)
    while offset < end:
        data = os.pread(fd, min(CHUNK, end - offset), offset)
        if not data:
            raise BlobEndsEarly(f"a blob ends early (at byte {offset})")
        yield data
        offset += len(data)


def read_chunks(fd: int, size: int, n: int):
    """The first `size` bytes of the file open at `fd`, read as read_range() reads them, as
    bytes objects of `n` bytes each (the last one shorter): for a push, whose chunks the
    HTTP client may keep while it sends them."""
    pending = b""
    for piece in read_range(fd, 0, size):
        view = memoryview(piece)
        if pending:
            need = n - len(pending)
            pending += bytes(view[:need])
            view = view[need:]
            if len(pending) < n:
                continue
            yield pending
            pending = b""
        while len(view) >= n:
            yield bytes(view[:n])
            view = view[n:]
        pending = bytes(view)
    if pending:
        yield pending


def _direct_reader(fd: int, offset: int) -> int | None:
    """A descriptor of `fd`'s file open with O_DIRECT, if the page at `offset` is not in the
    page cache and the file system takes O_DIRECT; else None."""
    if not _O_DIRECT or not hasattr(os, "RWF_NOWAIT"):
        return None
    try:
        os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
        return None                              # cached: read it there
    except BlockingIOError:
        pass
    except OSError:
        return None                              # (RWF_NOWAIT not taken here: EOPNOTSUPP)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
    except OSError:
        return None
