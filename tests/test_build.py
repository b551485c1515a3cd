"""End-to-end builds as root with real overlay mounts: the image produced, layer by layer."""

from __future__ import annotations

import os
import shutil
import stat
import threading

import pytest

import builder
from builder import progress
from builder.image import chain_ids

from conftest import (BASE, TESTDATA, layer_files, layer_members, our_mounts, run_pybuild,
                      write_context)


def build(ctx, store_root, **kw):
    events = []
    image = builder.build(str(ctx), root=store_root, on_event=events.append, **kw)
    return image, events


def runs(events) -> int:
    """How many steps actually ran (were not served from the cache)."""
    return sum(1 for e in events if isinstance(e, progress.StepDone) and not e.cached)


def output(events) -> list[str]:
    return [e.line for e in events if isinstance(e, progress.StepOutput)]


@pytest.fixture
def demo(tmp_path, base_image, store_root):
    ctx = tmp_path / "demo"
    shutil.copytree(TESTDATA / "demo", ctx)
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text().replace("busybox:demo", BASE))
    return ctx


def test_base_image_from_scratch(base_image, store):
    assert base_image.runtime["Cmd"] == ["sh"]
    assert len(base_image.layers) == 3            # rootfs/, busybox, the applet links
    files = layer_files(store, base_image.layers[1])
    assert files["bin/busybox"] == open("/bin/busybox", "rb").read()
    links = {m.name: m for m in layer_members(store, base_image.layers[2])}
    assert links["bin/sh"].issym() and links["bin/sh"].linkname == "/bin/busybox"
    assert links["tmp"].mode == 0o1777
    assert (links["home/app"].uid, links["home/app"].gid) == (1000, 1000)
    # the mount points the RUN needed (a FROM scratch image has none) are not in its layer
    for name in ("proc", "dev", "sys", "etc/hosts", "etc/resolv.conf", "etc/hostname"):
        assert name not in links


def test_demo_image_layers_history_and_config(demo, store, store_root, base_image):
    image, events = build(demo, store_root, tags=["demo:test"])
    rt = image.runtime
    assert rt["Cmd"] == ["sh", "/app/hello.sh"]
    assert rt["WorkingDir"] == "/app" and rt["User"] == "app"
    assert "GREETING=hello from pybuild" in rt["Env"] and "APP_HOME=/app" in rt["Env"]
    assert not any(e.startswith("GREETING_WORD=") for e in rt["Env"]), "ARGs are not persisted"
    assert rt["Labels"]["org.opencontainers.image.title"] == "pybuild demo"
    assert rt["ExposedPorts"] == {"8080/tcp": {}}
    # base layers + COPY + RUN; LABEL, ENV, WORKDIR (dir exists), USER, EXPOSE, CMD add none
    assert image.diff_ids[:3] == base_image.diff_ids
    assert len(image.layers) == len(base_image.layers) + 2
    new = image.history[len(base_image.history):]
    assert [h["created_by"].split()[0] for h in new] == \
        ["LABEL", "ARG", "ENV", "COPY", "RUN", "WORKDIR", "USER", "EXPOSE", "CMD"]
    assert [bool(h.get("empty_layer")) for h in new] == \
        [True, True, True, False, False, True, True, True, True]
    assert new[1]["created_by"] == "ARG GREETING_WORD=hello"
    assert new[4]["created_by"].startswith("RUN |1 GREETING_WORD=hello /bin/sh -c echo")
    assert new[7]["created_by"] == "EXPOSE [8080/tcp]"
    assert new[8]["created_by"] == 'CMD ["sh" "/app/hello.sh"]'    # BuildKit's (Go's %q) form
    assert image.config["created"] == new[-1]["created"]
    # COPY --chown: owner from the image's own /etc/passwd, mode kept
    copy_layer = {m.name: m for m in layer_members(store, image.layers[3])}
    hello = copy_layer["app/hello.sh"]
    assert (hello.uid, hello.gid, hello.mode) == (1000, 1000, 0o755)
    # RUN: the new file, and the deleted base file as a whiteout
    run_layer = {m.name: m for m in layer_members(store, image.layers[4])}
    assert ".wh.motd" in {n.rsplit("/", 1)[-1] for n in run_layer}
    assert "etc/.wh.motd" in run_layer
    assert layer_files(store, image.layers[4])["app/greeting.txt"] == b"hello from pybuild\n"
    assert image.id == "sha256:" + __import__("hashlib").sha256(store.blobs.read(image.id)).hexdigest()
    assert store.resolve("demo:test").id == image.id


def test_unchanged_rebuild_runs_nothing_and_gives_the_same_id(demo, store_root):
    first, _ = build(demo, store_root)
    second, events = build(demo, store_root)
    assert second.id == first.id
    assert runs(events) == 0 and output(events) == []


