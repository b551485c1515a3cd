"""What each instruction means: expansion, its effect on the image config, its history text.

The engine (build.py) calls `plan(state, instruction)` for every step and
gets back a `Plan`: the canonical form that keys the cache, the history
text, and either a pure function of the runtime config (metadata steps) or
the filesystem work to do (RUN, COPY, WORKDIR). Variable expansion follows
Docker: ENV, LABEL, ARG, COPY, WORKDIR, USER, EXPOSE, FROM are expanded with
the ARGs in scope and the image's Env (Env wins); RUN, CMD and ENTRYPOINT
are not (their shell does it).
"""

from __future__ import annotations

import copy
import json
import posixpath
from dataclasses import dataclass, field
from typing import Callable

from .dockerfile import instructions as ins
from .dockerfile.shell import ExpansionError, expand_word
from .errors import DockerfileError
from .image import env_list_to_dict

DEFAULT_SHELL = ["/bin/sh", "-c"]
# Docker's predefined ARGs: usable without an ARG line, never written to history.
PROXY_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
              "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


@dataclass
class StageState:
    """The image a stage is building, as it stands before the next step."""
    name: str
    config: dict                                    # the whole OCI image config
    layers: list                                    # LayerDesc, bottom first
    args: dict[str, str | None] = field(default_factory=dict)
    cmd_set: bool = False
    escape: str = "\\"

    @property
    def runtime(self) -> dict:
        return self.config.setdefault("config", {})

    def env(self) -> dict[str, str]:
        """Variables for expansion: ARGs in scope, overridden by the image's Env."""
        out = {k: v for k, v in self.args.items() if v is not None}
        out.update(env_list_to_dict(self.runtime.get("Env")))
        return out

    def arg_values(self) -> list[tuple[str, str]]:
        env = env_list_to_dict(self.runtime.get("Env"))
        return [(k, v) for k, v in self.args.items() if v is not None and k not in env]


@dataclass
class Plan:
    kind: str                                       # "meta" | "run" | "copy" | "workdir"
    instruction: dict                               # canonical, for the cache key
    created_by: str
    apply: Callable[[dict], None] | None = None     # edits a copy of the runtime config
    argv: list[str] | None = None                   # run
    network: str | None = None                      # run
    sources: list[str] = field(default_factory=list)    # copy: source specs (expanded)
    dest: str = ""                                  # copy / workdir: absolute path
    dest_is_dir: bool = False
    chown: str | None = None
    chmod: int | None = None
    build_args: tuple[tuple[str, str], ...] = ()


def expand(state: StageState, inst: ins.Instruction, word: str, env: dict | None = None) -> str:
    try:
        return expand_word(word, state.env() if env is None else env, state.escape)
    except ExpansionError as e:
        raise DockerfileError(f"{inst.keyword}: {e}", line=inst.line) from None


def plan(state: StageState, inst: ins.Instruction) -> Plan:
    handler = _HANDLERS.get(type(inst))
    if handler is None:
        raise DockerfileError(f"{inst.keyword} is not supported by this version of pybuild",
                              line=inst.line)
    return handler(state, inst)


def _meta(instruction: dict, created_by: str, apply) -> Plan:
    return Plan("meta", instruction, created_by, apply=apply)


def _env(state: StageState, inst: ins.Env) -> Plan:
    env = state.env()
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
    text = "ENV " + " ".join(f"{k}={v}" for k, v in pairs)
    return _meta({"ENV": pairs}, text, apply)


def _label(state: StageState, inst: ins.Label) -> Plan:
    env = state.env()
    pairs = [(expand(state, inst, k, env), expand(state, inst, v, env)) for k, v in inst.pairs]

    def apply(rt: dict) -> None:
        labels = dict(rt.get("Labels") or {})
        labels.update(pairs)
        rt["Labels"] = labels
    return _meta({"LABEL": pairs}, "LABEL " + " ".join(f"{k}={v}" for k, v in pairs), apply)


def _command(state: StageState, inst) -> list[str]:
    if inst.exec_form:
        return list(inst.command)
    shell = state.runtime.get("Shell") or DEFAULT_SHELL
    return list(shell) + [inst.command[0]] if inst.command else []


def _cmd(state: StageState, inst: ins.Cmd) -> Plan:
    argv = _command(state, inst)

    def apply(rt: dict) -> None:
        rt["Cmd"] = argv
    return _meta({"CMD": argv}, "CMD " + _json_list(argv), apply)


def _entrypoint(state: StageState, inst: ins.Entrypoint) -> Plan:
    argv = _command(state, inst)
    reset_cmd = not state.cmd_set

    def apply(rt: dict) -> None:
        rt["Entrypoint"] = argv
        if reset_cmd:
            # A new ENTRYPOINT drops a CMD inherited from the base image (Docker does).
            rt.pop("Cmd", None)
    return _meta({"ENTRYPOINT": argv, "reset_cmd": reset_cmd}, "ENTRYPOINT " + _json_list(argv),
                 apply)


