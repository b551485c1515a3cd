"""Pull, push, the registry step cache and build outputs, against a real registry.

Debian's docker-registry runs on 127.0.0.1 (tests/registry_server.py): once
plain, once with htpasswd basic auth. skopeo checks what we push with its
own client, and reaches into the registry's storage to tamper with a blob.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

import builder
from builder.image import LayerDesc
from builder.progress import BuildDone, BuildWarning, StepOutput, Transfer

from conftest import BASE, layer_files, run_pybuild, write_context
import registry_server


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    server = registry_server.start(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    server = registry_server.start(tmp_path_factory.mktemp("registry-auth"),
                                   htpasswd=("ci", "s3cret-pass"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_base(registry, base_image, store_root):
    """busybox:test pushed to the plain registry, as a FROM line would name it."""
    name = f"{registry.host}/test/busybox:1"
    run_pybuild("push", BASE, name, root=store_root, check=True)
    return name


def fresh_store(tmp_path: Path, name: str = "store") -> str:
    root = tmp_path / name
    root.mkdir()
    return str(root)


def skopeo(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


def remote_manifest(name: str) -> tuple[str, dict]:
    """(digest, manifest) of what the registry holds under `name`, as skopeo reads it."""
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}")
    assert raw.returncode == 0, raw.stderr
    return "sha256:" + hashlib.sha256(raw.stdout.encode()).hexdigest(), json.loads(raw.stdout)


def app_context(path: Path, base: str, text: str = "hello from the registry") -> Path:
    return write_context(path, {
        "Dockerfile": f"FROM {base}\n"
                      "COPY greeting.txt /greeting.txt\n"
                      "RUN echo built > /built && chmod 640 /built\n"
                      'CMD ["cat", "/greeting.txt"]\n',
        "greeting.txt": text + "\n",
    })


# ---- push, pull, run --------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["uncompressed", "gzip"])
def test_push_remove_pull_run_gives_the_same_image(registry, base_image, store_root, tmp_path,
                                                   compression):
    """An image of gzip layers is pushed byte for byte (its manifest digest is the local one);
    one of plain layers (the default) as gzip twins, so the registry's manifest is another.
    Either way, pulled back it is the same image (ID, files), with the registry's manifest."""
    name = f"{registry.host}/test/app-{compression}:1"
    # (Contents of its own: a cached step keeps the layer it made, in its compression.)
    image = builder.build(str(app_context(tmp_path / "ctx", BASE, f"hello, {compression}")),
                          tags=[name], root=store_root, compression=compression)
    pushed = run_pybuild("push", name, root=store_root, check=True)
    remote_digest, remote = remote_manifest(name)
    assert pushed.stdout.decode().strip() == remote_digest
    assert (remote_digest == image.digest) == (compression == "gzip")
    assert remote["config"]["digest"] == image.id
    # Docker's RepoDigests: the name the registry holds it by, and by which it is found here.
    repo = name.rpartition(":")[0]

    def inspected(ref: str, root: str = store_root) -> dict:
        return json.loads(run_pybuild("inspect", ref, root=root, check=True).stdout)[0]
    assert inspected(name)["RepoDigests"] == [f"{repo}@{remote_digest}"]
    assert inspected(f"{repo}@{remote_digest}")["Id"] == image.id
    listed = run_pybuild("images", "--digests", name, root=store_root, check=True).stdout.decode()
    assert listed.split()[:4] == ["REPOSITORY", "TAG", "DIGEST", "IMAGE"]
    assert listed.splitlines()[1].split()[:3] == [repo, "1", remote_digest]
    child = builder.build(str(write_context(tmp_path / "child", {
        "Dockerfile": f"FROM {repo}@{remote_digest}\nCMD [\"true\"]\n"})),
        root=store_root, pull="never")
    assert child.diff_ids == image.diff_ids

    run_pybuild("rmi", name, root=store_root, check=True)
    assert run_pybuild("inspect", name, root=store_root).returncode == 5
    pulled = run_pybuild("pull", name, root=store_root, check=True)
    assert pulled.stdout.decode().strip() == image.id
    assert run_pybuild("run", name, root=store_root, check=True).stdout == \
        f"hello, {compression}\n".encode()

    # Into an empty store: every layer comes over the wire, and the image is the same.
    other = fresh_store(tmp_path)
    events = []
    again = builder.pull(name, root=other, on_event=events.append)
    assert (again.id, again.digest) == (image.id, remote_digest)
    done = [e for e in events if isinstance(e, Transfer) and e.done]
    assert sorted((e.digest, e.size) for e in done) == sorted(
        (l["digest"], l["size"]) for l in remote["layers"])
    assert run_pybuild("run", name, root=other, check=True).stdout == \
        f"hello, {compression}\n".encode()
    files = layer_files(builder.Store(other), again.layers[-1])
    assert files["built"] == b"built\n"
    assert inspected(name, other)["RepoDigests"] == [f"{repo}@{remote_digest}"]


