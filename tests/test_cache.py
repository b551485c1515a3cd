"""The step cache users can trust: a matrix of changes, each a hit or a miss, as in Docker."""

from __future__ import annotations

import os

import pytest

import builder
from builder import progress

from conftest import BASE, busybox_context, layer_files, write_context

DOCKERFILE = f"""FROM {BASE}
ARG DECLARED=one
ENV MODE=a
COPY --chown=1000:1000 app/ /app/
RUN cat /app/main.txt > /out && echo "$DECLARED $MODE" >> /out
LABEL done=yes
"""


LAST_REASONS: dict[str, str] = {}


def ran(ctx, store_root, **kw) -> list[str]:
    """The steps that ran (missed the cache), by their instruction; their reasons go to LAST_REASONS."""
    events = []
    builder.build(str(ctx), root=store_root, on_event=events.append, **kw)
    text = {e.step: e.text for e in events if isinstance(e, progress.StepStarted)}
    LAST_REASONS.clear()
    LAST_REASONS.update({text[e.step].split()[0]: e.reason for e in events
                         if isinstance(e, progress.CacheMiss)})
    return [text[e.step].split()[0] for e in events
            if isinstance(e, progress.StepDone) and not e.cached and not text[e.step].startswith("FROM")]


@pytest.fixture
def ctx(tmp_path, base_image, store_root):
    """A context built once, so every test starts from a warm cache."""
    c = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE, "app/main.txt": "main\n",
                                         "app/other.txt": "other\n", "app/ignored.log": "log\n",
                                         ".dockerignore": "app/*.log\n"})
    ran(c, store_root)
    assert ran(c, store_root) == [], "an unchanged rebuild runs nothing"
    return c


def edit(ctx, old: str, new: str) -> None:
    path = ctx / "Dockerfile"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


ALL_AFTER_COPY = ["COPY", "RUN", "LABEL"]


def test_env_value_misses(ctx, store_root):
    edit(ctx, "ENV MODE=a", "ENV MODE=b")
    assert ran(ctx, store_root) == ["ENV"] + ALL_AFTER_COPY
    assert LAST_REASONS["ENV"] == "instruction changed: ENV MODE=b (was: ENV MODE=a)"
    assert LAST_REASONS["RUN"] == "ENV MODE changed (a -> b)"


def test_declared_arg_value_misses_the_steps_after_it(ctx, store_root):
    assert ran(ctx, store_root, build_args={"DECLARED": "two"}) == ["ARG", "ENV"] + ALL_AFTER_COPY
    assert LAST_REASONS["ARG"] == "build arg DECLARED changed (one -> two)"
    assert LAST_REASONS["RUN"] == "build arg DECLARED changed (one -> two)"


def test_undeclared_build_arg_hits_with_a_warning(ctx, store_root):
    events = []
    builder.build(str(ctx), root=store_root, build_args={"UNDECLARED": "x"}, on_event=events.append)
    assert not [e for e in events if isinstance(e, progress.StepDone) and not e.cached
                and e.step > 1]
    assert any("UNDECLARED" in e.message for e in events if isinstance(e, progress.BuildWarning))


def test_file_content_misses_from_the_copy(ctx, store_root):
    (ctx / "app/main.txt").write_text("changed\n")
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert LAST_REASONS["COPY"] == "1 file changed: app/main.txt (content)"
    assert LAST_REASONS["RUN"] == "parent step missed (step 4: 1 file changed: app/main.txt (content))"


def test_file_mode_misses(ctx, store_root):
    os.chmod(ctx / "app/other.txt", 0o600)
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert LAST_REASONS["COPY"] == "1 file changed: app/other.txt (mode)"


def test_xattrs_miss_as_in_docker(ctx, store_root):
    # COPY copies them (a file capability, say), so they key the cache, as Docker's and
    # BuildKit's file checksums do; the cached layer would otherwise lack them.
    os.setxattr(ctx / "app/main.txt", "user.note", b"one")
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert LAST_REASONS["COPY"] == "1 file changed: app/main.txt (xattrs)"
    os.setxattr(ctx / "app/main.txt", "user.note", b"two")
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    os.setxattr(ctx / "app", "user.note", b"dir")
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert LAST_REASONS["COPY"] == "1 file changed: app (xattrs)"
    assert ran(ctx, store_root) == []
    os.removexattr(ctx / "app", "user.note")
    os.removexattr(ctx / "app/main.txt", "user.note")
    assert ran(ctx, store_root) == [], "back as it was: the first build's layers"