def test_changed_source_reruns_from_its_copy_only(demo, store_root, store):
    first, _ = build(demo, store_root)
    os.utime(demo / "app/hello.sh", (12345, 12345))
    touched, events = build(demo, store_root)
    assert touched.id == first.id and runs(events) == 0, "an mtime-only change must hit the cache"
    (demo / "app/hello.sh").write_text("#!/bin/sh\necho changed\n")
    second, events = build(demo, store_root)
    ran = [e for e in events if isinstance(e, progress.StepDone) and not e.cached]
    started = {e.step: e.text for e in events if isinstance(e, progress.StepStarted)}
    assert started[ran[0].step].startswith("COPY"), "steps before the COPY are cached"
    assert len(ran) == 6            # COPY, RUN, WORKDIR, USER, EXPOSE, CMD
    assert second.diff_ids[:3] == first.diff_ids[:3] and second.id != first.id
    assert layer_files(store, second.layers[3])["app/hello.sh"] == b"#!/bin/sh\necho changed\n"


def test_env_values_never_share_a_cache_entry(tmp_path, base_image, store_root):
    results = {}
    for value in ("1", "2", "1"):
        ctx = write_context(tmp_path / f"env{value}", {
            "Dockerfile": f"FROM {BASE}\nENV A={value}\nRUN echo A=$A > /a\n"})
        image, events = build(ctx, store_root)
        results.setdefault(value, []).append((image, runs(events)))
    (one, ran1), (one_again, ran_again) = results["1"]
    (two, _), = results["2"]
    assert one.id != two.id and one_again.id == one.id and ran_again == 0
    assert one.diff_ids[-1] != two.diff_ids[-1]


def test_no_cache_rebuilds_every_step(demo, store_root):
    build(demo, store_root)
    _, events = build(demo, store_root, no_cache=True)
    assert runs(events) == 9


def test_build_arg_changes_the_run(tmp_path, base_image, store, store_root):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nARG V=default\nRUN echo $V > /v\n"})
    default, _ = build(ctx, store_root)
    custom, _ = build(ctx, store_root, build_args={"V": "custom"})
    assert layer_files(store, default.layers[-1])["v"] == b"default\n"
    assert layer_files(store, custom.layers[-1])["v"] == b"custom\n"


def test_unconsumed_build_arg_warns(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN true\n"})
    _, events = build(ctx, store_root, build_args={"NOPE": "1"})
    warnings = [e.message for e in events if isinstance(e, progress.BuildWarning)]
    assert warnings and "NOPE" in warnings[0]
    _, events = build(ctx, store_root, build_args={"BUILDKIT_INLINE_CACHE": "1", "HTTP_PROXY": "x"})
    warnings = [e.message for e in events if isinstance(e, progress.BuildWarning)]
    assert warnings == ["BuildKit's own build args have no effect on pybuild: "
                        "BUILDKIT_INLINE_CACHE (a step cache others can use: "
                        "--cache-to type=registry,ref=REF)"]


def test_run_exec_form_and_output_streams(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f'FROM {BASE}\nRUN ["echo", "exec", "form"]\nRUN echo one; echo two >&2\n'})
    image, events = build(ctx, store_root)
    assert output(events) == ["exec form", "one", "two"]
    assert image.history[-1].get("empty_layer") and image.history[-2].get("empty_layer"), \
        "a RUN that changes no file adds no layer"


def test_copy_files_dirs_globs_and_destinations(tmp_path, base_image, store, store_root):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"""FROM {BASE}
WORKDIR /w
COPY a.txt b.conf /multi/
COPY *.txt /glob/
COPY a.txt renamed.txt
COPY dir /contents/
COPY dir/ /contents2
COPY --chown=1234:staff --chmod=640 a.txt /owned
COPY a.txt yarn.lock* /optional/
COPY *.nothing /none/
""",
        "a.txt": "A", "b.conf": "B", "c.txt": "C", "dir/sub/deep.txt": "D", "dir/top": "T"})
    os.chmod(ctx / "dir/top", 0o700)
    image, _ = build(ctx, store_root)
    files = {}
    members = {}
    for layer in image.layers[len(base_image.layers):]:
        files.update(layer_files(store, layer))
        members.update({m.name: m for m in layer_members(store, layer)})
    assert files["multi/a.txt"] == b"A" and files["multi/b.conf"] == b"B"
    assert files["glob/a.txt"] == b"A" and files["glob/c.txt"] == b"C" and "glob/b.conf" not in files
    assert files["w/renamed.txt"] == b"A"
    assert files["contents/sub/deep.txt"] == b"D" and files["contents/top"] == b"T"
    assert "contents/dir" not in members, "a directory source copies its contents"
    assert files["contents2/top"] == b"T"
    assert members["contents/top"].mode == 0o700
    assert (members["contents/top"].uid, members["contents/top"].gid) == (0, 0)
    owned = members["owned"]
    assert (owned.uid, owned.gid, owned.mode) == (1234, 50, 0o640)
    # A pattern that matches nothing is skipped, as in BuildKit; nothing at all: no dest either.
    assert files["optional/a.txt"] == b"A"
    assert not any(name.startswith("none") for name in members)


