"""Incremental COPY (builder/donor.py): a rebuilt COPY shares its unchanged files with the last one.

The layer must be exactly the one a plain copy gives (same diff_id as a
build with no earlier layer to share from), and only files whose content,
mode, owner and mtime are unchanged may share an inode.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile

import pytest

import builder
from builder import donor
from builder.image import chain_ids
from builder.layer import segments
from builder.store import Store

from conftest import BASE, layer_files, layer_tar, run_pybuild, write_context

FILES = {f"src/d{i % 3}/f{i}.txt": f"file {i}\n" * (i + 1) for i in range(12)}


def copy_layer(store: Store, image) -> tuple[str, str]:
    """(chain ID, diff dir) of the image's last layer (the COPY)."""
    chain = chain_ids(image.diff_ids)[-1]
    return chain, store.layers.diff_dir(chain)


def entries(store: Store, layer) -> dict:
    """name -> everything a layer tar says of the entry (contents too), but /app's time."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(layer_tar(store, layer))) as t:
        for m in t.getmembers():
            data = t.extractfile(m).read() if m.isfile() else None
            out[m.name] = (m.type, m.mode, m.uid, m.gid, m.size, m.linkname, m.pax_headers,
                           None if m.name == "app" else m.mtime, data)
    return out


def inode(path) -> int:
    return os.lstat(path).st_ino


def build(ctx, store_root, **kw):
    return builder.build(str(ctx), root=store_root, **kw)


def make_context(tmp_path, chown: str = ""):
    flag = f"--chown={chown} " if chown else ""
    return write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY {flag}src/ /app/\n",
                                             **FILES})


def test_unchanged_files_are_shared_and_the_layer_is_a_plain_copys(tmp_path, base_image, store_root):
    store = Store(store_root)
    ctx = make_context(tmp_path)
    first = build(ctx, store_root)
    _, old = copy_layer(store, first)
    assert os.path.isfile(os.path.join(os.path.dirname(old), donor.TABLE))

    (ctx / "src/d0/f0.txt").write_text("changed content\n")                 # content
    os.chmod(ctx / "src/d1/f1.txt", 0o600)                                  # mode
    st = os.stat(ctx / "src/d2/f2.txt")
    os.utime(ctx / "src/d2/f2.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # mtime only
    os.unlink(ctx / "src/d0/f3.txt")                                        # removed
    (ctx / "src/d1/new.txt").write_text("new\n")                            # added
    second = build(ctx, store_root)
    assert second.id != first.id
    chain, new = copy_layer(store, second)

    changed = {"d0/f0.txt", "d1/f1.txt", "d2/f2.txt", "d1/new.txt"}
    for rel in FILES:
        name = rel.removeprefix("src/")
        if name in changed or name == "d0/f3.txt":
            continue
        assert inode(f"{new}/app/{name}") == inode(f"{old}/app/{name}"), name
    for name in changed - {"d1/new.txt"}:
        assert inode(f"{new}/app/{name}") != inode(f"{old}/app/{name}"), name
    assert not os.path.lexists(f"{new}/app/d0/f3.txt")
    assert os.stat(f"{new}/app/d1/f1.txt").st_mode & 0o777 == 0o600
    assert os.stat(f"{new}/app/d2/f2.txt").st_mtime_ns // 10**9 == (st.st_mtime_ns + 10**9) // 10**9

    # The same sources built where there is no earlier layer to share from give the same
    # layer, entry for entry: the one thing allowed to differ is the time of /app, which
    # the COPY creates when it runs (as BuildKit does without SOURCE_DATE_EPOCH).
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times and modes kept)
    alone = build(plain, store_root, no_cache=True)
    assert entries(store, alone.layers[-1]) == entries(store, second.layers[-1])
    files = layer_files(store, second.layers[-1])
    assert files["app/d0/f0.txt"] == b"changed content\n"
    assert files["app/d1/new.txt"] == b"new\n"
    assert files["app/d1/f4.txt"] == FILES["src/d1/f4.txt"].encode()


def test_a_shared_file_outlives_the_layer_it_came_from(tmp_path, base_image, store_root):
    ctx = make_context(tmp_path)
    first = build(ctx, store_root, tags=["incremental:one"])
    (ctx / "src/d0/f0.txt").write_text("two\n")
    second = build(ctx, store_root, tags=["incremental:two"])
    store = Store(store_root)
    _, old = copy_layer(store, first)
    assert run_pybuild("rmi", "incremental:one", root=store_root).returncode == 0
    run_pybuild("prune", "--keep-storage", "0", root=store_root, check=True)
    assert not os.path.exists(old), "the first COPY layer is gone"
    proc = run_pybuild("run", "--rm", "incremental:two", "cat", "/app/d1/f4.txt", root=store_root,
                       check=True)
    assert proc.stdout.decode() == FILES["src/d1/f4.txt"]
    assert build(ctx, store_root).id == second.id


def test_a_different_owner_shares_nothing(tmp_path, base_image, store_root):
    ctx = make_context(tmp_path)
    first = build(ctx, store_root)
    (ctx / "Dockerfile").write_text(f"FROM {BASE}\nCOPY --chown=1000:1000 src/ /app/\n")
    second = build(ctx, store_root)
    store = Store(store_root)
    _, old = copy_layer(store, first)
    _, new = copy_layer(store, second)
    for rel in FILES:
        name = rel.removeprefix("src/")
        assert inode(f"{new}/app/{name}") != inode(f"{old}/app/{name}"), name
        assert os.stat(f"{new}/app/{name}").st_uid == 1000


def test_a_source_that_gained_an_xattr_is_copied_and_a_new_inode_alone_is_still_shared(
        tmp_path, base_image, store_root):
    # Enough files for the copy to run in parallel workers (fileops._PARALLEL_FROM).
    many = {f"src/d{i % 4}/g{i}.txt": f"g {i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n", **many})
    first = build(ctx, store_root)
    store = Store(store_root)
    _, old = copy_layer(store, first)

    # Same content, an xattr more: the table's stamp no longer matches, the source is asked.
    os.setxattr(ctx / "src/d0/g0.txt", "user.note", b"kept")
    # Same content, mode and mtime in a new inode (a fresh checkout): no xattr, still shared.
    fresh = ctx / "src/d1/g1.txt"
    st = os.stat(fresh)
    tmp = ctx / "src/d1/g1.new"
    tmp.write_bytes(fresh.read_bytes())
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, fresh)
    assert os.stat(fresh).st_ino != st.st_ino

    second = build(ctx, store_root)
    _, new = copy_layer(store, second)
    assert second.id != first.id
    assert inode(f"{new}/app/d0/g0.txt") != inode(f"{old}/app/d0/g0.txt")
    assert os.getxattr(f"{new}/app/d0/g0.txt", "user.note") == b"kept"
    for name in ("d1/g1.txt", "d2/g2.txt", "d3/g299.txt"):
        assert inode(f"{new}/app/{name}") == inode(f"{old}/app/{name}"), name
    members = {m.name: m for m in tarfile.open(
        fileobj=io.BytesIO(layer_tar(store, second.layers[-1]))).getmembers()}
    assert members["app/d0/g0.txt"].pax_headers.get("SCHILY.xattr.user.note") == "kept"
    assert "SCHILY.xattr.user.note" not in members["app/d1/g1.txt"].pax_headers

    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times, modes and xattrs kept)
    alone = build(plain, store_root, no_cache=True)
    assert entries(store, alone.layers[-1]) == entries(store, second.layers[-1])


# ---- the gzip members of a COPY layer's blob (builder/layer/segments.py) -----------------

EPOCH = dict(source_date_epoch=1_700_000_000)     # (so that /app's own time is the same too)


@pytest.fixture
def copies(monkeypatch) -> list[bool]:
    """Whether each member a commit looked up in its donor was copied from the donor's blob."""
    looked_up: list[bool] = []
    real = segments.DonorBlob.member

    def member(self, *args):
        found = real(self, *args)
        looked_up.append(found is not None)
        return found
    monkeypatch.setattr(segments.DonorBlob, "member", member)
    return looked_up


