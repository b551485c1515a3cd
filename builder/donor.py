"""Incremental COPY: a rebuilt COPY layer holds only what changed since its last full layer.

When a COPY misses the cache because a few of its files changed, writing
all the others again is most of its cost. Every COPY layer therefore keeps
a table, `layers/<id>/copied-3`, of the plain files it holds that were
copied from content the build knew the digest of: per target path, the
digest, the size, mtime, mode and owner the copy was given, and the source
file's inode and ctime when it was copied (a row is kept only if the source
had no xattrs). The next build of the same step (the same Dockerfile
position, engine.py picks it: the "donor") looks up each file it would copy;
when the donor holds exactly what the copy would produce, the file is not
written again:

* **Stacked (delta) layers.** A full COPY layer whose entries are nothing
  but directories and rows of its table is "pure", and its table lists its
  directories too. A new layer may then be stored as a diff dir holding the
  changed files and every directory, stacked on that full layer (its
  `base`, in layer.json): mounts show the new diff dir above the base's
  (store.lower_links), and the commit reads the unchanged files from the
  base (layer/diff.py). Only when the new layer's own entries cover every
  entry of the base, as directories where the base has directories, and
  none of them is an opaque directory: then the stacked view is exactly
  the full layer, whatever the layers below. A layer rebuilt from a stacked
  layer stacks on the same base, so a stack is never more than two dirs.
  Editing one file of 30,000 writes one file and the directories, not
  30,000 links (0.25 s of kernel time here).
* **Hard links**, otherwise (files removed since, or a donor that is not
  pure): the donor's copy is linked into the new diff dir. Layer dirs never
  change once installed, so a shared inode is as good as a copy; removing
  either layer only drops one of its names. Inside later steps such a file's
  link count is 2 or more (`stat` in a RUN shows it).

Rows are found by the source path they were copied from. While the source
still has the stamp (inode and ctime) its row recorded, nothing about it has
changed since, content and xattrs included (the kernel moves the ctime on
every change), so it is taken as it is; any other source (a fresh checkout,
say) is compared by digest and asked for xattrs. The donor and its base are
never in the new layer's own stack below it (engine.py checks), so no mount
shows two names of one inode.

The work is split so that no forked process pays for copying the build's
objects page by page: the build process matches sources to rows before the
COPY's processes start (fileops.match_donor); the chrooted pass, which says
where each file goes, leaves out a file the base holds with that target,
mode and owner, and returns the base's files nothing put in place; after
the unmount, fileops.finish_in_upper decides whether to stack and links
what the donor's own diff dir holds.
"""

from __future__ import annotations

import array
import marshal
import os
import stat

from .record import record
from .layer import whiteout

TABLE = "copied-3"      # in the layer's directory, beside diff/ and layer.json

# Per row, besides its target (an absolute path in the image) and content digest (hex):
# numbers, the source path the COPY read it from (by which the next build finds the row),
# and whether the layer's base holds the file (else its own diff dir does).
INO, CTIME, SIZE, MTIME, PERM, UID, GID, GROUP = range(8)   # (INO, CTIME: the source's stamp)
_NUMBERS = 8


_I64 = 1 << 63


def signed64(n: int) -> int:
    """A stat number that is only ever compared, as an array of signed 64-bit integers (the
    rows', a run's identities in context.py) can hold it: an inode number with the top bit
    set (overlayfs hands them out with xino), a time in nanoseconds past 2262, wrap around
    instead of failing (times before 1970 are negative already)."""
    return n - (1 << 64) if n >= _I64 else n


