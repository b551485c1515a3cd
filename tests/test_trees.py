"""trees.remove_tree: rm -rf for the store, at any depth, never through a symlink."""

from __future__ import annotations

import os
import sys
import traceback

import pytest

from builder.trees import remove_tree, walk


def test_removes_a_tree_deeper_than_the_recursion_limit(tmp_path):
    depth = 300
    deep = tmp_path / "t" / "/".join(["d"] * depth)
    deep.mkdir(parents=True)
    (deep / "f").write_text("x")
    open_before = len(os.listdir("/proc/self/fd"))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + depth // 2)   # shutil.rmtree fails here
    try:
        remove_tree(str(tmp_path / "t"))
    finally:
        sys.setrecursionlimit(limit)
    assert not (tmp_path / "t").exists()
    assert len(os.listdir("/proc/self/fd")) == open_before


def test_symlinks_are_removed_not_followed_and_odd_files_go_too(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    t = tmp_path / "t"
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "to-dir").symlink_to(outside)
    (t / "to-file").symlink_to(outside / "keep")
    os.mkfifo(t / "fifo")
    os.mknod(t / "a" / "whiteout", 0o020000, os.makedev(0, 0))
    for i in range(50):
        (t / "a" / "b" / f"f{i}").write_text(str(i))
    remove_tree(str(t))
    assert not t.exists()
    assert (outside / "keep").read_text() == "keep"
    (tmp_path / "link").symlink_to(outside)
    remove_tree(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link") and (outside / "keep").exists()


def test_a_tree_under_a_linked_parent_goes_and_the_link_stays(tmp_path):
    (tmp_path / "real" / "t" / "d").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    remove_tree(str(tmp_path / "linked" / "t"))
    assert not (tmp_path / "real" / "t").exists() and (tmp_path / "linked").is_symlink()


def test_closed_directories_are_opened_up_and_missing_paths_are_fine(tmp_path):
    work = tmp_path / "snap" / "work" / "work"
    work.mkdir(parents=True)
    (work / "x").write_text("x")
    os.chmod(work, 0)                        # what overlayfs leaves
    os.chmod(work.parent, 0o500)
    remove_tree(str(tmp_path / "snap"))
    assert not (tmp_path / "snap").exists()
    remove_tree(str(tmp_path / "never-was"))
    (tmp_path / "file").write_text("f")
    remove_tree(str(tmp_path / "file"))
    assert not (tmp_path / "file").exists()


def test_errors_raise_unless_ignored(tmp_path):
    (tmp_path / "file").write_text("f")
    with pytest.raises(NotADirectoryError):
        remove_tree(str(tmp_path / "file" / "x"))
    remove_tree(str(tmp_path / "file" / "x"), ignore_errors=True)


def test_walk_is_os_walk_without_recursion(tmp_path):
    t = tmp_path / "t"
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "f").write_text("f")
    (t / "c").mkdir()
    (t / "c" / "g").write_text("g")
    (t / "to-a").symlink_to(t / "a")               # listed among dirs, not entered
    (t / "dangling").symlink_to(t / "nowhere")
    for topdown in (True, False):
        assert list(walk(str(t), topdown)) == list(os.walk(str(t), topdown))
    pruned = []
    for dirpath, dirnames, _ in walk(str(t)):
        dirnames[:] = [d for d in dirnames if d != "a"]
        pruned.append(dirpath)
    assert sorted(pruned) == sorted([str(t), str(t / "c")])
    depth = 300
    (t / "/".join(["d"] * depth)).mkdir(parents=True)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + depth // 2)      # os.walk fails here
    try:
        assert sum(1 for _ in walk(str(t))) == 4 + depth
        assert sum(1 for _ in walk(str(t), topdown=False)) == 4 + depth
    finally:
        sys.setrecursionlimit(limit)
