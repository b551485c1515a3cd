"""Image names as users write them: `name[:tag][@digest]`, with Docker's defaults.

The store keeps the short, familiar form users type (`busybox:latest`,
`127.0.0.1:5000/team/app:1`), the form `docker images` shows. The full form
(`docker.io/library/busybox:latest`) is what a registry needs; `registry`,
`repository` give it.
"""

from __future__ import annotations

import re

from .record import record
from .errors import UsageError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:localhost|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)"
_NAME = re.compile(rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@record
class Reference:
    """An image reference, split: name (with registry), tag and digest."""
    name: str                 # as written, without tag/digest: "busybox", "127.0.0.1:5000/a/b"
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    @property
    def tagged(self) -> str:
        """The store's key: `name:tag` (the tag defaults to latest)."""
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    @property
    def registry(self) -> str:
        first, sep, _ = self.name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            return first
        return DEFAULT_REGISTRY

    @property
    def repository(self) -> str:
        first, sep, rest = self.name.partition("/")
        if self.registry != DEFAULT_REGISTRY or (sep and first == DEFAULT_REGISTRY):
            path = rest
        else:
            path = self.name
        if self.registry == DEFAULT_REGISTRY and "/" not in path:
            path = "library/" + path
        return path


def parse(text: str) -> Reference:
    """Parse `name[:tag][@digest]`; raise UsageError with Docker's wording on a bad one."""
    original = text
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise UsageError(f"invalid reference {original!r}: bad digest {digest!r}")
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG.match(tag):
            raise UsageError(f"invalid reference {original!r}: bad tag {tag!r}")
    if not text:
        raise UsageError(f"invalid reference {original!r}: the name is empty")
    if not _NAME.match(text):
        hint = "repository names must be lowercase" if text != text.lower() else None
        raise UsageError(f"invalid reference format: {original!r}", hint=hint)
    return Reference(text, tag, digest)
