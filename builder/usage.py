"""What the store holds and what is shared: `pybuild system df` and `pybuild info`.

Sizes follow Docker's definitions. A layer is counted by its chain ID (the
unit the store keeps once) at its uncompressed content size:

* an image's SIZE is all of its layers; its SHARED SIZE the layers that some
  other image also has; UNIQUE SIZE the rest;
* the Images total counts every layer once; RECLAIMABLE is what no image in
  use by a container needs;
* a container's SIZE is its writable layer (containers.py);
* Local Volumes are the `RUN --mount=type=cache` directories;
* Build Cache is the layers that only step-cache entries keep.
"""

from __future__ import annotations

import ctypes
import os
from collections import Counter
from dataclasses import field

from .record import record
from .cache import StepCache
from .containers import Containers, tree_size
from .image import chain_ids
from .errors import StoreError

_FS_NAMES = {0xEF53: "extfs", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
             0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0x65735546: "fuse", 0x6969: "nfs",
             0xF2F52010: "f2fs", 0x5346544E: "ntfs"}


@record(frozen=False)
class Kind:
    name: str
    total: int = 0
    active: int = 0
    size: int = 0
    reclaimable: int = 0


@record(frozen=False)
class ImageUsage:
    repository: str
    tag: str
    id: str
    created: str
    size: int
    shared: int
    containers: int


@record(frozen=False)
class ContainerUsage:
    short_id: str
    name: str
    image: str
    argv: list
    created: float
    size: int
    running: bool
    status_text: str


@record(frozen=False)
class VolumeUsage:
    name: str
    size: int


@record(frozen=False)
class CacheUsage:
    id: str
    kind: str
    size: int
    created: float
    last_used: float
    shared: bool


@record(frozen=False)
class Report:
    summary: list[Kind] = field(default_factory=list)
    images: list[ImageUsage] = field(default_factory=list)
    containers: list[ContainerUsage] = field(default_factory=list)
    volumes: list[VolumeUsage] = field(default_factory=list)
    cache: list[CacheUsage] = field(default_factory=list)
    layer_bytes: int = 0


def disk_usage(store) -> Report:
    report = Report()
    sizes: dict[str, int] = {}

    def size_of(chain: str) -> int:
        if chain not in sizes:
            try:
                sizes[chain] = int(store.layers.meta(chain).get("content_size", 0))
            except StoreError:
                sizes[chain] = 0
        return sizes[chain]

    images = store.images()
    chains_of = {img.id: set(chain_ids(img.diff_ids)) for img in images}
    holders = Counter(ch for chains in chains_of.values() for ch in chains)
    containers = Containers(store)
    listed = containers.list()
    in_use = Counter(c.image_id for c in listed)

    # Images
    images_kind = Kind("Images", total=len(images), active=sum(1 for i in images if in_use[i.id]))
    every = set().union(*chains_of.values()) if chains_of else set()
    needed = set().union(*(chains_of[i.id] for i in images if in_use[i.id])) if in_use else set()
    images_kind.size = sum(size_of(ch) for ch in every)
    images_kind.reclaimable = sum(size_of(ch) for ch in every - needed)
    for img in sorted(images, key=lambda i: i.created, reverse=True):
        chains = chains_of[img.id]
        size = sum(size_of(ch) for ch in chains)
        shared = sum(size_of(ch) for ch in chains if holders[ch] > 1)
        for tag in img.tags or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            report.images.append(ImageUsage(repo, t, img.id, img.created, size, shared,
                                            in_use[img.id]))

    # Containers
    kind = Kind("Containers", total=len(listed))
    for c in listed:
        size = containers.size(c)
        running = c.running()
        kind.active += running
        kind.size += size
        kind.reclaimable += 0 if running else size
        report.containers.append(ContainerUsage(c.short_id, c.name, c.image, c.argv, c.created,
                                                size, running, containers.status_text(c)))
    containers_kind = kind

    # Local volumes: the cache mounts
    kind = Kind("Local Volumes")
    mounts = os.path.join(store.cache_dir, "mounts")
    for name in sorted(os.listdir(mounts)) if os.path.isdir(mounts) else []:
        path = os.path.join(mounts, name)
        if not os.path.isdir(path):
            continue
        size = tree_size(path)
        kind.total += 1
        kind.size += size
        kind.reclaimable += size
        report.volumes.append(VolumeUsage(name, size))
    volumes_kind = kind

    # Build cache: layers only cache entries keep
    kind = Kind("Build Cache")
    counted: set[str] = set()
    for key, used, result in StepCache(store).entries():
        kind.total += 1
        chain = (result.extra or {}).get("chain")
        size = 0
        if chain and chain not in every and chain not in counted:
            counted.add(chain)
            size = size_of(chain)
        kind.size += size
        kind.reclaimable += size
        report.cache.append(CacheUsage(key[7:19], "regular" if result.layer else "empty",
                                       size, used, used, bool(chain and chain in every)))
    report.summary = [images_kind, containers_kind, volumes_kind, kind]
    report.layer_bytes = sum(size_of(ch) for ch in store.layers.list())
    return report


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def filesystem_type(path: str) -> str:
    """The kind of filesystem `path` is on (`extfs`, `xfs`, `btrfs`, ...), as `docker info` says."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return "unknown"
    magic = buf.f_type & 0xFFFFFFFF
    return _FS_NAMES.get(magic, f"0x{magic:x}")
