"""Running a step inside a snapshot: namespaces, mounts, the image's user, and nothing of the host.

Three processes per container, two per RUN, all forked (no helper binary);
from a build's second RUN on, by the fork server (forkserver.py) rather than
by pybuild itself, which then only holds the sandbox's pipes and pid:

    pybuild ── A: own mount (+pid, uts, ipc[, net]) namespace; mounts the overlay
                  └─ B: PID 1 of the new pid namespace: /proc, /dev, /sys,
                        /etc/{hosts,resolv.conf,hostname}; pivot_root; reaps zombies
                        └─ C: the image's user and groups, env, workdir; exec the command

A Dockerfile RUN has no C: B itself takes the image's user and execs the
command, which is then PID 1 of its namespace, as under BuildKit's runc
(`RUN echo $$` says 1), and a step starts one process fewer. A container
(`pybuild run`) keeps B as its init, which relays signals (`pybuild stop`).

Every mount is made in A's private mount namespace, so the host's mount
table never sees one, and the kernel drops them all when the namespace's
last process exits. A and B die with their parent (PR_SET_PDEATHSIG), and
when B, the pid namespace's init, dies the kernel kills everything left in
it, so even `kill -9` of pybuild leaves no process and no mount behind.

Mount points a RUN needs but the image lacks (a `FROM scratch` image has no
/proc) are created in a small "init" dir stacked above the image's layers,
as Docker's init layer is, so they never land in the step's upper dir. Mount
targets are resolved inside the image root (`paths.resolve_in_root`), so an
image's `/etc/resolv.conf -> /run/...` cannot point a mount at the host.

File steps (COPY, WORKDIR's mkdir) use `run_in_root`: a forked child mounts
the snapshot and chroots into it, so paths in the image resolve inside it.
"""

from __future__ import annotations

import errno
import gc
import json
import marshal
import os
import resource
import select
import signal
import socket
import stat
import threading
import traceback
from dataclasses import field
from collections.abc import Callable

from .record import record
from . import linux, paths, seccomp, users
from .errors import DISK_FULL, DISK_FULL_HINT, BuildError, os_error_text
from .snapshot.base import Snapshot
from .snapshot.overlay import mount_overlay

HOSTNAME = "pybuild"
_DIRS = ("proc", "dev", "sys")
_FILES = ("etc/hosts", "etc/resolv.conf", "etc/hostname")
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0))
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)


class SetupError(Exception):
    """A failure inside the sandbox before the command ran; reported to the parent."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@record(frozen=False)
class MountSpec:
    """An extra mount of a RUN (`--mount`), with host-side sources already prepared."""
    target: str                      # absolute path inside the image
    kind: str                        # bind | overlay | tmpfs
    source: str = ""                 # bind: a host path
    lowers: tuple[str, ...] = ()     # overlay: layer dirs, topmost first
    upper: str = ""                  # overlay: writable (changes thrown away) when set
    work: str = ""
    subpath: str = ""                # overlay: the part of it to mount
    readonly: bool = True
    options: str = ""                # tmpfs: mount options
    content: bytes | None = None     # secret: written to a tmpfs of the sandbox, never to disk
    mode: int | None = None
    uid: int = 0
    gid: int = 0


SHM_SIZE = 64 << 20                  # Docker's default /dev/shm


@record(frozen=False)
class RunSpec:
    argv: list[str]
    env: list[str]
    user: str = ""
    workdir: str = "/"
    network: str = "host"            # host | none
    hostname: str = HOSTNAME
    interactive: bool = False        # inherit pybuild's stdin/stdout/stderr (pybuild run)
    init: bool = True                # B runs the command as its child; False: B execs it
    extra_hosts: list[str] = field(default_factory=list)
    mounts: list[MountSpec] = field(default_factory=list)
    files: dict[str, tuple[str, int]] = field(default_factory=dict)   # written under /dev
    shm_size: int = SHM_SIZE         # bytes of /dev/shm
    ulimits: list[tuple[str, int, int]] = field(default_factory=list)   # (nofile, soft, hard)


# Sandboxes alive now (their first process), so that a cancelled build can take
# down the ones its other threads started.
_live: set[int] = set()
_live_lock = threading.Lock()


def kill_all() -> None:
    """SIGKILL every sandbox this process started; each one's children follow it."""
    with _live_lock:
        pids = list(_live)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- the parent's side ----------------------------------------------------------

