"""The build context: which files a COPY sees, and the digests that key the step cache.

`.dockerignore` (or `<Dockerfile>.dockerignore` beside the Dockerfile, which
wins) follows Docker's patternmatcher: Go `filepath.Match` per component,
`**` for any number of directories, `!` exceptions, the last matching line
wins, and a pattern that matches a directory excludes what is under it.
An excluded file does not exist for COPY, and changing it never misses the
cache.

A source's digest covers what COPY puts in the image except times and
owners (COPY sets its own owner; an mtime-only change must hit the cache):
every entry's relative path, type and mode, a file's content or a link's
target, and the extended attributes COPY copies (file capabilities, say),
as Docker's and BuildKit's file checksums do. File contents (and xattrs)
are hashed once per (inode, size, mtime, ctime)
and remembered for the life of the process (and by the store's stat cache);
thousands of files nobody knows yet are hashed on every core (hashing.py).
"""

from __future__ import annotations

import array
import errno
import hashlib
import marshal
import operator
import os
import re
import stat
from dataclasses import dataclass

from .record import record
from . import hashing, paths
from .donor import signed64
from .errors import BuildError
from .forksafe import ForkSafeLock
from .statcache import StatCache, settled

_GLOB_CHARS = re.compile(r"[*?\[]")
_MEMO_MAX = 262144       # files whose digests one process remembers (~40 MB at most)
_content_digests: dict = {}          # identity -> (content, xattr digest), oldest first
_digests_lock = ForkSafeLock()       # (taken only to forget: stages hash in threads, and the
                                     # copy workers, forked, read the memo too)


def _known(st: os.stat_result) -> tuple[str, str] | None:
    return _content_digests.get(_identity(st))


def _remember(st: os.stat_result, known: tuple[str, str]) -> None:
    """Keep a file's digests for the life of the process.

    A plain dict, not an LRU cache: a lookup and an insert are one atomic
    dict operation each, where cachetools' LRUCache needed a lock and its
    own bookkeeping around both (the file digests of a changed 30,000-file
    source: 0.16-0.17 s -> 0.12-0.13 s). When full, the oldest quarter is
    forgotten; a forgotten file is answered by the store's stat cache again.
    """
    _content_digests[_identity(st)] = known
    if len(_content_digests) > _MEMO_MAX:
        with _digests_lock:
            excess = len(_content_digests) - _MEMO_MAX * 3 // 4
            for key in list(_content_digests)[:max(excess, 0)]:
                _content_digests.pop(key, None)


XATTRS_MARK = "xattrs:"      # before an xattr digest, in a key line and in file_table


# ---- .dockerignore -----------------------------------------------------------

@record
class _Pattern:
    """One .dockerignore line, compiled."""
    text: str
    regex: re.Pattern
    exclusion: bool


_EVERYTHING = re.compile(".*", re.S)     # what a "." line matches


def _compile(pattern: str) -> re.Pattern:
    out = "^"
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                i += 2
                if i < n and pattern[i] == "/":
                    i += 1
                out += ".*" if i >= n else "(.*/)?"
                continue
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "\\":
            if i + 1 < n:
                i += 1
                out += re.escape(pattern[i])
            else:
                out += "\\\\"
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out += "\\["
            else:
                body = pattern[i + 1:j]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out += "[" + body.replace("\\", "\\\\") + "]"
                i = j
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + "$", re.S)


