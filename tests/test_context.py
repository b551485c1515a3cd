"""The build context: .dockerignore as Docker matches it, sources and globs, and cache digests."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from builder.context import BuildContext, IgnoreRules
from builder.errors import BuildError

from conftest import write_context


@pytest.mark.parametrize("patterns,path,excluded", [
    (["*.go"], "main.go", True),
    (["*.go"], "dir/main.go", False),
    (["**/*.go"], "dir/sub/main.go", True),
    (["**/*.go"], "main.go", True),
    (["dir/**"], "dir/a/b", True),
    (["dir"], "dir/a/b", True),                       # a matched directory takes its contents
    (["/dir"], "dir/file", True),                     # a leading slash is the context root
    (["./dir/"], "dir/file", True),
    (["d?r"], "dir", True),
    (["d[a-j]r"], "dir", True),
    (["d[!i]r"], "dir", False),
    (["*.md", "!README.md"], "a.md", True),
    (["*.md", "!README.md"], "README.md", False),
    (["docs", "!docs/keep.md"], "docs/x.md", True),
    (["docs", "!docs/keep.md"], "docs/keep.md", False),
    (["!keep", "*"], "keep", True),                   # the last matching line wins
    (["# comment", ""], "anything", False),
    (["a\\*b"], "a*b", True),
    (["a\\*b"], "axb", False),
])
def test_dockerignore_patterns(patterns, path, excluded):
    assert IgnoreRules(patterns).excluded(path) is excluded


_NAMES = ["a", "b", "dir", "docs", "x.md", "README.md", "main.go", "a*b", "keep"]
_PATTERNS = ["*.md", "!README.md", "docs", "!docs/keep", "**/*.go", "dir/**", "a", "/b",
             "d?r", "d[a-j]cs", "!keep", "*", "a/**/x.md", "**/dir", "!dir/a", "a\\*b", "."]


def _random_rules(rng) -> IgnoreRules:
    return IgnoreRules(rng.sample(_PATTERNS, rng.randint(1, 5)))


def _random_path(rng) -> str:
    return "/".join(rng.choice(_NAMES) for _ in range(rng.randint(1, 4)))


def test_one_regex_of_all_patterns_answers_as_the_last_matching_line():
    """excluded() asks one regex of all the patterns first (the fast way for paths nothing
    matches); Docker's rule, the last line that matches the path or a parent, decides."""
    import random
    rng = random.Random(5)
    checked = excluded = 0
    for _ in range(400):
        rules = _random_rules(rng)
        for _ in range(25):
            path = _random_path(rng)
            got = rules.excluded(path)
            assert got == rules._last_match_excludes(path), (
                [p.text + ("!" if p.exclusion else "") for p in rules.patterns], path)
            checked += 1
            excluded += got
    assert 0.2 * checked < excluded < 0.8 * checked      # (both answers were tried)


def test_a_walk_keeps_exactly_the_files_no_pattern_excludes(tmp_path):
    """The walk tries only the entry itself against the patterns when its parent was entered
    (without exceptions no pattern can match that parent): the files it keeps are the ones
    the whole rule keeps, with and without exceptions."""
    import random
    rng = random.Random(7)
    files = sorted({_random_path(rng) for _ in range(60)})
    made = []
    for f in files:
        if any(m.startswith(f + "/") or f.startswith(m + "/") for m in made):
            continue           # (a name cannot be both a file and a directory)
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(f)
        made.append(f)
    for _ in range(60):
        rules = _random_rules(rng)
        (src,) = BuildContext(str(tmp_path), ignore=rules).sources(".") or (None,)
        if src is None:
            continue
        walked = {e.src for e in src.entries if not e.is_dir}
        assert walked == {f for f in made if not rules._last_match_excludes(f)}, \
            [p.text + ("!" if p.exclusion else "") for p in rules.patterns]


@pytest.fixture
def ctx(tmp_path):
    (tmp_path / "src/sub").mkdir(parents=True)
    (tmp_path / "src/a.txt").write_text("a")
    (tmp_path / "src/b.txt").write_text("b")
    (tmp_path / "src/sub/c.txt").write_text("c")
    (tmp_path / "src/secret.key").write_text("k")
    (tmp_path / "link").symlink_to("src/a.txt")
    (tmp_path / ".dockerignore").write_text("**/*.key\n")
    return tmp_path


