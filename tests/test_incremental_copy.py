"""Incremental COPY (builder/donor.py): a rebuilt COPY shares its unchanged files with the last one.

Stacked on the last full layer when nothing was removed, hard-linked from the
last layer otherwise. Either way the layer must be exactly the one a plain
copy gives (same diff_id as a build with no earlier layer to share from),
every mount must show exactly its files, and only files whose content,
mode, owner and mtime are unchanged may be shared.
"""

from __future__ import annotations

import hashlib
import io
import json
import marshal
import os
import random
import shutil
import subprocess
import tarfile
import types

import pytest
from pathlib import Path

import builder
from builder import donor
from builder.image import chain_ids
from builder.layer import basetar, segments, splice
from isal import isal_zlib
from builder.store import Store

from conftest import (BASE, busybox_context, layer_files, layer_tar, nested_dirs, run_pybuild,
                      write_context)

FILES = {f"src/d{i % 3}/f{i}.txt": f"file {i}\n" * (i + 1) for i in range(12)}


def copy_layer(store: Store, image, index: int = -1) -> tuple[str, str]:
    """(chain ID, diff dir) of the image's layer `index` (the COPY: its last, by default)."""
    chain = chain_ids(image.diff_ids)[index]
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


def shared(store: Store, chain: str, old: str, name: str) -> bool:
    """Does the layer `chain` hold old's copy of /app/`name` without copying it: the same
    inode in its diff dir, or none there, as it is stacked on old's layer?"""
    new = store.layers.diff_dir(chain)
    if not os.path.lexists(f"{new}/app/{name}"):
        base = store.layers.base(chain)
        return base is not None and store.layers.diff_dir(base) == old and \
            os.path.isfile(f"{old}/app/{name}")
    return inode(f"{new}/app/{name}") == inode(f"{old}/app/{name}")


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
    assert store.layers.base(chain) is None     # a file was removed: not stacked, linked

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


def store_with_base(tmp_path, driver, name: str) -> str:
    root = str(tmp_path / name)
    Store(root, driver=driver)
    builder.build(str(busybox_context(tmp_path / f"busybox-{name}")), tags=[BASE], root=root)
    return root


@pytest.fixture
def own_store(tmp_path, driver) -> str:
    """A store of the test's own, with the base image: in the shared one, another test's
    builds of the same COPY would be this test's donors, or its cache hits."""
    return store_with_base(tmp_path, driver, "store")


NESTED = {"src/d4/a/b/y.txt": "y\n", "src/d5/c/z.txt": "z\n"}


def stacked_context(tmp_path):
    """A COPY, and a RUN after it that sees the copied files through the mount."""
    return write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n"
                      "RUN cat /app/d0/f0.txt /app/d1/f4.txt /app/d2/f5.txt /app/d4/a/b/y.txt"
                      " > /seen\n",
        **FILES, **NESTED})


