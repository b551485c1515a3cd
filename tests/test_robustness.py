"""Failures, Ctrl-C, kill -9 and concurrent builds: nothing leaks, the store stays readable."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (BASE, fork_servers_of, forked_by_fork_server, nested_dirs, our_mounts,
                      processes_with, run_pybuild, write_context)


def wait_until(cond, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    return cond()


def tmp_entries(store_root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(store_root, "tmp")))


def store_is_consistent(store) -> None:
    assert all(store.blobs.verify(d) for d in store.blobs.list()), "a blob does not match its digest"
    for img in store.images():
        store.lower_links(img.diff_ids)            # every layer of every image is there
        for layer in img.layers:
            assert store.blobs.has(layer.digest)


_started: list[subprocess.Popen] = []


def start_build(ctx, root: str) -> subprocess.Popen:
    env = dict(os.environ, PYBUILD_ROOT=root)
    proc = subprocess.Popen([sys.executable, "-m", "builder", "-t", "long", str(ctx)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _started.append(proc)
    return proc


@pytest.fixture(autouse=True)
def _no_build_outlives_its_test():
    """A test that fails before it stops its build must not leave it running (the long RUN
    would sleep for hours): kill -9 takes pybuild and its sandboxes down."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def wait_for_line(proc: subprocess.Popen, needle: bytes, timeout: float = 30) -> None:
    found = threading.Event()
    seen = []

    def reader():
        for line in proc.stderr:
            seen.append(line)
            if needle in line:
                found.set()
    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), f"never saw {needle!r}: {b''.join(seen)!r}"


@pytest.fixture(params=["forked-by-pybuild", "forked-by-the-fork-server"])
def long_ctx(request, tmp_path, base_image, driver):
    """A build whose RUN runs until it is stopped; and whether the fork server started it.

    With two RUN steps before it (new ones, the second long enough for the fork server to
    be ready), the long step's sandbox is forked by the server (forkserver.py), on the
    overlay driver; the other drivers' always by pybuild."""
    # A unique sleep so that we can find the process (and prove it is gone).
    marker = f"{time.time_ns() % 10_000_000 / 1000:.3f}"
    by_server = request.param == "forked-by-the-fork-server"
    before = f"RUN echo {marker}\nRUN sleep 0.4\n" if by_server else ""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
{before}RUN echo step-started && touch /in-upper && sleep {marker}
"""})
    return ctx, f"sleep {marker}", by_server and driver == "overlay"


def test_step_dirs_keep_only_small_overlay_dirs_until_the_build_ends(tmp_path):
    # Freeing inodes after every step slowed later steps on journal-less ext4 (executor.py):
    # a step that worked leaves its snapshot's empty dirs for the build's end, nothing more.
    from builder.executor import _clear_step_dir
    from builder.snapshot.overlay import OverlaySnapshot
    from builder.snapshot.vfs import VfsSnapshot
    for kept in (OverlaySnapshot.small_dirs, VfsSnapshot.small_dirs, frozenset()):
        step = tmp_path / f"step-{len(kept)}"
        for d in ("upper", "work/work/incompat/volatile", "merged", "mount-0/copy", "copied"):
            (step / d).mkdir(parents=True)
        (step / "mount-0" / "copy" / "big").write_bytes(b"x" * 4096)
        _clear_step_dir(str(step), kept)
        left = sorted(os.listdir(step)) if step.exists() else None
        assert left == (sorted({"upper", "work", "merged"}) if kept else None), (kept, left)
    assert VfsSnapshot.small_dirs == frozenset()     # its merged dir is a whole root's copy


def test_a_build_leaves_its_steps_small_dirs_until_it_ends(tmp_path, base_image, store_root,
                                                          driver):
    """What the executor is told to keep is the driver's set: a dataclass field of the same
    name once gave every snapshot an empty one, and each step removed its dirs at once."""
    import builder
    from builder import progress
    marker = time.time_ns()
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN echo {marker} > /a
RUN echo {marker} > /b
"""})
    left = {}

    def on_event(ev):
        if isinstance(ev, progress.StepDone) and ev.step == 2:
            builds = [d for d in os.listdir(os.path.join(store_root, "tmp"))
                      if d.startswith("build-") and not d.endswith(".lock")]
            steps = [os.path.join(store_root, "tmp", b, "step-2") for b in builds]
            left["dirs"] = [sorted(os.listdir(s)) for s in steps if os.path.isdir(s)]
    builder.build(str(ctx), root=store_root, on_event=on_event)
    expected = [] if driver == "vfs" else [["merged", "work"]]
    assert left["dirs"] == expected


