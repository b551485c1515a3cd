"""pybuild: a daemonless container image builder (Dockerfile -> OCI image).

The public library API, for orchestrators::

    import builder
    image = builder.build("ctx", tags=["app:1"], on_event=print)
    print(image.id)

Everything named in `__all__` is stable; the submodules are not. Errors are
one tree rooted at `PybuildError` (see `builder.errors`); events are the
dataclasses of `builder.progress`. Names are imported on first use, so that
`pybuild --help` and a fully cached build do not pay for modules they never
touch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "build": "engine", "BuildOptions": "engine", "Builder": "engine",
    "Store": "store", "Image": "image", "LayerDesc": "image",
    "Event": "progress", "BuildStarted": "progress", "StepStarted": "progress",
    "StepCached": "progress", "StepOutput": "progress", "StepDone": "progress",
    "BuildWarning": "progress", "BuildDone": "progress", "CacheMiss": "progress",
    "Transfer": "progress", "RegistryError": "errors", "pull": "api", "push": "api",
    "PlainRenderer": "progress", "JsonRenderer": "progress", "make_renderer": "progress",
    "PybuildError": "errors", "UsageError": "errors", "DockerfileError": "errors",
    "BuildError": "errors", "StepFailed": "errors", "ImageNotFound": "errors",
    "StoreError": "errors", "LayerError": "errors", "Interrupted": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'builder' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
