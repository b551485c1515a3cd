#!/usr/bin/env python3
"""Where a copy-30k build's time goes: the COPY step's phases, timed inside the build process.

    sudo .venv/bin/python bench/phases.py                       # cold, unchanged, one file x3
    sudo .venv/bin/python bench/phases.py --builds one,one,one --work /root/phases

Builds bench.py's copy-30k context through the library (`builder.build`)
with a few engine functions wrapped in timers, and prints one line per
build: its total, and the seconds spent reading the step's inputs (context
walk and digests), matching sources to the last layer's rows, in the COPY's
processes (the chrooted pass and the copy into the upper dir), and in the
commit (tar walk, hashes, blob). `cold` starts from a store holding only the
base image (the previous store is moved aside and deleted at the end, as
bench.py does: see discard()); `unchanged` builds again; `one` appends a byte
to one file first, as bench.py's "1 file changed" does.

The work dir's file system matters more than anything here: a store in a
directory where many files were recently deleted creates files several times
slower (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import builder  # noqa: E402
from builder import engine, fileops, sandbox  # noqa: E402
from builder.layer import commit  # noqa: E402

PHASES = [(engine, "read_inputs", "inputs"), (fileops, "match_donor", "match"),
          (sandbox, "run_in_root", "processes"), (commit, "commit_upper", "commit")]


def timing(spent: dict) -> None:
    """Wrap each phase's function so that its seconds add up in `spent` (by label)."""
    for module, name, label in PHASES:
        real = getattr(module, name)

        def timed(*args, _real=real, _label=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t0
        setattr(module, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/var/tmp/pybuild-phases")
    ap.add_argument("--builds", default="cold,unchanged,one,one,one",
                    help="comma-separated: cold, unchanged, one (one file changed)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    base_tar = os.path.join(args.work, "base.tar")
    if not os.path.exists(base_tar):
        bench.make_base_tar(args.work)
    ctx = bench.copy_30k(args.work)
    changed = os.path.join(ctx, "src", "d000", "f00000.dat")
    store = os.path.join(args.work, "store")
    spent: dict[str, float] = {}
    timing(spent)
    try:
        for kind in args.builds.split(","):
            if kind == "cold" or not os.path.exists(store):
                bench.discard(store)
                bench.timed([sys.executable, "-m", "builder", "--root", store, "load", "-i",
                             base_tar], cwd=bench.REPO)
            elif kind == "one":
                with open(changed, "ab") as f:
                    f.write(b"x")
            spent.clear()
            t0 = time.perf_counter()
            builder.build(ctx, tags=["phases-copy"], root=store)
            total = time.perf_counter() - t0
            print(f"{kind:9}  build {total:.3f} s  " +
                  "  ".join(f"{label} {spent[label]:.3f}" for _, _, label in PHASES
                            if label in spent), flush=True)
    finally:
        bench.empty_trash(args.work)


if __name__ == "__main__":
    main()
