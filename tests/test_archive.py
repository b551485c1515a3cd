"""save / load / import, checked with independent OCI tools (skopeo, umoci) as well as our own reader."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from conftest import BASE, TESTDATA

pytestmark = pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                reason="skopeo and umoci are installed by `make test`")


@pytest.fixture(scope="module")
def demo_image(base_image, store_root, tmp_path_factory):
    import builder
    ctx = tmp_path_factory.mktemp("archive") / "demo"
    shutil.copytree(TESTDATA / "demo", ctx)
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text().replace("busybox:demo", BASE))
    return builder.build(str(ctx), tags=["archive-demo:1"], root=store_root,
                         build_args={"GREETING_WORD": "saved"})


@pytest.fixture(scope="module")
def saved(demo_image, store_root, tmp_path_factory):
    from conftest import run_pybuild
    out = tmp_path_factory.mktemp("saved") / "demo.tar"
    run_pybuild("save", "archive-demo:1", "-o", out, root=store_root, check=True)
    return out


def sh(*args) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{args[0]} failed: {p.stderr}"
    return p.stdout


def test_skopeo_reads_the_store_directly(demo_image, store_root):
    info = json.loads(sh("skopeo", "inspect", f"oci:{store_root}:archive-demo:1"))
    assert info["Digest"] == demo_image.digest
    assert info["Layers"] == [l.digest for l in demo_image.layers]
    assert "GREETING=saved from pybuild" in info["Env"]


def test_saved_archive_is_both_docker_archive_and_oci_layout(saved, demo_image):
    with tarfile.open(saved) as t:
        names = set(t.getnames())
        manifest = json.load(t.extractfile("manifest.json"))
        index = json.load(t.extractfile("index.json"))
    assert {"manifest.json", "repositories", "oci-layout", "index.json"} <= names
    assert manifest == [{"Config": "blobs/sha256/" + demo_image.id[7:],
                         "RepoTags": ["archive-demo:1"],
                         "Layers": ["blobs/sha256/" + l.digest[7:] for l in demo_image.layers]}]
    assert index["manifests"][0]["digest"] == demo_image.digest
    oci = json.loads(sh("skopeo", "inspect", f"oci-archive:{saved}:archive-demo:1"))
    assert oci["Digest"] == demo_image.digest
    docker = json.loads(sh("skopeo", "inspect", "--config", f"docker-archive:{saved}"))
    assert docker["rootfs"]["diff_ids"] == demo_image.diff_ids
    assert docker["config"]["Cmd"] == ["sh", "/app/hello.sh"]


def test_umoci_unpacks_exactly_the_expected_rootfs(saved, tmp_path):
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(saved) as t:
        t.extractall(layout, filter="tar")
    sh("umoci", "unpack", "--image", f"{layout}:archive-demo:1", str(tmp_path / "bundle"))
    root = tmp_path / "bundle" / "rootfs"
    assert sorted(os.listdir(root)) == ["app", "bin", "dev", "etc", "home", "proc", "root", "sys", "tmp"]
    assert sorted(os.listdir(root / "etc")) == ["group", "hostname", "hosts", "passwd", "resolv.conf"], \
        "motd was deleted by a whiteout"
    assert sorted(os.listdir(root / "app")) == ["greeting.txt", "hello.sh"]
    assert (root / "app/greeting.txt").read_text() == "saved from pybuild\n"
    st = os.stat(root / "app/hello.sh")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1000, 1000, 0o755)
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.stat(root / "tmp").st_mode & 0o7777 == 0o1777
    assert (root / "bin/busybox").read_bytes() == open("/bin/busybox", "rb").read()


def test_skopeo_copies_the_docker_archive(saved, tmp_path):
    sh("skopeo", "copy", f"docker-archive:{saved}", f"oci:{tmp_path}/copy:x")
    index = json.loads((tmp_path / "copy/index.json").read_text())
    assert len(index["manifests"]) == 1


def test_load_round_trip_keeps_the_image_id(saved, demo_image, pybuild):
    pybuild("rmi", "archive-demo:1", check=True)
    assert pybuild("inspect", "archive-demo:1").returncode == 5
    p = pybuild("load", "-i", saved, check=True)
    assert p.stdout.decode().strip() == "Loaded image: archive-demo:1"
    data = json.loads(pybuild("inspect", "archive-demo:1", check=True).stdout)[0]
    assert data["Id"] == demo_image.id and data["Digest"] == demo_image.digest
    run = pybuild("run", "archive-demo:1", check=True)
    assert run.stdout.decode().splitlines()[0] == "saved from pybuild"


def test_load_reads_a_pipe_given_as_a_file(saved, demo_image, pybuild, tmp_path):
    """`pybuild load -i <(cmd)` (a FIFO): read once, into a spool, as standard input is."""
    fifo = tmp_path / "archive.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"cat {saved} > {fifo}"])
    try:
        p = pybuild("load", "-i", fifo)
        assert p.returncode == 0, p.stderr.decode()
        assert p.stdout.decode().strip() == "Loaded image: archive-demo:1"
    finally:
        if writer.poll() is None:
            writer.kill()           # (still waiting for a reader: the load never opened it)
        writer.wait()
    data = json.loads(pybuild("inspect", "archive-demo:1", check=True).stdout)[0]
    assert data["Id"] == demo_image.id


def test_save_writes_into_a_pipe_or_a_symlink_and_never_replaces_them(demo_image, pybuild,
                                                                      tmp_path, saved):
    """`-o >(gzip > x)` (a FIFO) and `-o /dev/stdout` (a symlink in /dev) are written as they
    are: renaming a temp file over them replaced /dev/stdout with the archive."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["sh", "-c", f"cat {fifo} > {tmp_path}/from-fifo.tar"])
    try:
        p = pybuild("save", "archive-demo:1", "-o", fifo)
        assert p.returncode == 0, p.stderr.decode()
    finally:
        if reader.poll() is None and p.returncode != 0:
            reader.kill()
        reader.wait(timeout=60)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (tmp_path / "from-fifo.tar").read_bytes() == saved.read_bytes()
    (tmp_path / "real.tar").write_bytes(b"")
    (tmp_path / "link.tar").symlink_to(tmp_path / "real.tar")
    pybuild("save", "archive-demo:1", "-o", tmp_path / "link.tar", check=True)
    assert (tmp_path / "link.tar").is_symlink()
    assert (tmp_path / "real.tar").read_bytes() == saved.read_bytes()


