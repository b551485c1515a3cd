"""A lock for state that stage threads share and forked children use (copy workers, sandboxes).

A child made by fork() has only the forking thread; a lock another thread
held at that moment stays held in the child, and nothing there would ever
release it. ForkSafeLock gives the child a fresh one.
"""

from __future__ import annotations

import os
import threading


class ForkSafeLock:
    """A threading.Lock (use it with `with`) that a forked child finds free."""

    def __init__(self):
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
