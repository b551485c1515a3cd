"""The RUN seccomp filter (builder/seccomp.py), installed in a forked child of the test:
the real kernel answers, before and after."""

from __future__ import annotations

import ctypes
import json
import os
import platform

import pytest

from builder import linux, seccomp
from conftest import BASE, layer_files, write_context

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                reason="the filter has numbers for x86_64 and aarch64")

# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING), unshare, clone3, io_uring_setup,
# userfaultfd, perf_event_open
_NUMBERS = {"x86_64": (250, 272, 435, 425, 323, 298),
            "aarch64": (219, 97, 435, 425, 282, 241)}[platform.machine()]


def _in_child(install: bool) -> dict:
    """What a forked child gets from the calls the filter is about."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def call(*args):
            if libc.syscall(*[ctypes.c_long(a) for a in args]) >= 0:
                return 0
            return ctypes.get_errno()
        if install:
            seccomp.install()
        keyctl, unshare, clone3, io_uring_setup, userfaultfd, perf_event_open = _NUMBERS
        os.write(w, json.dumps({
            # (no parameters: EFAULT, or EINVAL, from the kernel when let through)
            "io_uring_setup": call(io_uring_setup, 1, 0),
            "userfaultfd": call(userfaultfd, 0x80000),          # O_CLOEXEC
            "perf_event_open": call(perf_event_open, 0, 0, -1, -1, 0),
            "keyctl": call(keyctl, 0, -4, 0),
            # (last: once in a new user namespace, the child is no longer the host's root)
            "unshare user": call(unshare, linux.CLONE_NEWUSER),
            "unshare mount": call(unshare, 0x00020000),
            "clone3": call(clone3, 0, 0)}).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = json.loads(f.read())
    os.waitpid(pid, 0)
    return out


def test_the_filter_refuses_what_it_names_and_nothing_else():
    before, after = _in_child(False), _in_child(True)
    assert before["keyctl"] == 0 and before["unshare user"] == 0     # the test can fail
    assert before["userfaultfd"] == 0                                  # (root, not filtered)
    assert before["io_uring_setup"] not in (0, 1) and before["perf_event_open"] not in (0, 1)
    assert after == {"keyctl": 1, "unshare user": 1,                   # EPERM
                     "unshare mount": 0,                               # not refused
                     "clone3": 38,                                     # ENOSYS: use clone
                     "io_uring_setup": 1, "userfaultfd": 1, "perf_event_open": 1}


def test_the_program_jumps_land_inside_it():
    for machine in ("x86_64", "aarch64", "riscv64"):
        code = seccomp.program(machine)
        for i, (op, jt, jf, _) in enumerate(code):
            if op & 0x07 == 0x05:                       # BPF_JMP
                assert i + 1 + max(jt, jf) < len(code)
        assert code[-1][0] == 0x06                      # ends in a return


def test_a_run_cannot_make_a_user_namespace(tmp_path, base_image, store_root, store):
    import builder
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN (unshare -U true 2>/dev/null && echo userns-made || echo userns-refused) > /result; \\
    grep '^Seccomp:' /proc/self/status | tr -d '\\t ' >> /result
"""})
    image = builder.build(str(ctx), root=store_root, no_cache=True)
    assert layer_files(store, image.layers[-1])["result"] == b"userns-refused\nSeccomp:2\n"
