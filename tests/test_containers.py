"""Containers and sizes, as Docker's storage documentation explains them (../shared/reference).

The documentation's walk-through runs as written with `pybuild` for `docker`:
two images that share layers, five containers from one of them, a file
written in three, and `ps --size` showing SIZE and virtual size. The base
image is busybox rather than alpine (the tests have no network), with a
`bash` that is busybox's sh.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import busybox_context, our_mounts, processes_with, run_pybuild, write_context

DOCKERFILE_BASE = ('FROM busybox:demo\n'
                   'RUN printf "#!/bin/sh\\nexec sh \\"\\$@\\"\\n" > /bin/bash && chmod +x /bin/bash\n')
DOCKERFILE = ("FROM acme/my-base-image:1.0\nCOPY . /app\nRUN chmod +x /app/hello.sh\n"
              "CMD /app/hello.sh\n")
PS_FORMAT = "table {{.ID}}\t{{.Image}}\t{{.Names}}\t{{.Size}}"


def store_bytes(root: Path) -> int:
    """Disk blocks the store uses (what `du` says), in bytes."""
    out = subprocess.run(["du", "-s", "-B1", str(root)], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[0])


@pytest.fixture(params=["overlay", "fuse"])
def walk(request, tmp_path):
    """A store with busybox:demo, the cow-test directory, and a `pybuild` in it."""
    root = tmp_path / "store"
    env = {"PYBUILD_STORAGE_DRIVER": request.param}
    run_pybuild("build", "-q", "-t", "busybox:demo", busybox_context(tmp_path / "busybox"),
                root=root, env=env, check=True)
    cow = write_context(tmp_path / "cow-test", {
        "hello.sh": '#!/usr/bin/env bash\necho "Hello world"\n',
        "Dockerfile.base": DOCKERFILE_BASE, "Dockerfile": DOCKERFILE})

    def pybuild(*args, check=True):
        p = run_pybuild(*args, root=root, env=env, cwd=cow, check=check)
        return p.stdout.decode() if check else p
    pybuild.env = env
    yield pybuild, root
    ids = pybuild("ps", "-aq").split()
    if ids:
        pybuild("rm", "-f", *ids)


def test_the_storage_documentation_walk_through(walk):
    pybuild, root = walk
    pybuild("build", "-t", "acme/my-base-image:1.0", "-f", "Dockerfile.base", ".")
    pybuild("build", "-t", "acme/my-final-image:1.0", "-f", "Dockerfile", ".")

    listing = pybuild("image", "ls")
    assert re.search(r"acme/my-final-image\s+1\.0\s+[0-9a-f]{12}\s+.+\s+(\S+B)$", listing, re.M)
    final_size = re.search(r"acme/my-final-image\s+1\.0\s+\S+\s+.+?\s+(\S+B)$", listing,
                           re.M).group(1)

    base_history = pybuild("image", "history", "acme/my-base-image:1.0").splitlines()[1:]
    final_history = pybuild("image", "history", "acme/my-final-image:1.0").splitlines()[1:]
    assert 'CMD ["/bin/sh" "-c" "/app/hello.sh"]' in final_history[0]
    assert "RUN /bin/sh -c chmod +x /app/hello.sh" in final_history[1]
    assert "COPY . /app" in final_history[2]
    # Every step of the base image is also a step of the final one.
    assert [l.split(None, 1)[1][-60:] for l in base_history[1:]] == \
        [l.split(None, 1)[1][-60:] for l in final_history[4:]]

    base_layers = json.loads(pybuild("image", "inspect", "--format", "{{json .RootFS.Layers}}",
                                     "acme/my-base-image:1.0"))
    final_layers = json.loads(pybuild("image", "inspect", "--format", "{{json .RootFS.Layers}}",
                                      "acme/my-final-image:1.0"))
    assert final_layers[:len(base_layers)] == base_layers and len(final_layers) == len(base_layers) + 2

    before = store_bytes(root)
    ids = [pybuild("run", "-dit", "--name", f"my_container_{i}", "acme/my-final-image:1.0",
                   "bash").strip() for i in range(1, 6)]
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids)
    table = pybuild("ps", "--size", "--format", PS_FORMAT).splitlines()
    assert table[0].split() == ["CONTAINER", "ID", "IMAGE", "NAMES", "SIZE"]
    rows = {line.split()[2]: line for line in table[1:]}
    assert sorted(rows) == [f"my_container_{i}" for i in range(1, 6)]
    for line in rows.values():
        assert line.endswith(f"0B (virtual {final_size})"), line

    for i in range(1, 4):
        pybuild("exec", f"my_container_{i}", "sh", "-c", "printf hello > /out.txt")
    rows = {line.split()[2]: line for line in
            pybuild("ps", "--size", "--format", PS_FORMAT).splitlines()[1:]}
    for i in range(1, 6):
        size = "5B" if i <= 3 else "0B"
        assert rows[f"my_container_{i}"].endswith(f"{size} (virtual {final_size})")
    # The five containers share the image's layers: the store grew by their records and writes,
    # not by five copies of a 2 MB image.
    grown = store_bytes(root) - before
    assert grown < 5 * 150_000, grown
    assert pybuild("diff", "my_container_1").splitlines() == ["A /out.txt"]
    assert pybuild("exec", "my_container_2", "cat", "/out.txt") == "hello"


def test_stop_rm_commit_logs_and_statuses(walk):
    pybuild, root = walk
    pybuild("build", "-t", "acme/my-base-image:1.0", "-f", "Dockerfile.base", ".")
    pybuild("run", "-d", "--name", "quick", "acme/my-base-image:1.0", "sh", "-c",
            "echo to the log; rm /etc/motd; mkdir /made; echo x > /made/f")
    deadline = time.time() + 10
    while "Exited (0)" not in pybuild("ps", "-a") and time.time() < deadline:
        time.sleep(0.05)
    assert re.search(r"Exited \(0\) .* ago\s+quick", pybuild("ps", "-a"))
    assert "quick" not in pybuild("ps")                     # not running
    assert pybuild("logs", "quick") == "to the log\n"
    assert pybuild("diff", "quick").splitlines() == ["C /etc", "D /etc/motd", "A /made",
                                                    "A /made/f"]
    image_id = pybuild("commit", "-m", "made by quick", "quick", "committed:1").strip()
    assert pybuild("run", "--rm", "committed:1", "sh", "-c",
                   "cat /made/f; test ! -e /etc/motd && echo gone") == "x\ngone\n"
    history = pybuild("history", "committed:1").splitlines()
    assert history[1].startswith(image_id[7:19]) and "made by quick" in history[1]

    pybuild("run", "-dit", "--name", "long", "acme/my-base-image:1.0", "sh")
    assert re.search(r"Up .*\s+long$", pybuild("ps"), re.M)
    refused = pybuild("rm", "long", check=False)
    assert refused.returncode == 2 and b"is running" in refused.stderr
    in_use = pybuild("rmi", "acme/my-base-image:1.0", check=False)
    assert in_use.returncode == 2 and b"used by container" in in_use.stderr
    started = time.time()
    pybuild("stop", "-t", "1", "long")           # an interactive sh ignores SIGTERM: SIGKILL
    assert time.time() - started < 8
    assert re.search(r"Exited \(137\) .*\s+long$", pybuild("ps", "-a"), re.M)
    pybuild("rm", "long", "quick")
    assert "long" not in pybuild("ps", "-a")
    assert pybuild("run", "--rm", "acme/my-base-image:1.0", "true") == ""
    assert pybuild("ps", "-aq") == ""                # --rm left nothing
    missing = pybuild("rm", "nobody", check=False)
    assert missing.returncode == 5 and b"no such container: nobody" in missing.stderr


def test_create_and_cp_take_files_out_as_docker_cp_does(walk, tmp_path):
    """The CI way to take artifacts out of an image: create, cp, rm. Docker's rules for where
    things go; modes, times, links kept, owners the caller's unless -a; paths resolved in
    the container's root, and nothing written through a symlink of the destination."""
    pybuild, root = walk
    host_secret = tmp_path / "host-secret"
    host_secret.write_text("the host's\n")
    (tmp_path / "cow-test" / "Dockerfile.out").write_text(
        "FROM busybox:demo\n"
        "RUN mkdir -p /out/etc /out/sub && echo one > /out/f1 && echo two > /out/sub/f2 && "
        "chmod 0750 /out/sub && chmod 0604 /out/f1 && touch -d '2001-02-03 04:05:06' /out/f1 && "
        "ln /out/f1 /out/hard && ln -s f1 /out/rel && ln -s /out/sub /out/abs && "
        "echo conf > /out/etc/conf && chown -R 1000:1000 /out/sub && mknod -m 666 /out/mem c 1 1 && "
        "cp /bin/busybox /out/sub/suid && chmod 4755 /out/sub/suid && "
        f"ln -s /out /link && ln -s {host_secret} /esc\n"
        "CMD [\"true\"]\n")
    pybuild("build", "-q", "-t", "artifacts", "-f", "Dockerfile.out", ".")
    cid = pybuild("create", "--name", "ex", "artifacts").strip()
    assert len(cid) == 64 and re.search(r"Created\s+ex$", pybuild("ps", "-a"), re.M)

    dist = tmp_path / "dist"                     # a directory to a new name: its contents
    p = pybuild("cp", "ex:/out", str(dist), check=False)
    assert p.returncode == 0 and b"1 device file(s) not copied" in p.stderr
    assert sorted(os.listdir(dist)) == ["abs", "etc", "f1", "hard", "rel", "sub"]
    f1 = (dist / "f1").stat()
    assert (dist / "f1").read_text() == "one\n" and oct(f1.st_mode & 0o7777) == "0o604"
    assert time.gmtime(f1.st_mtime)[:6] == (2001, 2, 3, 4, 5, 6)
    assert (dist / "hard").stat().st_ino == f1.st_ino, "a hard link stays one"
    assert os.readlink(dist / "rel") == "f1" and os.readlink(dist / "abs") == "/out/sub"
    sub = (dist / "sub").stat()
    assert oct(sub.st_mode & 0o7777) == "0o750" and (sub.st_uid, sub.st_gid) == (0, 0)
    kept = tmp_path / "kept"
    pybuild("cp", "-a", "ex:/out/sub", str(kept))
    assert (kept / "f2").stat().st_uid == 1000 and kept.stat().st_gid == 1000
    pybuild("cp", "-a", "ex:/out/mem", str(kept))       # a device file only with -a
    assert stat.S_ISCHR((kept / "mem").lstat().st_mode)
    # A setuid program keeps the bit only with -a (and its owner): else it would be root's.
    assert oct((kept / "suid").stat().st_mode & 0o7777) == "0o4755"
    assert oct((dist / "sub/suid").stat().st_mode & 0o7777) == "0o755"

    into = tmp_path / "into"                     # into an existing dir; a file by its name
    into.mkdir()
    pybuild("cp", "ex:/out/sub", str(into))
    pybuild("cp", "ex:/link/f1", str(into) + "/")
    assert sorted(os.listdir(into)) == ["f1", "sub"] and (into / "sub/f2").read_text() == "two\n"
    pybuild("cp", "-L", "ex:/link", str(into))   # what /link points to, under its name
    assert sorted(os.listdir(into / "link")) == sorted(os.listdir(dist))
    victim = tmp_path / "victim"
    victim.mkdir()
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "etc").symlink_to(victim)
    pybuild("cp", "ex:/out/.", str(merged))      # /. : the contents; etc replaces the symlink
    assert (merged / "etc").is_dir() and not (merged / "etc").is_symlink()
    assert os.listdir(victim) == [] and (merged / "etc/conf").read_text() == "conf\n"

    pybuild("cp", "ex:/esc", str(tmp_path / "esc"))     # a symlink is copied as one
    assert os.readlink(tmp_path / "esc") == str(host_secret)
    followed = pybuild("cp", "-L", "ex:/esc", str(tmp_path / "esc2"), check=False)
    assert followed.returncode == 1 and b"could not find the file /esc" in followed.stderr
    assert not (tmp_path / "esc2").exists(), "-L follows it inside the container, not here"

    listing = subprocess.run(["tar", "-tv"], input=run_pybuild(
        "cp", "ex:/out/sub", "-", root=root, env=pybuild.env, check=True).stdout,
        capture_output=True, check=True).stdout.decode()
    assert re.search(r"^-rw.* 1000/1000 .* sub/f2$", listing, re.M), listing   # (its owner)

    pybuild("run", "--name", "ran", "artifacts", "sh", "-c", "echo new > /out/new; rm /out/f1")
    ran = tmp_path / "ran"
    pybuild("cp", "ran:/out", str(ran))          # the container's writable layer on top
    assert (ran / "new").read_text() == "new\n" and not (ran / "f1").exists()

    device = pybuild("cp", "ex:/out/f1", "/dev/null", check=False)   # never replaced
    assert device.returncode == 2 and stat.S_ISCHR(os.lstat("/dev/null").st_mode)
    missing = pybuild("cp", "ex:/nothere", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1 and b"could not find the file /nothere" in missing.stderr
    no_dir = pybuild("cp", "ex:/out/f1", str(tmp_path / "absent") + "/", check=False)
    assert no_dir.returncode == 2 and b"must exist" in no_dir.stderr
    pybuild("cp", str(host_secret), "ex:/x")                 # and back in (ex never ran)
    pybuild("cp", "ex:/x", str(tmp_path / "back"))
    assert (tmp_path / "back").read_text() == "the host's\n"
    assert not list((root / "tmp").iterdir())
    pybuild("rm", "ex", "ran")


def test_cp_into_a_stopped_container_writes_its_writable_layer_and_nothing_here(walk, tmp_path):
    """`create; cp SRC C:DEST; start -a`, as CI jobs give a container its config: Docker's
    rules for DEST, resolved inside the container (its symlinks never lead to this machine's
    files, and an entry replaces a symlink rather than write through it); owners root, or
    the files' own with -a; refused for a running container."""
    pybuild, root = walk
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "cow-test" / "Dockerfile.in").write_text(
        "FROM busybox:demo\n"
        f"RUN mkdir /app && ln -s /etc /evil && ln -s {victim}/f /app/f && "
        f"ln -s ../../../../../../..{victim} /app/up\n"
        "CMD [\"true\"]\n")
    pybuild("build", "-q", "-t", "cp-in", "-f", "Dockerfile.in", ".")
    conf = tmp_path / "conf"
    (conf / "sub").mkdir(parents=True)
    (conf / "f").write_text("config\n")
    (conf / "sub" / "g").write_text("deeper\n")
    os.chmod(conf / "f", 0o640)
    os.chown(conf / "sub" / "g", 1234, 1234)
    pybuild("create", "--name", "cin", "cp-in", "sh", "-c",
            "cat /app/f /conf/sub/g /etc/f; ls -ln /conf/sub /app/f; stat -c %a /app/f")
    pybuild("cp", str(conf), "cin:/conf")                  # a new name: the contents
    pybuild("cp", str(conf) + "/.", "cin:/app")            # /. : into /app; f replaces a link
    pybuild("cp", str(conf / "f"), "cin:/evil/")           # through /evil -> /etc, inside
    up = pybuild("cp", str(conf / "f"), "cin:/app/up/x", check=False)   # climbs out: stays
    assert up.returncode == 1 and b"is not in the container" in up.stderr   # in (not there)
    assert os.listdir(victim) == [], "nothing written here through the container's links"
    out = pybuild("start", "-a", "cin", check=False)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert text.startswith("config\ndeeper\nconfig\n"), text
    assert re.search(r"^-rw-r--r-- .* 0 +0 .* g$", text, re.M), "root owns what is copied in"
    assert text.rstrip().endswith("640") and "->" not in text
    pybuild("cp", "-a", str(conf / "sub"), "cin:/kept")      # -a: the files' own owners
    listing = subprocess.run(["tar", "-tv"], input=run_pybuild(
        "cp", "cin:/kept", "-", root=root, env=pybuild.env, check=True).stdout,
        capture_output=True, check=True).stdout.decode()
    assert re.search(r"^-rw.* 1234/1234 .* kept/g$", listing, re.M), listing
    refused = pybuild("cp", str(conf / "f"), "cin:/nowhere/f", check=False)
    assert refused.returncode == 1 and b"/nowhere is not in the container" in refused.stderr

    # - : a tar (here gzip) on standard input, extracted into a directory of the container.
    tar = subprocess.run(["tar", "-cz", "-C", str(conf), "."], capture_output=True,
                         check=True).stdout
    run_pybuild("cp", "-", "cin:/conf/sub", input=tar, root=root, env=pybuild.env, check=True)
    back = tmp_path / "back"
    pybuild("cp", "cin:/conf/sub", str(back))
    assert (back / "f").read_text() == "config\n" and (back / "sub" / "g").exists()
    not_dir = run_pybuild("cp", "-", "cin:/conf/f", input=tar, root=root, env=pybuild.env)
    assert not_dir.returncode == 1 and b"is not a directory in the container" in not_dir.stderr

    pybuild("run", "-d", "--name", "busy", "busybox:demo", "sleep", "30")
    running = pybuild("cp", str(conf / "f"), "busy:/f", check=False)
    assert running.returncode == 2 and b"is running" in running.stderr
    # The container's lock: a start or a cp into it holds it while it mounts its writable
    # layer (two overlays over one upper dir corrupt it). Held here, cp is refused and a
    # start waits for it.
    import fcntl
    pybuild("create", "--name", "slow", "busybox:demo", "sh", "-c", "echo ran")
    cid = pybuild("ps", "-aq", "--no-trunc").split()[0]
    lock = os.open(root / "containers" / cid / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    starting = subprocess.Popen([sys.executable, "-m", "builder", "start", "-a", "slow"],
                                env=dict(os.environ, PYBUILD_ROOT=str(root), **pybuild.env),
                                stdout=subprocess.PIPE)
    try:
        during = pybuild("cp", str(conf / "f"), "slow:/f", check=False)
        assert during.returncode == 2 and b"being started, or copied into" in during.stderr
        time.sleep(0.5)
        assert starting.poll() is None and re.search(r"Created\s+slow$", pybuild("ps", "-a"),
                                                      re.M), "the start waits for the lock"
    finally:
        os.close(lock)
        out, _ = starting.communicate(timeout=30)
    assert starting.returncode == 0 and out == b"ran\n"
    pybuild("cp", str(conf / "f"), "slow:/f")              # stopped again: taken
    pybuild("rm", "slow")
    both = pybuild("cp", "cin:/conf", "busy:/conf", check=False)
    assert both.returncode == 2 and b"between containers" in both.stderr
    pybuild("rm", "-f", "busy", "cin")


def test_export_writes_the_containers_whole_filesystem(walk, tmp_path):
    pybuild, root = walk
    pybuild("run", "--name", "exp", "busybox:demo", "sh", "-c",
            "echo made > /made && rm /etc/motd")
    pybuild("export", "-o", str(tmp_path / "root.tar"), "exp")
    import tarfile
    with tarfile.open(tmp_path / "root.tar") as t:
        names = t.getnames()
        assert t.extractfile("made").read() == b"made\n"
    assert "bin/busybox" in names and "etc/motd" not in names
    assert not any(n.startswith(("./", "/")) for n in names), "named from the root, as Docker"
    piped = run_pybuild("export", "exp", root=root, env=pybuild.env, check=True).stdout
    assert piped == (tmp_path / "root.tar").read_bytes()
    missing = pybuild("export", "-o", str(tmp_path / "none.tar"), "nobody", check=False)
    assert missing.returncode == 5 and not (tmp_path / "none.tar").exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    pybuild("rm", "exp")


def test_logs_follow_until_the_container_stops_and_tail(walk):
    pybuild, root = walk
    pybuild("run", "-d", "--name", "talks", "busybox:demo", "sh", "-c",
            "for i in 1 2 3; do echo line $i; sleep 0.3; done")
    started = time.time()
    assert pybuild("logs", "-f", "talks") == "line 1\nline 2\nline 3\n"
    assert time.time() - started >= 0.5, "it waited for the lines printed later"
    assert pybuild("logs", "--tail", "2", "talks") == "line 2\nline 3\n"
    assert pybuild("logs", "-n", "0", "talks") == ""
    assert pybuild("logs", "--tail", "x", "talks", check=False).returncode == 2
    pybuild("run", "-d", "--name", "exits", "busybox:demo", "sh", "-c", "sleep 0.5; exit 7")
    assert pybuild("wait", "exits", "talks") == "7\n0\n"     # (docker wait)
    pybuild("run", "-d", "--name", "trapped", "busybox:demo", "sh", "-c",
            'trap "exit 5" USR1; while true; do sleep 0.1; done')
    time.sleep(0.3)
    assert pybuild("kill", "-s", "USR1", "trapped") == "trapped\n"
    assert pybuild("wait", "trapped") == "5\n"
    pybuild("run", "-d", "--name", "killed", "busybox:demo", "sleep", "30")
    pybuild("kill", "killed")                                  # SIGKILL by default
    assert pybuild("wait", "killed") == "137\n"
    again = pybuild("kill", "killed", check=False)
    assert again.returncode == 2 and b"is not running" in again.stderr
    pybuild("rm", "talks", "exits", "trapped", "killed")


def test_run_v_mounts_a_directory_of_this_machine(walk, tmp_path):
    """`docker run --rm -v "$PWD":/src -w /src IMAGE make test`, the way CI jobs run a build's
    tests on their workspace: bind mounts, read-only with :ro, made if missing, kept by
    start, and no mount point left in the container's writable layer."""
    pybuild, root = walk
    work = tmp_path / "workspace"
    work.mkdir()
    (work / "in.txt").write_text("input\n")
    conf = tmp_path / "app.conf"
    conf.write_text("conf\n")
    out = pybuild("run", "--name", "ci", "-v", f"{work}:/src", "-v", f"{conf}:/etc/app.conf:ro",
                  "-v", f"{tmp_path}/made:/made", "-w", "/src", "busybox:demo", "sh", "-c",
                  "cat in.txt /etc/app.conf; echo output >> out.txt; "
                  "echo no > /etc/app.conf 2>/dev/null || echo read-only; touch /made/x")
    assert out == "input\nconf\nread-only\n"
    assert (work / "out.txt").read_text() == "output\n" and conf.read_text() == "conf\n"
    assert (tmp_path / "made" / "x").exists(), "a missing host dir is made, as Docker does"
    assert pybuild("diff", "ci") == "", "mount points are not the container's changes"
    pybuild("start", "-a", "ci")                         # the same mounts again
    assert (work / "out.txt").read_text() == "output\noutput\n"
    for bad, message in (("rel:/src", b"not an absolute path"), ("/x", b"HOST:CONTAINER"),
                         (f"{work}:src", b"must be absolute"), (f"{work}:/s:bogus", b"unknown option")):
        p = pybuild("run", "--rm", "-v", bad, "busybox:demo", "true", check=False)
        assert p.returncode == 2 and message in p.stderr, (bad, p.stderr)
    pybuild("rm", "ci")


def test_ps_filters_and_container_and_image_prune_as_cleanup_scripts_use_them(walk):
    """`docker ps -aq -f status=exited | xargs docker rm`, `docker container prune -f`,
    `docker image prune [-a] -f`, `docker images -aq`."""
    pybuild, root = walk
    pybuild("build", "-q", "-t", "acme/my-base-image:1.0", "-f", "Dockerfile.base", ".")
    pybuild("create", "--name", "made", "busybox:demo")
    pybuild("run", "--name", "failed", "busybox:demo", "sh", "-c", "exit 3", check=False)
    pybuild("run", "--name", "fine", "acme/my-base-image:1.0", "true")
    pybuild("run", "-d", "--name", "up", "busybox:demo", "sleep", "30")

    def names(*filters):
        return sorted(pybuild("ps", "-a", *filters, "--format", "{{.Names}}").split())
    assert names("-f", "status=exited") == ["failed", "fine"]
    assert names("-f", "status=created", "-f", "status=running") == ["made", "up"]
    assert names("-f", "exited=3") == ["failed"]
    assert names("-f", "ancestor=acme/my-base-image:1.0") == ["fine"]
    assert names("-f", "name=f", "-f", "status=exited") == ["failed", "fine"]
    assert len(pybuild("ps", "-aq", "-f", "status=exited").split()) == 2
    bad = pybuild("ps", "-f", "label=x", check=False)
    assert bad.returncode == 2 and b"not a filter" in bad.stderr
    assert pybuild("images", "-aq").split() == pybuild("images", "-q").split()

    # until=: only what was made before (an hour ago: nothing here); other filters refused.
    assert "Deleted Containers" not in pybuild("container", "prune", "-f", "--filter",
                                                "until=1h")
    out = pybuild("system", "prune", "-af", "--filter", "until=1h")
    assert "Deleted Containers" not in out and "Deleted Images" not in out
    assert "Deleted 0 cache entries" in out, "used within the hour: kept"
    assert names() == ["failed", "fine", "made", "up"] and "acme/my-base-image" in \
        pybuild("images")
    label = pybuild("system", "prune", "-f", "--filter", "label=x", check=False)
    assert label.returncode == 2 and b"until=WHEN only" in label.stderr
    out = pybuild("container", "prune", "-f")
    assert out.startswith("Deleted Containers:") and names() == ["up"]
    pybuild("tag", "acme/my-base-image:1.0", "second:1")
    pybuild("rmi", "acme/my-base-image:1.0", "second:1")   # (untagged: gone with its tags)
    pybuild("build", "-q", "-t", "dangling:1", "-f", "Dockerfile.base", ".")
    pybuild("build", "-q", "-t", "dangling:1", "--build-arg", "X=1", "-f", "Dockerfile.base",
            "--no-cache", ".")                      # dangling:1 moves: the old one is dangling
    before = pybuild("images", "-q", "-f", "dangling=true").split()
    assert len(before) == 1
    out = pybuild("image", "prune", "-f")
    assert "Deleted Images:" in out and f"deleted: sha256:{before[0]}" in out
    assert pybuild("images", "-q", "-f", "dangling=true") == ""
    assert "dangling" in pybuild("images"), "tagged images stay without -a"
    out = pybuild("image", "prune", "-a", "-f")
    assert "dangling" not in pybuild("images") and "busybox" in pybuild("images"), \
        "-a: every image no container uses (busybox:demo is used by `up`)"
    pybuild("rm", "-f", "up")


def test_start_runs_a_created_or_stopped_container_again_in_its_writable_layer(walk):
    pybuild, root = walk
    pybuild("create", "--name", "again", "--network", "none", "-e", "WHO=me", "busybox:demo",
            "sh", "-c", "echo $WHO >> /runs; wc -l < /runs; cat /sys/class/net/*/operstate "
            "2>/dev/null | wc -l")
    assert pybuild("start", "-a", "again") == "1\n1\n"        # (only lo: --network none kept)
    assert pybuild("start", "-a", "again") == "2\n1\n", "the writable layer is kept"
    assert pybuild("start", "again") == "again\n"              # detached
    deadline = time.time() + 10
    while "Exited (0)" not in pybuild("ps", "-a") and time.time() < deadline:
        time.sleep(0.05)
    assert pybuild("logs", "again") == "3\n1\n"
    assert pybuild("diff", "again").splitlines() == ["A /runs"]
    failing = pybuild("create", "--name", "fails", "busybox:demo", "sh", "-c", "exit 3").strip()
    assert pybuild("start", "-a", failing[:12], check=False).returncode == 3
    assert re.search(r"Exited \(3\) .*\s+fails$", pybuild("ps", "-a"), re.M)
    both = pybuild("start", "-a", "again", "fails", check=False)
    assert both.returncode == 2 and b"takes one container" in both.stderr
    assert pybuild("start", "nobody", check=False).returncode == 5
    pybuild("rm", "again", "fails")


def test_system_df_and_info_show_what_is_shared(walk):
    pybuild, root = walk
    pybuild("build", "-t", "acme/my-base-image:1.0", "-f", "Dockerfile.base", ".")
    pybuild("build", "-t", "acme/my-final-image:1.0", "-f", "Dockerfile", ".")
    pybuild("run", "-dit", "--name", "c1", "acme/my-final-image:1.0", "bash")
    pybuild("exec", "c1", "sh", "-c", "head -c 3000 /dev/zero > /big")
    df = pybuild("system", "df").splitlines()
    assert df[0].split() == ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]
    images = df[1].split()
    assert images[:3] == ["Images", "3", "1"]
    containers = df[2].split()
    assert containers[:4] == ["Containers", "1", "1", "3kB"]

    verbose = pybuild("system", "df", "-v")
    rows = {(l.split()[0], l.split()[1]): l.split() for l in verbose.splitlines()
            if l.startswith(("acme/", "busybox"))}
    base = rows[("acme/my-base-image", "1.0")]
    final = rows[("acme/my-final-image", "1.0")]
    # SIZE, SHARED SIZE, UNIQUE SIZE, CONTAINERS (the CREATED column has spaces)
    assert final[-1] == "1" and base[-1] == "0"
    assert final[-3] == base[-4], "the final image shares all of the base image's layers"
    assert final[-2] != "0B" and base[-2] == "0B"
    assert re.search(r"^[0-9a-f]{12}\s+acme/my-final-image:1\.0\s+\"bash\"\s+0\s+3kB", verbose,
                     re.M)

    info = pybuild("info")
    assert re.search(r"^Storage Driver: (overlay|fuse)$", info, re.M)
    assert re.search(r"^ Backing Filesystem: \w+", info, re.M)
    assert re.search(r"^Containers: 1\n Running: 1\n Stopped: 0\nImages: 3$", info, re.M)
    assert f"Pybuild Root Dir: {root}" in info
    assert pybuild("system", "info") == info