def test_dir_source_walks_sorted_and_skips_ignored(ctx):
    (src,) = BuildContext(str(ctx)).sources("src")
    assert src.is_dir
    assert [e.rel for e in src.entries] == ["", "a.txt", "b.txt", "sub", "sub/c.txt"]


def test_glob_matches_one_level(ctx):
    names = [s.path for s in BuildContext(str(ctx)).sources("src/*.txt")]
    assert names == ["src/a.txt", "src/b.txt"]


def test_top_level_symlink_is_followed_inside_the_context(ctx):
    (src,) = BuildContext(str(ctx)).sources("link")
    assert src.path == "src/a.txt" and not src.is_dir


@pytest.mark.parametrize("spec", ["../a.txt", "sub/../../a.txt"])
def test_source_outside_the_context_is_an_error(ctx, spec):
    with pytest.raises(BuildError, match="outside the build context"):
        BuildContext(str(ctx / "src")).sources(spec)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../etc/passwd", "src/../../x"])
def test_symlink_out_of_the_context_is_an_error_never_a_read_of_the_host(ctx, target):
    (ctx / "escape").symlink_to(target)
    with pytest.raises(BuildError, match="symlink that leads outside the build context"):
        BuildContext(str(ctx)).sources("escape")


def test_absolute_source_is_relative_to_the_context_root(ctx):
    (src,) = BuildContext(str(ctx)).sources("/src/a.txt")
    assert src.path == "src/a.txt"


@pytest.mark.parametrize("spec", ["missing.txt", "src/secret.key"])
def test_missing_or_ignored_source_is_a_clear_error(ctx, spec):
    with pytest.raises(BuildError, match="not in the build context"):
        BuildContext(str(ctx)).sources(spec)


@pytest.mark.parametrize("spec", ["src/*.none", "src/secret.k?y"])
def test_a_pattern_that_matches_nothing_names_no_source(ctx, spec):
    """As in BuildKit (AllowEmptyWildcard); an ignored file is not there to match."""
    assert BuildContext(str(ctx)).sources(spec) == []


def test_digest_ignores_mtime_but_not_content_or_mode(ctx):
    c = BuildContext(str(ctx))
    d0 = c.digest(c.sources("src")[0])
    os.utime(ctx / "src/a.txt", (1, 1))
    assert c.digest(c.sources("src")[0]) == d0
    os.chmod(ctx / "src/a.txt", 0o600)
    d1 = c.digest(c.sources("src")[0])
    assert d1 != d0
    (ctx / "src/a.txt").write_text("changed")
    assert c.digest(c.sources("src")[0]) != d1


def test_ignored_file_does_not_change_the_digest(ctx):
    c = BuildContext(str(ctx))
    d0 = c.digest(c.sources("src")[0])
    (ctx / "src/secret.key").write_text("rotated")
    assert c.digest(c.sources("src")[0]) == d0


def _many_files(root, n: int) -> list[str]:
    rels = []
    for i in range(n):
        rel = f"d{i % 7}/f{i}"
        os.makedirs(root / f"d{i % 7}", exist_ok=True)
        (root / rel).write_bytes(f"content {i}\n".encode() * (i % 5 + 1))
        rels.append(rel)
    return rels


def test_many_files_are_hashed_by_helpers_as_one_process_would(tmp_path):
    from builder import hashing
    import hashlib
    rels = _many_files(tmp_path, hashing.PARALLEL_FROM_FILES * 2)
    os.symlink("d0/f0", tmp_path / "link")
    with_xattr = rels[-1]                       # (in a helper's share)
    os.setxattr(tmp_path / with_xattr, "user.note", b"v")
    asked = rels + ["missing", "link"]          # unreadable: None, as the caller must retry them
    got = hashing.hash_files(str(tmp_path), asked)
    want = [(hashlib.sha256((tmp_path / r).read_bytes()).hexdigest(), "") for r in rels]
    xattrs = hashing.xattr_digest(str(tmp_path / with_xattr)).hex()
    assert xattrs and xattrs == hashlib.sha256(b"user.note\0" + b"1\0v").hexdigest()
    want[-1] = (want[-1][0], xattrs)
    assert got == want + [None, None]
    assert hashing.hash_files(str(tmp_path), rels[:10]) == want[:10]      # (one process)
    assert hashing.hash_files(str(tmp_path), [with_xattr]) == want[-1:]


