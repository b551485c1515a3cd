"""RUN sandboxes forked by a small process instead of the build's own, which is bigger.

Forking copies the page tables of the process that forks, and a RUN forks
twice (sandbox.py's A, then B). Measured here, fork + fork + exec took
2.7-2.9 ms from a 14 MB Python process, 4.2-4.4 ms from a build process of
22-31 MB, 5.7 ms at 51 MB and 12 ms at 110 MB (a build that walked a
30,000-file context holds 130 MB). So a build that runs more than a couple
of RUN steps starts this server, a fresh interpreter that imports only the
sandbox (13 MB), and has it fork each RUN's sandbox.

Everything else stays in the build process. It makes the output and error
pipes and hands their write ends over (SCM_RIGHTS) with the pickled
snapshot and RunSpec; cancellation kills the sandbox by pid as before; the
exit status comes back on a socket pair of its own, written by the
sandbox's first process as it exits (`sandbox._exit`), since the server,
not the build, is its parent. A killed sandbox closes that socket without
a word: 128 + SIGKILL, as a wait would say. The status comes before the
sandbox's mount namespace is torn down (the kernel waits for RCU grace
periods there, a few ms on this VM), so the build commits the step's layer
meanwhile. The server reaps a sandbox when the build says it is done with
its pid (so the pid cannot be reused while the build may still signal it),
and handles requests in order: the next sandbox is forked only after the
last one's mounts are gone. When the build closes its socket, the server
waits for every sandbox still ending, then exits.

The server dies with the build process (PR_SET_PDEATHSIG), its sandboxes
with it (the same signal, armed against their parent), and it ends when
the build closes its socket. It runs in a process group of its own, so a
Ctrl-C at the terminal reaches pybuild, which stops the build as it always
does. Until the server says it is ready (40-60 ms after it starts), and for
anything but a build's RUN on the overlay driver (a container, the fuse
driver's server process, vfs), the build forks as before.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import threading

_RUN, _DONE = b"R", b"D"     # requests: a sandbox to start (with 3 fds), a pid to reap
_HEADER = 9                  # the kind, then 8 bytes: a payload's length, or a pid
_KILLED = 128 + signal.SIGKILL


class ForkServer:
    """The build process's side: start() a sandbox through the server, or None (fork it
    yourself) while the server is not ready or has failed."""

    def __init__(self):
        import subprocess
        from . import linux
        self._lock = threading.Lock()
        self._state = "starting"            # starting | ready | broken | closed
        with linux.FORK_LOCK:
            self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            code = (f"import sys; sys.path.insert(0, {package_parent!r}); "
                    f"from builder.forkserver import serve; serve({theirs.fileno()}, {os.getpid()})")
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", code], pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=None if os.environ.get("PYBUILD_DEBUG_SANDBOX") else subprocess.DEVNULL,
                    process_group=0)
            except OSError:
                self._proc = None
                self._state = "broken"
            finally:
                theirs.close()

    def ready(self) -> bool:
        """Has the server said it is ready (without waiting for it)?"""
        if self._state == "starting":
            with self._lock:
                if self._state == "starting" and select.select([self._sock], [], [], 0)[0]:
                    self._state = "ready" if self._sock.recv(1) == b"R" else "broken"
        return self._state == "ready"

    def start(self, snap, spec, scratch: str):
        """Have the server fork a sandbox for `spec` in `snap`: (pid, out_r, err_r, waiter), or
        None when it cannot (then the caller forks it itself)."""
        if not self.ready():
            return None
        from . import linux
        payload = pickle.dumps((snap, spec, scratch), protocol=pickle.HIGHEST_PROTOCOL)
        # Under the fork lock: a process forked meanwhile by another thread would hold the
        # write ends open, and the output would never end.
        with linux.FORK_LOCK:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with self._lock:
                    socket.send_fds(self._sock, [_RUN + len(payload).to_bytes(8, "big")],
                                    [out_w, err_w, theirs.fileno()])
                    self._sock.sendall(payload)
                sent = True
            except OSError:
                sent = False
                self._state = "broken"
            finally:
                os.close(out_w)
                os.close(err_w)
                theirs.close()
        waiter = _Remote(mine, self) if sent else None
        if waiter is None or waiter.pid is None:
            mine.close()
            os.close(out_r)
            os.close(err_r)
            if waiter is None:
                return None       # the server was gone: the caller forks the sandbox itself
            # It took the request and answered no pid (it failed, or ended): a sandbox may
            # have begun, so the step's root is not known to be clean, and nothing is tried
            # again in it. Later steps fork their sandboxes themselves.
            self._state = "broken"
            from .sandbox import SetupError
            raise SetupError("the fork server could not start this step's sandbox",
                             hint="run the build again (PYBUILD_DEBUG_SANDBOX=1 shows the "
                                  "server's own errors)")
        return waiter.pid, out_r, err_r, waiter

    def done(self, pid: int) -> None:
        """The build has finished with the sandbox `pid`: the server may reap it."""
        if self._state != "ready":
            return                # (a server that has ended has no children left to reap)
        try:
            with self._lock:
                self._sock.sendall(_DONE + pid.to_bytes(8, "big"))
        except OSError:
            self._state = "broken"

    def close(self) -> None:
        """End the server (it reaps what is left and exits when its socket closes)."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except Exception:
                self._proc.kill()
                self._proc.wait()


