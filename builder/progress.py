"""Build events, and the plain renderer that turns them into CI-friendly log lines.

The library emits these typed events to the `on_event` callable of a build;
the CLI's renderers are just such callables. Each event has a `kind` and
`to_json()` so orchestrators can forward them as they are.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True, eq=False)
class Event:
    @property
    def kind(self) -> str:
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

    def to_json(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True, eq=False)
class BuildStarted(Event):
    dockerfile: str
    context: str
    steps: int


@dataclass(frozen=True, eq=False)
class StepStarted(Event):
    step: int                 # 1-based, across the stages being built
    total: int
    stage: str
    text: str                 # the instruction after expansion, as history shows it
    line: int


@dataclass(frozen=True, eq=False)
class StepCached(Event):
    step: int


@dataclass(frozen=True, eq=False)
class StepOutput(Event):
    step: int
    line: str


@dataclass(frozen=True, eq=False)
class StepDone(Event):
    step: int
    seconds: float
    cached: bool
    layer_size: int | None = None      # compressed bytes of the layer it added, if any


@dataclass(frozen=True, eq=False)
class BuildWarning(Event):
    message: str


@dataclass(frozen=True, eq=False)
class BuildDone(Event):
    image_id: str
    tags: tuple[str, ...]
    seconds: float
    steps_run: int
    steps_cached: int


class PlainRenderer:
    """`#3 [2/5] RUN make` ... `#3 DONE 2.3s`: one line per event, output lines prefixed."""

    def __init__(self, out=None, *, quiet: bool = False):
        self.out = out or sys.stderr
        self.quiet = quiet
        self.started = time.monotonic()

    def __call__(self, ev: Event) -> None:
        if self.quiet and not isinstance(ev, BuildWarning):
            return
        w = self.out.write
        if isinstance(ev, StepStarted):
            w(f"#{ev.step} [{ev.stage} {ev.step}/{ev.total}] {ev.text}\n")
        elif isinstance(ev, StepCached):
            w(f"#{ev.step} CACHED\n")
        elif isinstance(ev, StepOutput):
            w(f"#{ev.step} {ev.line}\n")
        elif isinstance(ev, StepDone) and not ev.cached:
            w(f"#{ev.step} DONE {_seconds(ev.seconds)}\n")
        elif isinstance(ev, BuildWarning):
            w(f"WARNING: {ev.message}\n")
        elif isinstance(ev, BuildDone):
            tags = ", ".join(ev.tags)
            w(f"built {ev.image_id[7:19]}{' as ' + tags if tags else ''} in {ev.seconds:.2f}s "
              f"({ev.steps_run} steps run, {ev.steps_cached} cached)\n")
        self.out.flush()


def _seconds(s: float) -> str:
    """BuildKit's `DONE 2.3s`, with milliseconds for the quick steps that are most steps."""
    return f"{s:.1f}s" if s >= 1 else f"{s:.3f}s"