def test_a_context_digest_does_not_depend_on_how_it_was_hashed(tmp_path, monkeypatch):
    from builder import context, hashing
    _many_files(tmp_path / "ctx", hashing.PARALLEL_FROM_FILES + 10)
    parallel = BuildContext(str(tmp_path / "ctx"))
    source, = parallel.sources(".")
    first = parallel.digest(source)
    context._content_digests.clear()
    monkeypatch.setattr(hashing, "PARALLEL_FROM_FILES", 10 ** 9)
    serial = BuildContext(str(tmp_path / "ctx"))
    assert serial.digest(serial.sources(".")[0]) == first
    (tmp_path / "ctx/d3/f3").write_text("changed\n")
    context._content_digests.clear()
    monkeypatch.setattr(hashing, "PARALLEL_FROM_FILES", 100)
    again = BuildContext(str(tmp_path / "ctx"))
    assert again.digest(again.sources(".")[0]) != first


def test_hashing_without_helpers_leaves_the_files_to_the_caller(tmp_path, monkeypatch):
    """No interpreter to start (a rootless user who cannot read it): None for those files."""
    from builder import hashing
    import hashlib
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no helpers are started at all")
    rels = _many_files(tmp_path, hashing.PARALLEL_FROM_FILES * 2)
    monkeypatch.setattr(hashing.sys, "executable", str(tmp_path / "no-such-python"))
    got = hashing.hash_files(str(tmp_path), rels)
    assert len(got) == len(rels)
    share = len([g for g in got if g is not None])
    assert 0 < share < len(rels)             # this process's share, and nothing invented
    assert all(g == (hashlib.sha256((tmp_path / r).read_bytes()).hexdigest(), "")
               for r, g in zip(rels, got) if g is not None)
    ctx = BuildContext(str(tmp_path))
    assert ctx.digest(ctx.sources(".")[0]).startswith("sha256:")   # the caller hashes the rest


def test_xattrs_key_the_digest_through_the_stat_cache(tmp_path, monkeypatch):
    """A file's and a directory's xattrs are remembered with their stat (ctime moves when one is
    set), so a later build sees a change without the cache hiding it."""
    from builder import context, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)          # cache even what was just written
    ctx = write_context(tmp_path / "ctx", {"src/a.txt": "a\n", "src/sub/b.txt": "b\n"})
    cache = str(tmp_path / "cache")

    def digest() -> str:
        context._content_digests.clear()                   # a new build process
        c = BuildContext(str(ctx), cache_dir=cache)
        d = c.digest(c.sources("src")[0])
        c.save()
        return d

    plain = digest()
    assert digest() == plain
    os.setxattr(ctx / "src/sub", "user.note", b"dir")
    with_dir_xattr = digest()
    assert with_dir_xattr != plain
    os.setxattr(ctx / "src/a.txt", "user.note", b"file")
    assert digest() not in (plain, with_dir_xattr)
    os.removexattr(ctx / "src/a.txt", "user.note")
    os.removexattr(ctx / "src/sub", "user.note")
    assert digest() == plain


