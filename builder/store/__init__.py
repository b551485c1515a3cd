"""The local store: one directory that is an OCI image layout plus what a builder needs beside it.

    ROOT/oci-layout, index.json, blobs/sha256/...   an OCI image layout (skopeo/umoci read it)
    ROOT/layers/<chain-id>/{diff,link,layer.json}   extracted layers, overlay-ready
    ROOT/l/<short-id> -> ../layers/<chain-id>/diff  short names for mount option strings
    ROOT/cache/                                     the step cache
    ROOT/tmp/                                       work dirs, on the same filesystem for renames

Several pybuild processes may share a store: blobs and layers are installed
by atomic rename (a race is harmless, both sides have the same content),
index.json changes under an exclusive lock, and deleting layers (rmi, prune)
needs the garbage-collection lock that every running build holds shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time

from ..errors import ImageNotFound, StoreError, UsageError
from ..image import (Image, LayerDesc, MEDIA_LAYER_GZIP, MEDIA_MANIFEST, canonical_json, chain_ids,
                     manifest_bytes as image_manifest_bytes)
from .. import reference, trees
from . import repo_digests
from .blobs import BlobStore
from .index import Index, REF_NAME
from .layers import LayerStore
from .lock import locked, try_lock

DEFAULT_ROOT = "/var/lib/pybuild"


def default_root() -> str:
    return os.environ.get("PYBUILD_ROOT") or DEFAULT_ROOT


class Store:
    def __init__(self, root: str | None = None, driver: str | None = None):
        self.root = os.path.abspath(root or default_root())
        self._requested_driver = driver
        self._driver: str | None = None
        self.tmp = os.path.join(self.root, "tmp")
        self.cache_dir = os.path.join(self.root, "cache")
        try:
            for d in (self.root, os.path.join(self.root, "blobs", "sha256"), self.tmp,
                      self.cache_dir, os.path.join(self.root, "layers"), os.path.join(self.root, "l")):
                os.makedirs(d, exist_ok=True)
            layout = os.path.join(self.root, "oci-layout")
            if not os.path.exists(layout):
                with open(layout + ".tmp", "w", encoding="ascii") as f:
                    f.write('{"imageLayoutVersion":"1.0.0"}')
                os.replace(layout + ".tmp", layout)
        except OSError as e:
            raise StoreError(f"cannot use {self.root} as the store: {e.strerror}",
                             hint="choose another with --root DIR or PYBUILD_ROOT") from None
        self.blobs = BlobStore(self.root, self.tmp)
        self.layers = LayerStore(self.root)
        self.flats = LayerStore(self.root, "flat")     # flattened stack prefixes (snapshot/flatten.py)
        self.vfs_roots = LayerStore(self.root, "vfs")  # full roots of the vfs driver (snapshot/vfs.py)
        self.index = Index(self.root)
        if driver or os.environ.get("PYBUILD_STORAGE_DRIVER"):
            self.driver          # asked for by name: kept in the store now, or refused now
        self._lock_path = os.path.join(self.root, "store.lock")
        self._gc_lock_path = os.path.join(self.root, "gc.lock")
        self.clean_stale_tmp()

    @property
    def driver(self) -> str:
        """The storage driver (snapshot/__init__.py): kept in the store, chosen on first use."""
        if self._driver is None:
            from ..snapshot import choose
            self._driver = choose(self.root, self._requested_driver)
        return self._driver

    # ---- locks and temp dirs -------------------------------------------------

    def locked(self):
        """Exclusive lock for changes to index.json."""
        return locked(self._lock_path)

    @contextlib.contextmanager
    def in_use(self):
        """Held (shared) by every build for its whole duration; blocks garbage collection.

        While it is held no layer can disappear, so the layer stores may trust
        what they have seen once (a deep stack then costs no stat per layer).
        """
        with locked(self._gc_lock_path, shared=True):
            self.layers.forget()
            self.flats.forget()
            yield

    def try_gc_lock(self) -> int | None:
        if not os.path.exists(self._gc_lock_path):
            open(self._gc_lock_path, "a").close()
        return try_lock(self._gc_lock_path)

    @contextlib.contextmanager
    def tmpdir(self, prefix: str):
        """A fresh directory under tmp/, removed on exit, reclaimable if its owner dies.

        The lock file is held by this process and the sandbox processes it
        forks; once all of them are gone, the next store user removes the dir.
        """
        while True:
            name = f"{prefix}-{os.urandom(6).hex()}"
            lock_path = os.path.join(self.tmp, name + ".lock")
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A cleaner may have taken the fresh lock file for a dead one and unlinked it.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        path = os.path.join(self.tmp, name)
        os.mkdir(path, 0o700)
        try:
            yield path
        finally:
            trees.remove_tree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            os.close(fd)

    def clean_stale_tmp(self) -> None:
        try:
            names = os.listdir(self.tmp)
        except FileNotFoundError:
            return
        locks = {n[:-5] for n in names if n.endswith(".lock")}
        for name in locks:
            lock_path = os.path.join(self.tmp, name + ".lock")
            fd = try_lock(lock_path)
            if fd is None:
                continue   # a live build owns it
            try:
                trees.remove_tree(os.path.join(self.tmp, name), ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
            finally:
                os.close(fd)
        for name in names:
            # Leftovers without a lock (blob and index temp files of a process
            # that died between write and rename); a live writer touched its
            # file within the hour.
            if name.endswith(".lock") or name in locks:
                continue
            path = os.path.join(self.tmp, name)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_mtime < time.time() - 3600:
                    trees.remove_tree(path, ignore_errors=True)

    # ---- images ----------------------------------------------------------------

    def write_image(self, config: dict, layers: list[LayerDesc], tags: list[str] = (), *,
                    config_bytes: bytes | None = None, manifest: bytes | None = None,
                    annotations: dict[str, str] | None = None) -> Image:
        """Store an image and point `tags` at it.

        `config_bytes` and `manifest` keep an image's exact bytes (and so its
        ID and digest) when it comes from an archive or a registry;
        `annotations` go into a new manifest.
        """
        if config_bytes is None:
            config_bytes = canonical_json(config)
        manifest_bytes = manifest or image_manifest_bytes(config_bytes, layers, annotations)
        config_digest = self.blobs.put_bytes(config_bytes)
        manifest_digest = self.blobs.put_bytes(manifest_bytes)
        parsed = json.loads(manifest_bytes)
        descriptor = {"mediaType": parsed.get("mediaType", MEDIA_MANIFEST), "digest": manifest_digest,
                      "size": len(manifest_bytes)}
        with self.locked():
            if tags:
                for t in tags:
                    self.index.set_tag(t, descriptor)
            else:
                self.index.add_untagged(descriptor)
        return Image(config=config, layers=list(layers), id=config_digest, digest=manifest_digest,
                     manifest=parsed, tags=list(tags))

    def load_manifest(self, manifest_digest: str, tags: list[str] | None = None) -> Image:
        try:
            manifest = json.loads(self.blobs.read(manifest_digest))
            config_digest = manifest["config"]["digest"]
            config = json.loads(self.blobs.read(config_digest))
            layers = [LayerDesc(diff_id=d, digest=l["digest"], size=l["size"],
                                media_type=l.get("mediaType", MEDIA_LAYER_GZIP))
                      for d, l in zip(config["rootfs"]["diff_ids"], manifest["layers"], strict=True)]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"image manifest {manifest_digest} is damaged ({e})") from None
        return Image(config=config, layers=layers, id=config_digest, digest=manifest_digest,
                     manifest=manifest, tags=tags or [])

    def images(self) -> list[Image]:
        """Every image in the index, with its tags (one Image per manifest)."""
        by_digest: dict[str, list[str]] = {}
        for d in self.index.entries():
            name = (d.get("annotations") or {}).get(REF_NAME)
            by_digest.setdefault(d["digest"], [])
            if name:
                by_digest[d["digest"]].append(name)
        out = []
        for digest, tags in by_digest.items():
            try:
                out.append(self.load_manifest(digest, tags))
            except StoreError:
                continue
        return out

    def resolve(self, name: str) -> Image:
        """An image by `name[:tag]`, by full or short image ID, or by manifest digest."""
        key = name.lower()
        entries = self.index.entries()
        hexpart = key[7:] if key.startswith("sha256:") else key
        if 4 <= len(hexpart) <= 64 and all(c in "0123456789abcdef" for c in hexpart):
            for img in self.images():
                if img.id[7:].startswith(hexpart) or img.digest[7:] == hexpart:
                    return img
        try:
            ref = reference.parse(name)
        except UsageError:
            raise ImageNotFound(name) from None
        wanted = ref.tagged
        if ref.digest and not ref.tag:          # name@digest: pulled by digest, maybe untagged
            for d in entries:
                if d["digest"] == ref.digest:
                    return self.load_manifest(d["digest"], _tags_of(entries, d["digest"]))
            # ...or pushed: the registry's manifest digest, not the store's (repo_digests.py)
            image_id = repo_digests.find(self, f"{ref.name}@{ref.digest}")
            if image_id is not None:
                for img in self.images():
                    if img.id == image_id:
                        return img
        for d in entries:
            if (d.get("annotations") or {}).get(REF_NAME) == wanted:
                img = self.load_manifest(d["digest"], _tags_of(entries, d["digest"]))
                if ref.digest and img.digest != ref.digest:
                    break
                return img
        raise ImageNotFound(name)

    def tag(self, image: Image, name: str) -> str:
        tagged = reference.parse(name).tagged
        descriptor = {"mediaType": image.manifest.get("mediaType", MEDIA_MANIFEST),
                      "digest": image.digest, "size": self.blobs.size(image.digest)}
        with self.locked():
            self.index.set_tag(tagged, descriptor)
        return tagged

    def untag(self, name: str) -> str | None:
        with self.locked():
            return self.index.remove_tag(reference.parse(name).tagged)

    def remove_manifest(self, digest: str) -> list[str]:
        with self.locked():
            return self.index.remove_digest(digest)

    # ---- layers ------------------------------------------------------------------

    def layer_info(self, chain_id: str) -> dict:
        return self.layers.meta(chain_id)

    def lower_links(self, diff_ids: list[str], top: int | None = None) -> list[str]:
        """`l/<id>` of each layer of a stack (or of its `top` topmost ones), topmost first, as
        overlay's lowerdir wants them; a stacked layer's base comes right below it (donor.py)."""
        links = []
        stacked = False
        chains = chain_ids(diff_ids)
        for chain in chains if top is None else chains[len(chains) - top:]:
            if not self.layers.known(chain) and not self.layers.has(chain):
                raise StoreError(f"layer {chain} is missing from the store",
                                 hint="the store was pruned under a running build, or damaged; "
                                      "rebuild or reload the image")
            base = self.layers.base(chain)
            if base is not None:
                try:
                    links.append(self.layers.link(base))
                except OSError:
                    raise StoreError(f"layer {base}, which layer {chain} is stacked on, is "
                                     "missing from the store",
                                     hint="the store was damaged; rebuild or reload the image"
                                     ) from None
                stacked = True
            links.append(self.layers.link(chain))
        links.reverse()
        if stacked:
            # A base met twice (two layers stacked on it, or the base itself in the stack):
            # its topmost place shows all of it already (a base is nothing but directories
            # and files, donor.py), and overlayfs refuses one dir in two places.
            seen: set[str] = set()
            links = [link for link in links if not (link in seen or seen.add(link))]
        return links

    def content_size(self, diff_ids: list[str]) -> int:
        total = 0
        for chain in chain_ids(diff_ids):
            with contextlib.suppress(StoreError):
                total += int(self.layers.meta(chain).get("content_size", 0))
        return total


def _tags_of(entries: list[dict], digest: str) -> list[str]:
    """The tags index.json gives the manifest `digest`."""
    tags = [(e.get("annotations") or {}).get(REF_NAME) for e in entries if e["digest"] == digest]
    return [t for t in tags if t]
