"""Build events, and the renderers that show them: plain lines, a live terminal view, JSON.

The library emits these typed events to the `on_event` callable of a build;
the CLI's renderers are such callables. Each event has a `kind` and
`to_json()`; `--progress json` writes exactly that, one object per line,
and docs/events.md documents every kind and field (a test holds the two
together). Renderers may be called from several threads (parallel stages)
and lock themselves.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, fields

from .record import record


@record(eq=False)
class Event:
    """Something a build reports to its `on_event` callable; `kind` names it in JSON."""
    @property
    def kind(self) -> str:
        name = type(self).__name__
        return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")

    def to_json(self) -> dict:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"kind": self.kind, **data}


@record(eq=False)
class BuildStarted(Event):
    """The build began: its Dockerfile, its context and how many steps it has."""
    dockerfile: str
    context: str
    steps: int


@record(eq=False)
class StepStarted(Event):
    """A step began (FROM included), with its instruction as history will show it."""
    step: int                 # 1-based, across the stages being built
    total: int
    stage: str
    text: str                 # the instruction after expansion, as history shows it
    line: int


@record(eq=False)
class StepCached(Event):
    """The step's result came from the step cache: nothing ran."""
    step: int


@record(eq=False)
class CacheMiss(Event):
    """A step will run: why its cache key found nothing (see explain.py)."""
    step: int
    reason: str
    details: tuple[str, ...] = ()


@record(eq=False)
class StepOutput(Event):
    """One line of a RUN step's output (stdout and stderr, in order)."""
    step: int
    line: str


@record(eq=False)
class StepDone(Event):
    """A step ended, cached or run, and how long it took."""
    step: int
    seconds: float
    cached: bool
    layer_size: int | None = None      # compressed bytes of the layer it added, if any


@record(eq=False)
class Transfer(Event):
    """A blob moving to or from a registry (pull, push): a few times a second while it moves
    (`done` false), then once when it has arrived (`done` true)."""
    action: str               # pull | push
    ref: str
    digest: str
    size: int                 # bytes moved so far
    total: int | None         # bytes expected, when the manifest says
    seconds: float            # since this blob started
    done: bool = True


@record(eq=False)
class BuildWarning(Event):
    """Something worth knowing that did not stop the build (an unused --build-arg)."""
    message: str


@record(eq=False)
class BuildDone(Event):
    """The image was stored: its ID, tags, and what the build ran and reused."""
    image_id: str
    tags: tuple[str, ...]
    seconds: float
    steps_run: int
    steps_cached: int
    size: int = 0                      # uncompressed bytes of the image's layers
    layers_added: int = 0              # layers on top of the target stage's base


EVENTS = (BuildStarted, StepStarted, StepCached, CacheMiss, StepOutput, StepDone, Transfer,
          BuildWarning, BuildDone)


_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
               "tuple[str, ...]": "array of string", "int | None": "integer or null"}


def schema() -> dict[str, dict[str, str]]:
    """kind -> field -> JSON type, as docs/events.md states it (a test compares the two)."""
    out = {}
    for cls in EVENTS:
        kind = Event.kind.fget(cls.__new__(cls))     # the kind without building an instance
        out[kind] = {f.name: _JSON_TYPES[str(f.type)] for f in fields(cls)}
    return out


# ---- what every human-readable renderer shows at the end --------------------------------

class _Summary:
    def __init__(self):
        self.started = time.monotonic()
        self.text: dict[int, str] = {}
        self.seconds: dict[int, float] = {}
        self.first_miss: CacheMiss | None = None

    def note(self, ev: Event) -> None:
        if isinstance(ev, StepStarted):
            self.text[ev.step] = ev.text
        elif isinstance(ev, StepDone) and not ev.cached:
            self.seconds[ev.step] = ev.seconds
        elif isinstance(ev, CacheMiss) and self.first_miss is None:
            self.first_miss = ev

    def lines(self, ev: BuildDone) -> list[str]:
        tags = ", ".join(ev.tags)
        out = [f"built {ev.image_id[7:19]}{' as ' + tags if tags else ''} in {ev.seconds:.2f}s: "
               f"{ev.steps_run} step{'s' if ev.steps_run != 1 else ''} run, {ev.steps_cached} "
               f"cached, {ev.layers_added} layer{'s' if ev.layers_added != 1 else ''} added, "
               f"{human_size(ev.size)}"]
        if self.first_miss is not None:
            m = self.first_miss
            out.append(f"first cache miss: #{m.step} {_short(self.text.get(m.step, ''), 40)}: "
                       f"{m.reason}")
        slow = sorted(self.seconds.items(), key=lambda kv: kv[1], reverse=True)[:5]
        if slow:
            out.append("slowest steps: " + ", ".join(
                f"#{n} {_short(self.text.get(n, ''), 40)} {_seconds(s)}" for n, s in slow))
        return out


