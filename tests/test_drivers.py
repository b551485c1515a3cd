"""Storage drivers: the fuse and vfs drivers give what the kernel overlay gives, step by step.

Each workload is one RUN, built on all three drivers in stores of their own
(with SOURCE_DATE_EPOCH, so that times cannot differ). What the RUN printed
(its view of the files) and the layer it produced must be the same on
every driver; each case also says what the overlay's layer must contain.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

import builder

from conftest import busybox_context, layer_members, run_pybuild, write_context

EPOCH = 1_600_000_000
DRIVER_NAMES = ("overlay", "fuse", "vfs")

SETX = r"""
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {   /* setx PATH NAME VALUE: set one xattr, exit 1 on error */
    return argc == 4 && setxattr(argv[1], argv[2], argv[3], strlen(argv[3]), 0) == 0 ? 0 : 1;
}
"""

# name -> (user, RUN script, names the overlay's layer must hold)
CASES = {
    "create": ("", "echo new > /new && mkdir -p /a/b/c && echo deep > /a/b/c/f && ls -la /a/b/c",
               {"new", "a/b/c/f"}),
    "append-to-lower": ("", "echo more >> /etc/group && tail -n1 /etc/group", {"etc/group"}),
    "rename-file": ("", "mv /etc/motd /etc/motd.old && echo x > /tmp/f && mv /tmp/f /tmp/g && "
                        "ls /etc/motd* /tmp", {"etc/.wh.motd", "etc/motd.old", "tmp/g"}),
    "rename-lower-dir": ("", "mv /home/app /home/app2 && ls -la /home",
                         {"home/.wh.app", "home/app2"}),
    "rename-upper-dir": ("", "mkdir -p /u/d && echo 1 > /u/d/f && mv /u/d /u/e && cat /u/e/f && "
                             "ls /u", {"u/e/f"}),
    "rename-over": ("", "echo a > /x && mv /x /etc/group && cat /etc/group", {"etc/group"}),
    "hard-links": ("", "ln /etc/group /g2 && echo z > /n1 && ln /n1 /n2 && echo w >> /n2 && "
                       "cat /n1 && stat -c '%h %n' /n1 /n2 /g2", {"g2", "etc/group", "n1", "n2"}),
    "unlink": ("", "rm /etc/motd /bin/ls && rm -rf /home/app && ls /home /etc | head -n 3",
               {"etc/.wh.motd", "bin/.wh.ls", "home/.wh.app"}),
    "chmod-chown": ("", "chmod 600 /etc/passwd && chown 5:6 /etc/group && chown -h 7:8 /bin/sh && "
                        "chmod g+s /home && ls -ln /etc/passwd /etc/group /bin/sh && ls -ldn /home",
                    {"etc/passwd", "etc/group", "bin/sh", "home"}),
    "xattrs": ("", "setx /etc/passwd user.tag hello && setx /home user.note dir && "
                   "echo x > /new && setx /new user.new 1", {"etc/passwd", "home", "new"}),
    "truncate": ("", "truncate -s 3 /etc/group && truncate -s 100000 /sparse && "
                     "wc -c /etc/group /sparse", {"etc/group", "sparse"}),
    "opaque-replace": ("", "rm -rf /home && mkdir /home && echo fresh > /home/f && ls -la /home",
                       {"home", "home/.wh..wh..opq", "home/f"}),
    "setgid-dir": ("", "mkdir /shared && chown 0:50 /shared && chmod 2775 /shared && "
                       "touch /shared/f && mkdir /shared/d && stat -c '%g %A %n' /shared/f /shared/d",
                   {"shared/f", "shared/d"}),
    "special-files": ("", "mkfifo /fifo && ln -s /nowhere /dangling && mknod /null2 c 1 3 && "
                          "ls -l /fifo /dangling /null2", {"fifo", "dangling", "null2"}),
    "as-a-user": ("app", "touch /home/app/mine && mkdir /home/app/d && ls -ln /home/app && "
                         "! touch /etc/nope 2>/dev/null", {"home/app/mine", "home/app/d"}),
    "sed-in-place": ("", "sed -i s/root/ROOT/ /etc/passwd && head -n1 /etc/passwd",
                     {"etc/passwd"}),
    "delete-and-recreate": ("", "rm /etc/group && echo again > /etc/group && cat /etc/group",
                            {"etc/group"}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """driver -> store root holding `base:1` (busybox and the setx helper), built alike."""
    work = tmp_path_factory.mktemp("driver-bases")
    src = work / "setx.c"
    src.write_text(SETX)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(work / "setx"), str(src)], check=True)
    out = {}
    for driver in DRIVER_NAMES:
        ctx = busybox_context(work / f"ctx-{driver}")
        shutil.copy2(work / "setx", ctx / "setx")
        (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text() +
                                        "COPY setx /usr/bin/setx\n")
        root = str(work / f"store-{driver}")
        builder.build(str(ctx), tags=["base:1"], root=root, storage_driver=driver,
                      source_date_epoch=EPOCH)
        out[driver] = root
    return out


def run_case(bases, tmp_path, name):
    user, script, _ = CASES[name]
    results = {}
    for driver, root in bases.items():
        ctx = write_context(tmp_path / f"{name}-{driver}", {
            "Dockerfile": "FROM base:1\n" + (f"USER {user}\n" if user else "") + f"RUN {script}\n"})
        events = []
        image = builder.build(str(ctx), root=root, source_date_epoch=EPOCH, pull="never",
                              storage_driver=driver, on_event=events.append)
        # Times in `ls -l` are the base layers' own (each store built its base at its time).
        output = [re.sub(r"[A-Z][a-z]{2} +\d+ +\d\d:\d\d", "DATE", e.line)
                  for e in events if isinstance(e, builder.StepOutput)]
        results[driver] = (image, output, builder.Store(root, driver=driver))
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuse_and_vfs_do_what_overlay_does(bases, tmp_path, name):
    results = run_case(bases, tmp_path, name)
    image, output, store = results["overlay"]
    members = {m.name for m in layer_members(store, image.layers[-1])}
    assert CASES[name][2] <= members, sorted(members)
    # What the command saw: the same through FUSE as through the kernel overlay (the vfs
    # driver's copies differ in directory link counts, which overlay reports as 1).
    assert results["fuse"][1] == output, "fuse saw other files than overlay did"
    for driver in ("fuse", "vfs"):
        other = results[driver][0]
        assert other.diff_ids[-1] == image.diff_ids[-1], \
            f"{driver}'s layer differs from overlay's"
        assert other.id == image.id


def test_store_keeps_its_driver(tmp_path):
    root = tmp_path / "store"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM scratch\nLABEL a=b\n"})
    run_pybuild("--storage-driver", "vfs", "build", ctx, root=root, check=True)
    assert (root / "driver").read_text() == "vfs\n"
    # Later commands use the store's driver without being told; a different one is refused.
    run_pybuild("build", ctx, root=root, check=True, env={"PYBUILD_STORAGE_DRIVER": ""})
    p = run_pybuild("--storage-driver", "overlay", "build", ctx, root=root)
    assert p.returncode == 6
    assert b"uses the vfs storage driver, not overlay" in p.stderr
    bad = run_pybuild("--storage-driver", "zfs", "images", root=tmp_path / "other")
    assert bad.returncode == 2


def test_probe_picks_overlay_here(tmp_path):
    from builder.snapshot import probe
    os.makedirs(tmp_path / "tmp")
    assert probe(str(tmp_path)) == "overlay"


def test_the_fuse_servers_loop_answers_without_suspending_and_refuses_to_hang():
    """loop.py stands in for trio under pyfuse3: waiting for a readable fd returns, and a
    coroutine that suspends on anything else is an error, not a hang."""
    import types
    from builder.snapshot.fuse import loop

    r, w = os.pipe()
    os.write(w, b"x")
    seen = []

    async def session():
        async with loop.Lock():
            await loop.lowlevel.wait_readable(r)
        seen.append(os.read(r, 1))

    async def main():
        async with loop.open_nursery() as nursery:
            nursery.start_soon(session, name="one")
    loop.run(main)
    assert seen == [b"x"]

    @types.coroutine
    def suspend():
        yield "something only a real event loop could resume"

    async def suspends():
        await suspend()
    with pytest.raises(RuntimeError, match="suspended"):
        loop.run(suspends)
    os.close(r)
    os.close(w)


def test_vfs_changes_at_any_depth(tmp_path):
    """The vfs driver works out a step's changes without recursion: a file changed, a tree
    removed and a tree made, each 300 levels down, with the recursion limit lowered below
    that depth."""
    import stat as st_mod
    import sys
    import traceback
    from builder.snapshot import vfs
    from builder.trees import remove_tree
    depth = 300
    base, merged, upper = tmp_path / "base", tmp_path / "merged", tmp_path / "upper"
    (base / "/".join(["a"] * depth)).mkdir(parents=True)
    (base / "/".join(["a"] * depth) / "leaf").write_text("old\n")
    (base / "gone" / "/".join(["g"] * depth)).mkdir(parents=True)
    upper.mkdir()
    vfs.clone_tree(str(base), str(merged), keep_links=False)
    dir_inodes = vfs._mark_dirs(str(merged))
    (merged / "/".join(["a"] * depth) / "leaf").write_text("new content\n")
    remove_tree(str(merged / "gone"))
    (merged / "new" / "/".join(["n"] * depth)).mkdir(parents=True)
    (merged / "new" / "/".join(["n"] * depth) / "f").write_text("made\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + depth // 2)
    try:
        vfs.changes(str(base), str(merged), str(upper), set(), dir_inodes)
    finally:
        sys.setrecursionlimit(limit)
    assert (upper / "/".join(["a"] * depth) / "leaf").read_text() == "new content\n"
    gone = os.lstat(upper / "gone")
    assert st_mod.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert (upper / "new" / "/".join(["n"] * depth) / "f").read_text() == "made\n"
