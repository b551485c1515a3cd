"""Typed, frozen instructions and stages, made from syntax nodes.

Arguments stay unexpanded here: a value like ``$HOME`` means something only
in the environment of the step that uses it, which the engine knows and this
module does not. What this module does decide is everything knowable from
the text alone: which flags an instruction takes and that their values are
well formed (`--mount` specs, durations, `--chmod`), exec vs. shell form,
that ENV has pairs, that COPY has a source and a destination, that SHELL is
JSON. Every error names the file and line.
"""

from __future__ import annotations

import re
from dataclasses import field

from ..record import record
from ..errors import DockerfileError
from . import syntax


@record(eq=False)
class Heredoc:
    """A here-document of RUN, COPY or ADD (`<<EOF` ... `EOF`)."""
    name: str
    raw: str                 # the lines as written
    expand: bool             # an unquoted delimiter: variables in the content are expanded
    chomp: bool              # <<- : leading tabs are stripped from each line

    @property
    def content(self) -> str:
        if not self.chomp:
            return self.raw
        return "".join(line.lstrip("\t") for line in self.raw.splitlines(keepends=True))


@record(eq=False)
class Instruction:
    """One instruction of a Dockerfile: where it is and its logical line as written."""
    line: int
    end_line: int
    text: str                # the logical line as written (for messages and history)

    @property
    def keyword(self) -> str:
        return type(self).__name__.upper()


@record(eq=False)
class From(Instruction):
    """FROM: the image or stage a stage starts from, its `AS` name and `--platform`."""
    image: str
    alias: str | None = None
    platform: str | None = None


@record(eq=False)
class Mount:
    """One `RUN --mount=...`, as written (values unexpanded)."""
    type: str                                   # bind | cache | tmpfs | secret | ssh
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    id: str | None = None
    readonly: bool | None = None
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    required: bool = False
    env: str | None = None


@record(eq=False)
class Run(Instruction):
    """RUN: a command run in the stage's root, with its mounts, network and here-documents."""
    command: tuple[str, ...]         # exec form: argv; shell form: (script,)
    exec_form: bool = False
    network: str | None = None       # None: the build's default
    mounts: tuple[Mount, ...] = ()
    heredocs: tuple[Heredoc, ...] = ()


@record(eq=False)
class Copy(Instruction):
    """COPY: sources (context, stage or image, here-documents) to a destination in the image."""
    sources: tuple[str, ...]
    dest: str
    chown: str | None = None
    chmod: str | None = None
    from_: str | None = None
    link: bool = False
    parents: bool = False
    excludes: tuple[str, ...] = ()
    heredocs: tuple[Heredoc, ...] = ()


@record(eq=False)
class Add(Copy):
    """ADD: COPY that also fetches URLs and git repositories and unpacks local archives."""
    checksum: str | None = None
    keep_git_dir: bool = False
    unpack: bool | None = None


@record(eq=False)
class Env(Instruction):
    """ENV: variables set in the image's config and seen by the steps after it."""
    pairs: tuple[tuple[str, str], ...]


@record(eq=False)
class Arg(Instruction):
    """ARG: build arguments declared, with their defaults."""
    pairs: tuple[tuple[str, str | None], ...]    # (name, default or None)


@record(eq=False)
class Label(Instruction):
    """LABEL: key-value pairs for the image's config."""
    pairs: tuple[tuple[str, str], ...]


@record(eq=False)
class Cmd(Instruction):
    """CMD: the container's default command (or the ENTRYPOINT's default arguments)."""
    command: tuple[str, ...]
    exec_form: bool = False


@record(eq=False)
class Entrypoint(Instruction):
    """ENTRYPOINT: the executable a container runs."""
    command: tuple[str, ...]
    exec_form: bool = False


@record(eq=False)
class Workdir(Instruction):
    """WORKDIR: the directory later steps and containers start in (made if missing)."""
    path: str


@record(eq=False)
class User(Instruction):
    """USER: the user (and group) later RUN steps and containers run as."""
    user: str


@record(eq=False)
class Expose(Instruction):
    """EXPOSE: ports the image says it listens on (`80`, `53/udp`, `8000-8002`)."""
    ports: tuple[str, ...]


@record(eq=False)
class Volume(Instruction):
    """VOLUME: paths the image declares as volumes."""
    paths: tuple[str, ...]


