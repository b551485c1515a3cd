#!/usr/bin/env python3
"""Record the compat goldens from a real Docker engine.

    DOCKER_HOST=unix:///run/docker.sock python3 testdata/compat/record.py [CASE...]

Needs, as root: a running dockerd (Debian's docker.io 20.10 was used: its
BuildKit builds every case that does not say "hand_written" in case.json),
skopeo, umoci, and pybuild's venv (to build the busybox base image FROM
scratch, which is then `docker load`ed so both builders start from the same
image). Each golden is written to CASE/golden.json; hand-written cases
(features newer than Docker 20.10's BuildKit) are left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import golden  # noqa: E402


def sh(*args, **kw) -> str:
    p = subprocess.run(args, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def unpack(image_tar: str, work: str, transport: str) -> tuple[dict, dict]:
    """(rootfs listing, config) of a `docker save` archive.

    The rootfs goes through skopeo (to an OCI layout) and umoci; the config is
    read from the archive itself, since the OCI conversion drops Docker-only
    fields (Healthcheck, Shell, OnBuild).
    """
    layout = os.path.join(work, "oci")
    sh("skopeo", "copy", "--quiet", f"{transport}:{image_tar}", f"oci:{layout}:img")
    sh("umoci", "unpack", "--image", f"{layout}:img", os.path.join(work, "bundle"))
    with tarfile.open(image_tar) as t:
        manifest = json.load(t.extractfile("manifest.json"))
        config = json.load(t.extractfile(manifest[0]["Config"]))
    return golden.listing(os.path.join(work, "bundle", "rootfs")), config


def base_image(docker: str, tmp: str) -> tuple[dict, int]:
    """Build busybox:compat with pybuild, load it into Docker; its listing and history length."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import busybox_context
    from pathlib import Path
    ctx = busybox_context(Path(tmp) / "busybox")
    store = os.path.join(tmp, "store")
    pybuild = [sys.executable, "-m", "builder", "--root", store]
    sh(*pybuild, "build", "-q", "-t", golden.BASE_NAME, str(ctx), cwd=REPO)
    saved = os.path.join(tmp, "base.tar")
    sh(*pybuild, "save", golden.BASE_NAME, "-o", saved, cwd=REPO)
    sh(docker, "load", "-i", saved)
    work = os.path.join(tmp, "base-unpack")
    os.makedirs(work)
    listing, config = unpack(saved, work, "docker-archive")
    return listing, len(config.get("history") or [])


def record(docker: str, name: str, base_listing: dict, base_history: int, tmp: str) -> None:
    case_dir = os.path.join(HERE, name)
    case = golden.load_case(case_dir)
    work = os.path.join(tmp, name)
    os.makedirs(work)
    ctx, dockerfile = golden.prepare_context(case_dir, work)
    cmd = [docker, "build", "-q", "-t", f"compat-{name}:golden", "-f", dockerfile]
    for k, v in case.get("build_args", {}).items():
        cmd += ["--build-arg", f"{k}={v}"]
    if case.get("target"):
        cmd += ["--target", case["target"]]
    for ident, value in case.get("secrets", {}).items():
        path = os.path.join(work, f"secret-{ident}")
        with open(path, "w") as f:
            f.write(value)
        cmd += ["--secret", f"id={ident},src={path}"]
    sh(*cmd, ctx, env=dict(os.environ, DOCKER_BUILDKIT="1"))
    saved = os.path.join(work, "image.tar")
    sh(docker, "save", "-o", saved, f"compat-{name}:golden")
    listing, config = unpack(saved, work, "docker-archive")
    summary = golden.summarize(config, base_history)
    version = sh(docker, "version", "--format", "{{.Server.Version}}").strip()
    out = {"recorded_with": f"docker {version} (BuildKit, DOCKER_BUILDKIT=1)",
           "rootfs": golden.delta(base_listing, listing), **summary}
    with open(os.path.join(case_dir, "golden.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"recorded {name}: {len(out['rootfs'])} paths, {len(out['history'])} history entries")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--docker", default="/usr/bin/docker")
    args = ap.parse_args()
    names = args.cases or sorted(d for d in os.listdir(HERE)
                                 if os.path.isfile(os.path.join(HERE, d, "case.json")))
    with tempfile.TemporaryDirectory() as tmp:
        base_listing, base_history = base_image(args.docker, tmp)
        for name in names:
            if golden.load_case(os.path.join(HERE, name)).get("hand_written"):
                print(f"skipped {name}: hand-written golden")
                continue
            record(args.docker, name, base_listing, base_history, tmp)


if __name__ == "__main__":
    main()
