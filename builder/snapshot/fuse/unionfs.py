"""A union filesystem over FUSE: read-only lower dirs, one upper dir, overlayfs's semantics.

It writes its changes into the upper dir exactly as the kernel overlay
(mounted `redirect_dir=off,metacopy=off,index=off`) would, so that a layer
committed from it is the same as one committed from the overlay driver:

* the merged view of a directory is the union of that directory in the
  upper dir and in every lower dir, topmost first, down to the first layer
  where it is opaque (xattr `trusted.overlay.opaque=y`) or is not a
  directory; a 0/0 character device (a whiteout) hides a name below it;
* the first change to a lower entry copies it up (contents, mode, owner,
  times, xattrs), after copying up its parent directories, whose times are
  then put back as they were;
* deleting a name that a lower dir has leaves a whiteout; a directory made
  where one was deleted is opaque;
* renaming a directory that has lower parts fails with EXDEV (as overlay
  does without redirect_dir), so `mv` copies it instead.

Everything is done relative to directory file descriptors opened before the
server started: the sandbox pivots its root into this very filesystem, so an
absolute path would lead back into it. Entries are identified by their path
in the merged view; inode numbers are handed out per path.
"""

from __future__ import annotations

import errno
import os
import stat
import traceback
from functools import wraps

import pyfuse3

OPAQUE_NAMES = (b"trusted.overlay.opaque", b"user.overlay.opaque")
HIDDEN_XATTRS = (b"trusted.overlay.", b"user.overlay.")
TIMEOUT = 3600.0          # every change goes through us: the kernel may keep what we told it
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
UPPER = 0                 # layer index of the upper dir; lower dirs are 1..n, topmost first


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


FLUSH_NOT_NEEDED = _kernel_at_least(5, 14)   # "fuse: always flush dirty data on close(2)"


