"""Language features whose proof is not a single image: cache mounts across builds, secrets that
leave no trace, parallel stages, downloads, ONBUILD from an image, stdin, and their errors."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import tarfile
import threading
import time

import pytest

import builder
from builder import progress

from conftest import BASE, layer_files, write_context


def build(ctx, store_root, **kw):
    """Build from images in the store only (pull="never": no test here needs a registry)."""
    events = []
    kw.setdefault("pull", "never")
    image = builder.build(str(ctx), root=store_root, on_event=events.append, **kw)
    return image, events


def output(events) -> list[str]:
    return [e.line for e in events if isinstance(e, progress.StepOutput)]


def all_layer_files(store, image, skip: int = 0) -> dict[str, bytes]:
    out = {}
    for layer in image.layers[skip:]:
        out.update(layer_files(store, layer))
    return out


def test_cache_mount_keeps_its_content_between_builds_and_stays_out_of_layers(
        tmp_path, base_image, store_root, store):
    marker = f"id-{time.time_ns()}"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN --mount=type=cache,id={marker},target=/cache,uid=1000,mode=0700 \\
    echo run >> /cache/log && wc -l < /cache/log > /count && stat -c '%u %a' /cache > /owner
"""})
    first, _ = build(ctx, store_root, no_cache=True)
    second, _ = build(ctx, store_root, no_cache=True)
    assert layer_files(store, first.layers[-1])["count"] == b"1\n"
    assert layer_files(store, second.layers[-1])["count"] == b"2\n"
    assert layer_files(store, second.layers[-1])["owner"] == b"1000 700\n"
    names = {n for n in all_layer_files(store, second, len(base_image.layers))}
    assert not any(n.startswith("cache") for n in names), names


def test_cache_mount_from_a_stage_starts_as_a_copy_of_its_source(tmp_path, base_image,
                                                                   store_root, store):
    """`--mount=type=cache,from=deps,source=/root/.m2`: a new cache is a copy of that dir
    (owners kept), later RUNs share it, another base has a cache of its own, and the
    stage's own files are untouched."""
    marker = f"m2-{time.time_ns()}"
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS deps
RUN mkdir -p /root/.m2/repo && echo jar > /root/.m2/repo/lib.jar && chown -R 1000:1000 /root/.m2
FROM {BASE}
RUN --mount=type=cache,id={marker},target=/c,from=deps,source=/root/.m2 \\
    cat /c/repo/lib.jar > /seen && stat -c '%u' /c/repo/lib.jar >> /seen && echo more > /c/more
RUN --mount=type=cache,id={marker},target=/c,from=deps,source=/root/.m2 ls /c > /shared
RUN --mount=type=cache,id={marker},target=/c,from={BASE},source=/etc ls /c/passwd /c/more \\
    > /other 2>&1; true
