"""Dockerfile syntax: text -> a list of raw instruction nodes with line ranges.

This follows the rules of BuildKit's parser (the reference implementation of
the language), because users' Dockerfiles are written against it:

* parser directives (``# escape=`` and ``# syntax=``) only at the very top;
* a line ending in the escape character (optionally followed by blanks)
  continues on the next line; comment lines and empty lines inside a
  continuation are skipped; the first line of an instruction is left-trimmed,
  continuation lines are not;
* ``--flag`` words directly after the keyword are the instruction's flags;
* arguments are split per keyword: JSON (exec) form, whitespace lists,
  ``name=value`` pairs, or the raw rest of the line.

Why not ``dockerfile-parse``: measured on BuildKit's own test vectors
(``../shared/conformance/buildkit-parser``) it mis-splits comments inside
continuations, a continuation at end of file and the escape directive, and it
accepts all four invalid files; here the vectors decide, so the splitting is
ours. Nothing in this module does I/O beyond being handed the text.
"""

from __future__ import annotations

import json
import re
from dataclasses import field

from ..record import record
from ..errors import DockerfileError

_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_WHITESPACE = re.compile(r"[\t\v\f\r ]+")
_KNOWN_DIRECTIVES = ("escape", "syntax", "check")


@record
class Node:
    """One parsed instruction, before any meaning is given to it.

    ``args`` is a tuple of strings, except for key/value instructions (ENV,
    LABEL), whose args are ``(key, value, sep)`` triples flattened, and
    ONBUILD, whose single child is ``child``.
    """

    keyword: str            # lower case, as BuildKit's dump shows it
    original: str           # the logical line, continuations joined
    args: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    json: bool = False      # exec form
    start_line: int = 0
    end_line: int = 0
    child: "Node | None" = None
    heredocs: tuple = ()

    def dump(self) -> str:
        """BuildKit's AST dump form: ``run ["--flag"] "arg" ...``."""
        out = self.keyword
        if self.flags:
            out += " [" + " ".join(go_quote(f) for f in self.flags) + "]"
        if self.child is not None:
            out += " (" + self.child.dump() + ")"
        for a in self.args:
            out += " " + go_quote(a)
        return out.strip()


@record(frozen=False)
class Directives:
    """The parser directives at the top of a Dockerfile (escape, syntax)."""
    escape: str = "\\"
    syntax: str | None = None
    seen: dict = field(default_factory=dict)


@record
class ParsedFile:
    """A Dockerfile's lines as nodes, before instructions are made of them."""
    nodes: tuple[Node, ...]
    directives: Directives
    warnings: tuple[str, ...] = ()


def go_quote(s: str) -> str:
    """Quote like Go's strconv.Quote, so dumps compare byte for byte."""
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\v": "\\v"}


def _is_comment(line: str) -> bool:
    return line.lstrip(" \t").startswith("#")