def test_chown_flag_misses_but_the_context_owner_does_not(ctx, store_root):
    os.chown(ctx / "app/main.txt", 4321, 4321)      # COPY sets its own owner: a hit
    assert ran(ctx, store_root) == []
    edit(ctx, "--chown=1000:1000", "--chown=1000:50")
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert LAST_REASONS["COPY"].startswith("instruction changed: COPY --chown=1000:50 app/ /app/")


def test_mtime_only_hits(ctx, store_root):
    os.utime(ctx / "app/main.txt", (1, 1))
    os.utime(ctx / "app", (2, 2))
    assert ran(ctx, store_root) == []


def test_an_unchanged_source_is_answered_by_its_stat_fingerprint(ctx, store_root, monkeypatch):
    """A COPY source whose entries' stats did not move keeps last build's digest without a
    lookup per file (statcache trees); a change that keeps size and mtime still misses."""
    from builder import context, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)          # (the files are seconds old)
    assert ran(ctx, store_root) == []                       # keeps the source's digest
    per_file = context.BuildContext._file_digests

    def no_lookups(self, entries):
        raise AssertionError("the source was digested file by file")
    monkeypatch.setattr(context.BuildContext, "_file_digests", no_lookups)
    assert ran(ctx, store_root) == []
    monkeypatch.setattr(context.BuildContext, "_file_digests", per_file)

    main = ctx / "app/main.txt"
    before = main.stat()
    main.write_text("MAIN\n")                               # same size, same mtime after:
    os.utime(main, ns=(before.st_atime_ns, before.st_mtime_ns))   # only ctime tells
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    (ctx / "app/other.txt").chmod(0o600)
    assert ran(ctx, store_root) == ALL_AFTER_COPY
    assert ran(ctx, store_root) == []


def test_file_excluded_by_dockerignore_hits(ctx, store_root):
    (ctx / "app/ignored.log").write_text("a different log\n")
    (ctx / "app/new.log").write_text("new\n")
    assert ran(ctx, store_root) == []


def test_whitespace_inside_run_misses(ctx, store_root):
    edit(ctx, "RUN cat /app/main.txt > /out", "RUN cat  /app/main.txt > /out")
    assert ran(ctx, store_root) == ["RUN", "LABEL"]
    assert LAST_REASONS["RUN"].startswith("instruction changed: RUN |1 DECLARED=one /bin/sh -c cat  /app")


def test_a_step_after_a_miss_misses(ctx, store_root):
    edit(ctx, "LABEL done=yes", "LABEL done=yes\nLABEL more=1")
    assert ran(ctx, store_root) == ["LABEL"]          # only the new step: nothing before changed
    edit(ctx, "ENV MODE=a", "ENV MODE=c")
    assert ran(ctx, store_root) == ["ENV"] + ALL_AFTER_COPY + ["LABEL"]


def test_moved_base_tag_misses(tmp_path, base_image, store_root):
    ctx = busybox_context(tmp_path / "bb")
    builder.build(str(ctx), tags=["movable:1"], root=store_root)
    # (A step of its own: the docs' examples build `RUN echo hi > /hi` on this same base image.)
    c = write_context(tmp_path / "ctx", {"Dockerfile": "FROM movable:1\nRUN echo moved > /hi\n"})
    assert ran(c, store_root) == ["RUN"]
    assert ran(c, store_root) == []
    (ctx / "rootfs/etc/motd").write_text("a different base\n")
    new_base = builder.build(str(ctx), tags=["movable:1"], root=store_root)
    assert ran(c, store_root) == ["RUN"], "the tag points at a new image: nothing may hit"
    assert LAST_REASONS["RUN"] == f"base image movable:1 now points to {new_base.id}"