def test_copy_into_symlinked_dir_stays_inside_the_image(tmp_path, base_image, store_root, store):
    marker = "/tmp/pybuild-escape-test"
    shutil.rmtree(marker, ignore_errors=True)
    os.makedirs(marker)
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN ln -s {marker} /escape\nCOPY f /escape/f\n", "f": "x"})
    try:
        image, _ = build(ctx, store_root)
        assert os.listdir(marker) == [], "COPY followed an image symlink out to the host"
    finally:
        shutil.rmtree(marker, ignore_errors=True)
    assert layer_files(store, image.layers[-1])[marker.lstrip("/") + "/f"] == b"x"


def test_run_has_dockers_capabilities_and_cannot_change_the_host_kernel(tmp_path, base_image,
                                                                          store_root):
    """A RUN as root gets Docker's default capabilities (no SYS_ADMIN, NET_ADMIN, SYS_TIME,
    DAC_READ_SEARCH, ...), a read-only /proc/sys (host sysctls), masked /proc/keys, no
    descriptor but 0-2, and BuildKit's environment (no HOSTNAME). A descriptor pybuild
    itself inherited (as from a CI agent) must not reach the command."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN grep -E '^Cap(Eff|Bnd)' /proc/self/status; \\
    v=$(cat /proc/sys/vm/swappiness); (echo $v > /proc/sys/vm/swappiness) 2>/dev/null \\
      && echo sysctl-written || echo sysctl-refused; \\
    wc -c < /proc/keys; ls /proc/self/fd | tr '\\n' ' '; echo; env | grep -c HOSTNAME; true
"""})
    leaked_r, leaked_w = os.pipe()
    os.set_inheritable(leaked_w, True)
    try:
        _, events = build(ctx, store_root, no_cache=True)
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    out = output(events)
    assert out[:2] == ["CapEff:\t00000000a80425fb", "CapBnd:\t00000000a80425fb"], out
    assert out[2] == "sysctl-refused" and out[3].strip() == "0", out
    assert out[4].split() == ["0", "1", "2", "3"], out      # 3: ls reading the directory
    assert out[5] == "0", out


def test_device_nodes_a_run_makes_cannot_be_opened(tmp_path, base_image, store_root, store):
    """RUN may mknod (CAP_MKNOD, as in Docker, and the node is in the layer), but a node
    in the image, in /dev or in a cache mount opens nothing: with it, a RUN could read
    the host's disks (Docker's devices cgroup stops that). /dev/null and co. still work."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN mknod /n c 1 3 && (echo x > /n) 2>/dev/null || echo image-node-refused; \\
    mknod /dev/n c 1 3 && (echo x > /dev/n) 2>/dev/null || echo dev-node-refused; \\
    echo x > /dev/null && head -c 3 /dev/zero | wc -c
RUN --mount=type=cache,target=/c mknod /c/n c 1 3; \\
    (echo x > /c/n) 2>/dev/null || echo cache-node-refused; rm /c/n
"""})
    image, events = build(ctx, store_root, no_cache=True)
    assert output(events) == ["image-node-refused", "dev-node-refused", "3",
                              "cache-node-refused"]
    node = {m.name: m for m in layer_members(store, image.layers[len(base_image.layers)])}["n"]
    assert node.ischr() and (node.devmajor, node.devminor) == (1, 3)


def test_run_sees_only_the_image(tmp_path, base_image, store_root, store):
    marker = "/tmp/pybuild-host-only"
    with open(marker, "w") as f:
        f.write("host")
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN test ! -e {marker} && echo pid=$$ && hostname && cat /etc/hostname && cat /proc/1/comm >/dev/null \\
    && touch /etc/hosts-was-writable-here && echo written > /tmp/new
"""})
    try:
        image, events = build(ctx, store_root)
        assert open(marker).read() == "host"
    finally:
        os.unlink(marker)
    # the command is PID 1 of a new pid namespace (as under BuildKit), with its own hostname
    assert output(events) == ["pid=1", "pybuild", "pybuild"]
    files = layer_files(store, image.layers[-1])
    assert files["tmp/new"] == b"written\n"
    assert not any(n in files for n in ("etc/hosts", "etc/hostname", "etc/resolv.conf"))


def test_a_run_whose_program_drops_the_parent_death_signal_gets_an_init(tmp_path, base_image,
                                                                         store_root):
    # Exec'ing a set-user-ID program clears the signal that ends the command with pybuild
    # (prctl(2)); as PID 1 nothing else would: such a command runs under pybuild's PID 1.
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN mkdir /suid && cp /bin/busybox /suid/busybox && chmod 4755 /suid/busybox
RUN ["/suid/busybox", "sh", "-c", "echo suid=$$"]
RUN ["/bin/busybox", "sh", "-c", "echo plain=$$"]
USER app
RUN echo app=$$ && id -u
"""})
    _, events = build(ctx, store_root)
    assert output(events) == ["suid=2", "plain=1", "app=1", "1000"]


