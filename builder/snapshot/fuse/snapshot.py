"""The fuse driver's snapshots: the same dirs as the overlay driver's, served by unionfs.py.

`mount()` forks the server (F) from the sandbox process that owns the
mount namespace, before the sandbox enters its PID namespace. F opens
/dev/fuse and every layer dir, mounts `fuse.pybuild` at `merged` itself
(as root, with `allow_other`, `default_permissions`, and neither nosuid nor
nodev, like the overlay), then chroots into the snapshot's work dir so
that the sandbox's pivot_root cannot move its root, and serves requests
until it is told to stop. F dies with the process that started it
(PR_SET_PDEATHSIG), which takes the mount with it.

`stop()` (after the command) runs syncfs on the mount, which writes back
what the kernel's writeback cache still holds, and only then ends F: every
change is in the upper dir when it returns.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import signal

from ... import linux
from ..base import Snapshot

MOUNT_OPTIONS = "rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
_libc = ctypes.CDLL(None, use_errno=True)


class FuseSnapshot(Snapshot):
    driver = "fuse"
    small_dirs = frozenset({"upper", "work", "merged", "empty"})   # (as overlay's)
    server: int = 0          # F's pid while mounted
    mount_fd: int = -1       # an fd of the mounted root, for syncfs after the sandbox pivots

    def mount(self) -> None:
        os.chdir(self.store_root)
        lowers = [os.path.abspath(p) for p in self.extra_lowers + self.lowers]
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _serve(self, lowers, ready_w)          # never returns
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as f:
            answer = f.read()
        if not answer.startswith(b"ok"):
            os.waitpid(pid, 0)
            from ...sandbox import SetupError
            raise SetupError("the fuse storage driver could not mount: " +
                             answer.decode(errors="replace").strip(),
                             hint="check /dev/fuse (modprobe fuse), or use --storage-driver vfs")
        self.server = pid
        self.mount_fd = os.open(self.merged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def stop(self) -> None:
        if not self.server:
            return
        if _libc.syncfs(self.mount_fd) != 0:
            err = ctypes.get_errno()
            if err not in (errno.ENOTCONN, errno.EIO):
                raise OSError(err, os.strerror(err))
        os.close(self.mount_fd)
        self.mount_fd = -1
        os.kill(self.server, signal.SIGKILL)
        _reap(self.server)
        self.server = 0

    def unmount(self) -> None:
        self.stop()
        linux.umount(self.merged, linux.MNT_DETACH)


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


def _serve(snap: FuseSnapshot, lowers: list[str], ready_w: int) -> None:
    """F: open everything, mount, chroot away, serve. Reports `ok` or the error on `ready_w`."""
    code = 0
    gc.enable()              # (F serves as long as its mount lasts; a COPY's process has it off)
    try:
        linux.set_parent_death_signal(signal.SIGKILL)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        import pyfuse3
        from ...layer import whiteout
        from . import loop
        from .unionfs import UnionFS
        opaque = whiteout.opaque_xattr().encode()     # (nothing is imported after the chroot)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        upper_fd = os.open(snap.upper, flags)
        lower_fds = [os.open(p, flags) for p in lowers]
        dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        linux.mount("pybuild", snap.merged, "fuse.pybuild", 0, f"fd={dev},{MOUNT_OPTIONS}")
        os.chroot(os.path.dirname(snap.merged))
        os.chdir("/")
        ops = UnionFS(upper_fd, lower_fds, opaque)
        pyfuse3.init(ops, f"/dev/fd/{dev}", {"fsname=pybuild", "default_permissions"})
        os.write(ready_w, b"ok")
        os.close(ready_w)
        loop.run(pyfuse3.main, 1, 1)      # one task: the handlers never wait on anything
    except BaseException as e:     # told to the mounting process, which raises it
        try:
            os.write(ready_w, f"{type(e).__name__}: {e}".encode())
        except OSError:
            pass
        code = 1
    os._exit(code)


def prepare(store, diff_ids: list[str], workdir: str, reuse: bool = False) -> FuseSnapshot:
    from .. import overlay
    # Imported here, in the long-lived parent, so that every server forked later has them:
    # pyfuse3 (with trio) takes ~70 ms to import, which each RUN step paid in its server.
    import pyfuse3  # noqa: F401
    from . import loop, unionfs  # noqa: F401
    return overlay.prepare(store, diff_ids, workdir, kind=FuseSnapshot, reuse=reuse)


def works() -> bool:
    """Is there a FUSE device and the pyfuse3 module? (a real mount is tried by the tests)"""
    if not os.path.exists("/dev/fuse"):
        return False
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return False
    return True