def _errors(fn):
    """Handlers may raise only FUSEError: an OSError becomes its errno."""
    @wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:          # a bug: one failed request, not a dead filesystem
            traceback.print_exc()
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _rel(path: bytes) -> bytes:
    return path if path else b"."


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _is_whiteout(st) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class UnionFS(pyfuse3.Operations):
    enable_writeback_cache = True
    supports_dot_lookup = False

    def __init__(self, upper_fd: int, lower_fds: list[int], opaque_xattr: bytes):
        super().__init__()
        self.opaque_xattr = opaque_xattr          # trusted.overlay.opaque, or user.* (userns)
        self.fds = [upper_fd] + list(lower_fds)     # layer index -> dir fd
        self.path_of: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self.inode_of: dict[bytes, int] = {b"": pyfuse3.ROOT_INODE}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        # merged dir -> lower layers (indices) where it is a directory that shows through
        self.lower_dirs: dict[bytes, tuple[int, ...]] = {b"": tuple(range(1, len(self.fds)))}
        self.open_dirs: dict[int, tuple[bytes, list]] = {}
        self.orphans: set[int] = set()            # inodes whose last name was removed
        self.names: dict[int, set[bytes]] = {}    # inode -> its names, when it has several
        self.by_file: dict[tuple[int, int], int] = {}   # upper (dev, ino) of a linked file
        # Inodes known to have no xattrs: the kernel asks for security.capability before every
        # write(), and a file made here has none until setxattr says otherwise.
        self.no_xattrs: set[int] = set()
        self.inode_of_fd: dict[int, int] = {}     # open file handle -> inode
        self.next_dir_handle = 1

    # ---- layers -------------------------------------------------------------------------

    def _lstat(self, layer: int, path: bytes):
        try:
            return os.stat(_rel(path), dir_fd=self.fds[layer], follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _opaque(self, layer: int, path: bytes) -> bool:
        try:
            fd = os.open(_rel(path), os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW,
                         dir_fd=self.fds[layer])
        except OSError:
            return False
        try:
            for name in OPAQUE_NAMES:
                try:
                    if os.getxattr(fd, name) == b"y":
                        return True
                except OSError:
                    pass
            return False
        finally:
            os.close(fd)

    def _find(self, path: bytes):
        """(layer, stat) of the entry the merged view shows at `path`, or None."""
        if not path:
            return UPPER, os.stat(self.fds[UPPER])
        parent = path.rpartition(b"/")[0]
        st = self._lstat(UPPER, path)
        if st is not None:
            return None if _is_whiteout(st) else (UPPER, st)
        for layer in self._lower_dirs(parent):
            st = self._lstat(layer, path)
            if st is not None:
                return None if _is_whiteout(st) else (layer, st)
        return None

    def _lower_dirs(self, path: bytes) -> tuple[int, ...]:
        """The lower layers in which the merged directory `path` has parts, topmost first."""
        found = self.lower_dirs.get(path)
        if found is not None:
            return found
        parent = path.rpartition(b"/")[0]
        out: list[int] = []
        upper = self._lstat(UPPER, path)
        if upper is None or (stat.S_ISDIR(upper.st_mode) and not self._opaque(UPPER, path)):
            for layer in self._lower_dirs(parent):
                st = self._lstat(layer, path)
                if st is None:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    break                   # a whiteout or a non-directory ends the union
                out.append(layer)
                if self._opaque(layer, path):
                    break
        result = tuple(out)
        self.lower_dirs[path] = result
        return result

    def _forget_below(self, path: bytes) -> None:
        """Drop what is known about `path` and under it (it was replaced or removed)."""
        prefix = path + b"/"
        for p in [p for p in self.lower_dirs if p == path or p.startswith(prefix)]:
            del self.lower_dirs[p]

    def _in_lower(self, path: bytes) -> bool:
        """Does any lower layer show something at `path` (so removing it needs a whiteout)?"""
        parent = path.rpartition(b"/")[0]
        for layer in self._lower_dirs(parent):
            st = self._lstat(layer, path)
            if st is not None:
                return not _is_whiteout(st)
        return False

    # ---- copy-up --------------------------------------------------------------------------

    def _copy_up(self, path: bytes) -> os.stat_result:
        """Make `path` (and its parents) real entries of the upper dir; its upper stat."""
        if not path:
            return os.stat(self.fds[UPPER])
        found = self._find(path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        layer, st = found
        if layer == UPPER:
            return st
        parent = path.rpartition(b"/")[0]
        parent_st = self._copy_up(parent)
        up = self.fds[UPPER]
        src = self.fds[layer]
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(path, 0o700, dir_fd=up)
        elif stat.S_ISREG(st.st_mode):
            self._copy_file(src, path, up, st)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(path, dir_fd=src), path, dir_fd=up)
        else:
            os.mknod(path, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=up)
        os.chown(path, st.st_uid, st.st_gid, dir_fd=up, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, mode, dir_fd=up)
            self._copy_xattrs(src, path, up)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=up, follow_symlinks=False)
        self._restore_times(parent, parent_st)
        return os.stat(path, dir_fd=up, follow_symlinks=False)

    def _copy_file(self, src_fd: int, path: bytes, up: int, st) -> None:
        fin = os.open(path, os.O_RDONLY | _NOFOLLOW, dir_fd=src_fd)
        try:
            fout = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600,
                           dir_fd=up)
            try:
                left = st.st_size
                while left > 0:
                    n = os.copy_file_range(fin, fout, min(left, 1 << 30))
                    if n == 0:
                        break
                    left -= n
            finally:
                os.close(fout)
        finally:
            os.close(fin)

    def _copy_xattrs(self, src_fd: int, path: bytes, up: int) -> None:
        try:
            fin = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=src_fd)
        except OSError:
            return
        try:
            names = os.listxattr(fin)
            if not names:
                return
            fout = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=up)
            try:
                for name in names:
                    if name.encode().startswith(HIDDEN_XATTRS):
                        continue
                    os.setxattr(fout, name, os.getxattr(fin, name))
            finally:
                os.close(fout)
        except OSError:
            pass
        finally:
            os.close(fin)

    def _restore_times(self, path: bytes, st) -> None:
        os.utime(_rel(path), ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=self.fds[UPPER],
                 follow_symlinks=False)

    def _prepare_name(self, parent: bytes, name: bytes) -> tuple[bytes, bool]:
        """Before creating `name` in `parent`: the parent in the upper dir, no whiteout in the way.
        Returns (path, whether a whiteout was there: the new entry replaces a deleted one)."""
        path = _join(parent, name)
        found = self._find(path)
        if found is not None:
            raise FileExistsError(errno.EEXIST, "exists")
        self._copy_up(parent)
        if self._lstat(UPPER, path) is None:
            return path, False
        os.unlink(path, dir_fd=self.fds[UPPER])        # a whiteout
        return path, True

    def _owner(self, parent: bytes, path: bytes, ctx) -> None:
        """New entries belong to the caller, or to the group of a setgid parent (the kernel has
        already given a new directory there the setgid bit, as on any filesystem)."""
        up = self.fds[UPPER]
        parent_st = os.stat(_rel(parent), dir_fd=up)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else ctx.gid
        st = os.stat(path, dir_fd=up, follow_symlinks=False)
        os.chown(path, ctx.uid, gid, dir_fd=up, follow_symlinks=False)
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(st.st_mode):
            os.chmod(path, stat.S_IMODE(st.st_mode), dir_fd=up)    # chown cleared them

    # ---- inodes and attributes ----------------------------------------------------------

    def _inode(self, path: bytes, st=None, layer: int | None = None) -> int:
        """The inode number of `path`. Names of one file of the upper dir (hard links made
        during the step) share one, or the kernel would cache their pages apart."""
        ino = self.inode_of.get(path)
        if ino is not None:
            return ino
        key = None
        if layer == UPPER and st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            ino = self.by_file.get(key)
            if ino is not None and ino in self.path_of:
                self.inode_of[path] = ino
                self.names.setdefault(ino, {self.path_of[ino]}).add(path)
                return ino
        ino = self.next_inode
        self.next_inode += 1
        self.inode_of[path] = ino
        self.path_of[ino] = path
        if key is not None:
            self.by_file[key] = ino
        return ino

    def _path(self, inode: int) -> bytes:
        try:
            return self.path_of[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attrs(self, path: bytes, st, layer: int | None = None) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(path, st, layer)
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        if layer is not None and stat.S_ISDIR(st.st_mode) and \
                (layer == UPPER) + len(self._lower_dirs(path)) > 1:
            a.st_nlink = 1             # a merged directory, as overlayfs counts it
        return a

    def _entry(self, path: bytes) -> pyfuse3.EntryAttributes:
        found = self._find(path)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(path, found[1], found[0])

    def _unname(self, path: bytes) -> None:
        """`path` no longer names its inode; an inode left without a name is an orphan."""
        ino = self.inode_of.pop(path, None)
        if ino is None:
            return
        others = self.names.get(ino, set()) - {path}
        if others:
            self.names[ino] = others
            if self.path_of.get(ino) == path:
                self.path_of[ino] = next(iter(others))
            return
        self.names.pop(ino, None)
        self.path_of.pop(ino, None)
        self.orphans.add(ino)              # still usable through its open file handles

    def _rename_paths(self, old: bytes, new: bytes) -> None:
        """After a rename: the inodes under `old` now live under `new`."""
        self._unname(new)
        prefix = old + b"/"
        for path in [p for p in self.inode_of if p == old or p.startswith(prefix)]:
            ino = self.inode_of.pop(path)
            moved = new + path[len(old):]
            self.inode_of[moved] = ino
            if self.path_of.get(ino) == path:
                self.path_of[ino] = moved
            if ino in self.names:
                self.names[ino] = (self.names[ino] - {path}) | {moved}
        self._forget_below(old)
        self._forget_below(new)

    def _drop_path(self, path: bytes) -> None:
        self._unname(path)
        self._forget_below(path)

    def _orphan_fd(self, inode: int) -> int:
        for fd, ino in self.inode_of_fd.items():
            if ino == inode:
                return fd
        raise pyfuse3.FUSEError(errno.ENOENT)

    def _orphan_attrs(self, inode: int, fd: int) -> pyfuse3.EntryAttributes:
        a = self._attrs(b"", os.fstat(fd))
        a.st_ino = inode
        return a

    # ---- FUSE operations ----------------------------------------------------------------

    @_errors
    def lookup(self, parent_inode, name, ctx=None):
        path = _join(self._path(parent_inode), name)
        found = self._find(path)
        if found is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0              # cached by the kernel until we create the name
            negative.entry_timeout = TIMEOUT
            return negative
        return self._attrs(path, found[1], found[0])

    async def forget(self, inode_list):
        pass                                  # the server lives for one step: keep everything

    @_errors
    def getattr(self, inode, ctx=None):
        if inode in self.orphans:
            return self._orphan_attrs(inode, self._orphan_fd(inode))
        return self._entry(self._path(inode))

    @_errors
    def setattr(self, inode, attr, fields, fh, ctx):
        if inode in self.orphans:
            try:
                fd = fh if fh is not None else self._orphan_fd(inode)
            except pyfuse3.FUSEError:
                # The kernel writing back the times of a file that is gone: nothing to keep.
                attr.st_ino = inode
                return attr
            if fields.update_size:
                os.ftruncate(fd, attr.st_size)
            if fields.update_mode:
                os.chmod(fd, stat.S_IMODE(attr.st_mode))
            return self._orphan_attrs(inode, fd)
        path = self._path(inode)
        self._copy_up(path)
        up = self.fds[UPPER]
        rp = _rel(path)            # (the root is ".")
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                fd = os.open(rp, os.O_WRONLY | _NOFOLLOW, dir_fd=up)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if fields.update_uid or fields.update_gid:
            os.chown(rp, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, dir_fd=up, follow_symlinks=False)
        if fields.update_mode:
            os.chmod(rp, stat.S_IMODE(attr.st_mode), dir_fd=up)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(rp, dir_fd=up, follow_symlinks=False)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(rp, ns=(atime, mtime), dir_fd=up, follow_symlinks=False)
        return self._attrs(path, os.stat(rp, dir_fd=up, follow_symlinks=False), UPPER)

    @_errors
    def readlink(self, inode, ctx):
        path = self._path(inode)
        layer, _ = self._find(path) or (None, None)
        if layer is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return os.fsencode(os.readlink(path, dir_fd=self.fds[layer]))

    @_errors
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        parent = self._path(parent_inode)
        path, _ = self._prepare_name(parent, name)
        os.mknod(path, stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~ctx.umask), rdev,
                 dir_fd=self.fds[UPPER])
        self._owner(parent, path, ctx)
        return self._entry(path)

    @_errors
    def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._path(parent_inode)
        path, replaced = self._prepare_name(parent, name)
        os.mkdir(path, stat.S_IMODE(mode) & ~ctx.umask, dir_fd=self.fds[UPPER])
        self._forget_below(path)
        if replaced or self._in_lower(path):
            # A directory made where a lower one was deleted must not show its old contents.
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=self.fds[UPPER])
            try:
                os.setxattr(fd, self.opaque_xattr, b"y")
            finally:
                os.close(fd)
        self._owner(parent, path, ctx)
        return self._entry(path)

    @_errors
    def symlink(self, parent_inode, name, target, ctx):
        parent = self._path(parent_inode)
        path, _ = self._prepare_name(parent, name)
        os.symlink(target, path, dir_fd=self.fds[UPPER])
        self._owner(parent, path, ctx)
        return self._entry(path)

    @_errors
    def link(self, inode, new_parent_inode, new_name, ctx):
        source = self._path(inode)
        self._copy_up(source)
        parent = self._path(new_parent_inode)
        path, _ = self._prepare_name(parent, new_name)
        os.link(source, path, src_dir_fd=self.fds[UPPER], dst_dir_fd=self.fds[UPPER],
                follow_symlinks=False)
        st = os.stat(path, dir_fd=self.fds[UPPER], follow_symlinks=False)
        self.by_file[(st.st_dev, st.st_ino)] = inode
        return self._attrs(path, st, UPPER)

    def _remove(self, parent_inode, name, is_dir: bool) -> None:
        parent = self._path(parent_inode)
        path = _join(parent, name)
        found = self._find(path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        if is_dir:
            if not stat.S_ISDIR(found[1].st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            if self._listing(path):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        elif stat.S_ISDIR(found[1].st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        needs_whiteout = self._in_lower(path)
        if needs_whiteout:
            self._copy_up(parent)
        up = self.fds[UPPER]
        if found[0] == UPPER:
            if is_dir:
                self._remove_upper_tree(path)
            else:
                os.unlink(path, dir_fd=up)
        if needs_whiteout:
            os.mknod(path, stat.S_IFCHR | 0o000, 0, dir_fd=up)
        self._drop_path(path)

    def _remove_upper_tree(self, path: bytes) -> None:
        """An empty merged directory's upper part: it can only hold whiteouts."""
        up = self.fds[UPPER]
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=up)
        try:
            for entry in os.scandir(fd):
                os.unlink(entry.name, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(path, dir_fd=up)

    @_errors
    def unlink(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, is_dir=False)

    @_errors
    def rmdir(self, parent_inode, name, ctx):
        self._remove(parent_inode, name, is_dir=True)

    @_errors
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        old = _join(self._path(parent_inode_old), name_old)
        new = _join(self._path(parent_inode_new), name_new)
        found = self._find(old)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        target = self._find(new)
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise FileExistsError(errno.EEXIST, "exists")
        is_dir = stat.S_ISDIR(found[1].st_mode)
        if is_dir and (self._lower_dirs(old) or found[0] != UPPER or self._in_lower(new)):
            raise OSError(errno.EXDEV, "a directory with lower parts cannot be renamed")
        if target is not None:
            if stat.S_ISDIR(target[1].st_mode):
                if not is_dir:
                    raise IsADirectoryError(errno.EISDIR, "is a directory")
                if self._listing(new):
                    raise OSError(errno.ENOTEMPTY, "directory not empty")
            elif is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        old_in_lower = self._in_lower(old)
        self._copy_up(old)
        new_parent = new.rpartition(b"/")[0]
        self._copy_up(new_parent)
        up = self.fds[UPPER]
        if target is not None and target[0] == UPPER and stat.S_ISDIR(target[1].st_mode):
            self._remove_upper_tree(new)
        elif self._lstat(UPPER, new) is not None and target is None:
            os.unlink(new, dir_fd=up)                 # a whiteout: replaced by the entry
        os.rename(old, new, src_dir_fd=up, dst_dir_fd=up)
        if old_in_lower:
            os.mknod(old, stat.S_IFCHR | 0o000, 0, dir_fd=up)
        self._rename_paths(old, new)

    @_errors
    def open(self, inode, flags, ctx):
        path = self._path(inode)
        if flags & (os.O_WRONLY | os.O_RDWR):
            self._copy_up(path)
            layer = UPPER
            # The writeback cache may read pages of a file opened for writing, and appends
            # arrive as writes at an offset.
            flags = (flags & ~(os.O_WRONLY | os.O_APPEND)) | os.O_RDWR
        else:
            found = self._find(path)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "no such entry")
            layer = found[0]
        fd = os.open(path, (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | _NOFOLLOW,
                     dir_fd=self.fds[layer])
        self.inode_of_fd[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    @_errors
    def create(self, parent_inode, name, mode, flags, ctx):
        parent = self._path(parent_inode)
        path, _ = self._prepare_name(parent, name)
        flags = (flags & ~(os.O_WRONLY | os.O_APPEND)) | os.O_RDWR
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW,
                     stat.S_IMODE(mode) & ~ctx.umask, dir_fd=self.fds[UPPER])
        self._owner(parent, path, ctx)
        entry = self._attrs(path, os.fstat(fd), UPPER)
        self.inode_of_fd[fd] = entry.st_ino
        self.no_xattrs.add(entry.st_ino)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), entry

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def flush(self, fh):
        # ENOSYS once, and the kernel never sends FLUSH again (fc->no_flush): a close then
        # costs one request less (a fifth of a small file's). Since Linux 5.14 the kernel
        # still writes the writeback cache back on close and reports its errors there;
        # before, it skipped that too, so older kernels keep getting FLUSH.
        if FLUSH_NOT_NEEDED:
            raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh):
        self.inode_of_fd.pop(fh, None)
        os.close(fh)

    async def fsync(self, fh, datasync):
        pass        # the upper dir is thrown away or archived; nothing needs to reach the disk

    # ---- directories --------------------------------------------------------------------

    def _listing(self, path: bytes) -> list[tuple[bytes, object, int]]:
        """The merged directory's entries: (name, lstat of the entry shown, its layer)."""
        seen: dict[bytes, tuple] = {}
        hidden: set[bytes] = set()
        layers = ([UPPER] if self._lstat(UPPER, path) is not None else []) + \
            list(self._lower_dirs(path))
        for layer in layers:
            try:
                fd = os.open(_rel(path), os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW,
                             dir_fd=self.fds[layer])
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        name = os.fsencode(entry.name)
                        if name in seen or name in hidden:
                            continue
                        st = entry.stat(follow_symlinks=False)
                        if _is_whiteout(st):
                            hidden.add(name)
                        else:
                            seen[name] = (st, layer)
            finally:
                os.close(fd)
        return [(name, st, layer) for name, (st, layer) in sorted(seen.items())]

    @_errors
    def opendir(self, inode, ctx):
        path = self._path(inode)
        handle = self.next_dir_handle
        self.next_dir_handle += 1
        parent = path.rpartition(b"/")[0]
        dots = [(b".", path), (b"..", parent)]
        self.open_dirs[handle] = (path, [(name, self._entry(p)) for name, p in dots] +
                                  [(name, (st, layer)) for name, st, layer in self._listing(path)])
        return handle

    async def readdir(self, fh, start_id, token):
        path, entries = self.open_dirs[fh]
        for i in range(start_id, len(entries)):
            name, what = entries[i]
            attrs = what if i < 2 else self._attrs(_join(path, name), *what)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                return

    async def releasedir(self, fh):
        self.open_dirs.pop(fh, None)

    async def fsyncdir(self, fh, datasync):
        pass

    @_errors
    def statfs(self, ctx):
        sv = os.statvfs(self.fds[UPPER])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(sv, field))
        return out

    # ---- extended attributes ----------------------------------------------------------

    def _xattr_fd(self, layer: int, path: bytes) -> int:
        st = self._lstat(layer, path)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise OSError(errno.ENOTSUP, "xattrs only on files and directories")
        return os.open(_rel(path), os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=self.fds[layer])

    @_errors
    def getxattr(self, inode, name, ctx):
        if inode in self.no_xattrs or name.startswith(HIDDEN_XATTRS):
            raise pyfuse3.FUSEError(errno.ENODATA)
        path = self._path(inode)
        found = self._find(path)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            fd = self._xattr_fd(found[0], path)
        except OSError as e:
            raise pyfuse3.FUSEError(errno.ENODATA if e.errno == errno.ENOTSUP else e.errno)
        try:
            if not os.listxattr(fd):
                self.no_xattrs.add(inode)
                raise pyfuse3.FUSEError(errno.ENODATA)
            return os.getxattr(fd, name)
        finally:
            os.close(fd)

    @_errors
    def listxattr(self, inode, ctx):
        path = self._path(inode)
        found = self._find(path)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            fd = self._xattr_fd(found[0], path)
        except OSError:
            return []
        try:
            return [n.encode() for n in os.listxattr(fd)
                    if not n.encode().startswith(HIDDEN_XATTRS)]
        finally:
            os.close(fd)

    @_errors
    def setxattr(self, inode, name, value, ctx):
        if name.startswith(HIDDEN_XATTRS):
            raise pyfuse3.FUSEError(errno.EPERM)
        path = self._path(inode)
        self._copy_up(path)
        self.no_xattrs.discard(inode)
        fd = self._xattr_fd(UPPER, path)
        try:
            os.setxattr(fd, name, value)
        finally:
            os.close(fd)

    @_errors
    def removexattr(self, inode, name, ctx):
        if name.startswith(HIDDEN_XATTRS):
            raise pyfuse3.FUSEError(errno.ENODATA)
        path = self._path(inode)
        self._copy_up(path)
        fd = self._xattr_fd(UPPER, path)
        try:
            os.removexattr(fd, name)
        finally:
            os.close(fd)

    async def access(self, inode, mode, ctx):
        return True          # default_permissions: the kernel checks modes itself