def test_a_multi_platform_image_is_pulled_for_this_host_and_named_by_its_index(
        registry, base_image, store_root, tmp_path):
    """A tag naming an OCI index (one manifest per platform): the pull takes this host's
    manifest, and RepoDigests names the index's digest, as Docker's does."""
    from builder import reference
    from builder.image import canonical_json, digest_of, host_architecture
    from builder.registry import transfer
    from builder.registry.client import Client
    store = builder.Store(store_root)
    ref = reference.parse(f"{registry.host}/test/multi:1")
    manifest = store.blobs.read(base_image.digest)
    # Another platform's image (here: a label on the same layers), pushed first.
    builder.build(str(write_context(tmp_path / "other", {
        "Dockerfile": f"FROM {BASE}\nLABEL platform=other\n"})), tags=[f"{ref.name}:other"],
        root=store_root)
    other_platform = builder.push(f"{ref.name}:other", root=store_root)
    index = canonical_json({"schemaVersion": 2,
                            "mediaType": "application/vnd.oci.image.index.v1+json",
                            "manifests": [
        {"mediaType": base_image.manifest["mediaType"], "digest": other_platform.digest,
         "size": other_platform.manifest_size,
         "platform": {"os": "linux", "architecture": "s390x"}},
        {"mediaType": base_image.manifest["mediaType"], "digest": base_image.digest,
         "size": len(manifest), "platform": {"os": "linux", "architecture": host_architecture()}},
    ]})
    client = Client(ref.registry)
    try:
        transfer.send_blobs(store, client, ref, [(l.digest, l.size) for l in base_image.layers]
                            + [(base_image.id, store.blobs.size(base_image.id))])
        client.put_manifest(ref.repository, base_image.digest, manifest,
                            base_image.manifest["mediaType"])
        client.put_manifest(ref.repository, ref.tag, index,
                            "application/vnd.oci.image.index.v1+json")
    finally:
        client.close()
    other = fresh_store(tmp_path)
    pulled = builder.pull(str(ref), root=other)
    assert (pulled.id, pulled.digest) == (base_image.id, base_image.digest)
    data = json.loads(run_pybuild("inspect", str(ref), root=other, check=True).stdout)[0]
    assert data["RepoDigests"] == [f"{ref.name}@{digest_of(index)}"]


def test_skopeo_reads_what_we_push(registry, base_image, store_root, tmp_path):
    name = f"{registry.host}/test/checked:1"
    image = builder.build(str(app_context(tmp_path / "ctx", BASE, "checked")), tags=[name],
                          root=store_root)
    pushed = builder.push(name, root=store_root)
    info = skopeo("inspect", "--tls-verify=false", f"docker://{name}")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["Digest"] == pushed.digest
    base = [l.digest for l in base_image.layers]
    assert data["Layers"][:len(base)] == base and len(data["Layers"]) == len(image.layers)
    assert remote_manifest(name)[1]["config"]["digest"] == image.id

    copied = skopeo("copy", "--src-tls-verify=false", f"docker://{name}",
                    f"oci:{tmp_path / 'oci'}:checked")
    assert copied.returncode == 0, copied.stderr
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    manifest = json.loads((tmp_path / "oci" / "blobs" / "sha256" /
                           index["manifests"][0]["digest"][7:]).read_text())
    assert manifest["config"]["digest"] == image.id
    bundle = tmp_path / "bundle"
    unpacked = subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'oci'}:checked",
                               str(bundle)], capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert (bundle / "rootfs" / "greeting.txt").read_text() == "checked\n"
    assert (bundle / "rootfs" / "built").stat().st_mode & 0o777 == 0o640


def test_a_layer_tampered_with_in_the_registry_is_refused(registry, base_image, store_root,
                                                          tmp_path):
    name = f"{registry.host}/test/tampered:1"
    builder.build(str(app_context(tmp_path / "ctx", BASE, "tamper me")), tags=[name],
                  root=store_root)
    run_pybuild("push", name, root=store_root, check=True)
    top = remote_manifest(name)[1]["layers"][-1]["digest"]
    blob = registry.blob_path(top)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF                      # same size, different bytes
    blob.write_bytes(bytes(data))

    other = fresh_store(tmp_path)
    proc = run_pybuild("pull", name, root=other)
    err = proc.stderr.decode()
    assert proc.returncode in (6, 7), err
    assert "does not match" in err or "cannot read the layer" in err, err
    assert top[:19] in err
    assert "Traceback" not in err
    assert run_pybuild("images", "-q", root=other, check=True).stdout == b""
    assert os.listdir(Path(other) / "tmp") == []          # nothing half-written left behind


