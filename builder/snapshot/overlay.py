"""The kernel overlay driver: a step's root = read-only layer dirs + one fresh, empty upper dir.

`prepare` creates the dirs in a temp dir of the store; `mount` is called in
the child process that owns a private mount namespace (see sandbox.py), so
the mount is never visible in the host's mount table and vanishes with the
namespace however pybuild ends.

The options make the upper dir a self-contained diff: with `redirect_dir`
or `metacopy` on, a renamed directory or a chmod would leave only an xattr
pointing into a lower layer.

Depth: where the kernel has the new mount API with `lowerdir+` (Linux 6.8),
each lower dir is one fsconfig call and there is no limit on the option
string; elsewhere lower dirs are named by their short links (`l/<id>`,
relative to the store root) in one option string of at most a page. Either
way a stack never holds more than MAX_STACK lower dirs: beyond that, the
oldest layers are flattened, in chunks of FLATTEN_CHUNK, into cached
directories (`flat/<chain-id>`) that replace them, so a 1,000-step build
mounts the same few dozen dirs at its last step as at its tenth, and never
meets overlayfs's own limit of 500.
"""

from __future__ import annotations

import os

from .. import linux
from ..errors import StoreError
from ..trees import remove_tree
from .base import Snapshot

_OPTION_DICT = {"index": "off", "redirect_dir": "off", "metacopy": "off"}
_PAGE = 4096
MAX_STACK = 64           # lower dirs of one mount, at most
FLATTEN_CHUNK = 32       # flattened prefixes are multiples of this many layers
FLATTEN_LEAD = 16        # steps before it is needed that a prefix starts being made (flatten.py)

_new_api: bool | None = None     # does the kernel take `lowerdir+`? (probed on first mount)
_volatile: bool | None = None    # and `volatile` (Linux 5.10)?


def mount_overlay(target: str, lowers: list[str], upper: str | None = None,
                  work: str | None = None, *, readonly: bool = False) -> None:
    """Mount an overlay at `target` (in a private mount namespace), by the best API the kernel has.

    Relative lower paths are relative to the current directory. A writable
    overlay is `volatile`: its unmount would otherwise sync the whole upper
    filesystem (seconds after a RUN that wrote a lot), and a step's upper dir
    is only kept once the step has finished and been archived.
    """
    global _new_api, _volatile
    from ..rootless import in_user_namespace
    # In a user namespace overlayfs keeps its xattrs (opaque, whiteout) in user.overlay.*.
    userxattr = in_user_namespace()
    flags = ("volatile",) if upper and _volatile is not False else ()
    options = _OPTION_DICT
    if userxattr:
        flags += ("userxattr",)
        # redirect_dir=off means "follow old redirects", which needs trusted xattrs.
        options = {**_OPTION_DICT, "redirect_dir": "nofollow"}
    if _new_api is not False:
        try:
            linux.mount_overlay(target, lowers, upper, work, options, readonly=readonly,
                                flags=flags)
            _new_api = True
            _volatile = _volatile or "volatile" in flags
            return
        except OSError as e:
            if e.errno not in (22, 38):      # EINVAL (no lowerdir+ or volatile), ENOSYS
                raise
            if "volatile" in flags and "volatile" in str(e):
                _volatile = False
                return mount_overlay(target, lowers, upper, work, readonly=readonly)
            if _new_api:
                raise
            _new_api = False
    opts = f"lowerdir={':'.join(lowers)}"
    if upper:
        opts += f",upperdir={upper},workdir={work}"
    opts += "," + ",".join(f"{k}={v}" for k, v in options.items()) + \
        (",userxattr" if userxattr else "")
    flags = tuple(f for f in flags if f != "userxattr")
    if flags:
        try:
            linux.mount("overlay", target, "overlay", 0, opts + ",volatile")
            _volatile = True
            return
        except OSError as e:
            if e.errno != 22:
                raise
            _volatile = False
    if len(opts) >= _PAGE:
        raise StoreError(f"{len(lowers)} layers do not fit in one overlay mount option string "
                         "on this kernel (before Linux 6.8)", hint="squash some steps into one RUN")
    linux.mount("overlay", target, "overlay", linux.MS_RDONLY if readonly else 0, opts)


