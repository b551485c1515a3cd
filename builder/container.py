"""`pybuild run`: a throw-away container, as Docker's storage docs describe one.

A container is a fresh, empty upper dir over the image's read-only layers
(the "thin writable container layer"); the command runs in the same sandbox
as a RUN step, with pybuild's own stdin, stdout and stderr, and the upper
dir is thrown away when it exits.
"""

from __future__ import annotations

import os

from . import sandbox
from .errors import BuildError, UsageError
from .image import Image
from . import snapshot
from .store import Store


def command_of(image: Image, args: list[str], entrypoint: str | None = None) -> list[str]:
    """Entrypoint + (args or the image's Cmd), as `docker run` puts them together.

    `--entrypoint` replaces the image's Entrypoint and drops its Cmd, as in Docker.
    """
    rt = image.runtime
    if entrypoint is not None:
        argv = ([entrypoint] if entrypoint else []) + list(args)
    else:
        argv = list(rt.get("Entrypoint") or []) + (list(args) or list(rt.get("Cmd") or []))
    if not argv:
        raise UsageError("no command specified: the image has neither Entrypoint nor Cmd",
                         hint="give the command after the image name")
    return argv


def run(store: Store, image: Image, args: list[str], *, env: list[str] = (), user: str | None = None,
        workdir: str | None = None, network: str = "host", entrypoint: str | None = None) -> int:
    rt = image.runtime
    spec = sandbox.RunSpec(argv=command_of(image, args, entrypoint),
                           env=_merge_env(rt.get("Env") or [], env),
                           user=rt.get("User") or "" if user is None else user,
                           workdir=workdir or rt.get("WorkingDir") or "/",
                           network=network, interactive=True)
    with store.in_use(), store.tmpdir("container") as tmp:
        snap = snapshot.prepare(store, image.diff_ids, tmp)
        scratch = os.path.join(tmp, "scratch")
        os.mkdir(scratch, 0o700)
        try:
            return sandbox.run(snap, spec, scratch)
        except sandbox.SetupError as e:
            raise BuildError(str(e), step="run", hint=e.hint) from None


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    out = {e.partition("=")[0]: e for e in base}
    for e in extra:
        k, eq, v = e.partition("=")
        out[k] = e if eq else f"{k}={os.environ.get(k, '')}"
    return list(out.values())
