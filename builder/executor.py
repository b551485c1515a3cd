"""Carrying out the steps that change files: RUN, COPY/ADD and WORKDIR, on a cache miss.

The narrow interface between the engine and the sandbox (DESIGN.md's
executor): the engine hands over a planned step and what it reads
(`inputs.StepInputs`); this module prepares an overlay snapshot of the parent's
layers, turns the inputs into source groups and mounts, runs the step in the
sandbox (or the chrooted file-op child), and commits the upper dir as a
layer. It is imported only when a step actually runs, so a fully cached
build never loads the sandbox, the tar writer or the compressor.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import marshal
import os
import shutil
import threading
from typing import Callable

from . import fileops, forked, sandbox, steps
from . import donor as donors
from .errors import BuildError, StepFailed, StoreError
from .image import MEDIA_LAYER_GZIP, LayerDesc, chain_ids
from .layer import commit, segments
from .progress import StepOutput
from . import snapshot
from .trees import remove_tree


class Executor:
    def __init__(self, builder):
        self.b = builder
        self.store = builder.store
        self._runs = 0
        self._server = None          # forkserver.ForkServer, from the second RUN on
        self._server_lock = threading.Lock()

    def close(self) -> None:
        """The build is over: end the fork server, if one was started."""
        with self._server_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    def _fork_server(self, snap):
        """The fork server for this RUN's sandbox, or None (forked by this process).

        Started at a build's second RUN on the overlay driver: starting it costs
        more than it saves a build of one RUN, and it is ready 40-60 ms later.
        """
        if snap.driver != "overlay":
            return None
        with self._server_lock:
            self._runs += 1
            if self._server is None and self._runs >= 2:
                from .forkserver import ForkServer
                self._server = ForkServer()
            return self._server

    def run_step(self, state, inst, plan: steps.Plan, inputs, n: int,
                 donor: str | None = None,
                 meanwhile: Callable[[], None] | None = None) -> LayerDesc | None:
        """Run one RUN, COPY/ADD or WORKDIR and commit its layer.

        `donor` is the chain ID of the previous layer of this COPY, whose
        unchanged files the new layer may share (donor.py). `meanwhile` is
        work that does not need the layer, done while a forked child commits
        it when the COPY hashed its sources (the step's key: engine._copy_first);
        otherwise it is left to the caller.
        """
        diff_ids = state.diff_ids()
        stepdir = self.b.stepdir(n)
        locks: list[int] = []
        record = ""
        matched = fileops.Matched()      # fileops.match_donor's, for a COPY
        kept: frozenset[str] = frozenset()
        try:
            snap = snapshot.prepare(self.store, diff_ids, stepdir)    # (upper, work, merged)
            try:
                if plan.kind == "run":
                    self._run(state, inst, plan, snap, inputs, stepdir, n, locks)
                elif plan.kind == "copy":
                    # Files written straight into the layer's dir can be shared with the next
                    # build's layer; a driver that diffs the root afterwards copies them anyway.
                    shares = snap.direct_dir == snap.upper
                    record = os.path.join(stepdir, "copied") if shares else ""
                    if record:
                        os.mkdir(record)
                    op = fileops.CopyOp(self._groups(inputs, stepdir), plan.dest, plan.dest_is_dir,
                                        plan.chown, plan.chmod, plan.excludes, plan.parents,
                                        plan.unpack, "ADD" if plan.is_add else "COPY",
                                        donor=self._donor_spec(donor) if shares and donor
                                        else None,
                                        record=record,
                                        hash_content=bool(record and inputs.deferred))
                    matched = fileops.match_donor(op)
                    prepared = []
                    sandbox.run_in_root(snap, lambda: fileops.copy_into_root(op, matched),
                                        before_chroot=lambda: fileops.prepare(op),
                                        meanwhile=lambda: prepared.append(
                                            fileops.prepare_finish(op)),
                                        after_unmount=lambda work: fileops.finish_in_upper(
                                            op, work, snap.direct_dir, matched, *prepared),
                                        cancel=self.b.cancelled)
                elif plan.kind == "workdir":
                    user = state.runtime.get("User", "")
                    sandbox.run_in_root(snap, lambda: fileops.mkdir_workdir(plan.dest, user),
                                        cancel=self.b.cancelled)
            except sandbox.SetupError as e:
                raise BuildError(str(e), step=self.b._where(inst, n), hint=e.hint) from None
            snap.finish()
            parent = chain_ids(diff_ids)[-1] if diff_ids else None
            made = _CopyRecord(record, matched.donor) if record else None
            matched = None               # (its tables: memory the commit can use)
            view = made.view() if made else None
            members = self._members_of(donor) if made and made.rows and donor else None
            try:
                def commit_layer() -> LayerDesc | None:
                    return commit.commit_upper(
                        self.store, snap.upper, parent, created_by=plan.created_by,
                        compression=self.b.opts.compression,
                        clamp_mtime=self.b.opts.source_date_epoch,
                        segmented=plan.kind == "copy", digests=view, donor=members,
                        stacked_on=made.stacked_on[:2] + (view,) if made and made.stacked_on
                        else None,
                        beside=made.beside if made else None)
                if made is not None and inputs.deferred:
                    # The copy hashed the files for the step's key: taking its digests up and
                    # making the key is Python work for the other core while a child commits.
                    child = forked.start(commit_layer)
                    try:
                        made.teach(self.b.ctx, inputs.deferred)
                        if meanwhile is not None:
                            meanwhile()
                    except BaseException:
                        child.cancel()
                        raise
                    layer = child.result()
                else:
                    layer = commit_layer()
            finally:
                if members is not None:
                    members.close()
            kept = snap.small_dirs
            return layer
        finally:
            for fd in locks:
                os.close(fd)
            _clear_step_dir(stepdir, kept)

    def _donor_spec(self, chain: str) -> donors.DonorSpec | None:
        """Where the donor layer, its table and its own base are (donor.py)."""
        layers = self.store.layers
        try:
            base = layers.base(chain)
        except StoreError:
            return None                  # removed meanwhile
        if base is not None and not layers.has(base):
            base = None
        return donors.DonorSpec(chain, layers.diff_dir(chain), layers.table(chain), base,
                                layers.diff_dir(base) if base else "",
                                layers.table(base) if base else "")

    def _members_of(self, chain: str) -> segments.DonorBlob | None:
        """The gzip members of the donor layer's blob that a new COPY layer may copy."""
        try:
            meta = self.store.layers.meta(chain)
        except StoreError:
            return None                  # removed meanwhile
        if meta.get("media_type") != MEDIA_LAYER_GZIP:
            return None
        return segments.DonorBlob.open(self.store.layers.path(chain),
                                   self.store.blobs.path(meta["digest"]), meta["digest"])

    # ---- COPY / ADD sources -------------------------------------------------------

    def _groups(self, inputs, stepdir: str) -> tuple[fileops.SourceGroup, ...]:
        """Consecutive sources with the same root become one group (their order is kept)."""
        groups: list[fileops.SourceGroup] = []
        last = None
        for kind, data in inputs.copy_parts:
            key = (kind, data[0] if kind != "context" else None)
            if key != last:
                if kind == "context":
                    groups.append(fileops.SourceGroup(self.b.ctx.root))
                elif kind == "inline":
                    groups.append(fileops.SourceGroup(data[0]))
                else:
                    _ref, diff_ids, what, _spec = data
                    root = os.path.join(stepdir, f"from-{len(groups)}")
                    groups.append(fileops.SourceGroup(
                        root, lowers=tuple(_stack(self.store, diff_ids)),
                        store_root=self.store.root, what=what, keep_owners=True))
                last = key
            g = groups[-1]
            if kind == "context":
                g.sources += (data,)
            elif kind == "inline":
                g.sources += (data[1],)
            else:
                g.specs += (data[3],)
        return tuple(groups)

    # ---- RUN -------------------------------------------------------------------------

    def _run(self, state, inst, plan: steps.Plan, snap, inputs, stepdir: str, n: int,
             locks: list[int]) -> None:
        rt = state.runtime
        env = [f"{k}={v}" for k, v in state.env.items()]
        env += [f"{k}={v}" for k, v in self.b.opts.build_args.items()
                if k in steps.PROXY_ARGS and k not in state.env]
        agents = [m for m in plan.mounts if m.type == "ssh"]
        if agents and "SSH_AUTH_SOCK" not in state.env:
            env.append(f"SSH_AUTH_SOCK={agents[0].target}")   # (as BuildKit: forwarded or not)
        relays: list = []
        try:
            mounts, secret_env = self._mounts(plan, inputs, stepdir, locks, relays)
            network = plan.network or self.b.opts.network
            spec = sandbox.RunSpec(argv=plan.argv, env=env + secret_env, user=rt.get("User") or "",
                                   workdir=rt.get("WorkingDir") or "/",
                                   network="host" if network == "default" else network,
                                   mounts=mounts, files=plan.files,
                                   extra_hosts=[f"{a}\t{n}" for n, a in self.b.opts.add_hosts],
                                   shm_size=self.b.opts.shm_size or sandbox.SHM_SIZE,
                                   ulimits=list(self.b.opts.ulimits), init=False)
            scratch = self.b.sandbox_scratch()

            def on_output(line: bytes) -> None:
                self.b.emit(StepOutput(n, line.decode("utf-8", "replace").rstrip("\r")))
            status = sandbox.run(snap, spec, scratch, on_output, cancel=self.b.cancelled,
                                 server=self._fork_server(snap))
        finally:
            for relay in relays:
                relay.close()
        if status != 0:
            raise StepFailed(step=f"step {n}/{self.b.total}", line=inst.line,
                             file=self.b.dockerfile_name, command=plan.created_by, exit_code=status)

    def _mounts(self, plan, inputs, stepdir: str, locks: list[int], relays: list):
        mounts: list[sandbox.MountSpec] = []
        secret_env: list[str] = []
        for i, m in enumerate(plan.mounts):
            where = os.path.join(stepdir, f"mount-{i}")
            if m.type == "tmpfs":
                mounts.append(sandbox.MountSpec(m.target, "tmpfs", readonly=False,
                                                options=f"size={m.size}" if m.size else ""))
            elif m.type == "secret":
                self._secret(m, mounts, secret_env)
            elif m.type == "ssh":
                self._ssh(m, mounts, where, relays)
            elif m.type == "cache":
                mounts.append(self._cache_mount(m, where, locks, inputs.mount_sources.get(i)))
            else:
                kind, data = inputs.mount_sources[i]
                mounts.append(self._bind(m, kind, data, where))
        return mounts, secret_env

    def _bind(self, m, kind: str, data, where: str) -> sandbox.MountSpec:
        """A bind mount of a stage's or image's files ("rootfs"), or of a directory's:
        ("context", (root, Source)), the build context's or a --build-context's."""
        root = None
        if kind == "context":
            root, data = data
        if self.store.driver != "overlay":
            return self._bind_copy(m, kind, data, where, root)
        if kind == "rootfs":
            spec = sandbox.MountSpec(m.target, "overlay",
                                     lowers=tuple(_stack(self.store, data)) or
                                     (_mkdirs(where, "empty"),),
                                     subpath=m.source, readonly=m.readonly)
            if not m.readonly:
                spec.upper, spec.work = _mkdirs(where, "upper"), _mkdirs(where, "work")
            return spec
        host = os.path.join(root, data.path)
        if m.readonly:
            return sandbox.MountSpec(m.target, "bind", source=host, readonly=True)
        if not data.is_dir:
            # A writable bind of a file: a private copy, thrown away with the step.
            copy = os.path.join(_mkdirs(where, ""), "file")
            shutil.copy2(host, copy)
            return sandbox.MountSpec(m.target, "bind", source=copy, readonly=False)
        return sandbox.MountSpec(m.target, "overlay", lowers=(host,), upper=_mkdirs(where, "upper"),
                                 work=_mkdirs(where, "work"), readonly=False)

    def _bind_copy(self, m, kind: str, data, where: str, root: str) -> sandbox.MountSpec:
        """RUN --mount=type=bind without overlay mounts: a stage's full root (kept by the vfs
        code, shared when read-only), and private copies of what the step may write to."""
        from .paths import resolve_in_root
        from .snapshot import vfs
        if kind == "rootfs":
            root = vfs.full_root(self.store, list(data), _mkdirs(where, ""))
            if not m.readonly:
                vfs.clone_tree(root, os.path.join(where, "copy"))
                root = os.path.join(where, "copy")
            return sandbox.MountSpec(m.target, "bind", source=resolve_in_root(root, m.source),
                                     readonly=m.readonly)
        host = os.path.join(root, data.path)
        if not m.readonly:
            copy = os.path.join(_mkdirs(where, ""), "copy")
            vfs.clone_tree(host, copy)
            host = copy
        return sandbox.MountSpec(m.target, "bind", source=host, readonly=m.readonly)

    def _cache_mount(self, m, where: str, locks: list[int], seed=None) -> sandbox.MountSpec:
        """A cache mount: a directory of the store that outlives builds, shared by its id.

        With from= (`seed`: ("cache-base", identity, diff_ids)), a new cache starts as a
        copy of `source` in that stage or image, and each base has a cache of its own (as
        BuildKit keys a cache by its id and its base)."""
        base = os.path.join(self.store.cache_dir, "mounts")
        os.makedirs(base, exist_ok=True)
        key = m.id if seed is None else f"{m.id}\0from:{seed[1]}:{m.source or '/'}"
        path = os.path.join(base, hashlib.sha256(key.encode()).hexdigest()[:32])
        lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        locks.append(lock_fd)
        if m.sharing == "locked":
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        elif m.sharing == "private":
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                path = os.path.join(where, "private-cache")   # another build has it: a fresh one
        else:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
        if not os.path.isdir(path):
            tmp = path + f".new-{os.getpid()}-{threading.get_ident()}"
            os.makedirs(tmp, exist_ok=True)
            try:
                if seed is not None:
                    self._seed_cache(tmp, list(seed[2]), m.source or "/", m.from_, where)
                else:
                    os.chown(tmp, m.uid or 0, m.gid or 0)
                    os.chmod(tmp, m.mode if m.mode is not None else 0o755)
            except BaseException:
                remove_tree(tmp, ignore_errors=True)
                raise
            try:
                os.rename(tmp, path)
            except OSError:
                remove_tree(tmp, ignore_errors=True)      # another build created it first
        return sandbox.MountSpec(m.target, "bind", source=path, readonly=m.readonly)

    def _seed_cache(self, dest: str, diff_ids: list[str], source: str, what: str,
                    where: str) -> None:
        """Copy `source` of a stage's or image's files into `dest` (a new cache dir)."""
        def copy_from(root: str) -> None:
            from .paths import resolve_in_root
            src = resolve_in_root(root, source)
            if not os.path.isdir(src):      # (BuildError: also reported from a sandbox child)
                raise BuildError(f"RUN --mount=type=cache,from={what}: {source} is not a "
                                 f"directory in {what}")
            shutil.copystat(src, dest)
            st = os.lstat(src)
            os.chown(dest, st.st_uid, st.st_gid)
            from .snapshot import vfs
            vfs.clone_tree(src, dest)
        if not diff_ids:
            raise BuildError(f"RUN --mount=type=cache,from={what}: {source} is not in it "
                             "(it has no files)")
        if self.store.driver != "overlay":
            from .snapshot import vfs
            copy_from(vfs.full_root(self.store, diff_ids, _mkdirs(where, "")))
            return
        lowers = _stack(self.store, diff_ids)
        mnt, empty = _mkdirs(where, "seed"), _mkdirs(where, "seed-empty")
        store_root = self.store.root

        def seed() -> None:
            from .snapshot.overlay import mount_overlay
            os.chdir(store_root)                    # (the lower links are relative to it)
            mount_overlay(mnt, lowers if len(lowers) > 1 else lowers + [empty], readonly=True)
            copy_from(mnt)
        try:
            sandbox.in_own_mounts(seed, cancel=self.b.cancelled)
        except sandbox.SetupError as e:
            raise BuildError(str(e), hint=e.hint) from None

    def _secret(self, m, mounts: list, secret_env: list[str]) -> None:
        src = self.b.opts.secrets.get(m.id)
        if src is None:
            if m.required:
                raise BuildError(f"secret {m.id!r} is required but was not given",
                                 hint=f"pass it with --secret id={m.id},src=FILE")
            return
        if isinstance(src, str):
            try:
                with open(src, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise BuildError(f"secret {m.id!r}: cannot read {src}: {e.strerror}") from None
        else:
            data = bytes(src)
        if m.env:
            secret_env.append(f"{m.env}={data.decode('utf-8', 'replace')}")
        if m.target:
            mounts.append(sandbox.MountSpec(m.target, "secret", content=data,
                                            mode=m.mode, uid=m.uid or 0, gid=m.gid or 0))

    def _ssh(self, m, mounts: list, where: str, relays: list) -> None:
        agent = self.b.ssh_agents.get(m.id)
        if agent is None:
            return      # an optional one is not there, as in BuildKit without --ssh (a required
                        # one stopped the build before its cache lookup: inputs.read_inputs)
        from .sshagent import AgentRelay
        try:
            relays.append(AgentRelay(agent, _mkdirs(where, ""), "agent.sock",
                                     uid=m.uid or 0, gid=m.gid or 0, mode=m.mode))
        except OSError as e:
            raise BuildError(f"cannot forward the ssh agent {m.id!r}: {e.strerror}") from None
        mounts.append(sandbox.MountSpec(m.target, "bind", source=relays[-1].path,
                                        readonly=False))


def _stack(store, diff_ids) -> list[str]:
    """The lower dirs that show another stage's or an image's layers, mounted once read-only:
    at any depth (overlay takes 500 lower dirs at most; snapshot/overlay.py)."""
    from .snapshot.overlay import lower_stack
    return lower_stack(store, list(diff_ids), ahead=False)


def _mkdirs(where: str, name: str) -> str:
    path = os.path.join(where, name) if name else where
    os.makedirs(path, exist_ok=True)
    return path


def _clear_step_dir(stepdir: str, kept: frozenset[str]) -> None:
    """Remove what a step left in its dir, except the `kept` names (a snapshot's few empty
    dirs, after a step that worked), which go with the whole build dir at the build's end.

    On ext4 without a journal (this project's test machine), every inode
    freed makes each later allocation in its block group step over it for a
    minute or more (the kernel's recently_deleted()): removing seven dirs
    after every RUN made each later step's new files slower, so that step
    1,000 of a build took 1.3-1.4x as long as step 10. Anything that may be
    big (a failed step's upper dir, copies made for mounts) still goes now.
    """
    if not kept:
        remove_tree(stepdir, ignore_errors=True)
        return
    try:
        names = os.listdir(stepdir)
    except FileNotFoundError:
        return
    for name in names:
        if name not in kept:
            remove_tree(os.path.join(stepdir, name), ignore_errors=True)


class _CopyRecord:
    """What a COPY's processes wrote into its record dir (fileops.finish_in_upper), made
    into the new layer's table (donor.py): the rows of the files it wrote, and when it is
    stacked, the base and the donor's rows of the files the base provides."""

    def __init__(self, record: str, donor):
        self.table = donors.Table()
        self.stacked_on = None
        for name in sorted(os.listdir(record)):
            path = os.path.join(record, name)
            if name != fileops.STACKED:
                rows = donors.read_table(path)
                if rows is None:
                    raise StoreError(f"{path}: a copy worker's rows are unreadable")
                self.table.extend(rows)
                continue
            with open(path, "rb") as f:
                data = marshal.loads(f.read())
            provided = array.array("q")
            provided.frombytes(data["rows"])
            start = len(self.table)
            # (With the stamps the donor recorded: a source with another stamp now, unchanged,
            # is asked for its xattrs next time; most sources have the same.)
            self.table.add_rows_of(donor.table, provided)
            self.table.base = data["base"]
            self.stacked_on = (data["base"], data["base_diff"], start, data["dirs"])

    @property
    def rows(self) -> int:
        return len(self.table)

    def teach(self, ctx, sources) -> None:
        """Tell the build context the digests the copy made of its files (fileops.CopyOp's
        hash_content), for the step's key. A row is only recorded for a file copied exactly
        as the build walked it (fileops._copy_file: same size and times at the end,
        no xattrs), with the stat of that walk: the stat `sources` hold."""
        stats = {e.src: e.st for s in sources for e in s.entries}
        t = self.table
        found = [stats.get(src) for src in t.sources]
        hexes = t.digests.hex()
        digests = [hexes[i:i + 64] for i in range(0, len(hexes), 64)]
        paths = t.sources
        if None in found:                # (a row of a source this build did not walk)
            keep = [i for i, st in enumerate(found) if st is not None]
            paths, found, digests = ([column[i] for i in keep]
                                     for column in (paths, found, digests))
        ctx.learn(paths, found, digests)

    def view(self) -> donors.TableView | None:
        """The rows by target, for the commit (None if there are none)."""
        if not len(self.table):
            return None
        return donors.TableView(self.table, *(self.stacked_on[2:] if self.stacked_on else ()))

    def beside(self, stats) -> dict[str, bytes]:
        """The layer's table, completed by the commit's census: a layer that is not stacked
        and holds only directories and rows lists its directories, so that the next layer
        of this COPY may be stacked on it."""
        if not len(self.table):
            return {}
        if self.table.base is None and stats.others == 0 and len(stats.files) == len(self.table):
            targets = set(self.table.targets)
            if all("/" + name in targets for name in stats.files):
                self.table.dirs = ["/" + name for name in stats.dirs]
        return {donors.TABLE: self.table.encode()}