def test_users_and_groups_come_from_the_image(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
USER app
RUN id -u; id -g; id -G; echo $HOME
USER app:daemon
RUN id -G
USER 4321
RUN id -u; id -g; echo $HOME
"""})
    _, events = build(ctx, store_root)
    assert output(events) == ["1000", "1000", "1000 50", "/home/app", "1", "4321", "0", "/"]


def test_unknown_user_fails_at_the_step_that_needs_it(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nUSER ghost\nRUN true\n"})
    with pytest.raises(builder.BuildError) as err:
        build(ctx, store_root)
    assert "unable to find user ghost" in str(err.value)
    assert "Dockerfile:3" in str(err.value)


def test_failing_run_names_step_line_command_and_code(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN true\nRUN exit 3\n"})
    with pytest.raises(builder.StepFailed) as err:
        build(ctx, store_root)
    e = err.value
    assert (e.status, e.line) == (3, 3)
    assert "step 3/3" in str(e) and "exit 3" in str(e) and "exited with code 3" in str(e)


def test_network_none_has_only_loopback(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN --network=none ls /sys/class/net
RUN cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | sort | head -1
"""})
    _, events = build(ctx, store_root, network="none")
    lines = output(events)
    assert lines[0] == "lo"
    assert lines[-1] == "lo", "the build's --network none applies to every RUN"


def test_workdir_created_and_owned_by_user(tmp_path, base_image, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
USER app
WORKDIR /data/work
WORKDIR sub
RUN pwd
"""})
    image, events = build(ctx, store_root)
    assert output(events) == ["/data/work/sub"]
    assert image.runtime["WorkingDir"] == "/data/work/sub"
    members = {m.name: m for m in layer_members(store, image.layers[-2])}
    assert members["data/work"].uid == 1000


def test_entrypoint_drops_inherited_cmd(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f'FROM {BASE}\nENTRYPOINT ["echo"]\n'})
    image, _ = build(ctx, store_root)
    assert image.runtime["Entrypoint"] == ["echo"] and "Cmd" not in image.runtime
    ctx2 = write_context(tmp_path / "ctx2", {
        "Dockerfile": f'FROM {BASE}\nCMD ["hi"]\nENTRYPOINT echo\n'})
    image2, _ = build(ctx2, store_root)
    assert image2.runtime["Entrypoint"] == ["/bin/sh", "-c", "echo"] and image2.runtime["Cmd"] == ["hi"]


def test_multi_stage_from_earlier_stage_and_target(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS one
RUN echo 1 > /one
FROM one AS two
RUN cat /one
FROM {BASE} AS unused
RUN echo never-built
"""})
    image, events = build(ctx, store_root, target="two")
    assert "never-built" not in output(events)
    assert output(events) == ["1"]
    assert len(image.layers) == len(base_image.layers) + 1


def test_ssh_mount_without_an_agent(tmp_path, base_image, store_root):
    """An optional ssh mount is nothing but SSH_AUTH_SOCK (BuildKit without --ssh); a required
    one stops the build at its step, saying how to forward an agent."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN --mount=type=ssh "
                                                         "test ! -e /run/buildkit && "
                                                         "echo none $SSH_AUTH_SOCK\n"})
    _, events = build(ctx, store_root)
    assert output(events) == ["none /run/buildkit/ssh_agent.0"]
    # (`RUN true` is in the cache: the check comes before the lookup)
    build(write_context(tmp_path / "plain", {"Dockerfile": f"FROM {BASE}\nRUN true\n"}), store_root)
    (ctx / "Dockerfile").write_text(f"FROM {BASE}\nRUN --mount=type=ssh,required=true true\n")
    with pytest.raises(builder.BuildError, match=r"Dockerfile:2 \[2/2\] RUN: RUN --mount=type=ssh,"
                                                 "id=default is required, and no agent was "
                                                 "forwarded") as e:
        build(ctx, store_root)
    assert "--ssh default" in e.value.hint


def _tool_with_its_libraries(tool: str, dest) -> None:
    """Copy a host binary and the shared libraries it loads under `dest`, at their paths."""
    import subprocess
    path = shutil.which(tool)
    found = [path] + [word for line in subprocess.run(["ldd", path], capture_output=True,
                                                      text=True, check=True).stdout.splitlines()
                      for word in line.split() if word.startswith("/")]
    for f in found:
        target = dest / os.path.realpath(f).lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), target)
        if os.path.realpath(f) != f:        # (the name the binary asks for, as a link)
            link = dest / f.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(os.path.realpath(f))


@pytest.mark.skipif(not shutil.which("ssh-agent"), reason="needs openssh-client (make system)")
def test_ssh_agent_is_forwarded_to_ssh_mounts(tmp_path, base_image, store_root, store):
    """--ssh: a RUN's ssh-add lists the agent's key through a relay socket with the mount's
    owner and mode; nothing of it stays in the layer, and the agent is not in any key."""
    import subprocess
    import time
    agent_sock = tmp_path / "agent" / "agent.sock"
    agent_sock.parent.mkdir()
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if agent_sock.exists():
                break
            time.sleep(0.05)
        key = tmp_path / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pybuild-test",
                        "-f", str(key)], check=True)
        subprocess.run(["ssh-add", "-q", str(key)], check=True, capture_output=True,
                       env=dict(os.environ, SSH_AUTH_SOCK=str(agent_sock)))
        ctx = tmp_path / "ctx"
        _tool_with_its_libraries("ssh-add", ctx / "tools")
        (ctx / "Dockerfile").write_text(
            f"FROM {BASE}\nCOPY tools/ /\n"
            "RUN --mount=type=ssh ssh-add -l | cut -d' ' -f3- > /listed && "
            "stat -c '%a %u %F' $SSH_AUTH_SOCK > /default\n"
            "RUN --mount=type=ssh,id=deploy,target=/tmp/a.sock,mode=0660,uid=1000 "
            "ssh-add -l | cut -d' ' -f3- > /deploy && "
            "stat -c '%a %u %F' /tmp/a.sock >> /deploy && echo $SSH_AUTH_SOCK >> /deploy\n")
        image, _ = build(ctx, store_root, ssh={"default": str(agent_sock),
                                               "deploy": str(agent_sock)})
        first = layer_files(store, image.layers[-2])
        assert first["listed"] == b"pybuild-test (ED25519)\n"
        assert first["default"] == b"600 0 socket\n"
        assert not any(name.startswith(("run/buildkit", "tmp/")) for name in first)
        second = layer_files(store, image.layers[-1])
        # SSH_AUTH_SOCK names the RUN's first ssh mount, wherever it is (as BuildKit).
        assert second["deploy"].decode().splitlines() == [
            "pybuild-test (ED25519)", "660 1000 socket", "/tmp/a.sock"]
        assert not any(name.startswith("tmp/a.sock") for name in second)
        # The agent is outside the build, as the network is: the same steps without it hit
        # (the mounts themselves are part of the key, as in BuildKit).
        again, events = build(ctx, store_root)
        assert again.id == image.id and runs(events) == 0
    finally:
        agent.kill()
        agent.wait()


def test_hard_link_copy_up_breaks_the_link_as_in_docker(tmp_path, base_image, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN echo one > /a && ln /a /b
RUN echo two >> /b
RUN cat /a /b
"""})
    image, events = build(ctx, store_root)
    assert output(events) == ["one", "one", "two"]
    assert layer_files(store, image.layers[-1]) == {"b": b"one\ntwo\n"}


