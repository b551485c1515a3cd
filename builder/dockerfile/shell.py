"""Shell-word lexing and variable expansion, with BuildKit's rules.

Dockerfile arguments are not run through a shell; BuildKit has its own small
lexer that removes quotes, honours the escape character and expands
``$name``, ``${name}`` and the ``${name:-x}`` family, including the pattern
forms ``${v#p}``, ``${v%p}``, ``${v/p/r}``. ``expand_word`` gives one string
(COPY paths, ENV values, WORKDIR ...); ``expand_words`` splits into words after
expansion the way BuildKit does (quoted text never splits, expanded text does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_SPECIAL_PARAMS = set("@*#?-$!0")


class ExpansionError(ValueError):
    """A ``${v:?msg}``, a bad substitution or an unterminated quote."""


class _Words:
    __slots__ = ("words", "word", "in_word")

    def __init__(self):
        self.words: list[str] = []
        self.word = ""
        self.in_word = False

    def add_char(self, ch: str):
        if ch.isspace():
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.add_raw(ch)

    def add_raw(self, s: str):
        self.word += s
        self.in_word = True

    def add_string(self, s: str):
        for ch in s:
            self.add_char(ch)

    def get(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str, raw_escapes=False):
        self.s = text
        self.pos = 0
        self.env = env
        self.escape = escape
        self.raw_escapes = raw_escapes

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def next(self) -> str:
        if self.pos < len(self.s):
            ch = self.s[self.pos]
            self.pos += 1
            return ch
        return ""

    def process(self, stop: str = "", raw_escapes: bool | None = None) -> tuple[str, list[str]]:
        saved = self.raw_escapes
        if raw_escapes is not None:
            self.raw_escapes = raw_escapes
        try:
            return self._process(stop)
        finally:
            self.raw_escapes = saved

    def _process(self, stop: str) -> tuple[str, list[str]]:
        result: list[str] = []
        words = _Words()
        while self.peek() != "":
            ch = self.peek()
            if stop and ch == stop:
                self.next()
                return "".join(result), words.get()
            if ch == "$":
                tmp = self.dollar()
                result.append(tmp)
                words.add_string(tmp)
            elif ch == "'":
                tmp = self.single_quote()
                result.append(tmp)
                words.add_raw(tmp)
            elif ch == '"':
                tmp = self.double_quote()
                result.append(tmp)
                words.add_raw(tmp)
            else:
                ch = self.next()
                if ch == self.escape:
                    if self.raw_escapes:
                        words.add_raw(ch)
                        result.append(ch)
                    ch = self.next()
                    if ch == "":
                        break
                    words.add_raw(ch)
                else:
                    words.add_char(ch)
                result.append(ch)
        if stop:
            raise ExpansionError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(result), words.get()

    def single_quote(self) -> str:
        self.next()
        out = []
        while True:
            ch = self.next()
            if ch == "":
                raise ExpansionError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                return "".join(out)
            out.append(ch)

    def double_quote(self) -> str:
        self.next()
        out = []
        while True:
            ch = self.peek()
            if ch == "":
                raise ExpansionError("unexpected end of statement while looking for matching double-quote")
            if ch == '"':
                self.next()
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            ch = self.next()
            if ch == self.escape:
                nxt = self.peek()
                if nxt == "":
                    continue
                if nxt in ('"', "$", self.escape):
                    ch = self.next()
            out.append(ch)

    def name(self) -> str:
        out = []
        while self.peek() != "":
            ch = self.peek()
            if not out and ch.isdigit():
                while self.peek() != "" and self.peek().isdigit():
                    out.append(self.next())
                return "".join(out)
            if not out and ch in _SPECIAL_PARAMS:
                return self.next()
            if not (ch.isalnum() or ch == "_"):
                break
            out.append(self.next())
        return "".join(out)

    def lookup(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            return self.env[name], True
        return "", False

    def dollar(self) -> str:
        self.next()
        if self.peek() != "{":
            name = self.name()
            if name == "":
                return "$"
            return self.lookup(name)[0]
        self.next()
        if self.peek() == "":
            raise ExpansionError("syntax error: missing '}'")
        if self.peek() in "{}:":
            raise ExpansionError("syntax error: bad substitution")
        name = self.name()
        ch = self.next()
        value, found = self.lookup(name)
        if ch == "}":
            return value
        if ch == "":
            raise ExpansionError("syntax error: missing '}'")
        if ch == ":":
            modifier = self.next()
            word = self._word_until_brace()
            if modifier == "+":
                return word if value != "" else value
            if modifier == "-":
                return word if value == "" else value
            if modifier == "?":
                if not found:
                    raise ExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
                if value == "":
                    raise ExpansionError(f"{name}: {word or 'is not allowed to be empty'}")
                return value
            raise ExpansionError(f"unsupported modifier ({modifier}) in substitution")
        if ch in "+-?":
            word = self._word_until_brace()
            if ch == "+":
                return word if found else ""
            if ch == "-":
                return value if found else word
            if not found:
                raise ExpansionError(f"{name}: {word or 'is not allowed to be unset'}")
            return value
        if ch in "#%":
            longest = self.peek() == ch
            if longest:
                self.next()
            pattern = self._word_until_brace(raw=True)
            return _trim(value, pattern, prefix=(ch == "#"), longest=longest, escape=self.escape)
        if ch == "/":
            replace_all = self.peek() == "/"
            if replace_all:
                self.next()
            pattern, _ = self.process("/", raw_escapes=True)
            replacement = self._word_until_brace()
            return _substitute(value, pattern, replacement, replace_all, self.escape)
        raise ExpansionError(f"unsupported modifier ({ch}) in substitution")

    def _word_until_brace(self, raw: bool | None = None) -> str:
        try:
            word, _ = self.process("}", raw_escapes=raw)
        except ExpansionError:
            if self.peek() == "":
                raise ExpansionError("syntax error: missing '}'") from None
            raise
        return word


def _pattern_to_regex(pattern: str, escape: str, greedy: bool) -> str:
    """A shell glob (``*``, ``?``, ``[...]``, escapes) as a Python regex body."""
    out = []
    i = 0
    star = ".*" if greedy else ".*?"
    while i < len(pattern):
        ch = pattern[i]
        if ch == escape and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif ch == "*":
            out.append(star)
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _trim(value: str, pattern: str, *, prefix: bool, longest: bool, escape: str) -> str:
    rx = re.compile(_pattern_to_regex(pattern, escape, greedy=True), re.S)
    n = len(value)
    rng = range(n, -1, -1) if longest else range(0, n + 1)
    for k in rng:
        part = value[:k] if prefix else value[n - k:]
        if rx.fullmatch(part):
            return value[k:] if prefix else value[:n - k]
    return value


def _substitute(value: str, pattern: str, replacement: str, replace_all: bool, escape: str) -> str:
    if pattern == "":
        return value
    rx = re.compile(_pattern_to_regex(pattern, escape, greedy=True), re.S)
    return rx.sub(lambda m: replacement, value, count=0 if replace_all else 1)


def expand_word(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """Expand one word: quotes removed, escapes applied, variables substituted."""
    result, _ = _Lexer(word, env, escape).process()
    return result


def expand_words(text: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Expand and split into words; text from quotes never splits."""
    _, words = _Lexer(text, env, escape).process()
    return words
