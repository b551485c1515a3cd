"""Reproducible images: with SOURCE_DATE_EPOCH the same Dockerfile and context give the same ID.

Each build goes into its own empty store, a second apart, from its own copy
of the context, so nothing is shared but the inputs.
"""

from __future__ import annotations

import time

import builder

from conftest import busybox_context, layer_members, run_pybuild

EPOCH = 1_600_000_000          # 2020-09-13T12:26:40Z
STEPS = (
    'RUN echo made > /made && mkdir -p /srv/data && touch /srv/data/file && rm /etc/motd || true\n'
    'ENV STAMP=1\n'
    'RUN ln -s /made /srv/link && ln /made /srv/hard\n'
)


def reproducible_context(path):
    ctx = busybox_context(path)
    (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text() + STEPS)
    return ctx


def test_same_inputs_same_image_id(tmp_path):
    ids, images = [], []
    for n in range(2):
        root = tmp_path / f"store{n}"
        ctx = reproducible_context(tmp_path / f"ctx{n}")
        image = builder.build(str(ctx), root=str(root), source_date_epoch=EPOCH)
        ids.append(image.id)
        images.append((builder.Store(str(root)), image))
        time.sleep(1.1)
    assert ids[0] == ids[1]
    store, image = images[0]
    assert image.created == "2020-09-13T12:26:40Z"
    assert {h["created"] for h in image.history} == {"2020-09-13T12:26:40Z"}
    for layer in image.layers:
        assert max(m.mtime for m in layer_members(store, layer)) <= EPOCH

    # Without it, the times of the steps make every build different (so the check above is real).
    plain = [builder.build(str(reproducible_context(tmp_path / f"plain{n}")),
                           root=str(tmp_path / f"plain-store{n}")).id for n in range(2)]
    assert plain[0] != plain[1]


def test_cli_takes_the_environment_variable_and_checks_it(tmp_path):
    ctx = reproducible_context(tmp_path / "ctx")
    a = run_pybuild("build", "-q", ctx, root=tmp_path / "a", env={"SOURCE_DATE_EPOCH": str(EPOCH)},
                    check=True)
    b = run_pybuild("build", "-q", "--source-date-epoch", EPOCH, ctx, root=tmp_path / "b",
                    check=True)
    assert a.stdout == b.stdout
    bad = run_pybuild("build", ctx, root=tmp_path / "c", env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert bad.returncode == 2
    assert b"SOURCE_DATE_EPOCH='yesterday': expected whole seconds" in bad.stderr


def test_every_storage_driver_gives_the_same_image_id(tmp_path):
    """The drivers differ in how a step's root is put together, never in what it produces."""
    steps = STEPS + (
        "RUN mkdir -p /d/old && echo x > /d/old/f && chmod 700 /d\n"
        "RUN rm -rf /d && mkdir /d && echo new > /d/n && chown 12:34 /d/n && rm /etc/passwd\n"
        "RUN echo more >> /made && mkfifo /srv/fifo && touch -d @1000 /srv/old\n"
    )
    ids = {}
    for driver in ("overlay", "fuse", "vfs"):
        ctx = busybox_context(tmp_path / f"ctx-{driver}")
        (ctx / "Dockerfile").write_text((ctx / "Dockerfile").read_text() + steps)
        ids[driver] = builder.build(str(ctx), root=str(tmp_path / f"store-{driver}"),
                                    storage_driver=driver, source_date_epoch=EPOCH).id
    assert ids["fuse"] == ids["overlay"] and ids["vfs"] == ids["overlay"], ids
