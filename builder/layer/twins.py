"""Gzip twins: plain-tar layers (the default) compressed when they leave the store.

Docker's classic builder and Buildah keep layers uncompressed on the
machine and compress them when they push; pybuild does the same unless
built with `--compression gzip|zstd`. Plain layers stay as they are in the
store (the image's own manifest names them), and a push (or a `--cache-to`
export, remote_cache.py) sends gzip twins: each
made once, from the plain blob, by the same compressor new gzip layers use
(so the same plain layer always gives the same twin), stored beside it as a
blob, and remembered in `cache/gzip-twins.json` (plain digest -> twin digest
and size) for the next push. A push makes each twin in the thread that then
uploads it (registry/transfer.py): one layer is compressed while another
is sent. The pushed manifest is the image's with those
layers' descriptors replaced: the image ID (its config) is the same, its
manifest digest in the registry is not the local one, as with Docker.

A twin is checked before it is used: compressing it must give back exactly
the plain blob's bytes (its diff_id), and a remembered twin must still be a
blob of the store (garbage collection may have removed it: it is made again).
"""

from __future__ import annotations

import json
import os

from ..errors import Interrupted, StoreError
from ..image import MEDIA_LAYER, MEDIA_LAYER_GZIP, Image, LayerDesc, canonical_json
from ..store.direct import read_range
from ..store.lock import locked, read_json_dict, write_atomic
from . import compress

_TWINS = "gzip-twins.json"      # in the store's cache dir


def manifest_for(store, image: Image, layers: list[LayerDesc]) -> tuple[bytes, str]:
    """The manifest a push sends for `image` whose `layers` are as they leave the store
    (gzip_twin's): bytes and digest, stored as a blob of the store. An image without
    plain layers is sent with its own manifest, byte for byte."""
    if not any(layer.media_type == MEDIA_LAYER for layer in image.layers):
        return store.blobs.read(image.digest), image.digest
    data = canonical_json({**image.manifest, "layers": [
        dict(old, **new.descriptor())
        for old, new in zip(image.manifest["layers"], layers, strict=True)]})
    return data, store.blobs.put_bytes(data)


def gzip_twin(store, layer: LayerDesc, known: dict | None = None, stop=None) -> LayerDesc:
    """`layer` as it leaves the store: itself, or if it is a plain tar its gzip twin,
    remembered or made now (and remembered). `known`: what remembered() read, if at hand.
    `stop` (a threading.Event): set, the twin being made is given up (Interrupted)."""
    if layer.media_type != MEDIA_LAYER:
        return layer
    if known is None:
        known = remembered(store)
    twin = known.get(layer.digest)
    if isinstance(twin, list) and len(twin) == 2 and store.blobs.has(twin[0]):
        return LayerDesc(layer.diff_id, twin[0], twin[1], MEDIA_LAYER_GZIP)
    with store.blobs.open(layer.digest) as plain, store.blobs.writer(direct=True) as blob, \
            compress.LayerSink(blob, algorithm="gzip") as sink:
        for piece in read_range(plain.fileno(), 0, layer.size):
            if stop is not None and stop.is_set():
                raise Interrupted("push stopped")
            sink.write(bytes(piece))        # (pieces may share a buffer; the sink keeps them)
        sink.close()
        if sink.diff_id != layer.diff_id:
            raise StoreError(f"layer {layer.digest} is damaged: its blob is not its tar "
                             f"({sink.diff_id})",
                             hint="remove the images that use it (pybuild rmi) and run "
                                  "pybuild prune; a build makes the layer again")
        digest = blob.commit()
        size = blob.size
    remember(store, layer.digest, digest, size, known)
    return LayerDesc(layer.diff_id, digest, size, MEDIA_LAYER_GZIP)


def remember(store, plain: str, digest: str, size: int, known: dict | None = None) -> None:
    """Record the blob `digest` (`size` bytes) as the gzip twin of the plain layer `plain`:
    one made here, or one a cache import unpacked (commit.ingest) and kept. `known` (what
    remembered() read, if at hand) is updated too. The file is read again and written
    under its lock: two pushes at once each add their own twins, neither drops the
    other's (the file's state when each started is not written back)."""
    if known is not None:
        known[plain] = [digest, size]
    path = os.path.join(store.cache_dir, _TWINS)
    try:
        with locked(path + ".lock"):
            current = read_json_dict(path)
            current[plain] = [digest, size]
            write_atomic(path, json.dumps(current).encode())
    except OSError:
        pass            # (only saves the next push a compression)


def of(store, digests) -> list[str]:
    """The remembered gzip twins of those of `digests` that are plain layers (garbage
    collection keeps a kept layer's twin, so that the next push need not make it again)."""
    known = remembered(store)
    return [twin[0] for plain, twin in known.items()
            if plain in digests and isinstance(twin, list) and twin]


def remembered(store) -> dict:
    return read_json_dict(os.path.join(store.cache_dir, _TWINS))
