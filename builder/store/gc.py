"""Garbage collection: remove the layers and blobs that no image and no cache entry needs.

It runs only while no build, load or container holds the store (they hold
the GC lock shared); when one does, removal is left for a later `rmi` or
`pybuild prune`, and nothing a running build uses can disappear under it.
"""

from __future__ import annotations

import os

from ..record import record
from ..errors import StoreError
from ..image import chain_ids
from ..layer import basetar, twins


@record(frozen=False)
class Collected:
    layers: int = 0
    blobs: int = 0
    bytes: int = 0
    deferred: bool = False


def collect(store, cache) -> Collected:
    fd = store.try_gc_lock()
    if fd is None:
        return Collected(deferred=True)
    try:
        blobs: set[str] = set()
        chains: set[str] = set()
        for img in store.images():
            blobs.update([img.digest, img.id] + [l.digest for l in img.layers])
            chains.update(chain_ids(img.diff_ids))
        from ..containers import Containers
        chains.update(Containers(store).pinned_chains())     # a container's image layers
        for _key, _used, result in cache.entries():
            if result.layer is not None:
                blobs.add(result.layer.digest)
                if result.extra.get("chain"):
                    chains.add(result.extra["chain"])
        for chain in list(chains):          # a stacked COPY layer needs its base (donor.py)
            try:
                base = store.layers.base(chain)
            except (StoreError, OSError, ValueError):
                continue             # not in the store (or damaged): nothing to keep for it
            if base is not None:
                chains.add(base)
        blobs.update(twins.of(store, blobs))     # a kept plain layer's gzip twin, for pushes
        out = Collected()
        for layer_store in (store.layers, store.flats, store.vfs_roots):
            for chain in layer_store.list():
                if chain not in chains:
                    out.bytes += basetar.size_of(layer_store.path(chain))
                    try:
                        out.bytes += int(layer_store.meta(chain).get("content_size", 0))
                    except Exception:
                        pass      # a half-removed or damaged layer: remove it all the same
                    layer_store.remove(chain)
                    out.layers += 1
        for digest in store.blobs.list():
            if digest not in blobs:
                try:
                    out.bytes += os.stat(store.blobs.path(digest)).st_size
                except FileNotFoundError:
                    continue
                store.blobs.delete(digest)
                out.blobs += 1
        return out
    finally:
        os.close(fd)


@record(frozen=False)
class Pruned:
    entries: int = 0
    mounts: int = 0
    collected: Collected | None = None


def prune(store, cache, keep_bytes: int | None = None, used_before: float | None = None
          ) -> Pruned:
    """Drop step-cache entries (all, or all but the most recently used `keep_bytes` of layers
    that no image needs; with `used_before`, a Unix time, only those last used before it),
    unused cache mounts, and then everything nothing needs any more.

    While a build holds the store, only the entries go (a build that meets a removed one
    misses, or builds without its donor): the mounts, layers and blobs wait for a later
    prune or rmi, and `collected.deferred` says so. CI jobs clean up beside running ones.
    """
    fd = store.try_gc_lock()
    out = Pruned()
    try:
        in_images = set()
        for img in store.images():
            in_images.update(chain_ids(img.diff_ids))
        entries = sorted(cache.entries(), key=lambda e: e[1], reverse=True)   # newest first
        kept_bytes = 0
        counted: set[str] = set()
        full = keep_bytes is None
        for key, used, result in entries:
            if used_before is not None and used >= used_before:
                continue                 # (--filter until=: used since then, kept)
            chain = result.extra.get("chain") if result.layer is not None else None
            size = 0
            if chain and chain not in in_images and chain not in counted:
                size = _layer_bytes(store, chain, result.layer.size)
            if not full and kept_bytes + size <= keep_bytes:
                kept_bytes += size
                if chain:
                    counted.add(chain)
                continue
            full = True          # the budget is spent: everything older goes
            cache.remove(key)
            out.entries += 1
        if out.entries:
            cache.prune_prefixes()
        if keep_bytes is None and used_before is None and fd is not None:
            out.mounts = _prune_cache_mounts(store)
    finally:
        if fd is not None:
            os.close(fd)
    out.collected = collect(store, cache)
    return out


def _layer_bytes(store, chain: str, blob_size: int) -> int:
    """What keeping a layer costs: its blob, its files, and its uncompressed tar if a
    stacked layer made one (layer/basetar.py)."""
    kept = blob_size + basetar.size_of(store.layers.path(chain))
    try:
        return kept + int(store.layers.meta(chain).get("content_size", 0))
    except Exception:
        return kept


def _prune_cache_mounts(store) -> int:
    """Remove RUN --mount=type=cache directories that no build holds."""
    import fcntl
    base = os.path.join(store.cache_dir, "mounts")
    removed = 0
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return 0
    from ..trees import remove_tree
    for name in names:
        if name.endswith(".lock") or ".new-" in name:
            continue
        lock = os.path.join(base, name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            remove_tree(os.path.join(base, name), ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    return removed
