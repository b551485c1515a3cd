"""`pybuild cp`: files out of a container (`CONTAINER:SRC DEST`), and into a stopped one
(`SRC CONTAINER:DEST`), as `docker cp` takes them.

The way CI jobs take a build's artifacts out of an image: `pybuild create
--name out IMAGE`, `pybuild cp out:/app/dist ./dist`, `pybuild rm out`; and
give a container its config before `pybuild start -a` (copy_in: stopped
containers only, whose writable layer no mount is using).
The container's root (its writable layer over the image's layers, or the
image's layers alone if it never ran) is mounted read-only, in a child with
mounts of its own, and SRC is resolved in it as the container would resolve
it: a symlink on the way is followed inside the container's root, never to
the host's files. SRC itself, if it is a symlink, is copied as a symlink
(`-L`: what it points to, inside the root).

Docker's rules for where things go: a file goes to DEST, or into DEST if
DEST is a directory (a DEST ending in `/` must be one); a directory becomes
DEST if DEST does not exist, else goes into it, or only its contents with
SRC ending in `/.`. Modes, times, symlinks, hard links and xattrs are kept;
owners become the caller's (`-a`: kept from the container, by number, as
Docker documents it; Docker itself keeps only owners whose names this
machine also has, moby/moby#41727). DEST `-` writes a tar of SRC to
standard output, with the container's owners.

Nothing copied out follows a name of the destination tree: an entry whose
name is a symlink there replaces the symlink (a container cannot make
`docker cp` write through `dest/etc -> /etc`). Device files are made, and
set-user-ID and set-group-ID bits of files kept, only with `-a` (Docker
does both always): an image's `/dev/sda`-like node on this machine would
open this machine's device to whoever can read DEST, and its setuid program
owned by the caller (root) would be a setuid-root program of this machine.
"""

from __future__ import annotations

import os
import stat
import sys

from .cli_format import refuse_terminal
from .errors import PybuildError, UsageError
from .hashing import NOT_COPIED_XATTRS
from .sandbox import SetupError        # (raised in the child: the parent is told the reason)


class CopyOutError(PybuildError):
    """SRC is not in the container, or cannot go where DEST says."""
    exit_code = 1


