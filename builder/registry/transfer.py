"""Pull and push: moving images between the store and a registry, layers in parallel.

Pull resolves `name[:tag][@digest]` with Docker's defaults, follows an
index to this host's platform, and streams every missing layer through the
same ingest as `pybuild load`: the compressed bytes are kept as they came
(checked against the manifest's digest) and the extracted tar is checked
against the config's diff_id, so a tampered layer never enters the store.
The config and manifest keep their bytes, so a pulled image keeps its ID.

Push uploads what the registry lacks: a HEAD first, then a cross-repository
mount when the blob is known to be in another repository of the same
registry, then an upload (one PUT, or PATCH chunks with `chunk_size`), and
the manifest last. Which registry repositories hold which blobs is
remembered in the store (`cache/registry-blobs.json`) for those mounts.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import threading
import time

from ..record import record
from .. import reference
from ..errors import Interrupted, RegistryError, UsageError
from ..image import Image, LayerDesc, chain_ids, digest_of, host_architecture
from ..layer import commit, twins
from ..progress import Transfer
from ..store import repo_digests
from ..store.direct import read_chunks
from ..store.lock import read_json_dict, write_atomic
from .client import Client

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
PARALLEL = 4


class _Meter:
    """Counts a blob's bytes and reports them as Transfer events, at most a few times a second."""

    EVERY = 0.25

    def __init__(self, emit, action: str, ref: str, digest: str, total: int | None, stop=None):
        self.emit, self.action, self.ref, self.digest, self.total = emit, action, ref, digest, total
        self.stop = stop          # set when the transfer should give up (an error elsewhere, ^C)
        self.count = 0
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted()
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.EVERY:
            self.last = now
            self.emit(Transfer(self.action, self.ref, self.digest, self.count, self.total,
                               now - self.started, done=False))

    def finish(self) -> None:
        self.emit(Transfer(self.action, self.ref, self.digest, self.count, self.total,
                           time.monotonic() - self.started, done=True))


class _ResponseReader(io.RawIOBase):
    """A blob response as a readable file (what layer ingest reads from)."""

    def __init__(self, response, meter: _Meter):
        self.response = response
        self.chunks = response.iter_raw(1 << 20)
        self.pending = b""
        self.meter = meter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.meter.add(n)
        return n


# ---- pull ------------------------------------------------------------------------------

def pull(store, name: str, *, insecure: tuple[str, ...] = (), on_event=None) -> Image:
    ref = reference.parse(name)
    emit = on_event or (lambda ev: None)
    client = Client(ref.registry, insecure=insecure)
    try:
        data, media, digest = client.get_manifest(ref.repository, ref.digest or ref.tag or "latest")
        named = digest          # (the index's, for a multi-platform image: Docker's RepoDigest)
        manifest = json.loads(data)
        if media in INDEX_TYPES or manifest.get("mediaType") in INDEX_TYPES:
            chosen = _platform(manifest, name)
            data, media, digest = client.get_manifest(ref.repository, chosen)
            manifest = json.loads(data)
        try:
            config_desc = manifest["config"]
            descs = manifest["layers"]
        except (KeyError, TypeError):
            raise RegistryError(f"{name}: not an image manifest ({media})") from None
        config_bytes = read_blob(client, ref.repository, config_desc["digest"])
        config = json.loads(config_bytes)
        diff_ids = list(config["rootfs"]["diff_ids"])
        if len(diff_ids) != len(descs):
            raise RegistryError(f"{name}: {len(descs)} layers for {len(diff_ids)} diff_ids")
        layers = _pull_layers(store, client, ref.repository, diff_ids, descs, name, emit)
        tags = [ref.tagged] if not ref.digest or ref.tag else []
        image = store.write_image(config, layers, tags, config_bytes=config_bytes,
                                  manifest=data if all(l.digest == d["digest"]
                                                       for l, d in zip(layers, descs)) else None)
        _remember(store, [l.digest for l in layers], ref)
        repo_digests.remember(store, image.id, ref.name, named)
        return image
    finally:
        client.close()


