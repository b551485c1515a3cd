"""Why a step missed the cache, in one line: what its key was made of last time, and now.

For every step the engine writes down a recipe: the parts its cache key was
made of (the parent identity, the instruction, the ARG values in its
environment, the stage's environment, the base image, and for COPY/ADD the
type, mode and digest of every source file). The last recipe of each step
of a Dockerfile is kept in `cache/recipes/` (a file per Dockerfile path,
by stage and step position). On a miss the new recipe is compared with it, and
the first difference that explains the miss is named:

    --no-cache
    no earlier build of this step
    1 file changed: src/main.c (content)
    instruction changed: RUN  make (was: RUN make)
    build arg VERSION changed (1 -> 2)
    ENV CFLAGS changed (-O2 -> -O3)
    base image bbase:1 now points to sha256:...
    parent step missed (step 4: ENV CFLAGS changed (-O2 -> -O3))
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import os
import threading

from .context import XATTRS_MARK
from .statcache import read_marshal_dict
from .store.lock import write_atomic

MAX_FILES_NAMED = 3


class RecipeLog:
    """The latest recipe of every step of one Dockerfile.

    Two files per Dockerfile: the steps' keys (small: read by every build,
    cached steps only compare keys) and their recipes (read on the first
    miss). Both are written once, by flush() at the end of a build: a file
    per step was 2,000 files created and replaced for a 1,000-step build,
    on disks where creating a file costs a millisecond. Builds of the same
    Dockerfile at the same time: the last to finish is the one kept (this is
    only an explanation for later).
    """

    def __init__(self, cache_dir: str, dockerfile: str):
        self.dir = os.path.join(cache_dir, "recipes")
        name = hashlib.sha256(os.path.abspath(dockerfile).encode()).hexdigest()[:40]
        self._paths = {kind: os.path.join(self.dir, f"{name}.{kind}") for kind in ("keys", "recipes")}
        self._lock = threading.Lock()
        self._loaded: dict[str, dict] = {}
        self._new: dict[str, dict] = {}            # position -> recipe, not written yet

    def _read(self, kind: str) -> dict:
        with self._lock:
            if kind not in self._loaded:
                self._loaded[kind] = read_marshal_dict(self._paths[kind])
            return self._loaded[kind]

    def load(self, position: str) -> dict | None:
        """The recipe kept for this step (by stage and step position), if any."""
        recipe = self._read("recipes").get(position)
        return recipe if isinstance(recipe, dict) else None

    def kept_key(self, position: str) -> str | None:
        """The cache key of the recipe kept for this step."""
        with self._lock:
            if position in self._new:
                return self._new[position]["key"]
        return self._read("keys").get(position)

    def save(self, position: str, recipe: dict) -> None:
        """Keep `recipe` as this step's latest (written by flush)."""
        with self._lock:
            self._new[position] = recipe

    def flush(self) -> None:
        """Write what this build learned, merged with what was kept."""
        if not self._new:
            return
        recipes = dict(self._read("recipes"))
        keys = dict(self._read("keys"))
        with self._lock:
            recipes.update(self._new)
            keys.update({position: r["key"] for position, r in self._new.items()})
            self._new = {}
        with contextlib.suppress(OSError):          # (only an explanation for later)
            os.makedirs(self.dir, exist_ok=True)
            write_atomic(self._paths["recipes"], marshal.dumps(recipes))
            write_atomic(self._paths["keys"], marshal.dumps(keys))


def explain(previous: dict | None, current: dict, *, no_cache: bool,
            parent_missed: str | None) -> tuple[str, list[str]]:
    """(the one-line reason, every difference found) for a step that missed."""
    if no_cache:
        return "--no-cache", []
    if previous is None or previous.get("keyword") != current.get("keyword"):
        return "no earlier build of this step", []
    details = _differences(previous, current)
    if details:
        return details[0], details
    if previous.get("parent") != current.get("parent"):
        if parent_missed:
            return f"parent step missed ({parent_missed})", []
        return "the image below this step changed", []
    if previous.get("key") == current.get("key"):
        return "its cached result was pruned or is incomplete", []
    return "its cache key changed", []


def _differences(prev: dict, cur: dict) -> list[str]:
    out: list[str] = []
    files = _file_changes(prev.get("sources") or {}, cur.get("sources") or {})
    if files:
        named = ", ".join(f"{path} ({what})" for path, what in files[:MAX_FILES_NAMED])
        more = f" and {len(files) - MAX_FILES_NAMED} more" if len(files) > MAX_FILES_NAMED else ""
        out.append(f"{len(files)} file{'s' if len(files) != 1 else ''} changed: {named}{more}")
    # Causes before effects: a changed build arg also changes the text of the steps that
    # expand it, and that is what the user wants to hear about.
    for name, old, new in _dict_changes(prev.get("args") or {}, cur.get("args") or {}):
        out.append(f"build arg {name} changed ({_show(old)} -> {_show(new)})")
    for name, old, new in _dict_changes(prev.get("env") or {}, cur.get("env") or {}):
        out.append(f"ENV {name} changed ({_show(old)} -> {_show(new)})")
    if prev.get("instruction") != cur.get("instruction"):
        out.append(f"instruction changed: {cur.get('text')} (was: {prev.get('text')})")
    if prev.get("inputs") != cur.get("inputs"):
        out.append("a source it reads changed (another stage, an image, a download or a bind mount)")
    pb, cb = prev.get("base") or {}, cur.get("base") or {}
    if pb.get("id") != cb.get("id"):
        if pb.get("name") == cb.get("name"):
            out.append(f"base image {cb.get('name')} now points to {cb.get('id')}")
        else:
            out.append(f"base image changed: {cb.get('name')} (was: {pb.get('name')})")
    return out


def _file_changes(prev: dict, cur: dict) -> list[tuple[str, str]]:
    changes = []
    for path in sorted(set(prev) | set(cur)):
        a, b = prev.get(path), cur.get(path)
        if a == b:
            continue
        if a is None:
            changes.append((path, "added"))
        elif b is None:
            changes.append((path, "removed"))
        elif a[0] != b[0]:
            changes.append((path, "type"))
        elif a[2] != b[2]:
            same_content = a[2].split(" " + XATTRS_MARK)[0] == b[2].split(" " + XATTRS_MARK)[0]
            changes.append((path, "xattrs" if same_content else "content"))
        else:
            changes.append((path, "mode"))
    return changes


def _dict_changes(prev: dict, cur: dict):
    for name in sorted(set(prev) | set(cur)):
        if prev.get(name) != cur.get(name):
            yield name, prev.get(name), cur.get(name)


def _show(value) -> str:
    if value is None:
        return "unset"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."
