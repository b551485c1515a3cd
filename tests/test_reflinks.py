"""COPY on a filesystem with reflinks (XFS here): a layer's copy shares the context file's blocks.

For files of 1 MB or more, fileops.copy_data asks the kernel for
copy_file_range, which XFS and btrfs answer with a reflink when both files
are on one filesystem: the copy takes no time and no space until either
side is written, and then only the written side changes. Smaller files are
copied into the page cache, where the commit reads them next. The test
makes a small XFS on a loop device (skipped where the machine has none)
holding both the context and the store.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess

import pytest

import builder
from builder.image import chain_ids
from builder.store import Store

from conftest import BASE, busybox_context, layer_files, write_context


@pytest.fixture(scope="module")
def xfs(tmp_path_factory):
    """A mounted XFS with reflinks, or a skip saying why there is none."""
    if not shutil.which("mkfs.xfs") or not shutil.which("xfs_io"):
        pytest.skip("xfsprogs is not installed (make test installs it)")
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "fs.img", base / "mnt"
    with open(image, "wb") as f:
        f.truncate(640 << 20)                  # sparse; XFS wants at least 300 MB
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mnt.mkdir()
    done = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a loop device here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def extents(path) -> list[str]:
    """The physical block ranges of a file's data, as xfs_io's fiemap prints them."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return re.findall(r"\]: (\d+\.\.\d+)", out)


def test_a_copy_on_xfs_shares_the_context_files_blocks_and_stays_as_copied(xfs):
    root = str(xfs / "store")
    builder.build(str(busybox_context(xfs / "busybox")), tags=[BASE], root=root)
    data = random.Random(5).randbytes(8 << 20)
    small = random.Random(6).randbytes(64 << 10)
    ctx = write_context(xfs / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY *.bin /\n",
                                      "big.bin": data, "small.bin": small})
    os.sync()                           # (the context's blocks allocated: fiemap shows them)
    image = builder.build(str(ctx), tags=["reflinked"], root=root)

    store = Store(root)
    diff = store.layers.diff_dir(chain_ids(image.diff_ids)[-1])
    copied = os.path.join(diff, "big.bin")
    source = extents(ctx / "big.bin")
    assert source and extents(copied) == source       # the same blocks: a reflink
    files = layer_files(store, image.layers[-1])
    assert files["big.bin"] == data and files["small.bin"] == small
    # A small file is copied into the page cache, where the commit reads it next.
    assert extents(ctx / "small.bin") and \
        extents(os.path.join(diff, "small.bin")) != extents(ctx / "small.bin")

    # Written afterwards, the context's file changes alone.
    with open(ctx / "big.bin", "r+b") as f:
        f.write(b"changed")
    with open(copied, "rb") as f:
        assert f.read() == data
    assert extents(copied) != extents(ctx / "big.bin")
