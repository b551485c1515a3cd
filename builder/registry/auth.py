"""Registry credentials, where Docker keeps them: ~/.docker/config.json and credential helpers.

`auths` entries (base64 "user:password"), `credHelpers` per registry and a
default `credsStore` (`docker-credential-<name> get`) are read as the Docker
CLI reads them, so a machine logged in with `docker login` works as is.
`pybuild login` writes an `auths` entry there; `$DOCKER_CONFIG` moves the
directory, as it does for Docker.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io")


def config_path() -> str:
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(directory, "config.json")


def _load() -> dict:
    try:
        with open(config_path(), encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _keys(registry: str) -> list[str]:
    if registry in ("docker.io",) + DOCKER_HUB_KEYS:
        return list(DOCKER_HUB_KEYS)
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]


def credentials(registry: str) -> tuple[str, str] | None:
    """(username, password) for `registry`, or None."""
    data = _load()
    helper = (data.get("credHelpers") or {}).get(registry) or data.get("credsStore")
    if helper:
        found = _from_helper(helper, _keys(registry)[0] if registry == "docker.io" else registry)
        if found:
            return found
    auths = data.get("auths") or {}
    for key in _keys(registry):
        entry = auths.get(key)
        if entry and entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return user, password
        if entry and entry.get("username"):
            return entry["username"], entry.get("password", "")
    return None


def _from_helper(helper: str, server: str) -> tuple[str, str] | None:
    try:
        p = subprocess.run([f"docker-credential-{helper}", "get"], input=server.encode(),
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    try:
        data = json.loads(p.stdout)
    except ValueError:
        return None
    return data.get("Username", ""), data.get("Secret", "")


def login(registry: str, username: str, password: str) -> str:
    """Keep the credentials in the Docker config file (as `docker login` does); returns its path."""
    data = _load()
    key = DOCKER_HUB_KEYS[0] if registry == "docker.io" else registry
    data.setdefault("auths", {})[key] = {
        "auth": base64.b64encode(f"{username}:{password}".encode()).decode()}
    _save(data)
    return config_path()


def logout(registry: str) -> bool:
    data = _load()
    auths = data.get("auths") or {}
    removed = False
    for key in _keys(registry):
        if auths.pop(key, None) is not None:
            removed = True
    if removed:
        _save(data)
    return removed


def _save(data: dict) -> None:
    from ..store.lock import write_atomic
    path = config_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1).encode(), mode=0o600)   # it holds passwords