@record(eq=False)
class Stopsignal(Instruction):
    """STOPSIGNAL: the signal that stops a container of the image."""
    signal: str


@record(eq=False)
class Healthcheck(Instruction):
    """HEALTHCHECK: the command that tells whether a container is healthy, or NONE."""
    test: tuple[str, ...]            # ("NONE",) | ("CMD", ...) | ("CMD-SHELL", cmd)
    interval: int = 0                # nanoseconds, 0 = inherit Docker's default
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@record(eq=False)
class Shell(Instruction):
    """SHELL: the argv shell-form commands run with."""
    argv: tuple[str, ...]


@record(eq=False)
class Onbuild(Instruction):
    """ONBUILD: an instruction kept in the image, run by builds FROM it."""
    expression: str                  # the trigger as written: "RUN make"


@record(eq=False)
class Maintainer(Instruction):
    """MAINTAINER (deprecated): the image's author."""
    name: str


@record(eq=False)
class Stage:
    """One FROM and the instructions up to the next: one image of a multi-stage build."""
    index: int
    base: From
    instructions: tuple[Instruction, ...]

    @property
    def name(self) -> str | None:
        return self.base.alias


@record(eq=False)
class Dockerfile:
    """A parsed Dockerfile: its stages, the ARGs before the first FROM, parser warnings."""
    filename: str
    escape: str
    meta_args: tuple[Arg, ...]        # ARGs before the first FROM
    stages: tuple[Stage, ...]
    warnings: tuple[str, ...] = field(default=())

    def stage(self, target: str | None, option: str = "target") -> Stage:
        """The stage named `target` (the last one if None); `option` names the asker in errors."""
        if target is None:
            return self.stages[-1]
        for st in reversed(self.stages):        # the latest, if a name is used twice
            if st.name == target.lower():
                return st
        names = ", ".join(s.name for s in self.stages if s.name) or "none"
        raise DockerfileError(f"{option} stage {target!r} not found (named stages: {names})",
                              file=self.filename)


_ALL_KEYWORDS = set(k.lower() for k in syntax.KEYWORDS)


def load(text: str, *, filename: str = "Dockerfile") -> Dockerfile:
    """Parse Dockerfile text into stages of typed instructions."""
    parsed = syntax.parse(text, filename=filename)
    meta_args: list[Arg] = []
    stages: list[Stage] = []
    current: From | None = None
    body: list[Instruction] = []
    warnings: list[str] = []
    if parsed.directives.syntax:
        warnings.append(f"{filename}: '# syntax={parsed.directives.syntax}' is accepted and "
                        "ignored: pybuild implements the Dockerfile language itself")
    for node in parsed.nodes:
        inst = typed(node, filename)
        if isinstance(inst, From):
            if current is not None:
                stages.append(Stage(len(stages), current, tuple(body)))
            current, body = inst, []
        elif current is None:
            if isinstance(inst, Arg):
                meta_args.append(inst)
            else:
                raise DockerfileError(
                    f"{node.keyword.upper()} before the first FROM",
                    file=filename, line=node.start_line,
                    hint="only ARG may come before FROM; start the build stage with FROM")
        else:
            body.append(inst)
    if current is None:
        raise DockerfileError("no FROM instruction", file=filename,
                              hint="start the Dockerfile with FROM IMAGE (or FROM scratch)")
    stages.append(Stage(len(stages), current, tuple(body)))
    seen = set()
    for st in stages:
        if st.name:
            if st.name in seen:
                # BuildKit only warns (its DuplicateStageName check); a name then means the
                # latest stage that took it (Dockerfile.stage, engine._stage_ref).
                warnings.append(f"{filename}:{st.base.line}: duplicate stage name {st.name!r}: "
                                "stage names should be unique")
            seen.add(st.name)
    return Dockerfile(filename, parsed.directives.escape, tuple(meta_args), tuple(stages),
                      tuple(warnings))


def parse_trigger(expression: str, *, filename: str, line: int, escape: str = "\\") -> Instruction:
    """An ONBUILD trigger ("RUN make") as an instruction, for the build that inherits it."""
    parsed = syntax.parse(expression + "\n", filename=filename)
    if len(parsed.nodes) != 1:
        raise DockerfileError(f"ONBUILD trigger {expression!r} is not one instruction",
                              file=filename, line=line)
    node = parsed.nodes[0]
    return typed(syntax.Node(node.keyword, node.original, node.args, node.flags, node.json,
                             line, line, node.child, node.heredocs), filename)


