"""What COPY, ADD and WORKDIR do to an image's files, run chrooted inside the step's snapshot.

These functions run in the child that `sandbox.run_in_root` forks. Before
the chroot, `prepare` mounts the read-only layer stacks of `--from` sources
and opens a directory fd for every source root (the build context, another
stage, a scratch dir holding heredocs and downloads); after it, `/` is the
image's root, so a destination like `/app` or a symlink the image holds
(`/lib -> usr/lib`) resolves inside the image and nowhere else, and the
image's own /etc/passwd answers `--chown=name`. Code that runs after the
chroot must not import anything: the host's Python library is not visible.

The rules are BuildKit's: a directory source copies its contents; a file
goes into the destination when it ends with `/` or is an existing directory;
new parent directories are 0755 and owned like the copied files (root, or
`--chown`); an existing destination directory keeps its metadata while the
directories copied into it take the source's; files keep their mode and
mtime; hard links inside one COPY stay hard links; `--exclude` patterns
drop entries; `--parents` keeps the source's path; ADD unpacks a local tar
archive (plain, gzip, bzip2 or xz) into the destination.
"""

from __future__ import annotations

import bz2  # noqa: F401  (tarfile needs them after the chroot, where nothing can be imported)
import array
import errno
import hashlib
import marshal
import lzma  # noqa: F401
import os
import posixpath
import signal
import stat
import tarfile
import zlib  # noqa: F401

from .record import record
from . import filemode, linux, paths, users
from .layer import extract
from .context import (BuildContext, IgnoreRules, Source, filter_excludes, known_digest,
                      known_digest_of, learn_cached_runs)
from . import donor as donors
from .donor import Donor, DonorSpec
from .hashing import NOT_COPIED_XATTRS
from .sandbox import SetupError
from .store.direct import write_all
from .errors import DISK_FULL, DISK_FULL_HINT
from .snapshot.overlay import mount_overlay


@record(frozen=False)
class SourceGroup:
    """Sources that share a root directory."""
    root: str                                  # host path; for `lowers`, where they are mounted
    specs: tuple[str, ...] = ()                # resolved in the child (from another stage)
    sources: tuple[Source, ...] = ()           # resolved in the parent (context, scratch)
    lowers: tuple[str, ...] = ()               # a layer stack to mount read-only at `root`
    store_root: str = ""                       # working dir for relative lower paths
    what: str = ""                             # for messages: "stage build", "image x"
    keep_owners: bool = False                  # another stage's or an image's files (see _Copier)
    fd: int = -1


@record
class CopyOp:
    groups: tuple[SourceGroup, ...]
    dest: str                       # absolute, inside the image
    dest_is_dir: bool               # the destination ends with / (or several sources)
    chown: str | None = None
    chmod: int | str | None = None  # filemode.parse()
    excludes: tuple[str, ...] = ()
    parents: bool = False
    unpack: bool = False            # ADD: unpack local archives
    instruction: str = "COPY"
    donor: DonorSpec | None = None  # the previous layer of this COPY (donor.py)
    record: str = ""                # a dir for the table of what this COPY wrote (donor.py)
    hash_content: bool = False      # hash the files it writes whose digest is not known yet


class CopyError(SetupError):
    """A COPY that cannot be carried out in this image (a file where a directory must go)."""


