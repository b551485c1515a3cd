"""What a build's RUN steps take from the command line besides the Dockerfile, parsed as Docker
parses it: `--add-host NAME:ADDRESS` (lines of RUN's /etc/hosts) and `--ulimit NAME=SOFT[:HARD]`.

Both reach every RUN of the build and are part of its cache key (engine.py),
as BuildKit keys an exec's extra hosts and ulimits.
"""

from __future__ import annotations

from .errors import UsageError


ULIMITS = ("core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
           "nproc", "rss", "rtprio", "rttime", "sigpending", "stack")


def parse_ulimit(text: str) -> tuple[str, int, int]:
    """Docker's `--ulimit NAME=SOFT[:HARD]` -> (name, soft, hard); -1 is unlimited."""
    name, sep, value = text.partition("=")
    soft, _, hard = value.partition(":")
    try:
        limits = int(soft), int(hard or soft)
    except ValueError:
        sep = ""
    if not sep or name not in ULIMITS:
        raise UsageError(f"--ulimit {text!r}: expected NAME=SOFT[:HARD]",
                         hint=f"NAME is one of {', '.join(ULIMITS)}; for example "
                              "--ulimit nofile=1024:2048 (-1: unlimited)")
    if any(n < -1 for n in limits) or (limits[1] != -1 and not 0 <= limits[0] <= limits[1]):
        raise UsageError(f"--ulimit {text!r}: the soft limit must be at most the hard one")
    return name, *limits


def parse_add_host(text: str) -> tuple[str, str]:
    """Docker's `--add-host NAME:ADDRESS` (or NAME=ADDRESS) -> (name, address).

    `host-gateway` is the host itself: with RUN on the host's network (the
    default here), that is 127.0.0.1.
    """
    import ipaddress
    name, sep, address = text.partition("=") if "=" in text else text.partition(":")
    if address == "host-gateway":
        address = "127.0.0.1"
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        sep = ""
    if not (name and sep) or any(c.isspace() for c in name):
        raise UsageError(f"--add-host {text!r}: expected NAME:ADDRESS",
                         hint="for example --add-host db.local:10.0.0.5 (an IP address, or "
                              "host-gateway for this machine)")
    return name, address.strip("[]")
