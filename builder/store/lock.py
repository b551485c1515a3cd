"""File locks that make several pybuild processes on one store safe, and private temp files.

`flock` locks belong to an open file description, so a lock taken by a
process is also held by the children it forks (the sandbox), and is released
by the kernel when the last of them dies, even after `kill -9`. That is what
lets a later process tell a live build's temp dir from a dead one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` at once: a reader sees the old file or the new, never half of
    one (a temp file beside it, renamed over it, and removed if anything fails first)."""
    fd, tmp = new_temp_file(os.path.dirname(path) or ".", f".{os.path.basename(path)}.")
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json_dict(path: str) -> dict:
    """The JSON object a small state file of the store holds (what write_atomic wrote), or {}
    when it is missing, unreadable or damaged: such files only save work."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def new_temp_file(directory: str, prefix: str) -> tuple[int, str]:
    """(fd, path) of a new, empty, private file in `directory` (tempfile.mkstemp, lighter).

    `tempfile` imports `random` and `shutil`, which a fully cached build
    would otherwise load only for this.
    """
    while True:
        path = os.path.join(directory, f"{prefix}{os.urandom(6).hex()}")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        except FileExistsError:
            continue
