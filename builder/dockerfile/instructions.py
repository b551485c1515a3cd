"""Typed, frozen instructions and stages, made from syntax nodes.

Arguments stay unexpanded here: a value like ``$HOME`` means something only
in the environment of the step that uses it, which the engine knows and this
module does not. What this module does decide is everything knowable from
the text alone: which flags an instruction takes, exec vs. shell form, that
ENV has pairs, that COPY has at least a source and a destination, and which
instructions this version of pybuild cannot carry out yet (they fail here,
with their line, rather than being skipped).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ..errors import DockerfileError
from . import syntax


@dataclass(frozen=True)
class Instruction:
    line: int
    end_line: int
    text: str                # the logical line as written (for messages and history)

    @property
    def keyword(self) -> str:
        return type(self).__name__.upper()


@dataclass(frozen=True)
class From(Instruction):
    image: str
    alias: str | None = None
    platform: str | None = None


@dataclass(frozen=True)
class Run(Instruction):
    command: tuple[str, ...]         # exec form: argv; shell form: (script,)
    exec_form: bool = False
    network: str | None = None       # None: the build's default


@dataclass(frozen=True)
class Copy(Instruction):
    sources: tuple[str, ...]
    dest: str
    chown: str | None = None
    chmod: str | None = None


@dataclass(frozen=True)
class Env(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Arg(Instruction):
    pairs: tuple[tuple[str, str | None], ...]    # (name, default or None)


@dataclass(frozen=True)
class Label(Instruction):
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Cmd(Instruction):
    command: tuple[str, ...]
    exec_form: bool = False


@dataclass(frozen=True)
class Entrypoint(Instruction):
    command: tuple[str, ...]
    exec_form: bool = False


@dataclass(frozen=True)
class Workdir(Instruction):
    path: str


@dataclass(frozen=True)
class User(Instruction):
    user: str


@dataclass(frozen=True)
class Expose(Instruction):
    ports: tuple[str, ...]


@dataclass(frozen=True)
class Stage:
    index: int
    base: From
    instructions: tuple[Instruction, ...]

    @property
    def name(self) -> str | None:
        return self.base.alias


@dataclass(frozen=True)
class Dockerfile:
    filename: str
    escape: str
    meta_args: tuple[Arg, ...]        # ARGs before the first FROM
    stages: tuple[Stage, ...]
    warnings: tuple[str, ...] = field(default=())

    def stage(self, target: str | None) -> Stage:
        if target is None:
            return self.stages[-1]
        for st in self.stages:
            if st.name == target:
                return st
        names = ", ".join(s.name for s in self.stages if s.name) or "none"
        raise DockerfileError(f"target stage {target!r} not found (named stages: {names})",
                              file=self.filename)


# Instructions of the language that this version parses but cannot carry out yet.
_NOT_YET = {"add", "volume", "stopsignal", "healthcheck", "shell", "onbuild", "maintainer"}
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
        inst = _typed(node, filename)
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
                raise DockerfileError(f"duplicate stage name {st.name!r}", file=filename,
                                      line=st.base.line)
            seen.add(st.name)
    return Dockerfile(filename, parsed.directives.escape, tuple(meta_args), tuple(stages),
                      tuple(warnings))


def _flags(node: syntax.Node, allowed: set[str], filename: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in node.flags:
        name, _, value = f[2:].partition("=")
        if name not in allowed:
            if name in _FUTURE_FLAGS.get(node.keyword, ()):
                raise DockerfileError(
                    f"{node.keyword.upper()} --{name} is not supported by this version of pybuild",
                    file=filename, line=node.start_line)
            valid = ", ".join("--" + a for a in sorted(allowed)) or "none"
            raise DockerfileError(f"unknown flag for {node.keyword.upper()}: --{name} "
                                  f"(valid flags: {valid})", file=filename, line=node.start_line)
        out[name] = value
    return out


_FUTURE_FLAGS = {
    "run": ("mount", "security"),
    "copy": ("from", "link", "exclude", "parents"),
}


def _typed(node: syntax.Node, filename: str) -> Instruction:
    kw = node.keyword
    common = dict(line=node.start_line, end_line=node.end_line, text=node.original.strip())

    def need(cond: bool, msg: str, hint: str | None = None):
        if not cond:
            raise DockerfileError(msg, file=filename, line=node.start_line, hint=hint)

    if kw not in _ALL_KEYWORDS:
        guess = difflib.get_close_matches(kw.upper(), syntax.KEYWORDS, n=1, cutoff=0.6)
        raise DockerfileError(f"unknown instruction: {kw.upper()}", file=filename,
                              line=node.start_line,
                              hint=f"did you mean {guess[0]}?" if guess else None)
    if kw in _NOT_YET:
        raise DockerfileError(f"{kw.upper()} is not supported by this version of pybuild",
                              file=filename, line=node.start_line)
    if node.heredocs:
        raise DockerfileError(f"heredocs in {kw.upper()} are not supported by this version of pybuild",
                              file=filename, line=node.start_line)

    if kw == "from":
        flags = _flags(node, {"platform"}, filename)
        a = node.args
        need(len(a) in (1, 3), "FROM requires an image name, optionally followed by AS name",
             "FROM IMAGE[:TAG] [AS NAME]")
        alias = None
        if len(a) == 3:
            need(a[1].lower() == "as", f"FROM: expected 'AS', found {a[1]!r}", "FROM IMAGE AS NAME")
            alias = a[2].lower()
        return From(**common, image=a[0], alias=alias, platform=flags.get("platform"))
    if kw == "run":
        flags = _flags(node, {"network"}, filename)
        need(bool(node.args), "RUN requires a command")
        net = flags.get("network")
        need(net in (None, "default", "host", "none"),
             f"RUN --network={net}: must be default, host or none")
        return Run(**common, command=tuple(node.args), exec_form=node.json,
                   network=None if net == "default" else net)
    if kw == "copy":
        flags = _flags(node, {"chown", "chmod"}, filename)
        need(len(node.args) >= 2, "COPY requires at least one source and a destination",
             "COPY SRC... DEST")
        return Copy(**common, sources=tuple(node.args[:-1]), dest=node.args[-1],
                    chown=flags.get("chown"), chmod=flags.get("chmod"))
    _flags(node, set(), filename)
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
    raise DockerfileError(f"{kw.upper()} is not supported by this version of pybuild",
                          file=filename, line=node.start_line)
