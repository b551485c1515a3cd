"""--build-context NAME=VALUE (builder/named_contexts.py): directories and images a Dockerfile
names besides its build context, as BuildKit's named contexts."""

from __future__ import annotations

import os

import pytest

import builder
from builder import progress

from conftest import BASE, layer_files, layer_members, write_context

DOCKERFILE = """FROM {base}
COPY --from=assets conf/app.conf /etc/app.conf
RUN --mount=type=bind,from=assets,source=data,target=/data cat /data/a.txt /data/b.txt > /joined
"""


def steps_run(ctx, store_root, **kw) -> tuple[builder.Image, list[str]]:
    events = []
    image = builder.build(str(ctx), root=store_root, on_event=events.append, **kw)
    text = {e.step: e.text for e in events if isinstance(e, progress.StepStarted)}
    return image, [text[e.step].split()[0] for e in events if isinstance(e, progress.StepDone)
                   and not e.cached and not text[e.step].startswith("FROM")]


def test_a_directory_context_is_read_by_copy_from_and_bind_mounts(tmp_path, base_image,
                                                                  store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE.format(base=BASE)})
    assets = write_context(tmp_path / "assets", {"conf/app.conf": "port=80\n",
                                                 "data/a.txt": "a\n", "data/b.txt": "b\n"})
    os.chmod(assets / "conf/app.conf", 0o640)
    image, ran = steps_run(ctx, store_root, build_contexts={"assets": str(assets)})
    assert ran == ["COPY", "RUN"]
    copied = layer_files(store, image.layers[-2])
    assert copied == {"etc/app.conf": b"port=80\n"}
    member = {m.name: m for m in layer_members(store, image.layers[-2])}
    assert (member["etc/app.conf"].mode, member["etc/app.conf"].uid) == (0o640, 0)
    assert layer_files(store, image.layers[-1])["joined"] == b"a\nb\n"

    assert steps_run(ctx, store_root, build_contexts={"assets": str(assets)})[1] == []
    (assets / "data/b.txt").write_text("B\n")                  # what the mount reads: a miss
    image, ran = steps_run(ctx, store_root, build_contexts={"assets": str(assets)})
    assert ran == ["RUN"]
    assert layer_files(store, image.layers[-1])["joined"] == b"a\nB\n"
    os.utime(assets / "conf/app.conf", (1, 1))                   # a time alone: a hit
    assert steps_run(ctx, store_root, build_contexts={"assets": str(assets)})[1] == []
    (assets / "conf/app.conf").write_text("port=81\n")
    assert steps_run(ctx, store_root, build_contexts={"assets": str(assets)})[1] == ["COPY", "RUN"]


def test_a_directory_context_has_its_own_dockerignore(tmp_path, base_image, store_root, store):
    """As BuildKit: the .dockerignore at the root of the named directory (not the build
    context's) leaves files out, and changing an ignored file changes nothing."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY --from=assets . /a/\n",
                                           ".dockerignore": "keep.txt\n"})
    assets = write_context(tmp_path / "assets", {"keep.txt": "k\n", "debug.log": "noise\n",
                                                 "sub/x.log": "noise\n", ".dockerignore": "**/*.log\n"})
    image, ran = steps_run(ctx, store_root, build_contexts={"assets": str(assets)})
    assert sorted(layer_files(store, image.layers[-1])) == ["a/.dockerignore", "a/keep.txt"]
    (assets / "debug.log").write_text("more noise\n")
    assert steps_run(ctx, store_root, build_contexts={"assets": str(assets)})[1] == []


def test_an_image_context_stands_in_for_the_image_it_names(tmp_path, base_image, store_root,
                                                            store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": """FROM docker.io/library/nowhere-to-be-found
COPY --from=nowhere-to-be-found:latest /bin/busybox /opt/busybox
RUN /opt/busybox true && echo ran > /ran
"""})
    image = builder.build(str(ctx), root=store_root, pull="never",
                          build_contexts={"nowhere-to-be-found": f"docker-image://{BASE}"})
    base = store.resolve(BASE)
    assert image.diff_ids[:len(base.diff_ids)] == base.diff_ids
    in_base = {}
    for layer in base.layers:
        in_base.update(layer_files(store, layer))
    assert layer_files(store, image.layers[-2])["opt/busybox"] == in_base["bin/busybox"]
    assert layer_files(store, image.layers[-1])["ran"] == b"ran\n"
    with pytest.raises(builder.ImageNotFound):
        builder.build(str(ctx), root=store_root, pull="never")     # (without it: not found)


def test_an_image_context_with_a_stages_name_replaces_the_stage(tmp_path, base_image, store_root,
                                                                   store):
    """As BuildKit: the stage becomes the image, and its own steps never run."""
    marker = write_context(tmp_path / "marker", {"Dockerfile": f"FROM {BASE}\nRUN echo m > /marker\n"})
    builder.build(str(marker), tags=["marker:1"], root=store_root)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS builder
RUN echo never > /never
FROM {BASE}
COPY --from=builder /marker /m
"""})
    image, ran = steps_run(ctx, store_root, build_contexts={"builder": "docker-image://marker:1"})
    assert ran == ["COPY"]                                   # (not the builder stage's RUN)
    assert layer_files(store, image.layers[-1]) == {"m": b"m\n"}
    with pytest.raises(builder.BuildError, match="'/marker' is not in stage builder"):
        builder.build(str(ctx), root=store_root)            # without it: the stage as written


@pytest.mark.parametrize("value,message", [
    ("https://github.com/x/y.git", "only local directories and docker-image:// are supported"),
    ("oci-layout:///tmp/layout", "only local directories and docker-image:// are supported"),
    ("/no/such/dir", "is not a directory"),
    ("docker-image://Bad:Ref", "invalid reference"),
])
def test_what_is_not_a_usable_context_is_refused(tmp_path, base_image, store_root, value, message):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\n"})
    with pytest.raises(builder.UsageError, match=message):
        builder.build(str(ctx), root=store_root, build_contexts={"x": value})


def test_a_directory_is_no_base_and_a_stage_is_not_replaced(tmp_path, base_image, store_root):
    assets = write_context(tmp_path / "assets", {"f": "x\n"})
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": "FROM assets\n"})
    with pytest.raises(builder.BuildError, match="build context assets is a directory, not an image"):
        builder.build(str(ctx), root=store_root, build_contexts={"assets": str(assets)})
    ctx = write_context(tmp_path / "ctx2", {"Dockerfile": f"FROM {BASE} AS assets\nFROM {BASE}\n"
                                                           "COPY --from=assets /bin/sh /sh\n"})
    with pytest.raises(builder.UsageError, match="a stage of .* has this name"):
        builder.build(str(ctx), root=store_root, build_contexts={"Assets": str(assets)})


def test_the_command_line_takes_build_contexts(pybuild, tmp_path, base_image, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": DOCKERFILE.format(base="base-alias")})
    assets = write_context(tmp_path / "assets", {"conf/app.conf": "c\n", "data/a.txt": "1\n",
                                                 "data/b.txt": "2\n"})
    pybuild("-q", "-t", "named", "--build-context", f"assets={assets}",
            "--build-context", f"base-alias=docker-image://{BASE}", ctx, check=True)
    image = store.resolve("named")
    assert layer_files(store, image.layers[-1])["joined"] == b"1\n2\n"
    p = pybuild("-t", "named", "--build-context", "assets", ctx)
    assert p.returncode == 2 and b"--build-context assets: expected NAME=VALUE" in p.stderr