def human_size(n: int) -> str:
    """Docker's sizes: decimal units, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n}B"


def transfer_line(ev: "Transfer") -> str:
    rate = ev.size / ev.seconds if ev.seconds > 0 else 0
    verb = "pulled" if ev.action == "pull" else "pushed"
    return (f"{verb} {ev.digest[7:19]} of {ev.ref}: {human_size(ev.size)} in {ev.seconds:.2f}s "
            f"({human_size(int(rate))}/s)")


def transfer_bar(ev: "Transfer", width: int = 24):
    """One line with a bar: `⇣ 1a2b3c4d5e6f [=======     ] 12.0MB/40.0MB 8.1MB/s`."""
    from rich.text import Text
    arrow = "⇣" if ev.action == "pull" else "⇡"
    rate = human_size(int(ev.size / ev.seconds)) + "/s" if ev.seconds > 0 else ""
    if ev.done:
        return Text.assemble((f"✔ {arrow} {ev.digest[7:19]} ", "green"),
                             f"{human_size(ev.size)} in {ev.seconds:.1f}s")
    filled = int(width * ev.size / ev.total) if ev.total else 0
    bar = "[" + "=" * filled + " " * (width - filled) + "]"
    of = f"/{human_size(ev.total)}" if ev.total else ""
    return Text.assemble((f"● {arrow} {ev.digest[7:19]} ", "yellow"), bar,
                         f" {human_size(ev.size)}{of} {rate}")


def _short(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def _seconds(s: float) -> str:
    """BuildKit's `DONE 2.3s`, with milliseconds for the quick steps that are most steps."""
    return f"{s:.1f}s" if s >= 1 else f"{s:.3f}s"


# ---- renderers -----------------------------------------------------------------------------

class PlainRenderer:
    """`#3 [stage 2/5] RUN make` ... `#3 DONE 2.3s`: one line per event, for CI logs."""

    def __init__(self, out=None, *, quiet: bool = False, explain: bool = False):
        self.out = out or sys.stderr
        self.quiet = quiet
        self.explain = explain
        self.summary = _Summary()
        self._lock = threading.Lock()

    def __call__(self, ev: Event) -> None:
        with self._lock:
            self.summary.note(ev)
            if self.quiet and not isinstance(ev, BuildWarning):
                return
            for line in self.lines(ev):
                self.out.write(line + "\n")
            self.out.flush()

    def lines(self, ev: Event) -> list[str]:
        if isinstance(ev, StepStarted):
            return [f"#{ev.step} [{ev.stage} {ev.step}/{ev.total}] {ev.text}"]
        if isinstance(ev, StepCached):
            return [f"#{ev.step} CACHED"]
        if isinstance(ev, CacheMiss):
            out = [f"#{ev.step} cache miss: {ev.reason}"]
            if self.explain:
                out += [f"#{ev.step}   {d}" for d in ev.details]
            return out
        if isinstance(ev, StepOutput):
            return [f"#{ev.step} {ev.line}"]
        if isinstance(ev, StepDone) and not ev.cached:
            return [f"#{ev.step} DONE {_seconds(ev.seconds)}"]
        if isinstance(ev, Transfer) and ev.done:
            return [transfer_line(ev)]
        if isinstance(ev, BuildWarning):
            return [f"WARNING: {ev.message}"]
        if isinstance(ev, BuildDone):
            return self.summary.lines(ev)
        return []


