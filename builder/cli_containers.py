"""Commands for containers and the store's usage: run, create, start, cp, export, wait, exec,
ps, stop, kill, rm, diff, commit, logs, system df, info. (cli.py holds the parser and the image
commands.)"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_format import ago, listing, refuse_terminal, table
from .errors import PybuildError, UsageError


def store_of(args):
    from .store import Store
    return Store(getattr(args, "root", None), driver=getattr(args, "storage_driver", None))


# ---- arguments ----------------------------------------------------------------------------

def args_run(s: argparse.ArgumentParser) -> None:
    s.add_argument("-d", "--detach", action="store_true",
                   help="run in the background and print the container ID")
    s.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    s.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    s.add_argument("--name", metavar="NAME", help="name the container")
    s.add_argument("--rm", action="store_true", help="remove the container when it exits")
    s.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]")
    s.add_argument("-u", "--user", metavar="USER[:GROUP]")
    s.add_argument("-w", "--workdir", metavar="DIR")
    s.add_argument("--entrypoint", metavar="CMD")
    s.add_argument("--network", choices=("host", "none"), default="host")
    _volume_option(s)
    s.add_argument("image", metavar="IMAGE", help="name[:tag] or image ID")
    s.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER,
                   help="the command (default: the image's Entrypoint and Cmd)")


def _volume_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:PATH[:ro]",
                   help="bind-mount the directory (or file) HOST of this machine at PATH "
                        "(made if missing; ro: read-only)")


def args_create(s: argparse.ArgumentParser) -> None:
    s.add_argument("--name", metavar="NAME", help="name the container")
    s.add_argument("--network", choices=("host", "none"), default="host",
                   help="what it runs with when started")
    _volume_option(s)
    s.add_argument("-i", "--interactive", action="store_true", help="accepted, as Docker's")
    s.add_argument("-t", "--tty", action="store_true", help="accepted, as Docker's")
    s.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]")
    s.add_argument("-u", "--user", metavar="USER[:GROUP]")
    s.add_argument("-w", "--workdir", metavar="DIR")
    s.add_argument("--entrypoint", metavar="CMD")
    s.add_argument("image", metavar="IMAGE", help="name[:tag] or image ID")
    s.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER,
                   help="the command (default: the image's Entrypoint and Cmd)")


def args_start(s: argparse.ArgumentParser) -> None:
    s.add_argument("-a", "--attach", action="store_true",
                   help="in the foreground, with this terminal; exit with the command's status")
    s.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    s.add_argument("containers", metavar="CONTAINER", nargs="+")


def args_cp(s: argparse.ArgumentParser) -> None:
    s.add_argument("-a", "--archive", action="store_true",
                   help="keep the files' owners (default: yours here, root in a container)")
    s.add_argument("-L", "--follow-link", action="store_true",
                   help="copy what SRC points to if it is a symlink")
    s.add_argument("-q", "--quiet", action="store_true", help="accepted, as Docker's")
    s.add_argument("src", metavar="SRC", help="CONTAINER:PATH, or a path on this machine "
                                              "(- : a tar on standard input)")
    s.add_argument("dest", metavar="DEST",
                   help="a path on this machine (- : a tar on standard output), or "
                        "CONTAINER:PATH of a stopped container")


def args_wait(s: argparse.ArgumentParser) -> None:
    s.add_argument("containers", metavar="CONTAINER", nargs="+")


def args_export(s: argparse.ArgumentParser) -> None:
    s.add_argument("-o", "--output", metavar="FILE", help="write the tar to FILE (default: "
                                                          "standard output, not a terminal)")
    s.add_argument("container", metavar="CONTAINER")


def args_exec(s: argparse.ArgumentParser) -> None:
    s.add_argument("-i", "--interactive", action="store_true", help="accepted (stdin is passed)")
    s.add_argument("-t", "--tty", action="store_true", help="accepted (the terminal is passed)")
    s.add_argument("-e", "--env", action="append", default=[], metavar="KEY[=VALUE]")
    s.add_argument("-u", "--user", metavar="USER[:GROUP]")
    s.add_argument("-w", "--workdir", metavar="DIR")
    s.add_argument("container", metavar="CONTAINER", help="name or ID")
    s.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER, help="the command")


def args_ps(s: argparse.ArgumentParser) -> None:
    s.add_argument("-a", "--all", action="store_true", help="also stopped containers")
    s.add_argument("-s", "--size", action="store_true",
                   help="SIZE: the writable layer; virtual: it and the image's layers")
    s.add_argument("-q", "--quiet", action="store_true", help="only container IDs")
    s.add_argument("--no-trunc", action="store_true", help="full IDs and commands")
    s.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="status=created|running|exited, name=TEXT, id=PREFIX, "
                        "ancestor=IMAGE, exited=CODE (one key's values: any; keys: all)")
    s.add_argument("--format", metavar="TEMPLATE",
                   help="Go-template subset: 'table {{.ID}}\\t{{.Names}}\\t{{.Size}}'")


def args_stop(s: argparse.ArgumentParser) -> None:
    s.add_argument("-t", "--time", type=float, default=10, metavar="SECONDS",
                   help="wait this long after SIGTERM before SIGKILL (default 10)")
    s.add_argument("containers", metavar="CONTAINER", nargs="+")


def args_kill(s: argparse.ArgumentParser) -> None:
    s.add_argument("-s", "--signal", default="KILL", metavar="SIGNAL",
                   help="the signal, by name (KILL, SIGTERM) or number (default KILL)")
    s.add_argument("containers", metavar="CONTAINER", nargs="+")


def args_rm(s: argparse.ArgumentParser) -> None:
    s.add_argument("-f", "--force", action="store_true", help="stop running ones first")
    s.add_argument("containers", metavar="CONTAINER", nargs="+")


def args_diff(s: argparse.ArgumentParser) -> None:
    s.add_argument("container", metavar="CONTAINER")


def args_commit(s: argparse.ArgumentParser) -> None:
    s.add_argument("-m", "--message", default="", metavar="TEXT", help="the history comment")
    s.add_argument("-a", "--author", default="", metavar="NAME")
    s.add_argument("container", metavar="CONTAINER")
    s.add_argument("name", metavar="NAME[:TAG]", nargs="?")


def args_logs(s: argparse.ArgumentParser) -> None:
    s.add_argument("-f", "--follow", action="store_true",
                   help="keep printing what it prints until it stops")
    s.add_argument("-n", "--tail", metavar="N", default="all",
                   help="only the last N lines (default: all)")
    s.add_argument("container", metavar="CONTAINER")


def args_system(s: argparse.ArgumentParser) -> None:
    s.add_argument("action", choices=("df", "info", "prune"),
                   help="df: disk usage; info: as pybuild info; prune: stopped containers, "
                        "untagged images (-a: every image no container uses) and the build cache")
    s.add_argument("-v", "--verbose", action="store_true", help="df: per image, container, "
                                                                 "volume and cache entry")
    s.add_argument("-a", "--all", action="store_true",
                   help="prune: every image no container uses, tagged or not")
    s.add_argument("-f", "--force", action="store_true",
                   help="prune: do not ask (pybuild never asks; accepted as Docker's)")
    s.add_argument("--volumes", action="store_true",
                   help="prune: accepted as Docker's (cache mounts nothing holds go anyway)")
    # (`container prune` and `image prune` are `system prune` with only their part.)
    s.add_argument("--only", choices=("containers", "images"), help=argparse.SUPPRESS)
    s.add_argument("--filter", action="append", default=[], metavar="until=WHEN",
                   help="prune: only what was made (cache: last used) before WHEN: a duration "
                        "ago (24h), a Unix time or an RFC 3339 time")


def args_info(s: argparse.ArgumentParser) -> None:
    pass


COMMANDS = {
    "run": ("run a command in a new container of an image", args_run),
    "create": ("make a container of an image without running it (for cp, diff, commit)",
               args_create),
    "start": ("run a created or stopped container again, in its writable layer", args_start),
    "cp": ("copy files out of a container, or into a stopped one (as `docker cp`)", args_cp),
    "export": ("a container's whole filesystem as a tar (as `docker export`)", args_export),
    "wait": ("wait until containers stop; print their exit codes", args_wait),
    "exec": ("run a command in a running container", args_exec),
    "ps": ("list containers", args_ps),
    "stop": ("stop running containers", args_stop),
    "kill": ("send a signal to running containers (default SIGKILL)", args_kill),
    "rm": ("remove containers", args_rm),
    "diff": ("list what a container changed (A added, C changed, D deleted)", args_diff),
    "commit": ("make an image of a container's changes", args_commit),
    "logs": ("show what a detached container printed", args_logs),
    "system": ("disk usage (df) and facts (info)", args_system),
    "info": ("the storage driver, store, and counts and sizes of what it holds", args_info),
}

# `pybuild image ls`, `pybuild container rm`, ... as Docker's grouped commands.
GROUPS = {
    "image": {"ls": "images", "list": "images", "history": "history", "inspect": "inspect",
              "rm": "rmi", "tag": "tag", "save": "save", "load": "load", "import": "import",
              "pull": "pull", "push": "push", "build": "build",
              "prune": ("system", "prune", "--only=images")},
    "container": {"ls": "ps", "list": "ps", "run": "run", "create": "create", "cp": "cp",
                  "start": "start", "export": "export", "wait": "wait", "kill": "kill",
                  "exec": "exec", "stop": "stop",
                  "rm": "rm", "diff": "diff", "commit": "commit", "logs": "logs",
                  "inspect": "inspect", "prune": ("system", "prune", "--only=containers")},
    "builder": {"build": "build", "prune": "prune"},
}


# ---- commands ----------------------------------------------------------------------------

def cmd_run(args) -> int:
    from . import container
    store = store_of(args)
    img = store.resolve(args.image)
    volumes = [container.parse_volume(v) for v in args.volume]
    result = container.run(store, img, args.image, args.args, env=args.env, user=args.user,
                           workdir=args.workdir, network=args.network,
                           entrypoint=args.entrypoint, name=args.name, detach=args.detach,
                           interactive=args.interactive, tty=args.tty, remove=args.rm,
                           volumes=volumes)
    if args.detach:
        print(result)
        return 0
    return result


def cmd_create(args) -> int:
    from . import container
    store = store_of(args)
    volumes = [container.parse_volume(v) for v in args.volume]
    c = container.create(store, store.resolve(args.image), args.image, args.args, env=args.env,
                         user=args.user, workdir=args.workdir, entrypoint=args.entrypoint,
                         name=args.name, network=args.network, volumes=volumes)
    print(c.id)
    return 0


def cmd_start(args) -> int:
    from . import container
    if args.attach and len(args.containers) > 1:
        raise UsageError("pybuild start -a takes one container",
                         hint="start the others without -a")
    store = store_of(args)
    for ref in args.containers:
        code = container.start(store, ref, attach=args.attach, interactive=args.interactive)
        if args.attach:
            return code
        print(ref)
    return 0


def cmd_cp(args) -> int:
    from .container_cp import copy_in, copy_out, split_container_path
    src, dest = split_container_path(args.src), split_container_path(args.dest)
    if src is not None and dest is not None:
        raise UsageError("pybuild cp: copying between containers is not supported",
                         hint="copy out to a directory here, then into the other")
    if src is None and dest is None:
        raise UsageError("pybuild cp: SRC or DEST must be CONTAINER:PATH",
                         hint="pybuild cp CONTAINER:/path/in/it ./here")
    if dest is not None:
        copy_in(store_of(args), args.src, dest[0], dest[1], follow=args.follow_link,
                archive=args.archive)
    else:
        copy_out(store_of(args), src[0], src[1], args.dest, follow=args.follow_link,
                 archive=args.archive)
    return 0


WAIT_FOR_MONITOR = 3.0      # seconds: a stopped container's exit code, recorded by its monitor


def cmd_wait(args) -> int:
    """`docker wait`: each container's exit code once it has stopped (a CI job that started
    its tests detached). A container that never ran is waited for as Docker does."""
    import time
    from .containers import Containers
    containers = Containers(store_of(args))
    for ref in args.containers:
        c = containers.get(ref)
        gone_since = None
        while (c := containers._load(c.id) or c).status != "exited":
            if c.status == "running" and not c.running():
                # Its process is gone: its monitor records the exit code a moment later,
                # unless it died with it (kill -9), which a few seconds tell.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > WAIT_FOR_MONITOR:
                    break
            time.sleep(0.05)
        print(137 if c.exit_code is None else c.exit_code)
    return 0


def cmd_export(args) -> int:
    from .container_cp import export
    store = store_of(args)
    if args.output is None:
        refuse_terminal("use -o FILE, or redirect it")
        sys.stdout.flush()
        export(store, args.container, sys.stdout.fileno())
        return 0
    from .outputs import write_output

    def fill(f) -> None:
        f.flush()
        export(store, args.container, f.fileno())
    write_output(args.output, fill)       # (whole or not at all; a pipe written as it is)
    return 0


def cmd_exec(args) -> int:
    from . import container
    if not args.args:
        raise UsageError("pybuild exec: give the command to run", hint="pybuild exec NAME sh")
    return container.exec_in(store_of(args), args.container, args.args, env=args.env,
                             user=args.user, workdir=args.workdir)


def _command_text(argv: list[str], full: bool) -> str:
    text = '"' + " ".join(argv) + '"'
    return text if full or len(text) <= 22 else text[:21] + '…"'


def cmd_ps(args) -> int:
    from .containers import Containers
    from .progress import human_size
    store = store_of(args)
    containers = Containers(store)
    wanted = _ps_filters(store, args.filter)
    # (A status asked for is looked for among stopped containers too, as Docker does.)
    listed = [c for c in containers.list(all=args.all or "status" in wanted or
                                         "exited" in wanted)
              if _ps_matches(c, wanted)]
    if args.quiet:
        for c in listed:
            print(c.id if args.no_trunc else c.short_id)
        return 0
    rows = []
    for c in listed:
        row = {"ID": c.id if args.no_trunc else c.short_id, "Image": c.image,
               "Command": _command_text(c.argv, args.no_trunc),
               "CreatedAt": ago(c.created), "RunningFor": ago(c.created).removesuffix(" ago"),
               "Status": containers.status_text(c), "Ports": "", "Names": c.name}
        if args.size or (args.format and ".Size" in args.format):
            size = containers.size(c)
            virtual = size + store.content_size(c.diff_ids)
            row["Size"] = f"{human_size(size)} (virtual {human_size(virtual)})"
        rows.append(row)
    headers = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND",
               "CreatedAt": "CREATED", "RunningFor": "CREATED", "Status": "STATUS",
               "Ports": "PORTS", "Names": "NAMES", "Size": "SIZE"}
    print(listing(rows, headers, ["ID", "Image", "Command", "CreatedAt", "Status", "Ports",
                                  "Names"] + (["Size"] if args.size else []), args.format))
    return 0


_PS_FILTERS = ("status", "name", "id", "ancestor", "exited")


def _ps_filters(store, specs: list[str]) -> dict[str, list[str]]:
    """`-f KEY=VALUE` of `pybuild ps`, by key (as `docker ps -f`); an ancestor given by a
    name or ID the store knows is also taken as its image ID (resolved once, here)."""
    wanted: dict[str, list[str]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        if not eq or key not in _PS_FILTERS:
            raise UsageError(f"ps --filter {spec!r}: not a filter pybuild has",
                             hint="status=..., name=..., id=..., ancestor=..., exited=CODE")
        wanted.setdefault(key, []).append(value)
        if key == "ancestor":
            try:
                wanted[key].append(store.resolve(value).id)
            except PybuildError:
                pass
    return wanted


def _ps_matches(c, wanted: dict[str, list[str]]) -> bool:
    status = "running" if c.running() else ("created" if c.status == "created" else "exited")
    tests = {
        "status": lambda v: v == status,
        "name": lambda v: v in c.name,
        "id": lambda v: c.id.startswith(v.lower()),
        "ancestor": lambda v: v in (c.image, c.image_id, c.image_id[7:19]),
        "exited": lambda v: status == "exited" and str(c.exit_code) == v,
    }
    return all(any(tests[key](v) for v in values) for key, values in wanted.items())


def cmd_stop(args) -> int:
    from .containers import Containers
    containers = Containers(store_of(args))
    for ref in args.containers:
        c = containers.get(ref)
        containers.stop(c, timeout=args.time)
        print(ref)
    return 0


def cmd_kill(args) -> int:
    import signal
    from .containers import Containers
    name = args.signal.upper()
    try:
        sig = int(name) if name.isdigit() else \
            signal.Signals[name if name.startswith("SIG") else "SIG" + name].value
    except KeyError:
        raise UsageError(f"--signal {args.signal}: not a signal", hint="KILL, TERM, HUP, 9, ...") \
            from None
    containers = Containers(store_of(args))
    for ref in args.containers:
        containers.kill(containers.get(ref), sig)
        print(ref)
    return 0


def cmd_rm(args) -> int:
    from .containers import Containers
    containers = Containers(store_of(args))
    for ref in args.containers:
        containers.remove(containers.get(ref), force=args.force)
        print(ref)
    return 0


def cmd_diff(args) -> int:
    from .containers import Containers, changes
    store = store_of(args)
    containers = Containers(store)
    c = containers.get(args.container)
    with containers.writable_layer(c) as layer:
        for kind, path in changes(store, c.diff_ids, layer):
            print(f"{kind} {path}")
    return 0


def cmd_commit(args) -> int:
    from . import container
    image = container.commit(store_of(args), args.container, args.name, args.message, args.author)
    print(image.id)
    return 0


def cmd_logs(args) -> int:
    import time
    from .containers import Containers
    if args.tail != "all" and not args.tail.isdigit():
        raise UsageError(f"--tail {args.tail}: give a number of lines, or all")
    containers = Containers(store_of(args))
    c = containers.get(args.container)
    out = sys.stdout.buffer
    try:
        f = open(os.path.join(c.dir, "log"), "rb")
    except FileNotFoundError:
        if not args.follow:
            return 0
        f = None
    with f or open(os.devnull, "rb") as log:
        data = log.read()
        if args.tail != "all":
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[len(lines) - int(args.tail):]) if int(args.tail) else b""
        out.write(data)
        out.flush()
        # -f: what it prints next, until it has stopped and everything is out (as docker's).
        while args.follow:
            running = (containers._load(c.id) or c).running()
            more = log.read()
            if more:
                out.write(more)
                out.flush()
            elif not running:
                break
            else:
                time.sleep(0.1)
    return 0


def cmd_system(args) -> int:
    if args.action == "info":
        return cmd_info(args)
    if args.action == "prune":
        return _system_prune(args)
    from . import usage
    from .progress import human_size
    store = store_of(args)
    report = usage.disk_usage(store)
    if not args.verbose:
        rows = [["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]]
        for kind in report.summary:
            pct = f" ({kind.reclaimable * 100 // kind.size}%)" if kind.size else ""
            rows.append([kind.name, str(kind.total), str(kind.active), human_size(kind.size),
                         human_size(kind.reclaimable) + pct])
        print(table(rows))
        return 0
    print("Images space usage:\n")
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE",
             "CONTAINERS"]]
    for i in report.images:
        rows.append([i.repository, i.tag, i.id[7:19], ago(i.created), human_size(i.size),
                     human_size(i.shared), human_size(i.size - i.shared), str(i.containers)])
    print(table(rows))
    print("\nContainers space usage:\n")
    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "LOCAL VOLUMES", "SIZE", "CREATED", "STATUS",
             "NAMES"]]
    for c in report.containers:
        rows.append([c.short_id, c.image, _command_text(c.argv, False), "0",
                     human_size(c.size), ago(c.created), c.status_text, c.name])
    print(table(rows))
    print("\nLocal Volumes space usage:\n")
    rows = [["VOLUME NAME", "LINKS", "SIZE"]]
    for v in report.volumes:
        rows.append([v.name, "0", human_size(v.size)])
    print(table(rows))
    print("\nBuild cache usage: " + human_size(report.summary[-1].size) + "\n")
    rows = [["CACHE ID", "CACHE TYPE", "SIZE", "CREATED", "LAST USED", "USAGE", "SHARED"]]
    for e in report.cache:
        rows.append([e.id, e.kind, human_size(e.size), ago(e.created), ago(e.last_used), "1",
                     "true" if e.shared else "false"])
    print(table(rows))
    return 0


def cmd_info(args) -> int:
    import platform
    from . import __version__, usage
    from .progress import human_size
    store = store_of(args)
    report = usage.disk_usage(store)
    images, containers, volumes, cache = report.summary
    running = sum(1 for c in report.containers if c.running)
    layers = store.layers.list()
    lines = [
        f"Containers: {containers.total}",
        f" Running: {running}",
        f" Stopped: {containers.total - running}",
        f"Images: {images.total}",
        f"Storage Driver: {store.driver}",
        f" Backing Filesystem: {usage.filesystem_type(store.root)}",
        f" Layers: {len(layers)} ({human_size(report.layer_bytes)})",
        f" Build Cache: {cache.total} entries ({human_size(cache.size)})",
        f" Cache Mounts: {volumes.total} ({human_size(volumes.size)})",
        f"Pybuild Root Dir: {store.root}",
        f"Pybuild Version: {__version__}",
        f"Kernel Version: {platform.release()}",
        f"Architecture: {platform.machine()}",
    ]
    print("\n".join(lines))
    return 0


def _system_prune(args) -> int:
    """`docker system prune [-a]`: stopped containers, then the images no container left
    uses (untagged ones, or with -a all of them), then the build cache and whatever nothing
    needs any more (as `pybuild prune`). Run by CI jobs when they are done."""
    from .cache import StepCache
    from .containers import Containers
    from .store import gc
    from .progress import human_size
    from .cli_format import _rfc3339, prune_cutoff
    cutoff = prune_cutoff(args.filter)

    def old_enough(created) -> bool:
        if cutoff is None:
            return True
        if isinstance(created, str):
            parsed = _rfc3339(created)
            created = parsed.timestamp() if parsed is not None else 0.0
        return created < cutoff
    store = store_of(args)
    containers = Containers(store)
    if args.only != "images":
        stopped = [c for c in containers.list() if not c.running() and old_enough(c.created)]
        for c in stopped:
            containers.remove(c)
        if stopped:
            print("Deleted Containers:\n" + "\n".join(c.id for c in stopped) + "\n")
    if args.only != "containers":
        used = {c.image_id for c in containers.list()}
        lines = []
        for img in store.images():
            if img.id in used or (img.tags and not args.all) or not old_enough(img.created):
                continue
            lines += [f"untagged: {t}" for t in store.remove_manifest(img.digest)]
            lines.append(f"deleted: {img.id}")
        if lines:
            print("Deleted Images:\n" + "\n".join(lines) + "\n")
    if args.only is None:
        print_pruned(gc.prune(store, StepCache(store), used_before=cutoff))
    else:
        # (Only the layers and blobs nothing needs now: the build cache is `builder prune`'s.)
        print(f"Total reclaimed space: {human_size(gc.collect(store, StepCache(store)).bytes)}")
    return 0


def print_pruned(result) -> None:
    """What a prune (gc.Pruned) removed, and, if a build held the store, what waits."""
    from .progress import human_size
    c = result.collected
    print(f"Deleted {result.entries} cache entries, {c.layers} layers, {c.blobs} blobs"
          + (f", {result.mounts} cache mounts" if result.mounts else ""))
    print(f"Total reclaimed space: {human_size(c.bytes)}")
    if c.deferred:
        print("note: a build is using the store; the layers, blobs and cache mounts nothing "
              "needs now will be removed by a later prune or rmi", file=sys.stderr)