class OverlaySnapshot(Snapshot):
    """The kernel does the copy-on-write: `upper` is the change set as soon as the step ends."""

    driver = "overlay"
    small_dirs = frozenset({"upper", "work", "merged", "empty"})   # (upper: moved, or empty)

    def mount(self) -> None:
        """Mount at `merged`; only in a process that has its own mount namespace."""
        os.chdir(self.store_root)
        # A volatile overlay marks its work dir, and the kernel refuses to mount over the
        # mark: a second mount removes it first. (Not every unmount: most snapshots are
        # mounted once, and their dirs are left for the build's end, see executor.py.)
        incompat = os.path.join(self.work, "work", "incompat")
        if os.path.lexists(incompat):
            remove_tree(incompat)
        mount_overlay(self.merged, self.extra_lowers + self.lowers, self.upper, self.work)

    def unmount(self) -> None:
        """Unmount; the snapshot can be mounted again (its upper dir is kept)."""
        linux.umount(self.merged)


def prepare(store, diff_ids: list[str], workdir: str, kind=None, reuse: bool = False) -> Snapshot:
    """Dirs for a new snapshot over the layers `diff_ids` (bottom first) inside `workdir`.

    `kind` is the Snapshot class (another driver that stacks the same lower dirs);
    `reuse`: the dirs an earlier snapshot left there, its upper dir kept (a container
    started again).
    """
    lowers = lower_stack(store, diff_ids)
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    if not lowers:
        empty = os.path.join(workdir, "empty")
        os.makedirs(empty, 0o755, exist_ok=reuse)
        lowers = [empty]
    snap = (kind or OverlaySnapshot)(store.root, lowers, os.path.join(workdir, "upper"),
                                     os.path.join(workdir, "work"), os.path.join(workdir, "merged"))
    for d in (snap.upper, snap.work, snap.merged):
        os.makedirs(d, 0o755, exist_ok=reuse)
    return snap


def lower_stack(store, diff_ids: list[str], ahead: bool = True) -> list[str]:
    """The lower dirs (topmost first) that show the layers `diff_ids`: at most MAX_STACK of them
    (relative to the store's dir, as lower_links gives them).

    Below that depth, the oldest layers are shown by a flattened union of them
    (flatten.py); `ahead`: a stack a build's steps will grow, whose next
    union is then started in the background (not for a stage's or image's
    files mounted once: `COPY --from`, `RUN --mount=from=`, `pybuild cp`).
    """
    if len(diff_ids) <= MAX_STACK:
        return store.lower_links(diff_ids)         # topmost first
    from ..image import chain_ids
    from . import flatten
    flat_depth = (len(diff_ids) - MAX_STACK // 2) // FLATTEN_CHUNK * FLATTEN_CHUNK
    chains = chain_ids(diff_ids)
    flat = flatten.flattened(store, diff_ids[:flat_depth], chains[flat_depth - 1])
    nxt = flat_depth + FLATTEN_CHUNK       # what this stack's steps will need next
    if ahead and len(diff_ids) >= max(nxt, nxt + MAX_STACK // 2 - FLATTEN_LEAD):
        flatten.make_ahead(store, diff_ids[:nxt], chains[nxt - 1])
    top = store.lower_links(diff_ids, top=len(diff_ids) - flat_depth)
    return top + [flat]


def works(store_root: str) -> bool:
    """Can this host mount an overlay over dirs of this store's filesystem? (a child tries)"""
    import tempfile
    tmp = tempfile.mkdtemp(prefix="probe-", dir=os.path.join(store_root, "tmp"))
    try:
        dirs = [os.path.join(tmp, d) for d in ("lower", "upper", "work", "merged")]
        for d in dirs:
            os.mkdir(d)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                linux.private_mount_namespace()
                mount_overlay(dirs[3], [dirs[0]], dirs[1], dirs[2])
                code = 0
            except BaseException:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0
    finally:
        remove_tree(tmp, ignore_errors=True)
