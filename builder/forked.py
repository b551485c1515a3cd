"""A call made in a forked child while this process does something else.

Threads do not help Python code run beside Python code (the GIL); a forked
child does, and it starts with everything this process holds, so it needs
nothing handed to it. The executor commits a cold COPY's layer this way
(walking 30,000 files into a tar: a third of a second on one core) while the
build process takes up the digests the copy made and makes the step's key
on the other core: executor.py.

The child's result or exception comes back pickled; an exception that does
not survive pickling comes back as a StoreError with its text. The child
dies with the thread that forked it; if the caller gives up waiting
(cancel(), or an exception while it waits), the child is stopped with
SIGTERM, which it turns into KeyboardInterrupt so that its `with` blocks
remove their temp files before it ends.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
from typing import Callable

from . import linux
from .errors import StoreError


def start(func: Callable[[], object]) -> "Forked":
    """Fork a child that calls `func()`; Forked.result() waits for what it returned."""
    with linux.FORK_LOCK:          # (no other thread's fork inherits the pipe's write end)
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:               # pragma: no cover (the child; reports through the pipe)
            os.close(r)
            _child(func, w, parent)
        os.close(w)
    return Forked(pid, r)


def _child(func: Callable[[], object], w: int, parent: int) -> None:
    """Call `func` and write ("ok", result) or ("error", exception) to `w`; never returns."""
    gc.disable()                   # short-lived: a collection would copy the parent's pages
    try:
        linux.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        signal.signal(signal.SIGTERM, _interrupted)
        answer = ("ok", func())
    except BaseException as e:     # every failure goes back to the caller, who raises it
        answer = ("error", e)
    try:
        data = pickle.dumps(answer)
    except Exception:
        data = pickle.dumps(("error", StoreError(f"{type(answer[1]).__name__}: {answer[1]}")))
    try:
        with open(w, "wb") as f:
            f.write(data)
    finally:
        os._exit(0)


def _interrupted(_signum, _frame) -> None:
    raise KeyboardInterrupt


class Forked:
    """A child start() forked: wait for its answer once, with result() or cancel()."""

    def __init__(self, pid: int, answers: int):
        self.pid = pid
        self._answers = answers

    def result(self):
        """What the child's call returned, or raise what it raised."""
        chunks = []
        try:
            while chunk := os.read(self._answers, 1 << 16):
                chunks.append(chunk)
        except BaseException:
            self.cancel()
            raise
        os.close(self._answers)
        self._answers = -1
        _pid, status = os.waitpid(self.pid, 0)
        try:
            kind, value = pickle.loads(b"".join(chunks))
        except Exception:
            raise StoreError(f"a forked process ended with status {status} and said nothing "
                             "readable") from None
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        """Stop the child (it removes its temp files) and wait for it to end."""
        if self._answers < 0:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.close(self._answers)
        self._answers = -1
        os.waitpid(self.pid, 0)
