"""forked.py: a call made in a forked child, and the cold COPY that commits its layer so."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

import builder
from builder import context, forked, progress, statcache
from builder.errors import BuildError, StoreError
from builder.store import Store

from conftest import BASE, layer_files, write_context
from test_incremental_copy import store_with_base


def test_the_child_s_result_comes_back_and_it_ran_in_another_process():
    child = forked.start(lambda: {"pid": os.getpid(), "data": b"x" * 300_000})
    got = child.result()
    assert got["pid"] not in (os.getpid(), None) and got["pid"] == child.pid
    assert got["data"] == b"x" * 300_000          # (more than a pipe holds at once)
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)         # waited for: no zombie left


def test_the_child_s_exception_is_raised_here_with_its_type_and_details():
    def fail():
        raise BuildError("cannot do it", step="Dockerfile:2 [2/2] COPY", hint="do this")
    with pytest.raises(BuildError) as caught:
        forked.start(fail).result()
    assert caught.value.step == "Dockerfile:2 [2/2] COPY"
    assert caught.value.hint == "do this" and "cannot do it" in str(caught.value)

    def full():
        raise OSError(28, "No space left on device", "/store/tmp/blob")
    with pytest.raises(OSError) as caught:
        forked.start(full).result()
    assert caught.value.errno == 28 and caught.value.filename == "/store/tmp/blob"


def test_an_exception_that_cannot_be_pickled_comes_back_as_a_store_error_with_its_text():
    class Local(Exception):            # (a local class: pickle cannot find it by name)
        pass

    def fail():
        raise Local("the reason")
    with pytest.raises(StoreError, match="Local: the reason"):
        forked.start(fail).result()


def test_cancel_stops_the_child_which_runs_its_cleanup_first(tmp_path):
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"

    def slow():
        try:
            started.write_text("")
            time.sleep(60)
        finally:
            cleaned.write_text("")
    child = forked.start(slow)
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    child.cancel()
    assert time.monotonic() - t0 < 10
    assert cleaned.exists()                  # SIGTERM became KeyboardInterrupt in the child
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    child.cancel()                           # (a second time: nothing to do)


@pytest.fixture
def own_store(tmp_path, driver) -> str:
    return store_with_base(tmp_path, driver, "store")


@pytest.fixture
def started(monkeypatch) -> list[int]:
    """The pids of the children forked.start() forks during the test, in order."""
    pids: list[int] = []
    real = forked.start

    def recording(func):
        child = real(func)
        pids.append(child.pid)
        return child
    monkeypatch.setattr(forked, "start", recording)
    return pids


def test_a_cold_copy_commits_in_a_child_while_the_key_is_made(tmp_path, own_store, started):
    """A cold COPY of context files (nothing cached, so the copy hashes them) commits its
    layer in a forked child; the layer holds the files and the step's key made meanwhile
    is the one the next build hits."""
    files = {f"src/d{i % 7}/f{i}.txt": f"file {i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n",
                                           **files})
    image = builder.build(str(ctx), tags=["forked:1"], root=own_store)
    assert len(started) == 1 and started[0] != os.getpid()
    store = Store(own_store)
    got = layer_files(store, image.layers[-1])
    assert {p: got[p].decode() for p in got if p.startswith("app/d")} == \
        {"app/" + p.removeprefix("src/"): text for p, text in files.items()}
    again = builder.build(str(ctx), tags=["forked:2"], root=own_store)
    assert again.id == image.id and len(started) == 1         # a cache hit: nothing ran


def test_a_failure_beside_the_forked_commit_stops_it_and_leaves_nothing(tmp_path, own_store,
                                                                         started, monkeypatch):
    """The build process's side fails (here: the source's digest) while the child commits:
    the child is stopped before the error goes on, and it leaves no temp files, no layer
    dir of its own and no process."""
    def broken(self, source):
        raise BuildError("cannot read the source")
    monkeypatch.setattr(context.BuildContext, "digest", broken)
    files = {f"src/f{i}.txt": f"file {i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n",
                                           **files})
    layers_before = set(os.listdir(os.path.join(own_store, "layers")))
    with pytest.raises(BuildError, match="cannot read the source") as caught:
        builder.build(str(ctx), tags=["forked:broken"], root=own_store)
    assert caught.value.step and "COPY" in caught.value.step
    assert len(started) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)
    assert os.listdir(os.path.join(own_store, "tmp")) == []
    new = set(os.listdir(os.path.join(own_store, "layers"))) - layers_before
    # (the child may have installed the complete layer before it was stopped: never a part)
    for name in new:
        assert sorted(os.listdir(os.path.join(own_store, "layers", name))) >= ["diff", "layer.json"]


def test_the_stat_cache_is_written_while_the_cold_copy_commits(tmp_path, own_store):
    """What the cold COPY taught the stat cache is on the disk before the next step starts
    (written beside the forked commit, not only at the build's end): a build that is
    killed later, or another build of the same context meanwhile, reads no file again."""
    files = {f"src/f{i}.txt": f"file {i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY src/ /app/\n"
                                                         "RUN cat /app/f1.txt > /seen\n",
                                           **files})
    time.sleep(2.1)              # (files changed within two seconds are not kept: statcache.py)
    kept_path = context.StatCache(os.path.join(own_store, "cache", "context"), str(ctx)).path
    seen = {}

    def on_event(ev):
        if isinstance(ev, progress.StepStarted) and ev.text.startswith("RUN"):
            seen["kept"] = statcache.read_marshal_dict(kept_path)
    builder.build(str(ctx), tags=["forked:kept"], root=own_store, on_event=on_event)
    assert {p for p in seen["kept"] if p.endswith(".txt")} == set(files)
    digest = seen["kept"]["src/f1.txt"][4]
    assert digest == hashlib.sha256(b"file 1\n").hexdigest()
