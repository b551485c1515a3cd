"""The step cache between machines: `--cache-to` exports it, `--cache-from` imports it.

What moves is a cache *artifact*: an OCI image manifest whose config blob
(media type `application/vnd.pybuild.cache.v1+json`) maps step keys to
step results (history entry, runtime config, layer descriptor), and whose
layers are the compressed layer blobs those results name. It lives

* in a registry, `type=registry,ref=REF`: pushed next to the image's own
  layers (blobs the registry already has are not sent again), or
* in a directory, `type=local,dest=DIR` / `src=DIR`: an OCI image layout
  with the artifact as its one manifest, for CI caches kept as directories.

Keys are the same on every machine (they chain from the base image's ID,
the expanded instruction and content digests, see cache.py), so a second
machine that misses its own cache looks the key up in the imported
entries and, on a hit, downloads the layer instead of running the step.
The layer is verified against both its blob digest and its diff_id, and
stored as the first machine had it, so the image ID and digest are the
ones the first machine produced: a compressed blob as it came, a plain
layer (the default) as its plain tar. Plain layers travel as their gzip
twins (layer/twins.py, as a push sends them), each descriptor annotated
with the plain tar's digest (`containerd.io/uncompressed`, containerd's
and BuildKit's name for it), and are unpacked on the way in.

`mode=min` (the default) exports the steps of the final image's stages;
`mode=max` every step the build went through, intermediate stages too.
"""

from __future__ import annotations

import json
import os
import shutil

from .record import record
from . import reference
from .cache import StepResult
from .errors import PybuildError, RegistryError, UsageError
from .image import MEDIA_LAYER, MEDIA_MANIFEST, canonical_json, chain_ids, digest_of
from .layer import commit, twins
from .progress import BuildWarning
from .store.lock import write_atomic

CACHE_MEDIA = "application/vnd.pybuild.cache.v1+json"
FORMAT = 1
UNCOMPRESSED = "containerd.io/uncompressed"     # a twin's annotation: the plain tar's digest


@record
class CacheSpec:
    """One --cache-to or --cache-from: where the cache artifact is."""
    type: str                   # registry | local
    ref: str | None = None      # type=registry
    path: str | None = None     # type=local: dest (export) or src (import)
    mode: str = "min"           # export only: min | max

    def __str__(self) -> str:
        return f"{self.type}:{self.ref or self.path}"


def parse_spec(text: str, *, export: bool) -> CacheSpec:
    """Docker's forms: `type=registry,ref=REF[,mode=max]`, `type=local,dest=DIR` (export),
    `type=local,src=DIR` (import), and a bare `REF` for a registry."""
    flag = "--cache-to" if export else "--cache-from"
    if "=" not in text:
        fields = {"type": "registry", "ref": text}
    else:
        fields = dict(f.partition("=")[::2] for f in text.split(",") if f)
    kind = fields.get("type", "registry" if "ref" in fields else "local")
    mode = fields.get("mode", "min")
    if mode not in ("min", "max"):
        raise UsageError(f"{flag} {text}: mode must be min or max")
    if kind == "registry":
        if not fields.get("ref"):
            raise UsageError(f"{flag} {text}: needs ref=REGISTRY/REPO:TAG")
        reference.parse(fields["ref"])
        return CacheSpec("registry", ref=fields["ref"], mode=mode)
    if kind == "local":
        path = fields.get("dest" if export else "src")
        if not path:
            raise UsageError(f"{flag} {text}: needs {'dest' if export else 'src'}=DIR")
        return CacheSpec("local", path=os.path.abspath(path), mode=mode)
    raise UsageError(f"{flag} {text}: unknown type {kind!r}", hint="use type=registry or type=local")


# ---- where an artifact's blobs are read from and written to -------------------------------