def test_a_base_pushed_by_skopeo_is_pulled_and_built_on(registry, base_image, store_root,
                                                        tmp_path):
    archive = tmp_path / "busybox.tar"
    run_pybuild("save", "-o", archive, BASE, root=store_root, check=True)
    base = f"{registry.host}/skopeo/busybox:v2s2"
    # Docker's schema 2 media types, written by skopeo, not by us.
    copied = skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false",
                    f"oci-archive:{archive}:{BASE}", f"docker://{base}")
    assert copied.returncode == 0, copied.stderr

    other = fresh_store(tmp_path)
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {base}\nRUN echo on top > /top\n"})
    events = []
    image = builder.build(str(ctx), tags=["on-skopeo:1"], root=other, on_event=events.append)
    pulled = builder.Store(other).resolve(base)
    assert pulled.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert pulled.id == base_image.id                      # skopeo kept the config's bytes
    assert image.diff_ids[:-1] == pulled.diff_ids
    assert layer_files(builder.Store(other), image.layers[-1]) == {"top": b"on top\n"}
    assert any(isinstance(e, Transfer) for e in events)

    # --pull never: the image is in the store now, so it is used; an unknown one is not pulled.
    ctx2 = write_context(tmp_path / "ctx2", {
        "Dockerfile": f"FROM {registry.host}/skopeo/absent:1\n"})
    proc = run_pybuild("build", "--pull", "never", ctx2, root=other)
    assert proc.returncode == 5
    assert f"{registry.host}/skopeo/absent:1" in proc.stderr.decode()


def test_a_missing_image_names_the_registry_and_the_step(registry, tmp_path):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {registry.host}/nobody/nothing:1\nRUN true\n"})
    proc = run_pybuild("build", ctx, root=fresh_store(tmp_path))
    err = proc.stderr.decode()
    assert proc.returncode == 7, err
    assert "Dockerfile:1" in err and "nobody/nothing" in err and "404" in err
    assert "hint:" in err and "Traceback" not in err


# ---- what goes over the wire -------------------------------------------------------------------

