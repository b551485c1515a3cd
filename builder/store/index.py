"""The OCI image layout's `index.json`: which manifests the store holds, and their tags.

Tags are `org.opencontainers.image.ref.name` annotations on manifest
descriptors (one descriptor per tag), so `skopeo inspect oci:ROOT:name:tag`
and `umoci` read the store directly. An image without a tag keeps one
descriptor without the annotation, so that it stays listed and addressable by
ID (Docker's `<none>` images). Callers hold the store lock around changes;
writes are atomic renames.
"""

from __future__ import annotations

import json
import os

from ..errors import StoreError
from .lock import new_temp_file

REF_NAME = "org.opencontainers.image.ref.name"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


class Index:
    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, "index.json")

    def load(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
        except ValueError as e:
            raise StoreError(f"{self.path} is not valid JSON ({e}); the store index is damaged") from None
        data.setdefault("manifests", [])
        return data

    def save(self, data: dict) -> None:
        fd, tmp = new_temp_file(self.root, ".index-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

    def entries(self) -> list[dict]:
        return self.load()["manifests"]

    def set_tag(self, name: str, descriptor: dict) -> str | None:
        """Point `name` at a manifest; returns the manifest digest it pointed to before."""
        data = self.load()
        previous = None
        kept = []
        for d in data["manifests"]:
            ann = d.get("annotations") or {}
            if ann.get(REF_NAME) == name:
                previous = d["digest"]
                continue
            if d["digest"] == descriptor["digest"] and REF_NAME not in ann:
                continue  # the untagged entry of this image: it now has a tag
            kept.append(d)
        entry = dict(descriptor)
        entry["annotations"] = {**(descriptor.get("annotations") or {}), REF_NAME: name}
        kept.append(entry)
        data["manifests"] = self._keep_dangling(kept, previous)
        self.save(data)
        return previous

    def add_untagged(self, descriptor: dict) -> None:
        data = self.load()
        if any(d["digest"] == descriptor["digest"] for d in data["manifests"]):
            return
        entry = {k: v for k, v in descriptor.items() if k != "annotations"}
        data["manifests"].append(entry)
        self.save(data)

    def remove_tag(self, name: str) -> str | None:
        data = self.load()
        removed = None
        kept = []
        for d in data["manifests"]:
            if (d.get("annotations") or {}).get(REF_NAME) == name:
                removed = d["digest"]
            else:
                kept.append(d)
        data["manifests"] = kept
        self.save(data)
        return removed

    def remove_digest(self, digest: str) -> list[str]:
        data = self.load()
        names = [(d.get("annotations") or {}).get(REF_NAME) for d in data["manifests"]
                 if d["digest"] == digest]
        data["manifests"] = [d for d in data["manifests"] if d["digest"] != digest]
        self.save(data)
        return [n for n in names if n]

    @staticmethod
    def _keep_dangling(entries: list[dict], previous: str | None) -> list[dict]:
        """When a tag moves away from an image that has no other tag, keep it listed untagged."""
        if previous is None or any(d["digest"] == previous for d in entries):
            return entries
        for_digest = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": previous}
        return entries + [for_digest]