class _Registry:
    def __init__(self, spec: CacheSpec, insecure):
        from .registry.client import Client
        self.ref = reference.parse(spec.ref)
        self.client = Client(self.ref.registry, insecure=insecure)

    def read_manifest(self) -> bytes | None:
        try:
            data, _, _ = self.client.get_manifest(self.ref.repository, self.ref.tag or "latest")
        except RegistryError as e:
            if e.status == 404:
                return None
            raise
        return data

    def read_blob(self, digest: str) -> bytes:
        from .registry.transfer import read_blob
        return read_blob(self.client, self.ref.repository, digest, limit=256 << 20)

    def ingest_layer(self, store, desc, parent_chain, diff_id, emit, as_plain=False):
        from .registry.transfer import pull_layer
        return pull_layer(store, self.client, self.ref.repository, desc, parent_chain, diff_id,
                          "cache layer", str(self.ref), emit, as_plain=as_plain)

    def write(self, store, blobs: list[tuple[str, int]], config: bytes, manifest: bytes, emit):
        from .registry.transfer import send_blobs
        store.blobs.put_bytes(config)
        send_blobs(store, self.client, self.ref, blobs + [(digest_of(config), len(config))], emit)
        self.client.put_manifest(self.ref.repository, self.ref.tag or "latest", manifest,
                                 MEDIA_MANIFEST)

    def close(self) -> None:
        self.client.close()


class _Directory:
    """An OCI image layout directory holding the artifact."""

    def __init__(self, spec: CacheSpec):
        self.path = spec.path

    def _blob(self, digest: str) -> str:
        return os.path.join(self.path, "blobs", "sha256", digest[7:])

    def read_manifest(self) -> bytes | None:
        try:
            with open(os.path.join(self.path, "index.json"), encoding="utf-8") as f:
                index = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise PybuildError(f"cache {self.path}: unreadable index.json ({e})") from None
        for m in index.get("manifests") or []:
            if m.get("artifactType") == CACHE_MEDIA or \
                    (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == "cache":
                return self.read_blob(m["digest"])
        return None

    def read_blob(self, digest: str) -> bytes:
        try:
            with open(self._blob(digest), "rb") as f:
                data = f.read()
        except OSError as e:
            raise PybuildError(f"cache {self.path}: blob {digest[:19]} is missing ({e.strerror})",
                               hint="export the cache again with --cache-to") from None
        if digest_of(data) != digest:
            raise PybuildError(f"cache {self.path}: blob {digest[:19]} does not match its digest")
        return data

    def ingest_layer(self, store, desc, parent_chain, diff_id, emit, as_plain=False):
        try:
            f = open(self._blob(desc["digest"]), "rb")
        except OSError as e:
            raise PybuildError(f"cache {self.path}: layer {desc['digest'][:19]} is missing "
                               f"({e.strerror})") from None
        with f:
            return commit.ingest(store, f, parent_chain, what=f"cache layer {desc['digest'][:19]}",
                                 expected_diff_id=diff_id, expected_digest=desc["digest"],
                                 as_plain=as_plain).layer

    def write(self, store, blobs: list[tuple[str, int]], config: bytes, manifest: bytes, emit):
        os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
        for digest, _ in blobs:
            target = self._blob(digest)
            if os.path.exists(target):
                continue
            tmp = f"{target}.tmp-{os.getpid()}"
            try:
                os.link(store.blobs.path(digest), tmp)      # same filesystem: no copy
            except OSError:
                shutil.copyfile(store.blobs.path(digest), tmp)
            os.replace(tmp, target)
        for data in (config, manifest):
            write_atomic(self._blob(digest_of(data)), data)
        write_atomic(os.path.join(self.path, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": MEDIA_MANIFEST, "artifactType": CACHE_MEDIA,
                                "digest": digest_of(manifest), "size": len(manifest),
                                "annotations": {"org.opencontainers.image.ref.name": "cache"}}]}
        write_atomic(os.path.join(self.path, "index.json"), canonical_json(index))

    def close(self) -> None:
        pass


def _place(spec: CacheSpec, insecure):
    return _Registry(spec, insecure) if spec.type == "registry" else _Directory(spec)


def _parse_artifact(place, manifest_bytes: bytes, where: str) -> tuple[dict, dict]:
    """(key -> entry JSON, layer digest -> descriptor) of an artifact; a gzip twin is found
    by its plain layer's digest as well."""
    try:
        manifest = json.loads(manifest_bytes)
        config_desc = manifest["config"]
        if config_desc.get("mediaType") != CACHE_MEDIA:
            raise ValueError(f"not a pybuild cache (config type {config_desc.get('mediaType')})")
        config = json.loads(place.read_blob(config_desc["digest"]))
        if config.get("format") != FORMAT:
            raise ValueError(f"cache format {config.get('format')}, this pybuild reads {FORMAT}")
        layers = {d["digest"]: d for d in manifest.get("layers") or []}
        for d in list(layers.values()):
            plain = (d.get("annotations") or {}).get(UNCOMPRESSED)
            if isinstance(plain, str):
                layers.setdefault(plain, d)
        return dict(config["entries"]), layers
    except (KeyError, TypeError, ValueError) as e:
        raise PybuildError(f"--cache-from {where}: {e}") from None


