"""`pybuild build`: its arguments, and how they become a build and what it prints or writes.

The command itself is `cli.py`'s (errors, exit codes, the other commands);
this module turns the build's options into `BuildOptions` (`--build-arg`,
`--secret`, `--label`, `--annotation`, `--build-context`, `--ulimit`, ...)
and writes what a CI job reads afterwards (`--iidfile`, `--metadata-file`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_format import parse_size
from .errors import UsageError
from .layer import COMPRESSIONS, DEFAULT_COMPRESSION

# The last Builder, left for cli.run()'s os._exit() instead of freed: a finished Builder
# holds every entry of its context (30,000 files: 0.04 s to free one by one, each page a
# copy-on-write fault after the build's forks). A library caller's Builder goes when
# build() returns.
LEFT_TO_EXIT: list = []


def insecure_option(s: argparse.ArgumentParser) -> None:
    """--insecure-registry, of build, pull and push."""
    s.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP to this registry (localhost always is; also "
                        "$PYBUILD_INSECURE_REGISTRIES)")


def args_build(s: argparse.ArgumentParser) -> None:
    s.add_argument("context", metavar="CONTEXT",
                   help="the build context directory (- : a tar, plain or compressed, on stdin; "
                        "or a Dockerfile there, with an empty context)")
    s.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]",
                   help="name the image (repeatable)")
    s.add_argument("-f", "--file", metavar="FILE",
                   help="the Dockerfile (default: CONTEXT/Dockerfile; - : read it from stdin)")
    s.add_argument("--build-arg", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set a build-time variable (without =VALUE: from the environment)")
    s.add_argument("--secret", action="append", default=[], metavar="id=ID[,src=FILE|,env=VAR]",
                   help="a secret for RUN --mount=type=secret (never stored in the image)")
    s.add_argument("--no-cache", action="store_true", help="do not use the step cache")
    s.add_argument("--build-context", action="append", default=[], metavar="NAME=VALUE",
                   help="another context: a directory for COPY --from=NAME and RUN --mount "
                        "from=NAME, or docker-image://REF to stand in for the image NAME")
    s.add_argument("--no-cache-filter", action="append", default=[], metavar="STAGE[,STAGE]",
                   help="build these stages (by name) without the step cache, the others with it")
    s.add_argument("--network", choices=("host", "none", "default"), default="host",
                   help="network for RUN steps (default: host)")
    s.add_argument("--target", metavar="STAGE", help="build this stage and what it needs")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the image ID")
    s.add_argument("--progress", choices=("auto", "tty", "plain", "json", "quiet"), default="auto",
                   help="how to show progress (auto: tty on a terminal, else plain)")
    s.add_argument("--explain-cache", action="store_true",
                   help="for every step that misses the cache, print the full comparison")
    s.add_argument("--iidfile", metavar="FILE", help="write the image ID to FILE")
    s.add_argument("--metadata-file", metavar="FILE",
                   help="write the result as JSON to FILE, with buildx's keys "
                        "(containerimage.digest, containerimage.config.digest, image.name)")
    s.add_argument("--pull", nargs="?", const="always", default="missing",
                   choices=("always", "missing", "never", "true", "false"),
                   help="pull base images: always, missing (the default: only those not in the "
                        "store) or never; --pull alone is always")
    s.add_argument("--push", action="store_true", help="push every -t name after the build")
    s.add_argument("--cache-to", action="append", default=[], metavar="type=registry,ref=REF|"
                   "type=local,dest=DIR[,mode=min|max]",
                   help="export the build's step cache (mode=max: every stage's steps)")
    s.add_argument("--cache-from", action="append", default=[], metavar="type=registry,ref=REF|"
                   "type=local,src=DIR",
                   help="use a step cache exported by --cache-to (layers download on a hit)")
    s.add_argument("-o", "--output", action="append", default=[], metavar="type=TYPE[,dest=PATH]",
                   help="also write the result: type=oci|docker,dest=FILE (archive), "
                        "type=registry (push), type=local,dest=DIR (the root filesystem), "
                        "type=tar,dest=FILE (the same as one tar; - or dest=-: on stdout)")
    s.add_argument("--compression", choices=COMPRESSIONS, default=DEFAULT_COMPRESSION,
                   help="how new layers are stored (default uncompressed: plain tars, as Docker "
                        "and Buildah keep them; a push sends them as gzip)")
    s.add_argument("--source-date-epoch", metavar="SECONDS",
                   help="reproducible images: every time in the config, history and layers is "
                        "clamped to this (default: $SOURCE_DATE_EPOCH)")
    s.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="add a label to the image's config (repeatable)")
    s.add_argument("--platform", metavar="linux/ARCH",
                   help="the platform to build for: only this machine's is accepted (RUN "
                        "steps execute natively)")
    s.add_argument("--shm-size", metavar="SIZE",
                   help="size of RUN's /dev/shm (default 64m, as Docker)")
    s.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="an annotation on the image's manifest (buildx's manifest: prefix may "
                        "be given); the manifest's digest changes, the image ID does not")
    s.add_argument("--ulimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                   help="a resource limit for RUN steps, as Docker's (nofile=1024:2048; -1 is "
                        "unlimited); part of their cache key")
    s.add_argument("--rm", "--force-rm", action="store_true",
                   help="accepted as docker build takes them: pybuild keeps no intermediate "
                        "containers")
    s.add_argument("--load", action="store_true",
                   help="accepted as buildx takes it: the image is always in the local store")
    s.add_argument("--provenance", "--sbom", metavar="VALUE", action="append", default=[],
                   help="accepted as buildx takes them; pybuild attaches no attestations "
                        "(a value other than false warns)")
    s.add_argument("--attest", metavar="type=TYPE[,...]", action="append", default=[],
                   help="accepted as buildx takes it; pybuild attaches no attestations "
                        "(a value other than disabled=true warns)")
    s.add_argument("--compress", action="store_true",
                   help="accepted as docker build takes it: there is no daemon to send the "
                        "context to")
    s.add_argument("--disable-content-trust", metavar="BOOL", nargs="?", const="true",
                   default="true",
                   help="accepted as docker build takes it (true, its default): pybuild does not "
                        "verify image signatures; false warns")
    s.add_argument("--allow", metavar="ENTITLEMENT", action="append", default=[],
                   help="accepted as buildx takes it: network.host (RUN has the host's network "
                        "by default); security.insecure warns (every RUN is sandboxed)")
    s.add_argument("--builder", metavar="NAME",
                   help="accepted as buildx takes it: pybuild is its own builder (warns)")
    s.add_argument("--isolation", metavar="default", choices=("default",),
                   help="accepted as docker build takes it on Linux (default only)")
    for flags, what in _REFUSED:
        extra = {"action": "store_const", "const": "true"} if flags[-1] == "--squash" \
            else {"metavar": "VALUE"}                   # (--squash takes no value)
        s.add_argument(*flags, dest=_refused_dest(flags),
                       help=f"refused: {what}", **extra)
    s.add_argument("--ssh", action="append", default=[], metavar="ID[=SOCKET]",
                   help="forward an ssh agent to RUN --mount=type=ssh,id=ID (default: the one of "
                        "$SSH_AUTH_SOCK); ID is usually `default`")
    s.add_argument("--add-host", action="append", default=[], metavar="NAME:ADDRESS",
                   help="a line for RUN's /etc/hosts (ADDRESS may be host-gateway: this machine)")
    insecure_option(s)


def _build_args(items: list[str]) -> dict[str, str]:
    """KEY=VALUE, or KEY alone for the value in the environment (left out when it has none)."""
    return _key_values(items, "--build-arg", os.environ.get)


def _labels(items: list[str]) -> dict[str, str]:
    """Docker's --label forms: KEY=VALUE, or KEY alone for an empty value."""
    return _key_values(items, "--label", lambda k: "")