def test_layers_are_shared_by_chain_id(tmp_path, base_image, store):
    for chain in chain_ids(base_image.diff_ids):
        assert store.layers.has(chain)
        diff = os.path.join(store.root, store.layers.link(chain))
        assert os.path.isdir(diff) and os.path.islink(os.path.join(store.root, store.layers.link(chain)))


def test_whiteout_of_a_directory_and_opaque_replacement(tmp_path, base_image, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN mkdir -p /d/old && echo x > /d/old/f && mkdir /gone
RUN rm -rf /d /gone && mkdir /d && echo new > /d/n
RUN test ! -e /d/old && test ! -e /gone && cat /d/n
"""})
    image, events = build(ctx, store_root)
    assert output(events) == ["new"]
    names = {m.name for m in layer_members(store, image.layers[-1])}
    assert {".wh.gone", "d", "d/.wh..wh..opq", "d/n"} <= names
    st = os.lstat(os.path.join(store.root, store.layers.link(chain_ids(image.diff_ids)[-1]), "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "the diff dir keeps overlay whiteouts"


def test_copy_writes_new_files_straight_into_the_upper_dir_with_overlay_semantics(
        tmp_path, base_image, store_root, store):
    """Many files (the parallel path), into an existing directory of a lower layer, over a
    name an earlier step deleted, and over a file the image has: the layers say exactly what
    the overlay would have said."""
    files = {f"many/f{i:03d}.txt": f"{i}\n" for i in range(300)}
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN rm /etc/motd
COPY motd passwd /etc/
COPY many /etc/many/
RUN cat /etc/motd && test "$(ls /etc/many | wc -l)" = 300 && grep -q replaced /etc/passwd
""", "motd": "back again\n", "passwd": "replaced\n", **files})
    image, events = build(ctx, store_root)
    assert output(events) == ["back again"]
    copy1 = {m.name: m for m in layer_members(store, image.layers[-2])}
    assert set(copy1) == {"etc", "etc/motd", "etc/passwd"}, "the parent is copied up, nothing else"
    assert copy1["etc"].isdir() and copy1["etc"].mode == 0o755
    assert layer_files(store, image.layers[-2]) == {"etc/motd": b"back again\n",
                                                   "etc/passwd": b"replaced\n"}
    many = {m.name: m for m in layer_members(store, image.layers[-1])}
    assert len([n for n in many if n.startswith("etc/many/f")]) == 300
    assert all(m.uid == 0 and m.gid == 0 and m.mode == 0o644 for n, m in many.items() if n.endswith(".txt"))
    # the layer dirs hold overlay-ready content: no whiteout device left where a file now is
    diff = os.path.join(store.root, store.layers.link(chain_ids(image.diff_ids)[-2]))
    assert stat.S_ISREG(os.lstat(os.path.join(diff, "etc/motd")).st_mode)


CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")   # v2, cap_net_raw


