"""A real registry for the tests: Debian's `docker-registry` (the CNCF distribution registry).

Started on 127.0.0.1 on a free port with a config from testdata/registry/
and its own storage directory, stopped (and its directory removed) after.
Its storage is plain files, so a test can reach in and tamper with a blob.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"
CONFIGS = Path(__file__).resolve().parents[1] / "testdata" / "registry"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    process: subprocess.Popen
    host: str                 # 127.0.0.1:PORT
    storage: Path
    user: str | None = None
    password: str | None = None

    def blob_path(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (distribution's filesystem driver layout)."""
        hexpart = digest.removeprefix("sha256:")
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexpart[:2] /
                hexpart / "data")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(workdir: Path, *, htpasswd: tuple[str, str] | None = None) -> Registry:
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    port = _free_port()
    env = dict(os.environ, REGISTRY_HTTP_ADDR=f"127.0.0.1:{port}",
               REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(storage))
    config = CONFIGS / "plain.yml"
    if htpasswd:
        user, password = htpasswd
        line = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                              capture_output=True, text=True).stdout.strip()
        (workdir / "htpasswd").write_text(line + "\n")
        env["REGISTRY_AUTH_HTPASSWD_PATH"] = str(workdir / "htpasswd")
        config = CONFIGS / "htpasswd.yml"
    log = open(workdir / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    registry = Registry(process, f"127.0.0.1:{port}", storage, *(htpasswd or (None, None)))
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://{registry.host}/v2/", timeout=1)
            return registry
        except urllib.error.HTTPError:
            return registry          # 401: up, and asking for a login
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                registry.stop()
                raise RuntimeError("docker-registry did not start:\n" +
                                   (workdir / "registry.log").read_text()) from None
            time.sleep(0.05)


def available() -> bool:
    return os.path.exists(REGISTRY_BIN) and shutil.which("htpasswd") is not None
