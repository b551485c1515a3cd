"""`pybuild run` and `pybuild exec`: containers as Docker's storage docs describe them.

A container is a fresh, empty writable layer over the image's read-only
layers (containers.py keeps its record); the command runs in the same
sandbox as a RUN step. In the foreground it has pybuild's own stdin, stdout
and stderr. Detached (`-d`), a monitor process of its own (a daemon: new
session, no parent to die with) runs it, writes its output to the
container's log, and records its exit; `pybuild run` returns once the
container has started. Without `--rm` the container stays, stopped, until
`pybuild rm`.
"""

from __future__ import annotations

import copy
import os
import sys
import threading

from . import sandbox
from .cache import now
from .containers import Container, Containers
from .errors import BuildError, UsageError
from .image import Image, chain_ids
from .store import Store


def command_of(image: Image, args: list[str], entrypoint: str | None = None) -> list[str]:
    """Entrypoint + (args or the image's Cmd), as `docker run` puts them together.

    `--entrypoint` replaces the image's Entrypoint and drops its Cmd, as in Docker.
    """
    rt = image.runtime
    if entrypoint is not None:
        argv = ([entrypoint] if entrypoint else []) + list(args)
    else:
        argv = list(rt.get("Entrypoint") or []) + (list(args) or list(rt.get("Cmd") or []))
    if not argv:
        raise UsageError("no command specified: the image has neither Entrypoint nor Cmd",
                         hint="give the command after the image name")
    return argv


def run(store: Store, image: Image, image_name: str, args: list[str], *, env: list[str] = (),
        user: str | None = None, workdir: str | None = None, network: str = "host",
        entrypoint: str | None = None, name: str | None = None, detach: bool = False,
        interactive: bool = False, tty: bool = False, remove: bool = False,
        volumes=()) -> int | str:
    """Create and start a container; the exit status (foreground) or the container ID (-d)."""
    containers = Containers(store)
    c = create(store, image, image_name, args, env=env, user=user, workdir=workdir,
               entrypoint=entrypoint, name=name, network=network, volumes=volumes)
    spec = _spec_of(c)
    if detach:
        return _start_detached(store, containers, c, spec, interactive, tty, remove)
    try:
        with store.in_use():
            code = _run_sandbox(store, containers, c, spec)
    finally:
        if remove:
            containers.remove(containers._load(c.id) or c, force=True)
    return code


def create(store: Store, image: Image, image_name: str, args: list[str], *,
           env: list[str] = (), user: str | None = None, workdir: str | None = None,
           entrypoint: str | None = None, name: str | None = None,
           network: str = "host", volumes=()) -> Container:
    """A container of `image` that has not run (`pybuild create`; `run` starts one): its
    command, environment, user and working dir as `docker create` works them out.
    `volumes`: (host dir, path in the container, read-only) bind mounts (parse_volume)."""
    rt = image.runtime
    argv = command_of(image, args, entrypoint)
    env = _merge_env(rt.get("Env") or [], env)
    user = rt.get("User") or "" if user is None else user
    workdir = workdir or rt.get("WorkingDir") or "/"
    with store.in_use():
        return Containers(store).create(image, image_name, argv, name=name, env=env, user=user,
                                        workdir=workdir, network=network, volumes=volumes)


def start(store: Store, ref: str, *, attach: bool = False, interactive: bool = False) -> int:
    """`pybuild start`: run a created or stopped container's command again, in its own
    writable layer (what an earlier run changed is still there). Attached, its exit status;
    else it runs detached (its output to `pybuild logs`) and this returns 0 once it has
    started. A running container is left as it is."""
    from .store import lock as store_lock
    containers = Containers(store)
    c = containers.get(ref)
    if c.running():
        return 0                # (not waiting for the lock: a running one may hold it)
    # (Held until it runs, and in the foreground while it runs: a cp into it is told so.)
    with store_lock.locked(containers.lock_path(c)):
        c = containers._load(c.id) or c
        if c.running():
            return 0
        spec = _spec_of(c)
        if not attach:
            _start_detached(store, containers, c, spec, interactive, False, False)
            return 0
        with store.in_use():
            return _run_sandbox(store, containers, c, spec)


