"""Storing layers: a step's upper dir, or a tar from an archive, becomes a layer of the store.

Both directions are one streaming pass. A committed upper dir is hashed and
compressed while it is archived, and then renamed (not copied) into
`layers/<chain-id>/diff`: it already is an overlay-ready diff dir. An
ingested tar is hashed (both digests), stored as a blob and extracted into a
staging dir at the same time; the digests are checked before the layer is
installed, so a corrupt or tampered layer never enters the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os

from ..record import record
from ..errors import LayerError, StoreError
from ..image import LayerDesc, MEDIA_LAYER, MEDIA_LAYER_GZIP, MEDIA_LAYER_ZSTD, digest_of
from . import compress, diff, extract, segments, splice, twins


def chain_of(parent_chain: str | None, diff_id: str) -> str:
    return diff_id if parent_chain is None else digest_of(f"{parent_chain} {diff_id}".encode())


def commit_upper(store, upper: str, parent_chain: str | None, *, created_by: str = "",
                 compression: str = "gzip", clamp_mtime: int | None = None,
                 segmented: bool = False, digests=None,
                 donor: segments.DonorBlob | None = None,
                 stacked_on: tuple | None = None,
                 beside=None) -> LayerDesc | None:
    """Archive `upper` into a blob and move it into the layer store; None if it holds no change.

    `segmented` (COPY layers, gzip only): the blob is a series of gzip members
    (segments.py); with `digests` (its `get(image path)` gives the hex content
    digest of a file the COPY wrote, as bytes) the layer keeps an index of
    them, and members `donor`, the last layer of the same COPY, already has are
    copied from its blob. `stacked_on` is (chain ID, diff dir, its files: see
    diff.write_tar) of the layer `upper` is stacked on (donor.py): those
    files are part of the layer, and layer.json names it as the `base`.
    `beside(stats)` gives files (name -> bytes) to install with the layer,
    from the walk's census (diff.DiffStats).
    """
    media_type = {"zstd": MEDIA_LAYER_ZSTD, "uncompressed": MEDIA_LAYER}.get(compression,
                                                                           MEDIA_LAYER_GZIP)
    segmented = segmented and compression == "gzip"
    # A full COPY layer maps its tar, for the layers that will be stacked on it (splice.py).
    mapped = segmented and digests is not None and not stacked_on and beside is not None
    base = _spliceable(store, stacked_on[0], clamp_mtime) \
        if stacked_on and segmented and digests is not None else None
    try:
        with store.blobs.writer(direct=True) as blob, (
                segments.SegmentedSink(blob, donor) if segmented
                else compress.LayerSink(blob, compress=compression != "uncompressed",
                                        algorithm=compression)) as sink:
            segmenter = segments.Segmenter(sink, digests, mapped) if segmented else None
            stats = splice.write_spliced(upper, sink, segmenter, base, stacked_on[2],
                                         clamp_mtime) if base is not None else None
            if stats is None:
                stats = diff.write_tar(
                    upper, sink, clamp_mtime=clamp_mtime, segmenter=segmenter,
                    stacked_on=stacked_on[1:] if stacked_on else None,
                    census=beside is not None)
            if stats.empty:
                return None
            sink.close()
            digest = blob.commit()
            size = blob.size
        if base is not None:
            base.keep_tar()
    finally:
        if base is not None:
            base.close()
    chain = chain_of(parent_chain, sink.diff_id)
    meta = _meta(sink.diff_id, digest, size, media_type, stats.content_bytes, parent_chain,
                 created_by)
    if stacked_on:
        meta["base"] = stacked_on[0]
    files = dict(beside(stats)) if beside is not None else {}
    if segmented and digests is not None:
        files[segments.INDEX] = segments.encode_index(digest, sink.members)
        if mapped and stats.others == 0:
            files[splice.MAP] = splice.encode_map(segmenter, sink, clamp_mtime, digest)
    store.layers.install(chain, upper, meta, store.tmp, files)
    return LayerDesc(sink.diff_id, digest, size, media_type)


def _spliceable(store, base_chain: str, clamp_mtime: int | None) -> splice.Base | None:
    """The base layer's tar map and blob, if it has a map this commit can splice from."""
    try:
        digest = store.layers.meta(base_chain)["digest"]
        return splice.Base.open(store.layers.path(base_chain), store.blobs.path(digest), digest,
                                clamp_mtime, store.tmp)
    except (StoreError, KeyError, TypeError):
        return None


def _meta(diff_id, digest, size, media_type, content_size, parent, created_by=""):
    return {"diff_id": diff_id, "digest": digest, "size": size, "media_type": media_type,
            "content_size": content_size, "parent": parent, "created_by": created_by}


