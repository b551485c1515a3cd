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
