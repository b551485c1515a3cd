"""Where a built image goes besides the store: `--output type=...` (Docker's -o).

* `type=oci,dest=FILE` and `type=docker,dest=FILE`: an archive, as `pybuild
  save` writes it (one tar that is both an OCI layout and a docker-archive,
  so either reader loads either type);
* `type=registry`: push every `-t` name (as `--push`);
* `type=local,dest=DIR`: the final root filesystem as a directory (owners,
  modes, links and xattrs kept; whiteouts applied, so deleted files are gone);
* `type=tar,dest=FILE`: the same root filesystem as one tar (`dest=-`, or a
  bare `-o -`: on standard output, as buildx writes it).
"""

from __future__ import annotations

import os
import shutil
import stat
import sys

from .record import record
from .errors import UsageError

TYPES = ("oci", "docker", "registry", "local", "tar")
STDOUT = "-"


@record
class OutputSpec:
    type: str
    dest: str | None = None


def parse_spec(text: str) -> OutputSpec:
    """`type=oci,dest=FILE`; a bare `DIR` is `type=local,dest=DIR` and a bare `-` is
    `type=tar,dest=-`, as buildx reads them."""
    if text == STDOUT:
        return OutputSpec("tar", STDOUT)
    if "=" not in text:
        return OutputSpec("local", os.path.abspath(text))
    fields = dict(f.partition("=")[::2] for f in text.split(",") if f)
    kind = fields.get("type", "local")
    if kind not in TYPES:
        raise UsageError(f"--output {text}: unknown type {kind!r}",
                         hint="use type=oci, type=docker, type=registry, type=local or type=tar")
    dest = fields.get("dest")
    if kind != "registry" and not dest:
        raise UsageError(f"--output {text}: needs dest=" + ("DIR" if kind == "local" else "FILE"))
    if dest == STDOUT and kind != "tar":
        raise UsageError(f"--output {text}: only type=tar can go to standard output")
    return OutputSpec(kind, dest if dest in (None, STDOUT) else os.path.abspath(dest))


def write(store, image, spec: OutputSpec) -> None:
    if spec.type in ("oci", "docker"):
        write_archive(store, image, spec.dest)
    elif spec.type == "local":
        write_rootfs(store, image, spec.dest)
    elif spec.type == "tar":
        write_rootfs_tar(store, image, spec.dest)


def write_archive(store, image, dest: str) -> None:
    from . import archive
    write_output(dest, lambda f: archive.save(store, [image.id], f))


def write_output(dest: str, fill, made: str | None = None) -> None:
    """`fill(file)` writes the file `dest` a user named (`-o`, `--output dest=`).

    A new or regular file is written beside it first and renamed into place,
    so a failure leaves no half-written `dest` (or `made`, a finished file on
    the same file system, is renamed there, when it can be). Anything else
    already there is written as it is, never replaced: a pipe or FIFO
    (`-o >(gzip > x.gz)`), `/dev/stdout` (a symlink in /dev, which a rename
    would replace with the archive), a device, or a symlink to a file.
    """
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(dest, "wb") as f:
            fill(f)
        return
    if made is not None:
        try:
            os.replace(made, dest)
            return
        except OSError:
            pass                           # (another file system: written instead)
    tmp = f"{dest}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            fill(f)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_rootfs(store, image, dest: str) -> None:
    """The merged view of the image's layers, archived from inside a private mount and extracted
    into `dest` by the safe extractor (nothing lands outside it)."""
    from .layer import extract
    from .snapshot import flatten
    os.makedirs(dest, exist_ok=True)
    with store.tmpdir("output") as tmp:
        tar_path = flatten.union_tar(store, image.diff_ids, tmp)
        with open(tar_path, "rb") as f:
            extract.extract(f, dest, what=f"--output type=local,dest={dest}", whiteouts=False)


def write_rootfs_tar(store, image, dest: str) -> None:
    """The merged view of the image's layers as one tar, to `dest` (STDOUT: standard output)."""
    from .snapshot import flatten
    with store.tmpdir("output") as tmp:
        tar_path = flatten.union_tar(store, image.diff_ids, tmp)

        def copy_to(out) -> None:
            with open(tar_path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        if dest == STDOUT:
            copy_to(sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        write_output(dest, copy_to, made=tar_path)
