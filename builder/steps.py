"""What each instruction means: expansion, its effect on the image config, its history text.

The engine calls `plan(state, instruction, build)` for every step and gets a
`Plan`: the canonical form that keys the cache, the history text, and either
a pure function of the runtime config (metadata steps) or the filesystem work
to do (RUN, COPY/ADD, WORKDIR). The rules follow BuildKit's Dockerfile
frontend (moby/buildkit frontend/dockerfile/dockerfile2llb): ENV, LABEL, ARG,
COPY/ADD, WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL and FROM are expanded
with the ARGs in scope and the image's Env (Env wins); RUN, CMD, ENTRYPOINT,
SHELL and HEALTHCHECK are not. History texts are BuildKit's, without its
" # buildkit" marker.
"""

from __future__ import annotations

import copy
import posixpath
import signal as _signal
from dataclasses import field, replace
from collections.abc import Callable

from .record import record
from . import filemode
from .dockerfile import instructions as ins
from .dockerfile.shell import ExpansionError, expand_word, expand_words
from .dockerfile.syntax import go_quote
from .errors import DockerfileError
from .image import env_list_to_dict

DEFAULT_SHELL = ["/bin/sh", "-c"]
# Docker's predefined ARGs: usable without an ARG line, never written to history.
PROXY_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
              "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


@record(frozen=False)
class StageState:
    """The image a stage is building, as it stands before the next step.

    `env` is BuildKit's state environment: it starts as the base image's Env (or,
    FROM another stage, as that stage's environment, its ARG values included);
    ENV and ARG (with a value) set names in it in Dockerfile order, so a later
    ARG overrides an earlier ENV for the steps that follow (not in the image's
    config), and a later ENV overrides an ARG. It is what RUN sees and what
    variables expand to.
    """
    name: str
    config: dict                                    # the whole OCI image config
    layers: list                                    # LayerDesc, bottom first
    state_id: str = ""                              # identity of this state (see engine._apply)
    args: dict[str, str | None] = field(default_factory=dict)   # declared ARGs, in order
    env: dict[str, str] = field(default_factory=dict)
    cmd_set: bool = False
    escape: str = "\\"
    _diff_ids: list = field(default_factory=list, repr=False)

    def diff_ids(self) -> list[str]:
        """The layers' diff IDs, bottom first (a new list). Kept from step to step: layers
        are only ever added, and listing 1,000 of them twice a step was a part of a deep
        build's step time that grew with its depth. It updates the kept list: for the
        stage's own thread (another stage reading a finished one lists its layers)."""
        known = self._diff_ids
        if len(known) > len(self.layers) or (known and
                                              known[-1] != self.layers[len(known) - 1].diff_id):
            known = self._diff_ids = []
        known.extend(layer.diff_id for layer in self.layers[len(known):])
        return list(known)

    @property
    def runtime(self) -> dict:
        return self.config.setdefault("config", {})

    def run_args(self) -> list[tuple[str, str]]:
        """The `|N K=V` of a RUN's history: every declared ARG, with the value the RUN sees.
        A proxy ARG shows too once it is declared (only undeclared ones stay out, as in
        BuildKit: testdata/compat/predefined-proxy-args)."""
        return [(k, self.env.get(k, v or "")) for k, v in self.args.items()]

    def arg_env(self) -> list[tuple[str, str]]:
        """ARG values in the RUN environment (they key the cache: they are not in the config)."""
        image_env = env_list_to_dict(self.runtime.get("Env"))
        return [(k, self.env[k]) for k in self.args if k in self.env and image_env.get(k) != self.env[k]]


@record
class CopySource:
    """Where one COPY/ADD source comes from."""
    kind: str                   # context | stage | image | heredoc | url
    spec: str                   # path or pattern (context/stage/image), name (heredoc), URL
    ref: str = ""               # stage name/index or image name (stage, image)
    content: str = ""           # heredoc body


