"""What a step reads besides its parent, digested for its cache key: `StepInputs`.

A COPY reads its sources (the build context, a `--build-context`
directory, another stage or image, a heredoc, a download); a RUN reads what
its `--mount=type=bind` and `type=cache,from=` show it and the build
options it sees (`--add-host`, `--shm-size`, `--ulimit`). Each becomes a
digest in the step's key and, on a miss, a part the executor mounts or
copies. Nothing here mounts or runs anything: on a cache hit this is all
the work a COPY or RUN costs.

The engine answers what only it knows (`named_dir`: which directory a
--build-context name means; `other_rootfs`: which stage or image a
`--from` names, and its layers).
"""

from __future__ import annotations

import os
from dataclasses import field

from .record import record
from . import paths, steps
from .context import BuildContext, IgnoreRules, filter_excludes
from .errors import BuildError


@record(frozen=False)
class StepInputs:
    """What a step reads besides its parent: keyed into the cache, handed to the executor."""
    digests: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)    # the digests of what is not a context file
    # ("context", Source) | ("from", (ref, diff_ids, what, spec)) | ("inline", (dir, Source))
    copy_parts: list[tuple[str, object]] = field(default_factory=list)
    # RUN --mount=type=bind: mount index -> ("context", (root dir, Source)) | ("rootfs", diff_ids)
    mount_sources: dict[int, tuple] = field(default_factory=dict)
    # The build context's sources whose digests are left until after the copy (a certain
    # miss: only_context_sources); `digests` is then empty until digest_deferred() fills it.
    deferred: list = field(default_factory=list)

    def add_other(self, digest: str) -> None:
        self.digests.append(digest)
        self.other.append(digest)


def read_inputs(b, plan: steps.Plan, inst, n: int, defer: bool = False) -> StepInputs:
    """Everything step `n` (`inst`, planned as `plan`) reads besides its parent; `b` is the
    engine's Builder. `defer`: a COPY of the build context's files only, certain to miss,
    whose digests digest_deferred() makes after the copy (the copy hashes what it reads)."""
    inputs = StepInputs()
    if plan.kind == "copy":
        _copy_inputs(b, plan, inst, n, inputs, defer)
    elif plan.kind == "run":
        _run_inputs(b, plan, inst, inputs)
    return inputs


def _run_inputs(b, plan: steps.Plan, inst, inputs: StepInputs) -> None:
    opts = b.opts
    if opts.add_hosts:
        # Part of what a RUN sees, so of its key (BuildKit keys its extra hosts too).
        inputs.add_other("add-host:" + ",".join(f"{n}={a}" for n, a in opts.add_hosts))
    if opts.shm_size is not None:
        inputs.add_other(f"shm-size:{opts.shm_size}")     # (as BuildKit: a mount)
    if opts.ulimits:                                      # (BuildKit keys them too)
        inputs.add_other("ulimit:" + ",".join(f"{n}={s}:{h}" for n, s, h in opts.ulimits))
    for i, m in enumerate(plan.mounts):
        if m.type == "ssh" and m.required and m.id not in b.ssh_agents:
            # Before the cache lookup, as BuildKit checks: a hit would hide it.
            raise BuildError(f"RUN --mount=type=ssh,id={m.id} is required, and no agent "
                             "was forwarded",
                             hint=f"pass one with --ssh {m.id} (the agent of "
                                  f"$SSH_AUTH_SOCK) or --ssh {m.id}=SOCKET")
        named = b.named_dir(m.from_) if m.type == "bind" and m.from_ else None
        if m.type == "bind" and (named is not None or not m.from_):
            # The build context's files, or a --build-context directory's.
            ctx = named or b.ctx
            src = ctx.sources(m.source, instruction="RUN --mount",
                              where=f"build context {m.from_}" if named
                              else "the build context")[0]
            digest = ctx.digest(src)
            inputs.add_other(f"context {m.from_.lower()}:{digest}" if named else digest)
            inputs.mount_sources[i] = ("context", (ctx.root, src))
        elif m.type == "bind":
            identity, diff_ids, _ = b.other_rootfs(m.from_, inst)
            inputs.add_other(f"{identity}:{m.source}")
            inputs.mount_sources[i] = ("rootfs", diff_ids)
        elif m.type == "cache" and m.from_:
            # The base a new cache starts from is an input, as in BuildKit.
            identity, diff_ids, _ = b.other_rootfs(m.from_, inst)
            inputs.add_other(f"cache-from:{identity}:{m.source}")
            inputs.mount_sources[i] = ("cache-base", identity, diff_ids)
        elif m.type == "cache" and m.source:
            raise BuildError(f"RUN --mount=type=cache,source={m.source} needs from= "
                             "(a stage or an image to take it from)")


def only_context_sources(plan: steps.Plan) -> bool:
    """A COPY whose every source is in the build context (no stage, image, named context,
    heredoc or download)."""
    return plan.kind == "copy" and bool(plan.sources) and all(
        src.kind == "context" for src in plan.sources)


def digest_deferred(b, inputs: StepInputs) -> None:
    """The digests read_inputs(defer=True) left: what the copy hashed is known by now
    (executor.py), the rest is hashed here."""
    if inputs.deferred:
        inputs.digests = [b.ctx.digest(s) for s in inputs.deferred]
        inputs.deferred = []


def _copy_inputs(b, plan: steps.Plan, inst, n: int, inputs: StepInputs,
                 defer: bool = False) -> None:
    rules = IgnoreRules(list(plan.excludes)) if plan.excludes else None
    keyword = "ADD" if plan.is_add else "COPY"
    scratch = None
    for src in plan.sources:
        named = b.named_dir(src.ref) if src.kind == "stage" else None
        if src.kind == "context" or named is not None:
            # The build context's files, or a --build-context directory's.
            ctx = named or b.ctx
            found = ctx.sources(src.spec, instruction=keyword,
                                where=f"build context {src.ref}" if named
                                else "the build context")
            if rules is not None:
                found = [f for f in (filter_excludes(s, rules) for s in found) if f]
            if named is None:
                inputs.copy_parts += [("context", s) for s in found]
                if defer:
                    inputs.deferred += found
                else:
                    inputs.digests += [b.ctx.digest(s) for s in found]
            else:
                inputs.copy_parts += [("inline", (named.root, s)) for s in found]
                for s in found:
                    inputs.add_other(f"context {src.ref.lower()}:{named.digest(s)}")
        elif src.kind == "stage":
            identity, diff_ids, what = b.other_rootfs(src.ref, inst)
            inputs.copy_parts.append(("from", (src.ref, tuple(diff_ids), what, src.spec)))
            inputs.add_other(f"{identity}:{src.spec}")
        else:
            if scratch is None:
                scratch = os.path.join(b.stepdir(n), "inline")
                os.makedirs(scratch, exist_ok=True)
            if src.kind == "heredoc":
                name = _write_inline(scratch, src.spec, src.content.encode(), 0o644)
            else:
                from . import download
                try:
                    name, digest = download.fetch(src.spec, scratch, plan.checksum)
                except download.DownloadError as e:
                    raise BuildError(str(e), hint=e.hint) from None
                inputs.add_other(digest)
            found = BuildContext(scratch, ignore=IgnoreRules()).sources(name, instruction=keyword)
            inputs.copy_parts += [("inline", (scratch, s)) for s in found]


def _write_inline(scratch: str, name: str, data: bytes, mode: int) -> str:
    """Write a heredoc's text as the file `name` of `scratch`; its cleaned name."""
    name = paths.clean(name) or "__unnamed__"
    path = os.path.join(scratch, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return name
