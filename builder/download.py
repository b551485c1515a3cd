"""ADD <url>: fetch a file over http(s) into a scratch dir, as Docker does.

The file gets mode 0600 and, when the server sends Last-Modified, that
mtime; `--checksum=sha256:...` is verified. Imported only by builds that
download something (urllib is slow to import).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime


class DownloadError(Exception):
    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def fetch(url: str, scratch: str, checksum: str | None = None) -> tuple[str, str]:
    """(file name in `scratch`, sha256 digest) of the downloaded `url`."""
    name = posixpath.basename(urllib.parse.urlparse(url).path) or "__unnamed__"
    path = os.path.join(scratch, name)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as f:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                f.write(chunk)
            modified = resp.headers.get("Last-Modified")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DownloadError(f"ADD {url}: download failed ({getattr(e, 'reason', e)})",
                            hint="check the URL and that this machine can reach it") from None
    digest = "sha256:" + h.hexdigest()
    if checksum and checksum.lower() != digest:
        raise DownloadError(f"ADD {url}: checksum mismatch: expected {checksum}, got {digest}",
                            hint="the file changed at its source, or --checksum is wrong")
    os.chmod(path, 0o600)
    if modified:
        try:
            ts = parsedate_to_datetime(modified).timestamp()
            os.utime(path, (ts, ts))
        except (TypeError, ValueError):
            pass
    return name, digest
