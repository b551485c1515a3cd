"""The vfs driver: no copy-on-write at all, so it works on any filesystem and any kernel.

As Docker's vfs driver does, every layer is also kept as a full copy of the
root filesystem up to it (`vfs/<chain-id>/diff`, built once from the one
below plus the layer's own diff dir, and collected with the layer). A step
gets a private copy of its parent's full root (`cp -a --reflink=auto`: a
clone where the filesystem can, a copy where it cannot), bind-mounted on
itself so the sandbox can pivot into it. Afterwards the copy is compared
with the parent's root (type, mode, owner, size, mtime, xattrs, link
target, device) and the differences are written to the upper dir in the
overlay format, so committing is the same as for the other drivers: changed
files are hard-linked from the copy (it is thrown away next), deleted paths
become whiteouts.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

from .. import linux
from ..errors import StoreError
from ..image import chain_ids
from ..layer import whiteout
from ..trees import remove_tree, walk
from .base import Snapshot

_INIT_LIST = "init-entries.json"     # in the work dir: what mount() added from the init dir
MARK = "trusted.pybuild.vfs-dir"     # on merged's directories while a step runs (never committed)


class VfsSnapshot(Snapshot):
    driver = "vfs"
    base: str = ""                   # the parent's full root (what `merged` started as)
    dir_inodes: dict | None = None   # merged's directories as cloned: path -> inode

    def mount(self) -> None:
        added = []
        for extra in self.extra_lowers:
            added += _overlay_entries(extra, self.merged)
        if added:
            # (With what an earlier run of a container added, if it runs again.)
            path = os.path.join(self.work, _INIT_LIST)
            try:
                with open(path, encoding="utf-8") as f:
                    added = sorted(set(json.load(f)) | set(added))
            except FileNotFoundError:
                pass
            with open(path, "w", encoding="utf-8") as f:
                json.dump(added, f)
        linux.mount(self.merged, self.merged, None, linux.MS_BIND)

    def unmount(self) -> None:
        linux.umount(self.merged)

    @property
    def direct_dir(self) -> str:
        return self.merged

    def finish(self) -> None:
        write_changes(self.work, self.base, self.merged, self.upper, self.dir_inodes or {})


def write_changes(work: str, base: str, merged: str, upper: str, dir_inodes: dict) -> None:
    """`changes()` of a snapshot, leaving out the init entries its mount() recorded in `work`
    (mount points the sandbox needed, not changes of the step)."""
    try:
        with open(os.path.join(work, _INIT_LIST), encoding="utf-8") as f:
            skip = set(json.load(f))
    except FileNotFoundError:
        skip = set()
    changes(base, merged, upper, skip, dir_inodes)


def prepare(store, diff_ids: list[str], workdir: str) -> VfsSnapshot:
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    snap = VfsSnapshot(store.root, [], os.path.join(workdir, "upper"), os.path.join(workdir, "work"),
                       os.path.join(workdir, "merged"))
    for d in (snap.upper, snap.work):
        os.mkdir(d, 0o755)
    snap.base = full_root(store, diff_ids, workdir)
    # Hard links are not kept: as on overlay, writing to one name of a lower file must not
    # change its other names.
    clone_tree(snap.base, snap.merged, keep_links=False)
    snap.dir_inodes = _mark_dirs(snap.merged)
    return snap


def reopen(store, workdir: str) -> VfsSnapshot:
    """The copy a container's earlier run left in `workdir`, as it left it (`pybuild start`)."""
    return VfsSnapshot(store.root, [], os.path.join(workdir, "upper"),
                       os.path.join(workdir, "work"), os.path.join(workdir, "merged"))


def _mark_dirs(merged: str) -> dict:
    """Tag every directory with its own path (an xattr), so that one removed and made again
    during the step is told apart even when the filesystem reuses its inode number."""
    out = {}
    for d, _dirs, _files in walk(merged):
        rel = os.path.relpath(d, merged)
        out[rel] = os.lstat(d).st_ino
        try:
            os.setxattr(d, MARK, rel.encode())
        except OSError:
            pass              # no trusted xattrs here: the inode number is all there is
    return out


def _replaced(path: str, rel: str, st, dir_inodes: dict) -> bool:
    """Was this directory removed and made again since the snapshot was cloned?"""
    try:
        return os.getxattr(path, MARK) != rel.encode()
    except OSError as e:
        if e.errno == errno.ENODATA:
            return True                          # not marked: made during the step
    # No trusted xattrs on this filesystem: the inode number is all there is (when known).
    return rel in dir_inodes and dir_inodes[rel] != st.st_ino