@pytest.mark.parametrize("compression", ["gzip", "uncompressed"])
def test_a_rebuilt_copy_is_stacked_on_its_base_and_shows_exactly_a_plain_copys_files(
        tmp_path, own_store, driver, compression):
    """(Uncompressed layers are not spliced from gzip members: their stacked commit walks
    the base's files, diff.write_tar's other way.)"""
    store = Store(own_store)
    ctx = stacked_context(tmp_path)
    # A time 1 ns before a whole second: tar headers have whole seconds, st_mtime rounds up.
    os.utime(ctx / "src/d2/f5.txt", ns=(0, 1_700_000_000_999_999_999))

    def build(ctx, root):
        return builder.build(str(ctx), root=root, compression=compression)
    first = build(ctx, own_store)
    base, _ = copy_layer(store, first, -2)
    table = donor.read_table(os.path.join(store.layers.path(base), donor.TABLE))
    assert table.base is None and sorted(table.dirs) == [
        "/app", "/app/d0", "/app/d1", "/app/d2", "/app/d4", "/app/d4/a", "/app/d4/a/b",
        "/app/d5", "/app/d5/c"]
    assert len(table) == len(FILES) + len(NESTED)

    (ctx / "src/d0/f0.txt").write_text("changed content\n")                 # content
    os.chmod(ctx / "src/d1/f1.txt", 0o600)                                  # mode
    (ctx / "src/d1/new.txt").write_text("new\n")                            # added
    (ctx / "src/d3").mkdir()
    (ctx / "src/d3/deep.txt").write_text("deeper\n")                        # in a new dir
    os.utime(ctx / "src/d5/c", ns=(0, 10**18))                             # a dir's time
    second = build(ctx, own_store)
    chain, new = copy_layer(store, second, -2)
    assert store.layers.base(chain) == base
    assert second.layers[-2].media_type == "application/vnd.oci.image.layer.v1.tar" + (
        "" if compression == "uncompressed" else "+gzip")
    # The new diff dir holds what changed and the directories it is in, nothing else: d2
    # and d4 with its subdirectories, unchanged in the base, are the base's.
    held = sorted(os.path.relpath(os.path.join(d, f), new) for d, dirs, files in os.walk(new)
                  for f in dirs + files)
    assert held == ["app", "app/d0", "app/d0/f0.txt", "app/d1", "app/d1/f1.txt",
                    "app/d1/new.txt", "app/d3", "app/d3/deep.txt", "app/d5", "app/d5/c"]
    assert os.stat(f"{new}/app/d5/c").st_mtime_ns == 10**18
    # The RUN after it read the unchanged files through the stacked mount.
    run_layer = layer_files(store, second.layers[-1])
    assert run_layer["seen"] == (b"changed content\n" + FILES["src/d1/f4.txt"].encode()
                                 + FILES["src/d2/f5.txt"].encode() + b"y\n")

    # A cold build of the same files (in a store of its own: here its layer would be the
    # next build's donor) gives the same layer.
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times and modes kept)
    elsewhere = store_with_base(tmp_path, driver, "elsewhere")
    alone = build(plain, elsewhere)
    assert entries(Store(elsewhere), alone.layers[-2]) == entries(store, second.layers[-2])
    proc = run_pybuild("run", "--rm", second.id, "sh", "-c",
                       "find /app | sort; stat -c %a /app/d1/f1.txt; cat /app/d2/f8.txt",
                       root=own_store, check=True)
    listing = sorted("app/" + rel.removeprefix("src/") for rel in {**FILES, **NESTED}) + [
        "app/d0", "app/d1", "app/d1/new.txt", "app/d2", "app/d3", "app/d3/deep.txt",
        "app/d4", "app/d4/a", "app/d4/a/b", "app/d5", "app/d5/c"]
    out = proc.stdout.decode().split("\n")
    assert out[:len(listing) + 1] == ["/app"] + sorted("/" + p for p in listing)
    assert out[len(listing) + 1:] == ["600", *FILES["src/d2/f8.txt"].split("\n")]

    # Built again after another change: stacked on the same base, never on the stacked layer.
    # The file the second build changed comes from its diff dir, hard-linked.
    (ctx / "src/d2/f2.txt").write_text("third\n")
    third = build(ctx, own_store)
    chain3, new3 = copy_layer(store, third, -2)
    assert store.layers.base(chain3) == base
    assert inode(f"{new3}/app/d0/f0.txt") == inode(f"{new}/app/d0/f0.txt")
    assert not os.path.lexists(f"{new3}/app/d1/f4.txt")
    assert layer_files(store, third.layers[-2])["app/d2/f2.txt"] == b"third\n"
    assert store.lower_links(third.diff_ids[:-1])[:2] == [store.layers.link(chain3),
                                                         store.layers.link(base)]


def test_a_stacked_layer_keeps_its_base_when_every_image_of_the_base_is_gone(
        tmp_path, own_store):
    store = Store(own_store)
    ctx = make_context(tmp_path)
    first = build(ctx, own_store, tags=["stacked:one"])
    base, base_diff = copy_layer(store, first)
    (ctx / "src/d0/f0.txt").write_text("two\n")
    second = build(ctx, own_store, tags=["stacked:two"])
    chain, _ = copy_layer(store, second)
    assert store.layers.base(chain) == base
    assert run_pybuild("rmi", "stacked:one", root=own_store).returncode == 0
    run_pybuild("prune", "--keep-storage", "0", root=own_store, check=True)
    assert os.path.isdir(base_diff), "the base went while a layer stacked on it is kept"
    proc = run_pybuild("run", "--rm", "stacked:two", "cat", "/app/d0/f0.txt", "/app/d1/f4.txt",
                       root=own_store, check=True)
    assert proc.stdout.decode() == "two\n" + FILES["src/d1/f4.txt"]
    assert run_pybuild("rmi", "stacked:two", root=own_store).returncode == 0
    run_pybuild("prune", root=own_store, check=True)
    assert not os.path.exists(base_diff)


def test_the_base_keeps_the_tar_a_stacked_commit_decompressed_and_the_next_one_reads_it(
        tmp_path, own_store, driver, monkeypatch):
    """layer/basetar.py: the first layer stacked on a gzip base writes the base's tar beside
    it, decompressed from its blob (a plain layer's blob is its tar); the next is spliced from that file (nothing decompressed,
    none of the base's files opened), and its layer is still a cold build's."""
    store = Store(own_store)
    ctx = make_context(tmp_path)
    first = build(ctx, own_store, compression="gzip")
    base, _ = copy_layer(store, first)
    base_dir = store.layers.path(base)
    assert os.path.exists(os.path.join(base_dir, splice.MAP))
    assert not os.path.exists(os.path.join(base_dir, basetar.TAR))
    (ctx / "src/d0/f0.txt").write_text("two\n")
    build(ctx, own_store, compression="gzip")
    with open(os.path.join(base_dir, basetar.TAR), "rb") as f:
        assert f.read() == layer_tar(store, first.layers[-1])
    assert os.listdir(store.tmp) == [] or all(n.endswith(".lock") for n in os.listdir(store.tmp))

    decompressed = []
    real_decompress = isal_zlib.decompress
    monkeypatch.setattr(isal_zlib, "decompress", lambda *a: (
        decompressed.append(1), real_decompress(*a))[1])
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: (
        opened.append(str(path)), real_open(path, *a, **k))[1])
    (ctx / "src/d1/f4.txt").write_text("three\n")
    third = build(ctx, own_store, compression="gzip")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(isal_zlib, "decompress", real_decompress)
    chain, _ = copy_layer(store, third)
    assert store.layers.base(chain) == base
    assert decompressed == []
    assert not [p for p in opened if p.endswith(".txt") and p.rpartition("/")[2] not in (
        "f0.txt", "f4.txt")]
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times and modes kept)
    elsewhere = store_with_base(tmp_path, driver, "elsewhere")
    alone = build(plain, elsewhere, compression="gzip")
    # (The same entries, bytes and headers alike, but /app's time: the COPY made it.)
    assert entries(Store(elsewhere), alone.layers[-1]) == entries(store, third.layers[-1])
    assert layer_files(store, third.layers[-1])["app/d1/f4.txt"] == b"three\n"