def _user(state: StageState, inst: ins.User) -> Plan:
    user = expand(state, inst, inst.user)

    def apply(rt: dict) -> None:
        rt["User"] = user
    return _meta({"USER": user}, "USER " + user, apply)


def _expose(state: StageState, inst: ins.Expose) -> Plan:
    ports: list[str] = []
    for raw in inst.ports:
        word = expand(state, inst, raw)
        port, _, proto = word.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise DockerfileError(f"EXPOSE {word}: invalid protocol {proto!r}", line=inst.line,
                                  hint="use tcp, udp or sctp")
        lo, _, hi = port.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DockerfileError(f"EXPOSE {word}: invalid port", line=inst.line,
                                  hint="EXPOSE 80, EXPOSE 53/udp or EXPOSE 8000-8010")
        for p in range(int(lo), int(hi or lo) + 1):
            ports.append(f"{p}/{proto}")

    def apply(rt: dict) -> None:
        exposed = dict(rt.get("ExposedPorts") or {})
        for p in ports:
            exposed[p] = {}
        rt["ExposedPorts"] = exposed
    return _meta({"EXPOSE": ports}, "EXPOSE " + " ".join(ports), apply)


def _workdir(state: StageState, inst: ins.Workdir) -> Plan:
    path = expand(state, inst, inst.path)
    current = state.runtime.get("WorkingDir") or "/"
    wd = posixpath.normpath(posixpath.join(current, path))
    if wd.startswith("//"):
        wd = "/" + wd.lstrip("/")

    def apply(rt: dict) -> None:
        rt["WorkingDir"] = wd
    kind = "workdir" if wd != "/" else "meta"
    return Plan(kind, {"WORKDIR": wd, "user": state.runtime.get("User", "")}, "WORKDIR " + wd,
                apply=apply, dest=wd)


def _run(state: StageState, inst: ins.Run) -> Plan:
    argv = _command(state, inst)
    args = tuple(state.arg_values())
    visible = [a for a in args if a[0] not in PROXY_ARGS]   # proxies stay out of history
    prefix = f"|{len(visible)} " + " ".join(f"{k}={v}" for k, v in visible) + " " if visible else ""
    return Plan("run", {"RUN": argv, "network": inst.network or ""}, "RUN " + prefix + " ".join(argv),
                argv=argv, network=inst.network, build_args=args)


def _copy(state: StageState, inst: ins.Copy) -> Plan:
    env = state.env()
    sources = [expand(state, inst, s, env) for s in inst.sources]
    dest_raw = expand(state, inst, inst.dest, env)
    chown = expand(state, inst, inst.chown, env) if inst.chown else None
    chmod = None
    if inst.chmod:
        text = expand(state, inst, inst.chmod, env)
        try:
            chmod = int(text, 8)
            if not 0 <= chmod <= 0o7777:
                raise ValueError
        except ValueError:
            raise DockerfileError(f"COPY --chmod={text}: not an octal mode", line=inst.line,
                                  hint="for example --chmod=755") from None
    if len(sources) > 1 and not dest_raw.endswith("/"):
        raise DockerfileError("when using COPY with more than one source file, the destination "
                              "must be a directory and end with a /", line=inst.line,
                              hint=f"write the destination as {dest_raw}/")
    workdir = state.runtime.get("WorkingDir") or "/"
    dest_is_dir = dest_raw.endswith("/") or dest_raw in (".", "..") or dest_raw.endswith("/.")
    dest = posixpath.normpath(posixpath.join(workdir, dest_raw)) if dest_raw else workdir
    if dest.startswith("//"):
        dest = "/" + dest.lstrip("/")
    flags = []
    if chown:
        flags.append(f"--chown={chown}")
    if chmod is not None:
        flags.append(f"--chmod={chmod:o}")
    text = "COPY " + " ".join(flags + sources + [dest_raw])
    return Plan("copy", {"COPY": sources, "dest": dest, "dest_is_dir": dest_is_dir,
                         "chown": chown, "chmod": chmod},
                text, sources=sources, dest=dest, dest_is_dir=dest_is_dir, chown=chown,
                chmod=chmod)


def _json_list(argv: list[str]) -> str:
    return json.dumps(argv, ensure_ascii=False)


def apply_to_copy(runtime: dict, fn) -> dict:
    rt = copy.deepcopy(runtime)
    if fn is not None:
        fn(rt)
    return rt


_HANDLERS = {
    ins.Env: _env, ins.Label: _label, ins.Cmd: _cmd, ins.Entrypoint: _entrypoint,
    ins.User: _user, ins.Expose: _expose, ins.Workdir: _workdir, ins.Run: _run, ins.Copy: _copy,
}