class CountingProxy:
    """A TCP relay that counts the bytes clients send: an independent measure of uploads."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_pushing_layers_the_registry_has_sends_no_layer_bytes(registry, base_image, store_root,
                                                              tmp_path):
    proxy = CountingProxy(registry.host)
    try:
        name = f"{proxy.host}/wire/app:1"
        image = builder.build(str(app_context(tmp_path / "ctx", BASE, "x" * 300_000)),
                              tags=[name], root=store_root)
        first = builder.push(name, root=store_root)
        layer_bytes = sum(l["size"] for l in remote_manifest(name)[1]["layers"])
        assert first.uploaded_bytes == layer_bytes + builder.Store(store_root).blobs.size(image.id)
        assert proxy.sent >= layer_bytes

        before = proxy.sent
        second = builder.push(name, f"{proxy.host}/wire/app:2", root=store_root)
        assert (second.uploaded, second.uploaded_bytes) == (0, 0)
        assert second.present == len(image.layers) + 1
        # HEAD requests and one manifest: a few kilobytes, not the layers.
        assert proxy.sent - before < 16_000 < layer_bytes

        before = proxy.sent
        third = builder.push(name, f"{proxy.host}/elsewhere/app:1", root=store_root)
        assert third.mounted == len(image.layers) + 1 and third.uploaded_bytes == 0
        assert proxy.sent - before < 16_000
        info = skopeo("inspect", "--tls-verify=false", f"docker://{proxy.host}/elsewhere/app:1")
        assert json.loads(info.stdout)["Digest"] == first.digest
    finally:
        proxy.close()


def test_chunked_upload(registry, base_image, store_root, tmp_path):
    name = f"{registry.host}/test/chunked:1"
    image = builder.build(str(app_context(tmp_path / "ctx", BASE, "y" * 200_000)), tags=[name],
                          root=store_root)
    pushed = run_pybuild("push", "--chunk-size", "64KiB", name, root=store_root, check=True)
    other = fresh_store(tmp_path)
    pulled = builder.pull(name, root=other)
    assert (pulled.id, pulled.digest) == (image.id, pushed.stdout.decode().strip())
    assert layer_files(builder.Store(other), pulled.layers[-2])["greeting.txt"] == \
        b"y" * 200_000 + b"\n"


# ---- auth --------------------------------------------------------------------------------------

def test_basic_auth_login_push_pull_logout(auth_registry, base_image, store_root, tmp_path):
    config_dir = tmp_path / "docker-config"
    env = {"DOCKER_CONFIG": str(config_dir)}
    name = f"{auth_registry.host}/private/app:1"
    run_pybuild("tag", BASE, name, root=store_root, check=True)

    refused = run_pybuild("push", name, root=store_root, env=env)
    assert refused.returncode == 7
    assert f"pybuild login {auth_registry.host}" in refused.stderr.decode()

    wrong = run_pybuild("login", "-u", "ci", "--password-stdin", auth_registry.host,
                        input=b"wrong\n", root=store_root, env=env)
    assert wrong.returncode == 7 and "refused" in wrong.stderr.decode()
    assert not (config_dir / "config.json").exists()

    ok = run_pybuild("login", "-u", "ci", "--password-stdin", auth_registry.host,
                     input=b"s3cret-pass\n", root=store_root, env=env, check=True)
    assert b"Login Succeeded" in ok.stdout
    saved = json.loads((config_dir / "config.json").read_text())
    assert auth_registry.host in saved["auths"]
    assert (config_dir / "config.json").stat().st_mode & 0o077 == 0

    run_pybuild("push", name, root=store_root, env=env, check=True)
    other = fresh_store(tmp_path)
    pulled = run_pybuild("pull", name, root=other, env=env, check=True)
    assert pulled.stdout.decode().strip() == base_image.id

    run_pybuild("logout", auth_registry.host, root=store_root, env=env, check=True)
    assert auth_registry.host not in json.loads((config_dir / "config.json").read_text())["auths"]
    again = run_pybuild("pull", name, root=fresh_store(tmp_path, "third"), env=env)
    assert again.returncode == 7


# ---- the registry step cache -------------------------------------------------------------------

def cache_context(path: Path, base: str) -> Path:
    return write_context(path, {
        "Dockerfile": f"FROM {base} AS tools\n"
                      "RUN echo tool > /tool && echo tools-stage-ran\n"
                      f"FROM {base}\n"
                      "ENV GREETING=hi\n"
                      "COPY app.txt /app/app.txt\n"
                      "RUN echo ran-on-$(hostname) > /app/ran && echo step output\n"
                      "COPY --from=tools /tool /app/tool\n"
                      "RUN chmod 600 /app/app.txt\n",
        "app.txt": "the app\n",
    })


def local_cache_manifest(path: Path) -> dict:
    """The cache artifact's manifest in a type=local cache directory."""
    index = json.loads((path / "index.json").read_text())
    return json.loads((path / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())


def twin_in_cache(manifest: dict, plain_digest: str) -> dict:
    """The descriptor of a plain layer's gzip twin in a cache artifact's manifest."""
    found = [d for d in manifest["layers"]
             if (d.get("annotations") or {}).get("containerd.io/uncompressed") == plain_digest]
    assert len(found) == 1, manifest
    return found[0]


@pytest.mark.parametrize("kind, compression", [("registry", "uncompressed"),
                                               ("local", "uncompressed"), ("registry", "gzip")])
def test_a_second_machine_rebuilds_from_the_exported_cache(kind, compression, registry,
                                                           remote_base, tmp_path):
    """The cache holds gzip layers either way: plain layers (the default) travel as their
    gzip twins, annotated with the plain digest, and the second machine stores them as the
    plain tars they were: the same image, manifest and all."""
    ctx = cache_context(tmp_path / "ctx", remote_base)
    if kind == "registry":
        to = from_ = f"type=registry,ref={registry.host}/cache/app:buildcache,mode=max"
    else:
        to = f"type=local,dest={tmp_path / 'ci-cache'},mode=max"
        from_ = f"type=local,src={tmp_path / 'ci-cache'}"
    store_a, store_b = fresh_store(tmp_path, "a"), fresh_store(tmp_path, "b")
    first = builder.build(str(ctx), tags=["cached:1"], root=store_a, cache_to=[to],
                          compression=compression)

    events = []
    second = builder.build(str(ctx), tags=["cached:1"], root=store_b, cache_from=[from_],
                           on_event=events.append)
    done = next(e for e in events if isinstance(e, BuildDone))
    assert done.steps_run == 0, [e for e in events]
    assert not [e for e in events if isinstance(e, StepOutput)]
    assert second.id == first.id and second.digest == first.digest
    assert second.layers == first.layers
    artifact = remote_manifest(f"{registry.host}/cache/app:buildcache")[1] if kind == "registry" \
        else local_cache_manifest(tmp_path / "ci-cache")
    assert {d["mediaType"] for d in artifact["layers"]} == \
        {"application/vnd.oci.image.layer.v1.tar+gzip"}
    new = first.layers[-4:]                     # (the COPY, RUN, COPY and RUN steps')
    if compression == "uncompressed":
        assert {l.media_type for l in second.layers[-4:]} == \
            {"application/vnd.oci.image.layer.v1.tar"}
        # The second machine keeps the cache's twins: its push sends them, compressing none.
        from builder.layer import twins
        kept = twins.remembered(builder.Store(store_b))
        for layer in new:
            twin = twin_in_cache(artifact, layer.digest)
            assert twin["digest"] != layer.digest
            assert kept[layer.digest] == [twin["digest"], twin["size"]]
            assert builder.Store(store_b).blobs.verify(twin["digest"])
    else:
        assert {l.digest for l in new} <= {d["digest"] for d in artifact["layers"]}
    assert layer_files(builder.Store(store_b), second.layers[-2])["app/tool"] == b"tool\n"
    assert run_pybuild("run", "cached:1", "cat", "/app/app.txt", root=store_b,
                       check=True).stdout == b"the app\n"


def test_cache_min_mode_leaves_out_other_stages_and_a_missing_cache_only_warns(
        registry, remote_base, tmp_path):
    ctx = cache_context(tmp_path / "ctx", remote_base)
    ref = f"{registry.host}/cache/min:1"
    store_a, store_b = fresh_store(tmp_path, "a"), fresh_store(tmp_path, "b")
    events = []
    builder.build(str(ctx), root=store_a, cache_from=[f"type=registry,ref={ref}"],
                  cache_to=[f"type=registry,ref={ref}"], on_event=events.append)
    assert any("no cache there yet" in getattr(e, "message", "") for e in events)

    events = []
    builder.build(str(ctx), root=store_b, cache_from=[ref], on_event=events.append)
    done = next(e for e in events if isinstance(e, BuildDone))
    # The tools stage's RUN was not exported (mode=min), so it ran again, and with it the
    # steps after the COPY --from of its result (a new layer: a new key). The final stage's
    # steps before that came from the cache: its RUN printed nothing.
    assert done.steps_run == 3
    assert [e.line for e in events if isinstance(e, StepOutput)] == ["tools-stage-ran"]


def test_a_cache_that_cannot_be_read_is_a_warning_and_the_build_goes_on(
        registry, remote_base, tmp_path):
    """As BuildKit's: --cache-from naming an image that is not a pybuild cache (Docker's
    classic use of the flag), a registry that does not answer, or a damaged local cache
    warns and builds without it."""
    ctx = cache_context(tmp_path / "ctx", remote_base)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "index.json").write_text("{not json")
    events = []
    image = builder.build(str(ctx), root=fresh_store(tmp_path), on_event=events.append,
                          cache_from=[remote_base, "127.0.0.1:9/no/registry:1",
                                      f"type=local,src={damaged}"])
    warnings = [e.message for e in events if isinstance(e, BuildWarning)]
    assert any(remote_base in w and "not a pybuild cache" in w for w in warnings), warnings
    assert any("127.0.0.1:9" in w and "not used" in w for w in warnings), warnings
    assert any(str(damaged) in w and "not used" in w for w in warnings), warnings
    done = next(e for e in events if isinstance(e, BuildDone))
    assert done.steps_run == 6 and image.config["config"]["Env"][-1] == "GREETING=hi"


