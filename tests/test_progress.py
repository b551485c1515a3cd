"""What a build shows: the live terminal view, plain CI lines, JSON events, quiet."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import sys
import termios
from pathlib import Path


from conftest import run_pybuild

DOCS = Path(__file__).resolve().parents[1] / "docs"


def on_terminal(args: list[str], root: str, columns: int = 100, lines: int = 40) -> list[str]:
    """Run pybuild under a pseudo-terminal and return the screen as a terminal shows it."""
    import pyte
    pid, fd = pty.fork()
    if pid == 0:
        os.environ.update(TERM="xterm-256color", PYBUILD_ROOT=root)
        os.execv(sys.executable, [sys.executable, "-m", "builder", *map(str, args)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    screen = pyte.Screen(columns, lines)
    stream = pyte.ByteStream(screen)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        stream.feed(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return [line.rstrip() for line in screen.display if line.strip()]


def test_live_view_on_a_terminal(demo_ctx, store_root):
    first = on_terminal(["-t", "tty-demo", "--no-cache", demo_ctx], store_root)
    text = "\n".join(first)
    assert "pybuild: 10/10 steps" in text
    assert re.search(r"✔ +\d\.\d{3}s \[stage-0 6/10\] RUN ", text), text
    assert re.search(r"built [0-9a-f]{12} as tty-demo:latest in .*9 steps run, 0 cached", text)
    assert "slowest steps:" in text and "first cache miss: #2 LABEL" in text
    again = "\n".join(on_terminal(["-t", "tty-demo", demo_ctx], store_root))
    assert "✔ CACHED [stage-0 5/10] COPY --chown=app:app app/ /app/" in again
    assert re.search(r"0 steps run, 9 cached", again)


def test_narrow_terminal_cuts_lines_instead_of_wrapping(demo_ctx, store_root):
    screen = on_terminal(["-t", "tty-narrow", demo_ctx], store_root, columns=40)
    assert all(len(line) <= 40 for line in screen)
    steps = [line for line in screen if line.startswith("✔")]
    assert len(steps) >= 8 and all("…" in line or len(line) <= 40 for line in steps)


def test_piped_output_is_plain_lines(demo_ctx, store_root):
    p = run_pybuild("-t", "plain-demo", "--no-cache", demo_ctx, root=store_root, check=True)
    err = p.stderr.decode()
    assert "#6 [stage-0 6/10] RUN |1 GREETING_WORD=hello /bin/sh -c" in err
    assert re.search(r"^#6 cache miss: --no-cache$", err, re.M)
    assert re.search(r"^#6 DONE \d+\.\d+s$", err, re.M)
    assert "\x1b[" not in err, "no terminal escapes in a log"
    assert p.stdout.decode().startswith("sha256:")


def test_dumb_terminal_falls_back_to_plain(demo_ctx, store_root):
    p = run_pybuild("-t", "dumb", "--progress", "tty", demo_ctx, root=store_root, env={"TERM": "dumb"},
                    check=True)
    assert re.search(r"^#5 \[stage-0 5/10\] COPY", p.stderr.decode(), re.M)


def test_tty_progress_asked_for_on_a_pipe_ends_its_view_before_the_summary(demo_ctx, store_root):
    """--progress tty into a file (a CI log that asked for it): the last frame, then the
    summary on lines of their own."""
    p = run_pybuild("-t", "tty-pipe", "--no-cache", "--progress", "tty", demo_ctx,
                    root=store_root, env={"TERM": "xterm"}, check=True)
    lines = p.stderr.decode().splitlines()
    built = [i for i, line in enumerate(lines) if line.startswith("built ")]
    assert len(built) == 1, lines
    assert lines[built[0] - 1].startswith("✔ ") and "steps run" in lines[built[0]]


def test_quiet_prints_only_the_image_id(demo_ctx, store_root):
    p = run_pybuild("-q", "-t", "quiet", demo_ctx, root=store_root, check=True)
    assert p.stderr == b"" and re.fullmatch(rb"sha256:[0-9a-f]{64}\n", p.stdout)


def documented_schema() -> dict:
    text = (DOCS / "events.md").read_text()
    block = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    return json.loads(block)


def test_documented_schema_is_the_code(tmp_path):
    from builder import progress
    assert documented_schema() == progress.schema(), "docs/events.md has drifted from the events"


_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def _valid(value, kind: str) -> bool:
    if kind == "array of string":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "integer or null":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    expected = _TYPES[kind]
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def test_json_events_validate_against_the_documented_schema(demo_ctx, store_root):
    schema = documented_schema()
    p = run_pybuild("--progress", "json", "-t", "json-demo", "--no-cache", demo_ctx, root=store_root,
                    check=True)
    events = [json.loads(line) for line in p.stdout.decode().splitlines()]
    assert events[0]["kind"] == "build_started" and events[-1]["kind"] == "build_done"
    kinds = {e["kind"] for e in events}
    assert {"step_started", "cache_miss", "step_done"} <= kinds
    for e in events:
        fields = schema[e["kind"]]
        assert set(e) == {"kind", *fields}, e
        for name, kind in fields.items():
            assert _valid(e[name], kind), (name, kind, e)
    assert p.stderr == b""