class _Flags:
    """A node's `--name=value` flags, checked against what the instruction accepts."""

    def __init__(self, node: syntax.Node, allowed: set[str], filename: str,
                 repeatable: set[str] = frozenset(), booleans: set[str] = frozenset()):
        self.values: dict[str, list[str]] = {}
        for f in node.flags:
            name, eq, value = f[2:].partition("=")
            if name not in allowed:
                valid = ", ".join("--" + a for a in sorted(allowed)) or "none"
                raise DockerfileError(f"unknown flag for {node.keyword.upper()}: --{name} "
                                      f"(valid flags: {valid})", file=filename, line=node.start_line)
            if name in booleans and not eq:
                value = "true"
            elif not eq:
                raise DockerfileError(f"{node.keyword.upper()} --{name} needs a value (--{name}=...)",
                                      file=filename, line=node.start_line)
            if name in self.values and name not in repeatable:
                raise DockerfileError(f"{node.keyword.upper()}: --{name} given twice",
                                      file=filename, line=node.start_line)
            self.values.setdefault(name, []).append(value)

    def get(self, name: str) -> str | None:
        v = self.values.get(name)
        return v[-1] if v else None

    def all(self, name: str) -> tuple[str, ...]:
        return tuple(self.values.get(name, ()))

    def bool(self, name: str) -> bool:
        v = self.get(name)
        return v is not None and v.lower() in ("true", "1", "")


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000}


def parse_duration(text: str) -> int:
    """A Go duration ("1m30s", "500ms") in nanoseconds."""
    if text in ("0", ""):
        return 0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return int(total)


def _mount(spec: str, need) -> Mount:
    import csv          # (imported here, like difflib below: most Dockerfiles need neither)
    try:
        fields = next(csv.reader([spec]))
    except (csv.Error, StopIteration):
        need(False, f"RUN --mount={spec}: cannot parse it")
    kv: dict[str, str | None] = {}
    for f in fields:
        k, eq, v = f.partition("=")
        kv[k.strip().lower()] = v if eq else None
    kind = (kv.pop("type", None) or "bind").lower()
    need(kind in ("bind", "cache", "tmpfs", "secret", "ssh"),
         f"RUN --mount: unknown type {kind!r}", "use bind, cache, tmpfs, secret or ssh")
    out: dict = {"type": kind}
    for key, value in kv.items():
        if key in ("target", "dst", "destination"):
            out["target"] = value
        elif key in ("source", "src"):
            out["source"] = value
        elif key == "from":
            out["from_"] = value
        elif key == "id":
            out["id"] = value
        elif key in ("ro", "readonly"):
            out["readonly"] = value is None or value.lower() in ("true", "1")
        elif key in ("rw", "readwrite"):
            out["readonly"] = not (value is None or value.lower() in ("true", "1"))
        elif key == "sharing":
            need(value in ("shared", "private", "locked"),
                 f"RUN --mount: sharing={value} must be shared, private or locked")
            out["sharing"] = value
        elif key in ("mode", "uid", "gid", "size"):
            try:
                out[key] = int(value, 8) if key == "mode" else _size(value) if key == "size" else int(value)
            except (TypeError, ValueError):
                need(False, f"RUN --mount: invalid {key}={value}")
        elif key == "required":
            out["required"] = value is None or value.lower() in ("true", "1")
        elif key == "env":
            out["env"] = value
        else:
            need(False, f"RUN --mount: unknown option {key!r} for type={kind}")
    if kind in ("bind", "cache", "tmpfs"):
        need(bool(out.get("target")), f"RUN --mount=type={kind} needs target=PATH")
    if kind == "secret":
        need(bool(out.get("target") or out.get("id") or out.get("env")),
             "RUN --mount=type=secret needs id=NAME (or target=PATH)")
    return Mount(**out)


def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmMgG]?)[bB]?", text or "")
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def _heredocs(node: syntax.Node) -> tuple[Heredoc, ...]:
    return tuple(Heredoc(name, body, expand=not quoted, chomp=chomp)
                 for name, body, quoted, chomp in node.heredocs)