def _spec_of(c: Container) -> "sandbox.RunSpec":
    mounts = [sandbox.MountSpec(target, "bind", source=host, readonly=readonly)
              for host, target, readonly in c.volumes]
    return sandbox.RunSpec(argv=c.argv, env=c.env, user=c.user, workdir=c.workdir,
                           network=c.network, interactive=True, mounts=mounts)


VOLUME_OPTIONS = {"ro": True, "rw": False, "z": None, "Z": None, "consistent": None,
                  "cached": None, "delegated": None}     # (SELinux and macOS ones: no effect)


def parse_volume(spec: str) -> tuple[str, str, bool]:
    """`-v HOST:CONTAINER[:OPTIONS]` as `docker run` takes it: (host dir, path, read-only).

    The host path must be absolute (a name would be one of Docker's named
    volumes, which pybuild does not have); one that does not exist is made, a
    directory, as Docker makes it.
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise UsageError(f"-v {spec}: give HOST:CONTAINER[:ro]",
                         hint="pybuild has no anonymous or named volumes: mount a directory "
                              "of this machine, -v \"$PWD\":/src")
    host, target = parts[0], parts[1]
    if not host.startswith("/"):
        raise UsageError(f"-v {spec}: {host!r} is not an absolute path",
                         hint="pybuild has no named volumes: give a directory of this "
                              "machine, -v \"$PWD\":/src")
    if not target.startswith("/"):
        raise UsageError(f"-v {spec}: the path in the container must be absolute")
    readonly = False
    for option in parts[2].split(",") if len(parts) == 3 else ():
        if option not in VOLUME_OPTIONS:
            raise UsageError(f"-v {spec}: unknown option {option!r}",
                             hint="ro or rw (z, Z, cached, delegated are accepted)")
        readonly = VOLUME_OPTIONS[option] if VOLUME_OPTIONS[option] is not None else readonly
    if not os.path.exists(host):
        os.makedirs(host)
    return os.path.realpath(host), target, readonly


def _run_sandbox(store, containers: Containers, c: Container, spec, started=None) -> int:
    from . import snapshot
    # (A container that ran before keeps its writable layer: `pybuild start` again.)
    snap = snapshot.reopen(store, c.diff_ids, os.path.join(c.dir, "snap"))

    def on_start(pid: int) -> None:
        containers.mark_running(c, pid)
        if started is not None:
            started()
    try:
        code = sandbox.run(snap, spec, os.path.join(c.dir, "scratch"), started=on_start)
    except sandbox.SetupError as e:
        containers.mark_exited(c, 127)
        raise BuildError(str(e), step=f"container {c.name}", hint=e.hint) from None
    containers.mark_exited(c, code)
    return code


def _start_detached(store, containers: Containers, c: Container, spec, interactive: bool,
                    tty: bool, remove: bool) -> str:
    """Fork the container's monitor (a daemon) and return once the command has started."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _monitor(store, containers, c, spec, interactive, tty, remove, ready_w)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.waitpid(pid, 0)
    # One message ("started" or what went wrong); not EOF: the container's processes
    # inherit the pipe from the monitor and keep it open for their whole life.
    try:
        answer = os.read(ready_r, 65536).decode(errors="replace")
    finally:
        os.close(ready_r)
    if answer != "started":
        raise BuildError(answer or "the container's monitor died", step=f"container {c.name}")
    c = containers._load(c.id) or c
    sandbox.wait_ready(c.pid)           # in its root: `pybuild exec` may follow at once
    return c.id