class JsonRenderer:
    """`--progress json`: every event as one JSON object per line (docs/events.md)."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self._lock = threading.Lock()

    def __call__(self, ev: Event) -> None:
        line = json.dumps(ev.to_json(), ensure_ascii=False)
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()


class TtyRenderer:
    """A live view (rich): running steps with a timer and their last output lines, finished steps
    folded to one line each, then the summary. Lines are cut, never wrapped, so a narrow or
    resized terminal does not garble the view."""

    TAIL = 5            # output lines shown under a running step
    FINISHED = 8        # finished steps kept on screen; older ones fold into a count

    def __init__(self, out=None, *, explain: bool = False):
        from rich.console import Console
        from rich.live import Live
        self.console = Console(file=out or sys.stderr, highlight=False)
        self.explain = explain
        self.summary = _Summary()
        self.steps: dict[int, dict] = {}
        self.order: list[int] = []
        self.warnings: list[str] = []
        self.transfers: dict[str, Transfer] = {}     # digest -> latest event
        self.total = 0
        self._lock = threading.RLock()
        self.live = Live(console=self.console, refresh_per_second=8, transient=False,
                         get_renderable=self._render)
        self.live.start()

    def __call__(self, ev: Event) -> None:
        with self._lock:
            self.summary.note(ev)
            if isinstance(ev, BuildStarted):
                self.total = ev.steps
            elif isinstance(ev, StepStarted):
                self.steps[ev.step] = {"text": f"[{ev.stage} {ev.step}/{ev.total}] {ev.text}",
                                       "start": time.monotonic(), "state": "running", "tail": [],
                                       "reason": ""}
                self.order.append(ev.step)
            elif isinstance(ev, CacheMiss) and ev.step in self.steps:
                self.steps[ev.step]["reason"] = ev.reason
                if self.explain:
                    self.steps[ev.step]["details"] = list(ev.details)
            elif isinstance(ev, StepOutput) and ev.step in self.steps:
                tail = self.steps[ev.step]["tail"]
                tail.append(ev.line)
                del tail[:-self.TAIL]
            elif isinstance(ev, StepDone) and ev.step in self.steps:
                step = self.steps[ev.step]
                step["state"] = "cached" if ev.cached else "done"
                step["seconds"] = ev.seconds
            elif isinstance(ev, BuildWarning):
                self.warnings.append(ev.message)
            elif isinstance(ev, Transfer):
                self.transfers[ev.digest] = ev
            elif isinstance(ev, BuildDone):
                self._stop_live()
                for line in self.summary.lines(ev):
                    self.console.print(line, overflow="ellipsis", no_wrap=True, soft_wrap=False)
                return
        self.live.refresh()

    def close(self) -> None:
        """Stop the live view (after an error, so the message is printed below it)."""
        with self._lock:
            if self.live.is_started:
                self._stop_live()

    def _stop_live(self) -> None:
        self.live.refresh()
        self.live.stop()
        if not self.console.is_terminal:
            # (rich ends its last frame with a newline on a terminal only: forced onto a file
            # or a pipe, the next line would run on from the last step's)
            self.console.line()

    def _render(self):
        from rich.text import Text
        from rich.console import Group
        with self._lock:
            lines: list[Text] = []
            finished = [n for n in self.order if self.steps[n]["state"] != "running"]
            folded = finished[:-self.FINISHED] if len(finished) > self.FINISHED else []
            done = len([n for n in self.order if self.steps[n]["state"] != "running"])
            if self.total or not self.transfers:
                lines.append(Text(f"pybuild: {done}/{self.total} steps, "
                                  f"{time.monotonic() - self.summary.started:.1f}s", style="bold"))
            lines += [transfer_bar(t) for t in self.transfers.values()]
            if folded:
                lines.append(Text(f"  … {len(folded)} earlier steps done", style="dim"))
            folded_set = set(folded)
            for n in self.order:
                if n in folded_set:
                    continue
                step = self.steps[n]
                # The status comes first: a narrow terminal cuts the end of the line.
                if step["state"] == "cached":
                    lines.append(Text.assemble(("✔ CACHED ", "cyan"), step["text"]))
                elif step["state"] == "done":
                    lines.append(Text.assemble((f"✔ {_seconds(step['seconds']):>6} ", "green"),
                                               step["text"]))
                else:
                    elapsed = time.monotonic() - step["start"]
                    lines.append(Text.assemble((f"● {elapsed:5.1f}s ", "yellow"), step["text"]))
                    if step["reason"]:
                        lines.append(Text(f"    cache miss: {step['reason']}", style="dim"))
                    for d in step.get("details", [])[1:]:
                        lines.append(Text(f"      {d}", style="dim"))
                    for out in step["tail"]:
                        lines.append(Text(f"    {out}", style="dim"))
            for w in self.warnings:
                lines.append(Text(f"WARNING: {w}", style="yellow"))
            for t in lines:
                t.no_wrap = True
                t.overflow = "ellipsis"
            return Group(*lines)


def make_renderer(mode: str, *, explain: bool = False, stream=None):
    """The renderer for `--progress MODE` (auto: tty on a terminal unless TERM=dumb, else plain)."""
    stream = stream or sys.stderr
    if mode == "auto":
        mode = "tty" if stream.isatty() and os.environ.get("TERM", "") not in ("dumb", "") \
            else "plain"
    if mode == "tty" and os.environ.get("TERM", "") == "dumb":
        mode = "plain"
    if mode == "tty":
        return TtyRenderer(stream, explain=explain)
    if mode == "json":
        return JsonRenderer(sys.stdout)
    return PlainRenderer(stream, quiet=mode == "quiet", explain=explain)