@record
class RunMount:
    """A `RUN --mount`, expanded."""
    type: str
    target: str
    source: str = ""
    from_: str = ""
    id: str = ""
    readonly: bool = True
    sharing: str = "shared"
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    required: bool = False
    env: str = ""

    def canonical(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", False)}


@record(frozen=False)
class Plan:
    """What a step will do, worked out before its cache lookup: kind, key, effect."""
    kind: str                                       # meta | run | copy | workdir | arg
    instruction: dict                               # canonical, for the cache key
    created_by: str
    apply: Callable[[dict], None] | None = None     # edits a copy of the runtime config
    empty_history: bool = False                     # no history entry (ONBUILD)
    # run
    argv: list[str] | None = None
    network: str | None = None
    mounts: tuple[RunMount, ...] = ()
    files: dict[str, tuple[str, int]] = field(default_factory=dict)   # extra files in /dev
    build_args: tuple[tuple[str, str], ...] = ()
    # copy / workdir
    sources: list[CopySource] = field(default_factory=list)
    dest: str = ""
    dest_is_dir: bool = False
    chown: str | None = None
    chmod: int | str | None = None    # filemode.parse(): octal, or a symbolic mode
    excludes: tuple[str, ...] = ()
    parents: bool = False
    unpack: bool = False
    checksum: str | None = None
    is_add: bool = False
    # arg, env: what the step sets in the stage's environment (applied on cache hits too)
    arg_values: dict[str, str | None] = field(default_factory=dict)
    env_updates: list[tuple[str, str]] = field(default_factory=list)


@record
class BuildArgs:
    """What a step may need from the build as a whole."""
    values: dict[str, str]                          # --build-arg
    meta: dict[str, str | None]                     # ARGs before the first FROM
    automatic: dict[str, str]                       # TARGETPLATFORM & co.


def expand(state: StageState, inst: ins.Instruction, word: str, env: dict | None = None) -> str:
    try:
        return expand_word(word, state.env if env is None else env, state.escape)
    except ExpansionError as e:
        raise DockerfileError(f"{inst.keyword}: {e}", line=inst.line) from None


def plan(state: StageState, inst: ins.Instruction, build: BuildArgs) -> Plan:
    if isinstance(inst, ins.Arg):
        return _arg(state, inst, build)
    handler = _HANDLERS.get(type(inst))
    if handler is None:
        raise DockerfileError(f"{inst.keyword} is not supported by this version of pybuild",
                              line=inst.line)
    return handler(state, inst)


def _meta(instruction: dict, created_by: str, apply) -> Plan:
    return Plan("meta", instruction, created_by, apply=apply)


def go_list(items, quote: bool = False) -> str:
    """Go's fmt of a []string: %q -> ["a" "b"], %v -> [a b]."""
    return "[" + " ".join(go_quote(i) if quote else i for i in items) + "]"


def go_duration(ns: int) -> str:
    """Go's time.Duration.String()."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return sign + _trim(ns / 1_000) + "µs"
    if ns < 1_000_000_000:
        return sign + _trim(ns / 1_000_000) + "ms"
    hours, rem = divmod(ns, 3_600_000_000_000)
    minutes, rem = divmod(rem, 60_000_000_000)
    secs = _trim(rem / 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _trim(x: float) -> str:
    text = f"{x:.9f}".rstrip("0").rstrip(".")
    return text


def _arg(state: StageState, inst: ins.Arg, build: BuildArgs) -> Plan:
    values: dict[str, str | None] = {}
    parts = []
    for name, default in inst.pairs:
        if name in build.values:
            value = build.values[name]
        elif default is not None:
            value = expand(state, inst, default)
        elif name in build.meta:
            value = build.meta[name]
        else:
            value = build.automatic.get(name)
        values[name] = value
        parts.append(name if value is None else f"{name}={value}")
    return Plan("arg", {"ARG": parts}, "ARG " + " ".join(parts), arg_values=values,
                env_updates=[(k, v) for k, v in values.items() if v is not None])


def _env(state: StageState, inst: ins.Env) -> Plan:
    env = state.env
    pairs = [(expand(state, inst, k, env), expand(state, inst, v, env)) for k, v in inst.pairs]

    def apply(rt: dict) -> None:
        current = list(rt.get("Env") or [])
        for k, v in pairs:
            for i, e in enumerate(current):
                if e.partition("=")[0] == k:
                    current[i] = f"{k}={v}"
                    break
            else:
                current.append(f"{k}={v}")
        rt["Env"] = current
    plan = _meta({"ENV": pairs}, "ENV " + " ".join(f"{k}={v}" for k, v in pairs), apply)
    plan.env_updates = pairs
    return plan


def _label(state: StageState, inst: ins.Label) -> Plan:
    env = state.env
    pairs = [(expand(state, inst, k, env), expand(state, inst, v, env)) for k, v in inst.pairs]

    def apply(rt: dict) -> None:
        labels = dict(rt.get("Labels") or {})
        labels.update(pairs)
        rt["Labels"] = labels
    return _meta({"LABEL": pairs}, "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), apply)


def _with_shell(state: StageState, inst) -> list[str]:
    if inst.exec_form:
        return list(inst.command)
    shell = state.runtime.get("Shell") or DEFAULT_SHELL
    return list(shell) + [inst.command[0]] if inst.command else []


def _cmd(state: StageState, inst: ins.Cmd) -> Plan:
    argv = _with_shell(state, inst)

    def apply(rt: dict) -> None:
        rt["Cmd"] = argv
        # Deprecated (it matters on Windows only), but BuildKit sets it with every CMD, so
        # Docker's images carry it and so do ours.
        rt["ArgsEscaped"] = True
    return _meta({"CMD": argv}, "CMD " + go_list(argv, quote=True), apply)


def _entrypoint(state: StageState, inst: ins.Entrypoint) -> Plan:
    argv = _with_shell(state, inst)
    reset_cmd = not state.cmd_set

    def apply(rt: dict) -> None:
        rt["Entrypoint"] = argv
        if reset_cmd:
            # A new ENTRYPOINT drops a CMD inherited from the base image (Docker does).
            rt.pop("Cmd", None)
    return _meta({"ENTRYPOINT": argv, "reset_cmd": reset_cmd},
                 "ENTRYPOINT " + go_list(argv, quote=True), apply)


def _user(state: StageState, inst: ins.User) -> Plan:
    user = expand(state, inst, inst.user)

    def apply(rt: dict) -> None:
        rt["User"] = user
    return _meta({"USER": user}, "USER " + user, apply)


def _expose(state: StageState, inst: ins.Expose) -> Plan:
    ports: list[str] = []
    env = state.env
    for raw in inst.ports:
        try:
            words = expand_words(raw, env, state.escape)
        except ExpansionError as e:
            raise DockerfileError(f"EXPOSE: {e}", line=inst.line) from None
        for word in words:
            port, _, proto = word.partition("/")
            proto = (proto or "tcp").lower()
            if proto not in ("tcp", "udp", "sctp"):
                raise DockerfileError(f"EXPOSE {word}: invalid protocol {proto!r}", line=inst.line,
                                      hint="use tcp, udp or sctp")
            # [ip:]host:container, which BuildKit accepts (with a warning): the container's.
            lo, dash, hi = port.rsplit(":", 1)[-1].partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()) or int(hi or lo) < int(lo) \
                    or int(hi or lo) > 65535:
                raise DockerfileError(f"EXPOSE {word}: invalid port (0-65535, or a range of them)",
                                      line=inst.line,
                                      hint="EXPOSE 80, EXPOSE 53/udp or EXPOSE 8000-8010")
            for p in range(int(lo), int(hi or lo) + 1):
                ports.append(f"{p}/{proto}")

    def apply(rt: dict) -> None:
        exposed = dict(rt.get("ExposedPorts") or {})
        for p in ports:
            exposed[p] = {}
        rt["ExposedPorts"] = exposed
    return _meta({"EXPOSE": ports}, "EXPOSE " + go_list(ports), apply)


def _volume(state: StageState, inst: ins.Volume) -> Plan:
    env = state.env
    paths = [expand(state, inst, p, env) for p in inst.paths]
    if any(p == "" for p in paths):
        raise DockerfileError("VOLUME specified can not be an empty string", line=inst.line)

    def apply(rt: dict) -> None:
        volumes = dict(rt.get("Volumes") or {})
        for p in paths:
            volumes[p] = {}
        rt["Volumes"] = volumes
    return _meta({"VOLUME": paths}, "VOLUME " + go_list(paths), apply)


_SIGNALS = ({s.name for s in _signal.Signals} | {f"SIGRTMIN+{i}" for i in range(1, 16)}
            | {f"SIGRTMAX-{i}" for i in range(1, 15)})


def _signal_number(text: str) -> int | None:
    """A number as Go's strconv.Atoi reads it (a sign allowed), else None."""
    try:
        return int(text) if text.lstrip("+-").isdigit() else None
    except ValueError:
        return None


def _stopsignal(state: StageState, inst: ins.Stopsignal) -> Plan:
    sig = expand(state, inst, inst.signal)
    name = sig.upper() if sig.upper().startswith("SIG") else "SIG" + sig.upper()
    # moby's signal.ParseSignal: any number but 0 (the kernel judges it when the container
    # stops), or a known name with or without SIG.
    if _signal_number(sig) in (None, 0) and name not in _SIGNALS:
        raise DockerfileError(f"STOPSIGNAL: invalid signal {sig!r}", line=inst.line,
                              hint="a name such as SIGTERM or SIGQUIT, or a number")

    def apply(rt: dict) -> None:
        rt["StopSignal"] = sig
    return _meta({"STOPSIGNAL": sig}, "STOPSIGNAL " + sig, apply)


def _healthcheck(state: StageState, inst: ins.Healthcheck) -> Plan:
    hc = {"Test": list(inst.test)}
    for key, value in (("Interval", inst.interval), ("Timeout", inst.timeout),
                       ("StartPeriod", inst.start_period), ("StartInterval", inst.start_interval),
                       ("Retries", inst.retries)):
        if value:
            hc[key] = value
    text = ("HEALTHCHECK {Test:" + go_list(inst.test) + f" Interval:{go_duration(inst.interval)}"
            f" Timeout:{go_duration(inst.timeout)} StartPeriod:{go_duration(inst.start_period)}"
            f" StartInterval:{go_duration(inst.start_interval)} Retries:{inst.retries}}}")

    def apply(rt: dict) -> None:
        rt["Healthcheck"] = dict(hc)
    return _meta({"HEALTHCHECK": hc}, text, apply)


def _shell(state: StageState, inst: ins.Shell) -> Plan:
    argv = list(inst.argv)

    def apply(rt: dict) -> None:
        rt["Shell"] = argv
    return _meta({"SHELL": argv}, "SHELL " + go_list(argv), apply)


def _onbuild(state: StageState, inst: ins.Onbuild) -> Plan:
    def apply(rt: dict) -> None:
        rt["OnBuild"] = list(rt.get("OnBuild") or []) + [inst.expression]
    plan = _meta({"ONBUILD": inst.expression}, "ONBUILD " + inst.expression, apply)
    plan.empty_history = True          # BuildKit records triggers in the config only
    return plan


def _maintainer(state: StageState, inst: ins.Maintainer) -> Plan:
    # The author is a top-level field of the image config: the engine applies it.
    plan = _meta({"MAINTAINER": inst.name}, "MAINTAINER " + inst.name, None)
    plan.kind = "maintainer"
    return plan


def _workdir(state: StageState, inst: ins.Workdir) -> Plan:
    path = expand(state, inst, inst.path)
    current = state.runtime.get("WorkingDir") or "/"
    if path.startswith("/"):
        # As written, like BuildKit (NormalizeWorkdir): `WORKDIR /app/` is "/app/" in the
        # config and the history; only a relative path is joined to the current one and
        # cleaned ("/app/" + "sub/" -> "/app/sub").
        wd = path
    else:
        wd = posixpath.normpath(posixpath.join(current, path))
        if wd.startswith("//"):
            wd = "/" + wd.lstrip("/")

    def apply(rt: dict) -> None:
        rt["WorkingDir"] = wd
    kind = "workdir" if wd != "/" else "meta"
    return Plan(kind, {"WORKDIR": wd, "user": state.runtime.get("User", "")}, "WORKDIR " + wd,
                apply=apply, dest=wd)


def _run(state: StageState, inst: ins.Run) -> Plan:
    args = list(inst.command)
    files: dict[str, tuple[str, int]] = {}
    if inst.heredocs:
        args, files = _run_heredocs(inst)
    argv = args if inst.exec_form else (list(state.runtime.get("Shell") or DEFAULT_SHELL) + args)
    shown = state.run_args()
    prefix = f"|{len(shown)} " + " ".join(f"{k}={v}" for k, v in shown) + " " if shown else ""
    mounts = [r for r in (_run_mount(state, inst, m) for m in inst.mounts) if r is not None]
    agents = [i for i, r in enumerate(mounts) if r.type == "ssh"]
    for n, i in enumerate(agents):
        if not mounts[i].target:           # BuildKit's names, numbered among the ssh mounts
            mounts[i] = replace(mounts[i], target=f"/run/buildkit/ssh_agent.{n}")
    return Plan("run", {"RUN": argv, "network": inst.network or "",
                        "mounts": [m.canonical() for m in mounts], "files": files},
                "RUN " + prefix + " ".join(argv),
                argv=argv, network=inst.network, mounts=tuple(mounts), files=files,
                build_args=tuple(state.arg_env()))


def _run_heredocs(inst: ins.Run) -> tuple[list[str], dict]:
    """BuildKit's RUN heredocs: a lone `<<EOF` is the script; otherwise the shell gets it all."""
    first = inst.heredocs[0]
    if len(inst.heredocs) == 1 and inst.command[0].strip().lstrip("<").lstrip("-").strip("\"'") == first.name:
        if first.content.startswith("#!"):
            path = f"/dev/pipes/{first.name}"
            return [path], {path: (first.content, 0o755)}
        return [first.content], {}
    text = inst.command[0]
    for doc in inst.heredocs:
        text += "\n" + doc.raw + doc.name       # the shell does its own `<<-` stripping
    return [text], {}


def _run_mount(state: StageState, inst: ins.Run, m: ins.Mount) -> RunMount | None:
    env = state.env

    def x(value):
        return expand(state, inst, value, env) if value else ""
    target = x(m.target)
    if m.type == "secret":
        ident = x(m.id) or posixpath.basename(target)
        if not target and not m.env:
            target = "/run/secrets/" + ident
        return RunMount("secret", target, id=ident, required=m.required,
                        mode=0o400 if m.mode is None else m.mode, uid=m.uid or 0, gid=m.gid or 0,
                        env=x(m.env))
    workdir = state.runtime.get("WorkingDir") or "/"
    if m.type == "ssh":
        # The agent --ssh ID forwards (sshagent.py); the default target is set by _run.
        return RunMount("ssh", posixpath.normpath(posixpath.join(workdir, target)) if target else "",
                        id=x(m.id) or "default", required=m.required,
                        mode=0o600 if m.mode is None else m.mode, uid=m.uid or 0, gid=m.gid or 0)
    target = posixpath.normpath(posixpath.join(workdir, target))
    if m.type == "tmpfs":
        return RunMount("tmpfs", target, size=m.size, readonly=False)
    if m.type == "cache":
        return RunMount("cache", target, id=x(m.id) or target, sharing=m.sharing,
                        readonly=bool(m.readonly), source=x(m.source), from_=x(m.from_),
                        mode=0o755 if m.mode is None else m.mode, uid=m.uid or 0, gid=m.gid or 0)
    return RunMount("bind", target, source=x(m.source) or "/", from_=x(m.from_),
                    readonly=True if m.readonly is None else m.readonly)


def _copy(state: StageState, inst: ins.Copy) -> Plan:
    env = state.env
    is_add = isinstance(inst, ins.Add)
    keyword = "ADD" if is_add else "COPY"
    specs = [expand(state, inst, s, env) for s in inst.sources]
    dest_raw = expand(state, inst, inst.dest, env)
    chown = expand(state, inst, inst.chown, env) if inst.chown else None
    from_ = expand(state, inst, inst.from_, env) if inst.from_ else None
    excludes = tuple(expand(state, inst, e, env) for e in inst.excludes)
    chmod = None
    if inst.chmod:
        text = expand(state, inst, inst.chmod, env)
        try:
            chmod = filemode.parse(text)
        except ValueError:
            raise DockerfileError(f"invalid chmod parameter: {text!r}: it should be an octal "
                                  "mode between 0 and 7777 or a symbolic one as chmod(1) takes",
                                  line=inst.line, hint="for example --chmod=755 or --chmod=a+rX,go-w"
                                  ) from None
    heredoc_names = {h.name for h in inst.heredocs}
    sources: list[CopySource] = []
    shown: list[str] = []
    for spec, raw in zip(specs, inst.sources, strict=True):
        marker = raw.lstrip("<").lstrip("-").strip("\"'")
        if raw.startswith("<<") and marker in heredoc_names:
            doc = next(h for h in inst.heredocs if h.name == marker)
            content = expand(state, inst, doc.content, env) if doc.expand else doc.content
            sources.append(CopySource("heredoc", doc.name, content=content))
            continue
        if spec.startswith(("http://", "https://")):
            if not is_add:
                raise DockerfileError("source can't be a URL for COPY", line=inst.line,
                                      hint="use ADD to download a file")
            sources.append(CopySource("url", spec))
        elif spec.startswith("git@") or spec.endswith(".git") and "://" in spec:
            raise DockerfileError(f"{keyword} of a git repository is not supported by pybuild",
                                  line=inst.line)
        elif from_ is not None:
            kind = "stage"
            sources.append(CopySource(kind, spec, ref=from_))
        else:
            sources.append(CopySource("context", spec))
        shown.append(spec)
    if len(specs) > 1 and not dest_raw.endswith("/"):
        raise DockerfileError(f"when using {keyword} with more than one source file, the "
                              "destination must be a directory and end with a /", line=inst.line,
                              hint=f"write the destination as {dest_raw}/")
    checksum = expand(state, inst, inst.checksum, env) if is_add and inst.checksum else None
    if checksum and (len(sources) != 1 or sources[0].kind != "url"):
        raise DockerfileError("ADD --checksum needs exactly one http(s) source", line=inst.line)
    workdir = state.runtime.get("WorkingDir") or "/"
    dest_is_dir = dest_raw.endswith("/") or dest_raw in (".", "..") or dest_raw.endswith("/.")
    dest = posixpath.normpath(posixpath.join(workdir, dest_raw)) if dest_raw else workdir
    if dest.startswith("//"):
        dest = "/" + dest.lstrip("/")
    flags = []
    if inst.parents:
        flags.append("--parents")
    if chown:
        flags.append(f"--chown={chown}")
    if inst.chmod:
        flags.append(f"--chmod={expand(state, inst, inst.chmod, env)}")
    heredoc_shown = [f"<<{s.spec}" for s in sources if s.kind == "heredoc"]
    text = " ".join([keyword] + flags + shown + heredoc_shown + [dest_raw])
    unpack = is_add and (inst.unpack is None or inst.unpack)
    canonical = {keyword: [s.__dict__ for s in sources], "dest": dest, "dest_is_dir": dest_is_dir,
                 "chown": chown, "chmod": chmod, "excludes": list(excludes),
                 "parents": inst.parents, "unpack": unpack, "checksum": checksum}
    return Plan("copy", canonical, text, sources=sources, dest=dest, dest_is_dir=dest_is_dir,
                chown=chown, chmod=chmod, excludes=excludes, parents=inst.parents,
                unpack=unpack, checksum=checksum, is_add=is_add)


def apply_to_copy(runtime: dict, fn) -> dict:
    rt = copy.deepcopy(runtime)
    if fn is not None:
        fn(rt)
    return rt


_HANDLERS = {
    ins.Env: _env, ins.Label: _label, ins.Cmd: _cmd, ins.Entrypoint: _entrypoint,
    ins.User: _user, ins.Expose: _expose, ins.Workdir: _workdir, ins.Run: _run, ins.Copy: _copy,
    ins.Add: _copy, ins.Volume: _volume, ins.Stopsignal: _stopsignal,
    ins.Healthcheck: _healthcheck, ins.Shell: _shell, ins.Onbuild: _onbuild,
    ins.Maintainer: _maintainer,
}