def big_context(tmp_path):
    """~8 MB of incompressible files: a COPY layer of several gzip members."""
    rnd = random.Random(7)
    files = {f"src/d{i % 4}/b{i:03d}.bin": rnd.randbytes(15_000 + 37 * i) for i in range(400)}
    return write_context(tmp_path / "big", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n",
                                            **files})


def index_of(store: Store, image) -> dict:
    chain, _ = copy_layer(store, image)
    with open(os.path.join(store.layers.path(chain), segments.INDEX), "rb") as f:
        return json.loads(f.read())


def test_a_rebuilt_copy_copies_the_members_it_shares_and_its_blob_is_a_cold_commits(
        tmp_path, base_image, store_root, copies):
    store = Store(store_root)
    ctx = big_context(tmp_path)
    first = build(ctx, store_root, **EPOCH)
    members = index_of(store, first)["members"]
    assert len(members) >= 4 and all(signature for signature, _, _ in members)
    assert sum(blob for _, _, blob in members) == first.layers[-1].size
    assert copies == []                                   # nothing to copy from yet

    (ctx / "src/d2/b202.bin").write_bytes(b"changed")
    second = build(ctx, store_root, tags=["segmented:2"], **EPOCH)
    assert copies.count(True) >= len(members) - 2        # all but the members around the change
    layer = second.layers[-1]
    # A series of gzip members is one gzip file to every reader: here independent ones.
    tar = subprocess.run(["gzip", "-dc", store.blobs.path(layer.digest)], capture_output=True,
                         check=True).stdout
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == layer.diff_id
    assert layer_files(store, layer)["app/d2/b202.bin"] == b"changed"
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{store_root}:segmented:2", str(bundle)],
                   capture_output=True, check=True)
    assert (bundle / "rootfs/app/d2/b202.bin").read_bytes() == b"changed"
    assert (bundle / "rootfs/app/d3/b399.bin").read_bytes() == (ctx / "src/d3/b399.bin").read_bytes()

    # The same files where there is no earlier layer: compressed from scratch, the same blob.
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times and modes kept)
    copies.clear()
    alone = build(plain, store_root, no_cache=True, **EPOCH)
    assert copies == []
    assert alone.layers[-1].diff_id == layer.diff_id
    assert alone.layers[-1].digest == layer.digest


