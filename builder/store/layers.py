"""Extracted layers, ready to be overlay lower dirs: `layers/<chain-id>/diff`.

A layer is identified by its chain ID (its own diff_id and all below it), so
the same tar at two positions in two stacks is two directories, as in Docker's
overlay2. Each layer has a short random id with a symlink `l/<id>` to its
diff dir: a mount option string names lower dirs as `l/<id>` relative to the
store root, so that dozens of layers fit in the kernel's one-page limit.

Layers are installed by renaming a complete staging directory into place,
so a crash never leaves a half-installed layer under `layers/`. A COPY
layer also keeps `copied-3`, the table of the files it holds (donor.py), and
`segments`, the index of its blob's gzip members (layer/segments.py); a COPY
layer stacked on another names it as its `base` in layer.json, and mounts
show the base's diff dir right below its own (Store.lower_links).
"""

from __future__ import annotations

import json
import os

from .. import donor
from ..trees import remove_tree
from ..errors import StoreError


def short_id() -> str:
    import base64
    return base64.b32encode(os.urandom(10)).decode()[:12]


class LayerStore:
    def __init__(self, root: str, subdir: str = "layers"):
        self.root = root
        self.subdir = subdir
        self.dir = os.path.join(root, subdir)
        self.links = os.path.join(root, "l")
        # Layers are immutable: once seen, a layer's short link is remembered, so that a
        # deep stack costs no file reads per step.
        self._link_of: dict[str, str] = {}
        self._base_of: dict[str, str | None] = {}

    def path(self, chain_id: str) -> str:
        return os.path.join(self.dir, chain_id.split(":", 1)[1])

    def diff_dir(self, chain_id: str) -> str:
        return os.path.join(self.path(chain_id), "diff")

    def has(self, chain_id: str) -> bool:
        return os.path.isfile(os.path.join(self.path(chain_id), "layer.json"))

    def known(self, chain_id: str) -> bool:
        """Seen in the store by this process since `forget()` (no file system access)."""
        return chain_id in self._link_of

    def forget(self) -> None:
        self._link_of.clear()
        self._base_of.clear()

    def meta(self, chain_id: str) -> dict:
        """The layer's layer.json; StoreError if it is missing, unreadable or damaged."""
        path = os.path.join(self.path(chain_id), "layer.json")
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise StoreError(f"layer {chain_id} is not in the store") from None
        except (OSError, ValueError) as e:
            meta = e
        if not isinstance(meta, dict):
            raise StoreError(f"layer {chain_id} is damaged: {path} is not a layer's description"
                             f"{f' ({meta})' if isinstance(meta, Exception) else ''}",
                             hint="remove the images that use it (pybuild rmi) and run "
                                  "pybuild prune; a build makes the layer again")
        return meta

    def link(self, chain_id: str) -> str:
        """`l/<short>` for this layer, relative to the store root."""
        link = self._link_of.get(chain_id)
        if link is None:
            with open(os.path.join(self.path(chain_id), "link"), encoding="ascii") as f:
                link = self._link_of[chain_id] = "l/" + f.read().strip()
        return link

    def install(self, chain_id: str, diff_source: str, meta: dict, staging_root: str,
                files: dict[str, bytes] | None = None) -> bool:
        """Move `diff_source` (a directory) into the store as this layer's diff, with `files`
        (name -> bytes) beside it: they describe this very diff dir (a COPY's table says
        which files it holds), so they are installed with it or not at all.

        Returns False if another process installed the same layer first (the
        source is then removed: the layer is content-addressed, theirs is ours).
        """
        if self.has(chain_id):
            remove_tree(diff_source, ignore_errors=True)
            return False
        staging = os.path.join(staging_root, "layer-" + chain_id[7:19] + "-" + os.urandom(4).hex())
        os.mkdir(staging)
        os.rename(diff_source, os.path.join(staging, "diff"))
        short = short_id()
        with open(os.path.join(staging, "link"), "w", encoding="ascii") as f:
            f.write(short)
        with open(os.path.join(staging, "layer.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        for name, data in (files or {}).items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.links, exist_ok=True)
        target = os.path.join("..", self.subdir, chain_id[7:], "diff")
        link_path = os.path.join(self.links, short)
        os.symlink(target, link_path)
        try:
            os.rename(staging, self.path(chain_id))
        except OSError:
            # Another process won the race (the target exists and is not empty).
            os.unlink(link_path)
            remove_tree(staging, ignore_errors=True)
            if self.has(chain_id):
                return False
            raise
        return True

    def base(self, chain_id: str) -> str | None:
        """The layer this one's diff dir is stacked on (a COPY layer, donor.py), or None."""
        if chain_id not in self._base_of:
            self._base_of[chain_id] = self.meta(chain_id).get("base")
        return self._base_of[chain_id]

    def table(self, chain_id: str) -> str:
        """The path of the table of the files a COPY layer holds (donor.py)."""
        return os.path.join(self.path(chain_id), donor.TABLE)

    def remove(self, chain_id: str) -> None:
        path = self.path(chain_id)
        try:
            with open(os.path.join(path, "link"), encoding="ascii") as f:
                os.unlink(os.path.join(self.links, f.read().strip()))
        except FileNotFoundError:
            pass
        remove_tree(path, ignore_errors=True)

    def list(self) -> list[str]:
        try:
            return ["sha256:" + n for n in os.listdir(self.dir)]
        except FileNotFoundError:
            return []