def test_a_corrupt_cache_layer_is_refused(registry, remote_base, tmp_path):
    ctx = cache_context(tmp_path / "ctx", remote_base)
    dest = tmp_path / "ci-cache"
    store_a, store_b = fresh_store(tmp_path, "a"), fresh_store(tmp_path, "b")
    image = builder.build(str(ctx), root=store_a, cache_to=[f"type=local,dest={dest}"])
    twin = twin_in_cache(local_cache_manifest(dest), image.layers[-3].digest)  # RUN echo ran-on
    blob = dest / "blobs" / "sha256" / twin["digest"][7:]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    proc = run_pybuild("build", "--cache-from", f"type=local,src={dest}", ctx, root=store_b)
    err = proc.stderr.decode()
    assert proc.returncode == 6, err
    assert twin["digest"][:19] in err and "Traceback" not in err


# ---- outputs and compression --------------------------------------------------------------------

def test_outputs_oci_docker_local_and_registry(registry, base_image, store_root, tmp_path):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN echo out > /out && chown 123:45 /out\n",
    })
    name = f"{registry.host}/test/outputs:1"
    meta = tmp_path / "meta.json"
    proc = run_pybuild("build", "-t", name, "--metadata-file", meta,
                       "--output", f"type=oci,dest={tmp_path / 'img.oci'}",
                       "-o", f"type=docker,dest={tmp_path / 'img.docker'}",
                       "-o", f"type=local,dest={tmp_path / 'rootfs'}", "-o", "type=registry",
                       ctx, root=store_root)
    assert proc.returncode == 0, proc.stderr.decode()
    image = builder.Store(store_root).resolve(name)
    # skopeo names the layers of an OCI layout by blob digest, of a docker-archive by diff_id.
    for transport, path, layers in (("oci-archive", "img.oci", [l.digest for l in image.layers]),
                                    ("docker-archive", "img.docker", image.diff_ids)):
        info = skopeo("inspect", f"{transport}:{tmp_path / path}")
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["Layers"] == layers, transport
    rootfs = tmp_path / "rootfs"
    assert (rootfs / "out").read_text() == "out\n"
    assert ((rootfs / "out").stat().st_uid, (rootfs / "out").stat().st_gid) == (123, 45)
    assert (rootfs / "bin" / "sh").is_symlink() or (rootfs / "bin" / "sh").exists()
    digest, remote = remote_manifest(name)
    assert remote["config"]["digest"] == image.id
    assert json.loads(meta.read_text())["containerimage.digest"] == digest


