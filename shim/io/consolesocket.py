"""The socket runc hands a terminal process's pty master over (``--console-socket``).

runc creates the pty inside the container, connects to this unix socket and sends the master
with SCM_RIGHTS (the message text is the slave's name).  It does so before ``runc create`` or
``runc exec --detach`` returns, so the master is already queued when runc is done; nobody has
to accept while runc runs.  The socket lives in the daemon's private directory under a short
random name: the directory's path fits a unix socket (the daemon's own socket is there too).
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket

from shim.util.fsutil import unlink_entries

RECEIVE_TIMEOUT = 10.0


def clear(directory: str) -> None:
    """Remove sockets left by a daemon that died while runc was connecting."""
    unlink_entries(directory)


class ConsoleSocket:
    def __init__(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            while True:
                self.path = os.path.join(directory, os.urandom(4).hex())
                try:
                    self.sock.bind(self.path)
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
            self.sock.listen(1)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    async def receive(self, timeout: float = RECEIVE_TIMEOUT) -> int:
        """The pty master runc sent (close-on-exec); OSError if it sent none."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            conn, _ = await loop.sock_accept(self.sock)
            with conn:
                conn.setblocking(False)
                while True:
                    try:
                        msg, fds = _recv_fds(conn)
                        break
                    except BlockingIOError:
                        await _readable(loop, conn.fileno())
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(f"runc sent {len(fds)} fds over the console socket ({msg!r})")
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _recv_fds(conn: socket.socket, maxfds: int = 4) -> tuple[bytes, list[int]]:
    """recvmsg with MSG_CMSG_CLOEXEC (socket.recv_fds drops its flags argument), so the
    master is never inherited by anything the daemon starts."""
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(
        4096, socket.CMSG_SPACE(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)