def _platform(index: dict, name: str) -> str:
    arch = host_architecture()
    for m in index.get("manifests") or []:
        p = m.get("platform") or {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return m["digest"]
    available = ", ".join(f"{(m.get('platform') or {}).get('os')}/"
                          f"{(m.get('platform') or {}).get('architecture')}"
                          for m in index.get("manifests") or [])
    raise RegistryError(f"{name}: no image for linux/{arch} (the index has: {available})")


def read_blob(client: Client, repo: str, digest: str, limit: int = 16 << 20) -> bytes:
    """A small blob (a config, a cache index) in memory, verified against its digest."""
    response = client.blob(repo, digest)
    try:
        data = bytearray()
        for chunk in response.iter_raw(1 << 20):
            data += chunk
            if len(data) > limit:
                raise RegistryError(f"{client.registry}: {repo}: blob {digest} is too big for a "
                                    "config")
    finally:
        response.close()
    data = bytes(data)
    if digest_of(data) != digest:
        raise RegistryError(f"{client.registry}: {repo}: blob {digest} does not match its digest",
                            hint="the registry's copy is corrupt or was tampered with")
    return data


def _pull_layers(store, client, repo, diff_ids, descs, name, emit) -> list[LayerDesc]:
    chains = chain_ids(diff_ids)
    layers: list[LayerDesc | None] = [None] * len(diff_ids)
    todo = []
    for i, d in enumerate(descs):
        if store.layers.has(chains[i]):
            meta = store.layers.meta(chains[i])
            if meta.get("digest") == d["digest"] and store.blobs.has(d["digest"]):
                layers[i] = LayerDesc(diff_ids[i], d["digest"], d["size"], meta["media_type"])
                continue
        todo.append(i)

    def fetch(i: int, stop) -> None:
        layers[i] = pull_layer(store, client, repo, descs[i], chains[i - 1] if i else None,
                               diff_ids[i], f"{name}: layer {i + 1}", name, emit, stop)

    _in_parallel(todo, fetch)
    return layers


def pull_layer(store, client: Client, repo: str, desc: dict, parent_chain: str | None,
               diff_id: str, what: str, ref: str, emit, stop=None,
               as_plain: bool = False) -> LayerDesc:
    """Stream one layer blob into the store on top of `parent_chain`, verifying both digests
    (`as_plain`: stored as the plain tar it holds, see commit.ingest)."""
    meter = _Meter(emit, "pull", ref, desc["digest"], desc.get("size"), stop)
    response = client.blob(repo, desc["digest"])
    try:
        got = commit.ingest(store, _ResponseReader(response, meter), parent_chain,
                            what=f"{what} ({desc['digest'][:19]})", expected_diff_id=diff_id,
                            expected_digest=desc["digest"], as_plain=as_plain)
    finally:
        response.close()
    meter.finish()
    return got.layer


# ---- push ------------------------------------------------------------------------------

@record(frozen=False)
class PushResult:
    reference: str
    digest: str                     # of the manifest pushed (not the local one if twins went)
    uploaded_bytes: int = 0
    uploaded: int = 0
    present: int = 0
    mounted: int = 0
    manifest_size: int = 0


def push(store, name: str, dest: str | None = None, *, insecure: tuple[str, ...] = (),
         on_event=None, chunk_size: int = 0) -> PushResult:
    image = store.resolve(name)
    if dest is None:
        if name.lower().removeprefix("sha256:") in image.id:
            raise UsageError("push of an image ID needs a destination name",
                             hint="pybuild push ID registry.example/team/app:1")
        dest = name
    ref = reference.parse(dest)
    client = Client(ref.registry, insecure=insecure)
    # (Held so that no garbage collection removes a gzip twin before it is sent.)
    with store.in_use():
        try:
            # Plain-tar layers (the default) go as gzip, as Docker pushes them: each twin is
            # made (or found) by the thread that sends it, beside the other uploads.
            known = twins.remembered(store)
            leaving: dict[str, LayerDesc] = {}

            def as_sent(layer: LayerDesc):
                def make(stop) -> tuple[str, int]:
                    twin = leaving[layer.digest] = twins.gzip_twin(store, layer, known, stop)
                    return twin.digest, twin.size
                return make
            unique = {layer.digest: layer for layer in image.layers}.values()
            blobs = [as_sent(layer) for layer in unique] + \
                [(image.id, store.blobs.size(image.id))]
            result = send_blobs(store, client, ref, blobs, on_event, chunk_size)
            manifest, digest = twins.manifest_for(
                store, image, [leaving[layer.digest] for layer in image.layers])
            media = image.manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json")
            client.put_manifest(ref.repository, ref.tag or ref.digest or "latest", manifest,
                                media)
            result.digest, result.manifest_size = digest, len(manifest)
            repo_digests.remember(store, image.id, ref.name, digest)
            return result
        finally:
            client.close()


def send_blobs(store, client: Client, ref: reference.Reference, blobs: list,
               on_event=None, chunk_size: int = 0) -> PushResult:
    """Make the registry have `blobs` of the store in `ref`'s repository: each a (digest,
    size), or a function that makes the blob in the sending thread and gives its (digest,
    size) (`stop`, a threading.Event, is set when the push is given up)."""
    emit = on_event or (lambda ev: None)
    result = PushResult(str(ref), "")
    lock = threading.Lock()
    known = _known_locations(store)
    sent: list[str] = []

    def send(item, stop) -> None:
        digest, size = item(stop) if callable(item) else item
        with lock:
            sent.append(digest)
        if client.has_blob(ref.repository, digest):
            with lock:
                result.present += 1
            return
        for other in known.get(digest, []):
            registry, _, repo = other.partition("/")
            if registry == ref.registry and repo != ref.repository and \
                    client.mount_blob(ref.repository, digest, repo):
                with lock:
                    result.mounted += 1
                return
        meter = _Meter(emit, "push", str(ref), digest, size, stop)

        def chunks(n: int):
            meter.count = 0               # (a retried upload reads the blob again)
            with store.blobs.open(digest) as f:
                for data in read_chunks(f.fileno(), size, n):     # (past the page cache)
                    meter.add(len(data))
                    yield data
        client.upload_blob(ref.repository, digest, chunks, size, chunk_size)
        with lock:
            result.uploaded += 1
            result.uploaded_bytes += size
        meter.finish()

    _in_parallel(list(dict.fromkeys(blobs)), send)
    _remember(store, sent, ref)
    return result


def _in_parallel(items, work) -> None:
    """`work(item, stop)` for every item, a few at a time. The first error, or Ctrl-C, sets
    `stop` (transfers in flight check it between chunks) and is raised here."""
    stop = threading.Event()
    if len(items) <= 1:
        for item in items:
            work(item, stop)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=PARALLEL,
                                                 thread_name_prefix="pybuild-transfer")
    futures = [pool.submit(work, item, stop) for item in items]
    try:
        for future in concurrent.futures.as_completed(futures):
            future.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


# ---- which repositories hold which blobs (for cross-repository mounts) -------------------------

def _locations_path(store) -> str:
    return os.path.join(store.cache_dir, "registry-blobs.json")


def _known_locations(store) -> dict[str, list[str]]:
    return read_json_dict(_locations_path(store))


def _remember(store, digests: list[str], ref: reference.Reference) -> None:
    known = _known_locations(store)
    where = f"{ref.registry}/{ref.repository}"
    for d in digests:
        places = known.setdefault(d, [])
        if where not in places:
            places.append(where)
            del places[:-8]
    try:
        write_atomic(_locations_path(store), json.dumps(known).encode())
    except OSError:
        pass          # only a hint for later pushes