def split_container_path(arg: str) -> tuple[str, str] | None:
    """(container, path) of `NAME:PATH`, or None for a host path (absolute, or ./ relative,
    or without a colon), as Docker tells them apart; an empty PATH is refused."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None
    name, _, path = arg.partition(":")
    if not path:
        raise UsageError("pybuild cp: the path in the container is empty",
                         hint="give it after the colon: CONTAINER:/path")
    return name, path


def copy_out(store, ref: str, src: str, dest: str, *, follow: bool = False,
             archive: bool = False) -> None:
    """Copy `src` of container `ref` to the host path `dest` ("-": a tar on stdout)."""
    from .containers import Containers
    containers = Containers(store)
    c = containers.get(ref)
    if dest == "-":
        refuse_terminal("redirect it: pybuild cp CONTAINER:SRC - > files.tar")
    if dest != "-":
        _check_dest(src, dest)
        dest = os.path.abspath(dest)        # (the child works from the store's dir)
    _in_root(store, containers, c, lambda root: _copy(root, src, dest, follow=follow,
                                                     archive=archive))


def export(store, ref: str, out_fd: int) -> None:
    """`pybuild export`: the container's whole root (its writable layer over its image) as a
    tar written to `out_fd`, entries named from the root as `docker export` names them."""
    from .containers import Containers
    containers = Containers(store)
    c = containers.get(ref)
    _in_root(store, containers, c, lambda root: _tar_to(out_fd, root, None))


def _in_root(store, containers, c, work) -> None:
    """Call `work(root)` in a child with mounts of its own, the container's root mounted
    read-only at `root`; what the child raises as SetupError comes back as CopyOutError."""
    from . import sandbox
    from .snapshot.overlay import lower_stack, mount_overlay
    with store.in_use(), store.tmpdir("cp") as tmp, containers.writable_layer(c) as upper:
        root = os.path.join(tmp, "root")
        os.mkdir(root)
        # (Relative to the store, as steps mount them: a deep image's stack fits one mount,
        # its oldest layers flattened beyond overlay's 500.)
        lowers = lower_stack(store, c.diff_ids, ahead=False)
        if os.path.isdir(upper):
            lowers.insert(0, upper)
        while len(lowers) < 2:               # (overlay needs two lower dirs to be read-only)
            empty = os.path.join(tmp, f"empty-{len(lowers)}")
            os.mkdir(empty)
            lowers.append(empty)

        def in_child() -> None:
            os.chdir(store.root)
            mount_overlay(root, lowers, readonly=True)
            work(root)
        try:
            sandbox.in_own_mounts(in_child)
        except SetupError as e:                  # (what the child said went wrong)
            raise CopyOutError(str(e), hint=e.hint) from None


def copy_in(store, src: str, ref: str, dest: str, *, follow: bool = False,
            archive: bool = False) -> None:
    """Copy the host path `src` to `dest` in container `ref`, which must not be running: its
    root (writable layer and image) is mounted in a child with mounts of its own, DEST is
    resolved inside it (its symlinks lead nowhere else), and what is written goes into the
    container's writable layer, copied up as a running container's writes are."""
    from .containers import Containers
    from .store import lock as store_lock
    containers = Containers(store)
    c = containers.get(ref)
    if src != "-" and not os.path.lexists(src):
        raise UsageError(f"pybuild cp: no such file or directory: {src}")
    if src == "-" and sys.stdin.isatty():
        raise UsageError("pybuild cp: - reads a tar from standard input, which is a terminal",
                         hint="pybuild cp - CONTAINER:/dir < files.tar")
    contents_only = src.endswith("/.")
    if src != "-":
        src = os.path.abspath(src) + ("/." if contents_only else "")   # (the child cds)
    lock = containers.lock_path(c)
    open(lock, "a").close()
    held = store_lock.try_lock(lock)
    c = containers._load(c.id) or c
    if held is None or c.running():
        if held is not None:
            os.close(held)
        raise UsageError(f"container {c.name} is running (or being started, or copied into): "
                         "pybuild cp writes into stopped containers only",
                         hint=f"stop it first (`pybuild stop {c.name}`)")
    try:
        _copy_into_stopped(store, c, src, dest, follow, archive)
    finally:
        os.close(held)


def _copy_into_stopped(store, c, src: str, dest: str, follow: bool, archive: bool) -> None:
    """copy_in's work, with the container's lock held: its snapshot mounted in a child."""
    from . import sandbox, snapshot
    with store.in_use():
        snap = snapshot.reopen(store, c.diff_ids, os.path.join(c.dir, "snap"))

        def in_child() -> None:
            snap.mount()
            try:
                _copy_into(snap.merged, src, dest, follow=follow, archive=archive)
            finally:
                snap.stop()
        try:
            sandbox.in_own_mounts(in_child)
        except SetupError as e:
            raise CopyOutError(str(e), hint=e.hint) from None


def _copy_into(root: str, src: str, dest: str, *, follow: bool, archive: bool) -> None:
    """In the child, with the container's root mounted (writable) at `root`: Docker's rules."""
    from . import paths
    if src == "-":
        _untar_into(paths.resolve_in_root(root, dest), dest)
        return
    st = os.stat(src) if follow else os.lstat(src)
    called = "" if src.endswith("/.") else os.path.basename(src.rstrip("/"))
    # (DEST: the container's symlinks followed inside its root; the result has none left.)
    target = _target(stat.S_ISDIR(st.st_mode), called, paths.resolve_in_root(root, dest), dest,
                     " in the container")
    if stat.S_ISDIR(st.st_mode):
        _copy_tree(os.path.realpath(src) if follow else src, target, archive, keep_setid=True)
        return
    w = _Writer(archive, keep_setid=True)
    w.entry(os.path.realpath(src) if follow else src, st, target)
    w.done()


def _untar_into(host: str, dest: str) -> None:
    """`pybuild cp - CONTAINER:DEST`: the tar (plain or compressed) on standard input, into the
    directory DEST, by the extractor that keeps every entry inside it (layer/extract.py), with
    the owners, modes and times the tar gives."""
    from .layer import extract
    if not os.path.isdir(host) or os.path.islink(host):
        raise SetupError(f"{dest} is not a directory in the container (a tar on standard "
                         "input is extracted into one)")
    try:
        extract.extract(sys.stdin.buffer, host, what="the tar on standard input",
                        whiteouts=False, compressed=True)
    except PybuildError as e:
        raise SetupError(str(e), getattr(e, "hint", None)) from None


def _check_dest(src: str, dest: str) -> None:
    """Docker's refusals that need only the host's side: checked before anything is mounted."""
    parent = os.path.dirname(dest.rstrip("/")) or "."
    if os.path.exists(dest) and not (os.path.isdir(dest) or os.path.isfile(dest)):
        # (/dev/null, /dev/stdout, a FIFO: replacing it with the file would be a disaster)
        raise UsageError(f"{dest} is neither a directory nor a file",
                         hint="write a tar to standard output with - instead")
    if not os.path.exists(dest):
        if dest.endswith("/"):
            raise UsageError(f"destination directory {dest!r} must exist",
                             hint="create it first, or drop the trailing /")
        if not os.path.isdir(parent):
            raise UsageError(f"{parent!r} is not a directory: the destination's parent must exist")


def _copy(root: str, src: str, dest: str, *, follow: bool, archive: bool) -> None:
    """In the child, with the container's root mounted at `root`."""
    from . import paths
    contents_only = src.endswith("/.") or src == "."
    parent, _, name = src.rstrip("/").rpartition("/")
    if follow or contents_only or name in ("", ".", ".."):
        host = paths.resolve_in_root(root, src)
    else:                              # (SRC itself, if a symlink, is copied as one)
        host = os.path.join(paths.resolve_in_root(root, parent), name)
    try:
        st = os.lstat(host)
    except (FileNotFoundError, NotADirectoryError):
        raise SetupError(f"could not find the file {src} in the container") from None
    # What it is called where it goes: SRC's own last name (a symlink's, with -L), none for
    # `/` or `dir/.` (their contents go).
    called = "" if contents_only or name in ("", ".", "..") else name
    if dest == "-":
        _tar_to(sys.stdout.fileno(), host, called or ".")
        return
    if not stat.S_ISDIR(st.st_mode) and src.endswith("/"):
        raise SetupError(f"{src} is not a directory in the container")
    target = _target(stat.S_ISDIR(st.st_mode), called, dest, dest, "")
    if stat.S_ISDIR(st.st_mode):
        _copy_tree(host, target, archive)
        return
    w = _Writer(archive)
    w.entry(host, st, target)
    w.done()