def full_root(store, diff_ids: list[str], workdir: str) -> str:
    """The full root filesystem of `diff_ids`, built (and kept) from the nearest one kept below."""
    if not diff_ids:
        empty = os.path.join(workdir, "empty-root")
        os.makedirs(empty, 0o755, exist_ok=True)
        return empty
    chains = chain_ids(diff_ids)
    if store.vfs_roots.has(chains[-1]):
        return store.vfs_roots.diff_dir(chains[-1])
    start = len(chains) - 1
    while start > 0 and not store.vfs_roots.has(chains[start - 1]):
        start -= 1
    for i in range(start, len(chains)):
        staging = os.path.join(store.tmp, f"vfs-{chains[i][7:19]}-{os.getpid()}-{os.urandom(3).hex()}")
        try:
            if i == 0:
                os.mkdir(staging, 0o755)
            else:
                clone_tree(store.vfs_roots.diff_dir(chains[i - 1]), staging)
            apply_diff(store.layers.diff_dir(chains[i]), staging)
            store.vfs_roots.install(chains[i], staging, {"chain": chains[i]}, store.tmp)
        finally:
            if os.path.lexists(staging):
                remove_tree(staging, ignore_errors=True)
    return store.vfs_roots.diff_dir(chains[-1])


def clone_tree(src: str, dest: str, keep_links: bool = True) -> None:
    """A full copy of `src` at `dest` (owners, modes, times, xattrs, and hard links unless not
    `keep_links`)."""
    links = [] if keep_links else ["--no-preserve=links"]
    p = subprocess.run(["cp", "-a", *links, "--reflink=auto", "--no-target-directory", src, dest],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise StoreError(f"vfs driver: cannot copy {src}: {p.stderr.strip()}")


def apply_diff(diff_dir: str, root: str) -> None:
    """Apply a layer's diff dir (overlay format) to a full root: whiteouts delete, opaque
    directories replace, everything else is copied over."""
    for dirpath, dirnames, filenames in walk(diff_dir):
        rel = os.path.relpath(dirpath, diff_dir)
        target_dir = root if rel == "." else os.path.join(root, rel)
        if rel != "." and whiteout.is_opaque(dirpath, os.listxattr(dirpath)):
            remove_tree(target_dir)
        for name in dirnames + filenames:
            src = os.path.join(dirpath, name)
            target = os.path.join(target_dir, name)
            st = os.lstat(src)
            if whiteout.is_whiteout(st, _xattr_names(src, st)):
                remove_tree(target)
            elif os.path.lexists(target) and (stat.S_ISDIR(st.st_mode) !=
                                              stat.S_ISDIR(os.lstat(target).st_mode)):
                remove_tree(target)
    p = subprocess.run(["cp", "-a", "--reflink=auto", "--no-target-directory", diff_dir, root],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise StoreError(f"vfs driver: cannot apply {diff_dir}: {p.stderr.strip()}")
    # The copy brought the markers along: take them out of the full root.
    for dirpath, dirnames, filenames in walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                os.unlink(path)
        for name in whiteout.OPAQUE_XATTRS:
            try:
                os.removexattr(dirpath, name)
            except OSError:
                pass


def _xattr_names(path: str, st) -> list[str]:
    if stat.S_ISLNK(st.st_mode):
        return []
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []


def _overlay_entries(extra: str, merged: str) -> list[str]:
    """Copy the init dir's entries (mount points) into `merged`, leaving their parents' times as
    they were; returns their relative paths."""
    added = []
    for dirpath, dirnames, filenames in walk(extra):
        rel_dir = os.path.relpath(dirpath, extra)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            target = os.path.join(merged, rel)
            if os.path.lexists(target):
                continue
            parent = os.path.dirname(target)
            times = os.lstat(parent)
            src_st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(src_st.st_mode):
                os.mkdir(target, stat.S_IMODE(src_st.st_mode))
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                 stat.S_IMODE(src_st.st_mode)))
            os.utime(parent, ns=(times.st_atime_ns, times.st_mtime_ns), follow_symlinks=False)
            added.append(rel)
    return added


# ---- working out what a step changed --------------------------------------------------------

def _signature(path: str, st) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    extra = None
    if stat.S_ISLNK(st.st_mode):
        extra = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        extra = st.st_rdev
    xattrs = {}
    for name in _xattr_names(path, st):
        if name == MARK:
            continue
        try:
            xattrs[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_mtime_ns, extra,
            tuple(sorted(xattrs.items())))