"""})
    image, _ = build(ctx, store_root, no_cache=True)
    files = all_layer_files(store, image, len(base_image.layers))
    assert files["seen"] == b"jar\n1000\n"
    assert files["shared"] == b"more\nrepo\n"
    assert b"/c/passwd" in files["other"] and b"/c/more: No such file" in files["other"]


@pytest.mark.parametrize("mount,message", [
    ("source=/etc", "needs from="),
    ("from=nosuchstage,source=/etc", "nosuchstage"),
    (f"from={BASE},source=/etc/passwd", "is not a directory"),
])
def test_cache_mount_from_errors_name_the_step(tmp_path, base_image, store_root, mount, message):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN --mount=type=cache,target=/c,{mount} true\n"})
    with pytest.raises(builder.PybuildError) as err:
        build(ctx, store_root, no_cache=True)
    assert message in str(err.value) and "Dockerfile:2" in str(err.value), str(err.value)


def test_secret_is_readable_in_its_run_and_nowhere_in_the_store(tmp_path, base_image, store_root,
                                                                  store, pybuild):
    import hashlib
    secret = f"TOPSECRET-{time.time_ns()}"
    (tmp_path / "secret.txt").write_text(secret)
    md5 = hashlib.md5(secret.encode()).hexdigest()    # the Dockerfile holds a hash, not the secret
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN --mount=type=secret,id=tok test "$(md5sum < /run/secrets/tok | cut -c1-32)" = "{md5}" && echo file-ok
RUN --mount=type=secret,id=tok,env=TOKEN,target=/s \
    test "$(printf %s "$TOKEN" | md5sum | cut -c1-32)" = "{md5}" && test -f /s && echo env-ok
RUN --mount=type=secret,id=missing echo optional-missing-is-fine
"""})
    p = pybuild("-t", "secret-test", "--secret", f"id=tok,src={tmp_path / 'secret.txt'}", ctx)
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "#2 file-ok" in err and "#3 env-ok" in err
    needle = secret.encode()
    for dirpath, _, files in os.walk(store_root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            data = open(path, "rb").read()
            if data.startswith(b"\x1f\x8b"):
                data = gzip.decompress(data)
            assert needle not in data, f"the secret leaked into {path}"


def test_required_secret_missing_is_a_clear_error(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN --mount=type=secret,id=tok,required=true true\n"})
    with pytest.raises(builder.BuildError, match="secret 'tok' is required"):
        build(ctx, store_root)


def test_independent_stages_build_at_the_same_time(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS a
RUN sleep 1 && echo a > /a
FROM {BASE} AS b
RUN sleep 1 && echo b > /b
FROM {BASE}
COPY --from=a /a /a
COPY --from=b /b /b
"""})
    times: dict[int, list[float]] = {}

    def on_event(ev):
        if isinstance(ev, (progress.StepStarted, progress.StepDone)):
            times.setdefault(ev.step, []).append(time.monotonic())
    image = builder.build(str(ctx), root=store_root, no_cache=True, on_event=on_event)
    (a_start, a_end), (b_start, b_end) = times[2], times[4]
    assert a_start < b_end and b_start < a_end, "the two RUN steps did not overlap"
    assert len(image.layers) == 3 + 2


def test_failure_in_one_stage_stops_the_others(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE} AS slow
RUN sleep 30
FROM {BASE} AS broken
RUN exit 9
FROM {BASE}
COPY --from=slow /etc/passwd /a
COPY --from=broken /etc/passwd /b
"""})
    started = time.monotonic()
    with pytest.raises(builder.StepFailed) as err:
        build(ctx, store_root, no_cache=True)
    assert err.value.status == 9
    assert time.monotonic() - started < 15, "the slow stage was not stopped"


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b"downloaded content\n"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_url():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_add_url_downloads_checks_and_keeps_times(tmp_path, base_image, store_root, store, http_url):
    import hashlib
    good = "sha256:" + hashlib.sha256(_Handler.body).hexdigest()
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
ADD {http_url}/files/data.txt /dl/
ADD --checksum={good} {http_url}/x/other.bin /checked
"""})
    image, _ = build(ctx, store_root)
    members = {}
    for layer in image.layers[-2:]:
        from conftest import layer_members
        members.update({m.name: m for m in layer_members(store, layer)})
    assert members["dl/data.txt"].mode == 0o600 and members["dl/data.txt"].mtime == 1445412480
    assert all_layer_files(store, image, len(base_image.layers))["checked"] == _Handler.body
    bad = write_context(tmp_path / "bad", {"Dockerfile": f"FROM {BASE}\n"
                                                         f"ADD --checksum=sha256:{'0' * 64} {http_url}/f /f\n"})
    with pytest.raises(builder.BuildError, match="checksum mismatch"):
        build(bad, store_root)


def test_add_unreachable_url_is_a_clear_error(tmp_path, base_image, store_root):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nADD http://127.0.0.1:9/x /x\n"})
    with pytest.raises(builder.BuildError, match="download failed"):
        build(ctx, store_root)


def test_onbuild_triggers_run_when_an_image_is_used_as_base(tmp_path, base_image, store_root, store):
    parent = write_context(tmp_path / "parent", {"Dockerfile": f"""FROM {BASE}
ONBUILD RUN echo triggered > /triggered
ONBUILD COPY marker /marker
"""})
    image, _ = build(parent, store_root, tags=["onbuild-parent:1"])
    assert image.runtime["OnBuild"] == ["RUN echo triggered > /triggered", "COPY marker /marker"]
    child = write_context(tmp_path / "child", {"Dockerfile": "FROM onbuild-parent:1\nRUN cat /triggered /marker\n",
                                               "marker": "from the child's context\n"})
    result, events = build(child, store_root)
    assert output(events) == ["triggered", "from the child's context"]
    assert "OnBuild" not in result.runtime, "triggers run once and are not inherited"


def test_platform_of_from(tmp_path, base_image, store_root):
    ok = write_context(tmp_path / "ok", {"Dockerfile": f"FROM --platform=$BUILDPLATFORM {BASE}\n"
                                                       "ARG TARGETOS\nRUN echo $TARGETOS\n"})
    _, events = build(ok, store_root)
    assert output(events) == ["linux"]
    bad = write_context(tmp_path / "bad", {"Dockerfile": f"FROM --platform=linux/s390x {BASE}\n"})
    if builder.Image and __import__("platform").machine() != "s390x":
        with pytest.raises(builder.DockerfileError, match="this host builds linux/"):
            build(bad, store_root)


def test_dockerfile_and_context_from_stdin(tmp_path, base_image, pybuild):
    p = pybuild("-q", "-t", "stdin-df", "-f", "-", tmp_path,
                input=f"FROM {BASE}\nRUN echo from-stdin > /s\n".encode())
    assert p.returncode == 0, p.stderr.decode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in (("Dockerfile", f"FROM {BASE}\nCOPY hello /hello\n".encode()),
                           ("hello", b"from a tar on stdin\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    p = pybuild("-q", "-t", "stdin-ctx", "-", input=buf.getvalue())
    assert p.returncode == 0, p.stderr.decode()
    run = pybuild("run", "stdin-ctx", "cat", "/hello", check=True)
    assert run.stdout == b"from a tar on stdin\n"
    # `docker build - < Dockerfile`: what is not an archive is the Dockerfile, with an empty
    # context (and a plain tar is a context as a compressed one is).
    p = pybuild("-q", "-t", "stdin-plain", "-",
                input=f"FROM {BASE}\nRUN ls / | wc -l > /n && echo plain > /s\n".encode())
    assert p.returncode == 0, p.stderr.decode()
    assert pybuild("run", "--rm", "stdin-plain", "cat", "/s", check=True).stdout == b"plain\n"
    plain_tar = io.BytesIO()
    with tarfile.open(fileobj=plain_tar, mode="w") as t:
        info = tarfile.TarInfo("Dockerfile")
        data = f"FROM {BASE}\nCOPY Dockerfile /d\n".encode()
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    p = pybuild("-q", "-t", "stdin-tar", "-", input=plain_tar.getvalue())
    assert p.returncode == 0, p.stderr.decode()
    assert pybuild("run", "--rm", "stdin-tar", "cat", "/d", check=True).stdout == data
    both = pybuild("-t", "x", "-f", "-", "-", input=b"")
    assert both.returncode == 2 and b"standard input for both" in both.stderr


def test_a_dockerfile_from_stdin_is_named_so_in_messages(tmp_path, base_image, pybuild):
    """Not by the temp file it is kept in for the build; one from an archive by its path
    there. And its steps' recipes are kept for the context: a miss is explained."""
    (tmp_path / "a").write_text("one\n")
    df = f"FROM {BASE}\nCOPY a /a\nCOPY missing /m\n".encode()
    p = pybuild("-q", "-f", "-", tmp_path, input=df)
    assert p.returncode == 4
    assert p.stderr.decode().startswith("error: <stdin>:3 [3/3] COPY: COPY source 'missing' "), \
        p.stderr.decode()
    p = pybuild("-q", "-", input=b"FROM scratch\nRUNN x\n")
    assert p.returncode == 3 and p.stderr.decode().startswith("error: <stdin>:2: unknown "
                                                               "instruction: RUNN")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as t:
        info = tarfile.TarInfo("build/Containerfile")
        info.size = len(df)
        t.addfile(info, io.BytesIO(df))
    p = pybuild("-q", "-f", "build/Containerfile", "-", input=archive.getvalue())
    assert p.returncode == 4 and "error: build/Containerfile:2 [2/3] COPY" in p.stderr.decode()
    ok = f"FROM {BASE}\nCOPY a /a\n".encode()
    assert pybuild("-q", "-f", "-", tmp_path, input=ok).returncode == 0
    (tmp_path / "a").write_text("two\n")
    p = pybuild("--progress", "plain", "-f", "-", tmp_path, input=ok)
    assert p.returncode == 0
    assert "1 file changed: a (content)" in p.stderr.decode() + p.stdout.decode()


@pytest.mark.parametrize("dockerfile,message", [
    ("RUN --mount=type=bogus,target=/x true", "unknown type 'bogus'"),
    ("RUN --mount=type=cache true", "needs target=PATH"),
    ("COPY --bogus=1 a b", "unknown flag for COPY: --bogus"),
    ("HEALTHCHECK --interval=abc CMD true", "invalid duration"),
    ("HEALTHCHECK --interval=1us CMD true", "cannot be less than 1ms"),
    ("SHELL /bin/bash -c", "SHELL requires the arguments in JSON form"),
    ("ONBUILD FROM x", "ONBUILD FROM is not allowed"),
    ("STOPSIGNAL SIGNOPE", "invalid signal"),
    ("EXPOSE 80/xyz", "invalid protocol"),
    ("EXPOSE 99999", "invalid port (0-65535"),
    ("EXPOSE 80-", "invalid port"),
    ("RUN []", "RUN [] has no command to run"),
    ("COPY --chmod=999 a /b", "invalid chmod parameter"),
    ("COPY a b c", "destination must be a directory and end with a /"),
    ("COPY nothing.txt /x/", "source 'nothing.txt' is not in the build context"),
    ("COPY --from=nosuchstage /x /x", "image not found: nosuchstage"),
])
def test_errors_name_the_line(tmp_path, base_image, store_root, dockerfile, message):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\n{dockerfile}\n", "a": "a"})
    with pytest.raises(builder.PybuildError) as err:
        build(ctx, store_root)
    text = str(err.value)
    assert message in text and "Dockerfile:2" in text, text


def test_run_shebang_heredoc_is_not_left_in_the_image(tmp_path, base_image, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
RUN <<EOF
#!/bin/sh
echo "running $0" > /ran
EOF
"""})
    image, _ = build(ctx, store_root)
    files = layer_files(store, image.layers[-1])
    assert files == {"ran": b"running /dev/pipes/EOF\n"}


def test_from_scratch_run_leaves_no_mount_points(tmp_path, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": 'FROM scratch\nCOPY busybox /busybox\n'
                                                         'RUN ["/busybox", "touch", "/made"]\n'})
    (ctx / "busybox").write_bytes(open("/bin/busybox", "rb").read())
    os.chmod(ctx / "busybox", 0o755)
    image, _ = build(ctx, store_root)
    from conftest import layer_members
    names = {m.name for m in layer_members(store, image.layers[-1])}
    assert names == {"made"}, "no /proc, /dev, /sys or /etc stubs in the RUN's layer"


def test_copy_parents_keeps_paths_and_honours_the_pivot(tmp_path, base_image, store_root, store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"""FROM {BASE}
COPY --parents src/*/main.go /app/
COPY --parents ./src/./lib/util.go /pivot/
""", "src/cmd/main.go": "m", "src/tool/main.go": "t", "src/lib/util.go": "u"})
    image, _ = build(ctx, store_root)
    files = all_layer_files(store, image, len(base_image.layers))
    assert set(files) == {"app/src/cmd/main.go", "app/src/tool/main.go", "pivot/lib/util.go"}


def test_a_duplicate_stage_name_warns_and_means_the_latest_stage():
    """BuildKit warns (DuplicateStageName) and builds; the name then means the stage that
    took it last, for --target as for COPY --from (testdata/compat/duplicate-stage-names)."""
    from builder.dockerfile.instructions import load
    df = load("FROM scratch AS b\nFROM scratch AS b\nFROM scratch AS c\n")
    assert any("duplicate stage name 'b'" in w and ":2:" in w for w in df.warnings)
    assert df.stage("b").index == 1
