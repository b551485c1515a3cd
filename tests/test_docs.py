"""The documentation tells the truth: generated parts match the code, and what it shows runs.

* docs/cli.md is what the argument parser says (`make docs` regenerates it);
* every `sh` and `python` block of README.md and docs/*.md runs, in a copy of
  the repository's files, with `pybuild` on the PATH and the `busybox:demo`
  base in the store. `make ...` lines are left out: `make test` is what runs
  this test, and CI runs `make demo` itself before `make test` (.ci/run).
  What a block puts in /tmp (and `mktemp`) goes to the test's own temp dir,
  so that running the suite leaves nothing behind there;
* every error shown in docs/troubleshooting.md is what pybuild prints for
  the Dockerfile and command shown with it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BASE, REPO, run_pybuild

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M)


def test_cli_reference_is_generated_from_the_parser():
    from builder.cli import reference_markdown
    assert (REPO / "docs/cli.md").read_text() == reference_markdown(), \
        "docs/cli.md has drifted from the parser: run `make docs`"


@pytest.fixture
def demo_base(base_image, pybuild):
    pybuild("tag", BASE, "busybox:demo", check=True)


@pytest.fixture
def sandbox(tmp_path):
    """A copy of the repository's files a reader would have (not the venv, not git)."""
    root = tmp_path / "repo"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns(".venv", ".git", "build",
                                                              "__pycache__", ".pytest_cache"))
    return root


RUNNABLE = [(doc, i, lang, text) for doc in DOCUMENTS for i, (lang, text) in enumerate(blocks(doc))
            if lang in ("sh", "python")]


@pytest.mark.parametrize("doc,index,lang,text", RUNNABLE,
                         ids=[f"{d.name}-{i}" for d, i, _, _ in RUNNABLE])
def test_shown_commands_run(doc, index, lang, text, sandbox, demo_base, store_root, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, PYBUILD_ROOT=store_root, TMPDIR=str(scratch),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    text = re.sub(r"(?<![\w/.])/tmp(?=/|\s|$)", str(scratch), text)
    if lang == "python":
        cmd = [sys.executable, "-c", text]
    else:
        lines = [ln for ln in text.splitlines() if not ln.strip().startswith("make ")]
        if not any(ln.strip() for ln in lines):
            pytest.skip("only make targets (run by CI itself)")
        cmd = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
    p = subprocess.run(cmd, cwd=sandbox, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{doc.name} block {index} failed:\n{text}\n---\n{p.stderr[-3000:]}"


def troubleshooting_cases() -> list[tuple[str, str | None, str, list[str]]]:
    """(title, Dockerfile or None, command, expected error lines) of docs/troubleshooting.md."""
    out = []
    for section in re.split(r"^### ", (REPO / "docs/troubleshooting.md").read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0]
        dockerfile = re.search(r"```dockerfile\n(.*?)```", section, re.S)
        shown = re.search(r"```text\n\$ (pybuild .*?)\n(.*?)```", section, re.S)
        if not shown:
            continue
        expected = [ln for ln in shown.group(2).splitlines() if ln.strip()]
        out.append((title, dockerfile.group(1) if dockerfile else None, shown.group(1), expected))
    return out


@pytest.mark.parametrize("title,dockerfile,command,expected", troubleshooting_cases(),
                         ids=[c[0] for c in troubleshooting_cases()])
def test_troubleshooting_messages_are_real(title, dockerfile, command, expected, tmp_path,
                                           demo_base, store_root):
    if dockerfile is not None:
        (tmp_path / "Dockerfile").write_text(dockerfile)
    args = command.split()[1:]
    p = run_pybuild(*args, root=store_root, cwd=tmp_path)
    err = p.stderr.decode().splitlines()
    start = next(i for i, ln in enumerate(err) if ln.startswith("error: "))
    assert err[start:] == expected, f"{title}: pybuild now says\n" + "\n".join(err[start:])
    assert p.returncode != 0