def changes(base: str, merged: str, upper: str, skip: set[str], dir_inodes: dict) -> None:
    """Write into `upper` (overlay format) what differs between `base` and `merged`.

    A directory of `merged` whose inode is not the one it was cloned with was removed and
    made again: as on overlay it becomes opaque, with all of its contents.
    """
    linked: set[int] = set()
    _compare(base, merged, upper, skip, dir_inodes, linked)
    if linked:
        _bring_other_names(merged, upper, linked)
    # Filling a directory of the upper dir moved its mtime: give each back the merged one's.
    for dirpath, _dirs, _files in walk(upper, topdown=False):
        rel = os.path.relpath(dirpath, upper)
        if rel != ".":
            st = os.lstat(os.path.join(merged, rel))
            os.utime(dirpath, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _compare(base: str, merged: str, upper: str, skip: set[str], dir_inodes: dict,
             linked: set[int]) -> None:
    """Put in `upper` what differs between `base` and `merged`, one directory at a time
    (a list of directories still to compare, not recursion: any depth)."""
    pending = [""]
    while pending:
        rel = pending.pop()
        b_dir, m_dir = os.path.join(base, rel), os.path.join(merged, rel)
        try:
            before = set(os.listdir(b_dir))
        except (FileNotFoundError, NotADirectoryError):
            before = set()
        now = set(os.listdir(m_dir))
        for name in sorted(now | before):
            path = f"{rel}/{name}" if rel else name
            if path in skip:
                continue
            m_path, b_path = os.path.join(merged, path), os.path.join(base, path)
            if name not in now:
                _ensure_dir(merged, upper, rel)
                os.mknod(os.path.join(upper, path), stat.S_IFCHR | 0o000, 0)
                continue
            m_st = os.lstat(m_path)
            b_st = os.lstat(b_path) if name in before else None
            same = b_st is not None and _signature(m_path, m_st) == _signature(b_path, b_st)
            if stat.S_ISDIR(m_st.st_mode):
                was_dir = b_st is not None and stat.S_ISDIR(b_st.st_mode)
                if was_dir and _replaced(m_path, path, m_st, dir_inodes):
                    _copy_subtree(merged, upper, path)
                    whiteout.make_opaque(os.path.join(upper, path))
                    continue
                if not same:
                    _ensure_dir(merged, upper, path)
                if was_dir:
                    pending.append(path)
                else:
                    _copy_subtree(merged, upper, path)
            elif not same:
                _ensure_dir(merged, upper, rel)
                os.link(m_path, os.path.join(upper, path), follow_symlinks=False)
                if stat.S_ISREG(m_st.st_mode) and m_st.st_nlink > 1:
                    linked.add(m_st.st_ino)


def _bring_other_names(merged: str, upper: str, inodes: set[int]) -> None:
    """A file hard-linked during the step: overlay copied up every name of it (link() copies
    its source up), so all of them go in the layer, as links of one file."""
    for dirpath, _dirs, files in walk(merged):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_ino in inodes and stat.S_ISREG(st.st_mode):
                rel = os.path.relpath(path, merged)
                if not os.path.lexists(os.path.join(upper, rel)):
                    _ensure_dir(merged, upper, os.path.dirname(rel))
                    os.link(path, os.path.join(upper, rel), follow_symlinks=False)


def _copy_subtree(merged: str, upper: str, rel: str) -> None:
    """A directory that is new (or replaced a non-directory): all of it goes in."""
    pending = [rel]
    while pending:
        top = pending.pop()
        _ensure_dir(merged, upper, top)
        for name in sorted(os.listdir(os.path.join(merged, top))):
            path = f"{top}/{name}"
            st = os.lstat(os.path.join(merged, path))
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
            else:
                os.link(os.path.join(merged, path), os.path.join(upper, path),
                        follow_symlinks=False)


def _ensure_dir(merged: str, upper: str, rel: str) -> None:
    """`rel` (and its parents) as directories in `upper`, with the metadata they have in merged."""
    missing = []
    while rel and not (os.path.isdir(os.path.join(upper, rel))
                       and not os.path.islink(os.path.join(upper, rel))):
        missing.append(rel)
        rel = os.path.dirname(rel)
    for rel in reversed(missing):
        _make_dir_like(merged, upper, rel)


def _make_dir_like(merged: str, upper: str, rel: str) -> None:
    target = os.path.join(upper, rel)
    src = os.path.join(merged, rel)
    st = os.lstat(src)
    os.mkdir(target, 0o700)
    os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    for name in _xattr_names(src, st):
        if name == MARK:
            continue
        try:
            os.setxattr(target, name, os.getxattr(src, name))
        except OSError:
            pass