def test_a_changed_source_reuses_the_runs_whose_stats_did_not_move(tmp_path, monkeypatch):
    """statcache.py's runs: a digest is made of runs of entries (a directory's, at most
    _RUN_MAX); a run whose stats did not move is taken from the store, the others are
    computed. Whatever was reused, the digest and the file table must be those of a
    context with no cache at all, for every kind of change."""
    from builder import context, hashing, statcache
    monkeypatch.setattr(statcache, "_RACY_NS", 0)          # cache even what was just written
    monkeypatch.setattr(context, "_RUN_MAX", 3)            # runs inside one directory too
    files = {f"src/d{i}/f{j}.txt": f"{i} {j}\n" for i in range(4) for j in range(5)}
    ctx = write_context(tmp_path / "ctx", {**files, "src/top.txt": "top\n"})
    cache = str(tmp_path / "cache")
    computed = []
    real_lines = context.BuildContext._lines
    monkeypatch.setattr(context.BuildContext, "_lines", lambda self, entries, digests: (
        computed.extend(e.src for e in entries), real_lines(self, entries, digests))[1])
    hashed, asked, told = [], [], []
    real_hash, real_get = hashing.hash_files, statcache.StatCache.get
    real_put = statcache.StatCache.put
    monkeypatch.setattr(hashing, "hash_files", lambda root, paths: (
        hashed.extend(paths), real_hash(root, paths))[1])
    monkeypatch.setattr(statcache.StatCache, "get", lambda self, rel, st: (
        asked.append(rel), real_get(self, rel, st))[1])
    monkeypatch.setattr(statcache.StatCache, "put", lambda self, rel, st, *digests: (
        told.append(rel), real_put(self, rel, st, *digests))[1])

    def check(changed: set[str], read: set[str] | None = None,
              stat_cache: bool = True) -> None:
        """Digest with the cache, then without; `changed`: the runs' paths recomputed,
        `read`: the files hashed (if given), `stat_cache`: was the stat cache asked (and
        told the digests read)?"""
        context._content_digests.clear()                   # a new build process
        computed.clear(), hashed.clear(), asked.clear(), told.clear()
        c = BuildContext(str(ctx), cache_dir=cache)
        source = c.sources("src")[0]
        got = c.digest(source)
        assert bool(asked) == stat_cache
        if read is not None:
            files_told = {p for p in told if not p.endswith("/")}     # (dirs: their xattrs)
            assert files_told == (set(hashed) if stat_cache else set())
        table = c.file_table(source)
        c.save()
        assert set(computed) == changed
        if read is not None:
            assert set(hashed) == read
        context._content_digests.clear()
        fresh = BuildContext(str(ctx))
        source = fresh.sources("src")[0]
        assert got == fresh.digest(source) and table == fresh.file_table(source)

    everything = {"src", "src/top.txt", "src/d0", "src/d1", "src/d2", "src/d3"} | {
        p for p in files}
    check(everything, set(files) | {"src/top.txt"})
    check(set(), set(), stat_cache=False)                  # (the whole source's fingerprint)
    # The run of f3 and f4 alone, and in it f3 alone is read (f4's stat is the one the run
    # kept): without asking the stat cache, which cannot know f3's new stat either, or
    # telling it (the run keeps it): a build that has nothing for it does not load it.
    (ctx / "src/d1/f3.txt").write_text("changed\n")
    check({"src/d1/f3.txt", "src/d1/f4.txt"}, {"src/d1/f3.txt"}, stat_cache=False)
    os.chmod(ctx / "src/d2/f0.txt", 0o600)                # (its ctime moved: read again)
    check({"src/d2/f0.txt", "src/d2/f1.txt", "src/d2/f2.txt"}, {"src/d2/f0.txt"},
          stat_cache=False)
    (ctx / "src/d3/f5.txt").write_text("new\n")            # an added file: its run, and
    check({"src/d3", "src/d3/f3.txt", "src/d3/f4.txt", "src/d3/f5.txt"},   # its dir's time
          {"src/d3/f5.txt"})
    os.unlink(ctx / "src/d0/f4.txt")
    check({"src/d0", "src/d0/f3.txt"}, set())
    os.symlink("top.txt", ctx / "src/link")
    (ctx / "src/d1").rename(ctx / "src/e1")                # runs move: others stay
    check({"src", "src/e1", "src/link", "src/top.txt"} | {f"src/e1/f{j}.txt" for j in range(5)})


def test_copy_leaves_out_overlays_own_xattrs_in_the_key_too():
    from builder import hashing
    from builder.layer import whiteout
    assert set(whiteout.OVERLAY_XATTR_PREFIXES) <= set(hashing.NOT_COPIED_XATTRS)