def typed(node: syntax.Node, filename: str) -> Instruction:
    kw = node.keyword
    common = dict(line=node.start_line, end_line=node.end_line, text=node.original.strip())

    def need(cond: bool, msg: str, hint: str | None = None):
        if not cond:
            raise DockerfileError(msg, file=filename, line=node.start_line, hint=hint)

    if kw not in _ALL_KEYWORDS:
        import difflib
        guess = difflib.get_close_matches(kw.upper(), syntax.KEYWORDS, n=1, cutoff=0.6)
        raise DockerfileError(f"unknown instruction: {kw.upper()}", file=filename,
                              line=node.start_line,
                              hint=f"did you mean {guess[0]}?" if guess else None)

    if kw == "from":
        flags = _Flags(node, {"platform"}, filename)
        a = node.args
        need(len(a) in (1, 3), "FROM requires an image name, optionally followed by AS name",
             "FROM IMAGE[:TAG] [AS NAME]")
        alias = None
        if len(a) == 3:
            need(a[1].lower() == "as", f"FROM: expected 'AS', found {a[1]!r}", "FROM IMAGE AS NAME")
            alias = a[2].lower()
            need(re.fullmatch(r"[a-z][a-z0-9_.-]*", alias) is not None,
                 f"FROM: invalid stage name {a[2]!r}",
                 "a stage name starts with a letter and holds letters, digits, _ . -")
        return From(**common, image=a[0], alias=alias, platform=flags.get("platform"))
    if kw == "run":
        flags = _Flags(node, {"network", "mount", "security"}, filename, repeatable={"mount"})
        # A bare `RUN` is `/bin/sh -c ""` in BuildKit (a build that passes there passes here).
        need(bool(node.args) or not node.json, "RUN [] has no command to run")
        net = flags.get("network")
        need(net in (None, "default", "host", "none"),
             f"RUN --network={net}: must be default, host or none")
        sec = flags.get("security")
        need(sec in (None, "sandbox"), f"RUN --security={sec}: pybuild runs every RUN sandboxed",
             "remove the flag (insecure mode is not supported)")
        mounts = tuple(_mount(m, need) for m in flags.all("mount"))
        return Run(**common, command=tuple(node.args) or ("",), exec_form=node.json,
                   network=None if net == "default" else net, mounts=mounts,
                   heredocs=_heredocs(node))
    if kw in ("copy", "add"):
        allowed = {"chown", "chmod", "from", "link", "parents", "exclude"}
        if kw == "add":
            allowed = (allowed - {"from"}) | {"checksum", "keep-git-dir", "unpack"}
        flags = _Flags(node, allowed, filename, repeatable={"exclude"},
                       booleans={"link", "parents", "keep-git-dir", "unpack"})
        heredocs = _heredocs(node)
        need(len(node.args) >= 2, f"{kw.upper()} requires at least one source and a destination",
             f"{kw.upper()} SRC... DEST")
        extra = {}
        if kw == "add":
            checksum = flags.get("checksum")
            need(checksum is None or re.fullmatch(r"sha256:[0-9a-fA-F]{64}", checksum or "") is not None
                 or "$" in (checksum or ""),
                 f"ADD --checksum={checksum}: expected sha256:<64 hex digits>")
            unpack = flags.get("unpack")
            extra = dict(checksum=checksum, keep_git_dir=flags.bool("keep-git-dir"),
                         unpack=None if unpack is None else flags.bool("unpack"))
        cls = Add if kw == "add" else Copy
        return cls(**common, sources=tuple(node.args[:-1]), dest=node.args[-1],
                   chown=flags.get("chown"), chmod=flags.get("chmod"), from_=flags.get("from"),
                   link=flags.bool("link"), parents=flags.bool("parents"),
                   excludes=flags.all("exclude"), heredocs=heredocs, **extra)
    if kw == "healthcheck":
        return _healthcheck(node, common, need, filename)
    _Flags(node, set(), filename)
    if kw in ("env", "label"):
        a = node.args
        need(len(a) >= 3, f"{kw.upper()} requires at least one name=value pair")
        pairs = tuple((a[i], a[i + 1]) for i in range(0, len(a), 3))
        for k, _ in pairs:
            need(k != "", f"{kw.upper()} names cannot be empty")
        return (Env if kw == "env" else Label)(**common, pairs=pairs)
    if kw == "arg":
        need(bool(node.args), "ARG requires at least one argument", "ARG NAME[=DEFAULT]")
        pairs = []
        for w in node.args:
            name, eq, default = w.partition("=")
            need(name != "", f"ARG: invalid argument {w!r}")
            pairs.append((name, default if eq else None))
        return Arg(**common, pairs=tuple(pairs))
    if kw in ("cmd", "entrypoint"):
        cls = Cmd if kw == "cmd" else Entrypoint
        return cls(**common, command=tuple(node.args), exec_form=node.json)
    if kw == "workdir":
        need(len(node.args) == 1, "WORKDIR requires exactly one argument", "WORKDIR /path")
        return Workdir(**common, path=node.args[0])
    if kw == "user":
        need(len(node.args) == 1 and node.args[0].strip() != "", "USER requires exactly one argument",
             "USER name[:group] or USER uid[:gid]")
        return User(**common, user=node.args[0].strip())
    if kw == "expose":
        need(bool(node.args), "EXPOSE requires at least one port", "EXPOSE 80 443/tcp")
        return Expose(**common, ports=tuple(node.args))
    if kw == "volume":
        paths = tuple(p for p in node.args if p.strip())
        need(bool(paths), "VOLUME requires at least one path", "VOLUME /data")
        return Volume(**common, paths=paths)
    if kw == "stopsignal":
        need(len(node.args) == 1 and node.args[0].strip() != "", "STOPSIGNAL requires one signal",
             "STOPSIGNAL SIGTERM")
        return Stopsignal(**common, signal=node.args[0].strip())
    if kw == "shell":
        need(node.json and len(node.args) >= 1, "SHELL requires the arguments in JSON form",
             'SHELL ["/bin/bash", "-c"]')
        return Shell(**common, argv=tuple(node.args))
    if kw == "onbuild":
        child = node.child
        need(child is not None, "ONBUILD requires an instruction", "ONBUILD RUN make")
        need(child.keyword not in ("onbuild", "from", "maintainer"),
             f"ONBUILD {child.keyword.upper()} is not allowed")
        typed(child, filename)        # a broken trigger fails here, not in a later build
        expression = node.original.strip()[len("onbuild"):].strip()
        return Onbuild(**common, expression=expression)
    if kw == "maintainer":
        need(bool(node.args), "MAINTAINER requires a name")
        return Maintainer(**common, name=node.args[0])
    raise DockerfileError(f"{kw.upper()} is not supported by this version of pybuild",
                          file=filename, line=node.start_line)


