"""Layer tars: deterministic archiving of an upper dir, and extraction that never leaves its directory."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import stat
import sys
import tarfile
import traceback

import pytest

from builder.errors import LayerError
from builder.layer import diff, extract, tarformat, whiteout
from builder.store import direct

from conftest import nested_dirs


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b


def tar_of(root) -> bytes:
    s = Sink()
    diff.write_tar(str(root), s, strip_overlay_xattrs=False)
    return bytes(s.data)


def make_upper(root):
    (root / "dir/sub").mkdir(parents=True)
    (root / "dir/file").write_text("content")
    os.link(root / "dir/file", root / "dir/hardlink")
    (root / "dir/link").symlink_to("/etc/passwd")
    long_name = "n" * 150
    (root / "dir/sub" / long_name).write_text("long")
    os.chmod(root / "dir/file", 0o4755)
    os.chown(root / "dir/sub", 1234, 5678)
    whiteout.make_whiteout(str(root / "deleted"))
    (root / "opaque").mkdir()
    whiteout.make_opaque(str(root / "opaque"))
    (root / "opaque/new").write_text("x")
    os.setxattr(root / "dir/file", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.setxattr(root / "dir/file", "trusted.overlay.origin", b"junk")
    return long_name


def test_upper_dir_becomes_oci_entries(tmp_path):
    long_name = make_upper(tmp_path)
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(tar_of(tmp_path)))}
    assert members["dir/file"].mode == 0o4755
    assert members["dir/file"].pax_headers["SCHILY.xattr.security.capability"]
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers), \
        "overlayfs bookkeeping xattrs must not reach a layer"
    assert members["dir/hardlink"].islnk() and members["dir/hardlink"].linkname == "dir/file"
    assert members["dir/link"].issym() and members["dir/link"].linkname == "/etc/passwd"
    assert (members["dir/sub"].uid, members["dir/sub"].gid) == (1234, 5678)
    assert f"dir/sub/{long_name}" in members
    assert members[".wh.deleted"].isfile() and members[".wh.deleted"].size == 0
    assert members["opaque/.wh..wh..opq"].isfile()
    assert "deleted" not in members
    names = [m.name for m in tarfile.open(fileobj=io.BytesIO(tar_of(tmp_path)))]
    assert names.index("dir") < names.index("dir/file"), "a directory precedes its contents"


def test_same_tree_same_bytes(tmp_path):
    make_upper(tmp_path)
    assert tar_of(tmp_path) == tar_of(tmp_path)


def test_any_depth_and_the_order_of_a_sorted_walk(tmp_path):
    """The walk is not recursive: a tree deeper than the recursion limit allows archives
    (the limit is lowered here so the tree can stay small), entries come in sorted
    depth-first order, and no descriptor is left open."""
    depth = 300
    root = tmp_path / "deep"
    (root / "/".join(["dd"] * depth)).mkdir(parents=True)
    (root / "/".join(["dd"] * depth) / "leaf").write_text("bottom\n")
    (root / "b").mkdir()
    (root / "b" / "inner").write_text("in b\n")
    (root / "a.txt").write_text("a\n")
    (root / "c.txt").write_text("c\n")
    open_before = len(os.listdir("/proc/self/fd"))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + depth // 2)
    try:
        data = tar_of(root)
    finally:
        sys.setrecursionlimit(limit)
    assert len(os.listdir("/proc/self/fd")) == open_before
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        members = t.getmembers()
        names = [m.name for m in members]
        assert names[:5] == ["a.txt", "b", "b/inner", "c.txt", "dd"]
        assert len(names) == 4 + depth + 1
        assert names[-1] == "/".join(["dd"] * depth) + "/leaf"
        assert t.extractfile(members[-1]).read() == b"bottom\n"


def test_a_tree_past_path_max_archives_its_symlinks_fifos_and_devices(tmp_path):
    """A layer's tree may be deeper than a path from / can say (PATH_MAX, 4,096 bytes): the
    walk opens files and dirs through their parent's descriptor, and asked symlinks,
    fifos and devices by their path from the root, which failed ("File name too long")."""
    names = ["d" * 100] * 42                                  # 4,242 bytes, and the root's
    fd = nested_dirs(tmp_path, names)
    try:
        os.symlink("f", "link", dir_fd=fd)
        os.mkfifo("fifo", dir_fd=fd)
        os.mknod("null", stat.S_IFCHR | 0o600, os.makedev(1, 3), dir_fd=fd)
    finally:
        os.close(fd)
    with tarfile.open(fileobj=io.BytesIO(tar_of(tmp_path))) as t:
        members = {m.name: m for m in t.getmembers()}
    bottom = "/".join(names)
    assert members[f"{bottom}/link"].issym() and members[f"{bottom}/link"].linkname == "f"
    assert members[f"{bottom}/fifo"].isfifo()
    null = members[f"{bottom}/null"]
    assert null.ischr() and (null.devmajor, null.devminor, null.mode) == (1, 3, 0o600)


def test_a_regular_file_s_quick_header_is_header_s_bytes_and_tarfile_reads_it():
    """tarformat.regular() (its checksum from Adler-32) against header(), over names and
    numbers on both sides of every limit: short and long, ASCII and not, ids, sizes and
    times that need PAX records; and tarfile reads back what it says."""
    rng = random.Random(5)
    letters = "abz/_.-09é"
    for _ in range(5000):
        name = "".join(rng.choice(letters) for _ in range(rng.randint(1, 160)))
        mode = rng.choice([0, 0o644, 0o4755, 0o7777])
        uid, gid = rng.choice([0, 1000, 0o7777777, 0o10000000]), rng.choice([0, 50, 2**22])
        size = rng.choice([0, 1, 3500, 0o77777777777, 2**33 + 1])
        mtime = rng.choice([0, 1_700_000_000, -5, 0o77777777777, 2**34])
        quick = tarformat.regular(name, mode, uid, gid, size, mtime)
        assert quick == tarformat.header(name, typeflag=tarformat.REGULAR, mode=mode, uid=uid,
                                         gid=gid, size=size, mtime=mtime), (name, mode, uid,
                                                                            gid, size, mtime)
    name = "app/" + "x" * 96                       # (100 bytes: the last fast-path name)
    data = tarformat.regular(name, 0o640, 7, 8, 3, 1_700_000_000) + b"abc" + tarformat.pad(3)
    with tarfile.open(fileobj=io.BytesIO(data + tarformat.END_OF_ARCHIVE)) as t:
        m = t.getmembers()[0]
        assert (m.name, m.mode, m.uid, m.gid, m.size, m.mtime) == \
            (name, 0o640, 7, 8, 3, 1_700_000_000)
        assert t.extractfile(m).read() == b"abc"


def test_extract_round_trip_restores_overlay_form(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_upper(src)
    data = tar_of(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    extract.extract(io.BytesIO(data), str(dst))
    st = os.lstat(dst / "deleted")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(dst / "opaque", "trusted.overlay.opaque") == b"y"
    assert os.stat(dst / "dir/file").st_ino == os.stat(dst / "dir/hardlink").st_ino
    assert os.stat(dst / "dir/file").st_mode & 0o7777 == 0o4755
    assert os.readlink(dst / "dir/link") == "/etc/passwd"
    assert os.getxattr(dst / "dir/file", "security.capability")
    # and archiving the extracted tree gives the same layer back
    assert tar_of(dst) == data


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for info, content in entries:
            t.addfile(info, io.BytesIO(content) if content is not None else None)
    return buf.getvalue()


def _file(name, content=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


def _special(name, kind, target):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


MALICIOUS = {
    "dotdot": [_file("../escaped")],
    "deep-dotdot": [_file("a/../../escaped")],
    "through-absolute-symlink": [_special("link", tarfile.SYMTYPE, "/tmp/pybuild-outside"),
                                 _file("link/escaped")],
    "through-relative-symlink": [_special("up", tarfile.SYMTYPE, "../.."), _file("up/escaped")],
    "hardlink-outside": [_special("hl", tarfile.LNKTYPE, "../../../etc/passwd")],
    "hardlink-through-symlink": [_special("etc", tarfile.SYMTYPE, "/etc"),
                                 _special("hl", tarfile.LNKTYPE, "etc/passwd")],
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_layer_is_refused_and_writes_nothing_outside(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = outside / "a" / "layer"
    dest.mkdir(parents=True)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(LayerError) as err:
        extract.extract(io.BytesIO(_tar(MALICIOUS[case])), str(dest), what="layer 1")
    assert "layer 1: refusing entry" in str(err.value)
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert all(str(p).startswith(str(dest)) for p in created), created
    assert not os.path.exists("/tmp/pybuild-outside/escaped")


def test_absolute_names_stay_inside_the_layer(tmp_path):
    extract.extract(io.BytesIO(_tar([_file("/etc/abs", b"ok")])), str(tmp_path))
    assert (tmp_path / "etc/abs").read_bytes() == b"ok"


def test_later_entry_replaces_earlier(tmp_path):
    data = _tar([_file("f", b"one"), _file("f", b"two")])
    extract.extract(io.BytesIO(data), str(tmp_path))
    assert (tmp_path / "f").read_bytes() == b"two"


def test_truncated_tar_is_a_clear_error(tmp_path):
    data = _tar([_file("big", b"y" * 5000)])
    with pytest.raises(LayerError, match="truncated|corrupt"):
        extract.extract(io.BytesIO(data[:1500]), str(tmp_path), what="layer 2")


# ---- the layer sink: hash, compress and write in three threads --------------------------

class FailingBlob:
    """A blob writer whose disk fills up after `room` bytes."""

    def __init__(self, room: int):
        self.room = room
        self.written = 0

    def write(self, b):
        if self.written + len(b) > self.room:
            raise OSError(28, "No space left on device")
        self.written += len(b)


def test_layer_sink_gives_the_tar_digest_and_a_gzip_of_it(tmp_path):
    import gzip
    import hashlib
    import threading
    from builder.layer import compress
    data = [os.urandom(300_000) for _ in range(20)] + [b"x" * 5_000_000, b"", b"tail"]
    blob = Sink()
    with compress.LayerSink(blob) as sink:
        for piece in data:
            sink.write(piece)
        sink.close()
    tar = b"".join(data)
    assert sink.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert sink.tar_size == len(tar)
    assert gzip.decompress(bytes(blob.data)) == tar
    assert not [t for t in threading.enumerate() if t.name.startswith("pybuild-")]


@pytest.mark.parametrize("size", [0, 1, 700_000, (1 << 20) - 1, 1 << 20, 3_000_000])
def test_layer_sink_starts_its_threads_only_for_a_layer_of_a_megabyte_or_more(size, monkeypatch):
    import gzip
    import hashlib
    from builder.layer import compress
    started = []
    monkeypatch.setattr(compress.Stage, "__init__", lambda self, work, name, init=compress.Stage.__init__:
                        (started.append(name), init(self, work, name))[1])
    data = os.urandom(size)
    blob = Sink()
    with compress.LayerSink(blob) as sink:
        for i in range(0, size, 300_000):
            sink.write(data[i:i + 300_000])
        sink.close()
        sink.close()                             # (a second close writes nothing more)
    assert gzip.decompress(bytes(blob.data)) == data
    assert sink.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sorted(started) == ([] if size < 1 << 20 else ["pybuild-blob-write", "pybuild-compress"])


@pytest.mark.parametrize("fail_in", ["write", "compress"])
def test_layer_sink_failure_reaches_the_caller_and_ends_its_threads(fail_in, monkeypatch):
    import threading
    from builder.layer import compress
    blob = FailingBlob(room=3 << 20 if fail_in == "write" else 1 << 40)
    if fail_in == "compress":
        class Broken:
            calls = 0

            def compress(self, b):
                Broken.calls += 1
                if Broken.calls == 3:
                    raise ValueError("compressor broke")
                return b

            def flush(self):
                return b""
        monkeypatch.setattr(compress, "_compressor", lambda algorithm: Broken())
    with pytest.raises((OSError, ValueError)) as e:
        with compress.LayerSink(blob) as sink:
            for _ in range(64):                      # far more than the queues hold
                sink.write(os.urandom(1 << 20))
            sink.close()
    assert ("No space left" if fail_in == "write" else "compressor broke") in str(e.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("pybuild-")]


def test_read_ahead_reads_the_stream_as_it_is_and_passes_errors_on():
    import threading
    from builder.layer import compress
    data = os.urandom(3 << 20) + b"end"
    src = io.BytesIO(data)
    ahead = compress.ReadAhead(src.read, "pybuild-test-read")
    got = [ahead.read(10240), ahead.read(1), ahead.read(5 << 20), ahead.read()]
    assert b"".join(got) == data and ahead.read(7) == b""
    assert len(got[0]) == 10240 and len(got[1]) == 1
    ahead.close()

    def broken(n, left=[2]):
        left[0] -= 1
        if left[0] < 0:
            raise LayerError("layer: corrupt or truncated data")
        return b"x" * n
    ahead = compress.ReadAhead(broken, "pybuild-test-read")
    with pytest.raises(LayerError, match="corrupt"):
        while ahead.read(4096):
            pass
    ahead.close()
    # A reader that gives up early: the thread, blocked on its full queue, still ends.
    ahead = compress.ReadAhead(io.BytesIO(os.urandom(64 << 20)).read, "pybuild-test-read")
    assert len(ahead.read(100)) == 100
    ahead.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("pybuild-")]


def test_read_ahead_close_does_not_wait_for_a_stalled_read():
    """Ctrl-C during a stalled download must not wait for the HTTP read timeout."""
    import time
    from builder.layer import compress
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb", buffering=0) as stream:
            ahead = compress.ReadAhead(stream.read, "pybuild-test-stalled")
            started = time.monotonic()
            assert ahead.close(wait=0.2) is False
            assert time.monotonic() - started < 1.0
            os.write(w, b"late")             # the read returns; the thread then ends
            os.close(w)
            w = -1
            ahead._thread.join(5)
            assert not ahead._thread.is_alive()
    finally:
        if w >= 0:
            os.close(w)


def test_chain_ids_of_growing_and_branching_stacks_follow_the_oci_definition():
    # chain_ids remembers whole stacks and extends a remembered one by a hash: whatever
    # order stacks are asked in, the answer must be the spec's recursion.
    import hashlib
    from builder.image import chain_ids

    def by_definition(diff_ids):
        out = []
        for d in diff_ids:
            out.append(d if not out else
                       "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
        return out
    ids = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(80)]
    other = ids[:40] + ["sha256:" + "e" * 64] + ids[41:]
    asked = [ids[:n] for n in range(81)] + [other[:n] for n in range(81)] + \
        [ids[:n] for n in range(80, -1, -7)] + [other[:70], ids[:70]]
    for stack in asked:
        got = chain_ids(stack)
        assert got == by_definition(stack)
        got.append("x")                          # a caller's list is its own
        assert chain_ids(stack) == by_definition(stack)


def test_chain_ids_from_many_threads_at_once():
    # Stages build in threads; the stacks chain_ids remembers (cachetools' LRUCache, which
    # is not thread-safe) are shared. Without its lock this raised KeyError and "OrderedDict
    # mutated during iteration" within a few thousand calls.
    import hashlib
    import random
    import threading
    from builder.image import _walk_chain, chain_ids
    ids = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(120)]
    errors = []

    def work(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(4000):
                start = rnd.randrange(0, 5)
                stack = ids[start:start + rnd.randrange(1, 115)]
                if chain_ids(stack) != _walk_chain(stack):
                    errors.append("a wrong chain")
        except Exception as e:      # (reported below, from the test's own thread)
            errors.append(f"{type(e).__name__}: {str(e)[:60]}")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


@pytest.mark.parametrize("rate", ["kept", "too slow"])
@pytest.mark.parametrize("size", [0, 100, direct.CHUNK, direct.JUDGED_AFTER + 12345, 3 * direct.JUDGED_AFTER + 7])
def test_direct_file_writes_every_byte_in_order_whether_it_stays_direct_or_not(tmp_path, monkeypatch,
                                                                             size, rate):
    """Written past the page cache in aligned chunks, the tail and whatever follows a switch
    to the page cache (a disk slower than DIRECT_MIN_RATE) through it: the same bytes."""
    # (Any disk is slower than 1 PB/s, and faster than 0.)
    monkeypatch.setattr(direct, "DIRECT_MIN_RATE", 1e15 if rate == "too slow" else 0)
    monkeypatch.setattr(direct, "_slow_devices", set())
    data = os.urandom(size)
    path = tmp_path / "blob"
    f = direct.DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    was_direct = f.direct
    for i in range(0, size, 1000003):          # pieces that never line up with a chunk
        f.write(data[i:i + 1000003])
    still_direct = f.direct
    f.close()
    assert path.read_bytes() == data
    assert f.closed
    if was_direct and size > direct.JUDGED_AFTER:
        # Judged once, on the first 16 MB. (A file system that takes O_DIRECT at fcntl and
        # refuses it at write, EINVAL, ends buffered and unjudged either way.)
        refused = not direct._slow_devices and not still_direct
        assert still_direct == (rate == "kept" and not refused)
        # A file system judged too slow gets the next blobs through the page cache at once.
        g = direct.DirectFile(os.open(tmp_path / "next", os.O_WRONLY | os.O_CREAT, 0o600))
        assert g.direct == (rate == "kept" or refused)
        g.discard()


def test_direct_file_falls_back_where_the_file_system_refuses_o_direct(tmp_path, monkeypatch):
    """EINVAL from a direct write (a file system without O_DIRECT, an alignment it does not
    take): what the chunk held goes through the page cache, nothing twice, nothing lost."""
    real_write = os.write
    calls = []

    def refusing(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)
    data = os.urandom(2 * direct.CHUNK + 99)
    path = tmp_path / "blob"
    f = direct.DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    monkeypatch.setattr(direct.os, "write", refusing)
    f.write(data)
    f.close()
    assert path.read_bytes() == data
    if calls and calls[0] == direct.CHUNK:
        assert not f.direct


def test_a_committed_blob_is_the_same_whether_written_direct_or_not(tmp_path):
    """The store's writer with and without O_DIRECT: same digest, same file, and an aborted
    one leaves no temp file."""
    from builder.store.blobs import BlobStore
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    (tmp_path / "tmp").mkdir()
    store = BlobStore(str(tmp_path), str(tmp_path / "tmp"))
    data = os.urandom(direct.JUDGED_AFTER + 5000)
    digests = []
    for flag in (False, True):
        with store.writer(direct=flag) as w:
            w.write(data[:7])
            w.write(data[7:])
            digests.append(w.commit())
    assert digests[0] == digests[1] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert open(store.path(digests[0]), "rb").read() == data
    with store.writer(direct=True) as w:
        w.write(data)
    assert os.listdir(tmp_path / "tmp") == []


def _nowait_reads(directory) -> bool:
    """Does this file system answer a read with RWF_NOWAIT (of a cached page)?"""
    if not hasattr(os, "RWF_NOWAIT"):
        return False
    probe = directory / "nowait-probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("offset,length", [(0, 0), (0, 10), (4095, 2), (5000, 2 * direct.CHUNK),
                                           (0, 2 * direct.CHUNK + 5), (100, 2 * direct.CHUNK + 4900)])
def test_read_range_gives_the_bytes_asked_for_from_the_cache_or_past_it(tmp_path, cached,
                                                                        offset, length):
    """Every range of a blob, at any offset, aligned or not, to its last byte: read past the
    page cache where the blob is not in it (written by DirectFile), through it where it is."""
    data = os.urandom(2 * direct.CHUNK + 5000)
    path = tmp_path / "blob"
    if cached:
        path.write_bytes(data)
    else:
        f = direct.DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        went_direct = f.direct
        f.write(data)
        f.close()
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # (the tail went through it)
        os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = direct._direct_reader(fd, offset)
        if reader is not None:
            os.close(reader)
        if cached:
            assert reader is None
        elif went_direct and _nowait_reads(tmp_path):
            assert reader is not None
        got = b"".join(bytes(p) for p in direct.read_range(fd, offset, length))
        assert got == data[offset:offset + length]
        with pytest.raises(OSError, match="ends early"):
            for _ in direct.read_range(fd, len(data) - 10, 11):
                pass
    finally:
        os.close(fd)


def test_members_read_ahead_come_in_order_and_errors_reach_the_caller(tmp_path, monkeypatch):
    """splice's read-ahead: each member's bytes from the file they were asked from, never
    more than AHEAD_BYTES held; a member asked out of order or from another file is read
    by the caller; a read that fails fails take() for that member."""
    from builder.layer import splice
    monkeypatch.setattr(splice, "AHEAD_BYTES", 3000)
    data = os.urandom(10000)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        ranges = [(fd, i * 1000, 1000) for i in range(10)]
        ahead = splice._MembersAhead(5, ranges[:8])          # members 5..12
        for k in range(5, 13):
            assert ahead.take(k, fd) == data[(k - 5) * 1000:(k - 4) * 1000]
            assert ahead._held <= 3000
        assert ahead.take(13, fd) is None                       # past the last: none
        ahead.close()
        ahead = splice._MembersAhead(0, ranges)
        assert ahead.take(2, fd) == data[2000:3000]             # 0 and 1 never asked for
        assert ahead.take(2, fd) is None                        # (3 came: stopped)
        assert not ahead._thread.is_alive()
        ahead = splice._MembersAhead(0, ranges)
        assert ahead.take(0, fd + 1000) is None                 # another file's member
        ahead.close()
        ahead = splice._MembersAhead(0, [(fd, 9500, 1000)])     # past the end of the file
        with pytest.raises(OSError, match="ends early"):
            ahead.take(0, fd)
        ahead.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("n", [1000, 1 << 20, 3 * direct.CHUNK])
def test_read_chunks_are_bytes_of_n_in_order(tmp_path, n):
    """A push's chunks: bytes objects (its HTTP client may keep them while the next is read
    into the same buffer), each `n` bytes but the last, together the file's first bytes."""
    data = os.urandom(2 * direct.CHUNK + 12345)
    path = tmp_path / "blob"
    f = direct.DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    f.write(data)
    f.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = list(direct.read_chunks(fd, len(data) - 5, n))
    finally:
        os.close(fd)
    assert all(type(c) is bytes for c in chunks)
    assert [len(c) for c in chunks[:-1]] == [n] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= n
    assert b"".join(chunks) == data[:-5]


