"""Flattened snapshots: the union of a stack's oldest layers, cached as one directory.

A build deeper than `overlay.MAX_STACK` layers mounts `flat/<chain-id>` (the
merged view of its bottom layers, whiteouts applied) in their place. It is
made once per chain ID, by archiving the read-only union from inside a
mount namespace and extracting it with the same safe extractor layers use,
and is reused by every later step and build; it is not a layer of any image
(images keep their real layers), only a shortcut for mounting them.

A deep build needs a new one every FLATTEN_CHUNK steps, and can make it
before it is needed: make_ahead() starts it in a thread FLATTEN_LEAD steps
ahead (late enough that a build which ends first rarely made it for
nothing) while the steps go on, on another core, and the step that needs
it waits only for what is left. Made in the step itself, each cost 60-80
ms, 2-3 ms of every step of a 1,000-step build. The engine waits for what
is still being made when a build ends (finish_pending).
"""

from __future__ import annotations

import os
import threading

from .. import sandbox
from ..layer import diff, extract

_pending: dict[tuple[str, str], threading.Thread] = {}    # (store root, chain) -> its maker
_pending_lock = threading.Lock()


def flattened(store, diff_ids: list[str], chain: str) -> str:
    """The `l/<id>` link of the flattened union of `diff_ids` (whose chain ID is `chain`)."""
    with _pending_lock:
        maker = _pending.get((store.root, chain))
    if maker is not None and maker is not threading.current_thread():
        maker.join()
    if store.flats.has(chain):
        return store.flats.link(chain)
    _make(store, diff_ids, chain)
    return store.flats.link(chain)


def make_ahead(store, diff_ids: list[str], chain: str) -> None:
    """Start making the flattened union of `diff_ids` in a thread, unless it is made or
    being made. A failure there is left for flattened() to meet (and report) again."""
    key = (store.root, chain)
    with _pending_lock:
        if key in _pending or store.flats.known(chain):
            return
        if store.flats.has(chain):
            store.flats.link(chain)      # (remembered: known() answers next time)
            return

        def make() -> None:
            try:
                _make(store, list(diff_ids), chain)
            except Exception:
                pass
        maker = _pending[key] = threading.Thread(target=make, name="pybuild-flatten",
                                                 daemon=True)
    maker.start()


def finish_pending() -> None:
    """Wait for every flattened snapshot still being made (the end of a build)."""
    while True:
        with _pending_lock:
            if not _pending:
                return
            key, maker = next(iter(_pending.items()))
        maker.join()
        with _pending_lock:
            if _pending.get(key) is maker:
                del _pending[key]


def _make(store, diff_ids: list[str], chain: str) -> None:
    with store.tmpdir("flatten") as tmp:
        tar_path = union_tar(store, diff_ids, tmp, strip_overlay_xattrs=False)
        staging = os.path.join(tmp, "diff")
        os.mkdir(staging, 0o755)
        with open(tar_path, "rb") as f:
            extract.extract(f, staging, what=f"flattened snapshot {chain[7:19]}")
        store.flats.install(chain, staging, {"chain": chain, "layers": len(diff_ids)}, store.tmp)


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