class _Remote:
    """How the build waits for a sandbox the server forked: its status arrives on `sock`."""

    def __init__(self, sock: socket.socket, server: ForkServer):
        self.sock = sock
        self.server = server
        self.pid: int | None = None
        self.status: int | None = None
        while self.pid is None:
            if not self._receive():
                break

    def _receive(self) -> bool:
        """Take one message (b"P<pid>" from the server, b"S<status>" from the sandbox);
        False at the end (nobody holds the other end any more)."""
        try:
            msg = self.sock.recv(32)
        except InterruptedError:
            return True
        except OSError:
            return False          # (as good as the end: nothing more will come)
        if not msg:
            return False
        if msg[:1] == b"P":
            self.pid = int(msg[1:])
        elif msg[:1] == b"S":
            self.status = int(msg[1:])
        return True

    def wait(self) -> int:
        """The sandbox's exit status (128+N if a signal N ended it)."""
        try:
            while self.status is None:
                if not self._receive():
                    return _KILLED        # it died without a word: only SIGKILL does that
            return self.status
        finally:
            self._finish()

    def reap(self) -> None:
        """After it was killed: wait until it is gone."""
        try:
            while self._receive():
                pass
        finally:
            self._finish()

    def _finish(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
            if self.pid is not None:
                self.server.done(self.pid)


# ---- the server -----------------------------------------------------------------------

def serve(fd: int, parent: int) -> None:
    """The server's main loop (run by `python -I -S -c`): fork a sandbox for each request."""
    from builder import linux, sandbox
    linux.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)               # the build died before the signal was armed
    sandbox.prepare_to_fork()     # (once, here: each sandbox inherits it)
    sock = socket.socket(fileno=fd)
    sock.sendall(b"R")
    while True:
        header, fds = _receive_header(sock)
        if header is None:
            # The build closed its end: wait for the sandboxes still ending (their mounts go
            # with them), then go, without finalizing the interpreter (nothing to tidy).
            _reap(-1, every=True)
            os._exit(0)
        kind, number = header[:1], int.from_bytes(header[1:], "big")
        if kind == _DONE:
            _reap(number)
            continue
        payload = _receive_exactly(sock, number)
        if payload is None or len(fds) != 3:
            os._exit(1)
        out_w, err_w, status_fd = fds
        try:
            snap, spec, scratch = pickle.loads(payload)
            pid = sandbox.fork_in_server(snap, spec, scratch, out_w, err_w, status_fd)
            os.write(status_fd, b"P%d" % pid)
        except Exception:
            if os.environ.get("PYBUILD_DEBUG_SANDBOX"):
                import traceback
                traceback.print_exc()
            # (the build sees its socket end without a pid, and says so)
        finally:
            for f in fds:
                os.close(f)


def _receive_header(sock: socket.socket) -> tuple[bytes | None, list[int]]:
    """The next request's header and the descriptors that came with it."""
    data, fds = b"", []
    while len(data) < _HEADER:
        msg, got, _flags, _addr = socket.recv_fds(sock, _HEADER - len(data), 3,
                                                  socket.MSG_CMSG_CLOEXEC)
        fds += got
        if not msg:
            for f in fds:
                os.close(f)
            return None, []
        data += msg
    return data, fds


def _receive_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _reap(pid: int, every: bool = False) -> None:
    """Wait for the sandbox `pid` (for any, until none is left, with `every`)."""
    while True:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            return
        if not every:
            return
