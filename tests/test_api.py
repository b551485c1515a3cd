"""The library API orchestrators import: curated names, typed options, catchable errors, events."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import builder
from conftest import BASE

PUBLIC = {
    "__version__", "build", "BuildOptions", "Builder", "Store", "Image", "LayerDesc",
    "Event", "BuildStarted", "StepStarted", "StepCached", "StepOutput", "StepDone",
    "BuildWarning", "BuildDone", "CacheMiss", "PlainRenderer", "JsonRenderer", "make_renderer",
    "Transfer", "RegistryError", "pull", "push",
    "PybuildError", "UsageError", "DockerfileError", "BuildError", "StepFailed",
    "ImageNotFound", "StoreError", "LayerError", "Interrupted",
}


def test_public_names_are_exactly_the_curated_ones():
    assert set(builder.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(builder, name) is not None


def test_error_tree_and_exit_codes():
    assert issubclass(builder.StepFailed, builder.BuildError)
    assert issubclass(builder.LayerError, builder.StoreError)
    classes = (builder.UsageError, builder.DockerfileError, builder.BuildError,
               builder.ImageNotFound, builder.StoreError, builder.RegistryError, builder.Interrupted)
    for cls in classes:
        assert issubclass(cls, builder.PybuildError)
    assert len({c.exit_code for c in classes}) == len(classes)


def test_build_options_are_typed_and_frozen():
    fields = {f.name for f in dataclasses.fields(builder.BuildOptions)}
    assert {"context", "dockerfile", "tags", "build_args", "no_cache", "network", "target",
            "root"} <= fields
    with pytest.raises(dataclasses.FrozenInstanceError):
        builder.BuildOptions().no_cache = True


def test_events_serialise_with_a_kind():
    ev = builder.StepOutput(step=2, line="hi")
    assert ev.to_json() == {"kind": "step_output", "step": 2, "line": "hi"}


def test_importing_the_cli_stays_light():
    code = ("import sys, builder.cli; heavy = [m for m in ('isal', 'tarfile', 'builder.engine', "
            "'builder.sandbox') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_errors_from_a_library_build_are_catchable(tmp_path, store_root):
    (tmp_path / "Dockerfile").write_text("FROM scratch\nBOGUS x\n")
    with pytest.raises(builder.DockerfileError) as err:
        builder.build(str(tmp_path), root=store_root)
    assert err.value.line == 2 and "unknown instruction: BOGUS" in str(err.value)


def test_a_finished_build_is_freed_when_build_returns(tmp_path, base_image, store_root,
                                                       monkeypatch):
    """An orchestrator builds again and again in one process: each Builder, with every entry
    of its context, must go when build() returns, not at some later full collection of the
    garbage collector. Its Executor referred back to it (a cycle), so it stayed."""
    import gc
    import weakref
    from builder import engine

    made = []
    real_init = engine.Builder.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(weakref.ref(self))
    monkeypatch.setattr(engine.Builder, "__init__", init)
    (tmp_path / "f").write_text("x\n")
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nCOPY f /f\nRUN cat /f > /g\n")
    gc.collect()
    gc.disable()
    try:
        image = builder.build(str(tmp_path), root=store_root, no_cache=True)
        alive = made[0]() is not None
    finally:
        gc.enable()
    assert len(image.diff_ids) > len(base_image.diff_ids)    # (the steps ran: an Executor was made)
    assert not alive, "the Builder outlived build()"