def test_an_index_that_does_not_describe_its_blob_costs_a_compression_not_a_wrong_blob(
        tmp_path, base_image, store_root, copies):
    store = Store(store_root)
    ctx = big_context(tmp_path)
    first = build(ctx, store_root, **EPOCH)
    chain, _ = copy_layer(store, first)
    path = os.path.join(store.layers.path(chain), segments.INDEX)
    index = index_of(store, first)
    members = index["members"]
    # The first member's signature and tar size, put on the second member's bytes.
    (s1, t1, b1), (_, _, b2) = members[0], members[1]
    members[0], members[1] = [None, t1, b1], [s1, t1, b2]
    with open(path, "w") as f:
        json.dump(index, f)

    again = build(ctx, store_root, no_cache=True, **EPOCH)
    # Neither of the two is copied: the forged one's gzip trailer (CRC-32, length) is not that
    # of the bytes it would replace, and the second member's signature is gone.
    assert copies.count(False) == 2 and copies.count(True) == len(members) - 2
    assert again.layers[-1].digest == first.layers[-1].digest


def test_a_member_too_big_to_hold_back_is_compressed_and_the_blob_is_the_same(
        tmp_path, base_image, store_root, copies, monkeypatch):
    """A member is held back only up to segments.HOLD_MAX (a 100 MB file is not kept in
    memory on the chance that it is shared); past it, it is compressed as it comes."""
    ctx = big_context(tmp_path)
    first = build(ctx, store_root, **EPOCH)
    monkeypatch.setattr(segments, "HOLD_MAX", 64 << 10)
    again = build(ctx, store_root, no_cache=True, **EPOCH)
    assert copies == []
    assert again.layers[-1].digest == first.layers[-1].digest