def parse(text: str, *, filename: str = "Dockerfile") -> ParsedFile:
    """Split Dockerfile text into instruction nodes (syntax only)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]

    directives = Directives()
    i = 0
    # Directives: only at the top, before any other line (even a blank one).
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if not m:
            break
        name, value = m.group(1).lower(), m.group(2)
        if name not in _KNOWN_DIRECTIVES:
            break
        if name in directives.seen:
            raise DockerfileError(f"only one {name} parser directive can be used",
                                  file=filename, line=i + 1)
        directives.seen[name] = value
        if name == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"invalid escape token {value!r} does not match ` or \\",
                                      file=filename, line=i + 1)
            directives.escape = value
        elif name == "syntax":
            directives.syntax = value
        i += 1

    esc = directives.escape

    def trim_continuation(s: str) -> tuple[str, bool]:
        # An escape character ends the line (blanks may follow) and is not
        # itself escaped: an odd run of them continues, an even run does not.
        body = s.rstrip(" \t")
        run = len(body) - len(body.rstrip(esc))
        if run % 2 == 1:
            return body[:-1], False
        return s, True

    nodes: list[Node] = []
    n = len(lines)
    while i < n:
        raw = lines[i]
        i += 1
        start = i
        if _is_comment(raw):
            continue
        line, complete = trim_continuation(raw.lstrip(" \t"))
        if complete and line.strip() == "":
            continue
        while not complete and i < n:
            nxt = lines[i]
            i += 1
            if _is_comment(nxt):
                continue
            if nxt.strip(" \t") == "":
                continue
            part, complete = trim_continuation(nxt)
            line += part
        if line.strip() == "":
            continue
        node, heredoc_lines_needed = _node_from_line(line, directives, filename, start)
        heredocs = ()
        if heredoc_lines_needed:
            heredocs, i = _read_heredocs(heredoc_lines_needed, lines, i, filename, start)
        nodes.append(_with_lines(node, start, i, heredocs))

    if not nodes:
        raise DockerfileError("the file has no instructions", file=filename,
                              hint="a Dockerfile starts with FROM (or ARG then FROM)")
    return ParsedFile(tuple(nodes), directives)


def _with_lines(node: Node, start: int, end: int, heredocs: tuple) -> Node:
    return Node(node.keyword, node.original, node.args, node.flags, node.json, start, end,
                node.child, heredocs)


# Heredocs (`RUN <<EOF`) are recognised so that their bodies are never parsed
# as instructions; what they mean is decided by the instruction layer.
_HEREDOC = re.compile(r"^<<(-?)([\"']?)([^\s\"'<>|&;]+)\2$")
_HEREDOC_KEYWORDS = ("run", "copy", "add")


def _read_heredocs(names, lines, i, filename, start):
    docs = []
    for strip_tabs, quoted, name in names:
        body = []
        while True:
            if i >= len(lines):
                raise DockerfileError(f"unterminated heredoc <<{name}", file=filename, line=start)
            ln = lines[i]
            i += 1
            if (ln.lstrip("\t") if strip_tabs else ln) == name:
                break
            body.append(ln + "\n")     # raw: `<<-` tab stripping is the instruction's business
        docs.append((name, "".join(body), bool(quoted), strip_tabs))
    return tuple(docs), i


def _node_from_line(line: str, d: Directives, filename: str, lineno: int):
    parts = _WHITESPACE.split(line.strip(), maxsplit=1)
    keyword = parts[0].lower()
    rest = parts[1] if len(parts) > 1 else ""
    flags: list[str] = []
    if rest:
        rest, flags = extract_flags(rest)
    try:
        args, is_json, child = _ARG_PARSERS.get(keyword, _parse_ignore)(rest, d, filename, lineno)
    except DockerfileError:
        raise
    except ValueError as e:
        raise DockerfileError(f"{keyword.upper()}: {e}", file=filename, line=lineno) from None
    heredocs = []
    if keyword in _HEREDOC_KEYWORDS and not is_json and "<<" in rest:
        # A heredoc marker is a word of its own: `RUN <<EOF`, `RUN cat <<-"EOT" > f`.
        for word in parse_words(rest, d.escape):
            m = _HEREDOC.match(word)
            if m:
                heredocs.append((m.group(1) == "-", m.group(2), m.group(3)))
    return Node(keyword, line, tuple(args), tuple(flags), is_json, child=child), heredocs


def extract_flags(line: str) -> tuple[str, list[str]]:
    """Leading ``--name=value`` words, with BuildKit's quoting; ``--`` ends them."""
    words: list[str] = []
    word = ""
    phase = "spaces"
    quote = ""
    blank_ok = False
    pos = 0
    n = len(line)
    while pos <= n:
        ch = line[pos] if pos < n else ""
        if phase == "spaces":
            if pos == n:
                break
            if ch.isspace():
                pos += 1
                continue
            if ch != "-" or pos + 1 == n or line[pos + 1] != "-":
                return line[pos:], words
            phase = "word"
        if phase in ("word", "quote") and pos == n:
            if word != "--" and (blank_ok or word):
                words.append(word)
            break
        if phase == "word":
            if ch.isspace():
                phase = "spaces"
                if word == "--":
                    return line[pos:].lstrip(), words
                if blank_ok or word:
                    words.append(word)
                word = ""
                blank_ok = False
                pos += 1
                continue
            if ch in "'\"":
                quote = ch
                blank_ok = True
                phase = "quote"
                pos += 1
                continue
            if ch == "\\":
                if pos + 1 == n:
                    pos += 1
                    continue
                pos += 1
                ch = line[pos]
            word += ch
            pos += 1
            continue
        # in quote
        if ch == quote:
            phase = "word"
            pos += 1
            continue
        if ch == "\\":
            if pos + 1 == n:
                phase = "word"
                pos += 1
                continue
            pos += 1
            ch = line[pos]
        word += ch
        pos += 1
    return "", words


