"""The build engine: Dockerfile + context -> image in the store, step by step, through the cache.

(DESIGN.md calls this module build.py; it is engine.py so that the module
does not shadow the public function `builder.build`.)

For each stage the target needs, the engine starts from the base image and,
for every instruction, asks `steps.plan` what it means, computes its cache
key, and either reuses the cached result or carries it out: metadata steps
edit the config, RUN runs in the sandbox over an overlay snapshot, COPY and
WORKDIR write through a chrooted snapshot, and a changed upper dir is
committed as a layer. Each step appends one history entry (empty_layer
when it added no layer). Everything the engine does is reported as events.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import cache as cachemod, fileops, reference, sandbox, steps
from .context import BuildContext
from .dockerfile import instructions as ins
from .dockerfile.shell import ExpansionError, expand_word
from .errors import BuildError, DockerfileError, StepFailed, UsageError
from .image import (Image, canonical_json, chain_ids, digest_of, empty_config,
                    host_architecture)
from .layer import commit
from .progress import (BuildDone, BuildStarted, BuildWarning, Event, StepCached, StepDone,
                       StepOutput, StepStarted)
from .snapshot import overlay
from .store import Store, remove_tree

HISTORY_COMMENT = "pybuild.dockerfile.v0"


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides a build; the CLI and the library both fill one in."""
    context: str = "."
    dockerfile: str | None = None               # default: CONTEXT/Dockerfile
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    no_cache: bool = False
    network: str = "host"                       # host | none: the default for RUN
    target: str | None = None
    root: str | None = None                     # the store; default PYBUILD_ROOT or /var/lib/pybuild


def build(context: str = ".", *, dockerfile: str | None = None, tags=(), build_args=None,
          no_cache: bool = False, network: str = "host", target: str | None = None,
          root: str | None = None, on_event: Callable[[Event], None] | None = None) -> Image:
    """Build an image from a Dockerfile and return it (already stored and tagged)."""
    opts = BuildOptions(context=context, dockerfile=dockerfile, tags=tuple(tags or ()),
                        build_args=dict(build_args or {}), no_cache=no_cache, network=network,
                        target=target, root=root)
    return Builder(opts, on_event).run()


