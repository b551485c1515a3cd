"""`COPY --chmod` values: octal, or symbolic as chmod(1) writes them (`+x`, `a+rX,go-w`, `g=u`).

Symbolic values are part of the stable Dockerfile syntax since 1.14. As in
BuildKit, an octal value replaces every copied entry's mode, and a symbolic
one is applied to each entry's own mode with no umask (a clause without
u, g, o or a means all three); `X` gives execute permission only to
directories and to entries some class may already execute; `s` sets the
set-user-ID (u) or set-group-ID (g) bit, `t` the sticky bit (o); a single
u, g or o after the operator copies that class's permissions.
"""

from __future__ import annotations

import functools
import stat

_SHIFT = {"u": 6, "g": 3, "o": 0}
_SPECIAL = {"u": stat.S_ISUID, "g": stat.S_ISGID, "o": stat.S_ISVTX}
_PERMS = set("rwxXst")


def parse(text: str) -> int | str:
    """What to keep of a --chmod value: the mode for octal, the text itself when symbolic.

    Raises ValueError for anything else.
    """
    if text[:1].isdigit():
        value = int(text, 8)
        if not 0 <= value <= 0o7777:
            raise ValueError(text)
        return value
    _clauses(text)
    return text


def apply(value: int | str, mode: int, is_dir: bool) -> int:
    """The permission bits an entry whose own are `mode` gets from a parsed --chmod value."""
    if isinstance(value, int):
        return value
    new = mode & 0o7777
    for classes, actions in _clauses(value):
        for op, perms in actions:
            bits = _bits(classes, perms, new, is_dir)
            if op == "+":
                new |= bits
            elif op == "-":
                new &= ~bits
            else:
                cleared = sum((7 << _SHIFT[c]) | _SPECIAL[c] for c in classes)
                new = (new & ~cleared) | bits
    return new


def _bits(classes: str, perms: str, current: int, is_dir: bool) -> int:
    if perms in _SHIFT:                       # copy another class's r, w and x
        rwx = (current >> _SHIFT[perms]) & 7
        return sum(rwx << _SHIFT[c] for c in classes)
    rwx = 0
    special = 0
    for p in perms:
        if p == "r":
            rwx |= 4
        elif p == "w":
            rwx |= 2
        elif p == "x" or (p == "X" and (is_dir or current & 0o111)):
            rwx |= 1
        elif p == "s":
            special |= sum(_SPECIAL[c] for c in classes if c in "ug")
        elif p == "t":
            special |= stat.S_ISVTX if "o" in classes else 0
    return sum(rwx << _SHIFT[c] for c in classes) | special


@functools.lru_cache(maxsize=32)      # apply() runs once per copied entry: parse once
def _clauses(text: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """((classes, ((operator, permissions), ...)), ...) of a symbolic mode; ValueError if it is
    not one."""
    out = []
    for clause in text.split(","):
        i = 0
        while i < len(clause) and clause[i] in "ugoa":
            i += 1
        who = clause[:i]
        classes = "ugo" if not who or "a" in who else "".join(c for c in "ugo" if c in who)
        actions = []
        if i == len(clause):
            raise ValueError(text)                 # no operator
        while i < len(clause):
            op = clause[i]
            if op not in "+-=":
                raise ValueError(text)
            j = i + 1
            while j < len(clause) and (clause[j] in _PERMS or clause[j] in _SHIFT):
                j += 1
            perms = clause[i + 1:j]
            if any(c in _SHIFT for c in perms) and len(perms) != 1:
                raise ValueError(text)             # a class to copy stands alone
            actions.append((op, perms))
            i = j
        out.append((classes, tuple(actions)))
    return tuple(out)
