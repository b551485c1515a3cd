"""The compat goldens: what an image is, in a form Docker's result and pybuild's can be compared in.

Shared by `record.py` (which records a golden from a real Docker engine) and
`tests/test_compat.py` (which builds the same case with pybuild and compares).
Both sides get their root filesystem the same way, with independent tools:
the image as an OCI layout, unpacked by `umoci`, then walked here.

A golden holds, for the final image:
  * rootfs: every path with its type, mode, uid, gid, and for files size and
    sha256, for symlinks the target (no times: they differ on every build);
  * config: Env, Cmd, Entrypoint, WorkingDir, User, Labels, ExposedPorts,
    Volumes, StopSignal, Healthcheck, OnBuild, Shell, ArgsEscaped, and the author;
  * history: created_by and whether the entry added a layer.

Normalisation, each rule for a difference that is not a defect:
  * " # buildkit" is BuildKit's marker on RUN/COPY/ADD history; pybuild
    writes the same text without it.
  * Docker 20.10's BuildKit (0.8) printed EXPOSE as a Go map and HEALTHCHECK
    as a Go struct pointer, and left out COPY's --chown/--chmod; current
    BuildKit prints `EXPOSE [80/tcp]`, `HEALTHCHECK {Test:[...] ...}` and the
    flags. Both sides are reduced to the keyword for HEALTHCHECK (its value is
    compared in the config), to the sorted port list for EXPOSE, and COPY/ADD
    lose those two flags (owners and modes are compared in the rootfs).
  * ARG entries are compared by name: BuildKit 0.8 wrote `ARG NAME` for an
    ARG that takes its value from --build-arg or the global scope, current
    BuildKit writes `ARG NAME=value` (the values reach RUN's `|N` prefix and
    the files, which are compared).
  * RUN's `|N NAME=value ...` prefix names each build arg once: BuildKit 0.8
    repeated an ARG declared a second time (`|3 X=b Y=c X=b`); current
    BuildKit lists it once, where it was first declared, with its latest
    value (dockerfile2llb's runCommandString), as pybuild does.
  * An entry whose layer is the empty tar counts as adding no layer: BuildKit
    exports a layer for a step that changed nothing, Docker's classic builder
    and pybuild add none (history says empty_layer).
  * BuildKit 0.8 left the mount stubs of RUN (/dev, /proc, /sys, /etc/hosts,
    /etc/resolv.conf, /etc/hostname) in the layer when the image lacked them;
    the base image of these cases has them all, so no stub is created; nor
    for RUN --mount targets, which the cases create first (BuildKit 0.10
    and later remove a stub that is still empty, as pybuild never makes one).
  * Left out of the cases, because Docker 20.10's BuildKit and the current
    one differ and pybuild follows the current one: `ADD --chown` of a local
    archive (the dockerfile frontend owns the unpacked entries since 1.17;
    0.8 kept the archive's owners; tests/test_build.py checks pybuild's).
  * Not normalised, and pybuild follows Docker 20.10 here: after `FROM stage`,
    current BuildKit also lists the base stage's ARGs in RUN's `|N` prefix
    (dispatchState.init appends base.buildArgs); BuildKit 0.8 does not. Both
    give the RUN those values (stage-inherits-args).
  * The busybox binary is the host's (Debian's busybox-static); its hash is
    recorded as "<busybox>" and compared with the host's file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile

EMPTY_TAR_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal", "Healthcheck", "OnBuild", "Shell", "ArgsEscaped")
BASE_NAME = "busybox:compat"
BUSYBOX = "/bin/busybox"


def load_case(case_dir: str) -> dict:
    with open(os.path.join(case_dir, "case.json"), encoding="utf-8") as f:
        return json.load(f)


def prepare_context(case_dir: str, dest: str) -> tuple[str, str]:
    """A build context for the case in `dest`: what git cannot hold is made here."""
    case = load_case(case_dir)
    ctx = os.path.join(dest, "context")
    src = os.path.join(case_dir, "context")
    if os.path.isdir(src):
        shutil.copytree(src, ctx, symlinks=True)
    else:
        os.makedirs(ctx)
    dockerfile = os.path.join(dest, "Dockerfile")
    shutil.copy(os.path.join(case_dir, "Dockerfile"), dockerfile)
    # What git cannot hold, or this repository's .gitignore keeps out (build/, __pycache__/).
    for rel, content in case.get("files", {}).items():
        os.makedirs(os.path.dirname(os.path.join(ctx, rel)) or ctx, exist_ok=True)
        with open(os.path.join(ctx, rel), "w", encoding="utf-8") as f:
            f.write(content)
    for rel in case.get("empty_dirs", []):
        os.makedirs(os.path.join(ctx, rel), exist_ok=True)
    for rel, mode in case.get("modes", {}).items():
        os.chmod(os.path.join(ctx, rel), mode)
    for rel, target in case.get("symlinks", {}).items():
        os.symlink(target, os.path.join(ctx, rel))
    for rel, target in case.get("hardlinks", {}).items():
        os.link(os.path.join(ctx, target), os.path.join(ctx, rel))
    if case.get("archives"):
        _make_archives(ctx)
    return ctx, dockerfile


def _make_archives(ctx: str) -> None:
    entries = [("top.txt", tarfile.REGTYPE, b"top\n", 0o644, ""),
               ("bin/", tarfile.DIRTYPE, b"", 0o755, ""),
               ("bin/tool", tarfile.REGTYPE, b"#!/bin/sh\necho tool\n", 0o755, ""),
               ("private/", tarfile.DIRTYPE, b"", 0o700, ""),
               ("private/key", tarfile.REGTYPE, b"k\n", 0o600, ""),
               ("link", tarfile.SYMTYPE, b"", 0o777, "top.txt")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data, mode, target in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, 1000, 1000
            info.mtime, info.size, info.linkname = 1600000000, len(data), target
            t.addfile(info, io.BytesIO(data) if data else None)
    raw = buf.getvalue()
    import bz2, gzip, lzma
    for name, data in (("plain.tar", raw), ("archive.tar.gz", gzip.compress(raw, mtime=0)),
                       ("archive.tar.bz2", bz2.compress(raw)), ("archive.tar.xz", lzma.compress(raw))):
        with open(os.path.join(ctx, name), "wb") as f:
            f.write(data)


def listing(rootfs: str) -> dict[str, dict]:
    """Every path of an unpacked root filesystem, with what an image keeps of it."""
    busybox = _sha256_file(BUSYBOX) if os.path.exists(BUSYBOX) else None
    out = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, rootfs)
            st = os.lstat(path)
            entry = {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISDIR(st.st_mode):
                entry["type"] = "dir"
            elif stat.S_ISLNK(st.st_mode):
                entry["type"] = "symlink"
                entry["target"] = os.readlink(path)
                del entry["mode"]
            elif stat.S_ISREG(st.st_mode):
                digest = _sha256_file(path)
                entry.update(type="file", size=st.st_size,
                             sha256="<busybox>" if digest == busybox else digest)
                if st.st_nlink > 1:
                    entry["nlink"] = st.st_nlink
            elif stat.S_ISFIFO(st.st_mode):
                entry["type"] = "fifo"
            else:
                entry["type"] = "device"
            out[rel] = entry
    return dict(sorted(out.items()))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def normalize_created_by(text: str) -> str:
    text = text.removesuffix(" # buildkit")
    if text.startswith("HEALTHCHECK"):
        return "HEALTHCHECK"
    m = re.fullmatch(r"EXPOSE (?:map)?\[(.*)\]", text)
    if m:
        ports = re.findall(r"(\d+/\w+)", m.group(1))
        return "EXPOSE " + " ".join(sorted(ports))
    if text.startswith("ARG "):
        return "ARG " + " ".join(w.partition("=")[0] for w in text[4:].split(" "))
    if text.startswith(("COPY ", "ADD ")):
        words = [w for w in text.split(" ") if not w.startswith(("--chown=", "--chmod="))]
        return " ".join(words)
    m = re.match(r"RUN \|(\d+) ", text)
    if m:
        return _once_each_build_arg(text, int(m.group(1)), m.end())
    return text


def _once_each_build_arg(text: str, n: int, start: int) -> str:
    """`RUN |3 X=b Y=c X=b cmd` -> `RUN |2 X=b Y=c cmd` (values without spaces only)."""
    words = text[start:].split(" ")
    pairs = [w.partition("=") for w in words[:n]]
    if len(pairs) < n or not all(sep and re.fullmatch(r"\w+", k) for k, sep, _ in pairs):
        return text
    latest = {k: v for k, _, v in pairs}
    names = list(dict.fromkeys(k for k, _, _ in pairs))
    shown = " ".join(f"{k}={latest[k]}" for k in names)
    return f"RUN |{len(names)} {shown} " + " ".join(words[n:])


def delta(base: dict[str, dict], final: dict[str, dict]) -> dict[str, dict | None]:
    """What the case's Dockerfile did to the base image's files (None: removed)."""
    out: dict[str, dict | None] = {p: e for p, e in final.items() if base.get(p) != e}
    out.update({p: None for p in base if p not in final})
    return dict(sorted(out.items()))


def summarize(config: dict, base_history: int = 0) -> dict:
    """The config fields and the normalised history (after the base image's) of an image config."""
    cfg = config.get("config") or {}
    fields = {k: cfg.get(k) for k in CONFIG_FIELDS if cfg.get(k) not in (None, [], {}, "")}
    if config.get("author"):
        fields["author"] = config["author"]
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    history = []
    layer = 0
    for h in config.get("history") or []:
        adds = not h.get("empty_layer")
        if adds:
            if layer < len(diff_ids) and diff_ids[layer] == EMPTY_TAR_DIFF_ID:
                adds = False
            layer += 1
        history.append({"created_by": normalize_created_by(h.get("created_by", "")),
                        "empty_layer": not adds})
    return {"config": fields, "history": history[base_history:]}


def compare(golden: dict, actual: dict, ignore: dict[str, str] | None = None) -> list[str]:
    """The differences between a golden and pybuild's image, one line each.

    `ignore` (from case.json) maps golden paths that pybuild rightly lacks to
    the reason (a behaviour of the recording Docker that later versions fixed).
    """
    diffs = []
    g_root, a_root = golden["rootfs"], actual["rootfs"]
    unchanged = "unchanged from the base image"
    for path in sorted(set(g_root) | set(a_root)):
        g, a = g_root.get(path, unchanged), a_root.get(path, unchanged)
        if ignore and path in ignore and a == unchanged:
            continue
        if g != a:
            diffs.append(f"rootfs: {path}: docker {g or 'removed'} != pybuild {a or 'removed'}")
    for key in sorted(set(golden["config"]) | set(actual["config"])):
        if golden["config"].get(key) != actual["config"].get(key):
            diffs.append(f"config {key}: docker {golden['config'].get(key)!r} != "
                         f"pybuild {actual['config'].get(key)!r}")
    g_hist = [{**h, "created_by": normalize_created_by(h["created_by"])} for h in golden["history"]]
    a_hist = actual["history"]
    for i in range(max(len(g_hist), len(a_hist))):
        g = g_hist[i] if i < len(g_hist) else None
        a = a_hist[i] if i < len(a_hist) else None
        if g != a:
            diffs.append(f"history[{i}]: docker {g} != pybuild {a}")
    return diffs
