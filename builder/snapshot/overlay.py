"""The kernel overlay driver: a step's root = read-only layer dirs + one fresh, empty upper dir.

`prepare` creates the dirs in a temp dir of the store; `mount` is called in
the child process that owns a private mount namespace (see sandbox.py), so
the mount is never visible in the host's mount table and vanishes with the
namespace however pybuild ends.

The options make the upper dir a self-contained diff: with `redirect_dir`
or `metacopy` on, a renamed directory or a chmod would leave only an xattr
pointing into a lower layer. Lower dirs are named by their short links
(`l/<id>`) relative to the store root, the mounting process's working
directory, so that many layers fit in the one page a mount option string
may take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import linux
from ..errors import StoreError

OPTIONS = "index=off,redirect_dir=off,metacopy=off"
_PAGE = 4096


@dataclass
class Snapshot:
    store_root: str           # working directory for the relative lower paths
    lowers: list[str]         # topmost first, relative to store_root (or absolute)
    upper: str
    work: str
    merged: str
    extra_lowers: list[str] = field(default_factory=list)   # e.g. the init dir, above the rest

    def options(self) -> str:
        lowers = self.extra_lowers + self.lowers
        opts = f"lowerdir={':'.join(lowers)},upperdir={self.upper},workdir={self.work},{OPTIONS}"
        if len(opts) >= _PAGE:
            raise StoreError(f"the image has too many layers ({len(self.lowers)}) for one overlay "
                             "mount option string",
                             hint="squash some steps into one RUN")
        return opts

    def mount(self) -> None:
        """Mount at `merged`; only in a process that has its own mount namespace."""
        os.chdir(self.store_root)
        linux.mount("overlay", self.merged, "overlay", 0, self.options())

    def unmount(self) -> None:
        linux.umount(self.merged)


def prepare(store, diff_ids: list[str], workdir: str) -> Snapshot:
    """Dirs for a new snapshot over the layers `diff_ids` (bottom first) inside `workdir`."""
    lowers = store.lower_links(diff_ids)
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    if not lowers:
        empty = os.path.join(workdir, "empty")
        os.mkdir(empty, 0o755)
        lowers = [empty]
    snap = Snapshot(store.root, lowers, os.path.join(workdir, "upper"),
                    os.path.join(workdir, "work"), os.path.join(workdir, "merged"))
    for d in (snap.upper, snap.work, snap.merged):
        os.mkdir(d, 0o755)
    return snap
