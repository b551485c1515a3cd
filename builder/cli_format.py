"""How the command line shows things: Docker's tables, times, and `--format` templates.

`--format` takes the part of Go's text/template that Docker users write:
`{{.Field}}`, `{{.A.B}}`, `{{json .A}}`, `{{index .A 0}}` or `{{index .A "key"}}`,
and the `table` prefix (a header row, columns separated by `\\t`, aligned as
`docker ps` aligns them). Any other action is an error, not text printed as
it was written.
"""

from __future__ import annotations

import json
import re
import time

from .errors import UsageError



def duration(seconds: float) -> str:
    """Docker's HumanDuration: `Less than a second`, `5 seconds`, `About a minute`, `3 hours`."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def _rfc3339(text: str):
    """An RFC 3339 timestamp (nanoseconds and all) as an aware datetime; None if it is not
    one."""
    import datetime      # (here: `build` never shows a time, and never imports it)
    text = text.replace("Z", "+00:00")
    if "." in text:       # nanoseconds: Python reads at most microseconds
        head, _, rest = text.partition(".")
        digits = re.match(r"\d*", rest).group(0)
        text = head + "." + digits[:6].ljust(6, "0") + rest[len(digits):]
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def ago(when: float | str) -> str:
    """`3 minutes ago` for a Unix time or an RFC 3339 timestamp."""
    if isinstance(when, str):
        parsed = _rfc3339(when)
        if parsed is None:
            return "N/A"
        when = parsed.timestamp()
    return duration(time.time() - when) + " ago"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def until_cutoff(value: str) -> float:
    """`--filter until=VALUE` as Docker takes it: a Go duration before now (`24h`, `1h30m`),
    a Unix time, or an RFC 3339 time; the Unix time it means."""
    text = value.strip()
    if re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        return time.time() - sum(float(n) * _SECONDS[u] for n, u in _DURATION.findall(text))
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parsed = _rfc3339(text if "T" in text or ":" in text else text + "T00:00:00Z")
    if parsed is None:
        raise UsageError(f"until={value}: not a duration (24h), a Unix time or an RFC 3339 "
                         "time")
    if parsed.tzinfo is None:
        import datetime
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed.timestamp()


def prune_cutoff(filters: list[str]) -> float | None:
    """The Unix time of `--filter until=...` (the earliest if several), None without one; any
    other filter is refused: ignoring it would remove more than was asked."""
    cutoff = None
    for f in filters:
        key, eq, value = f.partition("=")
        if key != "until" or not eq:
            raise UsageError(f"--filter {f}: pybuild's prune takes until=WHEN only",
                             hint="until=24h, until=2026-11-01T00:00:00Z")
        t = until_cutoff(value)
        cutoff = t if cutoff is None else min(cutoff, t)
    return cutoff


def docker_time(created: str) -> str:
    """An RFC 3339 time as Docker's templates print one: `2026-11-26 15:45:06 +0000 UTC`."""
    import datetime
    parsed = _rfc3339(created)
    if parsed is None:
        return created
    return parsed.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart, as Docker prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip()
                     for r in rows)


def _lookup(obj, path: str):
    for part in [p for p in path.split(".") if p]:
        if isinstance(obj, dict):
            obj = obj.get(part)
        else:
            obj = getattr(obj, part, None)
    return obj


_ACTION = re.compile(r"\{\{(.*?)\}\}")
_WORD = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


def render(template: str, obj) -> str:
    """One object through a `--format` template."""
    def action(m: re.Match) -> str:
        verb, words = _parse_action(m)
        if not words or not words[0].startswith(".") or (verb != "index" and len(words) > 1) \
                or (verb == "index" and len(words) < 2):
            raise UsageError(f"--format: {m.group(0)} is not something pybuild's templates do",
                             hint="{{.Field}}, {{.A.B}}, {{json .A}}, {{index .A 0}} or "
                                  "{{index .A \"key\"}}")
        value = _lookup(obj, words[0][1:])
        if verb == "index":
            for key in words[1:]:
                value = _index(value, key, m.group(0))
            if value is None:
                return ""                # (Go's zero value: a label an image does not have)
        if verb == "json" or isinstance(value, (dict, list)):
            return json.dumps(value)
        return "<no value>" if value is None else str(value)
    return _ACTION.sub(action, template.replace("\\t", "\t").replace("\\n", "\n"))


def _index(value, key: str, action: str):
    """Go's `index`: a list by position, a map by key (a key it lacks gives nothing)."""
    if key.startswith('"'):
        return value.get(json.loads(key)) if isinstance(value, dict) else None
    try:
        return value[int(key)]
    except (ValueError, TypeError, IndexError):
        raise UsageError(f"--format: {action}: no item {key} in {json.dumps(value)}") from None


def render_all(template: str, objects: list, headers: dict[str, str]) -> str:
    """Every object through the template; with `table`, a header row and aligned columns.
    `headers` names the column of each field (`ID` -> `CONTAINER ID`)."""
    if template.strip() == "json":           # (Docker 23's: each object as a JSON line)
        template = "{{json .}}"
    if not template.startswith("table"):
        return "\n".join(render(template, o) for o in objects)
    body = template[len("table"):].strip() or "\t".join("{{." + k + "}}" for k in headers)
    head = _ACTION.sub(lambda m: _header(m, headers), body.replace("\\t", "\t"))
    rows = [head.split("\t")] + [render(body, o).split("\t") for o in objects]
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    return table(rows)


def listing(rows: list[dict], headers: dict[str, str], columns: list[str],
            template: str | None = None) -> str:
    """A list command's output (images, history, ps): `rows` through the --format `template`
    if one is given, else a table of `columns`, titled as `headers` names them."""
    if template:
        return render_all(template, rows, headers)
    return table([[headers[c] for c in columns]] + [[r[c] for c in columns] for r in rows])


def refuse_terminal(hint: str) -> None:
    """An archive is not written to a terminal (save, export, cp ... -), as Docker refuses."""
    import sys
    if sys.stdout.isatty():
        raise UsageError("refusing to write an archive to a terminal", hint=hint)


def _parse_action(m: re.Match) -> tuple[str | None, list[str]]:
    """An action's verb (json, index, or None) and its other words."""
    words = _WORD.findall(m.group(1))
    return (words.pop(0) if words and words[0] in ("json", "index") else None), words


def _header(m: re.Match, headers: dict[str, str]) -> str:
    """A table column's title: the field an action shows, as `headers` names it."""
    words = _parse_action(m)[1]
    name = words[0][1:] if words and words[0].startswith(".") else m.group(1).strip()
    return headers.get(name, name.upper())


def parse_size(text: str, binary: bool = False) -> int:
    """`500MB`, `2GB`, `1.5g`, `1024` (bytes): Docker's units, decimal and binary (`binary`:
    k, m and g are 1024-based, as Docker reads memory sizes such as --shm-size)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="for example 500MB or 2GB")
    base = 1024 if m.group(3) or binary else 1000
    power = " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * base ** power)
