"""Directory trees of any depth: removing them (`rm -rf`) and walking them (`os.walk`).

A RUN step can leave a tree thousands of levels deep in a layer, and both
`shutil.rmtree` and Python 3.11's `os.walk` recurse once per level: past
Python's recursion limit they raise RecursionError, which no
`ignore_errors` catches (a layer was left half removed). These keep a list
per level instead of a stack frame.

`remove_tree` holds one directory open at a time (it goes back up through
`..`), never follows a symlink, and opens up directories whose mode keeps
even their owner out (overlay work dirs are created 000).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str, *, ignore_errors: bool = False) -> None:
    """Remove `path` and everything below it; a missing path is not an error.

    With `ignore_errors`, removal goes as far as it can and never raises OSError.
    """
    try:
        _remove(path)
    except OSError:
        if not ignore_errors:
            raise


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    parent, top = os.path.split(os.path.abspath(path))
    # The parent may be reached through symlinks (a store under a linked path); `top` is not.
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = -1
    try:
        fd = _enter(parent_fd, top)
        levels = [(top, _clear(fd))]        # (name, subdirectories still to remove)
        while levels:
            name, pending = levels[-1]
            if pending:
                sub = pending.pop()
                child = _enter(fd, sub)
                os.close(fd)
                fd = child
                levels.append((sub, _clear(fd)))
                continue
            levels.pop()
            if levels:
                up = os.open("..", _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = up
                _rmdir(fd, name)
            else:
                os.close(fd)
                fd = -1
                _rmdir(parent_fd, name)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(parent_fd)


def _enter(dir_fd: int, name: str) -> int:
    """Open the subdirectory `name`, making it enterable first if its mode says no."""
    try:
        return os.open(name, _O_DIR, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, stat.S_IRWXU, dir_fd=dir_fd)
        return os.open(name, _O_DIR, dir_fd=dir_fd)


def _rmdir(dir_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except PermissionError:
        os.fchmod(dir_fd, stat.S_IRWXU)      # a directory that refuses changes, even to its owner
        os.rmdir(name, dir_fd=dir_fd)


def _clear(fd: int) -> list[str]:
    """Unlink every non-directory in the open directory `fd`; its subdirectories' names."""
    with os.scandir(fd) as it:
        entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    subdirs = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
            continue
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except PermissionError:
            os.fchmod(fd, stat.S_IRWXU)
            os.unlink(name, dir_fd=fd)
    return subdirs


def walk(top: str, topdown: bool = True) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(top, topdown)` without recursion: the same (dirpath, dirnames, filenames),
    symlinks to directories listed among the directories but not entered, unreadable
    directories skipped; top-down, the caller may prune `dirnames` in place."""
    pending: list = [top]
    while pending:
        item = pending.pop()
        if isinstance(item, tuple):            # bottom-up: its subdirectories are done
            yield item
            continue
        try:
            with os.scandir(item) as it:
                entries = list(it)
        except OSError:
            continue
        dirs, files, enter = [], [], []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(e.name)
            if is_dir and not topdown and not e.is_symlink():
                enter.append(e.path)
        if topdown:
            yield item, dirs, files
            enter = [p for p in (os.path.join(item, d) for d in dirs) if not os.path.islink(p)]
        else:
            pending.append((item, dirs, files))
        pending.extend(reversed(enter))