def test_no_cache_runs_everything(ctx, store_root):
    assert ran(ctx, store_root, no_cache=True) == ["ARG", "ENV"] + ALL_AFTER_COPY
    assert set(LAST_REASONS.values()) == {"--no-cache"}


def test_no_cache_filter_runs_only_the_stages_it_names(tmp_path, base_image, store_root):
    c = write_context(tmp_path / "stages", {"Dockerfile": f"""FROM {BASE} AS deps
RUN echo deps > /deps
FROM {BASE} AS app
COPY --from=deps /deps /deps
RUN echo app > /app
"""})

    def texts(**kw) -> list[str]:
        events = []
        builder.build(str(c), root=store_root, on_event=events.append, **kw)
        text = {e.step: e.text for e in events if isinstance(e, progress.StepStarted)}
        return [text[e.step] for e in events if isinstance(e, progress.StepDone)
                and not e.cached and not text[e.step].startswith("FROM")]

    texts()
    assert texts() == []
    assert texts(no_cache_filter=("App",)) == ["COPY /deps /deps", "RUN /bin/sh -c echo app > /app"]
    # The other way round: deps runs again, and app after it (it copies from a new result).
    assert texts(no_cache_filter=("deps",))[0] == "RUN /bin/sh -c echo deps > /deps"
    with pytest.raises(builder.DockerfileError, match="--no-cache-filter stage 'nosuch' not found"):
        texts(no_cache_filter=("nosuch",))


def test_first_build_of_a_step_says_so(tmp_path, base_image, store_root):
    c = write_context(tmp_path / "fresh", {"Dockerfile": f"FROM {BASE}\nRUN echo first-ever > /x\n"})
    assert ran(c, store_root) == ["RUN"]
    assert LAST_REASONS["RUN"] == "no earlier build of this step"


def test_explain_cache_prints_every_difference(ctx, store_root, pybuild):
    (ctx / "app/main.txt").write_text("one\n")
    (ctx / "app/other.txt").write_text("two\n")
    (ctx / "app/added.txt").write_text("three\n")
    p = pybuild("--explain-cache", "-t", "explained", ctx)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "cache miss: 3 files changed: app/added.txt (added), app/main.txt (content), " \
           "app/other.txt (content)" in err