class Builder:
    def __init__(self, opts: BuildOptions, on_event: Callable[[Event], None] | None = None,
                 store: Store | None = None):
        if opts.network not in ("host", "none", "default"):
            raise UsageError(f"--network {opts.network}: must be host or none")
        self.opts = opts
        self.emit = on_event or (lambda ev: None)
        self.store = store
        self.tags = [reference.parse(t).tagged for t in opts.tags]
        self.dockerfile_path = opts.dockerfile or os.path.join(opts.context, "Dockerfile")
        self.used_args: set[str] = set()
        self.step_no = 0
        self.total = 0
        self.steps_run = 0
        self.steps_cached = 0

    # ---- the whole build --------------------------------------------------------

    def run(self) -> Image:
        started = time.monotonic()
        df = self._load_dockerfile()
        if os.geteuid() != 0:
            raise BuildError("building needs root: RUN steps use kernel overlay mounts and "
                             "namespaces", hint="run pybuild as root (rootless builds are not "
                                                "supported yet)")
        if self.store is None:
            self.store = Store(self.opts.root)
        self.ctx = BuildContext(self.opts.context, self.dockerfile_path)
        self.cache = cachemod.StepCache(self.store)
        meta_env = self._meta_args(df)
        target = df.stage(self.opts.target)
        needed = self._needed_stages(df, target, meta_env)
        self.total = sum(1 + len(st.instructions) for st in needed)
        self.emit(BuildStarted(self.dockerfile_path, self.ctx.root, self.total))
        finished: dict[int, steps.StageState] = {}
        with self.store.in_use(), self.store.tmpdir("build") as workdir:
            self.workdir = workdir
            for stage in needed:
                finished[stage.index] = self._build_stage(df, stage, meta_env, finished)
        state = finished[target.index]
        self._warn_unused_args(df)
        image = self.store.write_image(state.config, state.layers, self.tags)
        self.emit(BuildDone(image.id, tuple(self.tags), time.monotonic() - started,
                            self.steps_run, self.steps_cached))
        return image

    def _load_dockerfile(self) -> ins.Dockerfile:
        try:
            with open(self.dockerfile_path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DockerfileError("no such file", file=self.dockerfile_path,
                                  hint="pass the Dockerfile with -f, or put one in the context "
                                       "directory") from None
        except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
            raise DockerfileError(f"cannot read it ({e})", file=self.dockerfile_path) from None
        return ins.load(text, filename=self.dockerfile_path)

    def _expand(self, word: str, env: dict, line: int) -> str:
        try:
            return expand_word(word, env)
        except ExpansionError as e:
            raise DockerfileError(str(e), file=self.dockerfile_path, line=line) from None

    def _meta_args(self, df: ins.Dockerfile) -> dict[str, str | None]:
        """ARGs before the first FROM: visible in FROM lines, and as defaults for stage ARGs."""
        env: dict[str, str | None] = {}
        for a in df.meta_args:
            for name, default in a.pairs:
                self.used_args.add(name)
                if name in self.opts.build_args:
                    env[name] = self.opts.build_args[name]
                elif default is not None:
                    env[name] = self._expand(default, {k: v for k, v in env.items() if v is not None},
                                             a.line)
                else:
                    env[name] = None
        return env

    def _base_name(self, stage: ins.Stage, meta_env: dict) -> str:
        return self._expand(stage.base.image, {k: v for k, v in meta_env.items() if v is not None},
                            stage.base.line)

    def _needed_stages(self, df: ins.Dockerfile, target: ins.Stage, meta_env: dict) -> list[ins.Stage]:
        """The target and the stages it builds on; stages nothing needs are not built."""
        by_name = {st.name: st for st in df.stages if st.name}
        needed: set[int] = set()
        todo = [target]
        while todo:
            st = todo.pop()
            if st.index in needed:
                continue
            needed.add(st.index)
            base = by_name.get(self._base_name(st, meta_env).lower())
            if base is not None and base.index < st.index:
                todo.append(base)
        return [st for st in df.stages if st.index in needed]

    def _warn_unused_args(self, df: ins.Dockerfile) -> None:
        unused = sorted(set(self.opts.build_args) - self.used_args - set(steps.PROXY_ARGS))
        if unused:
            self.emit(BuildWarning(f"one or more build args were not consumed: {', '.join(unused)}"))

    # ---- one stage ------------------------------------------------------------------

    def _build_stage(self, df: ins.Dockerfile, stage: ins.Stage, meta_env: dict,
                     finished: dict[int, steps.StageState]) -> steps.StageState:
        label = stage.name or f"stage-{stage.index}"
        state = self._from(df, stage, meta_env, finished, label)
        for inst in stage.instructions:
            self._step(state, inst, label, meta_env)
        return state

    def _from(self, df, stage: ins.Stage, meta_env: dict, finished, label: str) -> steps.StageState:
        self.step_no += 1
        name = self._base_name(stage, meta_env)
        self.emit(StepStarted(self.step_no, self.total, label, f"FROM {name}", stage.base.line))
        if stage.base.platform:
            platform = self._expand(stage.base.platform,
                                    {k: v for k, v in meta_env.items() if v is not None},
                                    stage.base.line)
            host = f"linux/{host_architecture()}"
            if platform.split("/")[:2] != host.split("/"):
                raise DockerfileError(f"FROM --platform={platform}: this host builds {host} only",
                                      file=self.dockerfile_path, line=stage.base.line)
        by_name = {st.name: st.index for st in df.stages if st.name}
        if name == "scratch":
            config, layers = empty_config(), []
        elif name.lower() in by_name and by_name[name.lower()] in finished:
            base = finished[by_name[name.lower()]]
            config, layers = copy.deepcopy(base.config), list(base.layers)
        else:
            image = self.store.resolve(name)
            config, layers = copy.deepcopy(image.config), list(image.layers)
            if (config.get("config") or {}).get("OnBuild"):
                raise BuildError(f"the base image {name} has ONBUILD triggers, which this "
                                 "version of pybuild cannot run yet",
                                 step=self._where(stage.base))
        config.setdefault("config", {})
        config.setdefault("history", [])
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        self.emit(StepDone(self.step_no, 0.0, cached=True))
        return steps.StageState(label, config, layers, escape=df.escape)

    def _where(self, inst) -> str:
        return f"{self.dockerfile_path}:{inst.line} [{self.step_no}/{self.total}] {inst.keyword}"

    def _step(self, state: steps.StageState, inst: ins.Instruction, label: str, meta_env: dict) -> None:
        self.step_no += 1
        n = self.step_no
        if isinstance(inst, ins.Arg):
            self._arg(state, inst, meta_env, label)
            return
        try:
            plan = steps.plan(state, inst)
        except DockerfileError as e:
            raise DockerfileError(e.reason, file=self.dockerfile_path, line=inst.line,
                                  hint=e.hint) from None
        if isinstance(inst, ins.Cmd):
            state.cmd_set = True
        self.emit(StepStarted(n, self.total, label, plan.created_by, inst.line))
        t0 = time.monotonic()
        sources = []
        if plan.kind == "copy":
            try:
                sources = [s for spec in plan.sources for s in self.ctx.sources(spec)]
            except BuildError as e:
                raise BuildError(e.reason, step=self._where(inst), hint=e.hint) from None
        key = cachemod.StepKey(
            parent=digest_of(canonical_json(state.config)), instruction=plan.instruction,
            build_args=plan.build_args, sources=tuple(self.ctx.digest(s) for s in sources)).digest()
        diff_ids = [l.diff_id for l in state.layers]
        cached = None if self.opts.no_cache else self.cache.get(key, diff_ids)
        if cached is not None:
            self._apply(state, cached)
            self.steps_cached += 1
            self.emit(StepCached(n))
            self.emit(StepDone(n, time.monotonic() - t0, cached=True))
            return
        runtime = steps.apply_to_copy(state.runtime, plan.apply)
        layer = None
        if plan.kind != "meta":
            layer = self._filesystem_step(state, inst, plan, sources, n)
        history = {"created": cachemod.now(), "created_by": plan.created_by,
                   "comment": HISTORY_COMMENT}
        if layer is None:
            history["empty_layer"] = True
        extra = {"chain": chain_ids(diff_ids + [layer.diff_id])[-1]} if layer else {}
        result = cachemod.StepResult(history, runtime, layer, extra)
        self.cache.put(key, result)
        self._apply(state, result)
        self.steps_run += 1
        self.emit(StepDone(n, time.monotonic() - t0, cached=False,
                           layer_size=layer.size if layer else None))

    def _arg(self, state: steps.StageState, inst: ins.Arg, meta_env: dict, label: str) -> None:
        self.emit(StepStarted(self.step_no, self.total, label, inst.text, inst.line))
        for name, default in inst.pairs:
            self.used_args.add(name)
            if name in self.opts.build_args:
                value = self.opts.build_args[name]
            elif default is not None:
                value = self._expand(default, state.env(), inst.line)
            else:
                value = meta_env.get(name)
            state.args[name] = value
        self.emit(StepDone(self.step_no, 0.0, cached=True))

    @staticmethod
    def _apply(state: steps.StageState, result: cachemod.StepResult) -> None:
        cfg = state.config
        cfg["config"] = copy.deepcopy(result.runtime)
        cfg["history"] = list(cfg.get("history") or []) + [dict(result.history)]
        if result.layer is not None:
            cfg["rootfs"] = {"type": "layers",
                             "diff_ids": list(cfg["rootfs"]["diff_ids"]) + [result.layer.diff_id]}
            state.layers.append(result.layer)
        cfg["created"] = result.history["created"]

    # ---- steps that change files ---------------------------------------------------

    def _filesystem_step(self, state, inst, plan: steps.Plan, sources, n: int):
        diff_ids = [l.diff_id for l in state.layers]
        stepdir = os.path.join(self.workdir, f"step-{n}")
        os.mkdir(stepdir, 0o700)
        try:
            snap = overlay.prepare(self.store, diff_ids, stepdir)
            try:
                if plan.kind == "run":
                    self._run(state, inst, plan, snap, stepdir, n)
                elif plan.kind == "copy":
                    op = fileops.CopyOp(tuple(sources), plan.dest, plan.dest_is_dir, plan.chown,
                                        plan.chmod)
                    ctx_fd = os.open(self.ctx.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        sandbox.run_in_root(snap, lambda: fileops.copy_into_root(op, ctx_fd))
                    finally:
                        os.close(ctx_fd)
                elif plan.kind == "workdir":
                    user = state.runtime.get("User", "")
                    sandbox.run_in_root(snap, lambda: fileops.mkdir_workdir(plan.dest, user))
            except sandbox.SetupError as e:
                raise BuildError(str(e), step=self._where(inst), hint=e.hint) from None
            parent = chain_ids(diff_ids)[-1] if diff_ids else None
            return commit.commit_upper(self.store, snap.upper, parent, created_by=plan.created_by)
        finally:
            remove_tree(stepdir)

    def _run(self, state, inst, plan: steps.Plan, snap, stepdir: str, n: int) -> None:
        rt = state.runtime
        env = list(rt.get("Env") or []) + [f"{k}={v}" for k, v in plan.build_args]
        declared = {k for k, _ in plan.build_args} | {e.partition("=")[0] for e in env}
        env += [f"{k}={v}" for k, v in self.opts.build_args.items()
                if k in steps.PROXY_ARGS and k not in declared]
        network = plan.network or self.opts.network
        spec = sandbox.RunSpec(argv=plan.argv, env=env, user=rt.get("User") or "",
                               workdir=rt.get("WorkingDir") or "/",
                               network="host" if network == "default" else network)
        scratch = os.path.join(stepdir, "scratch")
        os.mkdir(scratch, 0o700)

        def on_output(line: bytes) -> None:
            self.emit(StepOutput(n, line.decode("utf-8", "replace").rstrip("\r")))
        status = sandbox.run(snap, spec, scratch, on_output)
        if status != 0:
            raise StepFailed(step=f"step {n}/{self.total}", line=inst.line,
                             file=self.dockerfile_path, command=plan.created_by, exit_code=status)