class IgnoreRules:
    """The patterns of a .dockerignore file, matched as Docker matches them."""

    def __init__(self, lines: list[str] = ()):
        self.patterns: list[_Pattern] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
            cleaned = os.path.normpath(line) if line else line
            if cleaned.startswith("/") and len(cleaned) > 1:
                cleaned = cleaned.lstrip("/")
            if cleaned in ("", "."):
                if exclusion:
                    continue
                cleaned = "."
            self.patterns.append(_Pattern(cleaned, _compile(cleaned), exclusion))
        self.has_exceptions = any(p.exclusion for p in self.patterns)
        # One regex of all the patterns: most paths match none, and one call (per parent)
        # says so; a call per pattern made a 12-line .dockerignore cost a 30,000-file walk
        # 0.3 s. Without exceptions, a match is the answer.
        self._any: re.Pattern | None = None
        if self.patterns:
            self._any = _EVERYTHING if any(p.text == "." for p in self.patterns) else \
                re.compile("|".join(f"(?:{p.regex.pattern})" for p in self.patterns), re.S)

    @classmethod
    def for_context(cls, root: str, dockerfile: str | None = None) -> "IgnoreRules":
        candidates = []
        if dockerfile:
            candidates.append(dockerfile + ".dockerignore")
        candidates.append(os.path.join(root, ".dockerignore"))
        for path in candidates:
            try:
                with open(path, encoding="utf-8") as f:
                    return cls(f.read().splitlines())
            except (FileNotFoundError, IsADirectoryError):
                continue
        return cls()

    def excluded(self, rel: str) -> bool:
        """Is the context path `rel` (slash-separated, no leading /) excluded?"""
        if self._any is None or rel == "":
            return False
        if not self._matches_or_parent_matches(rel):
            return False
        return not self.has_exceptions or self._last_match_excludes(rel)

    def excluded_in_walk(self, rel: str) -> bool:
        """excluded(rel) for a walk that enters an excluded directory only when there are
        exceptions. Without exceptions, the walk reached `rel` through parents no pattern
        matches, so only `rel` itself is tried."""
        if self._any is None or self.has_exceptions:
            return self.excluded(rel)
        return self._any.match(rel) is not None

    def _matches_or_parent_matches(self, rel: str) -> bool:
        """Does some pattern match `rel` or one of its parents?"""
        match = self._any.match
        if match(rel):
            return True
        cut = rel.find("/")
        while cut != -1:
            if match(rel, 0, cut):       # (as if the string ended there: `$` matches)
                return True
            cut = rel.find("/", cut + 1)
        return False

    def _last_match_excludes(self, rel: str) -> bool:
        """Docker's rule with exceptions: the last pattern that matches `rel` or a parent
        of it decides."""
        parents = rel.split("/")[:-1]
        matched = False
        for p in self.patterns:
            if p.exclusion != matched:
                continue
            hit = p.text == "." or bool(p.regex.match(rel))
            if not hit:
                for i in range(len(parents)):
                    if p.regex.match("/".join(parents[:i + 1])):
                        hit = True
                        break
            if hit:
                matched = not p.exclusion
        return matched


# ---- sources ------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One file of a COPY source."""
    src: str                # path relative to the context root
    rel: str                # path relative to the source root ('' for the root itself)
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


@record
class Source:
    """One resolved COPY source: a file, or a directory with everything under it."""
    spec: str               # as written (after expansion)
    path: str               # the resolved path relative to the context root
    entries: tuple[Entry, ...]
    pivot: str = ""         # COPY --parents a/./b: the leading part the destination drops

    @property
    def kept_path(self) -> str:
        """The path `COPY --parents` keeps under the destination."""
        if self.pivot and (self.path + "/").startswith(self.pivot + "/"):
            return self.path[len(self.pivot):].lstrip("/")
        return self.path

    @property
    def is_dir(self) -> bool:
        return self.entries[0].is_dir

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1] if self.path else ""


