"""Rootless builds: a user with subordinate ids builds in a user namespace of its own.

The test makes a user with a subuid/subgid range, and runs pybuild as that
user in a forked child of this process (everything it needs already
imported: the interpreter may live where the user cannot read). Files keep
their owners in the layers, and the image is the one root builds.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import pwd
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import builder

from conftest import busybox_context, layer_members

USER = "pbrootless"
RANGE = (400000, 65536)      # unless useradd gave the user one already
EPOCH = 1_600_000_000
EXTRA = ("COPY --chown=1000:1000 owned.txt /owned\n"
         "RUN id -u > /uid && rm /etc/motd && rm -rf /home && mkdir /home && touch /home/new\n")
PRELOAD = ("encodings.ascii", "encodings.utf_8", "encodings.latin_1", "encodings.idna",
           "concurrent.futures", "concurrent.futures.thread", "tempfile", "shutil", "marshal",
           "json", "tarfile", "gzip", "hashlib", "subprocess", "getpass", "queue", "uuid",
           "traceback", "base64", "pwd", "grp", "fcntl", "termios", "pty", "select", "socket",
           "ctypes", "ctypes.util", "datetime", "zstandard", "isal.igzip", "cachetools")


@pytest.fixture(scope="module")
def user():
    if shutil.which("newuidmap") is None:
        pytest.fail("newuidmap is missing: install uidmap (make test does)")
    created = subprocess.run(["id", USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
    added = []
    for path in ("/etc/subuid", "/etc/subgid"):
        text = Path(path).read_text() if os.path.exists(path) else ""
        if not any(line.startswith(USER + ":") for line in text.splitlines()):
            line = f"{USER}:{RANGE[0]}:{RANGE[1]}\n"
            with open(path, "a") as f:
                f.write(line)
            added.append((path, line))
    yield pwd.getpwnam(USER)
    for path, line in added:
        Path(path).write_text(Path(path).read_text().replace(line, ""))
    if created:
        subprocess.run(["userdel", "-r", USER], capture_output=True)


def as_user(pw, *args: str) -> tuple[int, str]:
    """`pybuild ARGS` as the user (a forked child of this process); exit code and output."""
    for m in pkgutil.walk_packages(builder.__path__, "builder."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
    for name in PRELOAD:
        importlib.import_module(name)
    from builder import cli
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = open(1, "w", closefd=False)     # not pytest's capture
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            for var in ("PYBUILD_ROOT", "PYBUILD_STORAGE_DRIVER", "XDG_DATA_HOME"):
                os.environ.pop(var, None)
            os.environ["HOME"] = pw.pw_dir
            os.chdir(pw.pw_dir)
            code = cli.main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out


def context(path: Path, owner=None) -> Path:
    ctx = busybox_context(path)
    (ctx / "owned.txt").write_text("mine\n")
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text() + EXTRA)
    if owner is not None:
        for p in [ctx, *ctx.rglob("*")]:
            os.lchown(p, owner.pw_uid, owner.pw_gid)
    return ctx


def members(store, layer) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in layer_members(store, layer)}


def test_a_user_builds_in_its_own_namespace_and_owners_are_kept(user, tmp_path):
    home = Path(user.pw_dir)
    ctx = context(home / "ctx", owner=user)
    try:
        code, out = as_user(user, "build", "-q", "--source-date-epoch", str(EPOCH), "-t",
                            "mine:1", "ctx")
        assert code == 0, out
        image_id = out.strip().splitlines()[-1]
        root = home / ".local" / "share" / "pybuild"
        assert (root / "index.json").exists(), "the store defaults to ~/.local/share/pybuild"
        store = builder.Store(str(root))
        image = store.resolve("mine:1")
        assert image.id == image_id
        rootfs = members(store, image.layers[0])
        assert (rootfs["etc/passwd"].uid, rootfs["etc/passwd"].gid) == (0, 0)
        owned = members(store, image.layers[-2])["owned"]
        assert (owned.uid, owned.gid) == (1000, 1000)
        last = members(store, image.layers[-1])
        assert {"uid", "etc/.wh.motd", "home/.wh..wh..opq", "home/new"} <= set(last)
        assert last["uid"].uid == 0
        # On disk the files belong to the user's subordinate ids; in the image, to 0 and 1000.
        from builder.rootless import subordinate_range
        first = subordinate_range("/etc/subuid", USER, user.pw_uid)[0]
        disk = [p for p in (root / "layers").glob("*/diff/owned")]
        assert disk and os.lstat(disk[0]).st_uid == first + 999

        code, out = as_user(user, "info")
        assert code == 0 and "Storage Driver: " in out and f"Pybuild Root Dir: {root}" in out

        # The same inputs built by root give the same image.
        as_root = builder.build(str(context(tmp_path / "ctx")), root=str(tmp_path / "store"),
                                source_date_epoch=EPOCH)
        assert as_root.id == image_id
    finally:
        shutil.rmtree(home / ".local", ignore_errors=True)
        shutil.rmtree(ctx, ignore_errors=True)


def test_a_user_without_subordinate_ids_is_told_how_to_get_them(user, tmp_path):
    lines = {}
    for path in ("/etc/subuid", "/etc/subgid"):
        lines[path] = Path(path).read_text()
        Path(path).write_text("".join(l for l in lines[path].splitlines(True)
                                      if not l.startswith(USER + ":")))
    try:
        code, out = as_user(user, "images")
        assert code == 2
        assert f"needs subordinate ids for {USER}" in out and "usermod --add-subuids" in out
    finally:
        for path, text in lines.items():
            Path(path).write_text(text)