def test_kill_9_of_a_foreground_run_leaves_a_container_that_is_accounted_for(walk, tmp_path):
    pybuild, root = walk
    pybuild("build", "-t", "acme/my-base-image:1.0", "-f", "Dockerfile.base", ".")
    marker = f"sleep {time.time_ns() % 10_000_000 / 1000:.3f}"
    env = dict(os.environ, PYBUILD_ROOT=str(root), **pybuild.env)
    proc = subprocess.Popen([sys.executable, "-m", "builder", "run", "--name", "victim",
                             "acme/my-base-image:1.0", "sh", "-c",
                             f"echo data > /written; {marker}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while "Up" not in pybuild("ps") and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while time.time() < deadline and processes_with(marker):
        time.sleep(0.05)
    assert not processes_with(marker), "the container died with its parent"
    assert our_mounts() == []
    listing = pybuild("ps", "-a")
    assert re.search(r"Exited \(137\) .*\s+victim$", listing, re.M)
    assert pybuild("diff", "victim").splitlines() == ["A /written"]
    df = pybuild("system", "df").splitlines()
    assert df[2].split()[:4] == ["Containers", "1", "0", "5B"]
    pybuild("rm", "victim")
    assert not (root / "containers").exists() or \
        [n for n in os.listdir(root / "containers") if not n.startswith(".")] == []


def test_system_prune_removes_stopped_containers_untagged_images_and_with_all_every_image(
        tmp_path, base_image, store_root):
    """`docker system prune -f` / `-af`, as CI jobs end: a running container and its image
    stay; a stopped container, an untagged image and the build cache go; -a takes the
    tagged images no container uses too."""
    from conftest import BASE
    base_tar = tmp_path / "base.tar"
    run_pybuild("save", BASE, "-o", base_tar, root=store_root, check=True)
    root = str(tmp_path / "store")

    def pb(*args, check=True):
        return run_pybuild(*args, root=root, check=check).stdout.decode()
    pb("load", "-i", base_tar)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN echo 1 > /one\n",
                                           "Other": f"FROM {BASE}\nRUN echo 2 > /two\n"})
    kept = pb("build", "-q", "-t", "kept:1", ctx).strip()
    untagged = pb("build", "-q", "-f", ctx / "Other", ctx).strip()
    pb("run", "--name", "stopped", "kept:1", "true")
    pb("run", "-d", "--name", "running", BASE, "sleep", "30")
    try:
        out = pb("system", "prune", "-f")
        assert "Deleted Containers:" in out and f"deleted: {untagged}" in out
        assert re.search(r"Deleted [1-9]\d* cache entries", out), out
        names = pb("ps", "-a", "--format", "{{.Names}}").split()
        assert names == ["running"]
        images = pb("images", "--format", "{{.Repository}}:{{.Tag}}").split()
        assert sorted(images) == sorted([BASE, "kept:1"])

        out = pb("system", "prune", "-af")
        assert f"untagged: kept:1\ndeleted: {kept}" in out and BASE not in out
        assert pb("images", "--format", "{{.Repository}}:{{.Tag}}").split() == [BASE]
    finally:
        pb("rm", "-f", "running", check=False)
