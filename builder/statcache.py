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

Beside it, `<hash>.trees.marshal` keeps the digest of each whole COPY
source with a fingerprint of its entries' stats (tree()): when not one
entry's name, type, mode, size, times or inode moved, the source's digest is
the one computed last time, without a lookup per file. It is the unchanged
rebuild's shortcut (30,000 files: 0.28 s of digests -> a 0.05 s
fingerprint), and follows the same two-second rule.

When a source did change, `<hash>.runs.marshal` keeps the rest of its
digest's work: per run of entries in one directory (runs()), the
fingerprint of their stats, their lines of the digest's text, their
rows of the file table and each entry's stat identity (context.py). A run
whose stats did not move is taken whole, and in one whose stats did, only
the files whose identity moved are read (without asking the stat cache,
and their new digests are kept with the run, not in it), so editing one
file of 30,000 recomputes one directory's lines and reads one file, and
the stat cache is neither loaded nor written for it (the digest 0.14-0.23
s -> 0.08-0.13 s with runs, most of what was left reading this file and
the stat cache; the stat cache's 0.03-0.05 s since). It is read only when
a source changed, and keeps only the runs of each source's last digest.
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
_MAX_TREES = 64


def settled(latest_ns: int) -> bool:
    """Has nothing changed within the last two seconds (git's "racy clean" rule)?"""
    return time.time_ns() - latest_ns >= _RACY_NS


class StatCache:
    def __init__(self, directory: str | None, root: str):
        self.path = None
        if directory:
            name = hashlib.sha256(os.fsencode(root)).hexdigest()[:32]
            self.path = os.path.join(directory, name + ".marshal")
        self.trees_path = self.path[:-len(".marshal")] + ".trees.marshal" if self.path else None
        self.runs_path = self.path[:-len(".marshal")] + ".runs.marshal" if self.path else None
        self._entries: dict | None = None
        self._trees: dict | None = None
        self._runs: dict | None = None
        self._changed = False
        self._trees_changed = False
        self._runs_changed = False
        self._lock = threading.Lock()

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = read_marshal_dict(self.path)
        return self._entries

    def _load_trees(self) -> dict:
        if self._trees is None:
            self._trees = read_marshal_dict(self.trees_path)
        return self._trees

    def tree(self, key: str, fingerprint: str) -> str | None:
        """The digest kept for the source `key` if its entries' fingerprint is unchanged."""
        hit = self._load_trees().get(key)
        if isinstance(hit, tuple) and len(hit) == 2 and hit[0] == fingerprint:
            return hit[1]
        return None

    def put_tree(self, key: str, fingerprint: str, digest: str, latest_ns: int) -> None:
        """Keep a source's digest; `latest_ns` is the latest mtime or ctime among its entries."""
        if not settled(latest_ns):
            return
        with self._lock:
            _keep_recent(self._load_trees(), key, (fingerprint, digest))
            self._trees_changed = True

    def runs(self, key: str) -> dict:
        """The runs kept for the source `key`: first entry's path -> (stat fingerprint, text,
        table rows, the entries' stat identities), as put_runs() was given them.

        Each source's runs are kept marshalled (bytes) inside the file's dict, so
        that only the source asked for becomes objects, and only while it is used.
        """
        with self._lock:
            # (Not kept: put_runs() reads the file again, if it is called at all.)
            kept = (self._runs if self._runs is not None
                    else read_marshal_dict(self.runs_path)).get(key)
        try:
            kept = marshal.loads(kept) if isinstance(kept, bytes) else None
        except (EOFError, ValueError, TypeError):
            kept = None
        return kept if isinstance(kept, dict) else {}

    def put_runs(self, key: str, runs: dict) -> None:
        """Keep the runs of the source `key`'s last digest (and only those: for a run with a
        file changed in the last two seconds, the caller gives what was kept of it before)."""
        data = marshal.dumps(runs)
        with self._lock:
            if self._runs is None:
                self._runs = read_marshal_dict(self.runs_path)
            _keep_recent(self._runs, key, data)
            self._runs_changed = True

    def get(self, rel: str, st: os.stat_result) -> tuple[str, str] | None:
        """(content digest, xattr digest or "") of a file whose stat has not changed."""
        hit = self._load().get(rel)
        if hit is not None and len(hit) == 6 and \
                hit[:4] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return hit[4], hit[5]
        return None

    def put(self, rel: str, st: os.stat_result, digest: str, xattrs: str) -> None:
        """Keep a path's (content digest, xattr digest) with its stat, unless it changed
        within the last two seconds (settled())."""
        if max(st.st_mtime_ns, st.st_ctime_ns) <= time.time_ns() - _RACY_NS:
            with self._lock:
                self._load()[rel] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                                     digest, xattrs)
                self._changed = True

    def put_files(self, paths: list[str], stats: list, digests: list[str]) -> None:
        """put() for files without xattrs, given as three columns (a COPY's 30,000 copied
        files: one pass, not a call and a tuple of arguments each)."""
        recent = time.time_ns() - _RACY_NS
        kept = [(rel, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest, ""))
                for rel, st, digest in zip(paths, stats, digests)
                if st.st_mtime_ns <= recent and st.st_ctime_ns <= recent]
        if kept:
            with self._lock:
                self._load().update(kept)
                self._changed = True

    def save(self) -> None:
        """Write what changed since the last save. Safe beside other threads' put()s and
        saves (a build saves once a cold COPY's files are learnt, and again at its end):
        each file is dumped and marked clean under the lock, so a change made while
        it is written is saved by the next save()."""
        with self._lock:
            out = []
            if self.trees_path and self._trees_changed and self._trees is not None:
                out.append((self.trees_path, marshal.dumps(self._trees)))
                self._trees_changed = False
            if self.runs_path and self._runs_changed and self._runs is not None:
                out.append((self.runs_path, marshal.dumps(self._runs)))
                self._runs_changed = False
            if self.path and self._changed and self._entries is not None:
                entries = self._entries
                if len(entries) > _MAX_ENTRIES:
                    entries = dict(list(entries.items())[-_MAX_ENTRIES:])
                out.append((self.path, marshal.dumps(entries)))
                self._changed = False
        for path, data in out:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(OSError):      # (only a cache: the next build hashes again)
                write_atomic(path, data)


def _keep_recent(kept: dict, key: str, value) -> None:
    """Put `value` under `key` as the most recent of `kept`, dropping the least recent ones
    beyond _MAX_TREES (a dict keeps its order of insertion)."""
    kept.pop(key, None)
    kept[key] = value
    while len(kept) > _MAX_TREES:
        del kept[next(iter(kept))]


def read_marshal_dict(path: str | None) -> dict:
    """The dict a cache file holds (written by marshal), or {} when it is missing or damaged."""
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            data = marshal.loads(f.read())    # load(f) reads piece by piece: 6x slower
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    return data if isinstance(data, dict) else {}