def prepare(op: CopyOp) -> None:
    """Before the chroot: mount `--from` stacks, resolve their sources, open every root."""
    rules = IgnoreRules(list(op.excludes)) if op.excludes else None
    for i, g in enumerate(op.groups):
        if g.lowers:
            os.makedirs(g.root, exist_ok=True)
            lowers = list(g.lowers)
            if len(lowers) < 2:
                empty = g.root + "-empty"
                os.makedirs(empty, exist_ok=True)
                lowers.append(empty)
            os.chdir(g.store_root)
            mount_overlay(g.root, lowers, readonly=True)
        if g.specs:
            ctx = BuildContext(g.root, ignore=IgnoreRules(), strict=False)
            found = []
            for spec in g.specs:
                try:
                    found += ctx.sources(spec, instruction=op.instruction, where=g.what)
                except Exception as e:   # BuildError: not in that stage
                    raise CopyError(getattr(e, "reason", str(e)), getattr(e, "hint", None)) from None
            g.sources = tuple(found)
        if rules is not None:
            g.sources = tuple(f for f in (filter_excludes(s, rules) for s in g.sources) if f)
        g.fd = os.open(g.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def copy_into_root(op: CopyOp, matched: "Matched | None" = None) -> dict:
    """After the chroot: put every source in place, except the new plain files.

    Those (most of a COPY, and what makes it slow: creating files through an
    overlay costs about twice what it costs on the disk itself) are returned
    as work for `finish_in_upper`, which writes them straight into the upper
    dir once the overlay is unmounted. Only files whose name is free in the
    image are deferred, and their parent directories are already in the upper
    dir, so the result is the one the overlay would have produced. Of those,
    the ones the base layer `matched` offers already holds are not work but
    returned as its row numbers (`provided`), with the base's files that
    nothing here puts in place (`missing`: the upper dir must have them).
    """
    uid, gid = users.chown_ids(op.chown, "/") if op.chown else (0, 0)
    dest = os.path.realpath(op.dest)    # symlinks followed inside the image, as BuildKit does
    # Not "more than one match": BuildKit copies each match of `COPY dir/*.txt /x` to /x
    # itself, so a destination without a slash ends as the last match (recorded from Docker).
    into_dir = op.dest_is_dir or _is_dir(dest) or op.parents
    deferred: dict[str, tuple] = {}            # target -> work; a later source wins
    provided: dict[str, int] = {}              # target -> the base's row (the same)
    pending: dict[str, tuple] = {}             # new dirs in new dirs, made after the unmount
    dir_times: list[tuple[str, int]] = []
    copier = None
    for gi, g in enumerate(op.groups):
        if copier is not None:
            copier.make_pending()     # (the next group's copier knows nothing of them)
        copier = _Copier(g.fd, uid, gid, op.chmod, gi, deferred,
                         keep_owners=g.keep_owners and not op.chown,
                         matched=matched if matched is not None and matched.stacks else None,
                         provided=provided, pending=pending)
        for src in g.sources:
            base = dest
            if op.parents:
                kept = src.kept_path
                base = posixpath.join(dest, kept) if src.is_dir else \
                    posixpath.join(dest, posixpath.dirname(kept))
            if src.is_dir:
                copier.copy_tree(src, base)
            elif op.unpack and _is_archive(g.fd, src.path):
                copier.mkdir_parents(base)
                _untar(g.fd, src.path, base, None if not op.chown else (uid, gid))
                copier.forget_fresh()
            else:
                target = os.path.join(base, src.name) if into_dir else base
                copier.mkdir_parents(os.path.dirname(target) or "/")
                copier.copy_entry(src.entries[0], target)
        dir_times += copier.dir_times
    out = {"files": list(deferred.values()), "dirs": dir_times, "mkdirs": list(pending.items())}
    if provided:
        out["provided"] = array.array("q", provided.values()).tobytes()
        out["missing"] = [t for t in matched.donor.base_targets
                          if t not in provided and t not in deferred]
    return out


@record(frozen=False)
class Matched:
    """The donor of a COPY (donor.py), and what it holds unchanged of its sources."""
    donor: Donor | None = None
    unchanged: dict = None                  # Donor.unchanged's

    @property
    def stacks(self) -> bool:
        return self.donor is not None and self.donor.base is not None

    def row(self, gi: int, src: str, target: str, perm: int, owner: tuple[int, int],
            in_base: bool) -> int | None:
        """The donor's row of what copying `src` of group `gi` to `target` with `perm` and
        `owner` would give, if the base holds it (`in_base`) or else the donor; or None."""
        row = self.unchanged.get(gi, _NONE).get(src) if self.unchanged else None
        if row is None or (row < 0) != in_base:
            return None
        if in_base:
            row = -1 - row
        return row if self.donor.row_is(row, target, perm, owner) else None


_NONE: dict = {}


def match_donor(op: CopyOp) -> Matched:
    """The donor, and the sources it holds unchanged (Donor.unchanged), of the groups read
    from host dirs (the build context; another stage's files are resolved in the child).

    Run by the build process before the COPY's processes are forked: its own objects, not
    copies made page by page as a forked child touches them (0.17-0.21 s there for
    30,000 files, on the core the chrooted pass needs)."""
    if not op.donor:
        return Matched()
    donor = Donor(op.donor)
    roots = {gi: g.root for gi, g in enumerate(op.groups) if not g.lowers}

    def xattrs_of(gi: int, src: str) -> bool:
        try:
            return bool(os.listxattr(os.path.join(roots[gi], src), follow_symlinks=False))
        except OSError:
            return True
    groups = [(gi, op.groups[gi].sources) for gi in roots]
    return Matched(donor, donor.unchanged(groups, known_digest, xattrs_of))


def prepare_finish(op: CopyOp) -> dict:
    """Every source entry's stamp by (group, path), for finish_in_upper: its stat identity
    (context._identity's dev, inode, size, mtime, ctime), marshalled.

    Made while the chrooted pass runs (sandbox.run_in_root's `meanwhile`), on
    the core that would wait for it. The copy workers read these bytes, not the
    walk's entries and their stats, which sit all over this process's memory
    and would be copied page by page into every worker that touched them (their
    reference counts). marshal, not struct: inode numbers may use all 64 bits,
    times in nanoseconds pass 63 bits after 2262 and are negative before 1970.
    """
    stamps = {}
    dumps = marshal.dumps
    for gi, g in enumerate(op.groups):
        for s in g.sources:
            for e in s.entries:
                st = e.st
                stamps[(gi, e.src)] = dumps((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns))
    return stamps


ROWS_PREFIX = "rows-"       # in op.record: each worker's rows (a donor.Table's encode())
STACKED = "stacked"         # in op.record: the base, and which donor rows it provides


def finish_in_upper(op: CopyOp, work: dict, upper: str, matched: Matched,
                    stamps: dict | None = None) -> None:
    """With the overlay unmounted: write the deferred files into the upper dir, then dir times.

    Every parent of a deferred file is a real directory of the upper dir (the
    chrooted pass created or copied it up); files are created O_NOFOLLOW. The
    files the base layer provides (copy_into_root said which) stay there if
    the upper dir stacked on the base shows exactly the new layer (donor.py),
    else they are hard-linked from it, as is a file the donor's own diff dir
    holds unchanged. Every file whose digest is known is recorded in
    `op.record` for the next build to do the same. `matched` is what
    match_donor(op) gave, `stamps` what prepare_finish(op) gave, if it ran.
    An error names the file by its path in the image, not in the upper dir.
    """
    try:
        _finish_in_upper(op, work, upper, matched, stamps)
    except OSError as e:
        raise _in_image(e, upper)


def _in_image(e: OSError, upper: str) -> OSError:
    """`e`, naming its file by the path in the image instead of the path in the step's upper
    dir (which means nothing to the user), and with the middle of a very long one left out."""
    if isinstance(e.filename, str):
        e.filename = paths.shortened(e.filename, upper)
    return e


def _finish_in_upper(op: CopyOp, work: dict, upper: str, matched: Matched,
                     stamps: dict | None) -> None:
    if stamps is None:
        stamps = prepare_finish(op)
    donor = matched.donor
    pending = dict(work["mkdirs"])       # target -> (source group fd, source path, mode, owner)
    todo: list[tuple] = []          # (item, the donor's copy to link and its digest, or None)
    for item in work["files"]:
        target, gi, src, perm, owner = item
        row = matched.row(gi, src, target, perm, tuple(owner), False)
        todo.append((item, None if row is None else donor.copy_of(row)))
    provided = array.array("q")
    provided.frombytes(work.get("provided", b""))
    stacked = bool(provided) and donor.covered_by(upper, work["missing"], pending)
    skipped = _left_to_base(donor, pending, work["dirs"], todo) if stacked else set()
    for target, made in pending.items():
        if target not in skipped:
            _make_dir(upper + target, *made)
    if stacked:
        if op.record:
            with open(os.path.join(op.record, STACKED), "wb") as f:
                f.write(marshal.dumps({"base": donor.base, "base_diff": donor.base_diff,
                                       "rows": provided.tobytes(), "dirs": sorted(skipped)}))
    elif provided:
        todo += [(donor.item_of(i), donor.copy_of(i)) for i in provided]   # linked instead
    _write_files(op, todo, stamps, upper)
    for path, mtime in reversed(work["dirs"]):
        if path not in skipped:
            os.utime(upper + path, ns=(mtime, mtime), follow_symlinks=False)


def _left_to_base(donor: Donor, pending: dict, dir_times: list, todo: list) -> set[str]:
    """The pending directories a stacked layer need not make: the base has each exactly as
    it would be made (mode, owner, time, no xattrs on either side), and nothing of the
    layer's own goes in it or below it. Mounts show the base's, the commit reads it there
    (diff.write_tar); 300 directories fewer to make for each rebuild of copy-30k."""
    mtimes = {}
    for path, mtime in reversed(dir_times):
        mtimes[path] = mtime             # (the first source's time is the one set last)
    same = set()
    for target, (ctx, src, perm, owner) in pending.items():
        try:
            st = os.lstat(donor.base_diff + target)
            if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != perm \
                    or (st.st_uid, st.st_gid) != owner or st.st_mtime_ns != mtimes.get(target) \
                    or os.listxattr(donor.base_diff + target, follow_symlinks=False) \
                    or os.listxattr(f"/proc/self/fd/{ctx}/{src}", follow_symlinks=False):
                continue
        except OSError:
            continue
        same.add(target)
    needed: set[str] = set()

    def need(path: str) -> None:
        while path in pending and path not in needed:
            needed.add(path)
            path = _parent(path)
    for (target, *_rest), _link in todo:
        need(_parent(target))
    for target in pending:
        if target not in same:
            need(target)
    return same - needed


def _write_files(op: CopyOp, todo: list[tuple], stamps: dict, upper: str) -> None:
    """Copy (or link from the donor) the files finish_in_upper left to write, on every core.

    `todo` holds (item, the donor's copy to link and its digest, or None) per
    file, `stamps` each source's stamp (prepare_finish).
    """
    rows = donors.Table()          # (a worker's: each worker writes its own, keep_rows())
    if len(todo) > 64:
        # Each file's digest goes into its row: learnt here once, not by every worker.
        learn_cached_runs()
    fds = [g.fd for g in op.groups]
    born_right = _BornRight()

    def place(item, link) -> None:
        target, gi, src, perm, (uid, gid) = item
        identity = marshal.loads(stamps[(gi, src)])
        _dev, ino, size, mtime, ctime = identity
        row = (ino, ctime, size, mtime, perm, uid, gid, gi)
        path = upper + target
        if link is not None:
            try:
                os.link(link[0], path, follow_symlinks=False)
                rows.add_file(target, link[1], row, src)
                return
            except FileExistsError:
                raise
            except OSError:
                pass                    # (gone meanwhile: copied after all)
        known = known_digest_of(identity)
        exact, hashed = _copy_file(fds[gi], src, path, size, mtime, ctime, perm, (uid, gid),
                                   op.hash_content and known is None,
                                   born_right(path, perm, uid, gid))
        # (A source matched by its stamp alone may have no digest in this build: the row's.)
        digest = link[1] if link is not None else hashed or known
        if exact and digest is not None:
            rows.add_file(target, digest, row, src)

    def copy_one(job) -> None:
        item, link = job
        try:
            try:
                place(item, link)
            except FileExistsError:
                # Only a whiteout of a file an earlier layer deleted may be there (checked
                # after the fact: asking first cost a lookup per file).
                path = upper + item[0]
                st = os.lstat(path)
                if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                    raise CopyError(f"{item[0]} appeared while it was being copied") from None
                os.unlink(path)
                place(item, link)
        except OSError as e:
            raise _in_image(e, upper)

    def keep_rows(worker: int) -> None:
        if op.record and len(rows):
            with open(os.path.join(op.record, f"{ROWS_PREFIX}{worker}"), "wb") as f:
                f.write(rows.encode())

    umask = os.umask(0)            # (in this forked process and its workers: _BornRight)
    try:
        _in_parallel(todo, copy_one, keep_rows, key=lambda job: job[0][0])
    finally:
        os.umask(umask)


class _BornRight:
    """Does creating a file at `path` with mode `perm` (and no umask) give it `perm` and the
    owner (uid, gid), so that no fchown and fchmod are needed? For most COPYs' files:
    this process's (root), in a directory without the set-group-ID bit (whose group
    new files would take), and no set-ID or sticky bit (which creation may drop).
    Only where the umask is 0 (_write_files sets it). Two system calls fewer per file."""

    def __init__(self):
        self.ids = (os.geteuid(), os.getegid())
        self._sgid: dict[str, bool] = {}

    def __call__(self, path: str, perm: int, uid: int, gid: int) -> bool:
        if perm > 0o777 or (uid, gid) != self.ids:
            return False
        parent = _parent(path)
        sgid = self._sgid.get(parent)
        if sgid is None:
            sgid = self._sgid[parent] = bool(os.stat(parent).st_mode & stat.S_ISGID)
        return not sgid


def mkdir_workdir(path: str, user: str) -> None:
    """WORKDIR: create the directory (and parents) when missing, owned by the current USER."""
    path = os.path.realpath(path)
    if _is_dir(path):
        return
    uid, gid = users.chown_ids(user, "/") if user else (0, 0)     # BuildKit: as --chown=USER
    _Copier(-1, uid, gid, None).mkdir_parents(path)


# Why copy_file_range may refuse a pair of files: different filesystems (before Linux
# 5.19, or of different types), a kernel or filesystem without it, special files.
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF,
                  errno.EPERM)