def parse_words(rest: str, escape: str) -> list[str]:
    """Split on blanks, keeping quotes and escapes in the words (BuildKit's parseWords)."""
    words: list[str] = []
    phase = "spaces"
    word = ""
    quote = ""
    blank_ok = False
    pos = 0
    n = len(rest)
    while pos <= n:
        ch = rest[pos] if pos < n else ""
        if phase == "spaces":
            if pos == n:
                break
            if ch.isspace():
                pos += 1
                continue
            phase = "word"
        if phase in ("word", "quote") and pos == n:
            if blank_ok or word:
                words.append(word)
            break
        if phase == "word":
            if ch.isspace():
                phase = "spaces"
                if blank_ok or word:
                    words.append(word)
                word = ""
                blank_ok = False
                pos += 1
                continue
            if ch in "'\"":
                quote = ch
                blank_ok = True
                phase = "quote"
            if ch == escape:
                if pos + 1 == n:
                    pos += 1
                    continue
                word += ch
                pos += 1
                ch = rest[pos]
            word += ch
            pos += 1
            continue
        # in quote
        if ch == quote:
            phase = "word"
        if ch == escape and quote != "'":
            if pos + 1 == n:
                phase = "word"
                pos += 1
                continue
            pos += 1
            word += ch
            ch = rest[pos]
        word += ch
        pos += 1
    return words


class _NotJSON(Exception):
    pass


def _parse_json(rest: str) -> list[str]:
    rest = rest.lstrip()
    if not rest.startswith("["):
        raise _NotJSON
    try:
        value = json.loads(rest)
    except ValueError:
        raise _NotJSON from None
    if not isinstance(value, list):
        raise _NotJSON
    if not all(isinstance(v, str) for v in value):
        raise ValueError("the JSON array must hold only strings")
    return value


def _parse_maybe_json(rest, d, filename, lineno):
    if rest == "":
        return [], False, None
    try:
        return _parse_json(rest), True, None
    except _NotJSON:
        return [rest], False, None


def _parse_maybe_json_to_list(rest, d, filename, lineno):
    try:
        return _parse_json(rest), True, None
    except _NotJSON:
        pass
    return _parse_whitespace(rest, d, filename, lineno)


def _parse_whitespace(rest, d, filename, lineno):
    rest = rest.strip(" \t\v\f\r\n")
    return ([w for w in _WHITESPACE.split(rest) if w] if rest else []), False, None


def _parse_string(rest, d, filename, lineno):
    return ([rest] if rest else []), False, None


def _parse_name_val(keyword):
    def parse_fn(rest, d, filename, lineno):
        words = parse_words(rest, d.escape)
        if not words:
            if keyword == "ENV":
                raise DockerfileError("ENV requires at least one argument", file=filename, line=lineno)
            return [], False, None
        if "=" not in words[0]:
            parts = _WHITESPACE.split(rest.strip(), maxsplit=1)
            if len(parts) < 2:
                raise DockerfileError(f"{keyword} must have two arguments", file=filename,
                                      line=lineno, hint=f"write {keyword} name=value")
            return [parts[0], parts[1], ""], False, None
        out = []
        for w in words:
            if "=" not in w:
                raise DockerfileError(
                    f"syntax error: can't find = in {w!r}; must be of the form name=value",
                    file=filename, line=lineno)
            k, v = w.split("=", 1)
            out += [k, v, "="]
        return out, False, None
    return parse_fn


def _parse_name_or_name_val(rest, d, filename, lineno):
    return parse_words(rest, d.escape), False, None


def _parse_health(rest, d, filename, lineno):
    sep = 0
    while sep < len(rest) and not rest[sep].isspace():
        sep += 1
    nxt = sep
    while nxt < len(rest) and rest[nxt].isspace():
        nxt += 1
    if sep == 0:
        return [], False, None
    args, is_json, _ = _parse_maybe_json(rest[nxt:], d, filename, lineno)
    return [rest[:sep]] + args, is_json, None


def _parse_onbuild(rest, d, filename, lineno):
    if rest == "":
        return [], False, None
    child, _ = _node_from_line(rest, d, filename, lineno)
    return [], False, child


def _parse_ignore(rest, d, filename, lineno):
    return [], False, None


_ARG_PARSERS = {
    "add": _parse_maybe_json_to_list,
    "arg": _parse_name_or_name_val,
    "cmd": _parse_maybe_json,
    "copy": _parse_maybe_json_to_list,
    "entrypoint": _parse_maybe_json,
    "env": _parse_name_val("ENV"),
    "expose": _parse_whitespace,
    "from": _parse_whitespace,
    "healthcheck": _parse_health,
    "label": _parse_name_val("LABEL"),
    "maintainer": _parse_string,
    "onbuild": _parse_onbuild,
    "run": _parse_maybe_json,
    "shell": _parse_maybe_json,
    "stopsignal": _parse_string,
    "user": _parse_string,
    "volume": _parse_maybe_json_to_list,
    "workdir": _parse_string,
}

KEYWORDS = tuple(k.upper() for k in _ARG_PARSERS)
