"""The step cache: typed keys, hashed canonically, and a persistent index in the store.

A step's key is made of what decides its result:

* `parent`: the identity of the image state before the step: the base
  image's ID, then chained with each step's result (history entry, runtime
  settings such as Env, User, WorkingDir, Shell, and layer). So a changed
  ENV, a moved base tag or any step that re-ran before (new history time)
  changes every key after it, as in Docker;
* `instruction`: the step after variable expansion, in a canonical form
  (whitespace inside a RUN command counts, as in Docker);
* `build_args`: the ARG values in scope, which are in a RUN's environment but
  not in the image config;
* `sources`: the content digests of COPY sources (never their mtimes).

An entry is what the step added: its history entry, the runtime config
after it, and its layer (or none). Entries are small JSON files written by
atomic rename, so concurrent builds on one store can share them.

A COPY's entry is also listed under its key's prefix (the key without its
sources: `StepKey.prefix`), in `prefixes/`. When no entry has a COPY's
prefix, no content of its sources can hit, and the build may copy before it
knows their digests, hashing each file as it copies it instead of reading
the whole context twice (engine.py: a certain miss). A store whose entries
were made before prefixes were listed says so (`LEGACY`), and no miss is
taken as certain there until its entries are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import field

from .record import record
from .image import LayerDesc, canonical_json, chain_ids, digest_of
from .store.lock import write_atomic

CACHE_VERSION = 2


@record
class StepKey:
    """What a step's cache key is made of (digest() makes the key)."""
    parent: str
    instruction: dict
    build_args: tuple[tuple[str, str], ...] = ()
    sources: tuple[str, ...] = ()
    source_date_epoch: int | None = None     # clamps the layer's times and sets the history's

    def digest(self) -> str:
        parts = {"v": CACHE_VERSION, "parent": self.parent, "instruction": self.instruction,
                 "build_args": [list(a) for a in self.build_args], "sources": list(self.sources)}
        if self.source_date_epoch is not None:
            parts["epoch"] = self.source_date_epoch
        return digest_of(canonical_json(parts))

    def prefix(self) -> str:
        """What every key of this step shares whatever its sources' contents are."""
        parts = {"v": CACHE_VERSION, "prefix-of": {
            "parent": self.parent, "instruction": self.instruction,
            "build_args": [list(a) for a in self.build_args], "epoch": self.source_date_epoch}}
        return digest_of(canonical_json(parts))


@record(frozen=False)
class StepResult:
    """What a cache entry gives back: the step's history entry, config and layer."""
    history: dict
    runtime: dict                          # the image's "config" block after the step
    layer: LayerDesc | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"history": self.history, "runtime": self.runtime,
                "layer": None if self.layer is None else self.layer.__dict__, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict) -> "StepResult":
        layer = data.get("layer")
        return cls(data["history"], data["runtime"], LayerDesc(**layer) if layer else None,
                   data.get("extra") or {})


LEGACY = "legacy"          # in prefixes/: this store has entries no prefix lists