def test_failing_run_leaves_nothing_behind(tmp_path, base_image, store_root, store, pybuild):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN touch /x && false\n"})
    before = tmp_entries(store_root)
    p = pybuild("-t", "fails", ctx)
    assert p.returncode == 4
    assert tmp_entries(store_root) == before
    assert our_mounts() == []
    store_is_consistent(store)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_run_cleans_up(long_ctx, store_root, store, sig):
    ctx, marker, by_server = long_ctx
    before = tmp_entries(store_root)
    proc = start_build(ctx, store_root)
    wait_for_line(proc, b"step-started")
    running = wait_until(lambda: processes_with(marker))
    assert running, "the RUN is running"
    assert forked_by_fork_server(running[0]) == by_server
    assert our_mounts() == [], "the step's overlay is not in the host's mount table"
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 130
    assert wait_until(lambda: not processes_with(marker)), "the RUN's processes outlived the build"
    assert wait_until(lambda: not fork_servers_of(proc.pid)), "the fork server outlived the build"
    assert tmp_entries(store_root) == before
    assert our_mounts() == []
    store_is_consistent(store)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_a_cold_copy_s_forked_commit_cleans_up(tmp_path, base_image, store_root,
                                                                 store, driver, sig):
    """A cold COPY commits its layer in a forked child (forked.py) while pybuild makes the
    step's key; a signal to pybuild then (only to it, not its group) stops the child too,
    before it installs the layer: exit 130, no process left, the blob's temp file and the
    step's dirs gone."""
    if driver != "overlay":
        pytest.skip("fuse and vfs commit in the build process (the overlay driver forks)")
    marker = f"{time.time_ns() % 10_000_000}"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY big /big-{marker}\n"})
    with open(ctx / "big", "wb") as f:
        chunk = bytes(range(256)) * 4096            # 1 MB
        for _ in range(1024):
            f.write(chunk)
    before = tmp_entries(store_root)
    tmp, layers = os.path.join(store_root, "tmp"), os.path.join(store_root, "layers")
    layers_before = set(os.listdir(layers))

    def committing() -> bool:
        for name in os.listdir(tmp):
            try:
                if name.startswith("blob-") and os.path.getsize(os.path.join(tmp, name)) > 0:
                    return True
            except FileNotFoundError:
                continue
        return False
    proc = start_build(ctx, store_root)
    assert wait_until(committing, timeout=60), "the commit never started"
    proc.send_signal(sig)
    assert proc.wait(timeout=20) == 130, proc.stderr.read().decode()
    assert "Traceback" not in proc.stderr.read().decode()
    assert wait_until(lambda: not processes_with(str(ctx))), "the committing child outlived pybuild"
    assert tmp_entries(store_root) == before
    assert set(os.listdir(layers)) == layers_before, "the stopped commit installed its layer"
    assert our_mounts() == []
    store_is_consistent(store)


def test_kill_9_during_run_leaves_no_process_or_mount_and_next_build_works(long_ctx, store_root,
                                                                           store, tmp_path):
    ctx, marker, by_server = long_ctx
    before = tmp_entries(store_root)
    proc = start_build(ctx, store_root)
    wait_for_line(proc, b"step-started")
    running = wait_until(lambda: processes_with(marker))
    assert running, "the RUN is running"
    assert forked_by_fork_server(running[0]) == by_server
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not processes_with(marker)), "the sandbox must die with pybuild"
    assert wait_until(lambda: not fork_servers_of(proc.pid)), "the fork server outlived pybuild"
    # Every process forked by pybuild (sandbox, FUSE server) has its command line.
    assert wait_until(lambda: not processes_with(str(ctx))), "a helper outlived pybuild"
    assert our_mounts() == []
    # The dead build's temp dir is reclaimed by the next pybuild that opens the store.
    run_pybuild("images", root=store_root, check=True)
    assert tmp_entries(store_root) == before
    store_is_consistent(store)
    ok = write_context(tmp_path / "ok", {"Dockerfile": f"FROM {BASE}\nRUN echo after > /after\n"})
    run_pybuild("-t", "after-kill", ok, root=store_root, check=True)


def test_kill_9_ends_a_run_that_took_another_user(tmp_path, base_image, store_root):
    # The RUN's command is PID 1 of its namespace; taking the image's user cleared its
    # parent-death signal (prctl(2)), which the sandbox sets again: nothing else ends it.
    marker = f"{time.time_ns() % 10_000_000 / 1000 + 1:.3f}"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