def test_prune_beside_a_running_build_drops_entries_and_leaves_layers_for_later(
        tmp_path, base_image, store_root, pybuild):
    """A CI cleanup job beside a running build: the cache entries go at once (exit 0, and a
    note says what waits); the layers only they needed go with the next prune after it."""
    import subprocess
    import sys
    import time
    c = write_context(tmp_path / "first", {
        "Dockerfile": f"FROM {BASE}\nRUN head -c 200000 /dev/urandom > /pruned-later\n"})
    img = builder.build(str(c), root=store_root, tags=["prune-beside:1"])
    chain = __import__("builder.image", fromlist=["x"]).chain_ids(img.diff_ids)[-1]
    pybuild("rmi", "prune-beside:1", check=True)
    slow = write_context(tmp_path / "slow", {
        "Dockerfile": f"FROM {BASE}\nRUN touch /started-{time.time_ns()} && sleep 3\n"})
    build = subprocess.Popen([sys.executable, "-m", "builder", "--root", store_root, "build",
                              "-q", str(slow)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        store = builder.Store(store_root)
        deadline = time.time() + 30          # (until the build holds the store)
        while time.time() < deadline:
            fd = store.try_gc_lock()
            if fd is None:
                break
            os.close(fd)
            time.sleep(0.05)
        p = pybuild("prune")
        err = p.stderr.decode()
        assert p.returncode == 0, err
        assert "note: a build is using the store" in err
        deleted = int(p.stdout.decode().split()[1])
        assert deleted >= 1 and builder.Store(store_root).layers.has(chain)
    finally:
        out, err = build.communicate(timeout=120)
    assert build.returncode == 0, err.decode()
    assert pybuild("prune", check=True).stderr == b""
    assert not builder.Store(store_root).layers.has(chain)


def test_prune_keeps_images_and_recent_cache(tmp_path, base_image, store_root, pybuild):
    c = write_context(tmp_path / "p", {"Dockerfile": ""})
    chains = []
    for i in range(3):
        (c / "Dockerfile").write_text(f"FROM {BASE}\nRUN head -c 300000 /dev/urandom > /r{i}\n")
        img = builder.build(str(c), root=store_root, tags=[f"prune-keep:{i}"])
        chains.append(__import__("builder.image", fromlist=["x"]).chain_ids(img.diff_ids)[-1])
    pybuild("rmi", "prune-keep:0", "prune-keep:1", check=True)
    store = builder.Store(store_root)
    assert all(store.layers.has(ch) for ch in chains), "rmi keeps what the build cache needs"
    p = pybuild("prune", "--keep-storage", "1MB")      # room for one 0.6 MB layer
    assert p.returncode == 0, p.stderr.decode()
    assert "Total reclaimed space" in p.stdout.decode()
    store = builder.Store(store_root)
    assert [store.layers.has(ch) for ch in chains] == [False, True, True], \
        "the older unused layer goes, the newer one fits the budget, the image's stays"
    p = pybuild("builder", "prune", "-af", "--filter", "until=1h")   # used since: all kept
    assert p.returncode == 0 and p.stdout.decode().startswith("Deleted 0 cache entries")
    p = pybuild("builder", "prune", "-af")        # (as CI scripts call Docker's)
    assert p.returncode == 0, p.stderr.decode()
    store = builder.Store(store_root)
    assert [store.layers.has(ch) for ch in chains] == [False, False, True]
    img = store.resolve("prune-keep:2")
    assert store.lower_links(img.diff_ids)
    assert all(store.blobs.verify(l.digest) for l in img.layers)
    assert pybuild("run", "prune-keep:2", "ls", "/r2").returncode == 0


def test_prune_parses_sizes():
    from builder.cli import parse_size
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 * 1024 ** 3
    assert parse_size("1024") == 1024 and parse_size("1.5g") == 1_500_000_000
    with pytest.raises(builder.UsageError):
        parse_size("lots")


def _many_files(root, token: str) -> dict:
    """A context large enough for the copy to fork its workers (fileops._PARALLEL_FROM), with
    a file of more than 1 MB (copied by copy_file_range), hard links, a symlink and xattrs."""
    files = {f"app/d{i % 7}/f{i:04d}.txt": f"{token} {i}\n" for i in range(300)}
    files["app/big.bin"] = os.urandom(1 << 20) + b"tail"
    files["app/noted.txt"] = "has an xattr\n"
    files["Dockerfile"] = f"FROM {BASE}\nCOPY app/ /app/\n"
    ctx = write_context(root, files)
    os.setxattr(ctx / "app/noted.txt", "user.note", token.encode())
    os.link(ctx / "app/d0/f0000.txt", ctx / "app/linked.txt")
    os.symlink("d1/f0001.txt", ctx / "app/link")
    return ctx


def test_a_certain_miss_copies_first_and_keys_the_step_as_a_lookup_would(
        tmp_path, base_image, store_root, monkeypatch):
    """A COPY no entry of the store can answer (nothing has its key's prefix) is copied before
    its key is made, the copy hashing the files it writes: the build reads the context's
    files once. Its key is the one a lookup makes: another Dockerfile of the same steps (no
    recipe of its own, so the store's prefixes decide) hits it, asking no file again."""
    from builder import hashing, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)       # (the files are seconds old)
    ctx = _many_files(tmp_path / "ctx", f"certain-{os.getpid()}-{tmp_path.name}")
    hashed: list[str] = []
    real = hashing.hash_files

    def spy(root, rels):
        hashed.extend(rels)
        return real(root, rels)
    monkeypatch.setattr(hashing, "hash_files", spy)
    assert ran(ctx, store_root) == ["COPY"]
    assert LAST_REASONS["COPY"] == "no earlier build of this step"
    # What the copy could not hash as it wrote it: a file with xattrs (its digest has them)
    # and the hard links (copied in the chrooted pass, as links).
    assert sorted(hashed) == ["app/d0/f0000.txt", "app/linked.txt", "app/noted.txt"]
    hashed.clear()
    (ctx / "Dockerfile.other").write_text((ctx / "Dockerfile").read_text())
    assert ran(ctx, store_root, dockerfile=str(ctx / "Dockerfile.other")) == []
    assert hashed == [], "the stat cache knows every file the copy hashed"
    img = builder.build(str(ctx), root=store_root)
    files = layer_files(builder.Store(store_root), img.layers[-1])
    assert files["app/big.bin"] == (ctx / "app/big.bin").read_bytes()
    assert files["app/d5/f0299.txt"] == (ctx / "app/d5/f0299.txt").read_bytes()
    os.setxattr(ctx / "app/noted.txt", "user.note", b"changed")
    assert ran(ctx, store_root, dockerfile=str(ctx / "Dockerfile.other")) == ["COPY"]


def test_a_store_older_than_prefixes_takes_no_miss_as_certain(tmp_path, base_image, store_root):
    """Entries made before prefixes were listed (an older pybuild) have none: the store is
    marked, and a step another Dockerfile built still hits; the mark goes with the entries."""
    import shutil
    from builder.cache import LEGACY, StepCache
    from builder.store import gc
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY a /a\n",
                                           "a": f"legacy {tmp_path.name}\n"})
    assert ran(ctx, store_root) == ["COPY"]
    store = builder.Store(store_root)
    prefixes = os.path.join(store.cache_dir, "prefixes")
    assert len(os.listdir(prefixes)) >= 1
    shutil.rmtree(prefixes)
    (ctx / "Dockerfile.other").write_text((ctx / "Dockerfile").read_text())
    assert ran(ctx, store_root, dockerfile=str(ctx / "Dockerfile.other")) == []
    assert os.listdir(prefixes) == [LEGACY]
    gc.prune(store, StepCache(store))
    StepCache(store)
    assert os.listdir(prefixes) == [], "no entry is left that a prefix does not list"