@pytest.mark.parametrize("fails", ["mmap", "fcntl"])
def test_direct_file_without_its_buffer_or_o_direct_writes_through_the_page_cache(tmp_path,
                                                                               monkeypatch, fails):
    """No aligned buffer (no memory for it) or no O_DIRECT (the file system refuses it at
    fcntl): the file is written as any file, and O_DIRECT is not left on its descriptor."""
    import fcntl

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM if fails == "mmap" else errno.EINVAL, "refused")
    real_fcntl = fcntl.fcntl
    if fails == "mmap":
        monkeypatch.setattr(direct.mmap, "mmap", refuse)
    else:
        monkeypatch.setattr(direct.fcntl, "fcntl", lambda fd, cmd, *a: refuse()
                            if cmd == fcntl.F_SETFL else real_fcntl(fd, cmd, *a))
    fd = os.open(tmp_path / "blob", os.O_WRONLY | os.O_CREAT, 0o600)
    f = direct.DirectFile(fd)
    assert not f.direct
    assert not real_fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
    data = os.urandom(direct.CHUNK + 3)
    f.write(data)
    f.close()
    assert (tmp_path / "blob").read_bytes() == data


def test_a_layer_path_the_disk_cannot_take_is_named_in_the_layer_and_shortened(tmp_path):
    """Extraction writes by path from its staging dir: a member whose path passes PATH_MAX
    there fails, and the error named it in the staging dir with all 4 KB of it."""
    deep = "/".join(["d" * 100] * 42) + "/f"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(deep)
        info.size = 2
        t.addfile(info, io.BytesIO(b"x\n"))
    buf.seek(0)
    (tmp_path / "dest").mkdir()
    with pytest.raises(LayerError) as err:
        extract.extract(buf, str(tmp_path / "dest"), what="layer 1")
    message = str(err.value)
    assert message.startswith("layer 1: cannot write /dddd"), message[:200]
    assert "characters)..." in message and str(tmp_path) not in message and len(message) < 400


def test_gzip_twins_remembered_by_two_pushes_at_once_are_both_kept(tmp_path):
    """A push reads the remembered twins when it starts and remembers each twin it makes;
    another push remembering its own meanwhile must not be undone by the first's write
    of what it had read (the file is read again under its lock)."""
    from builder.layer import twins
    from builder.store import Store
    store = Store(str(tmp_path / "store"))
    first_read = twins.remembered(store)                  # the first push starts: {}
    twins.remember(store, "sha256:" + "b" * 64, "sha256:" + "2" * 64, 20)   # the second's
    twins.remember(store, "sha256:" + "a" * 64, "sha256:" + "1" * 64, 10, first_read)
    assert twins.remembered(store) == {"sha256:" + "a" * 64: ["sha256:" + "1" * 64, 10],
                                       "sha256:" + "b" * 64: ["sha256:" + "2" * 64, 20]}
    assert first_read == {"sha256:" + "a" * 64: ["sha256:" + "1" * 64, 10]}
