#!/usr/bin/env python3
"""Alternate builds with two versions of pybuild, to see what a change does to one figure.

    sudo .venv/bin/python bench/ab.py --base HEAD~1                  # copy-30k, one file changed
    sudo .venv/bin/python bench/ab.py --base main --workload cold --pairs 4
    sudo .venv/bin/python bench/ab.py --base v1 --head v2 --workload run-50

On this machine the same build varies by a third from one minute to the
next (bench/README.md), far more than most changes move it; two versions
built one right after the other, pair by pair, see the same machine; and a
build's CPU seconds (its own and those of the processes it waited for)
vary far less than its wall time, so they show a change that saves CPU
where two busy cores hide it from the clock. Each
version gets a git worktree (`--head` defaults to this checkout as it is,
uncommitted changes included) and a store of its own under --work, and
each build runs `python -m builder` in that tree. Prints each pair's times
(the whole build and, for the COPY workloads, the COPY step) and CPU
seconds, the medians, and how many pairs the head won on each.

Workloads: `one-file` (copy-30k, one file appended to before each build),
`unchanged` (copy-30k, nothing changed), `cold` (copy-30k into a store with
nothing but the base image; stores are deleted only at the end, see
bench.py's discard()), `run-50` (50 RUN steps, --no-cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import bench

WORKLOADS = ("one-file", "unchanged", "cold", "run-50")


class Version:
    """One side of the comparison: a tree to run `python -m builder` in, and its own store."""

    def __init__(self, name: str, rev: str | None, work: str, base_tar: str):
        self.name = name
        self.base_tar = base_tar
        self.worktree = None
        self.tree = bench.REPO
        if rev is not None:
            self.worktree = self.tree = os.path.join(work, f"tree-{name}")
            bench.discard(self.tree)
            subprocess.run(["git", "-C", bench.REPO, "worktree", "add", "-q", "--detach",
                            self.tree, rev], check=True)
        subprocess.run([sys.executable, "-m", "compileall", "-q", "builder"], cwd=self.tree,
                       check=True)
        self.work = work
        self.stores = 0
        self.store = self.new_store()

    def new_store(self) -> str:
        """A store holding only the base image."""
        self.stores += 1
        store = os.path.join(self.work, f"store-{self.name}-{self.stores}")
        bench.discard(store)
        self.run("--root", store, "load", "-i", self.base_tar)
        return store

    def run(self, *args: str) -> tuple[float, str, float]:
        seconds, _, out, cpu = bench.timed([sys.executable, "-m", "builder", *args],
                                           cwd=self.tree)
        return seconds, out, cpu

    def build(self, ctx: str, *extra: str) -> tuple[float, float | None, float]:
        """(seconds of the whole build, seconds of its step 2 (the COPY in copy-30k), CPU
        seconds of the build)."""
        seconds, out, cpu = self.run("--root", self.store, "build", *extra, "-t", "ab", ctx)
        return seconds, bench._step_times(out).get(2), cpu

    def close(self) -> None:
        if self.worktree:
            subprocess.run(["git", "-C", bench.REPO, "worktree", "remove", "--force",
                            self.worktree], check=False)


def measure(workload: str, version: Version, work: str) -> tuple[float, float | None, float]:
    if workload == "run-50":
        seconds, _, cpu = version.build(bench.many_runs(work, 50), "--no-cache")
        return seconds, None, cpu
    ctx = bench.copy_30k(work)
    if workload == "one-file":
        with open(os.path.join(ctx, "src", "d000", "f00000.dat"), "ab") as f:
            f.write(b"x")
    elif workload == "cold":
        bench.discard(version.store)
        version.store = version.new_store()
    return version.build(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the git revision to compare with")
    ap.add_argument("--head", help="a git revision (default: this checkout as it is)")
    ap.add_argument("--workload", choices=WORKLOADS, default="one-file")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--work", default="/var/tmp/pybuild-ab")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    subprocess.run(["git", "-C", bench.REPO, "worktree", "prune"], check=True)
    base_tar = bench.make_base_tar(args.work)
    versions = [Version("base", args.base, args.work, base_tar),
                Version("head", args.head, args.work, base_tar)]
    try:
        if args.workload in ("one-file", "unchanged"):
            ctx = bench.copy_30k(args.work)
            for v in versions:            # (untimed: the layer the timed builds start from)
                v.build(ctx)
        results: dict[str, list[tuple[float, float | None, float]]] = {"base": [], "head": []}
        for i in range(args.pairs):
            line = []
            for v in versions:
                seconds, step, cpu = measure(args.workload, v, args.work)
                results[v.name].append((seconds, step, cpu))
                line.append(f"{v.name} {seconds:.2f} s (" +
                            (f"COPY {step:.2f} s, " if step else "") + f"CPU {cpu:.2f} s)")
            print(f"pair {i + 1}: " + ", ".join(line), flush=True)
        pairs = list(zip(results["base"], results["head"]))
        won = sum(h[0] < b[0] for b, h in pairs)
        for name, runs in results.items():
            builds = sorted(r[0] for r in runs)
            steps = sorted(r[1] for r in runs if r[1] is not None)
            print(f"{name}: builds {builds[0]:.2f}-{builds[-1]:.2f} s, median "
                  f"{statistics.median(builds):.2f} s" +
                  (f"; COPY step median {statistics.median(steps):.2f} s" if steps else "") +
                  f"; CPU median {statistics.median(r[2] for r in runs):.2f} s")
        print(f"head faster in {won} of {args.pairs} pairs, "
              f"used less CPU in {sum(h[2] < b[2] for b, h in pairs)}")
    finally:
        for v in versions:
            v.close()
        bench.empty_trash(args.work)


if __name__ == "__main__":
    main()