def test_copy_and_add_keep_file_capabilities_and_xattrs(tmp_path, base_image, store_root, store):
    """COPY (with and without --chown) and ADD of a tar keep security.capability and other
    xattrs, directories' too, as Docker does. chown drops file capabilities, so they are
    set after it."""
    import io
    import tarfile
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("bundle/ping")
        info.size, info.mode = 3, 0o755
        info.pax_headers = {
            "SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.user.origin": "archive"}
        t.addfile(info, io.BytesIO(b"hi\n"))
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
COPY tool /bin/tool
COPY --chown=1000:1000 tool /bin/tool-owned
ADD bundle.tar /opt/
""", "tool": "#!/bin/sh\n", "bundle.tar": bundle.getvalue()})
    os.setxattr(ctx / "tool", "security.capability", CAP_NET_RAW)
    os.setxattr(ctx / "tool", "user.origin", b"context")
    (ctx / "tree" / "sub").mkdir(parents=True)
    os.setxattr(ctx / "tree" / "sub", "user.kind", b"directory")
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text() + "COPY tree /tree\n")
    image = builder.build(str(ctx), root=store_root, no_cache=True)

    def xattrs(layer, name):
        m = {m.name: m for m in layer_members(store, layer)}[name]
        return m, {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
                   for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    _, plain = xattrs(image.layers[-4], "bin/tool")
    owned_entry, owned = xattrs(image.layers[-3], "bin/tool-owned")
    _, added = xattrs(image.layers[-2], "opt/bundle/ping")
    assert plain == {"security.capability": CAP_NET_RAW, "user.origin": b"context"}
    assert owned == plain and (owned_entry.uid, owned_entry.gid) == (1000, 1000)
    assert added == {"security.capability": CAP_NET_RAW, "user.origin": b"archive"}
    assert xattrs(image.layers[-1], "tree/sub")[1] == {"user.kind": b"directory"}


def test_copy_from_a_stage_or_an_image_keeps_owners(tmp_path, base_image, store_root, store):
    """COPY --from keeps the owners files have in the other stage or image (Docker since
    moby#38599, BuildKit, Buildah); --chown still sets them; directories the COPY creates
    around the files are root's; files from the context are 0:0."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS build
RUN mkdir -p /out/sub && echo x > /out/sub/f && echo y > /out/g && chown -R 1000:1001 /out \\
 && chown 1002:1003 /out/g && chmod 4755 /out/sub/f
FROM {BASE}
COPY --from=build /out /kept/
COPY --from=build /out/sub/f /new/parent/f
COPY --from=build --chown=2000:2000 /out /chowned/
COPY --from=build /out/g /kept-file
COPY ctxfile /ctxfile
""", "ctxfile": "from the context\n"})
    os.chown(ctx / "ctxfile", 1234, 1234)
    image = builder.build(str(ctx), root=store_root, no_cache=True)
    owners = {}
    for layer in image.layers[-5:]:
        for m in layer_members(store, layer):
            owners[m.name] = (m.uid, m.gid, m.mode)
    assert owners["kept/sub"][:2] == (1000, 1001) and owners["kept/g"][:2] == (1002, 1003)
    assert owners["kept/sub/f"] == (1000, 1001, 0o4755)
    assert owners["new/parent"][:2] == (0, 0) and owners["new/parent/f"][:2] == (1000, 1001)
    assert all(owners[n][:2] == (2000, 2000) for n in ("chowned/sub", "chowned/sub/f", "chowned/g"))
    assert owners["kept-file"][:2] == (1002, 1003)
    assert owners["ctxfile"][:2] == (0, 0)


def test_copied_context_files_keep_every_mode_bit_and_are_root_s_in_a_set_group_id_dir(
        tmp_path, base_image, store_root, store):
    """Context files are created with their mode and root's owner where nothing changes
    either (fileops._BornRight); the cases where creation alone would not give them: a
    set-group-ID directory of the image (new files take its group, here 50), set-ID and
    sticky bits, a mode without any permission. Whatever the host's umask."""
    files = {f"tree/f{i}": f"{i}\n" for i in range(300)}   # (enough for the copy workers)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN mkdir /shared && chown 0:50 /shared && chmod 2775 /shared
COPY tree /shared/
COPY tree /plain/
""", **files})
    modes = {"f0": 0o4755, "f1": 0o2711, "f2": 0o1644, "f3": 0o000, "f4": 0o640, "f5": 0o777}
    for name, mode in modes.items():
        os.chmod(ctx / "tree" / name, mode)
    old = os.umask(0o077)
    try:
        image = builder.build(str(ctx), root=store_root, no_cache=True)
    finally:
        os.umask(old)
    for layer, top in ((image.layers[-2], "shared"), (image.layers[-1], "plain")):
        got = {m.name: (m.uid, m.gid, m.mode) for m in layer_members(store, layer)
               if m.name.startswith(f"{top}/")}
        assert len(got) == 300, top
        for name in files:
            base = name.removeprefix("tree/")
            assert got[f"{top}/{base}"] == (0, 0, modes.get(base, 0o644)), (top, base)


def test_copy_chmod_takes_symbolic_modes(tmp_path, base_image, store_root, store):
    """--chmod=a+rX,go-w (Dockerfile 1.14): applied to each entry's own mode, X only to
    directories and to files someone may already execute."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
COPY --chmod=a+rX,go-w tree /tree
COPY --chmod=+x tree/plain /plain-exec
""", "tree/plain": "p\n", "tree/tool": "#!/bin/sh\n", "tree/sub/f": "f\n"})
    os.chmod(ctx / "tree" / "plain", 0o600)
    os.chmod(ctx / "tree" / "tool", 0o700)
    os.chmod(ctx / "tree" / "sub", 0o700)
    os.chmod(ctx / "tree" / "sub" / "f", 0o666)
    image = builder.build(str(ctx), root=store_root, no_cache=True)
    modes = {m.name: m.mode for layer in image.layers[-2:] for m in layer_members(store, layer)}
    assert modes["tree/plain"] == 0o644 and modes["tree/tool"] == 0o755
    assert modes["tree/sub"] == 0o755 and modes["tree/sub/f"] == 0o644
    assert modes["plain-exec"] == 0o711


def test_add_chown_applies_to_what_an_archive_unpacks(tmp_path, base_image, store_root, store):
    """`ADD --chown=100:200 t.tar /out/` owns every unpacked entry 100:200, as BuildKit's
    dockerfile frontend does since 1.17 (testDockerfileAddChownArchive); Docker 20.10's
    BuildKit kept the archive's owners. Without --chown, the archive's owners stay."""
    import io
    import tarfile
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as t:
        for name, kind in (("d", tarfile.DIRTYPE), ("d/foo", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.uid, info.gid, info.mode = kind, 7, 8, 0o755
            info.size = 3 if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(b"hi\n") if info.size else None)
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nADD --chown=100:200 t.tar /out/\nADD t.tar /kept/\n",
        "t.tar": archive.getvalue()})
    image = builder.build(str(ctx), root=store_root, no_cache=True)
    chowned = {m.name.rstrip("/"): (m.uid, m.gid) for m in layer_members(store, image.layers[-2])}
    kept = {m.name.rstrip("/"): (m.uid, m.gid) for m in layer_members(store, image.layers[-1])}
    assert chowned["out/d"] == chowned["out/d/foo"] == (100, 200)
    assert kept["kept/d"] == kept["kept/d/foo"] == (7, 8)


def test_ssh_relay_gives_up_on_a_reader_that_stopped(tmp_path, monkeypatch):
    """A step that asks the agent and never reads the answer cannot hold the relay, and with
    it the end of the step, beyond the send timeout."""
    import socket
    import threading
    import time
    from builder import sshagent
    monkeypatch.setattr(sshagent, "_SEND_TIMEOUT", 0.2)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "agent.sock"))
    server.listen()

    def agent():           # answers with far more than the sockets' buffers hold
        conn, _ = server.accept()
        try:
            conn.sendall(b"x" * (16 << 20))
        except OSError:
            pass
        conn.close()
    threading.Thread(target=agent, daemon=True).start()
    relay = sshagent.AgentRelay(str(tmp_path / "agent.sock"), str(tmp_path), "relay.sock")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(relay.path)                     # and never reads
    time.sleep(0.5)
    closing = threading.Thread(target=relay.close)
    closing.start()
    closing.join(3)
    assert not closing.is_alive(), "the relay waited for a reader that stopped"
    assert not [t for t in threading.enumerate() if t.name == "pybuild-ssh-agent"]
    client.close()
    server.close()


def test_ulimits_reach_run_and_its_cache_key(tmp_path, base_image, store_root, store):
    """--ulimit, as Docker's: RUN sees the limits, and a different set is a different step.
    (Raising a hard limit needs CAP_SYS_RESOURCE, which root lacks on this machine.)"""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\n"
                                                         "RUN ulimit -Sn > /n && ulimit -Hn >> /n\n"})
    image = builder.build(str(ctx), root=store_root, ulimits=["nofile=512:1024"])
    assert layer_files(store, image.layers[-1])["n"] == b"512\n1024\n"
    again = builder.build(str(ctx), root=store_root, ulimits=[("nofile", 512, 1024)])
    assert again.id == image.id                                     # the same limits: a hit
    other = builder.build(str(ctx), root=store_root, ulimits=["nofile=256"])
    assert layer_files(store, other.layers[-1])["n"] == b"256\n256\n"
    for bad, message in (("nofile", "expected NAME=SOFT"), ("files=1", "expected NAME=SOFT"),
                         ("nofile=9:8", "soft limit must be at most the hard one")):
        with pytest.raises(builder.UsageError, match=message):
            builder.build(str(ctx), root=store_root, ulimits=[bad])


def test_a_build_deeper_than_one_mount_holds_sees_every_layer_through_flattened_snapshots(
        tmp_path, base_image, store_root, store, monkeypatch):
    # Beyond MAX_STACK layers, the oldest are mounted as flattened snapshots: the first
    # made in the step that needs it, the next ones ahead of time in a thread. Small
    # numbers make a 40-step build go through several of both.
    from builder.snapshot import flatten, overlay
    monkeypatch.setattr(overlay, "MAX_STACK", 8)
    monkeypatch.setattr(overlay, "FLATTEN_CHUNK", 4)
    makers = []
    make = flatten._make

    def recording_make(*args):
        makers.append(threading.current_thread().name)
        make(*args)
    monkeypatch.setattr(flatten, "_make", recording_make)
    marker = os.urandom(4).hex()
    lines = [f"FROM {BASE}",
             f"RUN echo {marker} > /first && mkdir /d && echo keep > /d/keep && echo x > /d/gone",
             "RUN rm /d/gone && ln -s /first /d/link"]
    lines += [f"RUN echo {i} >> /log && echo {i} > /s{i % 3}" for i in range(3, 40)]
    lines += ["RUN cat /first /d/keep /d/link && test ! -e /d/gone && wc -l < /log && cat /s0 /s1 /s2"]
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "\n".join(lines) + "\n"})
    before = set(os.listdir(os.path.join(store_root, "flat"))) \
        if os.path.isdir(os.path.join(store_root, "flat")) else set()
    image, events = build(ctx, store_root)
    assert [line.strip() for line in output(events)] == [marker, "keep", marker, "37", "39",
                                                         "37", "38"]
    if store.driver != "vfs":                   # (vfs copies whole roots: nothing to stack)
        made = set(os.listdir(os.path.join(store_root, "flat"))) - before
        # The last steps' stacks of 41 layers mount prefixes of 4, 8, ... 36 layers flattened.
        assert len(made) >= 9
        # The first in the step that needed it; most of the others ahead, beside the steps.
        assert makers[0] == threading.main_thread().name
        assert makers.count("pybuild-flatten") >= 6, makers
    assert not flatten._pending                 # nothing is still being made after the build
    assert our_mounts() == []
    # The image keeps its real layers (the last RUN changes nothing): the deletion is a
    # whiteout in its own layer.
    base = len(base_image.diff_ids)
    assert len(image.diff_ids) == base + 39
    assert ".wh.gone" in [os.path.basename(m.name) for m in layer_members(store, image.layers[base + 1])]


def test_another_stage_deeper_than_overlay_takes_is_read_through_flattened_snapshots(
        tmp_path, base_image, store_root, store):
    """COPY --from, RUN --mount from= and `pybuild cp` mount a stage's or image's layers once;
    beyond the kernel's 500 lower dirs they too see the oldest through a flattened union
    (they failed with "too many lower directories")."""
    if store.driver != "overlay":
        # (vfs copies whole roots; fuse mounts these with the kernel's overlay too, as here,
        # and its 510 RUN steps would take a slow test's time again)
        pytest.skip("the kernel overlay's stack limit, as the overlay driver meets it")
    marker = os.urandom(4).hex()
    lines = [f"FROM {BASE} AS deep", f"RUN echo {marker} > /first"]
    lines += [f"RUN echo {i} > /s{i % 5}" for i in range(510)]
    lines += [f"FROM {BASE}", "COPY --from=deep /first /copied",
              "RUN --mount=type=bind,from=deep,target=/d cat /copied /d/first /d/s4",
              "RUN --mount=type=cache,from=deep,source=/,target=/c,id=deep-" + marker +
              " cat /c/s3"]
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "\n".join(lines) + "\n"})
    image, events = build(ctx, store_root, tags=["deep-reader"])
    assert [line.strip() for line in output(events)] == [marker, marker, "509", "508"]
    copied = [layer_files(store, layer).get("copied") for layer in image.layers]
    assert copied[len(base_image.diff_ids)] == f"{marker}\n".encode()
    deep, _ = build(ctx, store_root, tags=["deep-stage"], target="deep")
    assert len(deep.diff_ids) > 500
    p = run_pybuild("create", "--name", "deep-cp", "deep-stage", "true", root=store_root,
                    check=True)
    try:
        run_pybuild("cp", "deep-cp:/first", tmp_path / "first", root=store_root, check=True)
        assert (tmp_path / "first").read_text() == f"{marker}\n"
    finally:
        run_pybuild("rm", p.stdout.decode().strip(), root=store_root, check=True)
    assert our_mounts() == []


def test_a_stage_states_diff_ids_follow_its_layers():
    # Kept between steps (a deep build asked for them twice a step): they must still be
    # the layers' own, whatever happened to the list, and never a list a caller can spoil.
    from builder.image import LayerDesc
    from builder.steps import StageState
    layer = [LayerDesc(f"sha256:{i:064x}", f"sha256:{i + 100:064x}", 1, "m") for i in range(5)]
    state = StageState("s", {}, list(layer[:2]))
    assert state.diff_ids() == [l.diff_id for l in layer[:2]]
    state.diff_ids().append("spoiled")
    state.layers.append(layer[2])
    assert state.diff_ids() == [l.diff_id for l in layer[:3]]
    state.layers = [layer[3], layer[4]]                # replaced, not grown
    assert state.diff_ids() == [layer[3].diff_id, layer[4].diff_id]
    state.layers = [layer[0]]
    assert state.diff_ids() == [layer[0].diff_id]