def _target(is_dir: bool, called: str, path: str, shown: str, where: str) -> str:
    """Where SRC goes by Docker's rules, `path` being DEST (`shown` as it was written, in
    `where`: "" here, " in the container"): into it if it is a directory (as `called`, or
    its contents when that is empty), else `path` itself, whose directory must exist."""
    if os.path.isdir(path):
        return os.path.join(path, called) if called else path
    if is_dir and os.path.lexists(path):
        raise SetupError(f"cannot copy a directory to the file {shown}{where}")
    if not is_dir and shown.endswith("/"):
        raise SetupError(f"the directory {shown} is not{where or ' there'}")
    if not os.path.isdir(os.path.dirname(path.rstrip("/"))):
        raise SetupError(f"the directory {os.path.dirname(shown.rstrip('/')) or '/'} is "
                         f"not{where or ' there'}")
    return path


def _copy_tree(top: str, target: str, archive: bool, keep_setid: bool = False) -> None:
    """The directory `top` as `target`, merged into what is there (a directory stays; anything
    else of the same name is replaced)."""
    w = _Writer(archive, keep_setid)
    w.entry(top, os.lstat(top), target)
    stack = [(top, target)]
    dir_times = []
    while stack:
        src_dir, dst_dir = stack.pop()
        with os.scandir(src_dir) as it:
            children = sorted((e.name for e in it))
        for child in children:
            s, d = os.path.join(src_dir, child), os.path.join(dst_dir, child)
            st = os.lstat(s)
            w.entry(s, st, d)
            if stat.S_ISDIR(st.st_mode):
                stack.append((s, d))
        dir_times.append((dst_dir, os.lstat(src_dir)))
    for path, st in dir_times:          # (after their contents were written)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    w.done()


