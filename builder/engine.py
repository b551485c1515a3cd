"""The build engine: Dockerfile + context -> image in the store, step by step, through the cache.

(DESIGN.md calls this module build.py; it is engine.py so that the module
does not shadow the public function `builder.build`.)

The engine works out which stages the target needs (FROM, `COPY --from`,
`RUN --mount=from=`), numbers their steps, and builds them, independent
stages in parallel threads. For every step it asks `steps.plan` what the
instruction means, computes its cache key, and either reuses the cached
result or carries it out: metadata steps edit the config, RUN runs in the
sandbox over an overlay snapshot, COPY/ADD/WORKDIR write through a chrooted
snapshot, and a changed upper dir is committed as a layer. Each step appends
one history entry (empty_layer when it added no layer). Everything the
engine does is reported as events.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import threading
import time
from dataclasses import field
from collections.abc import Callable, Mapping

from .record import record
from . import cache as cachemod, explain, named_contexts, reference, snapshot, steps
from .run_options import parse_add_host, parse_ulimit
from .context import BuildContext
from .dockerfile import instructions as ins
from .dockerfile.shell import ExpansionError, expand_word
from .errors import (BuildError, DockerfileError, ImageNotFound, Interrupted, PybuildError,
                     StepFailed, StoreError, UsageError, os_error_hint, os_error_text)
from .inputs import StepInputs, digest_deferred, only_context_sources, read_inputs
from .image import (Image, canonical_json, chain_ids, digest_of, empty_config, host_architecture,
                    is_host_platform)
from .progress import (BuildDone, BuildStarted, BuildWarning, CacheMiss, Event, StepCached, StepDone,
                       StepStarted)
from .layer import COMPRESSIONS, DEFAULT_COMPRESSION
from .store import Store

TYPE_CHECKING = False   # (the typing module costs a cached build 3 ms to import)
if TYPE_CHECKING:      # (imported when used: a cached build should not pay for them)
    from .outputs import OutputSpec
    from .remote_cache import CacheSpec

HISTORY_COMMENT = "pybuild.dockerfile.v0"


@record
class BuildOptions:
    """Everything that decides a build; the CLI and the library both fill one in."""
    context: str = "."
    dockerfile: str | None = None               # default: CONTEXT/Dockerfile
    dockerfile_name: str | None = None          # what messages call it (default: its path)
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    no_cache: bool = False
    no_cache_filter: tuple[str, ...] = ()       # stages (by name) built without the cache
    network: str = "host"                       # host | none: the default for RUN
    target: str | None = None
    root: str | None = None                     # the store; default PYBUILD_ROOT or /var/lib/pybuild
    storage_driver: str | None = None           # overlay | fuse | vfs (a new store; see snapshot/)
    secrets: Mapping[str, str | bytes] = field(default_factory=dict)   # id -> file path, or the value
    pull: str = "missing"                       # base images: always | missing | never
    insecure_registries: tuple[str, ...] = ()   # plain HTTP allowed (localhost always is)
    push: bool = False                          # push every tag after the build
    cache_to: tuple[CacheSpec, ...] = ()        # export the step cache (remote_cache.py)
    cache_from: tuple[CacheSpec, ...] = ()      # import step caches
    outputs: tuple[OutputSpec, ...] = ()        # also write the image there (outputs.py)
    compression: str = DEFAULT_COMPRESSION     # of new layers: uncompressed | gzip | zstd
    source_date_epoch: int | None = None        # clamp every time in the image to this (seconds)
    labels: Mapping[str, str] = field(default_factory=dict)   # added to the image's config
    platform: str | None = None                 # must be this host's (no emulation): linux/amd64
    add_hosts: tuple[tuple[str, str], ...] = ()  # (name, address) lines for RUN's /etc/hosts
    ssh: Mapping[str, str] = field(default_factory=dict)  # agent id -> socket ("": $SSH_AUTH_SOCK)
    shm_size: int | None = None                 # bytes of RUN's /dev/shm (None: 64 MiB)
    build_contexts: Mapping[str, str] = field(default_factory=dict)  # name -> dir | docker-image://
    ulimits: tuple[tuple[str, int, int], ...] = ()   # (nofile, soft, hard) for RUN; -1: unlimited
    annotations: Mapping[str, str] = field(default_factory=dict)   # on the image's manifest


def build(context: str = ".", *, dockerfile: str | None = None,
          dockerfile_name: str | None = None, tags=(), build_args=None,
          no_cache: bool = False, no_cache_filter=(), network: str = "host",
          target: str | None = None,
          root: str | None = None, secrets=None, pull: str = "missing",
          insecure_registries=(), push: bool = False, cache_to=(), cache_from=(), outputs=(),
          compression: str = DEFAULT_COMPRESSION, source_date_epoch: int | None = None,
          storage_driver: str | None = None, labels=None, platform: str | None = None,
          add_hosts=(), ssh=None, shm_size: int | None = None, build_contexts=None,
          ulimits=(), annotations=None,
          on_event: Callable[[Event], None] | None = None) -> Image:
    """Build an image from a Dockerfile and return it (already stored and tagged).

    `cache_to`, `cache_from` and `outputs` take specs or their command-line
    strings (`"type=registry,ref=REF"`, `"type=local,dest=DIR"`, ...); `add_hosts`
    takes (name, address) pairs or Docker's `NAME:ADDRESS` strings.
    """
    from . import outputs as out_mod, remote_cache
    opts = BuildOptions(
        context=context, dockerfile=dockerfile, dockerfile_name=dockerfile_name,
        tags=tuple(tags or ()),
        build_args=dict(build_args or {}), no_cache=no_cache,
        no_cache_filter=tuple(no_cache_filter), network=network, target=target,
        root=root, secrets=dict(secrets or {}), pull=pull,
        insecure_registries=tuple(insecure_registries), push=push,
        cache_to=tuple(remote_cache.parse_spec(c, export=True) if isinstance(c, str) else c
                       for c in cache_to),
        cache_from=tuple(remote_cache.parse_spec(c, export=False) if isinstance(c, str) else c
                         for c in cache_from),
        outputs=tuple(out_mod.parse_spec(o) if isinstance(o, str) else o for o in outputs),
        compression=compression, source_date_epoch=source_date_epoch,
        storage_driver=storage_driver, labels=dict(labels or {}), platform=platform,
        add_hosts=tuple(parse_add_host(h) if isinstance(h, str) else tuple(h) for h in add_hosts),
        ssh=dict(ssh or {}), shm_size=shm_size, build_contexts=dict(build_contexts or {}),
        ulimits=tuple(parse_ulimit(u) if isinstance(u, str) else tuple(u) for u in ulimits),
        annotations=dict(annotations or {}))
    return Builder(opts, on_event).run()


@record(frozen=False)
class _StagePlan:
    """A stage to build: its base, its step numbers and the stages it waits for."""
    stage: ins.Stage
    label: str
    base_name: str
    base_stage: int | None                     # index of the stage it builds on
    base_image: Image | None
    triggers: list[ins.Instruction]
    deps: set[int]                             # stages it needs (base, --from, mounts)
    numbers: list[int] = field(default_factory=list)    # step numbers: FROM, triggers, body
    first_miss: str | None = None              # "step 4: <reason>", for the steps after it
    base_layers: int = 0                       # layers the stage starts with


class Builder:
    def __init__(self, opts: BuildOptions, on_event: Callable[[Event], None] | None = None,
                 store: Store | None = None):
        if opts.network not in ("host", "none", "default"):
            raise UsageError(f"--network {opts.network}: must be host or none")
        if opts.pull not in ("always", "missing", "never"):
            raise UsageError(f"--pull {opts.pull}: must be always, missing or never")
        if opts.compression not in COMPRESSIONS:
            raise UsageError(f"--compression {opts.compression}: must be one of "
                             + ", ".join(COMPRESSIONS))
        if opts.shm_size is not None and opts.shm_size < 4096:
            raise UsageError(f"--shm-size {opts.shm_size}: too small for /dev/shm",
                             hint="give a size such as 64m or 1g")
        if opts.platform and not is_host_platform(opts.platform):
            raise UsageError(f"--platform {opts.platform}: this machine builds "
                             f"linux/{host_architecture()} images only",
                             hint="RUN steps execute natively here (no emulation): build on a "
                                  "machine of that platform, or leave --platform out")
        if (opts.push or any(o.type == "registry" for o in opts.outputs)) and not opts.tags:
            raise UsageError("--push needs a name to push to", hint="add -t REGISTRY/REPO:TAG")
        self.opts = opts
        if opts.ssh:
            from .sshagent import agent_socket
            self.ssh_agents = {k: agent_socket(k, v) for k, v in opts.ssh.items()}
        else:
            self.ssh_agents = {}
        self._emit = on_event or (lambda ev: None)
        self._lock = threading.Lock()
        self.store = store
        self.tags = [reference.parse(t).tagged for t in opts.tags]
        self.dockerfile_path = opts.dockerfile or os.path.join(opts.context, "Dockerfile")
        # (A Dockerfile read from stdin is a temp file: messages say "<stdin>", and its
        # steps' recipes are kept for the context, not for a path that is gone tomorrow.)
        self.dockerfile_name = opts.dockerfile_name or self.dockerfile_path
        self.used_args: set[str] = set()
        self.total = 0
        self.steps_run = 0
        self.steps_cached = 0
        self.cancelled = threading.Event()
        self.executor = None
        self.pushed = None           # --push: the last tag's transfer.PushResult
        self._resolved: dict[str, Image] = {}
        self.named = named_contexts.parse(opts.build_contexts)     # --build-context
        self._named_dirs: dict[str, BuildContext] = {}
        self._resolve_lock = threading.Lock()
        arch = host_architecture()
        platform = f"linux/{arch}"
        self.automatic_args = {"TARGETPLATFORM": platform, "TARGETOS": "linux", "TARGETARCH": arch,
                               "TARGETVARIANT": "", "BUILDPLATFORM": platform, "BUILDOS": "linux",
                               "BUILDARCH": arch, "BUILDVARIANT": ""}

    def emit(self, ev: Event) -> None:
        with self._lock:
            self._emit(ev)

    # ---- the whole build --------------------------------------------------------

    def run(self) -> Image:
        started = time.monotonic()
        df = self._load_dockerfile()
        if os.geteuid() != 0:
            raise BuildError("building needs root, or root of a user namespace: RUN steps use "
                             "mounts and namespaces",
                             hint="the pybuild command enters a user namespace by itself; from "
                                  "Python, call builder.rootless.enter() first (it forks)")
        if self.store is None:
            self.store = Store(self.opts.root, driver=self.opts.storage_driver)
        self.ctx = BuildContext(self.opts.context, self.dockerfile_path,
                                cache_dir=os.path.join(self.store.cache_dir, "context"))
        self.cache = cachemod.StepCache(self.store)
        self.used: dict[int, dict[str, cachemod.StepResult]] = {}  # stage -> key -> result
        self.recipes = explain.RecipeLog(
            self.store.cache_dir, self.dockerfile_path if self.opts.dockerfile_name is None
            else os.path.join(self.opts.context, self.opts.dockerfile_name))
        self.df = df
        for w in df.warnings:
            self.emit(BuildWarning(w))
        self.meta_env = self._meta_args(df)
        for name in self.named.dirs:
            if any(st.name == name for st in df.stages):
                raise UsageError(f"--build-context {name}: a stage of {self.dockerfile_name} has "
                                 "this name, and only an image (docker-image://) can replace a "
                                 "stage here", hint="rename the stage or the context")
        target = df.stage(self.opts.target)
        for name in self.opts.no_cache_filter:
            df.stage(name, option="--no-cache-filter")       # (a typo is an error, not a no-op)
        plans = self._plan_stages(df, target)
        self.emit(BuildStarted(self.dockerfile_name, self.ctx.root, self.total))
        self.results: dict = {}      # stage index -> its result (a Future when parallel)
        self.remote = None
        try:
            with self.store.in_use(), self.store.tmpdir("build") as workdir:
                try:
                    if self.opts.cache_from and not self.opts.no_cache:
                        self.remote = self._import_caches()
                    self.workdir = workdir
                    if len(plans) == 1:
                        self.results[plans[0].stage.index] = _Done(self._build_stage(plans[0]))
                    else:
                        self._build_parallel(plans)
                    state = self.results[target.index].result()
                finally:
                    snapshot.finish_background_work()
                    if self.executor is not None:
                        # (and let go of it: it refers back to this Builder, a cycle only a
                        # full collection would free, with every entry of the context)
                        self.executor, executor = None, self.executor
                        executor.close()
        finally:
            for ctx in (self.ctx, *self._named_dirs.values()):
                ctx.save()      # what was hashed stays hashed, even if a later step failed
            self.recipes.flush()
            if self.remote is not None:
                self.remote.close()
        self._warn_unused_args()
        config = state.config
        if self.opts.labels:
            # As BuildKit: on the image's config, with no history entry of their own.
            config = copy.deepcopy(config)
            runtime = config.setdefault("config", {})
            runtime["Labels"] = {**(runtime.get("Labels") or {}), **self.opts.labels}
        image = self.store.write_image(config, state.layers, self.tags,
                                       annotations=dict(self.opts.annotations))
        self._deliver(image, plans, target)
        base_layers = next(p.base_layers for p in plans if p.stage.index == target.index)
        self.emit(BuildDone(image.id, tuple(self.tags), time.monotonic() - started,
                            self.steps_run, self.steps_cached,
                            size=self.store.content_size(image.diff_ids),
                            layers_added=len(state.layers) - base_layers))
        return image

    @functools.cached_property
    def insecure(self) -> tuple[str, ...]:
        """Registries reachable over plain HTTP (--insecure-registry, $PYBUILD_INSECURE_REGISTRIES)."""
        from .api import insecure_registries
        return insecure_registries(self.opts.insecure_registries)

    def _import_caches(self):
        from . import remote_cache
        return remote_cache.CacheImport(self.store, self.opts.cache_from, emit=self.emit,
                                        insecure=self.insecure)

    def _deliver(self, image: Image, plans: list[_StagePlan], target: ins.Stage) -> None:
        """After the image is stored: --cache-to, --output and --push."""
        if not (self.opts.cache_to or self.opts.outputs or self.opts.push):
            return
        from . import outputs, remote_cache
        plan_of = {p.stage.index: p for p in plans}
        final_stages, index = set(), target.index       # the target and the stages it is FROM
        while index is not None:
            final_stages.add(index)
            index = plan_of[index].base_stage
        for spec in self.opts.cache_to:
            entries = {k: r for stage, used in self.used.items() for k, r in used.items()
                       if spec.mode == "max" or stage in final_stages}
            remote_cache.export(self.store, spec, entries, insecure=self.insecure, emit=self.emit)
        for spec in self.opts.outputs:
            outputs.write(self.store, image, spec)
        if self.opts.push or any(o.type == "registry" for o in self.opts.outputs):
            from .registry import transfer
            for tag in self.tags:
                self.pushed = transfer.push(self.store, tag, insecure=self.insecure,
                                            on_event=self.emit)

    def _build_parallel(self, plans: list[_StagePlan]) -> None:
        """Independent stages at the same time; a failure or Ctrl-C stops all of them."""
        import concurrent.futures      # (and logging with it): only multi-stage builds pay
        workers = min(4, len(plans))
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="pybuild-stage")
        try:
            for p in plans:            # in order: a stage only waits for earlier ones
                self.results[p.stage.index] = pool.submit(self._build_stage, p)
            futures = list(self.results.values())
            done, _ = concurrent.futures.wait(futures,
                                              return_when=concurrent.futures.FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                self.cancelled.set()
                _kill_sandboxes()
                concurrent.futures.wait(futures)
                errors = [f.exception() for f in futures if f.exception()]
                # The stage that failed first, not the ones stopped because of it.
                real = [e for e in errors if not isinstance(e, Interrupted) and
                        not (isinstance(e, StepFailed) and e.status == 137)]
                raise (real or errors)[0]
        except BaseException:
            self.cancelled.set()
            _kill_sandboxes()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

    def _stage_state(self, index: int) -> steps.StageState:
        return self.results[index].result()

    def _load_dockerfile(self) -> ins.Dockerfile:
        try:
            with open(self.dockerfile_path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise DockerfileError("no such file", file=self.dockerfile_name,
                                  hint="pass the Dockerfile with -f, or put one in the context "
                                       "directory") from None
        except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
            raise DockerfileError(f"cannot read it ({e})", file=self.dockerfile_name) from None
        return ins.load(text, filename=self.dockerfile_name)

    def _expand(self, word: str, env: dict, line: int) -> str:
        try:
            return expand_word(word, env)
        except ExpansionError as e:
            raise DockerfileError(str(e), file=self.dockerfile_name, line=line) from None

    def _global_env(self) -> dict[str, str]:
        env = dict(self.automatic_args)
        env.update({k: v for k, v in self.meta_env.items() if v is not None})
        return env

    def _meta_args(self, df: ins.Dockerfile) -> dict[str, str | None]:
        """ARGs before the first FROM: visible in FROM lines, and as defaults for stage ARGs."""
        env: dict[str, str | None] = {}
        for a in df.meta_args:
            for name, default in a.pairs:
                self.used_args.add(name)
                if name in self.opts.build_args:
                    env[name] = self.opts.build_args[name]
                elif default is not None:
                    scope = dict(self.automatic_args)
                    scope.update({k: v for k, v in env.items() if v is not None})
                    env[name] = self._expand(default, scope, a.line)
                else:
                    env[name] = self.automatic_args.get(name)
        return env

    # ---- planning -----------------------------------------------------------------

    def _stage_ref(self, df: ins.Dockerfile, ref: str, before: int) -> int | None:
        """The stage a `--from` or FROM names (by name, or by index for --from), if any: of
        two earlier stages with the name, the later, as in BuildKit."""
        for st in reversed(df.stages):
            if st.index < before and st.name == ref.lower():
                return st.index
        if ref.isdigit() and int(ref) < before:
            return int(ref)
        return None

    def _plan_stages(self, df: ins.Dockerfile, target: ins.Stage) -> list[_StagePlan]:
        """The target and the stages it builds on, with bases resolved and steps numbered."""
        genv = self._global_env()
        plans: dict[int, _StagePlan] = {}
        todo = [target.index]
        while todo:
            index = todo.pop()
            if index in plans:
                continue
            st = self._replaced(df.stages[index])
            base_name = self._expand(st.base.image, genv, st.base.line)
            deps: set[int] = set()
            base_stage = None
            if not base_name.isdigit():
                base_stage = self._stage_ref(df, base_name, st.index)
            if base_stage is not None:
                deps.add(base_stage)
            for inst in st.instructions:
                for ref in self._refs(inst, genv):
                    dep = self._stage_ref(df, ref, st.index)
                    if dep is not None:
                        deps.add(dep)
            base_image, triggers = None, []
            if base_stage is None and base_name != "scratch":
                base_image = self._resolve_image(base_name, st.base)
                if st is df.stages[index]:          # (a replaced stage is the image, as it is)
                    triggers = self._triggers(base_image.runtime.get("OnBuild") or [], st.base)
            elif base_stage is not None:
                base = self._replaced(df.stages[base_stage])
                triggers = self._triggers([i.expression for i in base.instructions
                                           if isinstance(i, ins.Onbuild)], st.base)
            plans[index] = _StagePlan(st, st.name or f"stage-{st.index}", base_name, base_stage,
                                      base_image, triggers, deps)
            todo.extend(deps)
        ordered = [plans[i] for i in sorted(plans)]
        n = 0
        for p in ordered:
            count = 1 + len(p.triggers) + len(p.stage.instructions)
            p.numbers = list(range(n + 1, n + count + 1))
            n += count
        self.total = n
        return ordered

    def _replaced(self, st: ins.Stage) -> ins.Stage:
        """The stage, or what a --build-context NAME=docker-image://REF with its name makes of
        it, as in BuildKit: `FROM REF AS NAME` and nothing else (its steps never run)."""
        ref = self.named.image_for(st.name) if st.name else None
        if ref is None:
            return st
        return ins.Stage(st.index, dataclasses.replace(st.base, image=ref,
                                                       text=f"FROM {ref} AS {st.name}"), ())

    def _refs(self, inst: ins.Instruction, genv: dict) -> list[str]:
        out = []
        if isinstance(inst, ins.Copy) and inst.from_:
            out.append(self._expand(inst.from_, genv, inst.line))
        if isinstance(inst, ins.Run):
            out += [self._expand(m.from_, genv, inst.line) for m in inst.mounts if m.from_]
        return out

    def _resolve_image(self, name: str, inst) -> Image:
        """A base or --from image: from the store, pulled when missing (or always, per --pull);
        a --build-context NAME=docker-image://REF stands in for NAME."""
        if name.lower() in self.named.dirs:
            raise BuildError(f"{self.dockerfile_name}:{inst.line}: build context {name} is a "
                             "directory, not an image",
                             hint="a directory context is read by COPY --from and "
                                  "RUN --mount=type=bind,from; give FROM an image "
                                  "(--build-context NAME=docker-image://REF)")
        name = self.named.image_for(name) or name
        with self._resolve_lock:             # parallel stages may name the same image
            if name in self._resolved:
                return self._resolved[name]
            try:
                if self.opts.pull == "always" and _pullable(name):
                    image = self._pull(name)
                else:
                    try:
                        image = self.store.resolve(name)
                    except ImageNotFound:
                        if self.opts.pull == "never" or not _pullable(name):
                            raise
                        image = self._pull(name)
            except PybuildError as e:
                e.message = f"{self.dockerfile_name}:{inst.line}: {e.message}"
                raise
            self._resolved[name] = image
            return image

    def _pull(self, name: str) -> Image:
        from .registry import transfer
        with self.store.in_use():            # (planning runs before the build holds it)
            return transfer.pull(self.store, name, on_event=self.emit, insecure=self.insecure)

    def _triggers(self, expressions: list[str], base: ins.From) -> list[ins.Instruction]:
        return [ins.parse_trigger(x, filename=self.dockerfile_name, line=base.line,
                                  escape=self.df.escape) for x in expressions]

    def _warn_unused_args(self) -> None:
        unused = sorted(set(self.opts.build_args) - self.used_args - set(steps.PROXY_ARGS))
        # BuildKit's own switches (CI jobs pass BUILDKIT_INLINE_CACHE=1 to every builder): not
        # "not consumed", but without effect here, and said so once.
        buildkit = [a for a in unused if a.startswith("BUILDKIT_")]
        unused = [a for a in unused if a not in buildkit]
        if unused:
            self.emit(BuildWarning(f"one or more build args were not consumed: {', '.join(unused)}"))
        if buildkit:
            hint = (" (a step cache others can use: --cache-to type=registry,ref=REF)"
                    if "BUILDKIT_INLINE_CACHE" in buildkit else "")
            self.emit(BuildWarning(f"BuildKit's own build args have no effect on pybuild: "
                                   f"{', '.join(buildkit)}{hint}"))

    # ---- one stage ------------------------------------------------------------------

    def _build_stage(self, plan: _StagePlan) -> steps.StageState:
        state = self._from(plan)
        numbers = iter(plan.numbers[1:])
        for inst in plan.triggers:
            self._step(state, inst, plan, next(numbers))
        if plan.triggers:
            state.runtime.pop("OnBuild", None)   # triggers run once, they are not inherited
        for inst in plan.stage.instructions:
            self._step(state, inst, plan, next(numbers))
        return state

    def _from(self, plan: _StagePlan) -> steps.StageState:
        stage = plan.stage
        n = plan.numbers[0]
        self.emit(StepStarted(n, self.total, plan.label, f"FROM {plan.base_name}", stage.base.line))
        if stage.base.platform:
            platform = self._expand(stage.base.platform, self._global_env(), stage.base.line)
            host = f"linux/{host_architecture()}"
            if not is_host_platform(platform):
                raise DockerfileError(f"FROM --platform={platform}: this host builds {host} only",
                                      file=self.dockerfile_name, line=stage.base.line)
        if plan.base_stage is not None:
            base = self._stage_state(plan.base_stage)
            config, layers = copy.deepcopy(base.config), list(base.layers)
            state_id = base.state_id
        elif plan.base_image is not None:
            config, layers = copy.deepcopy(plan.base_image.config), list(plan.base_image.layers)
            state_id = plan.base_image.id
        else:
            config, layers = empty_config(), []
            state_id = digest_of(canonical_json(config))
        config.setdefault("config", {})
        config.setdefault("history", [])
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        self.emit(StepDone(n, 0.0, cached=True))
        plan.base_layers = len(layers)
        if plan.base_stage is not None:
            # BuildKit's child stage starts from its base stage's state, whose environment
            # holds that stage's ARG values too: a RUN here sees them (not the config).
            env = dict(self._stage_state(plan.base_stage).env)
        else:
            env = dict(e.partition("=")[::2] for e in config["config"].get("Env") or [])
        return steps.StageState(plan.label, config, layers, state_id=state_id, env=env,
                                escape=self.df.escape)

    def _where(self, inst, n: int) -> str:
        return f"{self.dockerfile_name}:{inst.line} [{n}/{self.total}] {inst.keyword}"

    def _step(self, state: steps.StageState, inst: ins.Instruction, stage: _StagePlan, n: int) -> None:
        if self.cancelled.is_set():
            raise Interrupted("cancelled: another stage failed")
        build_args = steps.BuildArgs(self.opts.build_args, self.meta_env, self.automatic_args)
        try:
            plan = steps.plan(state, inst, build_args)
        except DockerfileError as e:
            raise DockerfileError(e.reason, file=self.dockerfile_name, line=inst.line,
                                  hint=e.hint) from None
        if plan.kind == "arg":
            state.args.update(plan.arg_values)    # a redeclared ARG keeps its place
            with self._lock:
                self.used_args.update(plan.arg_values)
        state.env.update(plan.env_updates)
        if isinstance(inst, ins.Cmd):
            state.cmd_set = True
        self.emit(StepStarted(n, self.total, stage.label, plan.created_by, inst.line))
        t0 = time.monotonic()
        diff_ids = state.diff_ids()
        no_cache = self._no_cache(stage)
        position = f"{stage.stage.index}:{n - stage.numbers[0]}"
        step_key = cachemod.StepKey(
            parent=state.state_id, instruction=plan.instruction, build_args=plan.build_args,
            source_date_epoch=self.opts.source_date_epoch)
        prefix = step_key.prefix() if plan.kind == "copy" else None
        certain = self._certain_miss(plan, prefix, no_cache, position, diff_ids)
        try:
            inputs = read_inputs(self, plan, inst, n, defer=certain)
        except BuildError as e:
            if e.step:
                raise
            raise BuildError(e.reason, step=self._where(inst, n), hint=e.hint) from None
        if certain:
            self._copy_first(state, inst, stage, plan, inputs, n, step_key, prefix, position,
                             no_cache, t0)
            return
        key = dataclasses.replace(step_key, sources=tuple(inputs.digests)).digest()
        cached = None if no_cache else self.cache.get(key, diff_ids)
        if cached is None and self.remote is not None:
            cached = self.remote.get(key, diff_ids)      # (downloads its layer)
            if cached is not None:
                self.cache.put(key, cached, prefix)
        if cached is not None:
            self._used(stage, key, cached)
            if self.recipes.kept_key(position) != key:
                # Kept for the next miss to be compared with (explain.py).
                self.recipes.save(position, self._recipe(state, stage, plan, inputs, key))
            self._apply(state, cached)
            with self._lock:
                self.steps_cached += 1
            self.emit(StepCached(n))
            self.emit(StepDone(n, time.monotonic() - t0, cached=True))
            return
        recipe = self._recipe(state, stage, plan, inputs, key)
        previous = self.recipes.load(position)
        self._missed(stage, n, *explain.explain(previous, recipe, no_cache=no_cache,
                                                parent_missed=stage.first_miss))
        layer = None
        if plan.kind in ("run", "copy", "workdir"):
            layer = self._filesystem_step(state, inst, plan, inputs, n,
                                          self._donor(plan, previous, diff_ids))
        self._store_result(state, inst, stage, plan, layer, key, prefix, recipe, position, n, t0)

    def _missed(self, stage: _StagePlan, n: int, reason: str, details: list[str]) -> None:
        """Say why step `n` missed (the stage's first miss is what later misses point to)."""
        if stage.first_miss is None:
            stage.first_miss = f"step {n}: {reason}"
        self.emit(CacheMiss(n, reason, tuple(details)))

    def _certain_miss(self, plan: steps.Plan, prefix: str | None, no_cache: bool,
                      position: str, diff_ids: list[str]) -> bool:
        """A COPY of context files that misses whatever they hold, and has nothing to share
        with an earlier layer: its files are copied first and hashed as they are copied
        (_copy_first), instead of read once for the key and once for the copy.

        Certain when the cache is not asked (--no-cache), or when no entry of this store
        has the step's key prefix (StepCache.may_hold) and no --cache-from is asked, and
        this step was never built before (else the miss's explanation compares sources).
        Either way not with a donor: its files are shared by digest (donor.py).
        """
        if prefix is None or not only_context_sources(plan):
            return False
        if not no_cache and (self.remote is not None or self.cache.may_hold(prefix)):
            return False
        previous = self.recipes.load(position)
        if no_cache:
            return self._donor(plan, previous, diff_ids) is None
        return previous is None

    def _copy_first(self, state, inst, stage: _StagePlan, plan: steps.Plan, inputs: StepInputs,
                    n: int, step_key: cachemod.StepKey, prefix: str, position: str,
                    no_cache: bool, t0: float) -> None:
        """A certain miss (_certain_miss): the COPY runs, then its sources' digests make its
        key (most of them hashed by the copy itself: executor.py)."""
        # (No earlier build of the step, or --no-cache: the reason needs no recipe.)
        self._missed(stage, n, *explain.explain(None, {}, no_cache=no_cache, parent_missed=None))
        def meanwhile() -> None:
            # While a child commits the layer (executor.py): the key's digests, and the
            # stat cache written with what the copy taught it (the build's end would).
            digest_deferred(self, inputs)
            self.ctx.save()
        layer = self._filesystem_step(state, inst, plan, inputs, n, meanwhile=meanwhile)
        digest_deferred(self, inputs)         # (if the commit did not leave it to meanwhile)
        key = dataclasses.replace(step_key, sources=tuple(inputs.digests)).digest()
        recipe = self._recipe(state, stage, plan, inputs, key)
        self._store_result(state, inst, stage, plan, layer, key, prefix, recipe, position, n, t0)

    def _store_result(self, state, inst, stage: _StagePlan, plan: steps.Plan, layer, key: str,
                      prefix: str | None, recipe: dict, position: str, n: int,
                      t0: float) -> None:
        """A step that ran (step `n`, started at `t0`): its history entry and result, into
        the cache and the stage; then it is done."""
        runtime = steps.apply_to_copy(state.runtime, plan.apply)
        diff_ids = state.diff_ids()
        history = {"created": cachemod.now(self.opts.source_date_epoch),
                   "created_by": plan.created_by,
                   "comment": HISTORY_COMMENT}
        if layer is None:
            history["empty_layer"] = True
        extra = {"chain": chain_ids(diff_ids + [layer.diff_id])[-1]} if layer else {}
        if plan.kind == "maintainer":
            extra["author"] = inst.name
        if plan.empty_history:
            extra["no_history"] = True
        result = cachemod.StepResult(history, runtime, layer, extra)
        self.cache.put(key, result, prefix)
        self._used(stage, key, result)
        self.recipes.save(position, recipe)
        self._apply(state, result)
        with self._lock:
            self.steps_run += 1
        self.emit(StepDone(n, time.monotonic() - t0, cached=False,
                           layer_size=layer.size if layer else None))

    def _no_cache(self, stage: _StagePlan) -> bool:
        """--no-cache, or --no-cache-filter naming this stage (as BuildKit: by name)."""
        name = stage.stage.name
        return self.opts.no_cache or (name is not None and
                                      any(name == f.lower() for f in self.opts.no_cache_filter))

    def _used(self, stage: _StagePlan, key: str, result: cachemod.StepResult) -> None:
        with self._lock:
            self.used.setdefault(stage.stage.index, {})[key] = result

    def _recipe(self, state, stage: _StagePlan, plan: steps.Plan, inputs, key: str) -> dict:
        """What this step's cache key was made of, for explaining a later miss (explain.py)."""
        base = stage.base_image.id if stage.base_image is not None else (
            self._stage_state(stage.base_stage).state_id if stage.base_stage is not None
            else "scratch")
        sources = {}
        for kind, data in inputs.copy_parts:
            if kind == "context":
                sources.update(self.ctx.file_table(data))
        return {"key": key, "keyword": plan.created_by.split(" ", 1)[0], "text": plan.created_by,
                "parent": state.state_id, "instruction": plan.instruction,
                "args": {k: v for k, v in state.args.items() if v is not None},
                "env": dict(e.partition("=")[::2] for e in state.runtime.get("Env") or []),
                "base": {"name": stage.base_name, "id": base}, "sources": sources,
                "inputs": inputs.other}

    @staticmethod
    def _apply(state: steps.StageState, result: cachemod.StepResult) -> None:
        """Add a step's result to the stage's image.

        The state's identity (the cache's `parent` for the next step) chains the
        result onto the previous identity, starting from the base image's ID: as
        unique as the digest of the whole config, without serialising a config
        whose history grows with every step of a deep build.
        """
        state.state_id = digest_of(canonical_json({"parent": state.state_id,
                                                   "result": result.to_json()}))
        cfg = state.config        # (the state's own: a stage starts from a deep copy)
        cfg["config"] = copy.deepcopy(result.runtime)
        if "author" in result.extra:
            cfg["author"] = result.extra["author"]
        if not result.extra.get("no_history"):
            if cfg.get("history") is None:
                cfg["history"] = []
            cfg["history"].append(dict(result.history))
            cfg["created"] = result.history["created"]
        if result.layer is not None:
            cfg["rootfs"]["diff_ids"].append(result.layer.diff_id)
            state.layers.append(result.layer)

    # ---- what `--from` and --build-context names mean (asked by inputs.py) ------------

    def named_dir(self, ref: str) -> BuildContext | None:
        """The --build-context directory `ref` names (when no stage has that name), if any."""
        root = self.named.dirs.get(ref.lower())
        if root is None or self._stage_ref(self.df, ref, len(self.df.stages)) is not None:
            return None
        with self._lock:
            ctx = self._named_dirs.get(root)
            if ctx is None:
                ctx = self._named_dirs[root] = BuildContext(      # (its own .dockerignore)
                    root, cache_dir=os.path.join(self.store.cache_dir, "context"))
        return ctx

    def other_rootfs(self, ref: str, inst) -> tuple[str, list[str], str]:
        """(identity, diff_ids, what) of the stage or image a `--from` names."""
        index = self._stage_ref(self.df, ref, len(self.df.stages))
        if index is not None:
            st = self._stage_state(index)
            return (st.state_id, [l.diff_id for l in st.layers],
                    f"stage {ref}")
        image = self._resolve_image(ref, inst)
        return image.id, image.diff_ids, f"image {ref}"

    def sandbox_scratch(self) -> str:
        """The empty dir every RUN sandbox of this build mounts its own tmpfs on (sandbox.run)."""
        path = os.path.join(self.workdir, "scratch")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def stepdir(self, n: int) -> str:
        path = os.path.join(self.workdir, f"step-{n}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def _donor(self, plan: steps.Plan, previous: dict | None, diff_ids: list[str]) -> str | None:
        """The layer the last build of this COPY made, for the new one to share files with.

        Not one below this step, nor one stacked on a layer below it: a mount must never
        show one inode under two names.
        """
        if plan.kind != "copy" or not previous or not previous.get("key"):
            return None
        result = self.cache.peek(previous["key"])
        chain = result.extra.get("chain") if result is not None else None
        if not chain or not self.store.layers.has(chain):
            return None
        below = chain_ids(diff_ids)
        try:
            base = self.store.layers.base(chain)      # (the layer the donor is stacked on)
        except StoreError:
            return None
        return None if chain in below or base in below else chain

    def _filesystem_step(self, state, inst, plan: steps.Plan, inputs: StepInputs, n: int,
                         donor: str | None = None, meanwhile=None):
        if self.executor is None:
            from .executor import Executor    # only a cache miss pays for mounts and tars
            self.executor = Executor(self)
        try:
            return self.executor.run_step(state, inst, plan, inputs, n, donor, meanwhile)
        except BuildError as e:
            if e.step:
                raise
            raise BuildError(e.reason, step=self._where(inst, n), hint=e.hint) from None
        except OSError as e:
            # The system refused while the step's files or its layer were being written (a
            # full disk, a read-only or immutable store, an I/O error): said with the step
            # (its temp files are gone by now), a BuildError for a library's caller.
            raise BuildError(os_error_text(e), step=self._where(inst, n),
                             hint=os_error_hint(e.errno)) from e


def _pullable(name: str) -> bool:
    """A name a registry could have (not an image ID)."""
    hexpart = name.lower().removeprefix("sha256:")
    if name.startswith("sha256:") or (len(hexpart) in (12, 64) and
                                      all(c in "0123456789abcdef" for c in hexpart)):
        return False
    try:
        reference.parse(name)
    except UsageError:
        return False
    return True


class _Done:
    """The result of a stage built in the calling thread (a Future's one method we use)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _kill_sandboxes() -> None:
    import sys
    if __package__ + ".sandbox" in sys.modules:   # none was ever started if it was never imported
        # Imported again rather than taken from sys.modules: another stage's thread may be
        # importing it right now, and the import waits until the module is complete.
        from . import sandbox
        sandbox.kill_all()
