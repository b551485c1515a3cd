#!/usr/bin/env python3
"""Where a copy-30k build's time goes: the COPY step's phases, timed inside the build process.

    sudo .venv/bin/python bench/phases.py                       # cold, unchanged, one file x3
    sudo .venv/bin/python bench/phases.py --builds one,one,one --work /root/phases

Builds bench.py's copy-30k context through the library (`builder.build`)
with a few engine functions wrapped in timers, and prints one line per
build: its total, and the seconds spent reading the step's inputs (context
walk and digests), matching sources to the last layer's rows, in the
COPY's processes, and in the commit (hashes, blob) and its tar walk (part
of it); and, of the COPY's processes, the chrooted pass (what goes where)
and the writing of the files into the upper dir after the unmount; then
the CPU seconds and page faults of the build process and of the processes
it waited for. `cold` starts from a store holding only the
base image (the previous store is moved aside and deleted at the end, as
bench.py does: see discard()); `unchanged` builds again; `one` appends a byte
to one file first, as bench.py's "1 file changed" does; `settled` does the
same and waits 2.1 s before building, as a person does between an edit and a
build: the file is then old enough for the context caches to keep it
(statcache.py's two-second rule), and keeping it is part of the build
("cache save": the stat cache's and the runs' files written).

The work dir's file system matters more than anything here: a store in a
directory where many files were recently deleted creates files several times
slower (bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import builder  # noqa: E402
from builder import engine, executor, fileops, sandbox, statcache  # noqa: E402
from builder.layer import commit, diff  # noqa: E402

PHASES = [(engine, "read_inputs", "inputs"), (fileops, "match_donor", "match"),
          (sandbox, "run_in_root", "processes"), (commit, "commit_upper", "commit"),
          (diff, "write_tar", "tar walk"), (statcache.StatCache, "save", "cache save"),
          # A certain miss (engine._copy_first): the workers' rows read, the digests the copy
          # made taken up, then the source's digest and the recipe made from them.
          (executor._CopyRecord, "__init__", "rows"), (executor._CopyRecord, "teach", "learnt"),
          (engine, "digest_deferred", "digests"), (engine.Builder, "_recipe", "recipe")]
# Parts of "processes" that run in the COPY's forked (and chrooted) processes: they report
# through a descriptor opened before the fork (nothing of the host is visible after chroot).
CHILD_PHASES = [(fileops, "copy_into_root", "chrooted pass"),
                (fileops, "finish_in_upper", "files into the upper dir")]


def timing(spent: dict, child_log: int) -> None:
    """Wrap each phase's function so that its seconds add up in `spent` (by label), or, in
    the COPY's processes, are written to `child_log` as lines of `label<TAB>seconds`."""
    for module, name, label in PHASES + CHILD_PHASES:
        real = getattr(module, name)
        in_child = (module, name, label) in CHILD_PHASES

        def timed(*args, _real=real, _label=label, _in_child=in_child, **kwargs):
            t0 = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                if _in_child:
                    os.write(child_log, f"{_label}\t{seconds}\n".encode())
                else:
                    spent[_label] = spent.get(_label, 0.0) + seconds
        setattr(module, name, timed)


def usage() -> tuple[float, float, int, int]:
    """(CPU seconds, page faults) so far of this process and of the processes it waited for
    (the COPY's sandbox, its chrooted pass and copy workers, the RUN's sandboxes): CPU of
    each, then faults of each. A fault costs 1.5-6 us of CPU here (bench/README.md)."""
    own, waited = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime, waited.ru_utime + waited.ru_stime,
            own.ru_minflt, waited.ru_minflt)


def child_times(path: str) -> dict[str, float]:
    """What the COPY's processes wrote to the log at `path` (emptied)."""
    out: dict[str, float] = {}
    with open(path, "r+", encoding="utf-8") as f:
        for line in f:
            label, _, seconds = line.rstrip("\n").partition("\t")
            out[label] = out.get(label, 0.0) + float(seconds)
        f.truncate(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/var/tmp/pybuild-phases")
    ap.add_argument("--builds", default="cold,unchanged,one,one,one",
                    help="comma-separated: cold, unchanged, one (one file changed), settled "
                         "(one file changed 2.1 s before the build)")
    args = ap.parse_args()
    kinds = args.builds.split(",")
    if not set(kinds) <= {"cold", "unchanged", "one", "settled"}:
        ap.error(f"--builds {args.builds}: each must be cold, unchanged, one or settled")
    os.makedirs(args.work, exist_ok=True)
    base_tar = os.path.join(args.work, "base.tar")
    if not os.path.exists(base_tar):
        bench.make_base_tar(args.work)
    ctx = bench.copy_30k(args.work)
    changed = os.path.join(ctx, "src", "d000", "f00000.dat")
    store = os.path.join(args.work, "store")
    spent: dict[str, float] = {}
    log_path = os.path.join(args.work, "child-phases.log")
    child_log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    timing(spent, child_log)
    try:
        for kind in kinds:
            if kind == "cold" or not os.path.exists(store):
                bench.discard(store)
                bench.timed([sys.executable, "-m", "builder", "--root", store, "load", "-i",
                             base_tar], cwd=bench.REPO)
            elif kind in ("one", "settled"):
                with open(changed, "ab") as f:
                    f.write(b"x")
                if kind == "settled":
                    time.sleep(2.1)
            spent.clear()
            before = usage()
            t0 = time.perf_counter()
            builder.build(ctx, tags=["phases-copy"], root=store)
            total = time.perf_counter() - t0
            used = [b - a for a, b in zip(before, usage())]
            spent.update(child_times(log_path))
            print(f"{kind:9}  build {total:.3f} s  " +
                  "  ".join(f"{label} {spent[label]:.3f}" for _, _, label in PHASES + CHILD_PHASES
                            if label in spent) +
                  f"  | CPU s: build process {used[0]:.2f}, its processes {used[1]:.2f}; "
                  f"page faults {used[2]:.0f} / {used[3]:.0f}", flush=True)
    finally:
        os.close(child_log)
        bench.empty_trash(args.work)


if __name__ == "__main__":
    main()