def test_a_full_copy_whose_digest_came_from_cached_runs_records_every_file(
        tmp_path, own_store, monkeypatch):
    """context.py's runs: a source digested mostly from the store's runs cache still gives a
    full copy every file's digest for its table, or the next build could share nothing."""
    from builder import context, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)          # keep the runs of fresh files
    store = Store(own_store)
    ctx = make_context(tmp_path)
    build(ctx, own_store, tags=["runs:one"])
    run_pybuild("rmi", "runs:one", root=own_store, check=True)
    run_pybuild("prune", root=own_store, check=True)       # no layer left to share with
    context._content_digests.clear()                       # (a new build process)
    (ctx / "src/d0/f0.txt").write_text("two\n")
    taken = []                          # runs taken whole from the cache, in this process
    real = context._not_learned
    monkeypatch.setattr(context, "_not_learned", lambda entries, table: (
        taken.append(entries), real(entries, table)))
    second = build(ctx, own_store)
    chain, _ = copy_layer(store, second)
    table = donor.read_table(store.layers.table(chain))
    assert sorted(table.targets) == sorted("/app/" + rel.removeprefix("src/") for rel in FILES)
    assert table.dirs is not None                 # a full layer the next one may stack on
    assert taken, "the digest was not made from cached runs: the test tests nothing"
    (ctx / "src/d1/f4.txt").write_text("three\n")
    third = build(ctx, own_store)
    assert store.layers.base(copy_layer(store, third)[0]) == chain


def test_a_full_copy_of_an_unchanged_source_records_every_file(tmp_path, own_store,
                                                             monkeypatch):
    """The same when the whole source's digest came from its stat fingerprint (statcache
    trees): the layer was pruned, the context did not change. (The miss's file table, made
    file by file from the stat cache, puts the digests in the memo.)"""
    from builder import context, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)
    store = Store(own_store)
    ctx = make_context(tmp_path)
    build(ctx, own_store, tags=["tree:one"])
    run_pybuild("rmi", "tree:one", root=own_store, check=True)
    run_pybuild("prune", root=own_store, check=True)
    context._content_digests.clear()                       # (a new build process)
    per_file = context.BuildContext._file_digests
    monkeypatch.setattr(context.BuildContext, "_file_digests", lambda self, entries: (
        pytest.fail("digested file by file") if entries else per_file(self, entries)))
    again = build(ctx, own_store)
    monkeypatch.setattr(context.BuildContext, "_file_digests", per_file)
    chain, _ = copy_layer(store, again)
    table = donor.read_table(store.layers.table(chain))
    assert sorted(table.targets) == sorted("/app/" + rel.removeprefix("src/") for rel in FILES)
    (ctx / "src/d1/f4.txt").write_text("three\n")
    assert store.layers.base(copy_layer(store, build(ctx, own_store))[0]) == chain


def test_the_base_tar_counts_as_its_layers_and_goes_with_it(tmp_path, own_store):
    """prune --keep-storage weighs a layer with its uncompressed tar, and pruning the layer
    removes it (and reports its bytes)."""
    from builder.cache import StepCache
    from builder.store import gc
    store = Store(own_store)
    ctx = make_context(tmp_path)
    base, _ = copy_layer(store, build(ctx, own_store, compression="gzip", tags=["packed:one"]))
    (ctx / "src/d0/f0.txt").write_text("two\n")
    build(ctx, own_store, compression="gzip", tags=["packed:two"])
    pack = os.path.join(store.layers.path(base), basetar.TAR)
    size = os.stat(pack).st_size
    assert size > sum(len(text) for text in FILES.values())
    assert gc._layer_bytes(store, base, 100) == 100 + size + store.layers.meta(base)[
        "content_size"]
    run_pybuild("rmi", "packed:one", "packed:two", root=own_store, check=True)
    pruned = gc.prune(store, StepCache(store))
    assert not os.path.exists(store.layers.path(base))
    assert pruned.collected.bytes >= size       # (the rest, blobs and files, is a few KB)