def run(snap: Snapshot, spec: RunSpec, scratch: str, on_output: Callable[[bytes], None] | None = None,
        cancel: threading.Event | None = None,
        started: Callable[[int], None] | None = None, server=None) -> int:
    """Run `spec` in `snap`; returns the command's exit status (128+N if killed by signal N).

    With `server` (a forkserver.ForkServer that is ready), the server forks the
    sandbox instead of this process (a build step's output and status come
    back the same way).

    `scratch` is an empty dir the sandbox mounts a tmpfs on, in its own mount
    namespace, for the init dir, secrets and the files bind-mounted over /etc:
    nothing of a step is created on the host's side of it, so concurrent
    sandboxes may share one. Raises SetupError when the sandbox could not
    start the command.
    """
    prepare_to_fork()
    if server is not None and started is None and not spec.interactive:
        remote = server.start(snap, spec, scratch)
        if remote is not None:
            pid, out_r, err_r, proc = remote
            return _supervise(pid, err_r, out_r, on_output, forward=False, cancel=cancel,
                              proc=proc)
    with linux.FORK_LOCK:
        out_r = out_w = None
        if not spec.interactive:
            out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid, parent = _fork()
        if pid == 0:
            _child(err_w, lambda: _sandbox_a(snap, spec, scratch, out_w, err_w), parent)
        os.close(err_w)
        if out_w is not None:
            os.close(out_w)
    if started is not None:
        started(pid)         # (a container records it: `pybuild exec` finds the sandbox by it)
    return _supervise(pid, err_r, out_r, on_output, forward=spec.interactive, cancel=cancel)


def prepare_to_fork() -> None:
    """What every sandbox would otherwise work out for itself, done once in the process that
    forks them: the seccomp filter, and whether this is a user namespace (overlay's xattrs;
    reading it in each sandbox imported the rootless module there, 1-2 ms a RUN)."""
    seccomp.prepare()
    from .rootless import in_user_namespace
    in_user_namespace()


def fork_in_server(snap: Snapshot, spec: RunSpec, scratch: str, out_w: int, err_w: int,
                   status_fd: int) -> int:
    """In the fork server (forkserver.py): fork a sandbox as run() does; its first process's
    pid. That process says its exit status on `status_fd` when it ends."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(err_w, lambda: _sandbox_a(snap, spec, scratch, out_w, err_w, status_fd), parent,
               status_fd=status_fd)
    return pid


def init_of(sandbox_pid: int) -> int | None:
    """The PID 1 of a running sandbox (B): the child of its first process (A) that lives in
    the sandbox's own PID namespace. (A's other child, with the fuse driver, is the FUSE
    server, forked before the namespace: a signal or an exec meant for the container must
    not reach it.)"""
    try:
        a_ns = os.readlink(f"/proc/{sandbox_pid}/ns/pid")
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = linux.proc_stat(int(entry))
        if fields is None or int(fields[1]) != sandbox_pid:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != a_ns:
                return int(entry)
        except OSError:
            continue
    return None


def wait_ready(sandbox_pid: int, timeout: float = 10) -> int | None:
    """Wait until a sandbox's PID 1 has pivoted into its root (so that joining its namespaces
    lands in the container); its pid, or None if the sandbox went away first."""
    import time
    deadline = time.monotonic() + timeout
    host_root = os.stat("/")
    while time.monotonic() < deadline:
        init = init_of(sandbox_pid)
        if init is not None:
            try:
                root = os.stat(f"/proc/{init}/root/")
                if (root.st_dev, root.st_ino) != (host_root.st_dev, host_root.st_ino):
                    return init
            except OSError:
                pass
        elif not os.path.exists(f"/proc/{sandbox_pid}"):
            return None
        time.sleep(0.01)
    return init_of(sandbox_pid)


def exec_in(init_pid: int, spec: RunSpec) -> int:
    """Run `spec` inside the namespaces of the running sandbox whose PID 1 is `init_pid`
    (`pybuild exec`), with pybuild's own stdin/stdout/stderr; returns its exit status."""
    fds = {}
    for name in ("ipc", "uts", "net", "pid", "mnt"):
        try:
            fds[name] = os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            for fd in fds.values():
                os.close(fd)
            raise SetupError("the container is not running") from None

    def enter(err_w: int) -> None:
        for name in ("ipc", "uts", "net", "pid", "mnt"):      # mnt last: it moves our root
            linux.setns(fds[name])
        os.chdir("/")
        pid = os.fork()             # only a child is inside the PID namespace (where it
        if pid == 0:                # cannot see its parent's pid: no parent check)
            _child(err_w, lambda: _sandbox_c(spec, None), None)
        os._exit(_wait_for(pid))

    pid, err_r = _spawn(enter)
    try:
        return _supervise(pid, err_r, None, None, forward=True)
    finally:
        for fd in fds.values():
            os.close(fd)


