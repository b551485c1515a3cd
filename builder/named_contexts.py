"""`--build-context NAME=VALUE`: more contexts a Dockerfile can name, as BuildKit's named contexts.

Two kinds are understood. A local directory (`NAME=path`) is read by
`COPY --from=NAME` and `RUN --mount=type=bind,from=NAME` as the build
context is: its file contents and modes are keyed, never its times, and the
.dockerignore at its root applies, as in BuildKit. An image
(`NAME=docker-image://REF`) stands in for the image NAME wherever the
Dockerfile names one (FROM, `COPY --from`, `RUN --mount from=`), and
replaces the stage NAME if the Dockerfile has one: the stage is then that
image, and its own steps never run. As in BuildKit, an image name is
matched in its short form: `FROM alpine:latest` and
`FROM docker.io/library/alpine` are both `alpine`, `FROM alpine:3.20` is
`alpine:3.20`.

Not understood, and refused with a message rather than ignored: git and
HTTP URLs, `oci-layout://`, bake's `target:`, and a local directory as a
FROM base or in place of a stage (BuildKit would use its files as a root
filesystem).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import field

from .record import record
from .errors import UsageError
from .reference import DEFAULT_REGISTRY, DEFAULT_TAG
from . import reference

IMAGE_SCHEME = "docker-image://"
_UNSUPPORTED = ("oci-layout://", "http://", "https://", "git@", "git://", "ssh://", "target:")


@record
class NamedContexts:
    """What --build-context gives: images that replace names, and named directories."""
    images: Mapping[str, str] = field(default_factory=dict)   # short image name -> reference
    dirs: Mapping[str, str] = field(default_factory=dict)     # name -> absolute directory

    def image_for(self, name: str) -> str | None:
        """The reference that replaces the image `name`, if a context names it."""
        if not self.images:
            return None
        return self.images.get(short_name(name))


def short_name(name: str) -> str:
    """An image name as BuildKit matches named contexts: no docker.io/library/, no :latest."""
    try:
        ref = reference.parse(name)
    except UsageError:         # (not an image name: it can only match as written)
        return name
    path = ref.repository
    if ref.registry == DEFAULT_REGISTRY:
        path = path.removeprefix("library/")
    else:
        path = f"{ref.registry}/{path}"
    if ref.tag and ref.tag != DEFAULT_TAG:
        path += ":" + ref.tag
    if ref.digest:
        path += "@" + ref.digest
    return path


def parse(given: Mapping[str, str]) -> NamedContexts:
    """{name: value} as `--build-context` gives them -> NamedContexts (UsageError if unusable)."""
    images: dict[str, str] = {}
    dirs: dict[str, str] = {}
    for name, value in given.items():
        what = f"--build-context {name}={value}"
        if not name or not value:
            raise UsageError(f"{what}: expected NAME=VALUE",
                             hint="for example --build-context docs=./docs or "
                                  "--build-context alpine=docker-image://alpine:3.20")
        if value.startswith(IMAGE_SCHEME):
            ref = value[len(IMAGE_SCHEME):]
            try:
                reference.parse(ref)
            except UsageError as e:
                raise UsageError(f"{what}: {e.message}") from None
            images[short_name(name)] = ref
        elif value.startswith(_UNSUPPORTED) or "://" in value:
            raise UsageError(f"{what}: only local directories and docker-image:// are supported",
                             hint="check out or download it first, and name the directory")
        else:
            path = os.path.abspath(value)
            if not os.path.isdir(path):
                raise UsageError(f"{what}: {path} is not a directory")
            dirs[name.lower()] = path
    return NamedContexts(images, dirs)