def test_output_tar_is_the_root_filesystem_in_a_file_or_on_stdout(base_image, store_root, tmp_path):
    import io
    import tarfile
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN echo out > /out && chown 123:45 /out && rm /bin/ls\n",
    })
    as_file = tmp_path / "rootfs.tar"
    proc = run_pybuild("build", "-q", "-t", "tarout", "-o", f"type=tar,dest={as_file}", ctx,
                       root=store_root)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == builder.Store(store_root).resolve("tarout").id
    piped = run_pybuild("build", "-q", "-o", "-", ctx, root=store_root)
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout == as_file.read_bytes()          # (and no image ID mixed into it)
    with tarfile.open(fileobj=io.BytesIO(piped.stdout)) as t:
        members = {m.name: m for m in t.getmembers()}
        assert t.extractfile("out").read() == b"out\n"
    assert (members["out"].uid, members["out"].gid) == (123, 45)
    assert "bin/sh" in members and "bin/ls" not in members       # deletions applied
    assert not any(".wh." in name for name in members)
    p = run_pybuild("build", "-o", "type=oci,dest=-", ctx, root=store_root)
    assert p.returncode == 2 and b"only type=tar can go to standard output" in p.stderr


def test_zstd_layers_have_the_zstd_media_type_and_round_trip(registry, base_image, store_root,
                                                             tmp_path):
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nRUN seq 1 20000 > /numbers\n"})
    name = f"{registry.host}/test/zstd:1"
    image = builder.build(str(ctx), tags=[name], root=store_root, compression="zstd")
    top = image.layers[-1]
    assert top.media_type == "application/vnd.oci.image.layer.v1.tar+zstd"
    assert image.manifest["layers"][-1]["mediaType"] == top.media_type
    with builder.Store(store_root).blobs.open(top.digest) as f:
        assert f.read(4) == b"\x28\xb5\x2f\xfd"
    assert layer_files(builder.Store(store_root), top)["numbers"].count(b"\n") == 20000
    builder.push(name, root=store_root)
    copied = skopeo("copy", "--src-tls-verify=false", f"docker://{name}",
                    f"oci:{tmp_path / 'oci'}:z")
    assert copied.returncode == 0, copied.stderr
    other = fresh_store(tmp_path)
    assert builder.pull(name, root=other).id == image.id
    out = run_pybuild("run", name, "tail", "-n1", "/numbers", root=other, check=True)
    assert out.stdout == b"20000\n"


