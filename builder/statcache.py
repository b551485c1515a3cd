"""A persistent stat cache for build contexts: unchanged files are never read twice.

For each context directory the store keeps `cache/context/<hash of its
path>.marshal`: relative path -> (size, mtime_ns, ctime_ns, inode, digest,
xattr digest); a directory's path ends in "/" and has only the xattr
digest. An entry without the last (written before xattrs were part of the
key) is not used.
A file whose stat still matches is not read again, so an unchanged context
costs one walk. ctime is part of the key because nothing but the kernel sets
it: a content change always moves it, even when a tool restores the mtime.
Entries for files changed within the last two seconds are not saved (git's
"racy clean" rule: the file may change again within the same tick).

Concurrent builds of one context each save the union of what they loaded
and learned, by atomic rename; the worst a race costs is a re-hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import threading
import time

from .store.lock import write_atomic

_RACY_NS = 2_000_000_000
_MAX_ENTRIES = 1_000_000


class StatCache:
    def __init__(self, directory: str | None, root: str):
        self.path = None
        if directory:
            name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
            self.path = os.path.join(directory, name + ".marshal")
        self._entries: dict | None = None
        self._changed = False
        self._lock = threading.Lock()

    def _load(self) -> dict:
        if self._entries is None:
            entries = {}
            if self.path:
                try:
                    with open(self.path, "rb") as f:
                        entries = marshal.loads(f.read())    # load(f) reads piece by piece: 6x slower
                except (OSError, EOFError, ValueError, TypeError):
                    entries = {}
            self._entries = entries if isinstance(entries, dict) else {}
        return self._entries

    def get(self, rel: str, st: os.stat_result) -> tuple[str, str] | None:
        """(content digest, xattr digest or "") of a file whose stat has not changed."""
        hit = self._load().get(rel)
        if hit is not None and len(hit) == 6 and \
                hit[:4] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return hit[4], hit[5]
        return None

    def put(self, rel: str, st: os.stat_result, digest: str, xattrs: str) -> None:
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
            return
        with self._lock:
            self._load()[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest,
                                 xattrs)
            self._changed = True

    def save(self) -> None:
        if not (self.path and self._changed and self._entries is not None):
            return
        entries = self._entries
        if len(entries) > _MAX_ENTRIES:
            entries = dict(list(entries.items())[-_MAX_ENTRIES:])
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with contextlib.suppress(OSError):      # (only a cache: the next build hashes again)
            write_atomic(self.path, marshal.dumps(entries))
        self._changed = False
