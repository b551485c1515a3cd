"""Resolving paths inside a root directory without ever leaving it.

An image's filesystem and a build context are full of symlinks that mean
something only inside them (`/etc/resolv.conf -> /run/...`, `lib -> usr/lib`,
`../../etc`). Handing such a path to the host's kernel would resolve it
against the host's root. `resolve_in_root` walks the path one component at a
time, follows symlinks as if `root` were `/`, and returns a host path whose
every existing component is a real directory under `root`, so that a caller
may then use it while nothing else is changing the tree (before a RUN's
command starts, or inside a context nobody writes to during the build).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat

MAX_SYMLINKS = 40


def clean(path: str) -> str:
    """`path` as a clean relative path inside a root ('' for the root itself); `..` stops at the root."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


def shortened(path: str, root: str = "", limit: int = 200) -> str:
    """`path` for a message: below `root` (a layer's or an image's directory on the host),
    the part from there on (`/x/y`, as the layer or image sees it); one longer than `limit`
    keeps its first and last 80 characters (a path near PATH_MAX is 4 KB of text, and its
    two ends say which it is)."""
    if root and path.startswith(root + "/"):
        path = path[len(root):]
    if len(path) <= limit:
        return path
    return f"{path[:80]}...({len(path) - 160} characters)...{path[-80:]}"


def escapes(path: str) -> bool:
    """True if the relative or absolute name `path` climbs above its root with `..` (lexically)."""
    norm = posixpath.normpath("/" + path.lstrip("/")) if path.startswith("/") else posixpath.normpath(path)
    return norm == ".." or norm.startswith("../")


class EscapesRoot(ValueError):
    """A path or one of its symlinks leads outside the root (strict resolution only)."""


def resolve_in_root(root: str, path: str, *, strict: bool = False) -> str:
    """The host path of `path` inside `root`, with symlinks followed as if `root` were `/`.

    Components that do not exist are appended as they are; the result never
    lies outside `root`. With `strict`, a `..` above the root or a symlink
    that is absolute or climbs out raises EscapesRoot instead (a build
    context: its absolute links point at the user's machine, not into it).
    """
    remaining = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while remaining:
        part = remaining.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            elif strict:
                raise EscapesRoot(path)
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        except NotADirectoryError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
            target = os.readlink(candidate)
            if strict and (target.startswith("/") or
                           escapes(posixpath.join(*(resolved or ["."]), target))):
                raise EscapesRoot(f"{'/'.join(resolved + [part])} -> {target}")
            if target.startswith("/"):
                resolved = []
            remaining = [p for p in target.split("/") if p not in ("", ".")] + remaining
            continue
        resolved.append(part)
    return os.path.join(root, *resolved) if resolved else root
