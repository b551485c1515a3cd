"""The few Linux system calls pybuild needs that Python 3.11's standard library lacks.

`os.unshare` arrived only in 3.12, and there is no `mount`, `umount2`,
`pivot_root` or `prctl` at all; they are bound here with ctypes, in one place,
so the rest of the code calls typed Python functions that raise OSError with
the right errno, like the `os` module does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading


def _load_libc() -> ctypes.CDLL:
    """The C library, by glibc's soname, else the one this process is linked with (musl).
    Not ctypes.util.find_library: importing it and asking cost a build's first RUN 5 ms."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(None, use_errno=True)


_libc = _load_libc()
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = None

# A forked child keeps every fd its parent had (a sandbox never execs): held while a
# pipe's write end is open in pybuild, this lock stops another thread's sandbox from
# inheriting it, which would keep the pipe from ever reaching EOF.
FORK_LOCK = threading.Lock()

# Namespaces (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# Capabilities (linux/capability.h, linux/prctl.h). What a command in a Docker container
# or a BuildKit RUN may do as root: Docker's default set (0xa80425fb). Not in it, among
# others: SYS_ADMIN, NET_ADMIN (the host's network, with --network host), SYS_TIME (the
# host's clock), SYS_MODULE, and DAC_READ_SEARCH (open_by_handle_at reaches any file of a
# file system the sandbox has one file of, such as a bind-mounted /etc/hosts).
DOCKER_DEFAULT_CAPS = frozenset({
    0,    # CHOWN
    1,    # DAC_OVERRIDE
    3,    # FOWNER
    4,    # FSETID
    5,    # KILL
    6,    # SETGID
    7,    # SETUID
    8,    # SETPCAP
    10,   # NET_BIND_SERVICE
    13,   # NET_RAW
    18,   # SYS_CHROOT
    27,   # MKNOD
    29,   # AUDIT_WRITE
    31,   # SETFCAP
})
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]

# pivot_root has no libc wrapper; its number depends on the architecture.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203,
                   "s390x": 217, "i686": 217, "armv7l": 218}.get(os.uname().machine)


def _check(ret: int, what: str, path: str | None = None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"mount {fstype or 'bind'} on {target}", target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None if the
    process is gone. (The name is in parentheses and may hold spaces: split after it.)"""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace `fd` refers to (a /proc/PID/ns/* file)."""
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(errno.ENOSYS, "pivot_root: unknown system call number on this architecture")
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), "pivot_root")


def private_mount_namespace() -> None:
    """Move this process to a mount namespace of its own, where nothing it mounts propagates
    to the host's (and the kernel unmounts it all when the last process in it ends)."""
    unshare(CLONE_NEWNS)
    mount("none", "/", None, MS_REC | MS_PRIVATE)


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent thread exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


_SYS_CLOSE_RANGE = 436          # the same number on every architecture (Linux 5.9)
_CLOSE_RANGE_CLOEXEC = 4        # (5.11)


def close_on_exec_from(first: int) -> bool:
    """Mark every descriptor from `first` on close-on-exec, in one call; False if the
    kernel cannot (the caller then walks /proc/self/fd)."""
    return _libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF),
                         ctypes.c_uint(_CLOSE_RANGE_CLOEXEC)) == 0


def set_seccomp_filter(prog_address: int) -> None:
    """Install the seccomp filter whose struct sock_fprog is at `prog_address` (seccomp.py)."""
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog_address, 0, 0),
           "prctl(PR_SET_SECCOMP)")


def limit_capabilities(keep: frozenset[int] = DOCKER_DEFAULT_CAPS) -> None:
    """Leave this process, and whatever it executes, no capability but `keep`, for good.

    The bounding set decides what a program executed as root gets; the
    effective, permitted and inheritable sets are cut to `keep` as well, and
    the ambient set emptied. Needs CAP_SETPCAP (in `keep`, as in Docker's).
    """
    for cap in range(64):
        if cap in keep:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:         # past the last capability this kernel knows
                break
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)    # EINVAL before 4.3: none
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    for word in (0, 1):
        mask = sum(1 << (cap - 32 * word) for cap in keep if cap // 32 == word)
        data[word].effective &= mask
        data[word].permitted &= mask
        data[word].inheritable &= mask
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def loopback_up() -> None:
    """Bring `lo` up in a fresh network namespace (as Docker's `--network none` has it)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))


# ---- the new mount API (fsopen/fsconfig/fsmount/move_mount), for overlays of any depth ------

_SYS_NEW_MOUNT = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100


def _sys(name: str, *args) -> int:
    ret = _libc.syscall(_SYS_NEW_MOUNT[name], *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return ret


def _fs_log(fs_fd: int) -> str:
    """The kernel's own words about a failed fsconfig (read from the context fd)."""
    lines = []
    for _ in range(8):
        try:
            msg = os.read(fs_fd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def mount_overlay(target: str, lowers: list[str], upper: str | None, work: str | None,
                  options: dict[str, str], readonly: bool = False, flags: tuple[str, ...] = ()
                  ) -> None:
    """Mount an overlay with one fsconfig call per lower dir (`lowerdir+`, Linux 6.8+).

    No option string, so no one-page limit on the number of layers. Raises
    OSError (EINVAL when the kernel lacks `lowerdir+`).
    """
    fs_fd = _sys("fsopen", b"overlay", 1)     # FSOPEN_CLOEXEC
    try:
        def setstr(key: str, value: str) -> None:
            try:
                _sys("fsconfig", fs_fd, FSCONFIG_SET_STRING, key.encode(), os.fsencode(value), 0)
            except OSError as e:
                raise OSError(e.errno, f"overlay {key}={value}: {_fs_log(fs_fd) or e.strerror}") \
                    from None
        for lower in lowers:
            setstr("lowerdir+", lower)
        if upper:
            setstr("upperdir", upper)
            setstr("workdir", work)
        for key, value in options.items():
            setstr(key, value)
        for key in flags:
            try:
                _sys("fsconfig", fs_fd, FSCONFIG_SET_FLAG, key.encode(), None, 0)
            except OSError as e:
                raise OSError(e.errno, f"overlay {key}: {_fs_log(fs_fd) or e.strerror}") from None
        try:
            _sys("fsconfig", fs_fd, FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as e:
            raise OSError(e.errno, f"overlay: {_fs_log(fs_fd) or e.strerror}") from None
        mnt_fd = _sys("fsmount", fs_fd, 1, 1 if readonly else 0)   # FSMOUNT_CLOEXEC, MOUNT_ATTR_RDONLY
        try:
            _sys("move_mount", mnt_fd, b"", _AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)
