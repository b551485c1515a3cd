"""The fuse server's event loop: a stand-in for the trio module pyfuse3 drives, that spins.

pyfuse3 runs its request loop on whatever module its `pyfuse3.trio`
attribute names (trio by default; `pyfuse3.asyncio.enable()` swaps in an
asyncio layer the same way). Our server needs no event loop: it has one
task, and its handlers never wait on anything. What it needs is to answer
the next request quickly. Requests come one at a time from the process in
the RUN, which waits for each answer; when the server sleeps between two
of them, waking it costs more than the request (on this 2-vCPU VM, a RUN
that unpacks 22,000 files took 23.7 s when the server slept in epoll and
15.7 s when it polled for 0.1 ms first).

So waiting for a request is: poll(2) without sleeping for up to
`SPIN_SECONDS`, then a blocking poll(2). The lock never suspends, and
`run` drives pyfuse3.main() to its end with a single send(): if anything
ever does suspend, that is a bug, reported as such rather than a hang.

Only what pyfuse3 uses is here: Lock, ClosedResourceError, open_nursery,
and lowlevel.{wait_readable, current_task, current_trio_token,
notify_closing}.
"""

from __future__ import annotations

import select
import sys
import time
import types

SPIN_SECONDS = 0.0001


class ClosedResourceError(Exception):
    """The fd was closed (pyfuse3.terminate()) while a request was awaited."""


class Lock:
    """One task: the lock is always free, and taking it never suspends."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class _Nursery:
    """Runs what it is given one after the other (pyfuse3 gives it one session loop)."""

    def __init__(self):
        self.pending: list = []

    def start_soon(self, func, *args, name=None):
        self.pending.append((func, args))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        while self.pending and exc[0] is None:
            func, args = self.pending.pop(0)
            await func(*args)
        return False


def open_nursery() -> _Nursery:
    return _Nursery()


_closed: set[int] = set()
_pollers: dict[int, select.poll] = {}
_task = types.SimpleNamespace(name="pybuild-fuse")


async def _wait_readable(fd: int) -> None:
    poller = _pollers.get(fd)
    if poller is None:
        poller = _pollers[fd] = select.poll()
        poller.register(fd, select.POLLIN)
    if not poller.poll(0):
        end = time.monotonic() + SPIN_SECONDS
        while not poller.poll(0):
            if time.monotonic() > end:
                while not poller.poll():
                    pass
                break
    if fd in _closed:
        raise ClosedResourceError()


def _notify_closing(fd: int) -> None:
    _closed.add(fd)


lowlevel = types.SimpleNamespace(wait_readable=_wait_readable, current_task=lambda: _task,
                                 current_trio_token=lambda: "pybuild-fuse",
                                 notify_closing=_notify_closing)


def run(main, *args) -> None:
    """Run pyfuse3.main(*args) with this module standing in for trio; returns when it ends."""
    import pyfuse3
    pyfuse3.trio = sys.modules[__name__]
    coro = main(*args)
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("the fuse server's loop suspended: pyfuse3 waited on something "
                       "builder/snapshot/fuse/loop.py does not provide")
