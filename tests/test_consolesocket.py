"""The console socket: a pty master sent the way runc sends it (SCM_RIGHTS plus the slave's
name) comes out as a close-on-exec fd to the same pty."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import threading
from pathlib import Path

import pytest

from shim.io import consolesocket
from shim.io.consolesocket import ConsoleSocket


def _send(path: str, fds: list[int], name: bytes = b"/dev/pts/7") -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        if fds:
            socket.send_fds(s, [name], fds)


def test_receives_the_master(tmp_path: Path) -> None:
    master, slave = os.openpty()

    async def main() -> int:
        cs = ConsoleSocket(str(tmp_path / "c"))
        try:
            assert len(cs.path) < 108
            t = threading.Thread(target=_send, args=(cs.path, [master]))
            t.start()
            fd = await cs.receive(5)
            t.join()
            return fd
        finally:
            cs.close()
            assert not os.path.exists(cs.path)

    fd = asyncio.run(main())
    try:
        assert os.fstat(fd).st_rdev == os.fstat(master).st_rdev
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(fd, b"x\n")
        assert os.read(slave, 10) == b"x\n"
    finally:
        for f in (fd, master, slave):
            os.close(f)


@pytest.mark.parametrize("fds", [0, 2])
def test_anything_but_one_fd_is_an_error(tmp_path: Path, fds: int) -> None:
    pairs = [os.pipe() for _ in range(fds)]

    async def main() -> None:
        cs = ConsoleSocket(str(tmp_path))
        try:
            t = threading.Thread(target=_send, args=(cs.path, [r for r, _ in pairs]))
            t.start()
            with pytest.raises(OSError):
                await cs.receive(5)
            t.join()
        finally:
            cs.close()

    asyncio.run(main())
    # Nothing received was leaked: only our own ends are open.
    for r, w in pairs:
        os.close(r)
        os.close(w)


def test_nobody_connects(tmp_path: Path) -> None:
    async def main() -> None:
        cs = ConsoleSocket(str(tmp_path))
        try:
            with pytest.raises(TimeoutError):
                await cs.receive(0.2)
        finally:
            cs.close()

    asyncio.run(main())


def test_clear_removes_leftovers(tmp_path: Path) -> None:
    cs = ConsoleSocket(str(tmp_path / "c"))
    cs.sock.close()  # a daemon that died: the file stays
    consolesocket.clear(str(tmp_path / "c"))
    assert os.listdir(tmp_path / "c") == []
    consolesocket.clear(str(tmp_path / "missing"))