USER app
RUN echo step-started && exec sleep {marker}
"""})
    proc = start_build(ctx, store_root)
    wait_for_line(proc, b"step-started")
    assert wait_until(lambda: processes_with(f"sleep {marker}")), "the RUN is running"
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not processes_with(f"sleep {marker}")), \
        "the command must die with pybuild"
    assert our_mounts() == []


def test_concurrent_builds_share_one_store(tmp_path, base_image, store_root, store):
    procs = []
    for i in range(4):
        ctx = write_context(tmp_path / f"c{i}", {
            "Dockerfile": f"FROM {BASE}\nCOPY f /f\nRUN cat /f > /g && echo {i} >> /g\n",
            "f": f"content {i % 2}\n"})
        env = dict(os.environ, PYBUILD_ROOT=store_root)
        procs.append(subprocess.Popen([sys.executable, "-m", "builder", "-q", "-t", f"conc:{i}",
                                       str(ctx)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      env=env))
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        ids.append(out.decode().strip())
    assert len(set(ids)) == 4
    for i, iid in enumerate(ids):
        assert store.resolve(f"conc:{i}").id == iid
    store_is_consistent(store)


@pytest.mark.parametrize("big, where, compression", [
    (16 << 20, "copy", "gzip"), (5_000_000, "commit", "gzip"),
    (5_000_000, "commit", "uncompressed")])
def test_a_full_disk_is_one_clear_error_naming_the_step_and_the_store_survives(
        tmp_path, base_image, store_root, big, where, compression):
    """A store on a 12 MB tmpfs (in a private mount namespace) and a COPY of one file: too
    big for it (the copy meets the full disk), or fitting while its layer's blob does not
    (the commit does; its blob written by a gzip or a plain sink's thread). Either way the
    error names the step and gives the hint (exit 4), tmp/ is left empty, and the store
    builds again once the tmpfs is remounted bigger."""
    base_tar = tmp_path / "base.tar"
    run_pybuild("save", BASE, "-o", base_tar, root=store_root, check=True)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY big /big\n",
                                           "big": os.urandom(big)})
    small = tmp_path / "small"
    small.mkdir()
    py = f"{sys.executable} -m builder --root {small}"
    script = f"""
mount -t tmpfs -o size=12m tmpfs {small}
{py} load -i {base_tar} >/dev/null || exit 90
{py} -t big --compression {compression} {ctx} 2>{tmp_path}/err; echo $? > {tmp_path}/rc
ls {small}/tmp > {tmp_path}/tmp-left
mount -o remount,size=64m {small}
{py} -q -t big --compression {compression} {ctx} > {tmp_path}/again || exit 91
{py} images > {tmp_path}/images || exit 92
"""
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "4", err
    assert f"{ctx}/Dockerfile:2 [2/2] COPY: No space left on device" in err, err
    assert "hint: the disk holding the store is full" in err and "Traceback" not in err
    assert (tmp_path / "tmp-left").read_text() == ""
    assert (tmp_path / "again").read_text().startswith("sha256:")
    images = (tmp_path / "images").read_text()
    assert "busybox" in images and "big" in images


def test_a_store_that_refuses_a_step_s_layer_is_one_error_naming_the_step(tmp_path, base_image,
                                                                          store_root):
    """Not only a full disk: any refusal while a step's layer goes into the store (here
    `layers/` made immutable, so the layer's rename fails with EPERM even for root) is a
    BuildError of that step, with what was refused and a hint (exit 4, no traceback; a
    library caller catches BuildError, not OSError), and leaves tmp/ empty. It was an
    OSError: "error: Operation not permitted: <paths>", exit 1, no step."""
    import builder
    from builder.errors import BuildError

    base_tar = tmp_path / "base.tar"
    run_pybuild("save", BASE, "-o", base_tar, root=store_root, check=True)
    root = str(tmp_path / "store")
    run_pybuild("load", "-i", base_tar, root=root, check=True)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY f /f\n",
                                           "f": "content\n"})
    layers = os.path.join(root, "layers")
    subprocess.run(["chattr", "+i", layers], check=True)
    try:
        p = run_pybuild("-t", "refused", ctx, root=root)
        with pytest.raises(BuildError) as caught:
            builder.build(str(ctx), tags=["refused"], root=root)
        left = tmp_entries(root)
    finally:
        subprocess.run(["chattr", "-i", layers], check=True)
    err = p.stderr.decode()
    assert p.returncode == 4, err
    assert f"error: {ctx}/Dockerfile:2 [2/2] COPY: Operation not permitted: " in err, err
    assert f" -> {layers}/" in err and "hint: refused even to root: an immutable" in err, err
    assert "Traceback" not in err
    assert caught.value.step == f"{ctx}/Dockerfile:2 [2/2] COPY"
    assert caught.value.reason.startswith("Operation not permitted: ")
    assert left == []
    # Once the store takes it, the same build goes through.
    again = run_pybuild("-q", "-t", "refused", ctx, root=root, check=True)
    assert again.stdout.decode().startswith("sha256:")


def test_stopping_sandboxes_waits_for_a_sandbox_module_still_being_imported():
    """A failing stage stops the others' sandboxes while another stage's thread may still be
    importing builder.sandbox (imports are lazy): that must wait, not see half a module."""
    script = r"""
import importlib, importlib.abc, sys, threading, time
import builder.engine as engine

class SlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "builder.snapshot.overlay":      # imported by builder.sandbox
            time.sleep(0.5)
        return None

sys.meta_path.insert(0, SlowImport())
importer = threading.Thread(target=importlib.import_module, args=("builder.sandbox",))
importer.start()
while "builder.sandbox" not in sys.modules:
    time.sleep(0.01)
engine._kill_sandboxes()
importer.join()
print("stopped")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "stopped"


def test_a_tree_deeper_than_the_recursion_limit_builds_and_is_removed(tmp_path):
    """Directories nested 1,200 deep (PATH_MAX allows ~2,000) in the context and made by a
    RUN: COPY reads them, the layers commit, and removing the image and pruning deletes
    it all (no RecursionError, nothing left)."""
    import builder
    from builder.image import chain_ids
    from builder.store import Store
    from builder.trees import remove_tree
    from conftest import busybox_context
    root = str(tmp_path / "store")
    builder.build(str(busybox_context(tmp_path / "base")), tags=[BASE], root=root)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
COPY src /src
RUN p=/deep; i=0; while [ $i -lt 1200 ]; do p=$p/d; i=$((i+1)); done; mkdir -p $p && echo bottom > $p/leaf
"""})
    nested = ["d"] * 1200
    fd = nested_dirs(ctx, ["src", *nested])
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
        f.write("from the context\n")
    os.close(fd)
    try:
        image = builder.build(str(ctx), tags=["deep:test"], root=root)
    finally:
        remove_tree(str(ctx))           # pytest's own clean-up recurses
    layers = [Store(root).layers.diff_dir(c) for c in chain_ids(image.diff_ids)[-2:]]
    with open(os.path.join(layers[0], "src", *nested, "leaf")) as f:
        assert f.read() == "from the context\n"
    with open(os.path.join(layers[1], "deep", *nested, "leaf")) as f:
        assert f.read() == "bottom\n"
    assert run_pybuild("rmi", "deep:test", root=root).returncode == 0
    p = run_pybuild("prune", "--keep-storage", "0", root=root)
    assert p.returncode == 0, p.stderr.decode()
    assert not any(os.path.exists(d) for d in layers)
    assert our_mounts() == []


def _alive(pid: int) -> bool:
    """Running (a zombie is not: nothing of it runs, and only its new parent can reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_copy_workers_die_with_the_process_that_forked_them(tmp_path):
    # A COPY's workers are forked by its sandbox process, which is killed with the build;
    # they must not go on writing into the layer dir the build is removing.
    from builder import fileops
    pids = tmp_path / "pids"
    pids.mkdir()
    items = [(f"/d{i}/f",) for i in range(fileops._PARALLEL_FROM)]
    forker = os.fork()
    if forker == 0:
        try:
            def work(_item):
                (pids / str(os.getpid())).touch()
                time.sleep(60)
            fileops._in_parallel(items, work)
        finally:
            os._exit(0)
    workers = min(4, 2 * len(os.sched_getaffinity(0)))
    try:
        assert wait_until(lambda: len(os.listdir(pids)) == workers), "the workers started"
        os.kill(forker, signal.SIGKILL)
        os.waitpid(forker, 0)
        assert wait_until(lambda: not any(_alive(int(p)) for p in os.listdir(pids))), \
            "a copy worker outlived the process that forked it"
    finally:
        # (Only a worker left running: forked from this process, it has its command line.)
        with open("/proc/self/cmdline", "rb") as f:
            ours = f.read()
        for p in os.listdir(pids):
            with contextlib.suppress(OSError):
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if f.read() == ours and _alive(int(p)):
                        os.kill(int(p), signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(forker, os.WNOHANG)