def _key_values(items: list[str], flag: str, bare) -> dict[str, str]:
    """KEY=VALUE items; `bare(KEY)` is the value of an item without `=` (None: left out)."""
    out = {}
    for item in items:
        k, eq, v = item.partition("=")
        if not k:
            raise UsageError(f"{flag} {item!r}: expected KEY=VALUE")
        value = v if eq else bare(k)
        if value is not None:
            out[k] = value
    return out


def _secrets(items: list[str]) -> dict[str, str | bytes]:
    """Docker's --secret forms: id=x,src=FILE | id=x,env=VAR | id=x (env var or file named x)."""
    out: dict[str, str | bytes] = {}
    for item in items:
        fields = dict(f.partition("=")[::2] for f in item.split(","))
        ident = fields.get("id")
        if not ident:
            raise UsageError(f"--secret {item!r}: needs id=NAME")
        src = fields.get("src") or fields.get("source")
        env = fields.get("env")
        if src:
            out[ident] = src
        elif env or fields.get("type") == "env":
            var = env or ident
            if var not in os.environ:
                raise UsageError(f"--secret {item!r}: the environment variable {var} is not set")
            out[ident] = os.environ[var].encode()
        elif ident in os.environ:
            out[ident] = os.environ[ident].encode()
        else:
            raise UsageError(f"--secret {item!r}: give src=FILE or env=VAR")
    return out


