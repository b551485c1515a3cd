"""File locks that make several pybuild processes on one store safe.

`flock` locks belong to an open file description, so a lock taken by a
process is also held by the children it forks (the sandbox), and is released
by the kernel when the last of them dies, even after `kill -9`. That is what
lets a later process tell a live build's temp dir from a dead one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def locked(path: str, *, shared: bool = False):
    """Hold an exclusive (or shared) lock on `path` for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def try_lock(path: str) -> int | None:
    """Take an exclusive lock without waiting; the fd holds it, or None if busy."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
