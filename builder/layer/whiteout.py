"""The one place that knows how overlayfs and OCI layer tars say "deleted" and "replaced".

In an overlay upper (or lower) dir a deleted name is a character device 0/0
(newer kernels may also write a zero-size file carrying the xattr
`trusted.overlay.whiteout`), and a directory whose lower contents are hidden
carries the xattr `trusted.overlay.opaque=y` (`user.overlay.*` when mounted
with `userxattr`). In a layer tar (OCI image spec, layer.md) the first is a
file `.wh.<name>`, the second a file `.wh..wh..opq` inside the directory.
We read every form and write the classic ones.
"""

from __future__ import annotations

import os
import stat

PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
# Bookkeeping overlayfs writes into an upper dir (origin file handles, the
# layer uuid, "impure" markers): meaningless once the dir becomes a lower.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def is_whiteout(st: os.stat_result, xattrs: list[str] | tuple = ()) -> bool:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return stat.S_ISREG(st.st_mode) and st.st_size == 0 and any(x in WHITEOUT_XATTRS for x in xattrs)


def is_opaque(target: str | int, xattrs: list[str] | tuple) -> bool:
    """Whether the directory at `target` (a path, or an open descriptor) is marked opaque."""
    for name in OPAQUE_XATTRS:
        if name in xattrs:
            try:
                if os.getxattr(target, name, follow_symlinks=isinstance(target, int)) == b"y":
                    return True
            except OSError:
                pass
    return False


def make_whiteout(path: str) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque_xattr() -> str:
    """The name to mark an opaque dir with: `user.overlay.opaque` in a user namespace, where
    overlayfs is mounted with `userxattr` and trusted.* cannot be written."""
    from ..rootless import in_user_namespace
    return OPAQUE_XATTRS[1] if in_user_namespace() else OPAQUE_XATTRS[0]


def make_opaque(path: str) -> None:
    os.setxattr(path, opaque_xattr(), b"y", follow_symlinks=False)