STDIN_NAME = "<stdin>"      # a Dockerfile read from standard input, in messages


def cmd_build(args) -> int:
    _refused_options(args)
    if args.context == "-" and args.file == "-":
        raise UsageError("can't use standard input for both the build context and the Dockerfile")
    if args.context != "-" and not os.path.isdir(args.context):
        raise UsageError(f"build context {args.context!r} is not a directory",
                         hint="the last argument is the context directory, for example `.`")
    scratch = None
    if "-" in (args.context, args.file):
        import tempfile       # (imported here: a build from a directory does not need it)
        scratch = tempfile.mkdtemp(prefix="pybuild-stdin-")
    try:
        context, dockerfile = args.context, args.file
        name = None                   # what messages call the Dockerfile, if not its path
        if dockerfile == "-":
            dockerfile, name = os.path.join(scratch, "Dockerfile"), STDIN_NAME
            import shutil
            with open(dockerfile, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
        if context == "-":
            from .layer import extract
            context = os.path.join(scratch, "context")
            os.mkdir(context)
            stdin = _Prefixed(sys.stdin.buffer)
            if _is_archive(stdin.head):
                extract.extract(stdin, context, what="build context from stdin",
                                whiteouts=False, compressed=True)
                name = dockerfile or "Dockerfile"          # (its path in the archive)
                if dockerfile:
                    dockerfile = os.path.join(context, dockerfile)
            else:
                # `docker build - < Dockerfile`: what comes in is the Dockerfile, and the
                # context is empty (Docker's rule: anything but an archive; -f is not used).
                with open(os.path.join(context, "Dockerfile"), "wb") as f:
                    f.write(stdin.read())
                dockerfile, name = None, STDIN_NAME
        return _build(args, context, dockerfile, name)
    finally:
        if scratch:
            from .trees import remove_tree
            remove_tree(scratch, ignore_errors=True)


class _Prefixed:
    """A stream whose first 512 bytes (`head`) are read ahead, to tell what it is."""

    def __init__(self, stream):
        self._stream = stream
        self.head = b""
        while len(self.head) < 512 and (more := stream.read(512 - len(self.head))):
            self.head += more
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        if self._at < len(self.head):
            take = len(self.head) - self._at if n is None or n < 0 else \
                min(n, len(self.head) - self._at)
            data = self.head[self._at:self._at + take]
            self._at += take
            if n is None or n < 0:
                return data + self._stream.read()
            return data
        return self._stream.read(n)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"      # (Docker's too; extract() says it is not a tar)


def _is_archive(head: bytes) -> bool:
    """Docker's test of a build context on standard input: compressed, or a tar header."""
    from .layer.extract import COMPRESSED_MAGICS
    if head.startswith(COMPRESSED_MAGICS + (_ZSTD_MAGIC,)):
        return True
    if len(head) < 512:
        return False
    import tarfile
    try:
        tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


# The classic builder's options pybuild does not carry out. Refused by name, with why: a
# limit silently ignored would mislead (and BuildKit has none of them either).
_REFUSED = (
    (("-m", "--memory"), "RUN's resources are not limited (no cgroups)"),
    (("--memory-swap",), "RUN's resources are not limited (no cgroups)"),
    (("-c", "--cpu-shares"), "RUN's resources are not limited (no cgroups)"),
    (("--cpu-period",), "RUN's resources are not limited (no cgroups)"),
    (("--cpu-quota",), "RUN's resources are not limited (no cgroups)"),
    (("--cpuset-cpus",), "RUN's resources are not limited (no cgroups)"),
    (("--cpuset-mems",), "RUN's resources are not limited (no cgroups)"),
    (("--cgroup-parent",), "RUN's processes are not put in cgroups"),
    (("--security-opt",), "RUN's sandbox is fixed (seccomp profile, no new privileges)"),
    (("--squash",), "layers are never squashed: each step's layer is shared and cached"),
)


def _refused_dest(flags: tuple[str, ...]) -> str:
    """Where argparse keeps a refused option's value: `refused_memory_swap`."""
    return "refused_" + flags[-1][2:].replace("-", "_")


def _refused_options(args) -> None:
    for flags, what in _REFUSED:
        if getattr(args, _refused_dest(flags), None) is not None:
            raise UsageError(f"{flags[-1]} (docker build's classic builder) is not supported: "
                             f"{what}", hint=f"drop {flags[-1]} from the command line")


def _ignored_options(args) -> list[str]:
    """Warnings for what Docker's or buildx's options ask that pybuild does not do: a CI
    script written for them runs, and says what it did not get."""
    out = []
    if any(v.lower() not in ("false", "0", "disabled=true") for v in args.provenance) or \
            any("disabled=true" not in v.lower() for v in args.attest):
        out.append("--provenance/--sbom/--attest: pybuild attaches no attestations; the image "
                   "is built without them")
    if args.disable_content_trust.lower() in ("false", "0"):
        out.append("--disable-content-trust=false: pybuild does not verify image signatures "
                   "(content trust); base images are checked by digest only")
    for entitlement in args.allow:
        if entitlement != "network.host":
            out.append(f"--allow {entitlement}: not granted (every RUN is sandboxed)")
    if args.builder:
        out.append(f"--builder {args.builder}: pybuild is its own builder (the option is "
                   "ignored)")
    return out


def _build(args, context: str, dockerfile: str | None, name: str | None = None) -> int:
    from .engine import Builder, BuildOptions
    from .run_options import parse_add_host, parse_ulimit
    from .progress import make_renderer
    pull = {"true": "always", "false": "missing"}.get(args.pull, args.pull)
    if args.cache_to or args.cache_from or args.output:
        from . import outputs, remote_cache
    opts = BuildOptions(context=context, dockerfile=dockerfile, dockerfile_name=name,
                        tags=tuple(args.tag),
                        build_args=_build_args(args.build_arg), no_cache=args.no_cache,
                        no_cache_filter=tuple(n for item in args.no_cache_filter
                                              for n in item.split(",") if n),
                        network=args.network, target=args.target,
                        root=getattr(args, "root", None), secrets=_secrets(args.secret),
                        storage_driver=getattr(args, "storage_driver", None),
                        pull=pull, push=args.push, insecure_registries=tuple(args.insecure_registry),
                        cache_to=tuple(remote_cache.parse_spec(c, export=True) for c in args.cache_to),
                        cache_from=tuple(remote_cache.parse_spec(c, export=False)
                                         for c in args.cache_from),
                        outputs=tuple(outputs.parse_spec(o) for o in args.output),
                        compression=args.compression,
                        source_date_epoch=_epoch(args.source_date_epoch),
                        labels=_labels(args.label), platform=args.platform,
                        add_hosts=tuple(parse_add_host(h) for h in args.add_host),
                        ssh=dict(item.partition("=")[::2] for item in args.ssh),
                        shm_size=parse_size(args.shm_size, binary=True) if args.shm_size
                        else None,
                        build_contexts=_build_contexts(args.build_context),
                        ulimits=tuple(parse_ulimit(u) for u in args.ulimit),
                        annotations=_annotations(args.annotation))
    for option, path in (("--iidfile", args.iidfile), ("--metadata-file", args.metadata_file)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            # Said before the build, not after it has run for minutes.
            raise UsageError(f"{option} {path}: its directory does not exist",
                             hint="create the directory first, or name a file in an existing one")
    mode = "quiet" if args.quiet else args.progress
    renderer = make_renderer(mode, explain=args.explain_cache)
    for warning in _ignored_options(args):
        from .progress import BuildWarning
        renderer(BuildWarning(warning))
    build = Builder(opts, renderer)
    LEFT_TO_EXIT[:] = [build]
    try:
        image = build.run()
    finally:
        if hasattr(renderer, "close"):
            renderer.close()
    if args.iidfile:
        with open(args.iidfile, "w", encoding="ascii") as f:
            f.write(image.id)
    if args.metadata_file:
        with open(args.metadata_file, "w", encoding="utf-8") as f:
            json.dump(build_metadata(image, build.pushed), f, indent=2, sort_keys=True)
            f.write("\n")
    if mode != "json" and not any(o.dest == "-" for o in opts.outputs):
        print(image.id)     # (not into a tar that goes to standard output: -o -)
    return 0


def _annotations(items: list[str]) -> dict[str, str]:
    """`--annotation [manifest:]KEY=VALUE`: buildx's other levels (index, descriptors) need a
    multi-platform index, which pybuild does not make."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        level, colon, rest = key.partition(":")
        level = level.split("[", 1)[0]          # (manifest[linux/amd64]: one platform here)
        if colon and level in ("manifest", "index", "manifest-descriptor", "index-descriptor"):
            if level != "manifest":
                raise UsageError(f"--annotation {item}: only manifest annotations are supported",
                                 hint="pybuild writes one manifest and no image index")
            key = rest
        if not sep or not key:
            raise UsageError(f"--annotation {item}: expected KEY=VALUE",
                             hint="for example --annotation org.opencontainers.image.source="
                                  "https://example.com/repo")
        out[key] = value
    return out


def _build_contexts(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--build-context {item}: expected NAME=VALUE",
                             hint="for example --build-context docs=./docs")
        out[name] = value
    return out


def build_metadata(image, pushed=None) -> dict:
    """What `docker buildx build --metadata-file` writes of an image, under the same keys
    (CI jobs read the digests from it); buildx's own keys (buildx.build.*) are left out.
    `pushed` (--push: a transfer.PushResult) gives the manifest the registry has, which is
    not the local one when plain layers went as gzip twins (twins.py): CI jobs deploy and
    sign by that digest."""
    from .image import canonical_json
    from .reference import DEFAULT_TAG, parse
    names = []
    for tag in image.tags:
        ref = parse(tag)
        names.append(f"{ref.registry}/{ref.repository}:{ref.tag or DEFAULT_TAG}")
    digest, size = (pushed.digest, pushed.manifest_size) if pushed is not None else \
        (image.digest, len(canonical_json(image.manifest)))
    out = {
        "containerimage.config.digest": image.id,
        "containerimage.digest": digest,
        "containerimage.descriptor": {
            "mediaType": image.manifest.get("mediaType"), "digest": digest,
            "size": size,
            "annotations": {"config.digest": image.id,
                            "org.opencontainers.image.created": image.created}},
    }
    if names:
        out["image.name"] = ",".join(names)
    return out


def _epoch(given: str | None) -> int | None:
    text = given if given is not None else os.environ.get("SOURCE_DATE_EPOCH") or None
    if text is None:
        return None
    if not text.strip().isdigit():
        where = "--source-date-epoch" if given is not None else "SOURCE_DATE_EPOCH"
        raise UsageError(f"{where}={text!r}: expected whole seconds since 1970",
                         hint="for example the last commit's time: $(git log -1 --format=%ct)")
    return int(text)


COMMANDS = {"build": ("build an image from a Dockerfile", args_build)}