class _TeeReader:
    """Reads from `raw`, handing every byte read to `sinks` on the way."""

    def __init__(self, raw, sinks, what: str = "layer"):
        self.raw = raw
        self.sinks = sinks
        self.what = what

    def read(self, n=-1):
        try:
            data = self.raw.read(n)
        except LayerError:
            raise
        except compress.DECOMPRESSION_ERRORS as e:
            raise LayerError(f"{self.what}: corrupt or truncated data ({e})",
                             hint="the archive or registry copy is damaged") from None
        for s in self.sinks:
            s(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readable(self):
        return True

    def drain(self):
        while self.read(1 << 20):
            pass


def _drained(reader: _TeeReader) -> bool:
    try:
        reader.drain()
        return True
    except (LayerError, OSError, ValueError):
        return False


def _finished(stage: compress.Stage) -> bool:
    try:
        stage.finish()
        return True
    except (OSError, ValueError):
        return False


def _check_digest(what: str, got: str, expected: str) -> None:
    if got != expected:
        raise LayerError(f"{what}: blob does not match its digest: expected {expected}, "
                         f"got {got}",
                         hint="the archive or registry copy is corrupt or was tampered with")


@record
class Ingested:
    layer: LayerDesc
    new_layer: bool         # this call installed the layer dir (nobody else had)
    new_blob: bool          # and wrote the blob


def ingest(store, raw, parent_chain: str | None, *, what: str,
           expected_diff_id: str | None = None, expected_digest: str | None = None,
           as_plain: bool = False) -> Ingested:
    """Store the layer tar read from `raw` (gzip, zstd or plain) on top of `parent_chain`.

    Every layer is kept as it came: a compressed one (its digest is the
    registry's), and a plain one, as the store keeps the layers it builds
    (an archive's, a rootfs import's, or one a registry or cache names by
    its diff_id). Only a plain tar that was expected under another digest
    (a compressed one) is compressed on the way in. `as_plain`: a compressed
    layer is stored as the plain tar it holds (a cache's gzip twin of a plain
    layer: the cache entry names the plain one); `expected_digest` is then
    the compressed bytes', which are kept too, as the layer's gzip twin
    (twins.py: the next push sends them, with nothing to compress).
    """
    buffered = io.BufferedReader(raw, 1 << 20) if not hasattr(raw, "peek") else raw
    head = buffered.peek(4)[:4]
    compressed = compress.is_compressed(head)
    keep_plain = not compressed and expected_digest in (None, expected_diff_id)
    unpack = compressed and as_plain
    blob_writer = read_ahead = None     # threads of their own: compressed layers (ReadAhead)
    # (the compressed bytes of a layer stored unpacked: hashed, and kept if they are gzip)
    with store.blobs.writer() if unpack else contextlib.nullcontext() as fetched, \
            store.blobs.writer() as blob, \
            compress.LayerSink(blob, compress=not (compressed or keep_plain)) as sink, \
            store.tmpdir("ingest") as staging:
        try:
            if unpack:
                # Decompressed in a second thread, which hands the tar to the sink (hashed
                # and written in a third); extracting in this one.
                media_type = MEDIA_LAYER
                outer, diff_hash = _TeeReader(buffered, [fetched.write]), None
                read_ahead = compress.ReadAhead(_TeeReader(compress.open_decompressed(outer, head),
                                                           [sink.write], what).read,
                                                "pybuild-decompress")
                plain = read_ahead
            elif compressed:
                media_type = MEDIA_LAYER_ZSTD if head.startswith(compress.ZSTD_MAGIC) \
                    else MEDIA_LAYER_GZIP
                blob_writer = compress.Stage(blob.write, "pybuild-blob-write")
                outer = _TeeReader(buffered, [blob_writer.put])
                diff_hash = hashlib.sha256()
                # Decompressing and hashing happen in a second thread, writing the blob in a
                # third, extracting in this one.
                read_ahead = compress.ReadAhead(_TeeReader(compress.open_decompressed(outer, head),
                                                           [diff_hash.update], what).read,
                                                "pybuild-decompress")
                plain = read_ahead
            else:
                media_type = MEDIA_LAYER if keep_plain else MEDIA_LAYER_GZIP
                outer, diff_hash = None, None           # (the sink's: sink.diff_id)
                plain = _TeeReader(buffered, [sink.write], what)
            diff_dir = os.path.join(staging, "diff")
            os.mkdir(diff_dir, 0o755)
            try:
                content = extract.extract(plain, diff_dir, what=what)
                plain.drain()
                if outer is not None:
                    outer.drain()
            except (LayerError, OSError, EOFError, ValueError) as e:
                # Bytes that do not decompress or extract: when the blob's digest is known, the
                # clearer error is that the blob is not the one named (read it to the end to know).
                stopped = read_ahead is None or read_ahead.close()
                if expected_digest and outer is not None and stopped and _drained(outer) \
                        and (unpack or _finished(blob_writer)):
                    _check_digest(what, fetched.digest if unpack else blob.digest,
                                  expected_digest)
                if isinstance(e, LayerError):
                    raise
                raise LayerError(f"{what}: cannot read the layer ({e})") from None
            if blob_writer is not None:
                blob_writer.finish()
            sink.close()
        finally:
            if read_ahead is not None:
                read_ahead.close()
            if blob_writer is not None:
                blob_writer.stop()
        diff_id = sink.diff_id if diff_hash is None else "sha256:" + diff_hash.hexdigest()
        if expected_digest and (compressed or keep_plain):
            _check_digest(what, fetched.digest if unpack else blob.digest, expected_digest)
        if expected_diff_id and diff_id != expected_diff_id:
            raise LayerError(f"{what}: content does not match its diff_id: expected "
                             f"{expected_diff_id}, got {diff_id}",
                             hint="the archive or registry copy is corrupt or was tampered with")
        digest = blob.commit()
        size = blob.size
        if unpack and not head.startswith(compress.ZSTD_MAGIC):
            twins.remember(store, digest, fetched.commit(), fetched.size)
        chain = chain_of(parent_chain, diff_id)
        new_layer = store.layers.install(
            chain, diff_dir, _meta(diff_id, digest, size, media_type, content, parent_chain), store.tmp)
    return Ingested(LayerDesc(diff_id, digest, size, media_type), new_layer, blob.new)
