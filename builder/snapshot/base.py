"""What every storage driver hands the sandbox: one step's root, and its changes afterwards.

A snapshot is a stack of read-only layer dirs (`lowers`, topmost first)
plus an empty `upper` dir, shown together at `merged`. Whatever the driver,
the changes end up in `upper` in one format, the kernel overlay's (new and
changed entries as themselves, deletions as 0/0 character devices, replaced
directories with the opaque xattr), so that committing a layer
(layer/diff.py) is the same code for every driver.

The life of a snapshot, and who calls what:

* `prepare` (the parent, in the driver module) creates the dirs;
* `mount()` and `unmount()` run in a child process that owns a private mount
  namespace (sandbox.py), so the host never sees a mount;
* `stop()` runs in that child after the command has exited and the root may
  no longer be reachable by path (a RUN pivots into it): it makes sure every
  change has reached `upper`;
* `finish()` runs in the parent, after the child is gone, before the upper
  dir is committed.
"""

from __future__ import annotations

import os
from dataclasses import field

from ..record import record


@record(frozen=False)
class Snapshot:
    store_root: str           # working directory for the relative lower paths
    lowers: list[str]         # topmost first, relative to store_root (or absolute)
    upper: str
    work: str
    merged: str
    extra_lowers: list[str] = field(default_factory=list)   # e.g. the init dir, above the rest

    driver = "base"
    # The dirs a used snapshot leaves in its step dir that are small enough to be left for the
    # build's end (executor.py says why); a driver that copies the root keeps none. (Not
    # annotated: an annotation would make it a dataclass field, whose default every
    # instance would get, hiding a driver's own set.)
    small_dirs = frozenset()

    def mount(self) -> None:
        raise NotImplementedError

    def unmount(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """After the command, in the mounting process: every change is in `upper` when it returns."""

    def finish(self) -> None:
        """In the parent, after the sandbox has gone: complete `upper` (a driver without
        copy-on-write works out its changes here)."""

    @property
    def direct_dir(self) -> str:
        """Where new files may be written straight after `unmount()` (fileops.finish_in_upper):
        the upper dir, or for a driver that diffs later, the merged dir itself."""
        return self.upper

    def lower_paths(self) -> list[str]:
        """Absolute lower dirs, topmost first, the extra ones included."""
        return [p if os.path.isabs(p) else os.path.join(self.store_root, p)
                for p in self.extra_lowers + self.lowers]
