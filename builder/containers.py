"""Containers, as Docker's storage documentation describes them: a thin writable layer over an
image's read-only layers, kept until it is removed.

`ROOT/containers/<id>/` holds one container:

* `config.json`: name, image, command and its state (created, running with the
  pid of its sandbox, exited with a code), written by atomic rename;
* `snap/`: the storage driver's dirs (for overlay and fuse, `snap/upper` is
  the writable layer; the image's layers are shared, never copied);
* `scratch/`: where the sandbox mounts a tmpfs for the files it bind-mounts (/etc/hosts, ...);
* `log`: what a detached container printed.

A container pins its image's layers (garbage collection keeps them) until
`pybuild rm`. Its size is what Docker calls SIZE: the bytes of the files in
its writable layer; its virtual size adds the image's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import time
from dataclasses import asdict, field

from .record import record
from .errors import PybuildError, UsageError
from .image import Image
from .store import lock as store_lock
from .trees import remove_tree, walk
from .store.lock import write_atomic


class ContainerNotFound(PybuildError):
    exit_code = 5

    def __init__(self, name: str):
        super().__init__(f"no such container: {name}",
                         hint="`pybuild ps -a` lists the containers")


@record(frozen=False)
class Container:
    id: str
    name: str
    image: str                     # as the user named it
    image_id: str
    diff_ids: list[str]
    argv: list[str]
    created: float
    env: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = "/"
    network: str = "host"          # host | none: what `pybuild start` runs it with again
    volumes: list = field(default_factory=list)   # [host dir, path in it, read-only] (-v)
    status: str = "created"        # created | running | exited
    pid: int = 0                   # the sandbox's first process while running
    pid_start: int = 0             # its start time (clock ticks), against pid reuse
    started: float = 0.0
    finished: float = 0.0
    exit_code: int | None = None
    dir: str = ""

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def upper(self) -> str:
        return os.path.join(self.dir, "snap", "upper")

    def running(self) -> bool:
        return self.status == "running" and self.pid > 0 and _start_ticks(self.pid) == self.pid_start


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None if it is gone (or a zombie
    nobody has reaped yet: its parent died, and it is dead all the same)."""
    from .linux import proc_stat
    fields = proc_stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class Containers:
    """The containers of one store."""

    def __init__(self, store):
        self.store = store
        self.dir = os.path.join(store.root, "containers")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = os.path.join(self.dir, ".lock")

    # ---- records ----------------------------------------------------------------------

    def create(self, image: Image, image_name: str, argv: list[str], *, name: str | None = None,
               env: list[str] = (), user: str = "", workdir: str = "/",
               network: str = "host", volumes=()) -> Container:
        with store_lock.locked(self._lock):
            if name is None:
                name = self._generated_name()
            elif not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise UsageError(f"invalid container name {name!r}",
                                 hint="use letters, digits, '_', '.' and '-'")
            for other in self.list(all=True):
                if other.name == name:
                    raise UsageError(f"the container name {name!r} is already in use by "
                                     f"container {other.short_id}",
                                     hint=f"remove it (`pybuild rm {name}`) or choose another")
            cid = os.urandom(32).hex()
            c = Container(cid, name, image_name, image.id, list(image.diff_ids), list(argv),
                          time.time(), list(env), user, workdir, network,
                          [list(v) for v in volumes], dir=os.path.join(self.dir, cid))
            os.mkdir(c.dir, 0o700)
            os.mkdir(os.path.join(c.dir, "scratch"), 0o700)
            self.save(c)
        return c

    def _generated_name(self) -> str:
        taken = {c.name for c in self.list(all=True)}
        n = len(taken) + 1
        while f"container_{n}" in taken:
            n += 1
        return f"container_{n}"

    def save(self, c: Container) -> None:
        data = asdict(c)
        data.pop("dir")
        write_atomic(os.path.join(c.dir, "config.json"), json.dumps(data, indent=1).encode())

    def _load(self, cid: str) -> Container | None:
        path = os.path.join(self.dir, cid, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return Container(**data, dir=os.path.join(self.dir, cid))
        except (OSError, ValueError, TypeError):
            return None

    def list(self, all: bool = True) -> list[Container]:
        out = []
        for cid in os.listdir(self.dir):
            if cid.startswith("."):
                continue
            c = self._load(cid)
            if c is not None and (all or c.running()):
                out.append(c)
        return sorted(out, key=lambda c: c.created, reverse=True)

    def get(self, ref: str) -> Container:
        """A container by name, full ID or unique ID prefix."""
        found = [c for c in self.list() if c.name == ref or c.id == ref]
        if not found and len(ref) >= 3:
            found = [c for c in self.list() if c.id.startswith(ref.lower())]
        if len(found) > 1:
            raise UsageError(f"{ref!r} names several containers", hint="give more of the ID")
        if not found:
            raise ContainerNotFound(ref)
        return found[0]

    def lock_path(self, c: Container) -> str:
        """The lock a container's start and a cp into it take: no two of them mount its
        writable layer at once (two overlays over one upper dir corrupt it)."""
        return os.path.join(c.dir, "lock")

    def remove(self, c: Container, force: bool = False) -> None:
        if c.running():
            if not force:
                raise UsageError(f"container {c.name} is running",
                                 hint=f"stop it first (`pybuild stop {c.name}`), or use rm -f")
            self.stop(c, timeout=0)
        remove_tree(c.dir, ignore_errors=True)

    # ---- state ----------------------------------------------------------------------------

    def mark_running(self, c: Container, pid: int) -> None:
        c.status, c.pid, c.started = "running", pid, time.time()
        c.pid_start = _start_ticks(pid) or 0
        self.save(c)

    def mark_exited(self, c: Container, code: int) -> None:
        c.status, c.exit_code, c.finished = "exited", code, time.time()
        self.save(c)

    def status_text(self, c: Container) -> str:
        """Docker's STATUS column: `Up 3 minutes`, `Exited (0) 2 seconds ago`, `Created`."""
        from .cli_format import ago, duration
        if c.running():
            return f"Up {duration(time.time() - c.started)}"
        if c.status == "created":
            return "Created"
        if c.exit_code is None:     # its monitor died with it (kill -9)
            return "Exited (137) " + ago(c.finished or c.started or c.created)
        return f"Exited ({c.exit_code}) {ago(c.finished)}"

    def kill(self, c: Container, sig: int) -> None:
        """`docker kill`: `sig` to the container's PID 1 (SIGKILL: to the whole sandbox)."""
        if not c.running():
            raise UsageError(f"container {c.name} is not running")
        from .sandbox import init_of
        target = c.pid if sig == signal.SIGKILL else (init_of(c.pid) or c.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)
        if sig == signal.SIGKILL:
            deadline = time.time() + 5
            while _start_ticks(c.pid) == c.pid_start and time.time() < deadline:
                time.sleep(0.02)

    def stop(self, c: Container, timeout: float = 10) -> None:
        """SIGTERM to the container's PID 1 (which passes it on), SIGKILL after `timeout`."""
        if not c.running():
            return
        from .sandbox import init_of
        init = init_of(c.pid)
        target = init or c.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM if timeout > 0 else signal.SIGKILL)
        deadline = time.time() + timeout
        while c.running() and time.time() < deadline:
            time.sleep(0.05)
            c = self._load(c.id) or c
        if c.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.pid, signal.SIGKILL)
            deadline = time.time() + 5
            while _start_ticks(c.pid) == c.pid_start and time.time() < deadline:
                time.sleep(0.02)

    # ---- sizes and changes ------------------------------------------------------------------

    @contextlib.contextmanager
    def writable_layer(self, c: Container):
        """The container's writable layer in overlay form, for the block: its upper dir, or for
        the vfs driver (no upper dir) its changes worked out into a temp dir."""
        snap = os.path.join(c.dir, "snap")
        if self.store.driver != "vfs" or not os.path.isdir(os.path.join(snap, "merged")):
            yield c.upper
            return
        from .snapshot import vfs
        with self.store.tmpdir("container-layer") as tmp:
            upper = os.path.join(tmp, "upper")
            os.mkdir(upper)
            base = vfs.full_root(self.store, c.diff_ids, tmp)
            vfs.write_changes(os.path.join(snap, "work"), base, os.path.join(snap, "merged"),
                              upper, {})
            yield upper

    def size(self, c: Container) -> int:
        """SIZE: the bytes of the files in the writable layer (directories count nothing,
        hard links once), as Docker counts it."""
        with self.writable_layer(c) as layer:
            return tree_size(layer)

    def pinned_chains(self) -> set[str]:
        from .image import chain_ids
        out: set[str] = set()
        for c in self.list():
            out.update(chain_ids(c.diff_ids))
        return out


