"""The pybuild command as people and CI jobs use it: forms, listings, exit codes, messages."""

from __future__ import annotations

import json
import re

import pytest

from builder.errors import ImageNotFound

from conftest import BASE, write_context


def test_docker_form_builds_tags_and_prints_the_id(pybuild, demo_ctx, tmp_path):
    iid = tmp_path / "iid"
    p = pybuild("-t", "cli-demo", "-t", "cli-demo:v1", "-f", demo_ctx / "Dockerfile", demo_ctx, "--no-cache",
                "--iidfile", iid)
    assert p.returncode == 0, p.stderr.decode()
    image_id = p.stdout.decode().strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id)
    assert iid.read_text() == image_id
    err = p.stderr.decode()
    assert "[stage-0 5/10] COPY --chown=app:app app/ /app/" in err
    assert re.search(r"^#6 DONE \d+\.\d+s$", err, re.M)
    again = pybuild("build", "-q", "-t", "cli-demo", demo_ctx, check=True)
    assert again.stdout.decode().strip() == image_id and again.stderr == b""


def test_images_history_inspect_tag_rmi(pybuild, demo_ctx):
    image_id = pybuild("-q", "-t", "listed:1", "--build-arg", "GREETING_WORD=listed", demo_ctx,
                       check=True).stdout.decode().strip()
    images = pybuild("images", check=True).stdout.decode().splitlines()
    assert images[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    row = next(line.split() for line in images if line.startswith("listed "))
    assert row[:3] == ["listed", "1", image_id[7:19]] and row[-1].endswith("MB")

    history = pybuild("history", "listed:1", check=True).stdout.decode().splitlines()
    assert history[0].split()[:2] == ["IMAGE", "CREATED"]
    assert history[1].startswith(image_id[7:19]) and "CMD [\"sh\" \"/app/hello.sh\"]" in history[1]
    assert "<missing>" in history[2]
    assert any("COPY --chown=app:app app/ /app/" in h for h in history)
    # --format (a template, or json: one object a line), -q and -H false, as Docker's.
    lines = pybuild("history", "--format", "{{.ID}}|{{.CreatedBy}}|{{.Size}}", "listed:1",
                    check=True).stdout.decode().splitlines()
    assert lines[0].startswith(image_id[7:19] + '|CMD ["sh" "/app/hello.sh"]|0B')
    assert len(lines) == len(history) - 1
    entries = [json.loads(line) for line in pybuild("history", "--format", "json", "listed:1",
                                                    check=True).stdout.decode().splitlines()]
    assert entries[0]["ID"] == image_id[7:19] and set(entries[0]) == {
        "ID", "CreatedSince", "CreatedAt", "CreatedBy", "Size", "Comment"}
    assert pybuild("history", "-q", "listed:1", check=True).stdout.decode().split() == \
        [e["ID"] for e in entries]
    raw = pybuild("history", "-H", "false", "--format", "{{.Size}} {{.CreatedSince}}",
                  "listed:1", check=True).stdout.decode().splitlines()
    assert all(r.split()[0].isdigit() and "T" in r.split()[1] for r in raw), raw
    assert pybuild("history", "-H=false", "--format", "{{.Size}} {{.CreatedSince}}",
                   "listed:1", check=True).stdout.decode().splitlines() == raw
    assert [json.loads(line)["Repository"] for line in pybuild(
        "images", "--format", "json", "listed", check=True).stdout.decode().splitlines()] == \
        ["listed"]

    data = json.loads(pybuild("inspect", "listed:1", check=True).stdout)
    assert data[0]["Id"] == image_id and data[0]["RepoTags"] == ["listed:1"]
    assert json.loads(pybuild("inspect", "--format", "json", "listed:1",
                              check=True).stdout) == data[0]
    assert [l["diff_id"] for l in data[0]["Layers"]] == data[0]["RootFS"]["Layers"]
    assert data[0]["Manifest"]["config"]["digest"] == image_id

    pybuild("tag", "listed:1", "other/name:2", check=True)
    assert json.loads(pybuild("inspect", "other/name:2", check=True).stdout)[0]["Id"] == image_id
    p = pybuild("rmi", "listed:1", check=True)
    assert "Untagged: listed:1" in p.stdout.decode()
    assert pybuild("inspect", "listed:1").returncode == 5
    pybuild("rmi", "other/name:2", check=True)
    assert image_id[7:19] not in pybuild("images", check=True).stdout.decode()


def test_images_takes_a_repository_filters_and_a_format_as_docker_does(pybuild, demo_ctx):
    """`docker images REPO`, `-f dangling=true -q`, `-f reference=...` and `--format`, as CI
    cleanup scripts use them."""
    image_id = pybuild("-q", "-t", "filtered/app:1", "--build-arg", "GREETING_WORD=filtered",
                       demo_ctx, check=True).stdout.decode().strip()
    pybuild("tag", "filtered/app:1", "reg.example:5000/filtered/app:2", check=True)
    short = image_id[7:19]
    assert pybuild("images", "-q", "filtered/app", check=True).stdout.decode().split() == [short]
    listing = pybuild("images", "filtered/app:1", check=True).stdout.decode().splitlines()
    assert len(listing) == 2 and listing[1].split()[:3] == ["filtered/app", "1", short]
    assert len(pybuild("images", "filtered/app:9", check=True).stdout.splitlines()) == 1
    rows = pybuild("images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}", "-f",
                   "reference=*/filtered/*", check=True).stdout.decode().splitlines()
    assert rows == [f"reg.example:5000/filtered/app:2 {short}"]
    table = pybuild("images", "--format", "table {{.Repository}}\\t{{.CreatedAt}}",
                    "filtered/*", check=True).stdout.decode().splitlines()
    assert table[0].split() == ["REPOSITORY", "CREATED", "AT"]
    assert re.fullmatch(r"filtered/app +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+0000 UTC", table[1])

    untagged = pybuild("-q", "--build-arg", "GREETING_WORD=dangling", demo_ctx,
                       check=True).stdout.decode().strip()[7:19]
    dangling = pybuild("images", "-q", "-f", "dangling=true", check=True).stdout.decode().split()
    tagged = pybuild("images", "-q", "--filter", "dangling=false", check=True).stdout.decode()
    assert untagged in dangling and short not in dangling
    assert short in tagged.split() and untagged not in tagged
    assert_clean_error(pybuild("images", "-f", "label=x"), 2, "not a filter pybuild knows")
    assert pybuild("inspect", "-f", "{{index .RepoTags 0}}", "filtered/app:1",
                   check=True).stdout.decode() == "filtered/app:1\n"
    assert_clean_error(pybuild("inspect", "-f", "{{range .RepoTags}}{{.}}{{end}}",
                               "filtered/app:1"), 2, "is not something pybuild's templates do")
    pybuild("rmi", "filtered/app:1", "reg.example:5000/filtered/app:2", untagged, check=True)


def test_format_templates_index_lists_and_maps_and_refuse_what_they_do_not_know():
    from builder.cli_format import render
    from builder.errors import UsageError
    obj = {"RepoTags": ["a:1", "b:2"], "RepoDigests": [],
           "Config": {"Labels": {"org.x": "v"}, "Cmd": ["sh"]}}
    assert render('{{index .RepoTags 1}} {{ index .Config.Labels "org.x" }}|'
                  '{{index .Config.Labels "y"}}|{{json .Config.Cmd}}|{{.Missing}}', obj) \
        == 'b:2 v||["sh"]|<no value>'
    with pytest.raises(UsageError, match=r"no item 0 in \[\]"):
        render("{{index .RepoDigests 0}}", obj)
    for unknown in ("{{range .RepoTags}}", "{{.RepoTags 0}}", "{{index .RepoTags}}",
                    "{{upper .Id}}"):
        with pytest.raises(UsageError, match="not something pybuild's templates do"):
            render(unknown, obj)


def test_run_executes_cmd_as_the_image_says(pybuild, demo_ctx):
    pybuild("-q", "-t", "runme", demo_ctx, check=True)
    p = pybuild("run", "--rm", "runme", check=True)
    assert p.stdout.decode().splitlines() == [
        "hello from pybuild", "running as app in /app on pybuild", "/etc/motd was deleted by a RUN step"]
    p = pybuild("run", "runme", "sh", "-c", "echo $GREETING; exit 7")
    assert p.returncode == 7 and p.stdout.decode() == "hello from pybuild\n"
    p = pybuild("run", "-u", "0", "-e", "X=1", "runme", "sh", "-c", "id -u; echo $X; touch /etc/x")
    assert p.stdout.decode().split() == ["0", "1"]
    p = pybuild("run", "runme", "sh", "-c", "test ! -e /etc/x")
    assert p.returncode == 0, "a container's writes are thrown away"


# ---- errors: one clear line, a meaningful exit code, never a traceback ---------------

def assert_clean_error(p, code: int, *needles: str) -> str:
    err = p.stderr.decode()
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")], err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1
    for n in needles:
        assert n in err, err
    return err


def test_missing_dockerfile(pybuild, tmp_path):
    p = pybuild("-t", "x", tmp_path)
    assert_clean_error(p, 3, "Dockerfile: no such file", "hint:")


def test_unknown_instruction_suggests_the_fix(pybuild, tmp_path):
    ctx = write_context(tmp_path, {"Dockerfile": f"FROM {BASE}\nRUNN echo hi\n"})
    p = pybuild("-t", "x", ctx)
    assert_clean_error(p, 3, "Dockerfile:2: unknown instruction: RUNN", "did you mean RUN?")


def test_missing_copy_source(pybuild, tmp_path, base_image):
    ctx = write_context(tmp_path, {"Dockerfile": f"FROM {BASE}\nCOPY nothere.txt /x\n"})
    p = pybuild("-t", "x", ctx)
    assert_clean_error(p, 4, "Dockerfile:2", "COPY source 'nothere.txt' is not in the build context")


def test_failing_run_exit_code_and_message(pybuild, tmp_path, base_image):
    ctx = write_context(tmp_path, {"Dockerfile": f"FROM {BASE}\nRUN echo about to fail && false\n"})
    p = pybuild("-t", "x", ctx)
    err = assert_clean_error(p, 4, "step 2/2", "exited with code 1", "Dockerfile:2")
    assert "#2 about to fail" in err


def test_unknown_image_says_how_to_get_one(pybuild, tmp_path):
    ctx = write_context(tmp_path, {"Dockerfile": "FROM nosuch/image:1\nRUN true\n"})
    p = pybuild("-t", "x", "--pull", "never", ctx)
    assert_clean_error(p, 5, "image not found: nosuch/image:1", "pybuild pull", "pybuild load",
                       "pybuild import")
    # With the default (--pull missing) it is looked for in its registry, which is not there.
    ctx = write_context(tmp_path, {"Dockerfile": "FROM 127.0.0.1:1/nosuch/image:1\nRUN true\n"})
    assert_clean_error(pybuild("-t", "x", ctx), 7, "Dockerfile:1", "127.0.0.1:1",
                       "Connection refused", "check that the registry is reachable")
    assert_clean_error(pybuild("history", "ghost"), 5, "image not found: ghost")


def test_bad_usage(pybuild, tmp_path):
    assert_clean_error(pybuild("-t", "UPPER", tmp_path), 2, "invalid reference format",
                       "lowercase")
    assert_clean_error(pybuild("images", "--bogus"), 2, "unrecognized arguments")


def test_debug_shows_the_traceback(pybuild, tmp_path):
    p = pybuild("--debug", "-t", "x", tmp_path)
    assert p.returncode == 3 and "Traceback" in p.stderr.decode()


def test_docker_build_flags_ci_jobs_pass(pybuild, tmp_path, base_image, store):
    """--label, --platform, --add-host, --shm-size and --rm, as `docker build` takes them;
    --load, --provenance and --sbom as buildx does."""
    from builder.image import host_architecture
    from conftest import layer_files
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nLABEL a=dockerfile keep=1\n"
                                                          "RUN cat /etc/hosts > /hosts && "
                                                          "df -k /dev/shm | tail -1 > /shm\n"})
    platform = f"linux/{host_architecture()}"
    image_id = pybuild("-q", "-t", "flags", "--label", "a=cli", "--label", "org.example.rev=abc1",
                       "--label", "empty", "--platform", platform,
                       "--add-host", "db.local:10.1.2.3", "--add-host", "gw=host-gateway",
                       "--add-host", "v6:fd00::1", "--shm-size", "128m", "--rm", "--force-rm",
                       "--load", "--provenance=false", "--sbom=false",       # (buildx's)
                       ctx, check=True).stdout.decode().strip()
    data = json.loads(pybuild("inspect", "flags", check=True).stdout)[0]
    assert data["Id"] == image_id
    # The command line's labels win over the Dockerfile's, and add no history (as BuildKit).
    assert data["Config"]["Labels"] == {"a": "cli", "keep": "1", "org.example.rev": "abc1",
                                        "empty": ""}
    assert [h["created_by"] for h in data["History"]][-2:] == [
        "LABEL a=dockerfile keep=1",
        "RUN /bin/sh -c cat /etc/hosts > /hosts && df -k /dev/shm | tail -1 > /shm"]
    image = store.resolve("flags")
    files = layer_files(store, image.layers[-1])
    hosts = files["hosts"].decode().splitlines()
    assert hosts[-3:] == ["10.1.2.3\tdb.local", "127.0.0.1\tgw", "fd00::1\tv6"]
    assert files["shm"].split()[1] == b"131072"          # KiB: --shm-size 128m, as Docker reads it

    # The hosts a RUN sees are part of its key; labels are not part of any step's.
    p = pybuild("-t", "flags2", "--progress", "plain", ctx, check=True)
    err = p.stderr.decode()
    assert "#2 CACHED" in err and "#3 CACHED" not in err
    image2 = store.resolve("flags2")
    assert "db.local" not in layer_files(store, image2.layers[-1])["hosts"].decode()
    assert layer_files(store, image2.layers[-1])["shm"].split()[1] == b"65536"   # Docker's 64m
    assert image2.config["config"]["Labels"] == {"a": "dockerfile", "keep": "1"}
    # Asked for attestations, pybuild says it makes none, and builds.
    p = pybuild("-t", "flags2", "--progress", "plain", "--provenance=mode=max", ctx, check=True)
    assert "WARNING: --provenance/--sbom/--attest: pybuild attaches no attestations" in \
        p.stderr.decode()
    # Classic docker build's --compress and --disable-content-trust, buildx's --allow,
    # --builder and --attest: accepted; what pybuild does not do is said.
    p = pybuild("-t", "flags2", "--progress", "plain", "--compress", "--disable-content-trust",
                "--allow", "network.host", "--attest", "type=sbom,disabled=true", ctx, check=True)
    assert "WARNING" not in p.stderr.decode()
    p = pybuild("-t", "flags2", "--progress", "plain", "--disable-content-trust=false",
                "--allow", "security.insecure", "--builder", "ci-builder", ctx, check=True)
    warnings = [line for line in p.stderr.decode().splitlines() if "WARNING" in line]
    assert len(warnings) == 3 and "content trust" in warnings[0], warnings
    assert "--allow security.insecure: not granted" in warnings[1] and "ci-builder" in warnings[2]
    # The classic builder's resource options are refused by name, with why; --isolation
    # default (Docker's only one on Linux) is accepted.
    assert_clean_error(pybuild("-t", "x", "--memory", "1g", ctx), 2,
                       "--memory (docker build's classic builder) is not supported",
                       "drop --memory")
    assert_clean_error(pybuild("-t", "x", "--squash", ctx), 2, "never squashed")
    pybuild("-q", "-t", "flags2", "--isolation", "default", ctx, check=True)
    # No abbreviations (Docker's CLI has none): --compres is not --compression.
    assert_clean_error(pybuild("-t", "x", "--compres", "gzip", ctx), 2, "unrecognized arguments")

    assert_clean_error(pybuild("-t", "x", "--platform", "linux/s390x" if host_architecture() !=
                               "s390x" else "linux/amd64", ctx), 2, "--platform linux/",
                       "images only")
    assert_clean_error(pybuild("-t", "x", "--add-host", "nocolon", ctx), 2, "--add-host 'nocolon'",
                       "NAME:ADDRESS")
    assert_clean_error(pybuild("-t", "x", "--add-host", "h:not-an-ip", ctx), 2, "NAME:ADDRESS")
    assert_clean_error(pybuild("-t", "x", "--shm-size", "lots", ctx), 2, "invalid size 'lots'")
    assert_clean_error(pybuild("-t", "x", "--no-cache-filter", "base,app", ctx), 3,
                       "--no-cache-filter stage 'base' not found (named stages: none)")
    assert_clean_error(pybuild("-t", "x", "--ssh", "default", ctx, env={"SSH_AUTH_SOCK": ""}), 2,
                       "--ssh default: SSH_AUTH_SOCK is not set", "ssh-agent")
    assert_clean_error(pybuild("-t", "x", "--ssh", f"default={tmp_path / 'none'}", ctx), 2,
                       "No such file")
    assert_clean_error(pybuild("-t", "x", "--ssh", f"key={ctx / 'Dockerfile'}", ctx), 2,
                       "is not an agent's socket")