class Table:
    """The rows of a COPY layer's table, in columns: 30,000 rows load in milliseconds
    (as one tuple each, two tables took 0.1 s to load)."""

    def __init__(self, targets=None, digests=None, numbers=None, in_base=None, sources=None,
                 base: str | None = None, dirs: list[str] | None = None):
        self.targets: list[str] = targets if targets is not None else []
        self.digests = digests if digests is not None else bytearray()   # 32 bytes each
        self.numbers = numbers if numbers is not None else array.array("q")
        self.in_base = in_base if in_base is not None else bytearray()
        self.sources: list[str] = sources if sources is not None else []
        self.base = base                # the full layer this one is stacked on
        self.dirs = dirs                # a pure full layer's directories (it may be a base)

    def __len__(self) -> int:
        return len(self.targets)

    def digest(self, i: int) -> str:
        """Row `i`'s content digest, in hex."""
        return self.digests[i * 32:i * 32 + 32].hex()

    def add_file(self, target: str, digest: str, numbers: tuple, src: str) -> None:
        """Add the row of a file of the layer's own diff dir: copied to `target` from `src`;
        `numbers` are the row's (INO .. GROUP: the source's stamp and size, the copy's mode
        bits and owner, the source group), `digest` in hex. A file whose time does not fit
        (past 2262: a stacked layer's header takes MTIME as it is) gets no row: the next
        build copies it instead of sharing it."""
        if not (-_I64 <= numbers[MTIME] < _I64 and -_I64 <= numbers[CTIME] < _I64):
            return
        self.targets.append(target)
        self.digests += bytes.fromhex(digest)
        self.numbers.append(signed64(numbers[INO]))
        self.numbers.extend(numbers[INO + 1:])
        self.in_base.append(0)
        self.sources.append(src)

    def extend(self, other: "Table") -> None:
        """Add all of `other`'s rows, as they are (a copy worker's, fileops.py)."""
        self.targets += other.targets
        self.digests += other.digests
        self.numbers.extend(other.numbers)
        self.in_base += other.in_base
        self.sources += other.sources

    def add_rows_of(self, other: "Table", rows) -> None:
        """Add the rows `rows` (numbers) of `other`, as files the base holds."""
        self.targets += [other.targets[i] for i in rows]
        digests = other.digests
        self.digests += b"".join([digests[i * 32:i * 32 + 32] for i in rows])
        # (Whole rows of numbers, as bytes: one slice per row, not one item per number.)
        raw, width = other.numbers.tobytes(), _NUMBERS * other.numbers.itemsize
        self.numbers.frombytes(b"".join([raw[i * width:(i + 1) * width] for i in rows]))
        self.in_base += b"\1" * len(rows)
        self.sources += [other.sources[i] for i in rows]

    def encode(self) -> bytes:
        return marshal.dumps({"targets": self.targets, "digests": bytes(self.digests),
                              "numbers": self.numbers.tobytes(), "in_base": bytes(self.in_base),
                              "sources": self.sources, "base": self.base, "dirs": self.dirs})


class TableView:
    """A table's rows by target, for the commit: the content digests the segmenter signs
    members with (`get`), and a stacked layer's files in its base (from row `base_from`
    on; diff.write_tar's `stacked_on`)."""

    def __init__(self, table: Table, base_from: int | None = None, base_dirs=()):
        self.table = table
        self.index = {t: i for i, t in enumerate(table.targets)}
        self.base_from = base_from
        self._base_dirs = list(base_dirs)

    def get(self, target: str) -> bytes | None:
        """The hex content digest of the file at `target`, as bytes."""
        i = self.index.get(target)
        return None if i is None else self.table.digest(i).encode()

    def base_files(self) -> list[str]:
        return self.table.targets[self.base_from:] if self.base_from is not None else []

    def base_dirs(self) -> list[str]:
        """The directories of the new layer its own diff dir leaves to the base."""
        return self._base_dirs

    def attributes(self, target: str) -> tuple[int, int, int, int, int]:
        """(size, mtime_ns, mode bits, uid, gid) of the file at `target`."""
        k = self.index[target] * _NUMBERS
        return tuple(self.table.numbers[k + SIZE:k + GID + 1])


