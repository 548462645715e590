"""The daemon's end of the keeper's control channel.

The keeper (``keeper/keeper.c``) is the daemon's parent: it owns the listening socket, accepts
containerd's connections and passes each one here while keeping a duplicate, so that the
connections outlive a daemon that dies; it then starts a new daemon and hands it everything
again.  The channel is a SOCK_SEQPACKET socket whose number is in ``EMBEDSHIM_KEEPER_FD``; one
packet is one message of ASCII words, some with one descriptor (SCM_RIGHTS):

    daemon -> keeper   A                 attach: send me everything you hold
                       K <name> +fd      keep this descriptor for the next daemon
                       D <name>          forget it
    keeper -> daemon   L +fd             the listening socket
                       F <name> +fd      a kept descriptor
                       C <id> +fd        a connection (ids never repeat within one keeper)
                       E <gen> <crashes> end of the attach batch: which daemon this is
                       Z <pid> <status>  the keeper reaped an orphan of a dead daemon
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import select
import socket
import time
from collections.abc import Callable

from shim.util import log

KEEPER_FD_ENV = "EMBEDSHIM_KEEPER_FD"
_MAX_MESSAGE = 4096
_INT = array.array("i")


class Attached:
    """What the keeper gave at attach."""

    def __init__(self) -> None:
        self.listen_fd = -1
        self.connections: dict[int, int] = {}  # id -> fd, in arrival order
        self.stored: dict[str, int] = {}
        self.generation = 0
        self.crashes = 0


class KeeperLink:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.keeper_pid = os.getppid()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_env(cls) -> KeeperLink | None:
        text = os.environ.get(KEEPER_FD_ENV, "")
        if not text.isdigit():
            return None
        fd = int(text)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.event("keeper channel unusable", logging.WARNING, fd=fd, error=exc)
            os.environ.pop(KEEPER_FD_ENV, None)
            return None
        os.set_inheritable(fd, False)  # runc and containers must not get it
        os.environ.pop(KEEPER_FD_ENV, None)  # nor the variable (before_exec puts it back)
        return cls(sock)

    def attach(self, timeout: float = 10.0) -> Attached:
        """Ask for everything the keeper holds; returns once its batch is complete."""
        got = Attached()
        self.sock.setblocking(True)
        self.sock.sendall(b"A")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("the keeper did not answer attach")
            words, fd = self._receive()
            if not words:
                raise ConnectionError("the keeper closed its channel")
            kind = words[0]
            if kind == "E":
                got.generation, got.crashes = int(words[1]), int(words[2])
                self.sock.setblocking(False)
                return got
            if kind == "L" and fd >= 0:
                if got.listen_fd >= 0:
                    os.close(got.listen_fd)
                got.listen_fd = fd
            elif kind == "F" and fd >= 0:
                old = got.stored.pop(words[1], None)
                if old is not None:
                    os.close(old)
                got.stored[words[1]] = fd
            elif kind == "C" and fd >= 0:
                old = got.connections.pop(int(words[1]), None)
                if old is not None:
                    os.close(old)
                got.connections[int(words[1])] = fd
            elif fd >= 0:
                os.close(fd)

    def listen(
        self,
        on_connection: Callable[[int, int], object],
        on_reaped: Callable[[int, int], object],
        on_gone: Callable[[], object],
    ) -> None:
        """Hand new connections and reaped orphans to the callbacks as they come."""
        loop = asyncio.get_running_loop()
        self._loop = loop

        def readable() -> None:
            while True:
                try:
                    words, fd = self._receive()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    words, fd = [], -1
                if not words:
                    self.stop()
                    on_gone()
                    return
                if words[0] == "C" and fd >= 0:
                    on_connection(int(words[1]), fd)
                elif words[0] == "Z":
                    on_reaped(int(words[1]), int(words[2]))
                elif fd >= 0:
                    os.close(fd)

        loop.add_reader(self.sock.fileno(), readable)

    def stop(self) -> None:
        """Stop listening (messages wait in the socket for whoever reads it next)."""
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    def keep(self, name: str, fd: int) -> None:
        with contextlib.suppress(OSError):
            socket.send_fds(self.sock, [f"K {name}".encode()], [fd])

    def drop(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(f"D {name}".encode())

    def before_exec(self, env: dict[str, str]) -> None:
        """The re-executed daemon takes the channel over (same number, in ``env``)."""
        self.stop()
        os.set_inheritable(self.sock.fileno(), True)
        env[KEEPER_FD_ENV] = str(self.sock.fileno())

    def _receive(self) -> tuple[list[str], int]:
        # Close-on-exec as they arrive (connections must not leak into runc, logging programs
        # or containers); socket.recv_fds would drop this flag (CPython 3.11 ignores its flags).
        msg, ancdata, _, _ = self.sock.recvmsg(
            _MAX_MESSAGE, socket.CMSG_LEN(4 * _INT.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        for extra in fds[1:]:
            os.close(extra)
        return msg.decode("ascii", "replace").split(), (fds[0] if fds else -1)
