"""The one error tree of pybuild.

Every failure a user or an orchestrator can act on is one of these; lower-level
exceptions (OSError, JSON errors, tar errors) are translated at the seam where
they happen, with the context that makes them actionable (which file, which
step, which layer). The CLI turns them into one line and an exit code; the
library lets callers catch them by type.

    PybuildError                 exit 1: anything else pybuild could not do
    ├── UsageError               exit 2: a bad command line or option value
    ├── DockerfileError          exit 3: the Dockerfile is wrong (file, line)
    ├── BuildError               exit 4: a build step could not be carried out
    │   └── StepFailed           exit 4: a RUN exited non-zero (step, line, code)
    ├── ImageNotFound            exit 5: no such image in the store
    ├── StoreError               exit 6: the store is unreadable or inconsistent
    │   └── LayerError           exit 6: a layer tar is corrupt or unsafe
    ├── RegistryError            exit 7: a registry refused, failed or sent bad data
    └── Interrupted              exit 130: SIGINT/SIGTERM; everything was cleaned up
"""

from __future__ import annotations

import errno
import os

# OSError numbers that mean the store's disk (or quota) is full, and what to do then.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_HINT = ("the disk holding the store is full: free space, or run `pybuild rmi` on "
                  "images you no longer need")


def os_error_text(e: OSError) -> str:
    """What the system refused, and on which path(s): `Read-only file system: /a -> /b`."""
    where = f": {e.filename}" if e.filename else ""
    if e.filename2:
        where += f" -> {e.filename2}"
    return f"{e.strerror or e}{where}"


def os_error_hint(number: int | None) -> str | None:
    """What to do about an OSError of this errno met while working on the store, if we know."""
    if number in (errno.EACCES, errno.EPERM):
        if os.geteuid() != 0:
            return "pybuild needs root for its store and for builds"
        return ("refused even to root: an immutable attribute (see `lsattr`), a read-only "
                "mount or a security module (see `dmesg`) forbids it")
    return _OS_HINTS.get(number)


_OS_HINTS = {
    errno.ENOSPC: DISK_FULL_HINT,
    errno.EDQUOT: "the disk quota of the store is exhausted",
    errno.EROFS: "the store is on a read-only filesystem: choose another with --root",
    errno.EXDEV: "the store spans filesystems (something is mounted inside it): keep it on one",
    errno.EIO: "the disk reported an I/O error: see `dmesg`",
}


class PybuildError(Exception):
    """Base of every error pybuild raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(PybuildError):
    exit_code = 2


class DockerfileError(PybuildError):
    """The Dockerfile cannot be parsed or means something we cannot do."""

    exit_code = 3

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 hint: str | None = None):
        self.file = file
        self.line = line
        where = ""
        if file and line:
            where = f"{file}:{line}: "
        elif file:
            where = f"{file}: "
        elif line:
            where = f"line {line}: "
        super().__init__(where + message, hint=hint)
        self.reason = message


class BuildError(PybuildError):
    """A step could not be carried out (missing COPY source, unknown user, ...)."""

    exit_code = 4

    def __init__(self, message: str, *, step: str | None = None, hint: str | None = None):
        self.step = step
        super().__init__(f"{step}: {message}" if step else message, hint=hint)
        self.reason = message


class StepFailed(BuildError):
    """A RUN command exited with a non-zero status."""

    def __init__(self, *, step: str, line: int | None, file: str | None, command: str,
                 exit_code: int):
        self.command = command
        self.status = exit_code
        self.line = line
        self.file = file
        where = f" ({file}:{line})" if file and line else ""
        if exit_code > 128:
            what = f"was killed by signal {exit_code - 128}"
        else:
            what = f"exited with code {exit_code}"
        super().__init__(f"{command!r} {what}{where}", step=step)


class ImageNotFound(PybuildError):
    exit_code = 5

    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"image not found: {name}",
            hint="pull it (`pybuild pull NAME`), build it, or bring it into the store with "
                 "`pybuild load -i FILE` (docker/OCI archive) or `pybuild import ROOTFS.tar "
                 "NAME`; `pybuild images` lists what is there",
        )


class StoreError(PybuildError):
    exit_code = 6


class LayerError(StoreError):
    """A layer tar is corrupt, or tries to write outside its directory."""


class RegistryError(PybuildError):
    """A registry could not be reached, refused us, or sent something that does not verify."""

    exit_code = 7
    status: int | None = None      # the HTTP status, when the registry answered


class Interrupted(PybuildError):
    exit_code = 130

    def __init__(self, message: str = "interrupted; nothing was left mounted"):
        super().__init__(message)
