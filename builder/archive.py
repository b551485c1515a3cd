"""Images in and out of the store as files: `save`, `load` and `import`.

`save` writes one tar that is at the same time a docker-archive
(`manifest.json`, `repositories`: what `docker load` of any version reads)
and an OCI image layout (`oci-layout`, `index.json`, `blobs/`: what skopeo,
umoci and Docker 25+ read), as Docker 25+ writes it. Both views share the
blobs, so nothing is stored twice.

`load` reads either kind (and gzip-compressed ones). Archives are untrusted:
every blob is checked against its digest, every layer against its diff_id,
and layers are extracted by `layer.extract`, which refuses to write outside
the layer. The config keeps its exact bytes, so a loaded image keeps its ID.

`import` turns a root filesystem tarball into a one-layer image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile

from . import reference
from .cache import now
from .errors import LayerError, StoreError, UsageError
from .image import (DOCKER_MANIFEST, Image, LayerDesc, MEDIA_MANIFEST,
                    canonical_json, chain_ids, digest_of, empty_config, host_architecture)
from .layer import commit, compress, tarformat
from .store import Store
from .store.direct import BlobEndsEarly, read_range
from .store.index import REF_NAME

INDEX_MEDIA_TYPES = ("application/vnd.oci.image.index.v1+json",
                     "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_MEDIA_TYPES = (MEDIA_MANIFEST, DOCKER_MANIFEST)
CONTAINERD_NAME = "io.containerd.image.name"


# ---- save -------------------------------------------------------------------------

def save(store: Store, names: list[str], out) -> list[Image]:
    """Write the images `names` (name[:tag] or ID) to the binary stream `out`."""
    images: list[tuple[Image, list[str]]] = []
    for name in names:
        img = store.resolve(name)
        try:
            wanted = [reference.parse(name).tagged]
            if wanted[0] not in img.tags:
                wanted = list(img.tags)   # given by ID: keep all its tags
        except UsageError:
            wanted = list(img.tags)
        images.append((img, wanted))

    blobs: dict[str, None] = {}
    docker_manifest, oci_manifests, repositories = [], [], {}
    for img, tags in images:
        for l in img.layers:
            blobs[l.digest] = None
        blobs[img.id] = None
        blobs[img.digest] = None
        docker_manifest.append({"Config": "blobs/sha256/" + img.id[7:],
                                "RepoTags": tags,
                                "Layers": ["blobs/sha256/" + l.digest[7:] for l in img.layers]})
        base = {"mediaType": img.manifest.get("mediaType", MEDIA_MANIFEST), "digest": img.digest,
                "size": store.blobs.size(img.digest)}
        if not tags:
            oci_manifests.append(base)
        for t in tags:
            ref = reference.parse(t)
            full = f"{ref.registry}/{ref.repository}:{ref.tag}"
            oci_manifests.append({**base, "annotations": {CONTAINERD_NAME: full, REF_NAME: t}})
            repositories.setdefault(ref.name, {})[ref.tag] = img.id[7:]

    w = out.write
    for d in ("blobs/", "blobs/sha256/"):
        w(tarformat.header(d, typeflag=tarformat.DIRECTORY, mode=0o755))
    for digest in sorted(blobs):
        size = store.blobs.size(digest)
        w(tarformat.header("blobs/sha256/" + digest[7:], typeflag=tarformat.REGULAR, mode=0o444,
                           size=size))
        with store.blobs.open(digest) as f:
            try:
                for piece in read_range(f.fileno(), 0, size):      # (past the page cache)
                    w(piece)
            except BlobEndsEarly:
                raise StoreError(f"blob {digest} changed size while it was being saved") from None
        w(tarformat.pad(size))
    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPES[0], "manifests": oci_manifests}
    for name, data in (("index.json", canonical_json(index)),
                       ("manifest.json", canonical_json(docker_manifest)),
                       ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
                       ("repositories", canonical_json(repositories))):
        w(tarformat.header(name, typeflag=tarformat.REGULAR, mode=0o644, size=len(data)))
        w(data + tarformat.pad(len(data)))
    w(tarformat.END_OF_ARCHIVE)
    return [img for img, _ in images]


# ---- load -------------------------------------------------------------------------

class _Archive:
    """Random access to the members of an image archive, by cleaned name."""

    def __init__(self, tar: tarfile.TarFile, what: str):
        self.tar = tar
        self.what = what
        self.members = {}
        for m in tar.getmembers():
            name = os.path.normpath(m.name.lstrip("/")) if m.name else m.name
            self.members[name] = m

    def has(self, name: str) -> bool:
        return os.path.normpath(name.lstrip("/")) in self.members

    def open(self, name: str):
        m = self.members.get(os.path.normpath(name.lstrip("/")))
        if m is None or not m.isfile():
            raise LayerError(f"{self.what}: {name} is missing from the archive")
        return self.tar.extractfile(m)

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def json(self, name: str):
        try:
            return json.loads(self.read(name))
        except ValueError as e:
            raise LayerError(f"{self.what}: {name} is not valid JSON ({e})") from None

    def blob(self, digest: str) -> bytes:
        data = self.read("blobs/" + digest.replace(":", "/"))
        if digest_of(data) != digest:
            raise LayerError(f"{self.what}: blob {digest} does not match its digest",
                             hint="the archive is corrupt")
        return data


def load(store: Store, source: str) -> list[Image]:
    """Load every image of a docker-archive or OCI archive (`-` reads standard input)."""
    with store.tmpdir("load") as tmp:
        path = _spool(source, tmp)
        what = "archive " + (source if source != "-" else "from standard input")
        try:
            tar = tarfile.open(path, mode="r:")
        except (tarfile.TarError, OSError) as e:
            raise LayerError(f"{what}: not a tar archive ({e})",
                             hint="pybuild load reads `docker save` and OCI archives") from None
        with tar:
            try:
                archive = _Archive(tar, what)
                if archive.has("index.json") and archive.has("oci-layout"):
                    return _load_oci(store, archive)
                if archive.has("manifest.json"):
                    return _load_docker(store, archive)
            except (tarfile.TarError, EOFError) as e:
                raise LayerError(f"{what}: corrupt archive ({e})") from None
        raise LayerError(f"{what}: neither a docker-archive (manifest.json) nor an OCI layout "
                         "(index.json, oci-layout)",
                         hint="to make an image of a root filesystem tarball, use "
                              "`pybuild import FILE NAME`")


def _spool(source: str, tmp: str) -> str:
    """A seekable, uncompressed copy of the archive (or the file itself when it already is)."""
    try:
        src = open(source, "rb") if source != "-" else os.fdopen(os.dup(0), "rb")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{source}: is a directory, not an archive") from None
    try:
        head = src.peek(4)[:4] if hasattr(src, "peek") else b""
        # (A pipe or a FIFO, as `load -i <(cmd)` gives, cannot be read twice: spooled too.)
        seekable = source != "-" and stat.S_ISREG(os.fstat(src.fileno()).st_mode)
        if seekable and not compress.is_compressed(head):
            return source
        out = os.path.join(tmp, "archive.tar")
        with open(out, "wb") as f:
            shutil.copyfileobj(compress.open_decompressed(src, head), f, 1 << 20)
        return out
    finally:
        src.close()


def _familiar(name: str) -> str | None:
    """`docker.io/library/busybox:latest` -> `busybox:latest`; None if not a name."""
    try:
        ref = reference.parse(name)
    except UsageError:
        return None
    n = ref.name
    if n.startswith("docker.io/"):
        n = n[len("docker.io/"):]
        if n.startswith("library/") and n.count("/") == 1:
            n = n[len("library/"):]
    return f"{n}:{ref.tag or 'latest'}"


def _ingest_layers(store: Store, diff_ids: list[str], opener, what: str,
                   descriptors: list[dict] | None = None) -> list[LayerDesc]:
    layers: list[LayerDesc] = []
    chains = chain_ids(diff_ids)
    added: list[tuple[str | None, str | None]] = []     # (chain, blob) this load created
    try:
        for i, diff_id in enumerate(diff_ids):
            desc = descriptors[i] if descriptors else None
            reuse = _existing_layer(store, chains[i], desc)
            if reuse is not None:
                layers.append(LayerDesc(diff_id, *reuse))
                continue
            parent = chains[i - 1] if i else None
            with opener(i) as stream:
                got = commit.ingest(store, stream, parent, what=f"{what}: layer {i + 1}",
                                    expected_diff_id=diff_id,
                                    expected_digest=desc["digest"] if desc else None)
            layers.append(got.layer)
            added.append((chains[i] if got.new_layer else None,
                          got.layer.digest if got.new_blob else None))
    except BaseException:
        # Leave the store as it was: no layers of an image that was not loaded.
        for chain, blob in added:
            if chain:
                store.layers.remove(chain)
            if blob:
                store.blobs.delete(blob)
        raise
    return layers


def _existing_layer(store: Store, chain: str, desc: dict | None):
    """(digest, size, media type) of a layer the store already has, if it can be reused."""
    if not store.layers.has(chain):
        return None
    meta = store.layers.meta(chain)
    if not store.blobs.has(meta["digest"]) or (desc is not None and desc["digest"] != meta["digest"]):
        return None
    return meta["digest"], meta["size"], meta["media_type"]


def _check_config(config, what: str) -> list[str]:
    try:
        diff_ids = list(config["rootfs"]["diff_ids"])
    except (KeyError, TypeError):
        raise LayerError(f"{what}: the image config has no rootfs.diff_ids") from None
    return diff_ids


def _load_docker(store: Store, archive: _Archive) -> list[Image]:
    out = []
    manifest = archive.json("manifest.json")
    if not isinstance(manifest, list):
        raise LayerError(f"{archive.what}: manifest.json is not a list of images")
    for entry in manifest:
        config_bytes = archive.read(entry["Config"])
        stem = os.path.basename(entry["Config"]).removesuffix(".json")
        if len(stem) == 64 and "sha256:" + hashlib.sha256(config_bytes).hexdigest() != "sha256:" + stem:
            raise LayerError(f"{archive.what}: config {entry['Config']} does not match its digest")
        config = json.loads(config_bytes)
        diff_ids = _check_config(config, archive.what)
        paths = entry.get("Layers") or []
        if len(paths) != len(diff_ids):
            raise LayerError(f"{archive.what}: {len(paths)} layers for {len(diff_ids)} diff_ids")
        layers = _ingest_layers(store, diff_ids, lambda i: archive.open(paths[i]), archive.what)
        tags = [t for t in (_familiar(t) for t in entry.get("RepoTags") or []) if t]
        out.append(store.write_image(config, layers, tags, config_bytes=config_bytes))
    return out


def _load_oci(store: Store, archive: _Archive) -> list[Image]:
    index = archive.json("index.json")
    out = []
    for desc in index.get("manifests") or []:
        ann = desc.get("annotations") or {}
        tags = []
        name = ann.get(REF_NAME)
        if name and (":" in name or "/" in name) and _familiar(name):
            tags.append(_familiar(name))
        elif ann.get(CONTAINERD_NAME) and _familiar(ann[CONTAINERD_NAME]):
            tags.append(_familiar(ann[CONTAINERD_NAME]))
        elif name and _familiar(name):
            tags.append(_familiar(name))
        manifest_desc = _pick_platform(archive, desc)
        manifest_bytes = archive.blob(manifest_desc["digest"])
        manifest = json.loads(manifest_bytes)
        config_bytes = archive.blob(manifest["config"]["digest"])
        config = json.loads(config_bytes)
        diff_ids = _check_config(config, archive.what)
        descs = manifest.get("layers") or []
        if len(descs) != len(diff_ids):
            raise LayerError(f"{archive.what}: {len(descs)} layers for {len(diff_ids)} diff_ids")
        layers = _ingest_layers(
            store, diff_ids, lambda i: archive.open("blobs/" + descs[i]["digest"].replace(":", "/")),
            archive.what, descs)
        same = all(l.digest == d["digest"] for l, d in zip(layers, descs))
        out.append(store.write_image(config, layers, tags, config_bytes=config_bytes,
                                     manifest=manifest_bytes if same else None))
    return out


def _pick_platform(archive: _Archive, desc: dict) -> dict:
    """Follow image indexes down to the manifest for this host's platform."""
    for _ in range(4):
        if desc.get("mediaType") not in INDEX_MEDIA_TYPES:
            return desc
        index = json.loads(archive.blob(desc["digest"]))
        arch = host_architecture()
        for m in index.get("manifests") or []:
            p = m.get("platform") or {}
            if p.get("os", "linux") == "linux" and p.get("architecture") == arch:
                desc = m
                break
        else:
            raise LayerError(f"{archive.what}: no image for linux/{arch} in the archive")
    return desc


# ---- import -----------------------------------------------------------------------

def import_rootfs(store: Store, source: str, name: str | None) -> Image:
    """A root filesystem tarball (plain or compressed; `-` for stdin) -> a one-layer image."""
    tags = [reference.parse(name).tagged] if name else []
    try:
        raw = open(source, "rb") if source != "-" else os.fdopen(os.dup(0), "rb")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such file") from None
    with raw:
        layer = commit.ingest(store, raw, None, what=f"import {source}").layer
    config = empty_config()
    created = now()
    config["created"] = created
    config["rootfs"]["diff_ids"] = [layer.diff_id]
    config["history"] = [{"created": created, "created_by": f"pybuild import {os.path.basename(source)}",
                          "comment": "imported"}]
    return store.write_image(config, [layer], tags)
