"""The OCI image model: config, history, manifest, and the identities derived from them.

Images change only by building a new config and manifest from a parent;
blobs are never rewritten. The image ID is the digest of the config JSON, and
the JSON is serialised canonically (sorted keys, no spaces) so the same
content always gives the same ID.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import field

from cachetools import LRUCache

from .record import record
from .forksafe import ForkSafeLock

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_chain_step: dict[tuple[str, str], str] = {}
_stacks: LRUCache = LRUCache(maxsize=64)      # tuple(diff_ids) -> tuple(chain IDs)
_stacks_lock = ForkSafeLock()                  # (stages build in threads; LRUCache is not safe)


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: chain(L1) = diff_id(L1); chain(1..n) = sha256(chain(1..n-1) + " " + diff_id(n)).

    A build asks for the chain IDs of its stack several times a step, and
    each step's stack is the previous one plus a layer: whole stacks are
    remembered, and a stack one layer longer than a remembered one costs one
    more hash. Walking the stack link by link (each remembered) was 1.3 ms
    per call at depth 1,000, several calls a step: the part of a deep
    build's step time that grew with its depth.
    """
    key = tuple(diff_ids)
    with _stacks_lock:
        known = _stacks.get(key)
        shorter = _stacks.get(key[:-1]) if known is None and len(key) > 1 else None
    if known is None:
        if shorter is not None:
            known = shorter + (digest_of(f"{shorter[-1]} {key[-1]}".encode()),)
        else:
            known = tuple(_walk_chain(key))
        with _stacks_lock:
            _stacks[key] = known
    return list(known)


def _walk_chain(diff_ids) -> list[str]:
    """chain_ids() link by link; each link is remembered (stacks that share a base)."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
            continue
        key = (out[-1], d)
        chain = _chain_step.get(key)
        if chain is None:
            if len(_chain_step) > 100_000:
                _chain_step.clear()
            chain = _chain_step[key] = digest_of(f"{out[-1]} {d}".encode())
        out.append(chain)
    return out


def host_architecture() -> str:
    m = os.uname().machine.lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(m, m)


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}


def is_host_platform(text: str) -> bool:
    """True if `text` (`linux/amd64`, `linux/arm64/v8`, `amd64`...) names this machine's
    platform: the only one pybuild builds for (RUN executes natively, with no emulation)."""
    parts = text.strip().lower().split("/")
    if len(parts) == 1:
        parts = ["linux"] + parts
    return parts[0] == "linux" and len(parts) <= 3 and \
        _ARCH_ALIASES.get(parts[1], parts[1]) == host_architecture()


@record
class LayerDesc:
    """One layer as an image references it."""
    diff_id: str
    digest: str
    size: int
    media_type: str = MEDIA_LAYER_GZIP

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@record(frozen=False)
class Image:
    """An image in the store (or being built): config + manifest + where they live."""
    config: dict
    layers: list[LayerDesc]
    id: str = ""                      # config digest
    digest: str = ""                  # manifest digest
    manifest: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    @property
    def runtime(self) -> dict:
        return self.config.get("config") or {}

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids", []))

    @property
    def chain_id(self) -> str | None:
        ids = chain_ids(self.diff_ids)
        return ids[-1] if ids else None

    @property
    def created(self) -> str:
        return self.config.get("created", "")

    @property
    def history(self) -> list[dict]:
        return list(self.config.get("history", []))


def empty_config() -> dict:
    """The config of `FROM scratch`: the platform, a default PATH and WorkingDir "/", as
    BuildKit's emptyImage (dockerfile2llb/image.go) has them."""
    return {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Env": [f"PATH={DEFAULT_PATH}"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }


def serialise(config: dict, layers: list[LayerDesc]) -> tuple[bytes, bytes]:
    """Config and manifest bytes for an image (canonical, so IDs are stable)."""
    config_bytes = canonical_json(config)
    return config_bytes, manifest_bytes(config_bytes, layers)


def manifest_bytes(config_bytes: bytes, layers: list[LayerDesc],
                   annotations: Mapping[str, str] | None = None) -> bytes:
    """The OCI manifest of a config (as stored, byte for byte) and its layers; `annotations`
    (`--annotation`) change the manifest's digest, never the image ID."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": digest_of(config_bytes),
                   "size": len(config_bytes)},
        "layers": [layer.descriptor() for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return canonical_json(manifest)


def env_list_to_dict(env: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env or []:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def env_dict_to_list(env: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def short_id(image_id: str) -> str:
    return image_id.split(":", 1)[-1][:12]
