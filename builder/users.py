"""Users and groups as the image knows them: its /etc/passwd and /etc/group, never the host's.

The rules are Docker's (runc's `GetExecUser`): `USER name` takes the user's
primary group and every group of /etc/group that lists the name; `USER
name:group` gets that group only; a numeric uid that the image does not list
runs with gid 0 and HOME=/. `COPY --chown` differs in one way, also as in
Docker: a user given alone sets the group to the user's primary group, or to
the same number when the user is numeric.
"""

from __future__ import annotations

from .record import record


class UnknownUser(LookupError):
    pass


@record
class ExecUser:
    uid: int
    gid: int
    groups: tuple[int, ...]          # supplementary groups (the primary gid is not repeated)
    home: str


def _read(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _number(s: str) -> int | None:
    return int(s) if s.isdigit() else None


def _find(entries, spec: str, min_fields: int):
    """The passwd or group entry `spec` names: by name, or by number (field 3) if numeric."""
    number = _number(spec)
    for f in entries:
        if len(f) < min_fields:
            continue
        if (number is None and f[0] == spec) or (number is not None and _number(f[2]) == number):
            return f
    return None


def _find_user(passwd, spec: str):
    return _find(passwd, spec, 7)


def _find_group(groups, spec: str):
    return _find(groups, spec, 3)


def exec_user(spec: str, root: str = "/") -> ExecUser:
    """Who `USER spec` runs as, read from the passwd and group files under `root`."""
    passwd = _read(root.rstrip("/") + "/etc/passwd")
    groups = _read(root.rstrip("/") + "/etc/group")
    user_spec, _, group_spec = (spec or "0").partition(":")
    entry = _find_user(passwd, user_spec)
    if entry is None:
        if _number(user_spec) is None:
            raise UnknownUser(f"unable to find user {user_spec}: no matching entries in passwd file")
        uid, gid, home, name = int(user_spec), 0, "/", None
    else:
        uid, gid, home, name = int(entry[2]), int(entry[3] or 0), entry[5] or "/", entry[0]
    if group_spec:
        g = _find_group(groups, group_spec)
        if g is None:
            if _number(group_spec) is None:
                raise UnknownUser(f"unable to find group {group_spec}: no matching entries in group file")
            gid = int(group_spec)
        else:
            gid = int(g[2])
        return ExecUser(uid, gid, (), home)
    extra = []
    if name is not None:
        for g in groups:
            if len(g) >= 4 and name in g[3].split(",") and _number(g[2]) is not None:
                extra.append(int(g[2]))
    return ExecUser(uid, gid, tuple(dict.fromkeys(extra)), home)


def chown_ids(spec: str, root: str = "/") -> tuple[int, int]:
    """(uid, gid) of `COPY --chown=spec`, and of a directory WORKDIR creates for `USER spec`.

    A user given by number is that number for the group too, whatever the
    passwd file says of it ("--chown=2000" is 2000:2000 even when passwd
    gives uid 2000 the group 3000); a user given by name takes its passwd
    group. That is BuildKit's rule for the files it creates (recorded from
    Docker: testdata/compat/user-numeric-workdir), and it differs from what
    a RUN as the same USER gets (exec_user: the passwd group, or 0).
    """
    user_spec, sep, group_spec = spec.partition(":")
    number = _number(user_spec)
    if number is not None:
        uid, gid = number, number
    else:
        entry = _find_user(_read(root.rstrip("/") + "/etc/passwd"), user_spec)
        if entry is None:
            raise UnknownUser(f"unable to find user {user_spec}: no matching entries in passwd file")
        uid, gid = int(entry[2]), int(entry[3] or 0)
    if sep and group_spec:
        g = _find_group(_read(root.rstrip("/") + "/etc/group"), group_spec)
        if g is None:
            if _number(group_spec) is None:
                raise UnknownUser(f"unable to find group {group_spec}: no matching entries in group file")
            gid = int(group_spec)
        else:
            gid = int(g[2])
    return uid, gid