def test_a_donor_whose_layer_json_is_damaged_is_not_used_and_says_so_elsewhere(tmp_path,
                                                                               own_store):
    """A hand-damaged layer.json: the next build of the COPY shares nothing with that layer
    (and builds), and commands that read it say which layer is damaged, no traceback."""
    store = Store(own_store)
    ctx = make_context(tmp_path)
    first = build(ctx, own_store, tags=["damaged:one"])
    chain, _ = copy_layer(store, first)
    with open(os.path.join(store.layers.path(chain), "layer.json"), "w") as f:
        f.write('{"diff_id": "sha256:')
    (ctx / "src/d0/f0.txt").write_text("two\n")
    proc = run_pybuild("build", "-t", "damaged:two", str(ctx), root=own_store)
    assert proc.returncode == 0, proc.stderr.decode()
    second = Store(own_store).resolve("damaged:two")
    new, _ = copy_layer(store, second)
    assert store.layers.base(new) is None           # not stacked on the damaged layer
    assert layer_files(store, second.layers[-1])["app/d0/f0.txt"] == b"two\n"
    assert run_pybuild("images", root=own_store).returncode == 0   # (its size counts as 0)
    proc = run_pybuild("run", "--rm", "damaged:one", "true", root=own_store)
    err = proc.stderr.decode()
    assert proc.returncode == 6 and "Traceback" not in err
    assert f"layer {chain} is damaged" in err and "hint: remove the images" in err


def test_a_stacked_layer_whose_base_is_gone_is_a_clear_error(tmp_path, own_store):
    """A store damaged under a stacked layer (its base's dir removed by hand): running or
    building on the image says which layer is missing, without a traceback."""
    store = Store(own_store)
    ctx = make_context(tmp_path)
    first = build(ctx, own_store)
    base, base_diff = copy_layer(store, first)
    (ctx / "src/d0/f0.txt").write_text("two\n")
    build(ctx, own_store, tags=["stacked:damaged"])
    shutil.rmtree(os.path.dirname(base_diff))
    proc = run_pybuild("run", "--rm", "stacked:damaged", "true", root=own_store)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err
    assert f"layer {base}, which layer sha256:" in err and "is missing from the store" in err


def test_a_copy_with_a_symlink_is_never_a_base(tmp_path, own_store):
    """A base must be nothing but directories and files of its table (donor.py): a
    symlink the next build no longer copies would still show through the stack."""
    store = Store(own_store)
    ctx = make_context(tmp_path)
    os.symlink("f0.txt", ctx / "src/d0/link")
    first = build(ctx, own_store)
    base, base_diff = copy_layer(store, first)
    assert donor.read_table(os.path.join(store.layers.path(base), donor.TABLE)).dirs is None
    (ctx / "src/d0/f0.txt").write_text("two\n")
    second = build(ctx, own_store)
    chain, new = copy_layer(store, second)
    assert store.layers.base(chain) is None
    assert inode(f"{new}/app/d1/f4.txt") == inode(f"{base_diff}/app/d1/f4.txt")
    assert os.readlink(f"{new}/app/d0/link") == "f0.txt"


def test_a_copy_rerun_over_a_new_parent_shares_every_file_and_records_each(
        tmp_path, own_store):
    """A step before the COPY changed, its files did not (each build a process of its own):
    every file is shared, and the new layer's table has a row for each, for the next build."""
    store = Store(own_store)
    files = dict(FILES, **{"src/d0/link": None})
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nARG V\nRUN echo $V > /v\nCOPY src/ /app/\n",
        **{k: v for k, v in files.items() if v is not None}})
    os.symlink("f0.txt", ctx / "src/d0/link")        # (no base then: files are linked)
    for v in ("1", "2"):
        run_pybuild("build", "-t", f"parent:{v}", "--build-arg", f"V={v}", str(ctx),
                    root=own_store, check=True)
    first, second = (store.resolve(f"parent:{v}") for v in ("1", "2"))
    old_chain, old = copy_layer(store, first)
    chain, new = copy_layer(store, second)
    assert chain != old_chain and store.layers.base(chain) is None
    for rel in FILES:
        name = rel.removeprefix("src/")
        assert inode(f"{new}/app/{name}") == inode(f"{old}/app/{name}"), name
    table = donor.read_table(store.layers.table(chain))
    assert sorted(table.targets) == sorted("/app/" + r.removeprefix("src/") for r in FILES)


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
    chain, new = copy_layer(store, second)
    assert second.id != first.id
    assert inode(f"{new}/app/d0/g0.txt") != inode(f"{old}/app/d0/g0.txt")
    assert os.getxattr(f"{new}/app/d0/g0.txt", "user.note") == b"kept"
    for name in ("d1/g1.txt", "d2/g2.txt", "d3/g299.txt"):
        assert shared(store, chain, old, name), name
    members = {m.name: m for m in tarfile.open(
        fileobj=io.BytesIO(layer_tar(store, second.layers[-1]))).getmembers()}
    assert members["app/d0/g0.txt"].pax_headers.get("SCHILY.xattr.user.note") == "kept"
    assert "SCHILY.xattr.user.note" not in members["app/d1/g1.txt"].pax_headers

    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)          # (times, modes and xattrs kept)
    alone = build(plain, store_root, no_cache=True)
    assert entries(store, alone.layers[-1]) == entries(store, second.layers[-1])


# ---- the gzip members of a COPY layer's blob (builder/layer/segments.py) -----------------

# gzip layers (the default is plain tars, which have no members); one clamp, so that /app's
# own time is the same too.
EPOCH = dict(source_date_epoch=1_700_000_000, compression="gzip")


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


