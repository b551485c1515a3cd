"""A layer tar -> an overlay-ready diff dir, refusing anything that would write outside it.

A layer comes from an archive or a registry, so it is untrusted input. Every
entry name is cleaned and must stay inside the destination (`../etc/passwd`
is refused); no entry may be written through a symlink (a layer that holds
`lib -> /usr/lib` and then `lib/x` is refused, rather than resolving the link
on the host); hard links must point at an entry of the same layer; files are
created with O_NOFOLLOW|O_EXCL. Symlinks themselves are data and may point
anywhere: they are only ever resolved inside a container's root.

OCI whiteouts become overlay whiteouts: `.wh.<name>` -> a 0/0 char device,
`.wh..wh..opq` -> `trusted.overlay.opaque=y` on its directory.
"""

from __future__ import annotations

import os
import stat
import tarfile

from .. import paths
from ..errors import LayerError
from ..trees import remove_tree
from . import whiteout

_CHUNK = 1 << 20
# How a compressed tar begins: the compressions extract(compressed=True) reads (gzip, bzip2,
# xz), for the callers that must tell an archive from anything else (ADD, a stdin context).
COMPRESSED_MAGICS = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_XATTR_PREFIX = "SCHILY.xattr."


def extract(stream, dest: str, *, what: str = "layer", whiteouts: bool = True,
            compressed: bool = False) -> int:
    """Extract the tar read from `stream` into the existing directory `dest`; returns content bytes.

    `whiteouts=False` keeps `.wh.` names as plain files (a build context is
    not a layer); `compressed` accepts gzip, bzip2 and xz streams.
    """
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*" if compressed else "r|", errorlevel=2)
    except tarfile.TarError as e:
        raise LayerError(f"{what}: not a tar archive ({e})") from None
    extractor = _Extractor(dest, what, whiteouts)
    try:
        for member in tar:
            extractor.add(member, tar)
    except tarfile.TarError as e:
        raise LayerError(f"{what}: corrupt tar archive ({e})") from None
    except EOFError:
        raise LayerError(f"{what}: the tar archive is truncated") from None
    except OSError as e:
        # (named in the layer, not in the staging dir)
        name = paths.shortened(e.filename if isinstance(e.filename, str) else "", dest)
        raise LayerError(f"{what}: cannot write {name}: {e.strerror}") from None
    extractor.finish()
    return extractor.content_bytes


class _Extractor:
    def __init__(self, dest: str, what: str, whiteouts: bool = True):
        self.dest = dest
        self.what = what
        self.whiteouts = whiteouts
        self.dir_times: list[tuple[str, int]] = []
        self.content_bytes = 0

    def fail(self, name: str, why: str):
        raise LayerError(f"{self.what}: refusing entry {name!r}: {why}")

    def clean(self, name: str) -> str:
        parts = []
        for part in name.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    self.fail(name, "path escapes the layer root")
                parts.pop()
                continue
            parts.append(part)
        return "/".join(parts)

    def parent_dir(self, rel: str, original: str) -> str:
        """The host path of `rel`'s parent, created as plain dirs, never through a symlink."""
        path = self.dest
        for part in rel.split("/")[:-1]:
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                self.fail(original, f"it would be written through the symlink {path[len(self.dest) + 1:]!r}")
            if not stat.S_ISDIR(st.st_mode):
                # A later entry may replace a file with a directory (later entries win).
                os.unlink(path)
                os.mkdir(path, 0o755)
        return path

    def add(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = self.clean(m.name)
        if rel == "":
            return  # the root itself: its metadata belongs to the image below
        base = rel.rsplit("/", 1)[-1]
        parent = self.parent_dir(rel, m.name)
        if self.whiteouts and base == whiteout.OPAQUE:
            whiteout.make_opaque(parent)
            return
        if self.whiteouts and base.startswith(whiteout.PREFIX):
            target = os.path.join(parent, base[len(whiteout.PREFIX):])
            self.remove(target)
            whiteout.make_whiteout(target)
            return
        path = os.path.join(parent, base)
        if m.isdir():
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    self.remove(path)
                    os.mkdir(path, 0o700)
            except FileNotFoundError:
                os.mkdir(path, 0o700)
            self.metadata(path, m, is_link=False)
            self.dir_times.append((path, int(m.mtime)))
            return
        self.remove(path)
        if m.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                src = tar.extractfile(m)
                left = m.size
                while left > 0:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise EOFError
                    os.write(fd, chunk)
                    left -= len(chunk)
            finally:
                os.close(fd)
            self.content_bytes += m.size
        elif m.issym():
            os.symlink(m.linkname, path)
        elif m.islnk():
            target = self.clean(m.linkname)
            if target == "":
                self.fail(m.name, "a hard link to the layer root")
            tpath = os.path.join(self.parent_dir(target, m.linkname), target.rsplit("/", 1)[-1])
            try:
                tst = os.lstat(tpath)
            except FileNotFoundError:
                self.fail(m.name, f"hard link to {m.linkname!r}, which is not in this layer")
            if stat.S_ISDIR(tst.st_mode):
                self.fail(m.name, f"hard link to the directory {m.linkname!r}")
            os.link(tpath, path, follow_symlinks=False)
            return  # a hard link shares its target's metadata
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(path, 0o600)
        else:
            self.fail(m.name, f"unsupported tar entry type {m.type!r}")
        self.metadata(path, m, is_link=m.issym())

    def remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            remove_tree(path)
        else:
            os.unlink(path)

    def metadata(self, path: str, m: tarfile.TarInfo, *, is_link: bool) -> None:
        os.chown(path, m.uid, m.gid, follow_symlinks=False)
        set_xattrs(path, m)
        if not is_link:
            # After chown, which clears set-id bits.
            os.chmod(path, m.mode & 0o7777)
        os.utime(path, (int(m.mtime), int(m.mtime)), follow_symlinks=False)

    def finish(self) -> None:
        # Directory times last: creating entries inside a directory changes its mtime.
        for path, mtime in reversed(self.dir_times):
            os.utime(path, (mtime, mtime), follow_symlinks=False)


def set_xattrs(path: str, m: tarfile.TarInfo) -> None:
    """The xattrs a tar entry carries (PAX `SCHILY.xattr.*`), set on `path`.

    After the chown, which drops security.capability, and never overlayfs's
    own markers (a layer must not smuggle them in).
    """
    for key, value in m.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX):]
            if name.startswith(whiteout.OVERLAY_XATTR_PREFIXES):
                continue
            try:
                os.setxattr(path, name, value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            except OSError:
                pass  # e.g. security.selinux on a host without it; Docker skips these too
