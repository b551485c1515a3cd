"""The `pybuild` command: arguments -> library calls; errors -> one clear message and an exit code.

`pybuild -t NAME -f Dockerfile CONTEXT` is `pybuild build ...`: when the
first word is not a command, the command is build. Exit codes come from the
error tree (errors.py); a traceback is shown only with `--debug`.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import signal
import sys

from . import __version__
from . import cli_build, cli_containers, rootless
from .cli_build import insecure_option
from .cli_containers import store_of
from .cli_format import ago, docker_time, listing, parse_size, refuse_terminal
from .errors import Interrupted, PybuildError, UsageError, os_error_hint, os_error_text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations, as Docker's CLI has none: `--compress` (docker build's) must not
        # be taken for --compression, nor a misspelt option for another one.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")

    def _get_formatter(self):
        # argparse makes a formatter for every argument it is given (to check its metavar),
        # and each one without a width asks the terminal for its size, the first importing
        # shutil (and bz2 and lzma with it) to do so: 40 arguments of `build` and those
        # imports were a few milliseconds of a fully cached build's 80.
        if self.formatter_class is argparse.HelpFormatter:
            return argparse.HelpFormatter(prog=self.prog, width=_help_width())
        return super()._get_formatter()


@functools.cache
def _help_width() -> int:
    """The width argparse would give help text (shutil.get_terminal_size's columns, less 2),
    worked out once."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns - 2


def _common(p: argparse.ArgumentParser, *, top: bool = False) -> None:
    default = None if top else argparse.SUPPRESS
    p.add_argument("--root", metavar="DIR", default=default,
                   help="the store (default: $PYBUILD_ROOT or /var/lib/pybuild)")
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show Python tracebacks for errors")
    p.add_argument("--storage-driver", choices=("overlay", "fuse", "vfs"), default=default,
                   help="for a new store (default: $PYBUILD_STORAGE_DRIVER, or the first that "
                        "works here); an existing store keeps its own")


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, just that command's options are set up.

    Building every subcommand's parser costs milliseconds (argparse translates
    each help text and asks for the terminal's size), which a fully cached
    build should not pay: 25 parsers were 14 ms of its 90. `only` must be a
    command's name; the others are then not even known to this parser.
    """
    p = _Parser(prog="pybuild", description="Build OCI images from Dockerfiles, without a daemon.")
    _common(p, top=True)
    p.add_argument("--version", action="version", version=f"pybuild {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_args) in _COMMANDS.items():
        if only is None or only == name:
            s = sub.add_parser(name, help=help_text)
            _common(s)
            add_args(s)
    return p


def _args_pull(s: argparse.ArgumentParser) -> None:
    s.add_argument("name", metavar="NAME[:TAG|@DIGEST]",
                   help="the image (docker.io/library/ and :latest by default)")
    _transfer_options(s, quiet="print only the image ID")


def _args_push(s: argparse.ArgumentParser) -> None:
    s.add_argument("name", metavar="IMAGE", help="name[:tag] or image ID in the store")
    s.add_argument("dest", metavar="DEST", nargs="?",
                   help="where to push (default: the image's name)")
    s.add_argument("--chunk-size", metavar="SIZE", default="0",
                   help="upload layers in chunks of SIZE (default: one request per layer)")
    _transfer_options(s, quiet="print only the manifest digest")


def _transfer_options(s: argparse.ArgumentParser, quiet: str) -> None:
    """-q, --progress and --insecure-registry, as pull and push take them."""
    s.add_argument("-q", "--quiet", action="store_true", help=quiet)
    s.add_argument("--progress", choices=("auto", "tty", "plain", "json", "quiet"), default="auto",
                   help="how to show progress (auto: bars on a terminal, else plain lines)")
    insecure_option(s)


def _args_login(s: argparse.ArgumentParser) -> None:
    s.add_argument("registry", metavar="REGISTRY", nargs="?", default="docker.io")
    s.add_argument("-u", "--username", metavar="USER")
    s.add_argument("-p", "--password", metavar="PASSWORD",
                   help="the password (prefer --password-stdin: a command line is visible)")
    s.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    insecure_option(s)


def _args_logout(s: argparse.ArgumentParser) -> None:
    s.add_argument("registry", metavar="REGISTRY", nargs="?", default="docker.io")


def _args_images(s: argparse.ArgumentParser) -> None:
    s.add_argument("reference", metavar="REPOSITORY[:TAG]", nargs="?",
                   help="only the images of this repository (and tag); * and ? match any text")
    s.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    s.add_argument("-a", "--all", action="store_true",
                   help="accepted as Docker's (pybuild keeps no intermediate images)")
    s.add_argument("--no-trunc", action="store_true", help="full image IDs")
    s.add_argument("--digests", action="store_true",
                   help="a DIGEST column: the manifest digest the repository's registry holds "
                        "(recorded by push and pull), else the store's")
    s.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="dangling=true (untagged images only) or false, reference=PATTERN "
                        "(as REPOSITORY[:TAG])")
    s.add_argument("--format", metavar="TEMPLATE",
                   help="Go-template subset: 'table {{.Repository}}\\t{{.Tag}}\\t{{.ID}}', "
                        "fields ID, Repository, Tag, Digest, CreatedSince, CreatedAt, Size")


def _args_history(s: argparse.ArgumentParser) -> None:
    s.add_argument("image", metavar="IMAGE", help="name[:tag] or image ID")
    s.add_argument("--no-trunc", action="store_true", help="do not shorten the output")
    s.add_argument("-q", "--quiet", action="store_true", help="only the image IDs")
    s.add_argument("-H", "--human", default="true", metavar="BOOL",
                   help="sizes and dates in human form (default true; false: bytes, RFC 3339)")
    s.add_argument("--format", metavar="TEMPLATE",
                   help="Go-template subset, fields ID, CreatedSince, CreatedAt, CreatedBy, "
                        "Size, Comment; json: each entry as JSON")


def _args_inspect(s: argparse.ArgumentParser) -> None:
    s.add_argument("images", metavar="NAME", nargs="+",
                   help="an image (name[:tag] or ID) or a container (name or ID)")
    s.add_argument("-f", "--format", metavar="TEMPLATE",
                   help="Go-template subset: '{{json .RootFS.Layers}}', "
                        "'{{index .RepoTags 0}}', '{{index .Config.Labels \"key\"}}'")


def _args_tag(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", metavar="SOURCE", help="an image: name[:tag] or image ID")
    s.add_argument("target", metavar="TARGET", help="the new name[:tag]")


def _args_rmi(s: argparse.ArgumentParser) -> None:
    s.add_argument("images", metavar="IMAGE", nargs="+",
                   help="name[:tag] (removes that tag) or image ID")
    s.add_argument("-f", "--force", action="store_true",
                   help="remove an image given by ID even if it has several tags")


def _args_save(s: argparse.ArgumentParser) -> None:
    s.add_argument("images", metavar="IMAGE", nargs="+", help="the images to write")
    s.add_argument("-o", "--output", metavar="FILE", help="write to FILE (default: standard output)")


def _args_load(s: argparse.ArgumentParser) -> None:
    s.add_argument("-i", "--input", metavar="FILE", default="-",
                   help="read FILE (default: standard input)")
    s.add_argument("-q", "--quiet", action="store_true")


def _args_import(s: argparse.ArgumentParser) -> None:
    s.add_argument("file", metavar="FILE", help="the tarball (- for standard input)")
    s.add_argument("name", metavar="NAME[:TAG]", nargs="?", help="tag the new image")


def _args_version(s: argparse.ArgumentParser) -> None:
    pass


def _args_prune(s: argparse.ArgumentParser) -> None:
    s.add_argument("--keep-storage", metavar="SIZE",
                   help="keep the most recently used cache up to SIZE (e.g. 500MB, 2GB)")
    # What CI scripts pass to `docker builder prune`: without --keep-storage, every cache
    # entry goes anyway, and pybuild never asks before removing.
    s.add_argument("-a", "--all", action="store_true",
                   help="remove all build cache (what prune does without --keep-storage)")
    s.add_argument("-f", "--force", action="store_true",
                   help="do not ask (pybuild never asks; accepted as Docker's)")
    s.add_argument("--filter", action="append", default=[], metavar="until=WHEN",
                   help="only entries last used before WHEN: a duration ago (24h, 90m), a Unix "
                        "time or an RFC 3339 time")


_COMMANDS = {
    **cli_build.COMMANDS,
    "images": ("list the images in the store", _args_images),
    "history": ("show the history of an image", _args_history),
    "inspect": ("show images or containers as JSON", _args_inspect),
    "tag": ("give an image another name", _args_tag),
    "rmi": ("remove images", _args_rmi),
    "save": ("write images to a tar (docker-archive and OCI layout in one)", _args_save),
    "load": ("load images from a docker-archive or OCI archive", _args_load),
    "import": ("make a one-layer image of a root filesystem tarball", _args_import),
    "pull": ("pull an image from a registry", _args_pull),
    "push": ("push an image to a registry", _args_push),
    "login": ("keep credentials for a registry (in ~/.docker/config.json, as Docker does)",
              _args_login),
    "logout": ("forget the credentials for a registry", _args_logout),
    "prune": ("remove build cache and layers nothing needs", _args_prune),
    "version": ("print the version", _args_version),
    **cli_containers.COMMANDS,
}

def run() -> None:
    """The `pybuild` command (and `python -m builder`): main(), then leave at once.

    Tearing the interpreter down frees every object one by one, and after a
    build that forked its sandboxes each page it touches is a copy-on-write
    fault first: 0.04 s of a 30,000-file COPY's 1.4 s. Nothing is left for
    it to do: files are written under `with` and closed, the threads still
    alive are daemons that have finished (a build waits for them), and the
    store's locks are descriptors the kernel releases. Only what is buffered
    for stdout and stderr is flushed here.
    """
    code = main() or 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:       # (`pybuild images | head`)
        code = code or 141
    except OSError:
        code = code or 1
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if rootless.needed() and not {"-h", "--help", "--version", "version"} & set(argv[:1]):
            rootless.enter()          # a non-root user: root of a user namespace of its own
        args = _parse(argv)
        debug = args.debug
        if debug:
            os.environ["PYBUILD_DEBUG_SANDBOX"] = "1"     # sandbox setup errors: tracebacks too
        return _dispatch(args)
    except KeyboardInterrupt:
        _say(f"error: {Interrupted()}")
        return Interrupted.exit_code
    except PybuildError as e:
        if debug:
            _print_traceback()
        _say(f"error: {e}")
        return e.exit_code
    except BrokenPipeError:
        return 141
    except OSError as e:
        # The system said no (a full disk, a read-only or missing path): say what and where.
        if debug:
            _print_traceback()
        hint = os_error_hint(e.errno)
        _say(f"error: {os_error_text(e)}" + (f"\n  hint: {hint}" if hint else ""))
        return 1
    except RecursionError:
        # Builds, drivers and the store walk trees without recursion (trees.py); this is
        # the safety net for whatever still recurses (os.makedirs, for one).
        if debug:
            _print_traceback()
        _say("error: a directory tree is nested too deeply to walk (more than about 900 levels)"
             "\n  hint: run again with --debug to see where, and report it")
        return 1
    except Exception:   # a bug in pybuild: one line, the traceback with --debug
        if debug:
            _print_traceback()
        else:
            exc = sys.exc_info()[1]
            _say(f"error: internal error: {exc!r}\n  hint: run again with --debug and report "
                 "the traceback")
        return 70


def _print_traceback() -> None:
    import traceback      # (only with --debug: it brings tokenize and linecache along)
    traceback.print_exc()




def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _say(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def _parse(argv: list[str]) -> argparse.Namespace:
    # Global options may come first: `pybuild --root DIR images`.
    i = 0
    while i < len(argv) and (argv[i] in ("--root", "--debug", "--storage-driver") or
                             argv[i].startswith(("--root=", "--storage-driver="))):
        i += 2 if argv[i] in ("--root", "--storage-driver") else 1
    rest = argv[i:]
    if not rest:
        make_parser().print_help(sys.stderr)
        raise UsageError("no command given", hint="for example: pybuild -t NAME -f Dockerfile .")
    if rest[0] in ("-h", "--help", "--version"):
        return make_parser().parse_args(argv)
    group = cli_containers.GROUPS.get(rest[0])
    if group is not None:
        # `pybuild image ls`, `pybuild container rm C`: Docker's grouped names for our commands.
        if len(rest) < 2 or rest[1] not in group:
            raise UsageError(f"pybuild {rest[0]}: expected one of: {', '.join(sorted(group))}")
        target = group[rest[1]]
        argv = argv[:i] + ([target] if isinstance(target, str) else list(target)) + rest[2:]
        rest = argv[i:]
    if rest[0] not in _COMMANDS:
        # `pybuild -t x -f Dockerfile .` is a build.
        argv = argv[:i] + ["build"] + rest
        rest = ["build"] + rest
    return make_parser(only=rest[0]).parse_args(argv)


def _dispatch(args) -> int:
    name = args.command.replace("-", "_")
    handler = (globals().get("_cmd_" + name) or getattr(cli_build, "cmd_" + name, None)
               or getattr(cli_containers, "cmd_" + name))
    return handler(args)


_IMAGE_HEADERS = {"Repository": "REPOSITORY", "Tag": "TAG", "ID": "IMAGE ID",
                  "CreatedSince": "CREATED", "Size": "SIZE", "Digest": "DIGEST",
                  "CreatedAt": "CREATED AT"}


def _cmd_images(args) -> int:
    from .image import short_id
    from .progress import human_size
    from .store import repo_digests
    store = store_of(args)
    wanted = _image_filter(args.reference, args.filter)
    rows, ids = [], []
    for img in sorted(store.images(), key=lambda i: i.created, reverse=True):
        iid = img.id if args.no_trunc else short_id(img.id)
        size = None
        for tag in img.tags or ["<none>:<none>"]:
            repo, _, t = tag.rpartition(":")
            if not wanted(repo, t, not img.tags):
                continue
            if iid not in ids:
                ids.append(iid)
            if size is None:
                size = human_size(store.content_size(img.diff_ids))
                pushed = repo_digests.of(store, img.id)
            # (As Docker's: the digest this repository's registry holds it by, when known.)
            held = [n.rpartition("@")[2] for n in pushed if n.rpartition("@")[0] == repo]
            rows.append({"Repository": repo, "Tag": t, "ID": iid,
                         "CreatedSince": ago(img.created), "Size": size,
                         "Digest": held[-1] if held else img.digest or "<none>",
                         "CreatedAt": docker_time(img.created)})
    if args.quiet:
        for iid in ids:
            print(iid)
    else:
        columns = ["Repository", "Tag", *(["Digest"] if args.digests else []), "ID",
                   "CreatedSince", "Size"]
        print(listing(rows, _IMAGE_HEADERS, columns, args.format))
    return 0


def _image_filter(reference: str | None, filters: list[str]):
    """A test of (repository, tag, untagged) for `pybuild images REF -f KEY=VALUE`, as
    Docker's: a reference's repository (and tag, if it has one) match as shell patterns,
    dangling images are the untagged ones."""
    references = [reference] if reference else []
    dangling = None
    for f in filters:
        key, sep, value = f.partition("=")
        if key == "reference" and sep:
            references.append(value)
        elif key == "dangling" and value.lower() in ("true", "1", "false", "0"):
            dangling = value.lower() in ("true", "1")
        else:
            raise UsageError(f"--filter {f}: not a filter pybuild knows",
                             hint="dangling=true|false or reference=REPOSITORY[:TAG]")
    patterns = []
    for ref in references:
        repo, colon, tag = ref.rpartition(":")
        if not colon or "/" in tag:          # (a registry's port, not a tag)
            repo, tag = ref, "*"
        patterns.append((repo, tag))

    def wanted(repo: str, tag: str, untagged: bool) -> bool:
        if dangling is not None and untagged != dangling:
            return False
        return all(not untagged and fnmatch.fnmatchcase(repo, r) and fnmatch.fnmatchcase(tag, t)
                   for r, t in patterns)
    return wanted


_HISTORY_HEADERS = {"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT",
                    "CreatedBy": "CREATED BY", "Size": "SIZE", "Comment": "COMMENT"}


def _cmd_history(args) -> int:
    from .image import chain_ids, short_id
    from .progress import human_size
    store = store_of(args)
    img = store.resolve(args.image)
    human = args.human.lstrip("=").lower() not in ("false", "0")     # (-H=false too)
    chains = chain_ids(img.diff_ids)
    sizes = []
    for chain in chains:
        try:
            sizes.append(int(store.layer_info(chain).get("content_size", 0)))
        except PybuildError:
            sizes.append(0)
    entries = []
    layer_i = len(sizes) - 1
    for n, h in enumerate(reversed(img.history)):
        if h.get("empty_layer"):
            size = 0
        else:
            size = sizes[layer_i] if layer_i >= 0 else 0
            layer_i -= 1
        created_by = h.get("created_by", "")
        if not args.no_trunc and len(created_by) > 45:        # (in --format too, as Docker)
            created_by = created_by[:44] + "…"
        iid = "<missing>"
        if n == 0:
            iid = img.id if args.no_trunc else short_id(img.id)
        created = h.get("created", "")
        entries.append({"ID": iid, "CreatedSince": ago(created) if human else created,
                        "CreatedAt": created, "CreatedBy": created_by,
                        "Size": human_size(size) if human else str(size),
                        "Comment": h.get("comment", "")})
    if args.quiet:
        print("\n".join(e["ID"] for e in entries))
    else:
        print(listing(entries, _HISTORY_HEADERS,
                      ["ID", "CreatedSince", "CreatedBy", "Size", "Comment"], args.format))
    return 0


def _cmd_inspect(args) -> int:
    from .containers import ContainerNotFound, Containers
    from .errors import ImageNotFound
    from .cli_format import render
    store = store_of(args)
    out = []
    for name in args.images:
        try:
            out.append(_image_json(store, store.resolve(name)))
        except ImageNotFound:
            try:
                out.append(_container_json(store, Containers(store).get(name)))
            except ContainerNotFound:
                raise ImageNotFound(name) from None
    if args.format:
        template = "{{json .}}" if args.format.strip() == "json" else args.format
        for obj in out:
            print(render(template, obj))
        return 0
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _image_json(store, img) -> dict:
    """`docker image inspect`'s shape, plus what pybuild adds (Digest, Manifest, Layers)."""
    from .store import repo_digests
    cfg = img.config
    return {
        "Id": img.id, "RepoTags": img.tags, "RepoDigests": repo_digests.of(store, img.id),
        "Parent": "",
        "Comment": "", "Created": img.created, "Author": cfg.get("author", ""),
        "Config": img.runtime, "Architecture": cfg.get("architecture", ""),
        "Os": cfg.get("os", ""), "Size": store.content_size(img.diff_ids),
        "RootFS": {"Type": "layers", "Layers": list(img.diff_ids)},
        "History": img.history,
        "Digest": img.digest, "Manifest": img.manifest,
        "Layers": [{"diff_id": l.diff_id, "digest": l.digest, "size": l.size,
                    "media_type": l.media_type} for l in img.layers],
    }


def _container_json(store, c) -> dict:
    import datetime
    from .containers import Containers
    when = datetime.datetime.fromtimestamp(c.created, datetime.timezone.utc).isoformat()
    return {
        "Id": c.id, "Name": "/" + c.name, "Created": when, "Image": c.image_id,
        "Config": {"Image": c.image, "Cmd": c.argv, "Env": c.env, "User": c.user,
                   "WorkingDir": c.workdir},
        "State": {"Status": "running" if c.running() else c.status, "Running": c.running(),
                  "Pid": c.pid if c.running() else 0, "ExitCode": c.exit_code or 0},
        "GraphDriver": {"Name": store.driver,
                        "Data": {"UpperDir": c.upper, "MergedDir":
                                 os.path.join(c.dir, "snap", "merged")}},
        "SizeRw": Containers(store).size(c),
    }


def _cmd_tag(args) -> int:
    store = store_of(args)
    store.tag(store.resolve(args.source), args.target)
    return 0


def _cmd_rmi(args) -> int:
    from . import reference
    from .cache import StepCache
    from .store import gc
    from .containers import Containers
    store = store_of(args)
    users = {c.image_id: c for c in Containers(store).list()}
    for name in args.images:
        img = store.resolve(name)
        user = users.get(img.id)
        if user is not None and not args.force and len(img.tags) <= 1:
            raise UsageError(f"image {name} is used by container {user.short_id} ({user.name})",
                             hint=f"remove the container first (`pybuild rm {user.name}`), "
                                  "or use rmi -f")
        by_tag = False
        try:
            by_tag = reference.parse(name).tagged in img.tags
        except UsageError:
            pass
        if by_tag:
            tagged = reference.parse(name).tagged
            store.untag(tagged)
            print(f"Untagged: {tagged}")
            if len(img.tags) > 1:
                continue
        elif len(img.tags) > 1 and not args.force:
            raise UsageError(f"image {img.id[7:19]} has several tags ({', '.join(img.tags)})",
                             hint="remove them by name, or use -f")
        for t in store.remove_manifest(img.digest):
            print(f"Untagged: {t}")
        print(f"Deleted: {img.id}")
    result = gc.collect(store, StepCache(store))
    if result.deferred:
        _say("note: a build is using the store; unused layers will be removed by a later rmi")
    return 0


def _cmd_save(args) -> int:
    from . import archive
    store = store_of(args)
    if args.output:
        from .outputs import write_output
        write_output(args.output, lambda f: archive.save(store, args.images, f))
    else:
        refuse_terminal("use -o FILE")
        archive.save(store, args.images, sys.stdout.buffer)
        sys.stdout.flush()
    return 0


def _cmd_load(args) -> int:
    from . import archive
    store = store_of(args)
    with store.in_use():
        images = archive.load(store, args.input)
    for img in images:
        if args.quiet:
            print(img.id)
        elif img.tags:
            for t in img.tags:
                print(f"Loaded image: {t}")
        else:
            print(f"Loaded image ID: {img.id}")
    return 0


def _cmd_import(args) -> int:
    from . import archive
    store = store_of(args)
    with store.in_use():
        img = archive.import_rootfs(store, args.file, args.name)
    print(img.id)
    return 0


def _transfer_renderer(args):
    from .progress import make_renderer
    return make_renderer("quiet" if args.quiet else args.progress)


def _cmd_pull(args) -> int:
    from . import api
    renderer = _transfer_renderer(args)
    try:
        image = api.pull(args.name, root=getattr(args, "root", None),
                         insecure=tuple(args.insecure_registry), on_event=renderer)
    finally:
        if hasattr(renderer, "close"):
            renderer.close()
    if not args.quiet and image.tags:
        _say(f"Pulled {image.tags[0]} ({image.digest})")
    print(image.id)
    return 0


def _cmd_push(args) -> int:
    from . import api
    from .progress import human_size
    renderer = _transfer_renderer(args)
    try:
        result = api.push(args.name, args.dest, root=getattr(args, "root", None),
                          insecure=tuple(args.insecure_registry), on_event=renderer,
                          chunk_size=parse_size(args.chunk_size))
    finally:
        if hasattr(renderer, "close"):
            renderer.close()
    if not args.quiet:
        _say(f"Pushed {result.reference}: {result.uploaded} blobs uploaded "
             f"({human_size(result.uploaded_bytes)}), {result.present} already there, "
             f"{result.mounted} mounted from other repositories")
    print(result.digest)
    return 0


def _cmd_login(args) -> int:
    from .registry import auth
    from .registry.client import Client
    from .api import insecure_registries
    user = args.username
    if user is None:
        if not sys.stdin.isatty():
            raise UsageError("pybuild login: give the user with -u USER",
                             hint="and the password with --password-stdin")
        user = input("Username: ")
    if args.password_stdin:
        if args.password is not None:
            raise UsageError("--password and --password-stdin are exclusive")
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
        _say("WARNING! Using --password via the CLI is insecure. Use --password-stdin.")
    else:
        import getpass
        password = getpass.getpass("Password: ")
    client = Client(args.registry, insecure=insecure_registries(args.insecure_registry),
                    credentials=(user, password))
    try:
        client.check_login()
    finally:
        client.close()
    path = auth.login(args.registry, user, password)
    _say(f"Credentials kept in {path} (unencrypted, as `docker login` keeps them)")
    print("Login Succeeded")
    return 0


def _cmd_logout(args) -> int:
    from .registry import auth
    if auth.logout(args.registry):
        print(f"Removing login credentials for {args.registry}")
    else:
        _say(f"Not logged in to {args.registry}")
    return 0


def _cmd_prune(args) -> int:
    from .cache import StepCache
    from .store import gc
    store = store_of(args)
    keep = parse_size(args.keep_storage) if args.keep_storage else None
    from .cli_format import prune_cutoff
    cli_containers.print_pruned(gc.prune(store, StepCache(store), keep,
                                         prune_cutoff(args.filter)))
    return 0


def _cmd_version(args) -> int:
    print(f"pybuild {__version__}")
    return 0


def reference_markdown() -> str:
    """docs/cli.md, from the argument parser itself (tests/test_docs.py keeps them equal)."""
    parser = make_parser()
    out = ["# Command-line reference", "",
           "Generated from pybuild's argument parser by `make docs`; a test fails when the two "
           "differ.", "",
           "Every command also takes `--root DIR` (the store; default `$PYBUILD_ROOT` or "
           "`/var/lib/pybuild`), `--storage-driver overlay|fuse|vfs` (for a new store; default "
           "`$PYBUILD_STORAGE_DRIVER` or the first that works) and `--debug` (show Python "
           "tracebacks). `pybuild -t NAME .` "
           "without a command is `pybuild build -t NAME .`.", "",
           "Exit codes: 0 success, 1 other failure, 2 bad usage, 3 Dockerfile error, 4 a build "
           "step failed, 5 image not found, 6 store or archive error, 7 registry error, "
           "130 interrupted.", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        out += [f"## pybuild {name}", "", helps.get(name, "") + ".", "", "```text",
                p.format_usage().strip().replace("usage: ", "", 1), "```", ""]
        rows = []
        for action in p._actions:
            if action.help == argparse.SUPPRESS or action.dest in ("help", "root", "debug",
                                                                    "storage_driver"):
                continue
            names = ", ".join(action.option_strings) or action.metavar or action.dest
            if action.option_strings and (action.metavar or action.choices):
                names += " " + (action.metavar or "{" + ",".join(action.choices) + "}")
            text = (action.help or "").replace("|", "\\|")
            rows.append(f"| `{names}` | {text} |".replace("`" + names + "`",
                                                        "`" + names.replace("|", "\\|") + "`"))
        if rows:
            out += ["| argument | meaning |", "| --- | --- |", *rows, ""]
    return "\n".join(out).rstrip() + "\n"