def _docker_only(saved, out, mutate_layer=None):
    """A plain docker-archive (no OCI files), laid out as old Docker wrote them."""
    import gzip
    with tarfile.open(saved) as src, tarfile.open(out, "w") as dst:
        manifest = json.load(src.extractfile("manifest.json"))
        entry = manifest[0]
        layers = []
        for i, path in enumerate(entry["Layers"]):
            data = src.extractfile(path).read()
            if data.startswith(b"\x1f\x8b"):      # (a layer kept as gzip)
                data = gzip.decompress(data)
            if mutate_layer is not None and i == len(entry["Layers"]) - 1:
                data = mutate_layer(data)
            name = f"layer{i}/layer.tar"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
            layers.append(name)
        config = src.extractfile(entry["Config"]).read()
        info = tarfile.TarInfo(entry["Config"][len("blobs/sha256/"):] + ".json")
        info.size = len(config)
        dst.addfile(info, io.BytesIO(config))
        new = json.dumps([{"Config": info.name, "RepoTags": ["legacy:1"], "Layers": layers}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(new)
        dst.addfile(info, io.BytesIO(new))


def test_load_legacy_docker_archive_with_plain_layers(saved, demo_image, pybuild, tmp_path):
    legacy = tmp_path / "legacy.tar"
    _docker_only(saved, legacy)
    p = pybuild("load", "-i", legacy, check=True)
    assert "Loaded image: legacy:1" in p.stdout.decode()
    data = json.loads(pybuild("inspect", "legacy:1", check=True).stdout)[0]
    assert data["Id"] == demo_image.id


def test_plain_layers_of_an_archive_are_kept_plain_as_the_store_keeps_its_own(saved, demo_image,
                                                                             tmp_path):
    """Loaded into an empty store, a docker-archive's plain layer tars stay plain tars (the
    blob is the tar, its digest the diff_id), as a build keeps its new layers: no CPU spent
    compressing what a push compresses anyway."""
    import builder
    from conftest import layer_files, run_pybuild
    legacy = tmp_path / "legacy.tar"
    _docker_only(saved, legacy)
    root = str(tmp_path / "fresh")
    run_pybuild("load", "-i", legacy, root=root, check=True)
    store = builder.Store(root)
    image = store.resolve("legacy:1")
    assert image.id == demo_image.id
    assert [(l.media_type, l.digest) for l in image.layers] == [
        ("application/vnd.oci.image.layer.v1.tar", d) for d in demo_image.diff_ids]
    assert layer_files(store, image.layers[1])["bin/busybox"].startswith(b"\x7fELF")
    assert all(store.blobs.verify(d) for d in store.blobs.list())


def test_tampered_layer_is_refused_and_the_store_stays_consistent(saved, tmp_path):
    # A fresh store: one that has the genuine layer already never reads the archive's copy.
    from builder.store import Store
    from conftest import run_pybuild
    root = str(tmp_path / "fresh")
    store = Store(root)

    def pybuild(*args):
        return run_pybuild(*args, root=root)

    def tamper(data: bytes) -> bytes:
        return data.replace(b"saved from pybuild", b"evil! from pybuild")
    bad = tmp_path / "bad.tar"
    _docker_only(saved, bad, tamper)
    layers_before = set(store.layers.list())
    p = pybuild("load", "-i", bad)
    err = p.stderr.decode()
    assert p.returncode == 6 and "does not match its diff_id" in err and "Traceback" not in err
    assert pybuild("inspect", "tampered:1").returncode == 5
    assert set(store.layers.list()) == layers_before
    assert all(store.blobs.verify(d) for d in store.blobs.list())


def test_corrupt_blob_in_oci_archive_is_refused(saved, tmp_path, demo_image):
    from conftest import run_pybuild
    bad = tmp_path / "corrupt.tar"
    data = bytearray(saved.read_bytes())
    top = demo_image.layers[-1].digest[7:].encode()
    with tarfile.open(saved) as t:
        member = t.getmember("blobs/sha256/" + top.decode())
    data[member.offset_data + 20] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = run_pybuild("load", "-i", bad, root=str(tmp_path / "fresh"))
    err = p.stderr.decode()
    assert p.returncode == 6 and "Traceback" not in err
    assert "does not match its digest" in err or "corrupt" in err, err


def test_not_an_archive(pybuild, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive at all" * 100)
    p = pybuild("load", "-i", junk)
    assert p.returncode == 6 and "not a tar archive" in p.stderr.decode()
    assert pybuild("load", "-i", tmp_path / "missing.tar").returncode == 2


def test_import_rootfs_tarball(pybuild, tmp_path, store):
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    os.symlink("busybox", rootfs / "bin/sh")
    (rootfs / "hello").write_text("imported\n")
    tarball = tmp_path / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as t:
        t.add(rootfs, arcname=".")
    p = pybuild("import", tarball, "imported:1", check=True)
    data = json.loads(pybuild("inspect", "imported:1", check=True).stdout)[0]
    assert data["Id"] == p.stdout.decode().strip() and len(data["Layers"]) == 1
    run = pybuild("run", "imported:1", "/bin/sh", "-c", "cat /hello", check=True)
    assert run.stdout == b"imported\n"