class StepCache:
    def __init__(self, store):
        self.store = store
        self.dir = os.path.join(store.cache_dir, "steps")
        os.makedirs(self.dir, exist_ok=True)
        self.prefix_dir = os.path.join(store.cache_dir, "prefixes")
        if not os.path.isdir(self.prefix_dir):
            self._start_prefixes()
        self._legacy = os.path.exists(os.path.join(self.prefix_dir, LEGACY))
        if self._legacy and not self._any_entry():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.prefix_dir, LEGACY))
            self._legacy = False

    def _any_entry(self) -> bool:
        with os.scandir(self.dir) as it:
            return any(True for _ in it)

    def _start_prefixes(self) -> None:
        """Make prefixes/, marked LEGACY if entries were made before it (by an older pybuild):
        made aside and renamed into place, so that no build sees it without its mark."""
        tmp = os.path.join(self.store.tmp, f"prefixes-{os.getpid()}-{time.monotonic_ns()}")
        os.makedirs(tmp)
        if self._any_entry():
            open(os.path.join(tmp, LEGACY), "wb").close()
        try:
            os.rename(tmp, self.prefix_dir)
        except OSError:              # (another process made it first)
            with contextlib.suppress(OSError):
                for name in os.listdir(tmp):
                    os.unlink(os.path.join(tmp, name))
                os.rmdir(tmp)

    def may_hold(self, prefix: str) -> bool:
        """False only if no entry of this store has this prefix (StepKey.prefix): a step of
        that prefix certainly misses, whatever its sources hold."""
        if self._legacy:
            return True
        try:
            keys = self._listed(prefix[7:])
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        return any(os.path.exists(self._path(key)) for key in reversed(keys))   # newest first

    def _listed(self, name: str) -> list[str]:
        """The keys the prefix file `name` lists, oldest first (OSError, ValueError: none
        there, or not readable)."""
        with open(os.path.join(self.prefix_dir, name), encoding="ascii") as f:
            return f.read().split()

    def _list_prefix(self, prefix: str, key: str) -> None:
        """Add `key` to the entries of `prefix` (after the entry is in place)."""
        path = os.path.join(self.prefix_dir, prefix[7:])
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            # prefixes/ was removed under this build: made again, marked if entries are left.
            self._start_prefixes()
            self._legacy = self._legacy or os.path.exists(os.path.join(self.prefix_dir, LEGACY))
            fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, (key + "\n").encode("ascii"))    # (one write: appends do not mix)
        finally:
            os.close(fd)

    def prune_prefixes(self) -> None:
        """Drop the keys whose entries are gone from the prefixes, and the prefixes left with
        none. (A key a build adds meanwhile may be lost: its step is then copied before its
        key is known, once, and the entry written again.)"""
        for name in os.listdir(self.prefix_dir):
            if name == LEGACY or name.startswith("."):      # (write_atomic's temp files)
                continue
            path = os.path.join(self.prefix_dir, name)
            try:
                keys = self._listed(name)
            except (OSError, ValueError):
                continue
            live = [key for key in dict.fromkeys(keys) if os.path.exists(self._path(key))]
            with contextlib.suppress(FileNotFoundError):
                if not live:
                    os.unlink(path)
                elif len(live) < len(keys):
                    write_atomic(path, "".join(key + "\n" for key in live).encode("ascii"))

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key[7:] + ".json")

    def peek(self, key: str) -> StepResult | None:
        """The entry as it was stored, whether or not its layer is still there."""
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return StepResult.from_json(json.load(f))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def get(self, key: str, parent_diff_ids: list[str]) -> StepResult | None:
        """The cached result of a step, if its layer is still in the store."""
        result = self.peek(key)
        if result is None:
            return None
        if result.layer is not None:
            chain = chain_ids(parent_diff_ids + [result.layer.diff_id])[-1]
            if not self.store.layers.has(chain) or not self.store.blobs.has(result.layer.digest):
                return None
        with contextlib.suppress(OSError):
            os.utime(self._path(key))      # last use, for prune
        return result

    def put(self, key: str, result: StepResult, prefix: str | None = None) -> None:
        """Store an entry; `prefix` (StepKey.prefix) lists it under its prefix too."""
        tmp = os.path.join(self.store.tmp, f"cache-{key[7:19]}-{os.getpid()}-{time.monotonic_ns()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, sort_keys=True)
        os.replace(tmp, self._path(key))
        if prefix is not None:
            self._list_prefix(prefix, key)

    def entries(self):
        """(key, last used, result) of every entry."""
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    yield "sha256:" + name[:-5], os.stat(path).st_mtime, StepResult.from_json(json.load(f))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))


def now(epoch: int | None = None) -> str:
    """An RFC 3339 UTC timestamp with nanoseconds, as Docker writes them; `epoch` (seconds,
    SOURCE_DATE_EPOCH) instead of the time when given."""
    if epoch is not None:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + \
        f".{ns % 1_000_000_000:09d}Z"