@pytest.fixture
def spliced(monkeypatch) -> list[str]:
    """How each member a commit took whole from its base (splice.py) came: "resumed" (copied
    in the kernel, with the hash states where it ends) or "added" (its tar bytes hashed)."""
    taken: list[str] = []
    resume, add_member = segments.SegmentedSink.resume, segments.SegmentedSink.add_member

    def resumed(self, fd, members, states):
        taken.extend(["resumed"] * len(members))
        return resume(self, fd, members, states)

    def added(self, *args):
        taken.append("added")
        return add_member(self, *args)
    monkeypatch.setattr(segments.SegmentedSink, "resume", resumed)
    monkeypatch.setattr(segments.SegmentedSink, "add_member", added)
    return taken


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
        tmp_path, base_image, store_root, copies, spliced):
    store = Store(store_root)
    ctx = big_context(tmp_path)
    first = build(ctx, store_root, **EPOCH)
    members = index_of(store, first)["members"]
    assert len(members) >= 4 and all(signature for signature, _, _ in members)
    assert sum(blob for _, _, blob in members) == first.layers[-1].size
    assert copies == []                                   # nothing to copy from yet

    (ctx / "src/d2/b202.bin").write_bytes(b"changed")
    second = build(ctx, store_root, tags=["segmented:2"], **EPOCH)
    # All but the members around the change: the layer is stacked, spliced from its base's
    # (the first time, every member decompressed: the base's tar is written on the way).
    assert spliced.count("added") >= len(members) - 2 and "resumed" not in spliced
    spliced.clear()
    (ctx / "src/d3/b399.bin").write_bytes(b"changed too")
    second = build(ctx, store_root, tags=["segmented:2"], **EPOCH)
    # Now the members before the first change (b202's) are taken with their hash states;
    # only the members holding b202 and b399 (and maybe one after each) are written anew.
    assert spliced.count("resumed") >= 2 and len(spliced) >= len(members) - 4
    assert spliced[:spliced.count("resumed")] == ["resumed"] * spliced.count("resumed")
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
    assert (bundle / "rootfs/app/d3/b399.bin").read_bytes() == b"changed too"
    assert (bundle / "rootfs/app/d3/b395.bin").read_bytes() == (ctx / "src/d3/b395.bin").read_bytes()

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


# ---- splicing (layer/splice.py): a stacked layer's tar and blob from its base's members

def _rewrite(ctx, rel, data):
    (ctx / rel).write_bytes(data)


CHANGES = {
    "the first file": lambda ctx: _rewrite(ctx, "src/d0/b000.bin", b"first"),
    "the last file": lambda ctx: _rewrite(ctx, "src/d3/b399.bin", b"last"),
    "a new last file": lambda ctx: _rewrite(ctx, "src/d3/zzz.bin", b"after everything"),
    "a new directory between two": lambda ctx: (
        os.makedirs(ctx / "src/d1x"), _rewrite(ctx, "src/d1x/new.bin", b"new")),
    "a mode": lambda ctx: os.chmod(ctx / "src/d2/b202.bin", 0o600),
    "a file grown by 2 MB": lambda ctx: _rewrite(ctx, "src/d1/b101.bin",
                                                 random.Random(3).randbytes(2 << 20)),
}


def cold_twin(tmp_path, ctx, store_root, name):
    """The same files built where no earlier layer of the COPY can be used."""
    plain = tmp_path / name
    shutil.copytree(ctx, plain)          # (times and modes kept)
    return build(plain, store_root, no_cache=True, **EPOCH).layers[-1]


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_spliced_layer_is_the_layer_a_cold_build_makes(tmp_path, change, spliced):
    """Each kind of change, spliced first with the base's members decompressed (its tar is
    written on the way), then again after one more change, from the base's tar and with
    the hash states of the members before it: the diff_id and blob of a cold build."""
    root = store_with_base(tmp_path, "overlay", "splice")
    store = Store(root)
    ctx = big_context(tmp_path)
    first = build(ctx, root, **EPOCH)
    base, _ = copy_layer(store, first)
    CHANGES[change](ctx)
    second = build(ctx, root, **EPOCH)
    assert store.layers.base(copy_layer(store, second)[0]) == base
    assert spliced and os.path.exists(os.path.join(store.layers.path(base), basetar.TAR))
    twin = cold_twin(tmp_path, ctx, root, "plain-1")
    assert (second.layers[-1].diff_id, second.layers[-1].digest) == (twin.diff_id, twin.digest)

    spliced.clear()
    _rewrite(ctx, "src/d3/b398.bin", b"one more")
    third = build(ctx, root, **EPOCH)
    assert store.layers.base(copy_layer(store, third)[0]) == base
    # (Changed at the start, the first member has a change: nothing to take up before it.)
    assert ("resumed" in spliced) == (change != "the first file")
    twin = cold_twin(tmp_path, ctx, root, "plain-2")
    assert (third.layers[-1].diff_id, third.layers[-1].digest) == (twin.diff_id, twin.digest)


def _damage_tar(layer_dir):
    with open(os.path.join(layer_dir, basetar.TAR), "r+b") as f:
        f.seek(3 << 20)                  # (in a member after the first)
        byte = f.read(1)
        f.seek(3 << 20)
        f.write(bytes([byte[0] ^ 1]))


