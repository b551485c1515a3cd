"""RUN sandboxes forked by the fork server (forkserver.py): same files, output, status, errors.

From a build's second RUN on the overlay driver, a small server process
forks the sandboxes. Each test here runs two RUN steps first (the second
long enough for the server to be ready), then checks that what the later
steps do is what a sandbox forked by pybuild itself does, and that the
server is gone when the build ends, however it ends. On the other drivers
the same builds run without a server, and must give the same results.
"""

from __future__ import annotations

import os
import time

import pytest

import builder
from builder import progress

from conftest import (BASE, fork_servers_of, forked_by_fork_server, layer_files, our_mounts,
                      processes_with, write_context)


def _dockerfile(marker: str, *steps: str) -> str:
    # Two new RUN steps (the marker makes them miss the cache), then `steps`.
    return "\n".join([f"FROM {BASE}", f"RUN echo {marker} > /first", "RUN sleep 0.4", *steps]) + "\n"


@pytest.fixture
def marker() -> str:
    return f"{time.time_ns() % 10_000_000:07d}"


def _no_server_left() -> None:
    assert fork_servers_of(os.getpid()) == [], "the fork server outlived the build"
    assert our_mounts() == []


def test_later_runs_are_forked_by_the_server_with_their_files_and_output(
        tmp_path, base_image, store_root, store, driver, marker):
    sleep = f"sleep 0.3{marker}"        # (a unique command line, to find the process by)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": _dockerfile(
        marker,
        "RUN echo third > /third && echo said-third && " + sleep,
        "RUN echo fourth > /fourth && rm /first && echo said-fourth")})
    ancestry = []

    def on_event(ev):
        if isinstance(ev, progress.StepOutput) and ev.line == "said-third":
            deadline = time.time() + 5
            while not processes_with(sleep) and time.time() < deadline:
                time.sleep(0.01)
            ancestry.append(forked_by_fork_server(processes_with(sleep)[0]))

    image = builder.build(str(ctx), root=store_root, on_event=on_event)
    assert ancestry == [driver == "overlay"]
    assert layer_files(store, image.layers[-2])["third"] == b"third\n"
    fourth = layer_files(store, image.layers[-1])
    assert fourth["fourth"] == b"fourth\n" and ".wh.first" in fourth   # a deletion, too
    _no_server_left()


def test_a_failing_run_forked_by_the_server_reports_its_exit_code(
        tmp_path, base_image, store_root, marker):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": _dockerfile(
        marker, "RUN true", "RUN echo before-failing && exit 3")})
    lines = []
    with pytest.raises(builder.StepFailed) as err:
        builder.build(str(ctx), root=store_root,
                      on_event=lambda ev: lines.append(getattr(ev, "line", None)))
    assert (err.value.status, err.value.line) == (3, 5)
    assert "before-failing" in lines
    _no_server_left()


def test_a_run_whose_command_was_killed_says_by_which_signal(tmp_path, base_image, store_root, marker):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": _dockerfile(
        marker, "RUN sh -c 'kill -9 $$' || exit $?")})   # (not exec'd: PID 1 ignores it)
    with pytest.raises(builder.StepFailed) as err:
        builder.build(str(ctx), root=store_root)
    assert err.value.status == 128 + 9
    assert "killed by signal 9" in str(err.value)
    _no_server_left()


def test_a_sandbox_setup_error_comes_back_as_one_clear_message(
        tmp_path, base_image, store_root, marker):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": _dockerfile(marker, "USER ghost",
                                                                     "RUN true")})
    with pytest.raises(builder.BuildError) as err:
        builder.build(str(ctx), root=store_root)
    assert "unable to find user ghost" in str(err.value)
    assert "Dockerfile:5" in str(err.value)
    _no_server_left()


class _OnlyHere:
    """A class the fork server cannot import (it runs with only pybuild on its path)."""


def test_a_request_the_server_cannot_carry_out_is_an_error_and_later_ones_fork_here(tmp_path):
    from builder.forkserver import ForkServer
    from builder.sandbox import RunSpec, SetupError
    server = ForkServer()
    try:
        deadline = time.time() + 10
        while not server.ready() and time.time() < deadline:
            time.sleep(0.01)
        assert server.ready()
        with pytest.raises(SetupError, match="fork server could not start"):
            server.start(_OnlyHere(), RunSpec(argv=["true"], env=[]), str(tmp_path))
        assert not server.ready()
        assert server.start(_OnlyHere(), RunSpec(argv=["true"], env=[]), str(tmp_path)) is None
    finally:
        server.close()
    _no_server_left()


def test_parallel_stages_share_one_server(tmp_path, base_image, store_root, store, marker):
    """Two stages built at once each run their RUN steps through the same server (its
    requests come from two threads): every step's file is in its own stage."""
    runs = "\n".join(f"RUN sleep 0.1 && echo {marker}-{{s}}{i} > /{{s}}{i}" for i in range(5))
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS a
{runs.format(s="a")}
FROM {BASE} AS b
{runs.format(s="b")}
FROM {BASE}
COPY --from=a /a0 /a1 /a2 /a3 /a4 /from-a/
COPY --from=b /b0 /b1 /b2 /b3 /b4 /from-b/
"""})
    image = builder.build(str(ctx), root=store_root)
    files = {}
    for layer in image.layers[-2:]:
        files.update(layer_files(store, layer))
    assert {k: v for k, v in files.items() if not k.endswith("/")} == {
        f"from-{s}/{s}{i}": f"{marker}-{s}{i}\n".encode() for s in "ab" for i in range(5)}
    _no_server_left()