def run_in_root(snap: Snapshot, func: Callable[[], object],
                before_chroot: Callable[[], None] | None = None,
                after_unmount: Callable[[object], None] | None = None,
                meanwhile: Callable[[], None] | None = None,
                cancel: threading.Event | None = None) -> None:
    """Mount `snap`, chroot into it in a child process and call `func` there.

    `before_chroot` runs first, in the child's own mount namespace (to mount
    and open what `func` reads). `func` runs as root with the image's files as
    its `/`; it must not import anything (the host's Python library is not
    visible in the chroot). With `after_unmount`, `func` runs in a grandchild,
    its (marshal-able) result comes back, the overlay is unmounted, and
    `after_unmount(result)` runs outside the chroot, free to write into the
    upper dir directly (which is not allowed while it is mounted); and
    `meanwhile()`, work that needs neither the chroot nor its result, runs
    in the child while the grandchild works.
    """
    prepare_to_fork()

    def body(err_w: int):
        # No garbage collection in these processes (this one, the chrooted one and the copy
        # workers, which inherit it): each is short and leaves with os._exit, and a
        # collection writes to every tracked object, which copies each page they are on
        # from the build process (a full one took 13-22 ms of a 30,000-file COPY's chrooted
        # pass and of its preparation beside it). A FUSE server the mount starts turns it
        # back on (it serves as long as its mount lasts).
        gc.disable()
        linux.private_mount_namespace()
        snap.mount()
        if before_chroot is not None:
            before_chroot()
        if after_unmount is None:
            os.chroot(snap.merged)
            os.chdir("/")
            func()
            snap.stop()
            return
        result_r, result_w = os.pipe()
        pid, parent = _fork()
        if pid == 0:
            def chrooted():
                os.chroot(snap.merged)
                os.chdir("/")
                data = marshal.dumps(func())
                with open(result_w, "wb", closefd=False) as f:
                    f.write(data)
            _child(err_w, chrooted, parent)
        os.close(result_w)
        if meanwhile is not None:
            meanwhile()
        with open(result_r, "rb") as f:
            data = f.read()
        status = _wait_for(pid)
        if status != 0:
            os._exit(status)        # the grandchild has reported why
        os.chdir("/")
        snap.unmount()
        after_unmount(marshal.loads(data))
    pid, err_r = _spawn(body)
    status = _supervise(pid, err_r, None, None, forward=False, cancel=cancel)
    if status != 0:
        raise SetupError(f"file operation failed with status {status}")


def in_own_mounts(func: Callable[[], None], cancel: threading.Event | None = None) -> None:
    """Call `func` in a child with a private mount namespace: whatever it mounts is gone
    when it ends, however it ends, and never shows in the host's mount table."""
    def body(err_w: int):
        linux.private_mount_namespace()
        func()
    pid, err_r = _spawn(body)
    status = _supervise(pid, err_r, None, None, forward=False, cancel=cancel)
    if status != 0:
        raise SetupError(f"file operation failed with status {status}")