def read_table(path: str) -> Table | None:
    """The table kept at `path`, or None if it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            data = marshal.loads(f.read())
        numbers = array.array("q")
        numbers.frombytes(data["numbers"])
        table = Table(data["targets"], data["digests"], numbers, data["in_base"], data["sources"],
                      data["base"], data["dirs"])
    except (OSError, EOFError, ValueError, TypeError, KeyError):
        return None
    n = len(table.targets)
    columns_agree = len(table.digests) == 32 * n and \
        len(table.in_base) == len(table.sources) == n and len(numbers) == n * _NUMBERS
    if not columns_agree or (table.dirs is not None and not isinstance(table.dirs, list)):
        return None
    return table


@record
class DonorSpec:
    """Where the donor is (made by the executor, opened by the COPY's process after unmount)."""
    chain: str                       # its chain ID
    diff: str                        # its diff dir
    table: str                       # its table's path
    base: str | None = None          # the full layer the donor itself is stacked on, if it is
    base_diff: str = ""
    base_table: str = ""


class Donor:
    """The donor's table, and the pure full layer a new layer may stack on (`base`): the
    donor itself, or the donor's own base."""

    def __init__(self, spec: DonorSpec):
        self.spec = spec
        table = read_table(spec.table)
        self.table = table if table is not None else Table()
        # A row's file is in the donor's diff dir, or in its base's if it is stacked.
        self._homes = (spec.diff, spec.base_diff if spec.base else spec.diff)
        if spec.base:
            base_table, self.base = read_table(spec.base_table), spec.base
        else:
            base_table, self.base = table, spec.chain
        if base_table is None or base_table.dirs is None or base_table.base is not None:
            self.base = None                          # only a pure full layer is stacked on
        self.base_diff = spec.base_diff if spec.base else spec.diff
        self.base_dirs = base_table.dirs if self.base else []
        self.base_targets = base_table.targets if self.base else []

    def unchanged(self, groups, digest_of, xattrs_of) -> dict:
        """group -> source path -> the donor's row of each source file that is still what
        that row was copied from: its number, or -1 - its number if the base holds it.

        `groups` are (group, its sources) of the COPY, `digest_of(stat)` the content digest
        the build knows or None, `xattrs_of(group, path)` whether a source file has xattrs.
        A source with the stamp its row recorded is unchanged without asking either (its
        ctime would have moved). Whether a file goes to the same target with the same mode
        and owner is for the caller to check, once the chrooted pass has said.
        """
        table = self.table
        by_source = {src: i for i, src in enumerate(table.sources)}
        numbers, in_base = table.numbers, table.in_base
        # Stacked on the donor itself: all its files are the base's; else those its base holds.
        everything = self.base is not None and not self.spec.base
        stacks = self.base is not None
        out: dict[int, dict] = {}
        for gi, sources in groups:
            found = out[gi] = {}
            for source in sources:
                for e in source.entries:
                    i = by_source.get(e.src)
                    if i is None:
                        continue
                    st = e.st
                    k = i * _NUMBERS
                    if numbers[k + SIZE] != st.st_size or numbers[k + MTIME] != st.st_mtime_ns \
                            or numbers[k + GROUP] != gi or not stat.S_ISREG(st.st_mode):
                        continue
                    if numbers[k + INO] != signed64(st.st_ino) or \
                            numbers[k + CTIME] != st.st_ctime_ns:
                        if table.digest(i) != digest_of(st) or xattrs_of(gi, e.src):
                            continue
                    found[e.src] = -1 - i if stacks and (everything or in_base[i] == 1) else i
        return out

    def row_is(self, i: int, target: str, perm: int, owner: tuple[int, int]) -> bool:
        """Is row `i` a file at `target` with `perm` and `owner`?"""
        k = i * _NUMBERS
        numbers = self.table.numbers
        return self.table.targets[i] == target and numbers[k + PERM] == perm \
            and numbers[k + UID] == owner[0] and numbers[k + GID] == owner[1]

    def copy_of(self, i: int) -> tuple[str, str]:
        """(where the donor's, or its base's, copy of row `i` is, its digest)."""
        table = self.table
        return self._homes[table.in_base[i]] + table.targets[i], table.digest(i)

    def item_of(self, i: int) -> tuple:
        """Row `i` as fileops' work item: (target, group, source path, mode, owner)."""
        k = i * _NUMBERS
        numbers = self.table.numbers
        return (self.table.targets[i], numbers[k + GROUP], self.table.sources[i],
                numbers[k + PERM], (numbers[k + UID], numbers[k + GID]))

    def covered_by(self, upper: str, missing, new_dirs) -> bool:
        """Would the diff dir `upper` stacked on the base show exactly the new layer?

        Every directory of the base must be a directory of `upper`, not opaque, or one of
        `new_dirs` (directories still to be made, none opaque); every file of the base is
        provided, or written, or else (`missing`) must be replaced by another entry of
        `upper`.
        """
        for d in self.base_dirs:
            if d in new_dirs:
                continue
            path = upper + d
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode) or \
                        whiteout.is_opaque(path, os.listxattr(path, follow_symlinks=False)):
                    return False
            except OSError:
                return False
        return all(os.path.lexists(upper + t) for t in missing)