_HAVE_COPY_RANGE = hasattr(os, "copy_file_range")       # (Linux 4.5 and later)
# Smaller files are copied into the page cache: the commit reads every file of the layer
# right after, and a reflinked file's data is not in memory but on the disk, where
# thousands of small reads would cost far more than the space they save.
_COPY_RANGE_FROM = 1 << 20


def copy_data(src: int, dst: int, size: int, hasher=None) -> int:
    """Copy `size` bytes from the start of `src` to `dst` (both at offset 0); the bytes left
    when `src` ended early. `hasher` (a hashlib object) is fed the bytes copied.

    Files of 1 MB or more go by copy_file_range: where the source and the
    layer are on one XFS or btrfs (with reflinks), the layer's copy shares
    the source's blocks, so a COPY of large files writes no data and takes
    no space until either side changes; elsewhere the kernel copies, as
    sendfile does. Whatever it will not do (another filesystem, a file it
    reads as empty, as procfs files) is left to sendfile.
    """
    if hasher is not None and size < _COPY_RANGE_FROM:
        return _copy_hashed(src, dst, size, hasher)
    left = size
    try:
        while left > 0 and size >= _COPY_RANGE_FROM and _HAVE_COPY_RANGE:
            n = os.copy_file_range(src, dst, min(left, 1 << 30))
            if n == 0:
                break
            left -= n
    except OSError as e:
        if e.errno not in _NO_COPY_RANGE:
            raise
    offset = size - left
    while left > 0:
        n = os.sendfile(dst, src, offset, min(left, 1 << 30))
        if n == 0:
            break
        offset += n
        left -= n
    if hasher is not None:
        offset = 0
        while offset < size - left:
            chunk = os.pread(src, min(size - left - offset, 1 << 20), offset)
            if not chunk:
                break
            hasher.update(chunk)
            offset += len(chunk)
    return left