def _spawn(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child that runs `body(err_w)`; its pid and the read end of its error pipe."""
    with linux.FORK_LOCK:
        err_r, err_w = os.pipe()
        pid, parent = _fork()
        if pid == 0:
            _child(err_w, lambda: body(err_w), parent)
        os.close(err_w)
    return pid, err_r


class _Forked:
    """A sandbox's first process, forked by this process: waited for as a child."""

    def __init__(self, pid: int):
        self.pid = pid

    def wait(self) -> int:
        """Its exit status (128+N if a signal N ended it)."""
        return _wait_for(self.pid)

    def reap(self) -> None:
        """After it was killed: wait until it is gone."""
        _reap(self.pid)


def _supervise(pid: int, err_r: int, out_r: int | None, on_output, *, forward: bool,
               cancel: threading.Event | None = None, proc=None) -> int:
    """Pump output, wait for the child, turn its report into an exception or a status.

    `proc` waits for it (wait(), reap()); by default as this process's child."""
    proc = proc or _Forked(pid)
    with _live_lock:
        _live.add(pid)
    if cancel is not None and cancel.is_set():
        # The build was cancelled between the caller's last check and the fork.
        os.kill(pid, signal.SIGKILL)
    try:
        return _supervise_registered(proc, err_r, out_r, on_output, forward=forward)
    finally:
        with _live_lock:
            _live.discard(pid)


def _supervise_registered(proc, err_r: int, out_r: int | None, on_output, *,
                          forward: bool) -> int:
    pid = proc.pid
    old_handlers = {}
    if forward and threading.current_thread() is threading.main_thread():
        def relay(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        for sig in _FORWARDED:
            old_handlers[sig] = signal.signal(sig, relay)
    try:
        if out_r is not None:
            _pump(out_r, on_output)
        status = proc.wait()
    except BaseException:
        # Ctrl-C, SIGTERM turned into an exception, or a failing output callback:
        # take the whole sandbox down (B and C follow A through PDEATHSIG).
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.reap()
        raise
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if out_r is not None:
            os.close(out_r)
        report = _read_all(err_r)
        os.close(err_r)
    if report:
        data = json.loads(report.decode("utf-8", "replace"))
        raise SetupError(data["error"], data.get("hint"))
    return status


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        except KeyboardInterrupt:
            continue


def _pump(fd: int, on_output) -> None:
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        if b"\n" in pending:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                on_output(line)
    if pending:
        on_output(pending)


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    return out


def _write_etc_files(scratch: str, spec: RunSpec) -> dict[str, str]:
    etc = os.path.join(scratch, "etc")
    os.makedirs(etc, exist_ok=True)
    hosts = ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             f"127.0.1.1\t{spec.hostname}\n" + "".join(h + "\n" for h in spec.extra_hosts))
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            resolv = f.read() if spec.network == "host" else ""
    except OSError:
        resolv = ""
    files = {"etc/hosts": hosts, "etc/resolv.conf": resolv, "etc/hostname": spec.hostname + "\n"}
    out = {}
    for rel, text in files.items():
        path = os.path.join(scratch, rel.replace("/", "-"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, 0o644)
        out[rel] = path
    return out


# ---- inside the sandbox ----------------------------------------------------------

def _fork() -> tuple[int, int]:
    """fork(); returns (pid, the parent's pid), so that the child can tell if its parent died."""
    parent = os.getpid()
    return os.fork(), parent


def _child(err_w: int, body: Callable[[], None], parent: int | None, lifeline: int | None = None,
           status_fd: int = -1) -> None:
    """The first thing a forked child runs: never returns, reports failures on `err_w`.

    `status_fd`: a sandbox forked by the fork server tells its exit status there (its
    parent, the server, is not the process that waits for it)."""
    code = 0
    try:
        for sig in _FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        linux.set_parent_death_signal(signal.SIGKILL)
        # The parent may have died before PDEATHSIG was armed: then nothing may go on.
        if parent is not None and os.getppid() != parent:
            os._exit(1)
        if lifeline is not None:
            # PID 1 of a new namespace cannot see its parent's pid: its parent holds the
            # write end of this pipe, and a readable (EOF) read end means it is gone.
            if select.select([lifeline], [], [], 0)[0]:
                os._exit(1)
        body()
    except SetupError as e:
        _report(err_w, str(e), e.hint)
        code = 125
    except users.UnknownUser as e:
        _report(err_w, str(e), "add the user to the image's /etc/passwd (and /etc/group), "
                               "or use a numeric uid:gid")
        code = 125
    except BuildError as e:
        _report(err_w, e.reason, e.hint)
        code = 125
    except OSError as e:
        if os.environ.get("PYBUILD_DEBUG_SANDBOX"):
            traceback.print_exc()
        hint = DISK_FULL_HINT if e.errno in DISK_FULL else None
        _report(err_w, os_error_text(e), hint)
        code = 125
    except BaseException as e:   # a bug: say where, the parent shows it with --debug
        _report(err_w, f"internal error in the sandbox: {e!r}",
                "".join(traceback.format_exception(e))[-2000:])
        code = 125
    _exit(code, status_fd)


def _exit(code: int, status_fd: int = -1) -> None:
    """os._exit(code), saying `code` on `status_fd` first (forkserver.py) if there is one."""
    if status_fd >= 0:
        try:
            os.write(status_fd, b"S%d" % code)
        except OSError:
            pass
    os._exit(code)


def _report(err_w: int, message: str, hint: str | None = None) -> None:
    try:
        os.write(err_w, json.dumps({"error": message, "hint": hint}).encode())
    except OSError:
        pass


def _forward_to(pid_holder: list[int]):
    def relay(signum, _frame):
        if pid_holder:
            try:
                os.kill(pid_holder[0], signum)
            except ProcessLookupError:
                pass
    for sig in _FORWARDED:
        signal.signal(sig, relay)


def _sandbox_a(snap: Snapshot, spec: RunSpec, scratch: str, out_w, err_w: int,
               status_fd: int = -1) -> None:
    if not spec.interactive:
        # Keep the terminal's Ctrl-C away from the sandbox: pybuild decides what a
        # build does on SIGINT (it kills the sandbox and cleans up).
        os.setpgid(0, 0)
    flags = linux.CLONE_NEWPID | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
    if spec.network == "none":
        flags |= linux.CLONE_NEWNET
    os.chdir(snap.store_root)
    # The mount namespace first: a driver may start a helper process when it mounts (FUSE),
    # which must not become PID 1 of the new PID namespace; the command's sandbox must.
    linux.private_mount_namespace()
    # The sandbox's own files live in memory, gone with this namespace: on a disk whose
    # file creation is slow, the five files and dirs a RUN made there each time cost more
    # than the rest of starting it.
    linux.mount("tmpfs", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                "mode=0700,size=64m")
    binds = _write_etc_files(scratch, spec)
    snap.mount()
    sources = _prepare_mount_sources(spec.mounts, scratch)
    wanted = [(rel, rel in _DIRS) for rel in _DIRS + _FILES]
    wanted += [(m.target, m.kind == "tmpfs" or os.path.isdir(src))
               for m, src in zip(spec.mounts, sources, strict=True)]
    missing = _missing_mount_points(snap.merged, wanted)
    if missing:
        init = os.path.join(scratch, "init")
        _make_init_dir(snap.merged, init, missing)
        snap.unmount()
        snap.extra_lowers = [init]
        snap.mount()
    linux.unshare(flags)
    targets = {rel: paths.resolve_in_root(snap.merged, rel) for rel in _DIRS + _FILES}
    extra = [(m, src, paths.resolve_in_root(snap.merged, m.target))
             for m, src in zip(spec.mounts, sources, strict=True)]
    extra.sort(key=lambda t: t[0].target.count("/"))
    holder: list[int] = []
    _forward_to(holder)
    life_r, life_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(life_w)
        if status_fd >= 0:
            os.close(status_fd)      # (A's to say, not B's)
        _child(err_w, lambda: _sandbox_b(snap, spec, targets, binds, extra, out_w, err_w,
                                         life_r), None, lifeline=life_r)
    os.close(life_r)
    holder.append(pid)
    if out_w is not None:
        os.close(out_w)
    status = _wait_for(pid)
    snap.stop()            # every change in the upper dir before this process says it is done
    _exit(status, status_fd)


def _wait_for(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


def _prepare_mount_sources(mounts: list[MountSpec], scratch: str) -> list[str]:
    """Mount the layer stacks that `--mount=from=` needs (in A's namespace); their host paths."""
    out = []
    for i, m in enumerate(mounts):
        if m.kind == "secret":
            # In the tmpfs `scratch` is in this namespace: gone with it, never in the store.
            path = os.path.join(scratch, f"secret-{i}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, m.content or b"")
            os.close(fd)
            os.chown(path, m.uid, m.gid)
            os.chmod(path, 0o400 if m.mode is None else m.mode)
            out.append(path)
        elif m.kind == "overlay":
            point = os.path.join(scratch, f"mnt-{i}")
            os.mkdir(point, 0o755)
            lowers = list(m.lowers)
            if not m.upper and len(lowers) < 2:
                empty = os.path.join(scratch, f"empty-{i}")   # a read-only overlay needs two
                os.mkdir(empty, 0o755)
                lowers.append(empty)
            mount_overlay(point, lowers, m.upper or None, m.work or None, readonly=not m.upper)
            out.append(paths.resolve_in_root(point, m.subpath))
        else:
            out.append(m.source)
    return out


def _missing_mount_points(merged: str, wanted: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    missing = []
    for rel, want_dir in wanted:
        host = paths.resolve_in_root(merged, rel)
        try:
            st = os.lstat(host)
        except (FileNotFoundError, NotADirectoryError):
            entry = (os.path.relpath(host, merged), want_dir)
            if entry not in missing:
                missing.append(entry)
            continue
        if want_dir != stat.S_ISDIR(st.st_mode):
            raise SetupError(f"/{rel.lstrip('/')} in the image is not a "
                             f"{'directory' if want_dir else 'file'}; it cannot be a mount point")
    return missing


def _make_init_dir(merged: str, init: str, missing: list[tuple[str, bool]]) -> None:
    """Create the missing mount points in `init`, parents with the image's own metadata."""
    os.mkdir(init, 0o755)
    for rel, is_dir in missing:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            sub = "/".join(parts[:i])
            dst = os.path.join(init, sub)
            if os.path.isdir(dst):
                continue
            try:
                st = os.lstat(os.path.join(merged, sub))
            except FileNotFoundError:
                os.mkdir(dst, 0o755)
                continue
            os.mkdir(dst)
            os.chown(dst, st.st_uid, st.st_gid)
            os.chmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        path = os.path.join(init, rel)
        if os.path.lexists(path):
            continue
        if is_dir:
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _sandbox_b(snap: Snapshot, spec: RunSpec, targets: dict[str, str], binds: dict[str, str],
               extra: list, out_w, err_w: int, lifeline: int) -> None:
    socket.sethostname(spec.hostname)
    _mount_pseudo_filesystems(targets, spec.shm_size)
    for rel, src in binds.items():
        linux.mount(src, targets[rel], None, linux.MS_BIND)
    for m, src, target in extra:
        if m.kind == "tmpfs":
            linux.mount("tmpfs", target, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, m.options or None)
            continue
        linux.mount(src, target, None, linux.MS_BIND | linux.MS_REC)
        # nodev: a cache mount keeps what a RUN put there, device nodes included.
        _remount_bind(target, linux.MS_NODEV | (linux.MS_RDONLY if m.readonly else 0))
    for path, (content, mode) in spec.files.items():
        host = os.path.join(targets["dev"], path[len("/dev/"):])
        os.makedirs(os.path.dirname(host), 0o755, exist_ok=True)
        with open(host, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(host, mode)
    if spec.network == "none":
        linux.loopback_up()
    os.chdir(snap.merged)
    try:
        linux.pivot_root(".", ".")
        linux.umount(".", linux.MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        os.chroot(".")     # e.g. the host's root is an initramfs, which cannot be pivoted
    os.chdir("/")
    _remount_bind("/", linux.MS_NODEV)     # device nodes in the image (or made by RUN): inert
    if not spec.init and not _exec_drops_death_signal(spec):
        _sandbox_c(spec, out_w, lifeline)   # the command becomes PID 1 (it never returns)
    holder: list[int] = []
    _forward_to(holder)
    pid, parent = _fork()
    if pid == 0:
        _child(err_w, lambda: _sandbox_c(spec, out_w), parent)
    holder.append(pid)
    if out_w is not None:
        os.close(out_w)
    # PID 1: reap every orphan until the command itself exits.
    while True:
        try:
            child, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(0)
        if child == pid:
            os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


# What runc does for Docker (moby's default ReadonlyPaths and MaskedPaths). The proc file
# system shows the host's kernel: writing /proc/sys would set the host's sysctls (and
# kernel.core_pattern runs a program of the RUN's choosing as the host's root on the next
# crash), /proc/sysrq-trigger reboots the host; a dropped capability does not stop either.
_PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
_PROC_MASKED = ("acpi", "asound", "kcore", "keys", "latency_stats", "sched_debug", "scsi",
                "timer_list", "timer_stats")
_SYS_MASKED = ("firmware", "devices/virtual/powercap")


def _protect_proc_and_sys(t: dict[str, str], null: str) -> None:
    """Make the host-wide parts of /proc read-only, and hide the ones that leak the host."""
    for name in _PROC_READ_ONLY:
        path = os.path.join(t["proc"], name)
        if os.path.exists(path):
            linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            _remount_bind(path, linux.MS_RDONLY)
    locked = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC    # as /proc has them
    masked = [os.path.join(t["proc"], n) for n in _PROC_MASKED]
    masked += [os.path.join(t["sys"], n) for n in _SYS_MASKED]
    for path in masked:
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY | locked, "size=0")
        elif os.path.exists(path):
            linux.mount(null, path, None, linux.MS_BIND)


# statvfs flag -> mount flag, for the flags a remount must repeat (in a user namespace
# the kernel refuses to clear the ones it locked).
_KEPT_MOUNT_FLAGS = ((os.ST_RDONLY, linux.MS_RDONLY), (os.ST_NOSUID, linux.MS_NOSUID),
                     (os.ST_NODEV, linux.MS_NODEV), (os.ST_NOEXEC, linux.MS_NOEXEC),
                     (os.ST_NOATIME, linux.MS_NOATIME), (os.ST_NODIRATIME, linux.MS_NODIRATIME),
                     (os.ST_RELATIME, linux.MS_RELATIME))


def _remount_bind(path: str, add: int) -> None:
    """Add mount flags (MS_NODEV, MS_RDONLY) to the mount at `path`, keeping its others."""
    have = os.statvfs(path).f_flag
    flags = add | sum(ms for st, ms in _KEPT_MOUNT_FLAGS if have & st)
    linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _mount_pseudo_filesystems(t: dict[str, str], shm_size: int) -> None:
    nosuid_nodev_noexec = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    linux.mount("proc", t["proc"], "proc", nosuid_nodev_noexec)
    dev = t["dev"]
    # nodev: a device node the command makes (it has CAP_MKNOD, as in Docker, where the
    # devices cgroup then refuses to open most) cannot be opened; the few a command needs
    # are the host's own, each bind-mounted on its own.
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=755,size=65536k")
    for name, major, minor in _DEVICES:
        host = f"/dev/{name}"
        try:
            st = os.stat(host)
        except OSError:
            continue            # a host without it (a container's /dev): the RUN lacks it too
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(major, minor):
            continue            # not that device: never hand it to a RUN
        path = os.path.join(dev, name)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o666))
        linux.mount(host, path, None, linux.MS_BIND)
    for name in ("pts", "shm", "mqueue"):
        os.mkdir(os.path.join(dev, name), 0o755)
    linux.mount("devpts", os.path.join(dev, "pts"), "devpts", linux.MS_NOSUID | linux.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=0620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    linux.mount("shm", os.path.join(dev, "shm"), "tmpfs", nosuid_nodev_noexec,
                f"mode=1777,size={shm_size}")
    try:
        linux.mount("mqueue", os.path.join(dev, "mqueue"), "mqueue", nosuid_nodev_noexec)
    except OSError:
        pass
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    try:
        linux.mount("sysfs", t["sys"], "sysfs", nosuid_nodev_noexec | linux.MS_RDONLY)
    except OSError:
        pass   # some hosts refuse sysfs in a child namespace; a build rarely needs it
    _protect_proc_and_sys(t, os.path.join(dev, "null"))


def _close_on_exec_beyond_stdio() -> None:
    """The command gets stdin, stdout and stderr, and no other descriptor (as under runc):
    whatever pybuild inherited (a CI agent's pipes) stays out of reach of a RUN. Marked
    close-on-exec rather than closed, so that a failed exec can still be reported."""
    if linux.close_on_exec_from(3):
        return
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:
                pass            # the listing's own descriptor, closed by now


def _exec_drops_death_signal(spec: RunSpec) -> bool:
    """Would exec'ing the command clear its parent-death signal (a set-user-ID or set-group-ID
    program, or one with file capabilities: prctl(2))? As PID 1 of its namespace, nothing
    else would then end it if pybuild died, so it gets B as its init after all."""
    if not spec.argv:
        return False
    name = spec.argv[0]
    path_env = _spec_env(spec).get("PATH", _DEFAULT_PATH)      # (as execvpe will search it)
    workdir = spec.workdir or "/"
    candidates = [os.path.join(workdir, name)] if "/" in name else \
        [os.path.join(workdir, d, name) for d in path_env.split(":")]
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            return True
        try:
            return "security.capability" in os.listxattr(path)
        except OSError:
            return False
    return False


_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _spec_env(spec: RunSpec) -> dict[str, str]:
    """The command's environment as given (`NAME` alone is NAME set to "")."""
    return dict(e.split("=", 1) if "=" in e else (e, "") for e in spec.env)


def _sandbox_c(spec: RunSpec, out_w, lifeline: int | None = None) -> None:
    """Become the image's user in its environment and exec the command. `lifeline` (when
    this is B, PID 1 of the namespace) is the pipe whose end A holds: see below."""
    if out_w is not None:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(null)
        os.close(out_w)
    who = users.exec_user(spec.user, "/")
    env = _spec_env(spec)
    env.setdefault("HOME", who.home)
    env.setdefault("PATH", _DEFAULT_PATH)
    if spec.interactive:        # `docker run` sets it; a BuildKit RUN does not
        env.setdefault("HOSTNAME", spec.hostname)
    try:
        os.makedirs(spec.workdir or "/", 0o755, exist_ok=True)
    except OSError:
        pass
    for name, soft, hard in spec.ulimits:     # (raising a hard limit needs CAP_SYS_RESOURCE)
        limit = getattr(resource, "RLIMIT_" + name.upper())
        try:
            resource.setrlimit(limit, (resource.RLIM_INFINITY if soft == -1 else soft,
                                       resource.RLIM_INFINITY if hard == -1 else hard))
        except (ValueError, OSError) as e:
            current = resource.getrlimit(limit)[1]
            raise SetupError(f"--ulimit {name}={soft}:{hard}: {e}",
                             hint=f"the hard limit here is {current}; raising one needs "
                                  "CAP_SYS_RESOURCE, which pybuild does not have") from None
    # Docker's capabilities, no more: the command runs as root in the host's user
    # namespace (and, by default, its network namespace). The filter goes first: it
    # needs CAP_SYS_ADMIN.
    seccomp.install()
    linux.limit_capabilities()
    os.setgroups(list(who.groups))
    os.setgid(who.gid)
    os.setuid(who.uid)
    if lifeline is not None:
        # Taking another user clears the parent-death signal (prctl(2)), and as PID 1 of
        # the namespace nothing else would end this process if A died: set it again, then
        # make sure A did not die meanwhile.
        linux.set_parent_death_signal(signal.SIGKILL)
        if select.select([lifeline], [], [], 0)[0]:
            os._exit(1)
    try:
        os.chdir(spec.workdir or "/")
    except OSError as e:
        raise SetupError(f"cannot enter the working directory {spec.workdir}: {e.strerror}") from None
    for sig in range(1, signal.NSIG):
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    _close_on_exec_beyond_stdio()
    argv = spec.argv
    if not argv:
        raise SetupError("no command to run")
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise SetupError(f"exec: {argv[0]!r}: executable file not found in $PATH "
                         f"({env.get('PATH', '')})") from None
    except PermissionError:
        raise SetupError(f"exec: {argv[0]!r}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            raise SetupError(f"exec: {argv[0]!r}: exec format error (not a program for this "
                             "machine, or a script without #!)") from None
        raise