def test_uncompressed_layers_are_plain_tars_that_validators_registries_and_load_read(
        registry, base_image, store_root, tmp_path):
    """Plain layers (the default; named here as BuildKit's compression=uncompressed): a new
    layer's blob is its tar, so its digest is its diff_id; skopeo and umoci read the store and the
    registry copy, a push sends gzip twins of the plain layers (as Docker pushes), the image
    pulls back to the same ID, and save/load round-trips. (The
    RUN's layer is over a megabyte: written by the sink's thread, the COPY's by close().)"""
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nCOPY f /f\nRUN seq 1 300000 > /numbers && chmod 640 /f\n",
        "f": "plain\n"})
    name = f"{registry.host}/test/plain:1"
    meta = tmp_path / "meta.json"
    p = run_pybuild("build", "-q", "--compression", "uncompressed", "-t", name, "--push",
                    "--metadata-file", meta, ctx, root=store_root, check=True)
    image = builder.Store(store_root).resolve(name)
    assert p.stdout.decode().strip() == image.id
    new = image.layers[len(base_image.layers):]
    assert len(new) == 2
    for layer in new:
        assert layer.media_type == "application/vnd.oci.image.layer.v1.tar"
        assert layer.digest == layer.diff_id
        with builder.Store(store_root).blobs.open(layer.digest) as f:
            assert tarfile.is_tarfile(f)
    assert image.manifest["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert layer_files(builder.Store(store_root), new[0])["f"] == b"plain\n"
    assert layer_files(builder.Store(store_root), new[1])["numbers"].count(b"\n") == 300000
    # The base's layers stay as they were (gzip): only new layers are left uncompressed.
    assert image.layers[:len(base_image.layers)] == base_image.layers

    bundle = tmp_path / "bundle"
    unpacked = subprocess.run(["umoci", "unpack", "--image", f"{store_root}:{name}", str(bundle)],
                              capture_output=True, text=True)
    assert unpacked.returncode == 0, unpacked.stderr
    assert (bundle / "rootfs" / "f").stat().st_mode & 0o777 == 0o640
    # Pushed (by the build, and again here) as Docker pushes: plain layers as gzip twins
    # (made once), the rest as they are.
    pushed = builder.push(name, root=store_root)
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{name}")
    remote_digest, manifest = remote_manifest(name)
    assert [d["mediaType"] for d in manifest["layers"]] == \
        ["application/vnd.oci.image.layer.v1.tar+gzip"] * len(image.layers)
    assert manifest["config"]["digest"] == image.id
    assert pushed.digest != image.digest and pushed.digest == remote_digest
    # build --push's --metadata-file names the manifest the registry has (CI deploys by it).
    said = json.loads(meta.read_text())
    assert said["containerimage.digest"] == pushed.digest
    assert said["containerimage.descriptor"]["size"] == len(raw.stdout.encode())
    assert said["containerimage.config.digest"] == image.id
    sent = [d["digest"] for d in manifest["layers"]]
    assert sent[:len(base_image.layers)] == [l.digest for l in base_image.layers]
    store = builder.Store(store_root)
    for layer, digest in zip(new, sent[len(base_image.layers):]):
        assert digest != layer.digest
        with store.blobs.open(digest) as twin, store.blobs.open(layer.digest) as plain:
            assert gzip.decompress(twin.read()) == plain.read()
    # Garbage collection keeps the twins of layers it keeps: the next push makes none again.
    from builder import cache
    from builder.store import gc
    gc.collect(store, cache.StepCache(store))
    assert all(store.blobs.has(digest) for digest in sent)
    again = builder.push(name, root=store_root)
    assert (again.digest, again.uploaded) == (pushed.digest, 0)
    other = fresh_store(tmp_path)
    assert builder.pull(name, root=other).id == image.id
    out = run_pybuild("run", name, "tail", "-n1", "/numbers", root=other, check=True)
    assert out.stdout == b"300000\n"
    # The image as it is stored, plain layers and all, put in the registry by hand (skopeo
    # would compress them): pulled, its plain layers are kept as they came.
    from builder import reference
    from builder.registry import transfer
    from builder.registry.client import Client
    as_is = reference.parse(f"{registry.host}/test/plain-as-is:1")
    client = Client(as_is.registry)
    try:
        transfer.send_blobs(store, client, as_is, [(l.digest, l.size) for l in image.layers]
                            + [(image.id, store.blobs.size(image.id))])
        client.put_manifest(as_is.repository, as_is.tag, store.blobs.read(image.digest),
                            image.manifest["mediaType"])
    finally:
        client.close()
    pulled = builder.pull(str(as_is), root=fresh_store(tmp_path, "as-is"))
    assert (pulled.id, pulled.digest, pulled.layers) == (image.id, image.digest, image.layers)
    archive = tmp_path / "plain.tar"
    run_pybuild("save", name, "-o", archive, root=store_root, check=True)
    loaded = fresh_store(tmp_path, "loaded")
    run_pybuild("load", "-i", archive, root=loaded, check=True)
    assert builder.Store(loaded).resolve(name).id == image.id


def test_a_plain_layer_whose_blob_was_damaged_is_not_pushed(registry, base_image, store_root,
                                                            tmp_path):
    """A gzip twin is made from the plain blob and checked against the layer's diff_id: a
    damaged blob is an error naming the layer (exit 6), and the registry gets no image.
    (In a store of its own: the damage must not reach the other tests' checks.)"""
    base_tar = tmp_path / "base.tar"
    run_pybuild("save", BASE, "-o", base_tar, root=store_root, check=True)
    root = fresh_store(tmp_path)
    run_pybuild("load", "-i", base_tar, root=root, check=True)
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nCOPY f /f\n",
                                           "f": "to be damaged " * 1000})
    name = f"{registry.host}/test/damaged:1"
    image = builder.build(str(ctx), tags=[name], root=root, compression="uncompressed")
    path = builder.Store(root).blobs.path(image.layers[-1].digest)
    with open(path, "r+b") as f:
        f.seek(2000)
        f.write(b"X")
    p = run_pybuild("push", name, root=root)
    err = p.stderr.decode()
    assert p.returncode == 6, err
    assert f"error: layer {image.layers[-1].digest} is damaged: its blob is not its tar" in err
    assert "Traceback" not in err
    assert skopeo("inspect", "--tls-verify=false", f"docker://{name}").returncode != 0


