"""Rootless pybuild: a user with subordinate ids builds as root of a user namespace of its own.

When pybuild starts as a non-root user it forks; the child leaves for a new
user namespace, and the parent maps ids into it with `newuidmap` and
`newgidmap` (package uidmap; they read the user's ranges in /etc/subuid and
/etc/subgid):

    namespace uid 0        -> the user's own uid
    namespace uids 1..N    -> the user's subordinate range (N ids)

and likewise for gids. The child becomes uid 0 there and carries on with
the command; the parent forwards signals and exits with the child's code.
Inside, files owned by root and by any mapped id keep those ids in layers
and tars (the namespace's view is what is archived); an id beyond the range
cannot exist on disk and is an error, as with rootless Docker and Podman.

The store defaults to `$XDG_DATA_HOME/pybuild` (`~/.local/share/pybuild`).
Overlay mounts in a user namespace keep their bookkeeping in `user.overlay.*`
xattrs (mount option `userxattr`); the fuse driver serves hosts whose kernel
refuses even that.
"""

from __future__ import annotations

import os

from .errors import PybuildError, UsageError

_MARKER = "_PYBUILD_IN_USERNS"


_userns: bool | None = None


def in_user_namespace() -> bool:
    """Are we in a user namespace other than the host's (whose uid_map maps everything)?"""
    global _userns
    if _userns is None:
        _userns = _read_uid_map()
    return _userns


def _read_uid_map() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines != ["0", "0", "4294967295"]


def default_root() -> str:
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(data, "pybuild")


def subordinate_range(path: str, name: str, uid: int) -> tuple[int, int] | None:
    """(start, count) of the first range /etc/subuid (or subgid) gives the user."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] in (name, str(uid)):
                    return int(parts[1]), int(parts[2])
    except (OSError, ValueError):
        return None
    return None


def enter() -> None:
    """Become root of a new user namespace (the child returns; the parent never does)."""
    import pwd
    import shutil
    import signal
    import subprocess
    uid, gid = os.getuid(), os.getgid()
    name = pwd.getpwuid(uid).pw_name
    subuid = subordinate_range("/etc/subuid", name, uid)
    subgid = subordinate_range("/etc/subgid", name, uid)
    if subuid is None or subgid is None:
        raise UsageError(f"rootless pybuild needs subordinate ids for {name} in /etc/subuid and "
                         "/etc/subgid",
                         hint=f"as root: usermod --add-subuids 100000-165535 --add-subgids "
                              f"100000-165535 {name}")
    tools = [shutil.which(t) for t in ("newuidmap", "newgidmap")]
    if not all(tools):
        raise UsageError("rootless pybuild needs newuidmap and newgidmap",
                         hint="install them: apt-get install uidmap")
    os.environ.setdefault("PYBUILD_ROOT", default_root())
    os.environ[_MARKER] = "1"
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        from . import linux
        try:
            linux.unshare(linux.CLONE_NEWUSER)
        except OSError as e:
            os.write(unshared_w, f"unshare: {e.strerror}".encode())
            os._exit(1)
        os.write(unshared_w, b"ok")
        os.close(unshared_w)
        if os.read(mapped_r, 64) != b"ok":
            os._exit(1)
        os.close(mapped_r)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        global _userns
        _userns = True
        return                      # the command goes on, as root of the namespace
    os.close(unshared_w)
    os.close(mapped_r)
    answer = os.read(unshared_r, 256)
    if answer != b"ok":
        os.waitpid(pid, 0)
        raise PybuildError(f"cannot create a user namespace ({answer.decode(errors='replace')})",
                           hint="check that unprivileged user namespaces are allowed "
                                "(sysctl kernel.unprivileged_userns_clone=1)")
    for tool, own, (start, count) in ((tools[0], uid, subuid), (tools[1], gid, subgid)):
        p = subprocess.run([tool, str(pid), "0", str(own), "1", "1", str(start), str(count)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise PybuildError(f"{os.path.basename(tool)} failed: {p.stderr.strip()}",
                               hint="check /etc/subuid and /etc/subgid")
    os.write(mapped_w, b"ok")
    os.close(mapped_w)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else
             128 + os.WTERMSIG(status))


def needed() -> bool:
    """Should this process enter a user namespace first?"""
    return os.geteuid() != 0 and not os.environ.get(_MARKER)
