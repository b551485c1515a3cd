"""A RUN's seccomp filter: system calls Docker's default profile refuses that no
dropped capability guards.

With Docker's capabilities (linux.limit_capabilities) a RUN can no longer mount,
load modules or set the clock. What it could still do as the host's root: use the
kernel's keyrings (keyctl, add_key, request_key; a RUN is in the host's user
namespace, so root's keys there are the host's root's), and make user namespaces
(unshare or clone with CLONE_NEWUSER), inside which it holds every capability
again over new mounts, a large kernel surface. Docker's profile refuses both, and
so does this filter, with EPERM. So are three interfaces no capability guards
here that Docker's profile refuses too, each with a long list of kernel bugs
behind it and no use in a build: io_uring (Docker since 25.0), userfaultfd (the
usual way to win a kernel race) and perf_event_open (measuring the host, at
perf_event_paranoid 2 or less). clone3 gets ENOSYS, as in Docker, because its
flags are in memory a filter cannot read: C libraries then fall back to clone.

The filter is classic BPF, assembled here (libseccomp is not a dependency).
System call numbers depend on the calling convention, and an x86_64 process may
also call the i386 way (int 0x80) or the x32 way, so each has its own list; a
convention this module does not know is let through.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from . import linux

_AUDIT_ARCH_X86_64 = 0xC000003E
_AUDIT_ARCH_I386 = 0x40000003
_AUDIT_ARCH_AARCH64 = 0xC00000B7
_X32_BIT = 0x40000000
_CLONE3 = 435               # the same number everywhere


class _Calls:
    """One calling convention's numbers: refused outright, and refused with CLONE_NEWUSER
    in their first argument (unshare's flags, clone's)."""

    def __init__(self, refused: tuple[int, ...], newuser_in_arg0: tuple[int, ...]):
        self.refused = refused
        self.newuser_in_arg0 = newuser_in_arg0


# keyctl, add_key, request_key, userfaultfd, perf_event_open, io_uring_setup/enter/register;
# unshare, clone (asm/unistd_64.h, unistd_32.h, asm-generic/unistd.h).
_IO_URING = (425, 426, 427)             # the same numbers everywhere, as clone3's
_X86_64 = _Calls((250, 248, 249, 323, 298) + _IO_URING, (272, 56))
_CONVENTIONS = {
    "x86_64": {
        _AUDIT_ARCH_X86_64: _Calls(_X86_64.refused + tuple(n | _X32_BIT for n in _X86_64.refused),
                                   _X86_64.newuser_in_arg0
                                   + tuple(n | _X32_BIT for n in _X86_64.newuser_in_arg0)),
        _AUDIT_ARCH_I386: _Calls((288, 286, 287, 374, 336) + _IO_URING, (310, 120)),
    },
    "aarch64": {_AUDIT_ARCH_AARCH64: _Calls((219, 217, 218, 282, 241) + _IO_URING, (97, 220))},
}

# Classic BPF (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16       # offsets in struct seccomp_data (little-endian)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter for this machine's conventions, as (code, jt, jf, k) instructions."""
    code: list[tuple] = []      # (code, jt, jf, k); jt/jf are label names or 0
    for n, (arch, calls) in enumerate(_CONVENTIONS.get(machine or os.uname().machine,
                                                       {}).items()):
        skip, flags = f"next{n}", f"flags{n}"
        code.append((_LD_W_ABS, 0, 0, _ARCH))
        code.append((_JEQ_K, 0, skip, arch))
        code.append((_LD_W_ABS, 0, 0, _NR))
        code += [(_JEQ_K, "eperm", 0, nr) for nr in calls.refused]
        code.append((_JEQ_K, "enosys", 0, _CLONE3))
        code += [(_JEQ_K, flags, 0, nr) for nr in calls.newuser_in_arg0]
        code.append((_RET_K, 0, 0, _RET_ALLOW))
        code.append(flags)
        code.append((_LD_W_ABS, 0, 0, _ARG0_LOW))
        code.append((_JSET_K, "eperm", 0, linux.CLONE_NEWUSER))
        code.append((_RET_K, 0, 0, _RET_ALLOW))
        code.append(skip)
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    code.append("eperm")
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    code.append("enosys")
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))
    return _resolve(code)


def _resolve(code: list) -> list[tuple[int, int, int, int]]:
    """Labels (the strings in `code`) -> relative forward jumps."""
    labels, out = {}, []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(out)
        else:
            out.append(item)

    def offset(target, at: int) -> int:
        if not isinstance(target, str):
            return target
        jump = labels[target] - at - 1
        assert 0 <= jump <= 255, "a seccomp jump out of range"
        return jump
    return [(c, offset(jt, i), offset(jf, i), k) for i, (c, jt, jf, k) in enumerate(out)]


@functools.cache
def _compiled() -> tuple | None:
    """(the instruction table, the sock_fprog pointing at it), or None where this module has
    no numbers for the machine. Kept, so that the table stays alive with its pointer."""
    instructions = program()
    if len(instructions) <= 1:
        return None
    table = (_SockFilter * len(instructions))(*(_SockFilter(*i) for i in instructions))
    return table, _SockFprog(len(instructions), table)


def prepare() -> None:
    """Build the filter in this long-lived process, before it forks sandboxes: each then only
    hands it to the kernel (building it in the sandbox cost 0.4-1 ms of every RUN)."""
    _compiled()


def install() -> None:
    """Filter this process and everything it starts (needs CAP_SYS_ADMIN: call it before
    linux.limit_capabilities)."""
    compiled = _compiled()
    if compiled is not None:
        linux.set_seccomp_filter(ctypes.addressof(compiled[1]))