def tree_size(root: str) -> int:
    total, seen = 0, set()
    for dirpath, _dirs, files in walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue                                  # a whiteout
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def changes(store, diff_ids: list[str], upper: str) -> list[tuple[str, str]]:
    """`pybuild diff`: (A|C|D, /path) for the writable layer `upper` over the image's layers."""
    from .layer import whiteout
    lowers = [os.path.join(store.root, p) for p in store.lower_links(diff_ids)] if diff_ids else []
    out: list[tuple[str, str]] = []
    for dirpath, dirs, files in walk(upper):
        dirs.sort()
        rel_dir = os.path.relpath(dirpath, upper)
        for name in sorted(dirs + files):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            if whiteout.is_whiteout(st, []):
                out.append(("D", "/" + rel))
            else:
                out.append(("C" if in_layers(lowers, rel) else "A", "/" + rel))
    return sorted(out, key=lambda change: change[1])


def in_layers(lowers: list[str], rel: str) -> bool:
    """Is `rel` in the union of `lowers` (topmost first), whiteouts and opaque dirs applied?"""
    from .layer import whiteout
    parts = rel.split("/")
    for layer in lowers:
        for i in range(1, len(parts) + 1):
            path = os.path.join(layer, *parts[:i])
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break
            if whiteout.is_whiteout(st, []):
                return False
            if i == len(parts):
                return True
            if not stat.S_ISDIR(st.st_mode):
                return False
            if whiteout.is_opaque(path, os.listxattr(path, follow_symlinks=False)):
                # Nothing below this layer shows through here: this layer decides.
                return os.path.lexists(os.path.join(layer, *parts))
    return False