def _healthcheck(node, common, need, filename) -> Healthcheck:
    flags = _Flags(node, {"interval", "timeout", "start-period", "start-interval", "retries"},
                   filename)
    args = node.args
    need(bool(args), "HEALTHCHECK requires CMD or NONE", "HEALTHCHECK CMD curl -f http://localhost/")
    kind = args[0].upper()
    if kind == "NONE":
        need(len(args) == 1 and not node.flags, "HEALTHCHECK NONE takes no arguments or flags")
        return Healthcheck(**common, test=("NONE",))
    need(kind == "CMD", f"HEALTHCHECK: unknown type {args[0]!r}", "use CMD or NONE")
    need(len(args) >= 2, "HEALTHCHECK CMD requires a command")
    test = ("CMD",) + tuple(args[1:]) if node.json else ("CMD-SHELL", args[1])
    durations = {}
    for name in ("interval", "timeout", "start-period", "start-interval"):
        value = flags.get(name)
        try:
            ns = parse_duration(value) if value is not None else 0
        except ValueError as e:
            need(False, f"HEALTHCHECK --{name}: {e}", "for example 30s, 1m30s, 500ms")
        need(ns == 0 or ns >= 1_000_000, f"HEALTHCHECK --{name} cannot be less than 1ms")
        durations[name.replace("-", "_")] = ns
    retries = flags.get("retries")
    try:
        n = int(retries) if retries is not None else 0
    except ValueError:
        n = -1
    need(n >= 0, f"HEALTHCHECK --retries={retries}: must be a whole number, 0 or more")
    return Healthcheck(**common, test=test, retries=n, **durations)
