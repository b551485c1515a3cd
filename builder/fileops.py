"""What COPY and WORKDIR do to an image's files, run chrooted inside the step's snapshot.

These functions run in the child that `sandbox.run_in_root` forks: `/` is the
image's root, so a destination like `/app` or a symlink the image holds
(`/lib -> usr/lib`) resolves inside the image and nowhere else, and the
image's own /etc/passwd answers `--chown=name`. The build context is read
through a directory fd opened before the chroot. They must not import
anything: the host's Python library is not visible from inside.

The rules are BuildKit's: a directory source copies its contents; a file
goes into the destination when it ends with `/` or is an existing directory;
new parent directories are 0755 and owned like the copied files (root, or
`--chown`); an existing destination directory keeps its metadata while the
directories copied into it take the source's; files keep their mode and
mtime; hard links inside one COPY stay hard links.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import users
from .context import Source
from .sandbox import SetupError


@dataclass(frozen=True)
class CopyOp:
    sources: tuple[Source, ...]
    dest: str                       # absolute, inside the image
    dest_is_dir: bool               # the destination ends with / (or several sources)
    chown: str | None = None
    chmod: int | None = None


class CopyError(SetupError):
    """A COPY that cannot be carried out in this image (a file where a directory must go)."""


def copy_into_root(op: CopyOp, ctx_fd: int) -> None:
    uid, gid = users.chown_ids(op.chown, "/") if op.chown else (0, 0)
    copier = _Copier(ctx_fd, uid, gid, op.chmod)
    # Symlinks on the way are followed inside the image (we are chrooted), as BuildKit does.
    dest = os.path.realpath(op.dest)
    into_dir = op.dest_is_dir or len(op.sources) > 1 or _is_dir(dest)
    for src in op.sources:
        if src.is_dir:
            copier.copy_tree(src, dest)
        else:
            target = os.path.join(dest, src.name) if into_dir else dest
            copier.mkdir_parents(os.path.dirname(target) or "/")
            copier.copy_entry(src.entries[0], target)
    copier.finish()


def mkdir_workdir(path: str, user: str) -> None:
    """WORKDIR: create the directory (and parents) when missing, owned by the current USER."""
    path = os.path.realpath(path)
    if _is_dir(path):
        return
    who = users.exec_user(user, "/") if user else None
    _Copier(-1, who.uid if who else 0, who.gid if who else 0, None).mkdir_parents(path)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


class _Copier:
    def __init__(self, ctx_fd: int, uid: int, gid: int, chmod: int | None):
        self.ctx = ctx_fd
        self.uid = uid
        self.gid = gid
        self.chmod = chmod
        self.links: dict[tuple[int, int], str] = {}
        self.dir_times: list[tuple[str, int]] = []

    def mkdir_parents(self, path: str) -> None:
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

    def copy_tree(self, src: Source, dest: str) -> None:
        root = src.entries[0]
        if os.path.lexists(dest) and not _is_dir(dest):
            raise CopyError(f"cannot copy the directory {src.spec!r} to {dest}: it is not a "
                            "directory in the image")
        if not os.path.lexists(dest):
            self.mkdir_parents(os.path.dirname(dest) or "/")
            self.copy_entry(root, dest)
        for entry in src.entries[1:]:
            self.copy_entry(entry, dest.rstrip("/") + "/" + entry.rel)

    def copy_entry(self, e, target: str) -> None:
        st = e.st
        mode = st.st_mode
        perm = self.chmod if self.chmod is not None else stat.S_IMODE(mode)
        if stat.S_ISDIR(mode):
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                existing = None
            if existing is None:
                os.mkdir(target, 0o700)
            elif not stat.S_ISDIR(existing.st_mode):
                raise CopyError(f"cannot copy the directory {e.src!r} to {target}: a file "
                                "of that name is in the image")
            self._finish_entry(target, perm, e, is_link=False)
            self.dir_times.append((target, st.st_mtime_ns))
            return
        self._clear(target, e)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], target)
                return
            self._copy_file(e, target)
            if st.st_nlink > 1:
                self.links[key] = target
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(e.src, dir_fd=self.ctx), target)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, 0o600)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(target, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return
        self._finish_entry(target, perm, e, is_link=stat.S_ISLNK(mode))

    def _clear(self, target: str, e) -> None:
        try:
            existing = os.lstat(target)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(existing.st_mode):
            raise CopyError(f"cannot copy {e.src!r} to {target}: a directory of that name is "
                            "in the image")
        os.unlink(target)

    def _copy_file(self, e, target: str) -> None:
        src = os.open(e.src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.ctx)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o600)
            try:
                left = e.st.st_size
                offset = 0
                while left > 0:
                    n = os.sendfile(dst, src, offset, min(left, 1 << 30))
                    if n == 0:
                        break
                    offset += n
                    left -= n
                self._copy_xattrs(src, dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    @staticmethod
    def _copy_xattrs(src: int, dst: int) -> None:
        try:
            names = os.listxattr(src)
        except OSError:
            return
        for name in names:
            if name.startswith(("security.selinux", "trusted.overlay.", "user.overlay.")):
                continue
            try:
                os.setxattr(dst, name, os.getxattr(src, name))
            except OSError:
                pass

    def _finish_entry(self, target: str, perm: int, e, *, is_link: bool) -> None:
        os.chown(target, self.uid, self.gid, follow_symlinks=False)
        if not is_link:
            os.chmod(target, perm)
        os.utime(target, ns=(e.st.st_mtime_ns, e.st.st_mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        for path, mtime in reversed(self.dir_times):
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