def test_metadata_file_says_what_buildx_says(pybuild, tmp_path, base_image, store):
    """--metadata-file: the digests CI jobs read, under buildx's keys; a file in a directory
    that does not exist is refused before anything is built."""
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN echo hi > /hi\n"})
    meta, iid = tmp_path / "meta.json", tmp_path / "iid"
    pybuild("-q", "-t", "meta", "-t", "localhost:5000/team/app:v1", "--metadata-file", meta,
            "--iidfile", iid, ctx, check=True)
    image = store.resolve("meta")
    data = json.loads(meta.read_text())
    assert data["containerimage.config.digest"] == image.id == iid.read_text()
    assert data["containerimage.digest"] == image.digest
    descriptor = data["containerimage.descriptor"]
    assert descriptor["digest"] == image.digest
    assert descriptor["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert descriptor["size"] == len(store.blobs.read(image.digest))
    assert descriptor["annotations"]["config.digest"] == image.id
    assert data["image.name"] == "docker.io/library/meta:latest,localhost:5000/team/app:v1"

    missing = tmp_path / "no-such-dir" / "meta.json"
    for option in ("--metadata-file", "--iidfile"):
        p = pybuild("-t", "never", option, missing, ctx)
        assert_clean_error(p, 2, f"{option} {missing}: its directory does not exist")
        assert b"#2" not in p.stderr                   # (refused before the first step)
    with pytest.raises(ImageNotFound):
        store.resolve("never")


def test_annotations_go_on_the_manifest_and_leave_the_image_id(pybuild, tmp_path, base_image,
                                                               store):
    ctx = write_context(tmp_path / "ctx", {"Dockerfile": f"FROM {BASE}\nRUN echo a > /a\n"})
    plain = pybuild("-q", "-t", "annotated:plain", ctx, check=True).stdout.decode().strip()
    annotated = pybuild("-q", "-t", "annotated:yes", "--annotation",
                        "org.opencontainers.image.source=https://example.com/repo",
                        "--annotation", "manifest:org.example.empty=", ctx,
                        check=True).stdout.decode().strip()
    assert annotated == plain                           # the config, and so the ID, is the same
    a, p = store.resolve("annotated:yes"), store.resolve("annotated:plain")
    assert a.digest != p.digest
    manifest = json.loads(store.blobs.read(a.digest))
    assert manifest["annotations"] == {"org.opencontainers.image.source": "https://example.com/repo",
                                       "org.example.empty": ""}
    assert "annotations" not in json.loads(store.blobs.read(p.digest))
    assert_clean_error(pybuild("-t", "x", "--annotation", "index:k=v", ctx), 2,
                       "only manifest annotations are supported")
    assert_clean_error(pybuild("-t", "x", "--annotation", "novalue", ctx), 2, "expected KEY=VALUE")


def test_until_takes_durations_unix_and_rfc3339_times():
    import time
    from builder.cli_format import until_cutoff
    now = time.time()
    assert abs(now - 86400 - until_cutoff("24h")) < 5
    assert abs(now - 5400 - until_cutoff("1h30m")) < 5
    assert abs(now - 0.25 - until_cutoff("250ms")) < 5
    assert until_cutoff("1700000000") == 1700000000.0
    assert until_cutoff("2026-11-01T10:00:00Z") == until_cutoff("2026-11-01") + 36000
    from builder.errors import UsageError
    with pytest.raises(UsageError):
        until_cutoff("yesterday")