# ---- import ------------------------------------------------------------------------------------

class CacheImport:
    """Entries of every --cache-from, looked up when the local cache misses.

    A cache that cannot be read (not there yet, a registry that does not
    answer or refuses, an image that is not a pybuild cache, a damaged
    index) is a warning, and the build goes on without it, as BuildKit's
    does: CI jobs name caches that a first run, or another tool, has not
    made. A layer that does not match its digest is still an error (get()).
    """

    def __init__(self, store, specs, *, insecure=(), emit=None):
        self.store = store
        self.emit = emit or (lambda ev: None)
        self.entries: dict[str, tuple[dict, object, dict]] = {}   # key -> (entry, place, layers)
        self.places = []
        for spec in specs:
            try:
                place = _place(spec, insecure)
                self.places.append(place)
                manifest = place.read_manifest()
                if manifest is None:
                    self.emit(BuildWarning(f"--cache-from {spec}: no cache there yet"))
                    continue
                entries, layers = _parse_artifact(place, manifest, str(spec))
            except (PybuildError, OSError) as e:
                reason = str(e).splitlines()[0].removeprefix(f"--cache-from {spec}: ")
                self.emit(BuildWarning(f"--cache-from {spec}: not used ({reason})"))
                continue
            for key, entry in entries.items():
                self.entries.setdefault(key, (entry, place, layers))

    def get(self, key: str, parent_diff_ids: list[str]) -> StepResult | None:
        """The step's result, its layer downloaded into the store; None if no cache has it."""
        found = self.entries.get(key)
        if found is None:
            return None
        entry, place, layers = found
        try:
            result = StepResult.from_json(entry)
        except (KeyError, TypeError, ValueError):
            return None
        layer = result.layer
        if layer is not None:
            parents = chain_ids(parent_diff_ids)
            chain = chain_ids(parent_diff_ids + [layer.diff_id])[-1]
            if not (self.store.layers.has(chain) and self.store.blobs.has(layer.digest)):
                desc = layers.get(layer.digest)
                if desc is None:
                    return None
                got = place.ingest_layer(self.store, desc, parents[-1] if parents else None,
                                         layer.diff_id, self.emit,
                                         as_plain=desc["digest"] != layer.digest)
                if got.digest != layer.digest:
                    return None
        return result

    def close(self) -> None:
        for place in self.places:
            place.close()


# ---- export -------------------------------------------------------------------------------------

def export(store, spec: CacheSpec, entries: dict[str, StepResult], *, insecure=(),
           emit=None) -> None:
    """Write `entries` (key -> result) and the layers they name as a cache artifact at `spec`
    (plain layers as their gzip twins)."""
    # (Held so that no garbage collection removes a gzip twin before it is written.)
    with store.in_use():
        layers: dict[str, dict] = {}
        known = twins.remembered(store)
        for result in entries.values():
            layer = result.layer
            if layer is None or layer.digest in layers:
                continue
            if layer.media_type == MEDIA_LAYER:
                twin = twins.gzip_twin(store, layer, known)
                layers[layer.digest] = {**twin.descriptor(),
                                        "annotations": {UNCOMPRESSED: layer.digest}}
            else:
                layers[layer.digest] = layer.descriptor()
        config = canonical_json({"format": FORMAT,
                                 "entries": {k: r.to_json() for k, r in sorted(entries.items())}})
        manifest = canonical_json({
            "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "artifactType": CACHE_MEDIA,
            "config": {"mediaType": CACHE_MEDIA, "digest": digest_of(config), "size": len(config)},
            "layers": list(layers.values())})
        place = _place(spec, insecure)
        try:
            place.write(store, [(d["digest"], d["size"]) for d in layers.values()], config, manifest,
                        emit or (lambda ev: None))
        finally:
            place.close()