def test_prune_drops_the_prefixes_of_the_entries_it_removes(tmp_path, base_image, store_root):
    from builder.cache import StepCache
    from builder.store import gc
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY a /a\n",
                                           "a": f"pruned {tmp_path.name}\n"})
    assert ran(ctx, store_root) == ["COPY"]
    store = builder.Store(store_root)
    prefixes = os.path.join(store.cache_dir, "prefixes")

    def listed() -> dict[str, list[str]]:
        return {n: open(os.path.join(prefixes, n)).read().split() for n in os.listdir(prefixes)}
    before = listed()
    (ctx / "a").write_text("changed\n")
    assert ran(ctx, store_root) == ["COPY"]           # (the same prefix: a second key)
    cache = StepCache(store)
    [prefix] = [n for n, keys in listed().items() if keys != before.get(n)]
    first, second = open(os.path.join(prefixes, prefix)).read().split()
    cache.remove(first)
    cache.prune_prefixes()
    assert open(os.path.join(prefixes, prefix)).read().split() == [second]
    assert cache.may_hold("sha256:" + prefix)
    gc.prune(store, StepCache(store))
    assert os.listdir(prefixes) == []
    (ctx / "Dockerfile.other").write_text((ctx / "Dockerfile").read_text())
    assert ran(ctx, store_root, dockerfile=str(ctx / "Dockerfile.other")) == ["COPY"]


def test_prefixes_removed_under_a_build_are_made_again_and_marked(tmp_path):
    import shutil
    from builder.cache import LEGACY, StepCache, StepKey, StepResult
    cache = StepCache(builder.Store(str(tmp_path / "store")))
    result = StepResult({"created_by": "COPY x /x"}, {})
    keys = [StepKey(parent="sha256:" + "0" * 64, instruction={"copy": n}, sources=("x",))
            for n in ("before", "after")]
    cache.put(keys[0].digest(), result, keys[0].prefix())
    shutil.rmtree(cache.prefix_dir)                   # (someone cleaning the store by hand)
    cache.put(keys[1].digest(), result, keys[1].prefix())
    assert sorted(os.listdir(cache.prefix_dir)) == sorted([LEGACY, keys[1].prefix()[7:]])
    # The entry made before is listed nowhere: no miss is taken as certain any more.
    assert cache.may_hold(keys[0].prefix()) and cache.may_hold("sha256:" + "1" * 64)
