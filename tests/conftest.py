"""Shared fixtures: a store per test session, the busybox base image, and helpers to look inside images.

The tests run as root with real overlay mounts and namespaces, as CI does.
The base image is built by pybuild itself FROM scratch from Debian's static
busybox (testdata/busybox), so no test needs the network.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO / "testdata"
BUSYBOX = Path("/bin/busybox")
BASE = "busybox:test"


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        pytest.exit("pybuild's tests need root (real overlay mounts and namespaces); "
                    "run them as root, as CI does", returncode=2)
    if not BUSYBOX.exists():
        pytest.exit("/bin/busybox is missing: install busybox-static (make test does)", returncode=2)


DRIVERS = ("overlay", "fuse", "vfs")
# The foundation's build tests run on every storage driver; the rest on the default one.
EVERY_DRIVER = {"test_build", "test_reproducible", "test_drivers", "test_robustness",
                "test_named_contexts"}
# Layers that share files (and stack on one another) with the drivers that write them so.
SHARING_DRIVERS = {"test_incremental_copy"}


def pytest_generate_tests(metafunc):
    if "driver" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        drivers = DRIVERS if module in EVERY_DRIVER else \
            ("overlay", "fuse") if module in SHARING_DRIVERS else ("overlay",)
        metafunc.parametrize("driver", drivers, indirect=True, scope="session")


@pytest.fixture(scope="session")
def driver(request) -> str:
    """The storage driver of the session store (and of every store a test makes)."""
    os.environ["PYBUILD_STORAGE_DRIVER"] = request.param
    return request.param


@pytest.fixture(autouse=True)
def driver_in_environment(request):
    """Stores a test creates, and pybuild commands it runs, use the test's driver."""
    name = request.getfixturevalue("driver") if "driver" in request.fixturenames else "overlay"
    os.environ["PYBUILD_STORAGE_DRIVER"] = name
    yield


@pytest.fixture(scope="session")
def store_root(driver, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp(f"store-{driver}"))
    os.environ["PYBUILD_ROOT"] = root
    from builder.store import Store
    assert Store(root, driver=driver).driver == driver
    return root


@pytest.fixture(scope="session")
def store(store_root):
    from builder.store import Store
    return Store(store_root)


def busybox_context(dest: Path) -> Path:
    """testdata/busybox plus what git cannot hold: the busybox binary and empty mount-point dirs."""
    shutil.copytree(TESTDATA / "busybox", dest)
    shutil.copy2(BUSYBOX, dest / "busybox")
    for d in ("proc", "dev", "sys"):
        (dest / "rootfs" / d).mkdir(mode=0o755, exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def base_image(store_root, tmp_path_factory):
    """`busybox:test`: the base image most tests build on. Its layers are gzip, as those of
    a base pulled from a registry are; the layers built on it are plain tars (the default)."""
    import builder
    ctx = busybox_context(tmp_path_factory.mktemp("busybox") / "ctx")
    return builder.build(str(ctx), tags=[BASE], root=store_root, compression="gzip")


def run_pybuild(*args, root: str | None = None, input: bytes | None = None, check: bool = False,
                timeout: float = 120, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run the pybuild command as a user would (a subprocess, no terminal)."""
    full_env = dict(os.environ)
    if root:
        full_env["PYBUILD_ROOT"] = root
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "builder", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=full_env, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"pybuild {' '.join(map(str, args))} failed with {proc.returncode}:\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


@pytest.fixture
def demo_ctx(tmp_path, base_image) -> Path:
    """testdata/demo, built on the test base image."""
    ctx = tmp_path / "demo"
    shutil.copytree(TESTDATA / "demo", ctx)
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text().replace("busybox:demo", BASE))
    return ctx


@pytest.fixture
def pybuild(store_root):
    def call(*args, **kw):
        return run_pybuild(*args, root=store_root, **kw)
    return call


def write_context(path: Path, files: dict[str, str | bytes]) -> Path:
    """A build context from a {relative path: content} map (Dockerfile included)."""
    path.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def nested_dirs(root, names) -> int:
    """Make root/names[0]/names[1]/..., one directory at a time through its parent's
    descriptor (the whole path may pass PATH_MAX, and pathlib's mkdir(parents=True)
    recurses); the deepest one's open descriptor, for the caller to fill and close."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    return fd


def layer_tar(store, layer) -> bytes:
    """The uncompressed tar of a layer blob (gzip, zstd or none), decompressed by the reference
    libraries."""
    with store.blobs.open(layer.digest) as f:
        data = f.read()
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if layer.media_type == "application/vnd.oci.image.layer.v1.tar":
        return data
    return gzip.decompress(data)


def layer_members(store, layer) -> list[tarfile.TarInfo]:
    """The tar entries of one layer blob, read back with Python's tarfile (an independent reader)."""
    with tarfile.open(fileobj=io.BytesIO(layer_tar(store, layer))) as t:
        return t.getmembers()


def layer_files(store, layer) -> dict[str, bytes]:
    data = layer_tar(store, layer)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            if m.isfile():
                out[m.name] = t.extractfile(m).read()
    return out


def our_mounts() -> list[str]:
    """Overlay mounts and mounts under a pybuild path in this (the host's) mount namespace."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, mountpoint = fields[sep + 1], fields[4]
            if fstype.startswith(("overlay", "fuse")) or "pybuild" in mountpoint or "/store" in mountpoint:
                out.append(f"{mountpoint} ({fstype})")
    return out


@pytest.fixture(autouse=True)
def no_leaked_mounts():
    before = set(our_mounts())
    yield
    leaked = set(our_mounts()) - before
    assert not leaked, f"mounts leaked into the host's mount table: {sorted(leaked)}"


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (to prove a process is gone)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().replace(b"\0", b" "):
                    out.append(int(pid))
        except OSError:
            continue
    return out


def forked_by_fork_server(pid: int) -> bool:
    """Is a fork server (forkserver.py) among the ancestors of `pid`?"""
    for _ in range(5):
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"builder.forkserver" in f.read():
                return True
    return False


def fork_servers_of(pybuild_pid: int) -> list[int]:
    """The fork servers that pybuild process `pybuild_pid` started and that still run (their
    command line ends `serve(<fd>, <pybuild's pid>)`)."""
    return [p for p in processes_with(f", {pybuild_pid})")
            if p in processes_with("from builder.forkserver import serve")]