def _copy_hashed(src: int, dst: int, size: int, hasher) -> int:
    """copy_data of a small file through this process's memory, hashing it on the way: the
    one read of it the build makes (its key's digest and its copy)."""
    left = size
    while left > 0:
        data = os.read(src, left)
        if not data:
            break
        hasher.update(data)
        write_all(dst, data)
        left -= len(data)
    return left


def _parent(path: str) -> str:
    """The directory an absolute, normalised image path is in: os.path.dirname without its
    generality, which cost a third of the chrooted pass over 30,000 files."""
    return path.rpartition("/")[0] or "/"


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


class _Copier:
    """Copies one group's sources into the image.

    Owners: 0:0 or --chown's for files from the context (as Docker); files
    from another stage or an image keep theirs unless --chown is given
    (`keep_owners`; Docker since 2019, BuildKit and Buildah do the same).
    Directories the copy has to create around them are 0:0 or --chown's.
    """

    def __init__(self, ctx_fd: int, uid: int, gid: int, chmod: int | str | None, group: int = 0,
                 deferred: dict | None = None, keep_owners: bool = False,
                 matched: Matched | None = None, provided: dict | None = None,
                 pending: dict | None = None):
        self.ctx = ctx_fd
        self.uid = uid
        self.gid = gid
        self.keep_owners = keep_owners
        self.chmod = chmod
        self.group = group
        self.links: dict[tuple[int, int], str] = {}
        self.dir_times: list[tuple[str, int]] = []
        # target -> (target, group, source path, mode, owner), shared by a COPY's groups
        self.deferred: dict[str, tuple] = {} if deferred is None else deferred
        # With a base to stack on: target -> its row, for files the base already holds.
        self.matched = matched
        self.provided: dict[str, int] = {} if provided is None else provided
        # New directories inside new directories: creating them through the overlay cost
        # 0.3 ms each here (300 of them: 0.09 s of a rebuilt copy-30k), in the upper dir after
        # the unmount a third of that. target -> (source group fd, source path, mode, owner);
        # made now (make_pending) when something must be written into one before then.
        self.pending: dict[str, tuple] | None = pending
        self.in_upper: set[str] = set()        # directories known to be in the upper dir
        # Directories this copier created (empty then), and the names it has used in them:
        # a name not used yet in one of them is free without asking the overlay (an lstat
        # there costs a lookup in every lower dir).
        self.fresh: set[str] = set()
        self.used: set[str] = set()

    def mkdir_parents(self, path: str) -> None:
        self.make_pending(path)
        missing = []
        p = path
        while p not in ("/", "") and not os.path.lexists(p):
            missing.append(p)
            p = os.path.dirname(p)
        if p not in ("/", "") and not _is_dir(p):
            raise CopyError(f"cannot create {path}: {p} is not a directory in the image")
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            os.chown(d, self.uid, self.gid)
            os.chmod(d, 0o755)
            self.in_upper.add(d)
            self.fresh.add(d)
            self.used.add(d)

    def _is_free(self, target: str) -> bool:
        """True if `target` is known not to exist (it is then taken); False if unknown."""
        if target in self.used or _parent(target) not in self.fresh:
            return False
        self.used.add(target)
        return True

    def forget_fresh(self) -> None:
        """Something else wrote into the tree (an unpacked archive): ask the file system again."""
        self.make_pending()
        self.fresh.clear()

    def make_pending(self, path: str | None = None) -> None:
        """Create the pending directories (those among `path` and its parents, or all) now,
        through the overlay: something is about to be written into them."""
        if not self.pending:
            return
        if path is None:
            chain = list(self.pending)
        else:
            chain = []
            while path not in ("/", ""):
                if path in self.pending:
                    chain.append(path)
                path = _parent(path)
            chain.reverse()
        for target in chain:
            _make_dir(target, *self.pending.pop(target))

    def copy_tree(self, src: Source, dest: str) -> None:
        if os.path.lexists(dest) and not _is_dir(dest):
            raise CopyError(f"cannot copy the directory {src.spec!r} to {dest}: it is not a "
                            "directory in the image")
        if not os.path.lexists(dest):
            # BuildKit creates the destination like any parent (0755, --chown), not
            # with the source directory's metadata.
            self.mkdir_parents(dest)
        for entry in src.entries[1:]:
            self.copy_entry(entry, dest.rstrip("/") + "/" + entry.rel)

    def copy_entry(self, e, target: str) -> None:
        st = e.st
        mode = st.st_mode
        perm = stat.S_IMODE(mode) if self.chmod is None else \
            filemode.apply(self.chmod, mode, stat.S_ISDIR(mode))
        if stat.S_ISDIR(mode):
            if self.pending is not None and (target in self.pending or self._is_free(target)):
                # A new directory in a new directory, made after the unmount (or one already
                # pending: a later source's metadata wins, as on a real directory).
                self.pending[target] = (self.ctx, e.src, perm, self._owner(e))
                self.fresh.add(target)
                self.dir_times.append((target, st.st_mtime_ns))
                self.in_upper.add(target)
                return
            if self.pending is None and self._is_free(target):
                existing = None
            else:
                try:
                    existing = os.lstat(target)
                except FileNotFoundError:
                    existing = None
            if existing is None:
                os.mkdir(target, 0o700)
                self.fresh.add(target)
                self.used.add(target)
            elif not stat.S_ISDIR(existing.st_mode):
                raise CopyError(f"cannot copy the directory {e.src!r} to {target}: a file "
                                "of that name is in the image")
            self._finish_entry(target, perm, e, is_link=False)
            _copy_dir_xattrs(self.ctx, e.src, target)
            self.dir_times.append((target, st.st_mtime_ns))
            self.in_upper.add(target)
            return
        if self.pending and not (stat.S_ISREG(mode) and st.st_nlink == 1):
            self.make_pending(_parent(target))       # (written now, through the overlay)
        existed = False if self._is_free(target) else self._clear(target, e)
        if stat.S_ISREG(mode):
            if st.st_nlink == 1 and not existed:
                self._defer(e, target, perm)
                return
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], target)
                return
            self.deferred.pop(target, None)
            self.provided.pop(target, None)
            _copy_file(self.ctx, e.src, target, st.st_size, st.st_mtime_ns, st.st_ctime_ns, perm,
                       self._owner(e))
            if st.st_nlink > 1:
                self.links[key] = target
            return
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(e.src, dir_fd=self.ctx), target)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, 0o600)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(target, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return
        self._finish_entry(target, perm, e, is_link=stat.S_ISLNK(mode))

    def _clear(self, target: str, e) -> bool:
        """Make room for a non-directory at `target`; True if something was there."""
        if self.pending and target in self.pending:
            raise CopyError(f"cannot copy {e.src!r} to {target}: a directory of that name is "
                            "in the image")
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(existing.st_mode):
            raise CopyError(f"cannot copy {e.src!r} to {target}: a directory of that name is "
                            "in the image")
        os.unlink(target)
        return True

    def _defer(self, e, target: str, perm: int) -> None:
        parent = _parent(target)
        if parent not in self.in_upper:
            # An existing directory the overlay has not copied up yet: adding a file
            # would copy it up and set its mtime, which this does.
            os.utime(parent)
            self.in_upper.add(parent)
        owner = self._owner(e)
        if self.matched is not None:
            row = self.matched.row(self.group, e.src, target, perm, owner, True)
            if row is not None:
                self.deferred.pop(target, None)
                self.provided[target] = row
                return
            self.provided.pop(target, None)
        self.deferred[target] = (target, self.group, e.src, perm, owner)

    def _owner(self, e) -> tuple[int, int]:
        return (e.st.st_uid, e.st.st_gid) if self.keep_owners else (self.uid, self.gid)

    @staticmethod
    def _copy_xattrs(src: int, dst: int) -> bool:
        """Copy the xattrs a layer may hold; True if the source had any."""
        try:
            names = os.listxattr(src)
        except OSError:
            return False
        for name in names:
            if name.startswith(NOT_COPIED_XATTRS):
                continue
            try:
                os.setxattr(dst, name, os.getxattr(src, name))
            except OSError:
                pass
        return bool(names)

    def _finish_entry(self, target: str, perm: int, e, *, is_link: bool) -> None:
        os.chown(target, *self._owner(e), follow_symlinks=False)
        if not is_link:
            os.chmod(target, perm)
        os.utime(target, ns=(e.st.st_mtime_ns, e.st.st_mtime_ns), follow_symlinks=False)


def _copy_file(ctx: int, src: str, target: str, size: int, mtime_ns: int, ctime_ns: int,
               perm: int, owner: tuple[int, int], hash_content: bool = False,
               born_right: bool = False) -> tuple[bool, str | None]:
    """Copy the regular file `src` (under the group's directory `ctx`; its walk saw `size`
    and the times) to `target` and set its owner, mode, xattrs and time (by fd).

    `born_right`: creating the file gives it `owner` and `perm` already
    (_BornRight), so they are not set again.
    (exact, digest): exact if the copy is exactly the file that was walked
    (no extended attributes, not changed since): what donor.py may share
    with a later build; with `hash_content`, the sha256 of what was copied
    when exact, else None.
    """
    hasher = hashlib.sha256() if hash_content else None
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ctx)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      perm if born_right else 0o600)
        try:
            left = copy_data(fd, dst, size, hasher)
            if not born_right:
                os.fchown(dst, *owner)
                os.fchmod(dst, perm)          # after chown, which clears set-id bits
            # After chown too, which drops security.capability (file capabilities).
            had_xattrs = _Copier._copy_xattrs(fd, dst)
            os.utime(dst, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(dst)
        now = os.fstat(fd)
    finally:
        os.close(fd)
    exact = not had_xattrs and left == 0 and (now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (
        size, mtime_ns, ctime_ns)
    return exact, hasher.hexdigest() if exact and hasher is not None else None


def _make_dir(path: str, ctx: int, src: str, perm: int, owner: tuple[int, int]) -> None:
    """Make a pending directory (_Copier.pending) at `path`: owner, mode, then the xattrs of
    its source `src` (under the group's directory `ctx`)."""
    os.mkdir(path, 0o700)
    os.chown(path, *owner)
    os.chmod(path, perm)
    _copy_dir_xattrs(ctx, src, path)


def _copy_dir_xattrs(ctx: int, src: str, target: str) -> None:
    """A source directory's xattrs on its copy (after its chown), as Docker copies them."""
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ctx)
    try:
        if not os.listxattr(fd):
            return
        dst = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _Copier._copy_xattrs(fd, dst)
        finally:
            os.close(dst)
    finally:
        os.close(fd)


_PARALLEL_FROM = 256     # below this, forking workers costs more than it saves


def _in_parallel(items: list, work, done=None, key=lambda item: item[0]) -> None:
    """Run `work(item)` for every item, split over one forked process per CPU.

    `done(worker)` runs in each worker after its last item (numbered from 0);
    `key(item)` is the path an item writes (items are shared out by its directory).

    Creating files is mostly kernel time, and it scales: on ext4, 30,000
    files take 1.9 s in one process and 0.6 s in two. A worker's failure
    comes back as a CopyError naming it.
    """
    workers = min(4, 2 * len(os.sched_getaffinity(0)))   # the work waits on the disk, too
    if len(items) < _PARALLEL_FROM or workers < 2:
        for item in items:
            work(item)
        if done is not None:
            done(0)
        return
    # Whole directories per worker: two processes creating files in one directory
    # contend for its lock and were measured slower than one.
    by_dir: dict[str, list] = {}
    for item in items:
        by_dir.setdefault(_parent(key(item)), []).append(item)
    shares: list[list] = [[] for _ in range(workers)]
    for group in sorted(by_dir.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    parent = os.getpid()
    children = []
    for k in range(workers):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                # Killed with the process that forked it (itself killed with the build's,
                # sandbox.py): never left writing into a layer dir its build gave up on.
                linux.set_parent_death_signal(signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(1)
                for item in shares[k]:
                    work(item)
                if done is not None:
                    done(k)
            except BaseException as e:      # reported to the parent, which raises it
                number = e.errno if isinstance(e, OSError) else 0
                where = getattr(e, "filename", "") or ""
                text = e.strerror if isinstance(e, OSError) else str(e)
                os.write(w, f"{number}\0{text}{': ' + where if where else ''}".encode())
                code = 1
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    errors = []
    for pid, r in children:
        with open(r, "rb") as f:
            number, _, message = f.read().decode(errors="replace").partition("\0")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            errors.append((int(number or 0), message or f"a copy worker ended with status {status}"))
    if errors:
        number, message = errors[0]
        raise CopyError(message, DISK_FULL_HINT if number in DISK_FULL else None)


# ---- ADD of a local archive ------------------------------------------------------------

def _is_archive(fd: int, rel: str) -> bool:
    """Docker's test: a tar, possibly gzip/bzip2/xz compressed (by content, not by name)."""
    f = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    try:
        head = os.pread(f, 520, 0)
        if head.startswith(extract.COMPRESSED_MAGICS):
            try:
                with open(os.dup(f), "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as t:
                    return t.next() is not None
            except (tarfile.TarError, OSError, EOFError, ValueError):
                return False
        return len(head) >= 262 and head[257:262] == b"ustar"
    finally:
        os.close(f)


def _untar(fd: int, rel: str, dest: str, owner: tuple[int, int] | None) -> None:
    """Unpack a tar into `dest` inside the image (we are chrooted: links resolve inside it)."""
    f = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    dir_times = []
    with open(f, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as t:
        for m in t:
            name = paths.clean(m.name)
            if paths.escapes(m.name.lstrip("/")) or not name:
                if name:
                    raise CopyError(f"ADD {rel}: entry {m.name!r} escapes the destination")
                continue
            target = os.path.join(dest, name)
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            if m.isdir():
                if not _is_dir(target):
                    if os.path.lexists(target):
                        os.unlink(target)
                    os.mkdir(target, 0o755)
                dir_times.append((target, int(m.mtime)))
            else:
                if os.path.lexists(target) and not os.path.isdir(target):
                    os.unlink(target)
                elif _is_dir(target) and not os.path.islink(target):
                    raise CopyError(f"ADD {rel}: {m.name!r} would replace a directory")
                if m.isreg():
                    with open(target, "xb") as out:
                        src = t.extractfile(m)
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                elif m.issym():
                    os.symlink(m.linkname, target)
                elif m.islnk():
                    os.link(os.path.join(dest, paths.clean(m.linkname)), target)
                    continue
                elif m.ischr() or m.isblk():
                    os.mknod(target, (stat.S_IFCHR if m.ischr() else stat.S_IFBLK) | 0o600,
                             os.makedev(m.devmajor, m.devminor))
                elif m.isfifo():
                    os.mkfifo(target, 0o600)
                else:
                    continue
            uid, gid = owner or (m.uid, m.gid)
            os.chown(target, uid, gid, follow_symlinks=False)
            extract.set_xattrs(target, m)          # after the chown, as Docker's ADD does
            if not m.issym():
                os.chmod(target, m.mode & 0o7777)
            os.utime(target, (int(m.mtime), int(m.mtime)), follow_symlinks=False)
    for path, mtime in reversed(dir_times):
        os.utime(path, (mtime, mtime))