def _monitor(store, containers, c, spec, interactive: bool, tty: bool, remove: bool,
             ready_w: int) -> None:
    """The detached container's parent: its stdio is the container's log (or a terminal whose
    output goes there), it waits for the command and records how it ended."""
    _close_other_fds(keep=ready_w)        # a daemon keeps nothing of the command line's
    log = os.open(os.path.join(c.dir, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    keep_open = None
    if tty:
        master, slave = os.openpty()
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
        threading.Thread(target=_copy_out, args=(master, log), daemon=True).start()
    else:
        if interactive:             # stdin stays open (nobody writes to it), as with docker -di
            stdin_r, keep_open = os.pipe()
        else:
            stdin_r = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin_r, 0)
        os.close(stdin_r)
        os.dup2(log, 1)
        os.dup2(log, 2)
    sys.stdin = sys.stdout = sys.stderr = open(os.devnull, "w")

    def started() -> None:
        os.write(ready_w, b"started")
        os.close(ready_w)
    try:
        with store.in_use():
            _run_sandbox(store, containers, c, spec, started)
    except BaseException as e:        # told to `pybuild run` if it is still waiting
        try:
            os.write(ready_w, str(e).encode())
        except OSError:
            pass
    finally:
        if keep_open is not None:
            os.close(keep_open)
        if remove:
            try:
                containers.remove(containers._load(c.id) or c, force=True)
            except Exception:
                pass


def _close_other_fds(keep: int) -> None:
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _copy_out(master: int, log: int) -> None:
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            return
        if not data:
            return
        os.write(log, data)


def exec_in(store: Store, ref: str, args: list[str], *, env: list[str] = (),
            user: str | None = None, workdir: str | None = None) -> int:
    """`pybuild exec`: a command in a running container's namespaces and root."""
    containers = Containers(store)
    c = containers.get(ref)
    if not c.running():
        raise UsageError(f"container {c.name} is not running",
                         hint="`pybuild ps -a` shows its status")
    init = sandbox.wait_ready(c.pid)
    if init is None:
        raise UsageError(f"container {c.name} is not running")
    spec = sandbox.RunSpec(argv=list(args), env=_merge_env(c.env, env),
                           user=c.user if user is None else user,
                           workdir=workdir or c.workdir or "/", interactive=True)
    try:
        return sandbox.exec_in(init, spec)
    except sandbox.SetupError as e:
        raise BuildError(str(e), step=f"exec in {c.name}", hint=e.hint) from None


def commit(store: Store, ref: str, tag: str | None, message: str = "",
           author: str = "") -> Image:
    """`pybuild commit`: the container's writable layer becomes a new image layer."""
    from .layer import commit as layer_commit
    from .snapshot import vfs
    containers = Containers(store)
    c = containers.get(ref)
    image = store.resolve(c.image_id)
    with store.in_use(), store.tmpdir("commit") as tmp, containers.writable_layer(c) as layer:
        copy_dir = os.path.join(tmp, "layer")
        # A copy: the layer store takes the dir it is given, and the container keeps its own.
        vfs.clone_tree(layer, copy_dir)
        parent = chain_ids(image.diff_ids)[-1] if image.diff_ids else None
        created_by = " ".join(c.argv)
        layer = layer_commit.commit_upper(store, copy_dir, parent, created_by=created_by)
    config = copy.deepcopy(image.config)
    entry = {"created": now(), "created_by": created_by}
    if message:
        entry["comment"] = message
    if author:
        config["author"] = author
    if layer is None:
        entry["empty_layer"] = True
    else:
        config["rootfs"] = {"type": "layers", "diff_ids": list(image.diff_ids) + [layer.diff_id]}
    config["history"] = list(config.get("history") or []) + [entry]
    config["created"] = entry["created"]
    layers = list(image.layers) + ([layer] if layer else [])
    return store.write_image(config, layers, [tag] if tag else [])


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    out = {e.partition("=")[0]: e for e in base}
    for e in extra:
        k, eq, v = e.partition("=")
        out[k] = e if eq else f"{k}={os.environ.get(k, '')}"
    return list(out.values())
