"""A base layer's pack of tar entries (builder/layer/tarpack.py) and the walk that reads it.

The pack only saves the walk from opening the base's files: the tar a walk
writes with it must be the one it writes without it, byte for byte, and a
pack that does not fit (another clamp, another row, a missing entry, a
damaged file) must fall back to the files, never give other bytes.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from builder.layer import diff, tarformat, tarpack

MTIME = 1_700_000_000_000_000_000


class View:
    """What write_tar's `stacked_on` asks of a stacked layer's table (donor.TableView)."""

    def __init__(self, base: str, files: list[str]):
        self.rows = {}
        for path in files:
            st = os.stat(base + path)
            self.rows[path] = (st.st_size, st.st_mtime_ns, st.st_mode & 0o7777, st.st_uid,
                               st.st_gid)

    def base_files(self):
        return list(self.rows)

    def base_dirs(self):
        return []

    def attributes(self, path):
        return self.rows[path]


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


@pytest.fixture
def stacked(tmp_path):
    """(upper dir, base diff dir, view): the upper holds /app/d/new.txt, the base the rest."""
    base, upper = tmp_path / "base", tmp_path / "upper"
    files = {"/app/d/a.txt": b"a" * 700, "/app/d/b.txt": b"", "/app/d/c.txt": b"c" * 512,
             "/app/e/" + "long-name-" * 12 + ".txt": b"long\n", "/app/f.txt": b"f\n"}
    for path, data in files.items():
        os.makedirs(os.path.dirname(f"{base}{path}"), exist_ok=True)
        with open(f"{base}{path}", "wb") as f:
            f.write(data)
        os.utime(f"{base}{path}", ns=(0, MTIME))
    for d in ("app", "app/d", "app/e"):
        os.makedirs(upper / d, exist_ok=True)
        os.utime(upper / d, ns=(0, MTIME))
    (upper / "app/d/new.txt").write_bytes(b"new\n")
    return str(upper), str(base), View(str(base), sorted(files))


def walk(stacked, pack=None, clamp=None) -> bytes:
    upper, base, view = stacked
    sink = Sink()
    diff.write_tar(upper, sink, strip_overlay_xattrs=False, stacked_on=(base, view),
                   base_pack=pack, clamp_mtime=clamp)
    return bytes(sink.data)


def written_pack(tmp_path, stacked, clamp=None) -> str:
    """A layer dir whose pack a walk with a PackWriter installed."""
    layer = tmp_path / "layer"
    layer.mkdir(exist_ok=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    writer = tarpack.PackWriter(str(tmp), clamp)
    walk(stacked, writer, clamp)
    assert writer.install(str(layer))
    assert os.listdir(tmp) == []
    return str(layer)


def test_a_walk_that_writes_the_pack_and_one_that_reads_it_give_the_plain_walks_tar(
        tmp_path, stacked, monkeypatch):
    plain = walk(stacked)
    layer = tmp_path / "layer"
    layer.mkdir()
    writer = tarpack.PackWriter(str(tmp_path), None)
    assert walk(stacked, writer) == plain
    assert writer.install(str(layer))
    reader = tarpack.PackReader.open(str(layer), None)
    assert sorted(reader.index) == sorted(p[1:] for p in stacked[2].base_files())

    # With the pack, the base's files are not opened at all.
    opened = []
    real_open = os.open
    monkeypatch.setattr(diff.os, "open", lambda path, *a, **k: (
        opened.append(path), real_open(path, *a, **k))[1])
    assert walk(stacked, reader) == plain
    reader.close()
    assert not [p for p in opened if str(p).endswith(".txt") and "new" not in str(p)]


def test_an_entry_is_the_files_header_blocks_content_and_padding(tmp_path, stacked):
    reader = tarpack.PackReader.open(written_pack(tmp_path, stacked), None)
    name = "app/d/a.txt"
    header, entry = reader.entry(name, stacked[2].attributes("/" + name))
    assert bytes(header) == tarformat.header(name, typeflag=tarformat.REGULAR, mode=0o644,
                                             size=700, mtime=MTIME // 10**9)
    assert bytes(entry) == bytes(header) + b"a" * 700 + b"\0" * (1024 - 700)
    long = "app/e/" + "long-name-" * 12 + ".txt"          # a PAX header: more than one block
    header, entry = reader.entry(long, stacked[2].attributes("/" + long))
    assert len(header) > tarformat.BLOCK and bytes(entry)[len(header):] == \
        b"long\n" + b"\0" * 507
    reader.close()


def test_a_pack_of_another_clamp_or_row_is_not_used(tmp_path, stacked):
    layer = written_pack(tmp_path, stacked)
    assert tarpack.PackReader.open(layer, 1_600_000_000) is None
    reader = tarpack.PackReader.open(layer, None)
    size, mtime, perm, uid, gid = stacked[2].attributes("/app/f.txt")
    assert reader.entry("app/f.txt", (size, mtime, 0o600, uid, gid)) is None
    assert reader.entry("app/f.txt", (size, mtime + 1, perm, uid, gid)) is None
    assert reader.entry("app/nothing.txt", (size, mtime, perm, uid, gid)) is None
    reader.close()
    # A walk with a clamp makes its own pack, and its tar has the clamped times.
    clamped = written_pack(tmp_path, stacked, clamp=1_600_000_000)
    reader = tarpack.PackReader.open(clamped, 1_600_000_000)
    assert walk(stacked, reader, clamp=1_600_000_000) == walk(stacked, clamp=1_600_000_000) \
        != walk(stacked)
    reader.close()


def test_files_the_pack_lacks_are_read_from_the_base(tmp_path, stacked):
    plain = walk(stacked)
    upper, base, view = stacked
    fewer = View(base, ["/app/d/a.txt", "/app/f.txt"])
    layer = tmp_path / "layer"
    layer.mkdir()
    writer = tarpack.PackWriter(str(tmp_path), None)
    diff.write_tar(upper, Sink(), strip_overlay_xattrs=False, stacked_on=(base, fewer),
                   base_pack=writer)
    assert writer.install(str(layer))
    reader = tarpack.PackReader.open(str(layer), None)
    assert sorted(reader.index) == ["app/d/a.txt", "app/f.txt"]
    assert walk(stacked, reader) == plain
    reader.close()


@pytest.mark.parametrize("damage", ["truncated", "trailer", "index", "empty"])
def test_a_damaged_pack_is_not_opened(tmp_path, stacked, damage):
    layer = written_pack(tmp_path, stacked)
    path = os.path.join(layer, tarpack.PACK)
    data = open(path, "rb").read()
    if damage == "truncated":
        data = data[:200] + data[-200:]          # the index says more than the file holds
    elif damage == "trailer":
        data = data[:-8] + (len(data) + 5).to_bytes(8, "little")
    elif damage == "index":
        data = data[:-40] + b"\xff" * 32 + data[-8:]
    else:
        data = b""
    with open(path, "wb") as f:
        f.write(data)
    assert tarpack.PackReader.open(layer, None) is None


def test_a_pack_that_cannot_be_installed_leaves_nothing_behind(tmp_path, stacked):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    writer = tarpack.PackWriter(str(tmp), None)
    walk(stacked, writer)
    assert not writer.install(str(tmp_path / "no-such-layer"))
    assert os.listdir(tmp) == []
    writer = tarpack.PackWriter(str(tmp), None)
    walk(stacked, writer)
    writer.abort()
    assert os.listdir(tmp) == []


def test_a_full_disk_drops_the_pack_and_not_the_walk(tmp_path, stacked, monkeypatch):
    """Writing the pack fails (ENOSPC, in its writing thread): the walk's tar is unchanged,
    nothing is installed and the temp file is gone."""
    import errno
    monkeypatch.setattr(tarpack, "_CHUNK", 100)            # a write per entry or so
    plain = walk(stacked)
    tmp, layer = tmp_path / "tmp", tmp_path / "layer"
    tmp.mkdir()
    layer.mkdir()

    class Full:
        def __init__(self, path, mode, buffering):
            self.real = open(path, mode, buffering=buffering)

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.real.close()
    monkeypatch.setattr(tarpack, "open", Full, raising=False)
    writer = tarpack.PackWriter(str(tmp), None)
    assert isinstance(writer._file, Full)
    assert walk(stacked, writer) == plain
    assert not writer.install(str(layer))
    assert os.listdir(tmp) == [] and os.listdir(layer) == []


def test_the_pack_is_read_in_windows_even_for_an_entry_bigger_than_one(tmp_path, stacked,
                                                                     monkeypatch):
    monkeypatch.setattr(tarpack, "_WINDOW", 600)
    plain = walk(stacked)
    reader = tarpack.PackReader.open(written_pack(tmp_path, stacked), None)
    assert hashlib.sha256(walk(stacked, reader)).digest() == hashlib.sha256(plain).digest()
    reader.close()
