#!/usr/bin/env python3
"""pybuild's benchmark: the same Dockerfiles, the same busybox base, pybuild beside its peers.

    sudo .venv/bin/python bench/bench.py                 # every workload, every tool found
    sudo .venv/bin/python bench/bench.py --tools pybuild --workloads seven-step,copy-30k

Tools: pybuild (this checkout), `docker build` with the classic builder
(DOCKER_BUILDKIT=0; needs a running dockerd, DOCKER_HOST is honoured) and
with BuildKit (DOCKER_BUILDKIT=1: the daemon's BuildKit, through a CLI that
has the built-in client or buildx), and `buildah bud --layers
--isolation=chroot`, each used when it is installed. Named with --tools
only: pybuild-gzip (`--compression gzip`: new layers kept as gzip, as
before the default became plain tars), pybuild-fuse and pybuild-vfs (the
other storage drivers). Tools run one after another, so a later one's cold builds follow
the earlier ones' deletions (bench/README.md): compare two tools with runs
of their own after quiet minutes, or alternately.
Workloads (the issue's): a 7-step Dockerfile; a COPY of a 30,000-file,
~107 MB context (cold, unchanged, one file changed); a RUN that writes
~256 MB in 22,000 files; 140 and 1,000 RUN steps. The floor is
`tar -c DIR | sha256sum` of the same tree, the least work a builder that
hashes what it stores can do, timed with the tree in the page cache (as the
builds find it); as root, the cold COPY is also run, and the floor timed,
right after dropping the page cache. The cold COPY's note also gives `cp -a`
of its tree, timed the same way: what writing those files costs the machine
at all; and the CPU seconds of the build, the floor and `cp -a` (what a
ratio to the floor asks of two cores). Old stores are deleted after the last
measurement, not before a cold build (see discard()).

Prints one table: workload, tool, cold s, cached s, ratio to the best peer
(cached, or cold where a workload has no cached run), ratio to the floor,
peak RSS of the tool's own process. Timings are wall clock on this machine,
each the median of --repeat runs (3; the notes give the range), except the
140- and 1,000-step builds; run it on an idle machine. For one file changed
in the 30,000-file COPY, the note gives the COPY step's own time, which is
what the issue's figure is about (the build's time includes the step after).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "busybox:bench"
REPEAT = 3      # --repeat: each timing is the median of this many runs


# ---- running things --------------------------------------------------------------

def timed(cmd: list[str], *, env=None, cwd=None, check=True) -> tuple[float, int, str, float]:
    """(seconds, peak RSS of the process in KB, stderr+stdout, CPU seconds) of one command.

    The CPU seconds (user + system) are the command's and those of the processes it waited
    for (a build's sandboxes, copy workers and hashing helpers; the shell's pipeline).

    Dirty pages of earlier runs are written back first (untimed): on a small
    VM disk, their writeback otherwise lands in whichever build comes next.
    """
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    text = out.decode(errors="replace")
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{text[-3000:]}")
    return elapsed, usage.ru_maxrss, text, usage.ru_utime + usage.ru_stime


class Tool:
    name = "?"

    def available(self) -> bool:
        return True

    def prepare(self, base_tar: str) -> None:
        pass

    def build(self, ctx: str, tag: str, cold: bool = False) -> tuple[float, int, str]:
        """Build; `cold`: with nothing cached from earlier builds."""
        raise NotImplementedError


def discard(path: str) -> None:
    """Move a tree out of the way now; main() deletes it after the last measurement.

    On ext4 without a journal (this repository's machine), creating files
    within a minute or more of deleting many others is slow: the inode
    allocator passes over every recently deleted inode (fs/ext4/ialloc.c,
    recently_deleted()). `cp -a` of the 30,000-file context took 1.1 s into
    a fresh dir and 7.2 s right after deleting such a tree; deleting the old
    store just before a cold build measured that, not the build.
    """
    if not os.path.lexists(path):
        return
    trash = os.path.join(os.path.dirname(os.path.abspath(path)), ".trash")
    os.makedirs(trash, exist_ok=True)
    os.rename(path, os.path.join(trash, f"{os.path.basename(path)}.{time.time_ns()}"))


def empty_trash(work: str) -> None:
    shutil.rmtree(os.path.join(work, ".trash"), ignore_errors=True)


class Pybuild(Tool):
    name = "pybuild"

    def __init__(self, root: str, driver: str = "overlay", compression: str | None = None):
        self.root = root
        self.cmd = [sys.executable, "-m", "builder", "--root", root, "--storage-driver", driver]
        self.compression = compression
        if driver != "overlay":
            self.name = f"pybuild-{driver}"
        elif compression is not None:       # (not the default: plain tars)
            self.name = f"pybuild-{compression}"

    def prepare(self, base_tar: str) -> None:
        self.base_tar = base_tar
        discard(self.root)
        timed(self.cmd + ["load", "-i", base_tar], cwd=REPO)

    def build(self, ctx, tag, cold=False, keep_store=False):
        if cold and not keep_store:   # the strictest cold: a store with nothing but the base image
            self.prepare(self.base_tar)
        extra = ["--no-cache"] if cold and keep_store else []
        if self.compression is not None:
            extra += ["--compression", self.compression]
        return timed(self.cmd + ["build", *extra, "-t", tag, ctx], cwd=REPO)


class DockerClassic(Tool):
    name = "docker"

    def __init__(self):
        self.docker = shutil.which("docker") or "docker"
        self.env = dict(os.environ, DOCKER_BUILDKIT="0")

    def available(self) -> bool:
        try:
            return timed([self.docker, "info"], env=self.env, check=False)[2].find("Server Version") >= 0
        except OSError:
            return False

    def prepare(self, base_tar):
        timed([self.docker, "load", "-i", base_tar], env=self.env)

    def build(self, ctx, tag, cold=False, keep_store=False):
        extra = ["--no-cache"] if cold else []
        return timed([self.docker, "build", "-q", *extra, "-t", tag, ctx], env=self.env)


class DockerBuildKit(DockerClassic):
    """`docker build` with BuildKit (DOCKER_BUILDKIT=1): the daemon's own BuildKit, driven by a
    CLI that still has the built-in client (Docker 20.10's; a newer CLI needs the buildx
    plugin), the first of `docker` on the PATH and /usr/bin/docker that builds."""
    name = "docker-buildkit"

    def __init__(self):
        self.env = dict(os.environ, DOCKER_BUILDKIT="1")
        self.docker = None

    def available(self) -> bool:
        import tempfile
        with tempfile.TemporaryDirectory() as ctx:
            write(os.path.join(ctx, "Dockerfile"), "FROM scratch\nCOPY Dockerfile /probe\n")
            for cli in dict.fromkeys(c for c in (shutil.which("docker"), "/usr/bin/docker") if c):
                try:
                    probe = timed([cli, "build", "-q", ctx], env=self.env, check=False)
                except OSError:
                    continue
                if "sha256:" in probe[2]:
                    self.docker = cli
                    timed([cli, "image", "prune", "-f"], env=self.env, check=False)
                    return True
        return False


class Buildah(Tool):
    name = "buildah"

    def __init__(self, root: str):
        self.base = ["buildah", "--root", os.path.join(root, "storage"),
                     "--runroot", os.path.join(root, "run")]

    def available(self) -> bool:
        return shutil.which("buildah") is not None

    def prepare(self, base_tar):
        timed(self.base + ["pull", "-q", f"docker-archive:{base_tar}"])
        timed(self.base + ["tag", f"docker.io/library/{BASE}", BASE], check=False)

    def build(self, ctx, tag, cold=False, keep_store=False):
        extra = ["--no-cache"] if cold else []
        return timed(self.base + ["bud", "--layers", "--isolation=chroot", "-q", *extra, "-t", tag, ctx])


# ---- workloads -------------------------------------------------------------------

def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def seven_step(work: str) -> str:
    ctx = os.path.join(work, "seven-step")
    write(os.path.join(ctx, "Dockerfile"), f"""FROM {BASE}
ENV APP=/app MODE=bench
WORKDIR /app
COPY app.sh /app/app.sh
RUN chmod +x /app/app.sh && echo built > /app/stamp
LABEL org.example.bench=seven
CMD ["/app/app.sh"]
""")
    write(os.path.join(ctx, "app.sh"), "#!/bin/sh\necho hello\n")
    return ctx


def copy_30k(work: str) -> str:
    """30,000 files, ~107 MB, in 300 directories: a large source tree."""
    ctx = os.path.join(work, "copy-30k")
    if os.path.exists(os.path.join(ctx, "Dockerfile")):
        return ctx
    rnd = random.Random(30000)
    for i in range(30000):
        size = rnd.choice((512, 1024, 2048, 3000, 4096, 6000, 8192, 12000))
        write(os.path.join(ctx, "src", f"d{i % 300:03d}", f"f{i:05d}.dat"), rnd.randbytes(size))
    write(os.path.join(ctx, "Dockerfile"), f"FROM {BASE}\nCOPY . /app\nRUN ls /app >/dev/null\n")
    return ctx


def run_256m(work: str) -> tuple[str, str]:
    """A RUN that writes ~256 MB in 22,000 files, by unpacking a tar its base image holds.

    Returns (context of the base image with the payload, context of the RUN).
    The base is built untimed; the RUN is what is measured.
    """
    base_ctx = os.path.join(work, "run-256m-base")
    ctx = os.path.join(work, "run-256m")
    if not os.path.exists(os.path.join(ctx, "Dockerfile")):
        tree = os.path.join(work, "run-256m-tree")
        rnd = random.Random(256)
        for i in range(22000):
            write(os.path.join(tree, f"d{i % 220:03d}", f"f{i:05d}"), rnd.randbytes(12200))
        os.makedirs(base_ctx, exist_ok=True)
        subprocess.run(["tar", "-C", tree, "-cf", os.path.join(base_ctx, "payload.tar"), "."], check=True)
        write(os.path.join(base_ctx, "Dockerfile"), f"FROM {BASE}\nCOPY payload.tar /payload.tar\n")
        write(os.path.join(ctx, "Dockerfile"), "FROM bench-payload\n"
                                               "RUN mkdir /out && time -p tar -xf /payload.tar -C /out\n")
    return base_ctx, ctx


def many_runs(work: str, n: int, salt: str = "", salted: range = range(0),
              name: str = "") -> str:
    """A context of `n` RUN steps (in `work`/`name`, default run-<n>); the steps numbered in
    `salted` (from 1) also echo `salt`, so that they miss the cache and no other does."""
    ctx = os.path.join(work, name or f"run-{n}")
    lines = [f"FROM {BASE}"] + [f"RUN echo {i}{' ' + salt if i in salted else ''} > /step-{i % 50}"
                                for i in range(1, n + 1)]
    write(os.path.join(ctx, "Dockerfile"), "\n".join(lines) + "\n")
    return ctx


DEPTH_PAIRS = 5     # early/late builds in turns, for the per-step time against depth


def depth_in_turns(tool: Tool, work: str, n: int, k: int) -> tuple[float, float]:
    """Seconds per RUN step of `k` steps near the bottom of a stack (steps 5 to 4+k) and at
    the top of an `n`-step one (its last `k`): the medians of DEPTH_PAIRS builds of each,
    in turns, every step before the window cached and every step in it new.

    One cold build's early and late steps are minutes apart, and this machine's speed drifts
    by a third in minutes (its disk, the memory its host hands back, the inodes a deleted
    store leaves to pass over): what a ratio of the two shows is mostly that drift, either
    way. Builds in turns see the same machine, so their ratio is the depth's own."""
    windows = {"early": (5, 4 + k), "late": (n - k + 1, n)}
    per_step: dict[str, list[float]] = {w: [] for w in windows}
    for turn in range(DEPTH_PAIRS):
        for which, (first, last) in windows.items():
            salt = f"{which}-{turn}-{time.time_ns()}"
            ctx = many_runs(work, last, salt, range(first, last + 1), name=f"run-{n}-depth")
            out = tool.build(ctx, f"bench-run-{n}-depth")[2]
            steps = _step_times(out)                      # (#1 is FROM: RUN i is #i+1)
            window = [steps[i + 1] for i in range(first, last + 1) if i + 1 in steps]
            if len(window) < k:
                raise RuntimeError(f"{tool.name}: {k - len(window)} of the window's steps "
                                   "were cached or not reported")
            per_step[which].append(sum(window) / k)
    return tuple(sorted(v)[(len(v) - 1) // 2] for v in per_step.values())


def copy_time(path: str, work: str) -> tuple[float, float]:
    """(seconds, CPU seconds) of `cp -a` of the tree into a new dir of `work` (the median of
    REPEAT runs): what writing its files costs this machine, the least a COPY that stores them
    as files can take on top of the floor. Each copy is discarded (deleted at the end, see
    discard())."""
    def once():
        dest = os.path.join(work, f"cp-a-{time.time_ns()}")
        seconds, _, _, cpu = timed(["cp", "-a", path, dest])
        discard(dest)
        return seconds, cpu
    return median_run(once)[0]


def floor(path: str, *, cold_cache: bool = False) -> tuple[float, float]:
    """(seconds, CPU seconds) of `tar -c | sha256sum` of the tree (the median of REPEAT runs):
    with it in the page cache (run once first), as the builds find their inputs; or,
    `cold_cache`, right after dropping the page cache."""
    command = ["sh", "-c", f"tar -C {path} -cf - . | sha256sum > /dev/null"]
    if not cold_cache:
        timed(command)

    def once():
        if cold_cache:
            drop_page_cache()
        seconds, _, _, cpu = timed(command)
        return seconds, cpu
    return median_run(once)[0]


def can_drop_page_cache() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---- the table ---------------------------------------------------------------------

def main() -> None:
    global REPEAT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/pybuild-bench")
    ap.add_argument("--tools", default="pybuild,docker,docker-buildkit,buildah")
    ap.add_argument("--workloads", default="seven-step,copy-30k,run-256m,run-140,run-1000")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--repeat", type=int, default=REPEAT,
                    help="runs per timing; the table shows the median and the notes the range")
    args = ap.parse_args()
    REPEAT = max(1, args.repeat)
    os.makedirs(args.work, exist_ok=True)
    wanted = args.tools.split(",")
    tools = [t for t in (Pybuild(os.path.join(args.work, "pybuild-store")),
                         Pybuild(os.path.join(args.work, "pybuild-fuse-store"), "fuse"),
                         Pybuild(os.path.join(args.work, "pybuild-vfs-store"), "vfs"),
                         Pybuild(os.path.join(args.work, "pybuild-gzip-store"),
                                 compression="gzip"),
                         DockerClassic(), DockerBuildKit(),
                         Buildah(os.path.join(args.work, "buildah")))
             if t.name in wanted and t.available()]

    base_tar = make_base_tar(args.work)
    for t in tools:
        t.prepare(base_tar)

    rows = []
    for workload in args.workloads.split(","):
        rows += run_workload(workload, tools, args.work)
    print_table(rows)
    empty_trash(args.work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def make_base_tar(work: str) -> str:
    """Build the busybox base image the workloads start FROM and save it: the tar's path."""
    base_tar = os.path.join(work, "base.tar")
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import busybox_context
    from pathlib import Path
    bb = os.path.join(work, "busybox")
    shutil.rmtree(bb, ignore_errors=True)
    busybox_context(Path(bb))
    store = os.path.join(work, "base-store")
    cmd = [sys.executable, "-m", "builder", "--root", store]
    timed(cmd + ["build", "-q", "-t", BASE, bb], cwd=REPO)
    timed(cmd + ["save", BASE, "-o", base_tar], cwd=REPO)
    return base_tar


def run_workload(name: str, tools: list[Tool], work: str) -> list[dict]:
    rows = []
    if name == "seven-step":
        ctx = seven_step(work)
        for t in tools:
            cold, cold_range = median_run(lambda: t.build(ctx, "bench-seven", cold=True))
            cached, cached_range = median_run(lambda: t.build(ctx, "bench-seven"))
            rows.append(dict(workload=name, tool=t.name, cold=cold[0], cached=cached[0],
                             rss=max(cold[1], cached[1]), ranges=dict(cold=cold_range,
                                                                      cached=cached_range)))
    elif name == "copy-30k":
        ctx = copy_30k(work)
        fl, floor_cpu = floor(ctx)
        cp_a, cp_a_cpu = copy_time(ctx, work)
        path = os.path.join(ctx, "src", "d000", "f00000.dat")

        # Each run in build order too, not only the median: the first rebuild after a cold
        # build is the one that also writes its base layer's tar (layer/basetar.py).
        changes: list[tuple] = []

        def change_one_file_and_build():
            with open(path, "ab") as f:
                f.write(b"x")
            changes.append(t.build(ctx, "bench-copy"))
            return changes[-1]
        for t in tools:
            cold, cold_range = median_run(lambda: t.build(ctx, "bench-copy", cold=True))
            cached, cached_range = median_run(lambda: t.build(ctx, "bench-copy"))
            changes.clear()
            changed, changed_range = median_run(change_one_file_and_build)
            rows.append(dict(workload=name, tool=t.name, cold=cold[0], cached=cached[0],
                             rss=max(cold[1], cached[1], *(run[1] for run in changes)),
                             floor=fl, cp_a=cp_a,
                             # (docker's client is not where its build runs)
                             cpu=dict(build=cold[3], floor=floor_cpu, cp_a=cp_a_cpu)
                             if t.name != "docker" else None,
                             ranges=dict(cold=cold_range, cached=cached_range)))
            # The figure is the COPY step's own time ("plus the steps after it").
            copy_step = _step_times(changed[2]).get(2)
            in_order = [_step_times(run[2]).get(2) for run in changes]
            rows.append(dict(workload=name + " (1 file changed)", tool=t.name, cold=changed[0],
                             cached=None, rss=max(run[1] for run in changes), floor=None,
                             step=copy_step, steps_in_order=in_order if None not in in_order
                             else None, ranges=dict(build=changed_range)))
        if can_drop_page_cache():
            # The same cold build with nothing in the page cache, against the floor read so.
            cold_floor = floor(ctx, cold_cache=True)[0]
            for t in tools:
                def cold_cache_build():
                    drop_page_cache()
                    return t.build(ctx, "bench-copy", cold=True)
                cold, cold_range = median_run(cold_cache_build)
                rows.append(dict(workload=name + " (cold page cache)", tool=t.name, cold=cold[0],
                                 cached=None, rss=cold[1], floor=cold_floor,
                                 ranges=dict(cold=cold_range)))
    elif name == "run-256m":
        base_ctx, ctx = run_256m(work)
        fl = floor(os.path.join(work, "run-256m-tree"))[0]
        for t in tools:
            t.build(base_ctx, "bench-payload")

            def run_once():
                seconds, rss, out, _ = t.build(ctx, "bench-run256", cold=True, keep_store=True)
                command = _command_time(out)
                return seconds, rss, out, command, None if command is None else seconds - command
            # The median run by overhead (the build's time beyond the command's own).
            run, overhead_range = median_run(run_once, key=lambda r: r[4] if r[4] is not None
                                             else r[0])
            rows.append(dict(workload=name, tool=t.name, cold=run[0], cached=None, rss=run[1],
                             floor=fl, command=run[3], overhead=run[4],
                             ranges=dict(overhead=overhead_range)))
    elif name.startswith("run-"):
        n = int(name.split("-")[1])
        ctx = many_runs(work, n)
        for t in tools:
            try:
                cold, rss, out, _ = t.build(ctx, f"bench-{name}", cold=True)
                rows.append(dict(workload=name, tool=t.name, cold=cold, cached=None, rss=rss,
                                 steps=_step_times(out),
                                 in_turns=depth_in_turns(t, work, n, _window(n + 1))))
            except RuntimeError as e:
                rows.append(dict(workload=name, tool=t.name, cold=None, cached=None, rss=None,
                                 error=str(e).strip().splitlines()[-1][:70]))
    return rows


def median_run(measure, key=lambda run: run[0]) -> tuple[tuple, tuple[float, float]]:
    """Run `measure()` REPEAT times: (the run whose `key` is the median, (lowest, highest)).

    This machine's timings vary by a third from one run to the next (its
    disk, and memory the VM host hands back lazily); one run says little.
    """
    runs = sorted((measure() for _ in range(REPEAT)), key=key)
    return runs[(len(runs) - 1) // 2], (key(runs[0]), key(runs[-1]))


def _command_time(out: str) -> float | None:
    for line in out.splitlines():
        words = line.replace("#", " ").split()
        if "real" in words:
            try:
                return float(words[words.index("real") + 1])
            except (ValueError, IndexError):
                pass
    return None


def _step_times(out: str) -> dict:
    """pybuild's plain output: `#N DONE 0.1s` per step."""
    times = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "DONE" and parts[0].startswith("#"):
            times[int(parts[0][1:])] = float(parts[2].rstrip("s"))
    return times


def print_table(rows: list[dict]) -> None:
    header = ["workload", "tool", "cold s", "cached s", "vs best peer", "vs floor", "peak RSS MB", "note"]
    lines = [header]
    for r in rows:
        peers = [p for p in rows if p["workload"] == r["workload"] and p["tool"] != r["tool"]]
        key = "cached" if r.get("cached") is not None else "cold"
        best = min((p[key] for p in peers if p.get(key) is not None), default=None)
        mine = r.get(key)
        vs_peer = f"{mine / best:.2f}x" if best and mine is not None else "-"
        fl = r.get("floor")
        value = r.get("overhead") if r.get("overhead") is not None else r.get("cold")
        vs_floor = f"{value / fl:.2f}x" if fl and value is not None else "-"
        notes = [r["error"]] if r.get("error") else []
        if fl:
            notes.append(f"floor {fl:.2f}s")
        if r.get("cp_a") is not None:
            notes.append(f"cp -a {r['cp_a']:.2f}s ({r['cp_a'] / fl:.2f}x the floor)")
        if r.get("cpu"):
            # What the 2.5x-the-floor target asks of two cores: the cold build's CPU time
            # beside the floor's and cp -a's (a COPY that stores files cannot spend less).
            notes.append("CPU s: build {build:.2f}, floor {floor:.2f}, cp -a {cp_a:.2f}"
                         .format(**r["cpu"]))
        if r.get("command") is not None:
            notes.append(f"command {r['command']:.2f}s, overhead {r['overhead']:.2f}s")
        if r.get("step") is not None:
            notes.append(f"COPY step {r['step']:.2f}s")
        if r.get("steps_in_order") and len(r["steps_in_order"]) > 1:
            notes.append("in build order " + " / ".join(f"{x:.2f}" for x in r["steps_in_order"])
                         + "s (the first also writes the base layer's tar)")
        if REPEAT > 1:
            notes += [f"{what} {lo:.2f}-{hi:.2f}s" for what, (lo, hi) in r.get("ranges", {}).items()]
        note = ", ".join(notes)
        if r.get("steps"):
            steps = r["steps"]
            last = max(steps)
            k = _window(last)
            early = [steps[i] for i in range(6, 6 + k) if i in steps]
            late = [steps[i] for i in range(last - k + 1, last + 1) if i in steps]
            e, l_ = sum(early) / len(early), sum(late) / len(late)
            note = (f"RUN steps 5-{4 + k}: {e * 1000:.0f} ms each, last {k}: {l_ * 1000:.0f} ms "
                    f"each ({l_ / e:.2f}x) in the cold build")
            if r.get("in_turns"):
                e, l_ = r["in_turns"]
                note += (f"; in turns ({DEPTH_PAIRS} builds each): {e * 1000:.1f} ms, "
                         f"{l_ * 1000:.1f} ms ({l_ / e:.2f}x)")
        lines.append([r["workload"], r["tool"], _f(r.get("cold")), _f(r.get("cached")), vs_peer,
                      vs_floor, f"{r['rss'] / 1024:.0f}" if r.get("rss") and
                      r["tool"].startswith("pybuild")
                      else "-", note])
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(header))]
    for l in lines:
        print("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(l)).rstrip())


def _window(last: int) -> int:
    """Steps in each window of a many-step build whose last step is #`last`: a tenth of its
    steps, at least 10 (single steps vary by +-30 %)."""
    return max(10, (last - 1) // 10)


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
