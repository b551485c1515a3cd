"""Storage drivers: how one step's root filesystem is put together from layers.

Three drivers, one interface (base.Snapshot), one change-set format in the
upper dir:

* `overlay`: the kernel's overlayfs (overlay.py), the default where it works;
* `fuse`: our own union filesystem over FUSE (fuse/), for hosts whose kernel
  refuses overlay mounts (some containers and user namespaces);
* `vfs`: full copies, no copy-on-write (vfs.py): slow, works anywhere.

A store keeps the driver it was first used with (the file `driver` in its
root), so that it is never mixed: `--storage-driver` or
`$PYBUILD_STORAGE_DRIVER` choose it for a new store and must agree with an
existing one. Without either, a probe picks the first that works here.
"""

from __future__ import annotations

import os
import sys

from ..errors import StoreError, UsageError

DRIVERS = ("overlay", "fuse", "vfs")


def prepare(store, diff_ids: list[str], workdir: str):
    """A new snapshot over the layers `diff_ids` (bottom first), in `workdir`, by the store's driver."""
    driver = store.driver
    if driver == "overlay":
        from . import overlay
        return overlay.prepare(store, diff_ids, workdir)
    if driver == "fuse":
        from .fuse import snapshot
        return snapshot.prepare(store, diff_ids, workdir)
    from . import vfs
    return vfs.prepare(store, diff_ids, workdir)


def reopen(store, diff_ids: list[str], workdir: str):
    """The snapshot a container's earlier run left in `workdir`, its changes kept, to run in
    again (`pybuild start`); a new one if it never ran."""
    if not os.path.isdir(os.path.join(workdir, "upper")):
        return prepare(store, diff_ids, workdir)
    driver = store.driver
    if driver == "overlay":
        from . import overlay
        return overlay.prepare(store, diff_ids, workdir, reuse=True)
    if driver == "fuse":
        from .fuse import snapshot
        return snapshot.prepare(store, diff_ids, workdir, reuse=True)
    from . import vfs
    return vfs.reopen(store, workdir)


def finish_background_work() -> None:
    """Wait for the flattened snapshots still being made ahead of time (flatten.py)."""
    flatten = sys.modules.get(__name__ + ".flatten")     # (never imported by a shallow build)
    if flatten is not None:
        flatten.finish_pending()


def choose(store_root: str, requested: str | None) -> str:
    """The driver of the store at `store_root`: kept, requested, or probed (and then kept)."""
    requested = requested or os.environ.get("PYBUILD_STORAGE_DRIVER") or None
    if requested is not None and requested not in DRIVERS:
        raise UsageError(f"unknown storage driver {requested!r}",
                         hint="choose one of " + ", ".join(DRIVERS))
    path = os.path.join(store_root, "driver")
    try:
        with open(path, encoding="ascii") as f:
            kept = f.read().strip()
    except FileNotFoundError:
        kept = None
    if kept:
        if requested and requested != kept:
            raise StoreError(f"the store {store_root} uses the {kept} storage driver, not "
                             f"{requested}",
                             hint=f"use --storage-driver {kept}, or another store (--root DIR) "
                                  f"for {requested}")
        return kept
    chosen = requested or probe(store_root)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(chosen + "\n")
    try:
        os.link(tmp, path)          # the first process to choose wins
    except FileExistsError:
        os.unlink(tmp)
        return choose(store_root, requested)
    os.unlink(tmp)
    return chosen


def probe(store_root: str) -> str:
    """The first driver that works on this host, for this store's filesystem."""
    from . import overlay
    if overlay.works(store_root):
        return "overlay"
    from .fuse import snapshot as fuse_snapshot
    if fuse_snapshot.works():
        return "fuse"
    return "vfs"
