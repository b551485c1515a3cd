"""--chmod values (builder/filemode.py): symbolic modes mean what chmod(1) makes of them."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from builder import filemode

SYMBOLIC = ["+x", "u+x", "a+rX,go-w", "g=u", "u=rwX,go=rX", "go-rwx", "u+s", "g+s", "+t", "o=",
            "u=rw,g=r,o=", "a-x", "ug+rw", "o+X", "=rx", "u+x,g+X", "a=rwx,u-w", "u-w+x"]


@pytest.mark.parametrize("is_dir", [False, True])
def test_symbolic_modes_match_chmod(tmp_path, is_dir):
    """The real chmod (coreutils, umask 0) on a file or directory gives the same bits.

    One known difference is left out: chmod keeps a directory's set-ID bits under `=`,
    BuildKit's mode library (BSD's rules) clears them, and so does pybuild."""
    old_umask = os.umask(0)
    try:
        for start in (0o644, 0o755, 0o600, 0o000, 0o1777, 0o640, 0o710, 0o4711):
            for value in SYMBOLIC:
                if is_dir and start & 0o6000 and "=" in value:
                    continue
                path = tmp_path / f"e{start:o}{value.replace('/', '')}"
                path.mkdir() if is_dir else path.touch()
                os.chmod(path, start)
                subprocess.run(["chmod", value, str(path)], check=True)
                want = stat.S_IMODE(os.stat(path).st_mode)
                assert filemode.apply(filemode.parse(value), start, is_dir) == want, (oct(start), value)
    finally:
        os.umask(old_umask)


def test_octal_replaces_and_nonsense_is_refused():
    assert filemode.parse("0755") == 0o755 and filemode.apply(0o755, 0o4600, False) == 0o755
    for bad in ("", ",", "q+r", "u", "u+ug", "8", "17777", "u+z", "+x,"):
        with pytest.raises(ValueError):
            filemode.parse(bad)