def test_the_file_table_a_digest_leaves_behind_is_the_one_asked_for(tmp_path):
    """digest() hands file_table() the table it made on the way; it must be the table a
    context that did not hash first makes, xattrs, links and dirs included, and it is used
    only for the very entries it was made of."""
    ctx = write_context(tmp_path / "ctx", {"src/a.txt": "a\n", "src/sub/b.txt": "b\n"})
    os.symlink("a.txt", ctx / "src/link")
    os.setxattr(ctx / "src/a.txt", "user.note", b"file")
    os.setxattr(ctx / "src/sub", "user.note", b"dir")
    hashed = BuildContext(str(ctx))
    source = hashed.sources("src")[0]
    hashed.digest(source)
    assert source.path in hashed._tables                  # (made on the way, handed once)
    handed = hashed.file_table(source)
    assert source.path not in hashed._tables
    asked = BuildContext(str(ctx)).file_table(BuildContext(str(ctx)).sources("src")[0])
    assert handed == asked
    assert handed["src/a.txt"][2].endswith(" xattrs:" + asked["src/a.txt"][2].split(":")[-1])
    assert handed["src/link"] == ("symlink", "777", "a.txt")
    assert set(handed) == {"src", "src/a.txt", "src/link", "src/sub", "src/sub/b.txt"}

    (ctx / "src/sub/b.txt").write_text("changed\n")      # a new walk: its own table
    again = hashed.sources("src")[0]
    assert hashed.file_table(again)["src/sub/b.txt"] != handed["src/sub/b.txt"]


def test_the_process_digest_memo_forgets_its_oldest_files_when_full(tmp_path, monkeypatch):
    """A long-lived process (an orchestrator building many contexts) keeps a bounded memo:
    past the bound the oldest quarter goes, the newest stay, and a forgotten file's digest
    comes back right (from the file, here there is no stat cache)."""
    from builder import context
    monkeypatch.setattr(context, "_content_digests", {})
    monkeypatch.setattr(context, "_MEMO_MAX", 40)
    ctx = write_context(tmp_path / "ctx", {f"f{i:02d}": f"{i}\n" for i in range(60)})
    c = BuildContext(str(ctx))
    entries = c.sources(".")[0].entries[1:]
    digests = {e.src: c.file_digest(e.src, e.st)[0] for e in entries}
    assert len(context._content_digests) <= 40
    assert context.known_digest(entries[-1].st) == digests["f59"]       # the newest stayed
    assert context.known_digest(entries[0].st) is None                  # the oldest went
    assert c.file_digest("f00", entries[0].st)[0] == digests["f00"] == \
        hashlib.sha256(b"0\n").hexdigest()


def test_learned_digests_make_the_source_digest_and_answer_known_digest(tmp_path, monkeypatch):
    """learn() (the digests a COPY made of what it copied) is what digest() uses for those very
    files, without reading them; known_digest() has them too (taken into the memo when asked);
    a file walked again (another stat) is not answered from what was learned of the old one."""
    import hashlib
    from builder import context
    monkeypatch.setattr(context, "_content_digests", {})
    monkeypatch.setattr(context, "_unlearned", [])
    ctx_dir = write_context(tmp_path / "ctx", {f"d{i}/f{i}": f"{i}\n" for i in range(12)})
    ctx = BuildContext(str(ctx_dir))
    source, = ctx.sources(".")
    files = [e for e in source.entries if stat.S_ISREG(e.st.st_mode)]
    real = BuildContext(str(ctx_dir)).digest(source)
    context._content_digests.clear()
    # Digests no file has: if digest() read the files, it could not give them.
    made_up = {e.src: hashlib.sha256(b"learned " + e.src.encode()).hexdigest() for e in files}
    ctx.learn([e.src for e in files], [e.st for e in files], [made_up[e.src] for e in files])
    learned = ctx.digest(source)
    assert learned != real
    assert ctx.file_table(source)[files[0].src][2] == made_up[files[0].src]
    assert all(context.known_digest(e.st) == made_up[e.src] for e in files)
    # A new walk of the same files (new stat objects; a build walks the context once per step
    # that reads it): digest() no longer takes what was learned of the old ones by path.
    context._content_digests.clear()
    again = BuildContext(str(ctx_dir))
    again._learned = ctx._learned
    assert again.digest(again.sources(".")[0]) == real