def _rewrite_map(layer_dir, **changes):
    path = os.path.join(layer_dir, splice.MAP)
    with open(path, "rb") as f:
        data = marshal.loads(f.read())
    data.update(changes)
    with open(path, "wb") as f:
        f.write(marshal.dumps(data))


def test_hash_states_of_another_library_are_not_taken_up(tmp_path, spliced):
    """The SHA-256 states in a tar map are OpenSSL's context bytes: a map whose states were
    saved by another library (an OpenSSL upgrade) is spliced from the first member on,
    every member's tar bytes hashed, and gives the same layer."""
    root = store_with_base(tmp_path, "overlay", "splice")
    store = Store(root)
    ctx = big_context(tmp_path)
    base, _ = copy_layer(store, build(ctx, root, **EPOCH))
    _rewrite(ctx, "src/d0/b001.bin", b"one")
    build(ctx, root, **EPOCH)                           # (writes the base's tar)
    _rewrite_map(store.layers.path(base), library="OpenSSL 0.9.8 ctx 112")
    spliced.clear()
    _rewrite(ctx, "src/d3/b398.bin", b"two")
    again = build(ctx, root, **EPOCH)
    assert spliced and "resumed" not in spliced
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)
    twin = build(plain, root, no_cache=True, **EPOCH).layers[-1]
    assert (again.layers[-1].diff_id, again.layers[-1].digest) == (twin.diff_id, twin.digest)


@pytest.mark.parametrize("case", ["a damaged base tar", "no tar map", "another clamp",
                                  "a map that does not add up"])
def test_what_a_layer_cannot_be_spliced_from_is_walked_or_read_from_the_blob(tmp_path, case,
                                                                           spliced):
    """A base tar that is not the layer's (a damaged disk) is dropped and the blob read
    instead; a base without a tar map (made before there were maps), mapped with another
    SOURCE_DATE_EPOCH or with a map whose entries do not add up to its members is walked:
    the same layer as a cold build's either way."""
    root = store_with_base(tmp_path, "overlay", "splice")
    store = Store(root)
    ctx = big_context(tmp_path)
    base, _ = copy_layer(store, build(ctx, root, **EPOCH))
    base_dir = store.layers.path(base)
    _rewrite(ctx, "src/d0/b001.bin", b"one")
    build(ctx, root, **EPOCH)
    epoch = EPOCH
    if case == "a damaged base tar":
        _damage_tar(base_dir)
    elif case == "no tar map":
        os.unlink(os.path.join(base_dir, splice.MAP))
    elif case == "a map that does not add up":           # (one entry moved to the next member)
        with open(os.path.join(base_dir, splice.MAP), "rb") as f:
            counts = marshal.loads(f.read())["counts"]
        _rewrite_map(base_dir, counts=[counts[0] - 1, counts[1] + 1] + counts[2:])
    else:
        epoch = dict(source_date_epoch=EPOCH["source_date_epoch"] + 10)
    spliced.clear()
    _rewrite(ctx, "src/d2/b202.bin", b"two")
    again = build(ctx, root, **epoch)
    assert store.layers.base(copy_layer(store, again)[0]) == base
    assert bool(spliced) == (case == "a damaged base tar")
    if case == "a damaged base tar":
        assert not os.path.exists(os.path.join(base_dir, basetar.TAR))
    plain = tmp_path / "plain"
    shutil.copytree(ctx, plain)
    twin = build(plain, root, no_cache=True, **epoch).layers[-1]
    assert (again.layers[-1].diff_id, again.layers[-1].digest) == (twin.diff_id, twin.digest)


def test_a_big_file_of_the_base_written_entry_by_entry_is_cut_as_the_walk_cuts_it(tmp_path,
                                                                                   spliced):
    """A base's file over 1 MB in a member with a change goes to the compressor in the
    walk's pieces (header, 1 MB of content at a time, padding): ISA-L's output depends on
    them, and the blob must be a cold build's."""
    import zlib
    root = store_with_base(tmp_path, "overlay", "splice")
    store = Store(root)
    ctx = big_context(tmp_path)
    # A name after which the walk does not cut (see segments.py), so that the changed file
    # after it shares its member.
    big = next(n for n in (f"big{i}.bin" for i in range(64))
               if zlib.crc32(f"app/a/{n}".encode()) & segments._CUT_MASK)
    os.makedirs(ctx / "src/a")
    _rewrite(ctx, f"src/a/{big}", random.Random(5).randbytes((3 << 20) + 100))
    _rewrite(ctx, "src/a/small.txt", b"small")
    base, _ = copy_layer(store, build(ctx, root, **EPOCH))
    _rewrite(ctx, "src/a/small.txt", b"changed")
    again = build(ctx, root, **EPOCH)
    assert store.layers.base(copy_layer(store, again)[0]) == base and spliced
    twin = cold_twin(tmp_path, ctx, root, "plain")
    assert (again.layers[-1].diff_id, again.layers[-1].digest) == (twin.diff_id, twin.digest)


