"""Layer compression: gzip through ISA-L (same format as zlib's, several times faster).

A layer is produced in one streaming pass: tar bytes are hashed (diff_id)
and compressed, and the compressed bytes are hashed again (blob digest) as
they are written to the blob store's temp file. The gzip header carries no
name and no time, so the same tar always gives the same blob.
"""

from __future__ import annotations

import hashlib
import io

from isal import igzip, isal_zlib

GZIP_LEVEL = 1          # ISA-L levels are 0-3; 1 is its fast default for streams
_GZIP_WBITS = 31        # zlib convention: 16 + 15 = gzip wrapper, 32K window
_FLUSH_AT = 1 << 20


class LayerSink:
    """A write-only stream: tar bytes in; diff_id, sizes and a compressed blob out."""

    def __init__(self, blob_writer, *, compress: bool = True):
        self.out = blob_writer
        self.diff_hash = hashlib.sha256()
        self.tar_size = 0
        self._compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, _GZIP_WBITS) \
            if compress else None
        self._buf = bytearray()

    def write(self, data) -> None:
        self._buf += data
        if len(self._buf) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        self.diff_hash.update(data)
        self.tar_size += len(data)
        self.out.write(self._compressor.compress(data) if self._compressor else data)

    def close(self) -> None:
        self._flush()
        if self._compressor:
            self.out.write(self._compressor.flush())

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.diff_hash.hexdigest()


GZIP_MAGIC = b"\x1f\x8b"
# What a decompressor raises on corrupt input (isal's error is not an OSError).
DECOMPRESSION_ERRORS = (isal_zlib.error, EOFError, OSError, ValueError)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def open_decompressed(raw, head: bytes | None = None):
    """A readable stream of the tar inside `raw`, whether it is gzip, zstd or plain.

    `head` is the stream's first bytes when the caller has already looked;
    otherwise `raw` must be peekable.
    """
    if head is None:
        raw = raw if hasattr(raw, "peek") else io.BufferedReader(raw, 1 << 20)
        head = raw.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return igzip.IGzipFile(fileobj=raw, mode="rb")
    if head.startswith(ZSTD_MAGIC):
        try:
            import zstandard
        except ImportError:
            from ..errors import LayerError
            raise LayerError("a layer is zstd-compressed, and the zstandard module is not "
                             "installed", hint="pip install zstandard") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def is_compressed(head: bytes) -> bool:
    return head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC)
