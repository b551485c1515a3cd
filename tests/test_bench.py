"""bench/bench.py's own arithmetic: the table that says whether the issue's figures are met."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench  # noqa: E402


def test_step_times_are_read_from_pybuilds_plain_output():
    out = "#1 [1/3] FROM busybox:bench\n#1 DONE 0.0s\n#2 [2/3] COPY . /app\n#2 DONE 1.1s\n" \
          "#3 [3/3] RUN ls /app\n#3 0.02 real 0.01\n#3 DONE 0.2s\n"
    assert bench._step_times(out) == {1: 0.0, 2: 1.1, 3: 0.2}


def test_the_median_run_and_the_range(monkeypatch):
    monkeypatch.setattr(bench, "REPEAT", 3)
    runs = iter([(3.0, "c"), (1.0, "a"), (2.0, "b")])
    assert bench.median_run(lambda: next(runs)) == ((2.0, "b"), (1.0, 3.0))


def test_the_table_gives_the_ratio_to_the_floor_and_the_cpu_seconds(capsys, monkeypatch):
    monkeypatch.setattr(bench, "REPEAT", 3)
    bench.print_table([
        dict(workload="copy-30k", tool="pybuild", cold=2.4, cached=0.3, rss=120 * 1024, floor=0.48,
             cp_a=1.2, cpu=dict(build=5.0, floor=0.75, cp_a=1.15),
             ranges=dict(cold=(2.2, 2.9))),
        dict(workload="copy-30k", tool="buildah", cold=19.0, cached=13.6, rss=90 * 1024,
             floor=0.48),
    ])
    mine, peer = capsys.readouterr().out.splitlines()[1:]
    assert mine.split()[:7] == ["copy-30k", "pybuild", "2.40", "0.30", "0.02x", "5.00x", "120"]
    assert "cp -a 1.20s (2.50x the floor)" in mine
    assert "CPU s: build 5.00, floor 0.75, cp -a 1.15" in mine
    assert "cold 2.20-2.90s" in mine
    assert peer.split()[:6] == ["copy-30k", "buildah", "19.00", "13.60", "45.33x", "39.58x"]
    assert "CPU" not in peer


class _FakeTool(bench.Tool):
    """Builds nothing: reports a DONE time for each step whose text has a salt in it (the
    steps a real build would run, the others being cached), 10 ms up to step 104, 12 after."""
    name = "fake"

    def __init__(self):
        self.built: list[list[int]] = []

    def build(self, ctx, tag, cold=False):
        with open(os.path.join(ctx, "Dockerfile")) as f:
            runs = [line.split() for line in f.read().splitlines()[1:]]
        salted = [i for i, words in enumerate(runs, 1) if words[3] != ">"]
        self.built.append(salted)
        out = "".join(f"#{i + 1} DONE {0.010 if i <= 104 else 0.012}s\n" for i in salted)
        return 1.0, 1024, out, 1.0


def test_depth_in_turns_builds_each_window_new_in_turns_and_gives_the_medians(tmp_path):
    tool = _FakeTool()
    early, late = bench.depth_in_turns(tool, str(tmp_path), 1000, 100)
    assert (round(early, 6), round(late, 6)) == (0.010, 0.012)
    assert len(tool.built) == 2 * bench.DEPTH_PAIRS
    assert tool.built[0] == list(range(5, 105)) and tool.built[1] == list(range(901, 1001))
    assert tool.built[2] == tool.built[0]                   # (in turns, each with a new salt)


def test_the_table_notes_the_depth_in_turns_and_each_one_file_rebuild(capsys):
    bench.print_table([
        dict(workload="run-1000", tool="pybuild", cold=9.0, cached=None, rss=34 * 1024,
             steps={i: 0.008 for i in range(2, 1002)}, in_turns=(0.010, 0.0102)),
        dict(workload="copy-30k (1 file changed)", tool="pybuild", cold=0.9, cached=None,
             rss=110 * 1024, step=0.84, steps_in_order=[1.10, 0.84, 0.82]),
    ])
    depth, change = capsys.readouterr().out.splitlines()[1:]
    assert "last 100: 8 ms each (1.00x) in the cold build" in depth
    assert "in turns (5 builds each): 10.0 ms, 10.2 ms (1.02x)" in depth
    assert "COPY step 0.84s, in build order 1.10 / 0.84 / 0.82s" in change