class BuildContext:
    """A directory that COPY reads: the build context, or another stage's filesystem.

    `ignore` defaults to the context's .dockerignore rules.
    """

    def __init__(self, root: str, dockerfile: str | None = None, ignore: IgnoreRules | None = None,
                 strict: bool = True, cache_dir: str | None = None):
        # (Resolved: a context named through a symlink to its directory is that directory,
        # as Docker's CLI takes it; its own entry must be the directory, not the link.)
        self.root = os.path.realpath(root)
        self.strict = strict     # a context's symlinks may not lead out; an image's may
        self.stat_cache = StatCache(cache_dir, self.root)
        if not os.path.isdir(self.root):
            raise BuildError(f"build context {root!r} is not a directory")
        self.ignore = ignore if ignore is not None else IgnoreRules.for_context(self.root, dockerfile)
        # source path -> (its entries, file_table()) the last _digest made (see file_table)
        self._tables: dict[str, tuple[tuple, dict]] = {}
        # learn()'s digests: path -> (the stat walked, content digest)
        self._learned: dict[str, tuple[os.stat_result, str]] = {}

    def _lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(os.path.join(self.root, rel) if rel else self.root)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def sources(self, spec: str, *, instruction: str = "COPY", where: str = "the build context"
                ) -> list[Source]:
        """The sources a COPY source spec names: a path or a glob, inside the context."""
        if not spec.startswith("/") and paths.escapes(spec):
            raise BuildError(f"{instruction} source {spec!r} is outside {where}",
                             hint="a build can only read files inside its context directory")
        pivot = paths.clean(spec.split("/./", 1)[0]) if "/./" in spec else ""
        cleaned = paths.clean(spec)
        names = self._glob(cleaned) if _GLOB_CHARS.search(cleaned) else [cleaned]
        out = []
        for name in names:
            if self.ignore.excluded(name):
                continue
            try:
                host = paths.resolve_in_root(self.root, name, strict=self.strict)
            except paths.EscapesRoot as e:
                raise BuildError(f"{instruction} source {spec!r} is a symlink that leads outside "
                                 f"{where} ({e})",
                                 hint="copy the file into the context instead of linking to it"
                                 ) from None
            resolved = os.path.relpath(host, self.root)
            resolved = "" if resolved == "." else resolved
            st = self._lstat(resolved)
            if st is None or self.ignore.excluded(resolved):
                continue
            try:
                entries = tuple(self._walk(resolved, st))
            except OSError as e:
                raise _unreadable(e, self.root, instruction, spec, where) from None
            out.append(Source(spec, resolved, entries, pivot))
        if not out and names == [cleaned] and not _GLOB_CHARS.search(cleaned):
            # A pattern that matches nothing is no error, as in BuildKit (AllowEmptyWildcard):
            # `COPY package.json yarn.lock* ./` is how Dockerfiles copy a file that may be absent.
            raise BuildError(
                f"{instruction} source {spec!r} is not in {where}",
                hint="check the path (it is relative to the context directory), "
                     "and that .dockerignore does not exclude it" if where == "the build context"
                else f"check the path inside {where}")
        return out

    def _glob(self, pattern: str) -> list[str]:
        matches = [""]
        for part in pattern.split("/"):
            rx = _compile(part) if _GLOB_CHARS.search(part) else None
            nxt = []
            for base in matches:
                if rx is None:
                    if self._lstat(f"{base}/{part}" if base else part) is not None:
                        nxt.append(f"{base}/{part}" if base else part)
                    continue
                try:
                    names = sorted(os.listdir(os.path.join(self.root, base) if base else self.root))
                except (NotADirectoryError, FileNotFoundError):
                    continue
                nxt += [f"{base}/{n}" if base else n for n in names if rx.match(n)]
            matches = nxt
        return matches

    def _walk(self, top: str, st: os.stat_result) -> list[Entry]:
        out = [Entry(top, "", st)]
        if stat.S_ISDIR(st.st_mode):
            self._walk_dir(top, "", out)
        return out

    def _walk_dir(self, src: str, rel: str, out: list[Entry]) -> None:
        """Append the entries under `src`, sorted, each directory before its contents.

        Iterative (a frame per level, not a call), so no depth of directories is
        too deep. An excluded directory is walked only when `.dockerignore` has
        exceptions, and kept only if something below it was re-included.
        """
        # frame: [dir's context path, its path in the source, sorted children, next index,
        #         where an excluded dir's entry is in `out` (None: not excluded), added anything]
        stack = [[src, rel, self._children(src), 0, None, False]]
        while stack:
            frame = stack[-1]
            fsrc, frel, children, i, mark, _ = frame
            if i == len(children):
                stack.pop()
                if mark is not None:
                    if frame[5]:
                        stack[-1][5] = True
                    else:
                        del out[mark:]
                continue
            frame[3] = i + 1
            name, cst = children[i]
            csrc = f"{fsrc}/{name}" if fsrc else name
            crel = f"{frel}/{name}" if frel else name
            if stat.S_ISSOCK(cst.st_mode):
                continue
            if self.ignore.excluded_in_walk(csrc):
                if stat.S_ISDIR(cst.st_mode) and self.ignore.has_exceptions:
                    # An exception may re-include something below an excluded dir.
                    stack.append([csrc, crel, self._children(csrc), 0, len(out), False])
                    out.append(Entry(csrc, crel, cst))
                continue
            out.append(Entry(csrc, crel, cst))
            frame[5] = True
            if stat.S_ISDIR(cst.st_mode):
                stack.append([csrc, crel, self._children(csrc), 0, None, False])

    def _children(self, src: str) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of each entry of a directory, sorted by name. Listed from an open
        descriptor, so that each entry is looked up by its name alone (not by a path from
        the root: 10% of an unchanged 30,000-file walk)."""
        fd = os.open(os.path.join(self.root, src) if src else self.root,
                     os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with os.scandir(fd) as it:
                found = [(e.name, e.stat(follow_symlinks=False)) for e in it]
        finally:
            os.close(fd)
        found.sort(key=lambda item: item[0])
        return found

    # ---- digests ------------------------------------------------------------

    def file_digest(self, rel: str, st: os.stat_result) -> tuple[str, str]:
        """(content digest, xattr digest or "") of one regular file of the context."""
        known = _known(st)
        if known is None:
            known = self.stat_cache.get(rel, st)
            if known is None:
                root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    known = hashing.hash_file(root, rel)
                finally:
                    os.close(root)
                self.stat_cache.put(rel, st, *known)
            _remember(st, known)
        return known

    def learn(self, paths: list[str], stats: list, digests: list[str]) -> None:
        """The content digests (hex) of files without xattrs, made elsewhere from exactly the
        bytes of each file with its stat (a COPY that hashed what it copied): three columns,
        in the same order."""
        self.stat_cache.put_files(paths, stats, digests)
        # For this context's digest() (_file_digests), by path, with the very stat walked; the
        # process's memo takes them when asked (learn_cached_runs): a cold COPY of 30,000
        # files asks for none, and putting them there cost 0.04 s.
        self._learned.update(zip(paths, zip(stats, digests)))
        _not_learned(None, (stats, digests))

    def _file_digests(self, entries, cached: bool = True) -> dict[str, tuple[str, str]]:
        """Context path -> file_digest() of every regular file among `entries`.

        What neither cache knows is hashed in one batch (hashing.py: on every
        core when there are thousands of such files). Not `cached`: the files'
        stats moved since the runs cache kept them, and the stat cache, kept
        at the same time, has nothing for them either; nor is it told their
        new digests, which their runs keep (_digest): it is not loaded, nor
        written again, for them (a 30,000-entry stat cache: 0.05 s).
        """
        out: dict[str, tuple[str, str]] = {}
        unknown = []
        # A new process (a `pybuild` command) remembers nothing yet: not asked 30,000 times.
        memo = _known if _content_digests else lambda st: None
        learned = self._learned
        for e in entries:
            if not stat.S_ISREG(e.st.st_mode):
                continue
            got = learned.get(e.src)
            if got is not None and got[0] is e.st:         # (learn(): this very walk's file)
                out[e.src] = (got[1], "")
                continue
            known = memo(e.st)
            if known is None:
                known = self.stat_cache.get(e.src, e.st) if cached else None
                if known is None:
                    unknown.append(e)
                    continue
                _remember(e.st, known)
            out[e.src] = known
        for e, known in zip(unknown, hashing.hash_files(self.root, [e.src for e in unknown])):
            if known is None:
                out[e.src] = self.file_digest(e.src, e.st)     # reports why it cannot be read
                continue
            if cached:
                self.stat_cache.put(e.src, e.st, *known)
            _remember(e.st, known)
            out[e.src] = known
        return out

    def _content(self, e: Entry) -> tuple[str, str]:
        """(content, xattr digest) of an entry for the cache key: a file's digest, a link's
        target; a directory has only xattrs."""
        mode = e.st.st_mode
        if stat.S_ISREG(mode):
            return self.file_digest(e.src, e.st)
        if stat.S_ISLNK(mode):
            return os.readlink(os.path.join(self.root, e.src)), ""
        if stat.S_ISDIR(mode):
            # Kept in the stat cache too: a context may have tens of thousands of dirs.
            known = self.stat_cache.get(e.src + "/", e.st)
            if known is None:
                known = ("", hashing.xattr_digest(os.path.join(self.root, e.src)).hex())
                self.stat_cache.put(e.src + "/", e.st, *known)
            return known
        return "", ""

    def digest(self, source: Source) -> str:
        """What the step cache knows of a source: names, types, modes, contents, xattrs; no
        times or owners."""
        entries = source.entries
        rows = _stat_rows(entries)
        runs = [(start, end, _stat_fingerprint(rows[start:end])) for start, end in _runs(entries)]
        # (The whole source's fingerprint is made of its runs': the stats are hashed once.)
        fingerprint = hashlib.sha256(b"".join(run[2] for run in runs)).hexdigest()
        known = self.stat_cache.tree(source.path, fingerprint)
        if known is None:
            known = self._digest(source, rows, runs)
            self.stat_cache.put_tree(source.path, fingerprint, known, _latest(rows))
        return known

    def _digest(self, source: Source, rows: list[tuple], runs: list[tuple]) -> str:
        """The digest of a source: the SHA-256 of a line per entry (_lines).

        Made run by run (`runs`: _runs() with each one's _stat_fingerprint()):
        a run whose entries' stats are those the store's stat cache kept with
        its lines is taken from there (statcache.py).
        """
        entries = source.entries                 # (`rows`: their _stat_rows)
        kept = self.stat_cache.runs(source.path)
        # [start, end, fingerprint, text, table, identities] per run; for a run not taken
        # whole, no text and table, and what the cache kept of it in place of identities
        done = []
        todo, moved = [], []
        reused: dict[str, tuple[str, str]] = {}
        for start, end, fingerprint in runs:
            hit = kept.get(entries[start].src)
            if not (isinstance(hit, tuple) and len(hit) == 4):
                hit = None                  # (none, or kept by an older pybuild: recomputed)
            if hit is not None and hit[0] == fingerprint:
                done.append((start, end, fingerprint, hit[1], hit[2], hit[3]))
                _not_learned(entries[start:end], hit[2])
            else:
                done.append((start, end, fingerprint, None, None, hit))
                _changed_files(entries[start:end], hit, reused, todo, moved)
        digests = self._file_digests(todo)
        digests.update(self._file_digests(moved, cached=False))
        digests.update(reused)
        texts, table, keep = [], {}, {}
        learned = False
        for start, end, fingerprint, text, part, ids in done:
            if text is None:
                text, part = self._lines(entries[start:end], digests)
                # (not kept while a file in it may change again unseen: statcache.py; what
                # was kept of the run stays, for the files of it that do not change)
                if settled(_latest(rows[start:end])):
                    keep[entries[start].src] = (fingerprint, text, part,
                                                _identities(rows[start:end]))
                    learned = True
                elif ids is not None:
                    keep[entries[start].src] = ids
            else:
                keep[entries[start].src] = (fingerprint, text, part, ids)
            texts.append(text)
            table.update(part)
        if learned:
            self.stat_cache.put_runs(source.path, keep)
        self._tables = {source.path: (entries, table)}     # (the last one only)
        return "sha256:" + hashlib.sha256("".join(texts).encode("utf-8", "surrogateescape")).hexdigest()

    def _lines(self, entries, digests: dict) -> tuple[str, dict]:
        """(the digest's lines of `entries`, their rows of the file table); `digests` has
        every regular file's (_file_digests)."""
        lines = []
        table = {}
        # What a line and a row take from a mode, made once per mode (most entries share a few):
        # (regular file?, its row's type and permissions, its line's middle)
        by_mode: dict[int, tuple[bool, str, str, str]] = {}
        for e in entries:
            mode = e.st.st_mode
            known = by_mode.get(mode)
            if known is None:
                perm = f"{stat.S_IMODE(mode):o}"
                known = by_mode[mode] = (stat.S_ISREG(mode), _kind(mode), perm,
                                         f"\0{stat.S_IFMT(mode):o}\0{perm}\0")
            regular, kind, perm, middle = known
            content, xattrs = digests[e.src] if regular else self._content(e)
            # (xattrs only where there are some: keys made before they counted stay valid)
            if xattrs:
                lines.append(f"{e.rel}{middle}{content}\0{XATTRS_MARK}{xattrs}\n")
                table[e.src or "."] = (kind, perm, f"{content} {XATTRS_MARK}{xattrs}")
            else:
                lines.append(f"{e.rel}{middle}{content}\n")
                table[e.src or "."] = (kind, perm, content)
        return "".join(lines), table

    def file_table(self, source: Source) -> dict[str, tuple[str, str, str]]:
        """path in the context -> (type, mode, content digest or link target), for explain.py;
        xattrs follow the content as ` xattrs:<digest>`.

        The table a digest() that hashed this very source made on its way is
        handed over (once): asking each file again cost a tenth of a second
        for 30,000 files.
        """
        made = self._tables.pop(source.path, None)
        if made is not None and made[0] is source.entries:
            return made[1]
        out = {}
        for e in source.entries:
            mode = e.st.st_mode
            content, xattrs = self._content(e)
            if xattrs:
                content += f" {XATTRS_MARK}{xattrs}"
            out[e.src or "."] = (_kind(mode), f"{stat.S_IMODE(mode):o}", content)
        return out

    def save(self) -> None:
        """Keep what this build learned about the context's files for the next one."""
        self.stat_cache.save()


def _unreadable(e: OSError, root: str, instruction: str, spec: str, where: str) -> BuildError:
    """The BuildError of a source whose walk failed: the file, by its path in the context
    (shortened when it is very long), and what to do about a path past PATH_MAX."""
    name = paths.shortened(e.filename if isinstance(e.filename, str) else "", root)
    hint = None
    if e.errno == errno.ENAMETOOLONG:
        hint = (f"its path from / is longer than this system allows ({len(e.filename)} "
                "bytes): move the context to a shorter directory, shorten the path, or "
                "leave it out with .dockerignore")
    return BuildError(f"{instruction} source {spec!r}: cannot read {name.lstrip('/')} in "
                      f"{where}: {e.strerror or e}", hint=hint)


def _kind(mode: int) -> str:
    return "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else \
        "dir" if stat.S_ISDIR(mode) else "other"


def _stat_rows(entries) -> list[tuple]:
    """Each entry's name and stat, as _stat_fingerprint() hashes them."""
    return [(e.src, e.rel, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
             st.st_dev) for e in entries for st in (e.st,)]


def _latest(rows: list[tuple]) -> int:
    """The latest mtime or ctime among entries' stats (_stat_rows)."""
    return max(max(map(_MTIME_OF, rows), default=0), max(map(_CTIME_OF, rows), default=0))


_MTIME_OF, _CTIME_OF = operator.itemgetter(4), operator.itemgetter(5)


def _stat_fingerprint(rows: list[tuple]) -> bytes:
    """A digest of entries' names and stats (_stat_rows).

    What a source's digest depends on moves one of these: content and xattrs
    move ctime (which only the kernel sets), a replaced file or symlink its
    inode. marshal's version 0 has no references and no interned strings, so
    the same rows give the same bytes in every run (and twice as fast as repr).
    """
    return hashlib.sha256(marshal.dumps(rows, 0)).digest()


_RUN_MAX = 1000          # entries: a run is cut there even inside one directory


def _run_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What a run keeps of each entry's stat (the stat cache's rule: size, mtime, ctime,
    inode): a file whose identity is the one kept has the digest kept with it."""
    return (st.st_size, signed64(st.st_mtime_ns), signed64(st.st_ctime_ns),
            signed64(st.st_ino))


def _identities(rows: list[tuple]) -> bytes:
    """_run_identity() of each entry of a run, in order (from its _stat_rows()), kept with the
    run so that a run with one file changed digests that file only."""
    numbers = [n for r in rows for n in r[3:7]]
    try:
        return array.array("q", numbers).tobytes()
    except OverflowError:        # (an inode number with the top bit set, a time past 2262)
        return array.array("q", [signed64(n) for n in numbers]).tobytes()


def _changed_files(entries, hit, reused: dict, todo: list, moved: list) -> None:
    """Sort the regular files of a run whose stats moved since `hit` (what the runs cache
    kept of it, or None): those without a kept identity go to `todo`, those whose identity
    moved to `moved`, and the others' digests, from the run's table, to `reused`.

    Only files whose stat identity is the one kept with their name (the stat
    cache's rule) are taken: editing one file of a directory of 100 digests
    one file, and the build does not load the stat cache of 30,000 for it.
    """
    files = [e for e in entries if stat.S_ISREG(e.st.st_mode)]
    part = hit[2] if hit is not None else None
    if not (isinstance(part, dict) and isinstance(hit[3], bytes)
            and len(hit[3]) == 32 * len(part)):          # (4 numbers of 8 bytes per entry)
        todo += files
        return
    ids = array.array("q", hit[3])
    where = {src: i * 4 for i, src in enumerate(part)}
    for e in files:
        i = where.get(e.src)
        if i is None:
            todo.append(e)
        elif tuple(ids[i:i + 4]) != _run_identity(e.st):
            moved.append(e)
        else:
            reused[e.src] = known = _row_digests(part[e.src])
            _remember(e.st, known)


def _row_digests(row: tuple) -> tuple[str, str]:
    """(content digest, xattr digest or "") of a regular file's row of a file table."""
    content, _, xattrs = row[2].partition(" " + XATTRS_MARK)
    return content, xattrs


def _runs(entries) -> list[tuple[int, int]]:
    """(start, end) of each run of `entries` (in walk order) whose paths have the same parent
    directory, at most _RUN_MAX long: the pieces of a digest kept and reused whole."""
    out = []
    start, previous = 0, None
    for i, e in enumerate(entries):
        parent = e.src.rpartition("/")[0]
        if i and (parent != previous or i - start >= _RUN_MAX):
            out.append((start, i))
            start = i
        previous = parent
    if entries:
        out.append((start, len(entries)))
    return out


def _identity(st: os.stat_result) -> tuple:
    """A file's content is taken to be unchanged while these are (ctime moves on any write)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def known_digest(st: os.stat_result) -> str | None:
    """The content digest this process computed (or took from the store's runs) for the file
    with this stat, if any."""
    return known_digest_of(_identity(st))


def known_digest_of(identity: tuple) -> str | None:
    """known_digest() of the file whose stat identity (_identity()) this is."""
    if not _content_digests and not _unlearned:
        return None                  # (a cold build's copy workers: nothing known yet)
    known = _content_digests.get(identity)
    if known is None and _unlearned:
        learn_cached_runs()
        known = _content_digests.get(identity)
    return None if known is None else known[0]


# Runs of sources whose digests this process took whole from the store's runs cache
# (BuildContext._digest), and of the files a COPY hashed (BuildContext.learn): their
# digests go into the memo only when one of them is asked for. A COPY stacked on its last
# layer asks for none (0.045 s saved for 30,000 files); a full copy records every file's
# digest in its table (donor.py), and a table without them would keep the next build from
# sharing anything with the layer.
# (entries, their file table rows), or (None, [(stat, (digest, xattr digest)), ...])
_unlearned: list[tuple] = []
_unlearned_files = [0]                          # how many entries those runs have


def _not_learned(entries: tuple | None, table) -> None:
    """Keep a run taken from the cache (or, with no `entries`, a list of stats and one of
    their content digests: BuildContext.learn's) for learn_cached_runs(); a long-lived
    process (an orchestrator) learns them once they are many: the memo is bounded, this
    list is not."""
    _unlearned.append((entries, table))
    _unlearned_files[0] += len(entries if entries is not None else table[0])
    if _unlearned_files[0] > _MEMO_MAX // 2:
        learn_cached_runs()


def learn_cached_runs() -> None:
    """Put the digests of the runs taken from the cache into the memo (known_digest asks)."""
    _unlearned_files[0] = 0
    while _unlearned:
        try:
            entries, table = _unlearned.pop()
        except IndexError:
            return                  # (another thread took the last one)
        if entries is None:
            for st, digest in zip(*table):
                _remember(st, (digest, ""))
            continue
        for e in entries:
            if stat.S_ISREG(e.st.st_mode):
                _remember(e.st, _row_digests(table[e.src or "."]))


def filter_excludes(source: Source, rules: IgnoreRules) -> Source | None:
    """`COPY --exclude`: drop what matches, by its path in the context or inside the source."""
    if not source.is_dir:
        excluded = rules.excluded(source.path) or rules.excluded(source.name)
        return None if excluded else source
    kept = [source.entries[0]] + [e for e in source.entries[1:]
                                  if not (rules.excluded(e.rel) or rules.excluded(e.src))]
    return Source(source.spec, source.path, tuple(kept), source.pivot)