class _Writer:
    """Writes one entry at a path (on the host, or in a container's mounted root), keeping its
    metadata: never through a symlink already there, owners the caller's unless `archive`,
    set-id bits only with `keep_setid` (copying in) or `archive`, device files only with
    `archive`."""

    def __init__(self, archive: bool, keep_setid: bool = False):
        self.archive = archive
        self.keep_setid = keep_setid or archive
        self.owner = (os.getuid(), os.getgid())
        self.links: dict[tuple[int, int], str] = {}
        self.devices_skipped = 0

    def done(self) -> None:
        if self.devices_skipped:
            print(f"pybuild cp: {self.devices_skipped} device file(s) not copied (-a copies "
                  "them)", file=sys.stderr, flush=True)

    def entry(self, src: str, st: os.stat_result, target: str) -> None:
        mode = st.st_mode
        existing = _lstat(target)
        if existing is not None and not (stat.S_ISDIR(mode) and stat.S_ISDIR(existing.st_mode)):
            if stat.S_ISDIR(existing.st_mode):
                raise SetupError(f"cannot overwrite the directory {target} with a non-directory")
            os.unlink(target)          # (a symlink there is replaced, never followed)
        if stat.S_ISDIR(mode):
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(target, 0o700)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.links:
                os.link(self.links[key], target)
                return
            _copy_file(src, target)
            if st.st_nlink > 1:
                self.links[key] = target
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), target)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(target, 0o600)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if not self.archive:
                # An image's device node, made on this machine, would open this machine's
                # device (its disk, its memory) to whoever may read DEST: only with -a.
                self.devices_skipped += 1
                return
            os.mknod(target, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        else:
            return                      # (a socket: nothing to copy)
        owner = (st.st_uid, st.st_gid) if self.archive else self.owner
        os.chown(target, *owner, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            perm = stat.S_IMODE(mode)
            if stat.S_ISREG(mode) and not self.keep_setid:
                # Owned by the caller (root, often), an image's set-id program would be one of
                # this machine's: kept only with -a, with the owners it had (as `cp -a`).
                perm &= ~(stat.S_ISUID | stat.S_ISGID)
            os.chmod(target, perm)                 # (after chown, which clears set-id bits)
            _copy_xattrs(src, target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _copy_file(src: str, target: str) -> None:
    s = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        d = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600)
        try:
            offset = 0
            while n := os.sendfile(d, s, offset, 1 << 30):
                offset += n
        finally:
            os.close(d)
    finally:
        os.close(s)


def _copy_xattrs(src: str, target: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for name in names:
        if not name.startswith(NOT_COPIED_XATTRS):
            try:
                os.setxattr(target, name, os.getxattr(src, name, follow_symlinks=False),
                            follow_symlinks=False)
            except OSError:
                pass


def _tar_to(fd: int, host: str, arcname: str | None) -> None:
    """A tar of `host` to `fd`: named `arcname` with its contents under it, as `docker cp C:SRC
    -` gives; or (None) its entries from the top, as `docker export` gives a root. With the
    owners the files have in the container (what `| tar -x` is used for), by number only (a
    name would be looked up in this machine's users by whoever extracts it)."""
    import tarfile

    def numeric(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        return info
    out = os.fdopen(os.dup(fd), "wb")
    with out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as t:
        if arcname is not None:
            t.add(host, arcname=arcname, recursive=True, filter=numeric)
            return
        for name in sorted(os.listdir(host)):
            t.add(os.path.join(host, name), arcname=name, recursive=True, filter=numeric)
