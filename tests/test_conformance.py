"""BuildKit's own test vectors for the Dockerfile parser and the shell-word expander.

The vectors live in ../shared/conformance (copied from moby/buildkit as data);
every positive case must match BuildKit's AST dump, every negative case must
be rejected with a DockerfileError (never a traceback), and every Unix/all
case of the expander must give BuildKit's word.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.dockerfile import shell, syntax
from builder.errors import DockerfileError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "conformance"
VENDORED = Path(__file__).resolve().parents[1] / "testdata" / "conformance"
CONFORMANCE = SHARED if SHARED.is_dir() else VENDORED
PARSER = CONFORMANCE / "buildkit-parser"
SHELL = CONFORMANCE / "buildkit-shell"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "README.md"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/conformance beside this clone")
def test_vendored_copy_matches_the_shared_vectors():
    assert _files(VENDORED) == _files(SHARED), "refresh testdata/conformance from ../shared"


def _cases(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


@pytest.mark.parametrize("case", _cases(PARSER / "testfiles"))
def test_parser_matches_buildkit_dump(case):
    d = PARSER / "testfiles" / case
    text = (d / "Dockerfile").read_text(encoding="utf-8")
    expected = (d / "result").read_text(encoding="utf-8").splitlines()
    parsed = syntax.parse(text, filename=str(d / "Dockerfile"))
    got = ["(" + node.dump() + ")" for node in parsed.nodes]
    assert got == [line for line in expected if line.strip()]


@pytest.mark.parametrize("case", _cases(PARSER / "testfiles-negative"))
def test_parser_rejects_invalid_files(case):
    text = (PARSER / "testfiles-negative" / case / "Dockerfile").read_text(encoding="utf-8")
    from builder.dockerfile import instructions
    with pytest.raises(DockerfileError) as err:
        instructions.load(text, filename="Dockerfile")
    assert "Dockerfile" in str(err.value)


def _env_var_cases():
    out = []
    for n, line in enumerate((SHELL / "envVarTest").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        platform, rest = line.split("|", 1)
        if platform.strip() == "W":
            continue
        source, expected = rest.rsplit("|", 1)
        out.append(pytest.param(source.strip(), expected.strip(), id=f"line{n}"))
    return out


ENV_VAR_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


@pytest.mark.parametrize("source,expected", _env_var_cases() if SHELL.is_dir() else [])
def test_expansion_matches_buildkit(source, expected):
    if expected == "error":
        with pytest.raises(shell.ExpansionError):
            shell.expand_word(source, ENV_VAR_ENV)
    else:
        assert shell.expand_word(source, ENV_VAR_ENV) == expected


def _words_cases():
    out = []
    env: dict[str, str] = {}
    for n, line in enumerate((SHELL / "wordsTest").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("ENV "):
            name, _, value = line[4:].partition("=")
            env = {**env, name: value}
            continue
        source, expected = line.split("|", 1)
        # As BuildKit's own test: the expected words keep their trailing blanks.
        out.append(pytest.param(source.strip(), expected.lstrip(" "), dict(env), id=f"line{n}"))
    return out


@pytest.mark.parametrize("source,expected,env", _words_cases() if SHELL.is_dir() else [])
def test_word_splitting_matches_buildkit(source, expected, env):
    if expected == "error":
        with pytest.raises(shell.ExpansionError):
            shell.expand_words(source, env)
    else:
        assert shell.expand_words(source, env) == expected.split(",")
