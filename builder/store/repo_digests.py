"""What registries call the store's images: Docker's RepoDigests, `repo@digest` per push and pull.

A push of an image with plain layers (the default) sends their gzip twins
(layer/twins.py), so the manifest the registry holds is not the one in the
store, and its digest is known only from the push. CI jobs deploy by that
digest (`docker inspect --format '{{index .RepoDigests 0}}'`), and name the
image by it afterwards (`run repo@sha256:...`). So each push and pull records
`repo@digest` under the image's ID (ROOT/cache/repo-digests.json); `inspect`
shows them as RepoDigests and Store.resolve finds `repo@digest` by them, as
Docker does after `docker push`. Entries of images no longer in the store
are dropped when the next one is recorded.
"""

from __future__ import annotations

import json
import os

from ..errors import StoreError
from .lock import locked, read_json_dict, write_atomic

_FILE = "repo-digests.json"
_MAX_PER_IMAGE = 16


def of(store, image_id: str) -> list[str]:
    """The `repo@digest` names registries hold `image_id` under, oldest first."""
    names = _read(store).get(image_id)
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def find(store, name: str) -> str | None:
    """The ID of the image recorded under `repo@digest`, if any."""
    for image_id, names in _read(store).items():
        if isinstance(names, list) and name in names:
            return image_id
    return None


def remember(store, image_id: str, repository: str, digest: str) -> None:
    """Record that `repository` (a reference's name, no tag) holds `image_id` as `digest`."""
    name = f"{repository}@{digest}"
    path = os.path.join(store.cache_dir, _FILE)
    try:
        present = {img.id for img in store.images()}
        with locked(path + ".lock"):
            known = {k: v for k, v in _read(store).items() if k in present and isinstance(v, list)}
            for names in known.values():
                if name in names:
                    names.remove(name)      # (a digest names one manifest: one image)
            names = known.setdefault(image_id, [])
            names.append(name)
            del names[:-_MAX_PER_IMAGE]
            write_atomic(path, json.dumps(known, sort_keys=True).encode())
    except (OSError, StoreError):
        pass        # (the push or pull is done all the same; only the name is not kept here)


def _read(store) -> dict:
    return read_json_dict(os.path.join(store.cache_dir, _FILE))
