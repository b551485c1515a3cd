"""Flattened snapshots: the union of a stack's oldest layers, cached as one directory.

A build deeper than `overlay.MAX_STACK` layers mounts `flat/<chain-id>` (the
merged view of its bottom layers, whiteouts applied) in their place. It is
made once per chain ID, by archiving the read-only union from inside a
mount namespace and extracting it with the same safe extractor layers use,
and is reused by every later step and build; it is not a layer of any image
(images keep their real layers), only a shortcut for mounting them.
"""

from __future__ import annotations

import os

from .. import sandbox
from ..layer import diff, extract


def flattened(store, diff_ids: list[str], chain: str) -> str:
    """The `l/<id>` link of the flattened union of `diff_ids` (whose chain ID is `chain`)."""
    if store.flats.has(chain):
        return store.flats.link(chain)
    with store.tmpdir("flatten") as tmp:
        tar_path = union_tar(store, diff_ids, tmp, strip_overlay_xattrs=False)
        staging = os.path.join(tmp, "diff")
        os.mkdir(staging, 0o755)
        with open(tar_path, "rb") as f:
            extract.extract(f, staging, what=f"flattened snapshot {chain[7:19]}")
        store.flats.install(chain, staging, {"chain": chain, "layers": len(diff_ids)}, store.tmp)
    return store.flats.link(chain)


def union_tar(store, diff_ids: list[str], tmp: str, *, strip_overlay_xattrs: bool = True) -> str:
    """Archive the merged view of `diff_ids` (whiteouts applied) to a tar in `tmp`; its path.

    The overlay is mounted read-only inside a private mount namespace and
    archived from there, so the host never sees the mount.
    """
    from . import prepare
    snap = prepare(store, diff_ids, os.path.join(tmp, "snap"))
    tar_path = os.path.join(tmp, "union.tar")
    fd = os.open(tar_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        def archive_root() -> None:
            with open(fd, "wb", buffering=1 << 20, closefd=False) as out:
                diff.write_tar("/", out, strip_overlay_xattrs=strip_overlay_xattrs)
        sandbox.run_in_root(snap, archive_root)
    finally:
        os.close(fd)
    return tar_path