def test_a_push_makes_each_gzip_twin_in_the_thread_that_sends_it(registry, base_image,
                                                                  store_root, tmp_path,
                                                                  monkeypatch):
    """Plain layers' twins are made by the transfer threads, each before its own upload
    (one compressed while another is sent), not all before the first upload; the manifest
    names them in the image's order, and a second push makes none."""
    from builder.layer import twins
    root = fresh_store(tmp_path)
    base_tar = tmp_path / "base.tar"
    run_pybuild("save", BASE, "-o", base_tar, root=store_root, check=True)
    run_pybuild("load", "-i", base_tar, root=root, check=True)
    ctx = write_context(tmp_path / "ctx", {
        "Dockerfile": f"FROM {BASE}\nCOPY a /a\nCOPY b /b\nCOPY c /c\n",
        "a": os.urandom(300_000).hex(), "b": os.urandom(300_000).hex(), "c": "c\n"})
    name = f"{registry.host}/test/threads:1"
    image = builder.build(str(ctx), tags=[name], root=root, compression="uncompressed")
    made: dict[str, str] = {}
    real = twins.gzip_twin

    def recording(store, layer, known=None, stop=None):
        made[layer.digest] = threading.current_thread().name
        return real(store, layer, known, stop)
    monkeypatch.setattr(twins, "gzip_twin", recording)
    builder.push(name, root=root)
    assert set(made) == {l.digest for l in image.layers}
    assert all(n.startswith("pybuild-transfer") for n in made.values()), made
    _, remote = remote_manifest(name)
    kept = twins.remembered(builder.Store(root))
    plain = [l for l in image.layers if l.media_type.endswith(".tar")]
    assert len(plain) == 3                             # (the base's layers are gzip)
    assert [d["digest"] for d in remote["layers"]] == [
        kept[l.digest][0] if l in plain else l.digest for l in image.layers]
    monkeypatch.setattr(twins, "compress", None)       # (a twin made again would fail here)
    builder.push(name, root=root)
    assert remote_manifest(name)[1] == remote


def test_a_stopped_push_gives_up_the_twin_it_was_making(tmp_path):
    """A push given up (Ctrl-C, another upload's error) stops compressing: Interrupted,
    no temp blob left, nothing remembered."""
    from builder.errors import Interrupted
    from builder.layer import twins
    root = fresh_store(tmp_path)
    store = builder.Store(root)
    data = os.urandom(3 << 20)
    digest = store.blobs.put_bytes(data)
    layer = LayerDesc(digest, digest, len(data), "application/vnd.oci.image.layer.v1.tar")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        twins.gzip_twin(store, layer, stop=stop)
    assert os.listdir(os.path.join(root, "tmp")) == []
    assert twins.remembered(store) == {}


# ---- progress ----------------------------------------------------------------------------------

def test_pull_on_a_terminal_shows_each_layer_with_its_size(registry, base_image, store_root,
                                                           tmp_path):
    from test_progress import on_terminal
    name = f"{registry.host}/test/terminal:1"
    run_pybuild("push", BASE, name, root=store_root, check=True)
    screen = "\n".join(on_terminal(["pull", name], fresh_store(tmp_path)))
    for layer in base_image.layers:
        assert f"✔ ⇣ {layer.digest[7:19]} " in screen, screen
    assert f"Pulled {name} (sha256:" in screen
    assert screen.splitlines()[-1] == base_image.id


def test_a_transfer_in_flight_is_a_bar_with_bytes_and_rate():
    from builder.progress import transfer_bar
    line = transfer_bar(Transfer("push", "r/x:1", "sha256:" + "ab" * 32, 50_000_000, 100_000_000,
                                 2.0, done=False)).plain
    assert line == "● ⇡ abababababab [============            ] 50MB/100MB 25MB/s"