def test_copy_workers_copy_and_hash_a_file_whose_donor_copy_is_gone(tmp_path):
    # The workers copy from each source's stamp (fileops.prepare_finish), not its walked
    # stat: a file whose donor copy vanished before it could be linked (a prune meanwhile)
    # is copied instead, with its item's owner and mode and its source's time, and its row
    # keeps the donor's digest (the source matched it) and the source's stamp.
    from builder import fileops

    class Entry:
        def __init__(self, src, st):
            self.src, self.st = src, st
    ctx, upper, record = tmp_path / "ctx", tmp_path / "upper", tmp_path / "record"
    for d in (ctx, upper / "app", record):
        d.mkdir(parents=True)
    n = fileops._PARALLEL_FROM + 44                  # (enough for the parallel workers)
    for i in range(n):
        (ctx / f"f{i}").write_bytes(f"content {i}\n".encode())
        os.utime(ctx / f"f{i}", ns=(1_600_000_000_000_000_000 + i,) * 2)
    entries = {(0, f"f{i}"): Entry(f"f{i}", os.lstat(ctx / f"f{i}")) for i in range(n)}
    fd = os.open(ctx, os.O_RDONLY | os.O_DIRECTORY)
    try:
        source = types.SimpleNamespace(entries=list(entries.values()))
        op = fileops.CopyOp(groups=(fileops.SourceGroup(root=str(ctx), fd=fd, sources=(source,)),),
                            dest="/app", dest_is_dir=True, record=str(record))
        linked = hashlib.sha256(b"content 0\n").hexdigest()
        todo = [((f"/app/f{i}", 0, f"f{i}", 0o640, (1000, 1001)),
                 (str(tmp_path / "gone"), linked) if i == 0 else None) for i in range(n)]
        fileops._write_files(op, todo, fileops.prepare_finish(op), str(upper))
    finally:
        os.close(fd)
    for i in (0, 1, n - 1):
        st = os.lstat(upper / f"app/f{i}")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1000, 1001)
        assert st.st_mtime_ns == entries[(0, f"f{i}")].st.st_mtime_ns
        assert (upper / f"app/f{i}").read_bytes() == f"content {i}\n".encode()
    rows = donor.Table()
    for name in sorted(os.listdir(record)):
        rows.extend(donor.read_table(str(record / name)))
    # Nothing else was hashed (no digests known, hash_content off): only the copied file's row.
    assert rows.targets == ["/app/f0"] and rows.sources == ["f0"]
    assert rows.digest(0) == linked
    st = entries[(0, "f0")].st
    assert list(rows.numbers) == [st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns,
                                  0o640, 1000, 1001, 0]
    assert len(os.listdir(record)) == 1


def test_file_names_that_are_not_utf8_go_through_the_workers_and_are_shared_next_time(
        tmp_path, base_image, store_root):
    # A name is whatever bytes the file system holds: the workers' marshalled jobs and rows
    # carry it (as Python's surrogate escapes), the layer keeps it byte for byte, and the
    # next build finds its row by it.
    many = {f"src/d{i % 4}/g{i}.txt": f"g {i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n", **many})
    odd = [b"caf\xe9.txt", "na\u00efve-\u00fc.txt".encode()]    # Latin-1 (not UTF-8), UTF-8
    for name in odd:
        with open(os.fsencode(ctx / "src/d0") + b"/" + name, "wb") as f:
            f.write(b"odd " + name)
    first = build(ctx, store_root)
    store = Store(store_root)
    _, old = copy_layer(store, first)
    for name in odd:
        with open(os.fsencode(old) + b"/app/d0/" + name, "rb") as f:
            assert f.read() == b"odd " + name
    files = layer_files(store, first.layers[-1])
    assert {n: files.get("app/d0/" + os.fsdecode(n)) for n in odd} == {n: b"odd " + n for n in odd}
    table = donor.read_table(store.layers.table(chain_ids(first.diff_ids)[-1]))
    assert {"/app/d0/" + os.fsdecode(n) for n in odd} <= set(table.targets)

    (ctx / "src/d1/g1.txt").write_text("changed\n")
    second = build(ctx, store_root)
    chain, _ = copy_layer(store, second)
    for name in odd:
        assert shared(store, chain, old, "d0/" + os.fsdecode(name)), name


def test_a_stamp_holds_any_inode_number_and_any_time():
    # Overlayfs may hand out inode numbers with the top bit set (xino), and a file's time in
    # nanoseconds is negative before 1970 and past 64 bits after 2262 (ext4 goes to 2446):
    # the copy workers' stamps (fileops.prepare_finish) keep them all.
    from builder import fileops
    numbers = (2**64 - 2, 2**63 + 5, 7, -86_400_000_000_000, 15_000_000_000 * 10**9)
    st = types.SimpleNamespace(st_dev=numbers[0], st_ino=numbers[1], st_size=numbers[2],
                               st_mtime_ns=numbers[3], st_ctime_ns=numbers[4])
    entry = types.SimpleNamespace(src="old", st=st)
    op = fileops.CopyOp(groups=(fileops.SourceGroup(
        root="/", sources=(types.SimpleNamespace(entries=[entry]),)),), dest="/app",
        dest_is_dir=True)
    stamp, = fileops.prepare_finish(op).values()
    assert marshal.loads(stamp) == numbers


