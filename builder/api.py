"""Library entry points for registries (the build itself is `engine.build`)."""

from __future__ import annotations

import os
from collections.abc import Callable

from .image import Image
from .progress import Event
from .store import Store


def insecure_registries(extra=()) -> tuple[str, ...]:
    """Registries that may be reached over plain HTTP: given, plus $PYBUILD_INSECURE_REGISTRIES."""
    env = [r.strip() for r in os.environ.get("PYBUILD_INSECURE_REGISTRIES", "").split(",")]
    return tuple(r for r in (*extra, *env) if r)


def pull(name: str, *, root: str | None = None, insecure: tuple[str, ...] = (),
         on_event: Callable[[Event], None] | None = None) -> Image:
    """Pull `name[:tag][@digest]` into the store (docker.io and library/ by default)."""
    from .registry import transfer
    store = Store(root)
    with store.in_use():
        return transfer.pull(store, name, insecure=insecure_registries(insecure), on_event=on_event)


def push(name: str, dest: str | None = None, *, root: str | None = None,
         insecure: tuple[str, ...] = (), on_event: Callable[[Event], None] | None = None,
         chunk_size: int = 0):
    """Push an image of the store to `dest` (default: its name); returns what was sent."""
    from .registry import transfer
    store = Store(root)
    return transfer.push(store, name, dest, insecure=insecure_registries(insecure),
                         on_event=on_event, chunk_size=chunk_size)
