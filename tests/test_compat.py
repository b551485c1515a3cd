"""Compatibility with Docker, case by case: testdata/compat/*/golden.json against pybuild's image.

Each golden was recorded from a real Docker engine by testdata/compat/record.py
(or written by hand from Docker's documentation where Docker 20.10's BuildKit
lacks the feature; case.json says so). The comparison, and what it
normalises and why, is in testdata/compat/golden.py.
"""

from __future__ import annotations

import json
import sys
import tarfile

import pytest

import builder
from conftest import TESTDATA, busybox_context, run_pybuild

COMPAT = TESTDATA / "compat"
sys.path.insert(0, str(COMPAT))
import golden  # noqa: E402

CASES = sorted(d.name for d in COMPAT.iterdir() if (d / "case.json").is_file())


def unpack(store_root: str, name: str, work) -> tuple[dict, dict]:
    saved = work / "image.tar"
    run_pybuild("save", name, "-o", saved, root=store_root, check=True)
    layout = work / "layout"
    with tarfile.open(saved) as t:
        t.extractall(layout, filter="tar")
    run = __import__("subprocess").run(["umoci", "unpack", "--image", f"{layout}:{name}",
                                        str(work / "bundle")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_text())
    return golden.listing(str(work / "bundle" / "rootfs")), config


@pytest.fixture(scope="module")
def compat_base(store_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("compat-base")
    ctx = busybox_context(work / "ctx")
    builder.build(str(ctx), tags=[golden.BASE_NAME], root=store_root)
    listing, config = unpack(store_root, golden.BASE_NAME, work)
    return listing, len(config["history"])


@pytest.mark.parametrize("name", CASES)
def test_same_image_as_docker(name, compat_base, store_root, tmp_path):
    case_dir = COMPAT / name
    case = golden.load_case(str(case_dir))
    expected = json.loads((case_dir / "golden.json").read_text())
    ctx, dockerfile = golden.prepare_context(str(case_dir), str(tmp_path))
    secrets = {k: v.encode() for k, v in case.get("secrets", {}).items()}
    tag = f"compat-{name}:test"
    builder.build(ctx, dockerfile=dockerfile, tags=[tag], root=store_root, no_cache=True,
                  build_args=case.get("build_args"), target=case.get("target"), secrets=secrets)
    base_listing, base_history = compat_base
    listing, config = unpack(store_root, tag, tmp_path)
    actual = {"rootfs": golden.delta(base_listing, listing), **golden.summarize(config, base_history)}
    diffs = golden.compare(expected, actual, ignore=case.get("ignore_golden_paths", {}))
    assert not diffs, f"{name} differs from Docker ({expected.get('recorded_with')}):\n" + \
        "\n".join(diffs)