def test_files_from_before_1970_and_after_2262_are_copied_with_their_times(
        tmp_path, base_image, store_root):
    # Times in nanoseconds that a signed 64-bit number cannot hold (after 2262): the COPY
    # failed ("internal error in the sandbox: error('argument out of range')"). Such a file
    # gets no row (copied, not shared, next time); both keep their times in the layer.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY . /app/\n",
                                           "old.txt": "old\n", "late.txt": "late\n",
                                           "now.txt": "now\n"})
    old, late = -14_182_940, 15_000_000_000             # 1969-07-20, 2445-05-01 (ext4 holds it)
    os.utime(ctx / "old.txt", (old, old))
    os.utime(ctx / "late.txt", (late, late))
    if os.stat(ctx / "late.txt").st_mtime != late:
        pytest.skip("this file system does not hold a time past 2262")
    first = build(ctx, store_root)
    store = Store(store_root)
    members = {m.name: m for m in tarfile.open(
        fileobj=io.BytesIO(layer_tar(store, first.layers[-1]))).getmembers()}
    assert (members["app/old.txt"].mtime, members["app/late.txt"].mtime) == (old, late)
    chain, diff = copy_layer(store, first)
    assert (os.stat(f"{diff}/app/old.txt").st_mtime, os.stat(f"{diff}/app/late.txt").st_mtime) \
        == (old, late)
    table = donor.read_table(store.layers.table(chain))
    assert "/app/late.txt" not in table.targets and "/app/old.txt" in table.targets

    (ctx / "now.txt").write_text("now, again\n")
    second = build(ctx, store_root)
    files = layer_files(store, second.layers[-1])
    assert (files["app/old.txt"], files["app/late.txt"], files["app/now.txt"]) == \
        (b"old\n", b"late\n", b"now, again\n")


def test_a_row_holds_an_inode_number_with_the_top_bit_set(tmp_path):
    # The rows' numbers are signed 64-bit: a source whose inode number has the top bit set
    # (overlayfs with xino) failed its copy worker with OverflowError. Its row is kept
    # wrapped around, the way the donor's stamp check (Donor.unchanged) wraps the source's.
    table = donor.Table()
    table.add_file("/app/x", "ab" * 32, (2**63 + 5, 10, 3, 20, 0o644, 0, 0, 0), "x")
    table.add_file("/app/y", "cd" * 32, (42, 11, 4, 21, 0o600, 1, 2, 0), "y")
    (tmp_path / "table").write_bytes(table.encode())
    back = donor.read_table(str(tmp_path / "table"))
    assert back.targets == ["/app/x", "/app/y"] and back.digest(1) == "cd" * 32
    assert list(back.numbers) == [donor.signed64(2**63 + 5), 10, 3, 20, 0o644, 0, 0, 0,
                                  42, 11, 4, 21, 0o600, 1, 2, 0]
    assert donor.signed64(2**63 + 5) == 5 - 2**63 and donor.signed64(42) == 42


def _deep_tree(root, length: int) -> str:
    """Make root/deep/dddd.../f, whose path from `root` is `length` characters; that path."""
    rel = "deep/" + "/".join(["d" * 100] * 39)
    rel += "/" + "e" * (length - len(rel) - len("//f"))
    rel += "/f"
    fd = nested_dirs(root, rel.split("/")[:-1])
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
        f.write("deep\n")
    os.close(fd)
    assert len(rel) == length
    return rel


def test_a_copy_that_fails_names_the_file_by_its_path_in_the_image(
        tmp_path, base_image, store_root):
    # A path the context and the image can hold but the step's upper dir cannot (the dir's
    # own path comes first, past PATH_MAX): the error named the file in the upper dir, all
    # 4 KB of it. It names it in the image, with its middle left out.
    import tempfile
    ctx = tempfile.mkdtemp(prefix="c", dir="/tmp")          # (a short path to the context)
    try:
        write_context(Path(ctx), {"Dockerfile": f"FROM {BASE}\nCOPY . /app/\n"})
        rel = _deep_tree(ctx, 4094 - len(ctx) - 1)
        assert len(store_root) + len("/tmp/build-0/step-2/upper/app/") + len(rel) > 4096
        with pytest.raises(builder.BuildError) as err:
            build(ctx, store_root)
    finally:
        shutil.rmtree(ctx)
    message = str(err.value)
    assert "COPY: File name too long: /app/deep/dddd" in message, message[:300]
    assert "characters)..." in message and "upper" not in message and len(message) < 600


def test_a_context_path_past_path_max_is_a_clear_error(tmp_path, base_image, store_root):
    # The context's walk opened each directory by its path from /: past PATH_MAX that
    # failed with an OSError and a 4 KB path (a traceback from the library). It is a
    # BuildError naming the step, the path in the context (shortened) and what to do.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY . /app/\n"})
    _deep_tree(ctx, 4090)
    with pytest.raises(builder.BuildError) as err:
        build(ctx, store_root)
    message = str(err.value)
    assert "[2/2] COPY: COPY source '.': cannot read deep/dddd" in message, message[:300]
    assert "characters)..." in message and "File name too long" in message
    assert len(message) < 600 and "shorter directory" in err.value.hint