def test_a_run_keeps_an_inode_number_with_the_top_bit_set():
    # A run's identities are signed 64-bit numbers: an inode number with the top bit set
    # (overlayfs hands them out with xino) made the digest of such a context fail with
    # OverflowError. It is kept wrapped around, as the check that reads it back wraps it.
    import array
    import types
    from builder import context
    st = types.SimpleNamespace(st_size=3, st_mtime_ns=-5, st_ctime_ns=11, st_ino=2**63 + 5)
    rows = [("f", "f", 0o100644, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, 1)]
    kept = array.array("q", context._identities(rows))
    assert tuple(kept) == context._run_identity(st) == (3, -5, 11, 5 - 2**63)


def test_a_context_on_an_overlay_whose_inode_numbers_pass_63_bits_builds_and_rebuilds(
        tmp_path, base_image, store_root, monkeypatch):
    # Overlayfs with xino puts a layer's number in the top bits of the inode numbers it
    # reports: a context on such a mount (a container's root, say) has files whose inode
    # numbers do not fit the signed 64-bit numbers of a COPY's rows and of its digest's
    # runs. The COPY failed with "internal error in the sandbox: OverflowError".
    import builder
    from builder import linux, statcache
    from builder.store import Store
    from conftest import BASE, layer_files
    monkeypatch.setattr(statcache, "_RACY_NS", 0)          # keep the runs of fresh files
    low, upper, work, merged = (tmp_path / n for n in ("low", "upper", "work", "merged"))
    for d in (low, upper, work, merged):
        d.mkdir()
    linux.mount("tmpfs", str(low), "tmpfs", 0, "size=4m")   # (another file system than upper)
    try:
        write_context(low, {"Dockerfile": f"FROM {BASE}\nCOPY . /app\n", "a.txt": "a\n"})
        linux.mount("overlay", str(merged), "overlay", 0,
                    f"lowerdir={low},upperdir={upper},workdir={work},xino=on")
        try:
            (merged / "b.txt").write_text("b\n")
            if os.stat(merged / "a.txt").st_ino < 2**63:
                pytest.skip("this kernel's overlay gave no inode number past 63 bits")
            store = Store(store_root)
            first = builder.build(str(merged), root=store_root)
            files = layer_files(store, first.layers[-1])
            assert (files["app/a.txt"], files["app/b.txt"]) == (b"a\n", b"b\n")
            (merged / "b.txt").write_text("b, again\n")
            second = builder.build(str(merged), root=store_root)
            files = layer_files(store, second.layers[-1])
            assert (files["app/a.txt"], files["app/b.txt"]) == (b"a\n", b"b, again\n")
        finally:
            linux.umount(str(merged))
    finally:
        linux.umount(str(low))


def test_a_context_named_through_a_symlink_is_its_directory(tmp_path, base_image, store_root):
    # `pybuild build link-to-ctx`: the context's own entry was the symlink, and the digest
    # of `COPY .` read it as one ("Invalid argument" from readlink). It is the directory.
    import builder
    from builder.store import Store
    from conftest import BASE, layer_files
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY . /app/\n",
                                           "a.txt": "a\n", "sub/b.txt": "b\n"})
    link = tmp_path / "link"
    link.symlink_to(ctx)
    image = builder.build(str(link), root=store_root)
    files = layer_files(Store(store_root), image.layers[-1])
    assert (files["app/a.txt"], files["app/sub/b.txt"]) == (b"a\n", b"b\n")
    source, = BuildContext(str(link)).sources(".")
    assert stat.S_ISDIR(source.entries[0].st.st_mode)
    assert BuildContext(str(link)).digest(source) == BuildContext(str(ctx)).digest(
        BuildContext(str(ctx)).sources(".")[0])
