"""Garbage collection: remove the layers and blobs that no image and no cache entry needs.

It runs only while no build, load or container holds the store (they hold
the GC lock shared); when one does, removal is left for a later `rmi` or
`pybuild prune`, and nothing a running build uses can disappear under it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..image import chain_ids


@dataclass
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
        for _key, _used, result in cache.entries():
            if result.layer is not None:
                blobs.add(result.layer.digest)
                if result.extra.get("chain"):
                    chains.add(result.extra["chain"])
        out = Collected()
        for layer_store in (store.layers, store.flats):
            for chain in layer_store.list():
                if chain not in chains:
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
