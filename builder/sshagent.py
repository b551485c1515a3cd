"""SSH agent forwarding for `RUN --mount=type=ssh` (`pybuild build --ssh default`).

A RUN step does not get the agent's own socket. For each ssh mount the
build listens on a socket of its own, in the step's scratch dir, with the
owner and mode the mount asks for (BuildKit's default: root, 0600), and
relays every connection to the agent. So a step sees neither the agent's
path nor the directory around it (ssh-agent keeps it 0700 for its user),
and once the step ends nothing can reach the agent through it. The agent
never gives out keys, only signatures: that is what forwarding it allows.
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading

from .errors import UsageError

_SEND_TIMEOUT = 10.0        # seconds a relayed message may wait for its reader


def agent_socket(ident: str, given: str) -> str:
    """The agent socket `--ssh ID[=PATH]` names: PATH, or $SSH_AUTH_SOCK without one."""
    path = given or os.environ.get("SSH_AUTH_SOCK", "")
    flag = f"--ssh {ident}{'=' + given if given else ''}"
    if not path:
        raise UsageError(f"{flag}: SSH_AUTH_SOCK is not set, so there is no agent to forward",
                         hint="start one (eval $(ssh-agent) && ssh-add), or give its socket: "
                              f"--ssh {ident}=/path/to/agent.sock")
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as e:
        raise UsageError(f"{flag}: cannot use {path}: {e.strerror}",
                         hint="is the agent still running? (ssh-add -l)") from None
    if not is_socket:
        raise UsageError(f"{flag}: {path} is not an agent's socket",
                         hint="pybuild forwards a running ssh-agent; load the key into one with "
                              "ssh-add and pass its socket") from None
    return os.path.abspath(path)


class AgentRelay:
    """A socket at `path` whose connections are relayed to the agent at `agent` (a thread)."""

    def __init__(self, agent: str, directory: str, name: str, *, uid: int = 0, gid: int = 0,
                 mode: int = 0o600):
        self.agent = agent
        self.path = os.path.join(directory, name)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Bound through the directory's descriptor: a socket's path may not be longer
            # than 107 bytes, and a store's step dirs can be deeper than that.
            self._listener.bind(f"/proc/self/fd/{where}/{name}")
            os.chown(self.path, uid, gid)
            os.chmod(self.path, mode)
            self._listener.listen(16)
        except OSError:
            self._listener.close()
            raise
        finally:
            os.close(where)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="pybuild-ssh-agent", daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    if key.fileobj is self._listener:
                        self._accept(sel, peers)
                    else:
                        self._relay(sel, peers, key.fileobj)
        finally:
            for s in list(peers):
                s.close()
            self._listener.close()
            sel.close()

    def _accept(self, sel, peers: dict) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return              # (out of descriptors: the step's ssh retries or fails)
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            agent.connect(self.agent)
        except OSError:
            agent.close()
            client.close()      # the step's ssh sees the agent as gone, as it is
            return
        for s in (client, agent):
            # A step that stops reading cannot hold the relay (and the build's end) for good.
            s.settimeout(_SEND_TIMEOUT)
        peers[client], peers[agent] = agent, client
        sel.register(client, selectors.EVENT_READ)
        sel.register(agent, selectors.EVENT_READ)

    @staticmethod
    def _relay(sel, peers: dict, src: socket.socket) -> None:
        dst = peers[src]
        try:
            data = src.recv(1 << 16)
            if data:
                dst.sendall(data)     # the agent protocol is request, then answer: small
                return
        except OSError:
            pass
        for s in (src, dst):
            sel.unregister(s)
            del peers[s]
            s.close()
