"""The terminal copy (shim/io/ptycopy.py) against a real pty pair: the slave side plays the
container's process, FIFOs and pipes play containerd's side."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.io.ptycopy import LIMIT, PtyCopier


class Ends:
    """A pty pair, a stdin FIFO (our writer, the copy's reader and hold), and an output pipe."""

    def __init__(self, d: Path) -> None:
        self.master, self.slave = os.openpty()
        self.fifo = str(d / "stdin")
        os.mkfifo(self.fifo)
        self.stdin_r = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.hold = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        self.client = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)  # like ctr's writer
        self.out_r, self.out_w = os.pipe()
        os.set_blocking(self.out_r, False)
        os.set_blocking(self.slave, False)

    def copier(self) -> PtyCopier:
        return PtyCopier(self.master, self.stdin_r, self.hold, self.out_w)

    def close(self) -> None:
        for fd in (self.slave, self.client, self.out_r):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def ends(tmp_path: Path) -> Iterator[Ends]:
    e = Ends(tmp_path)
    yield e
    e.close()


def run(coro: Callable[[], object]) -> None:
    asyncio.run(asyncio.wait_for(coro(), 20))  # type: ignore[arg-type]


async def until(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""
    except OSError:  # EIO on a slave whose master is gone
        return b""


class Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()

    def poll(self) -> bytes:
        self.data += read_some(self.fd)
        return bytes(self.data)


def test_copies_both_ways(ends: Ends) -> None:
    async def main() -> None:
        c = ends.copier()
        c.start()
        slave, out = Reader(ends.slave), Reader(ends.out_r)
        os.write(ends.client, b"typed\n")
        await until("the process reads a line", lambda: slave.poll() == b"typed\n")
        await until("the echo", lambda: out.poll() == b"typed\r\n")
        os.write(ends.slave, b"printed\n")
        await until("the output", lambda: out.poll().endswith(b"printed\r\n"))
        c.close()

    run(main)


def test_close_stdin_after_a_partial_line_gives_it_and_then_eof(ends: Ends) -> None:
    async def main() -> None:
        c = ends.copier()
        c.start()
        os.write(ends.client, b"partial")  # no newline; our writer stays open
        await asyncio.sleep(0.1)
        c.close_stdin()
        # Canonical mode: the first VEOF ends "partial" as a read, the second reads as EOF.
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                got.append(os.read(ends.slave, 100))
            except BlockingIOError:
                await asyncio.sleep(0.005)
        assert got == [b"partial", b""]
        assert c.stdin < 0 and c.hold < 0
        c.close()

    run(main)


def test_close_stdin_drains_the_fifo_first(ends: Ends) -> None:
    async def main() -> None:
        attrs = termios.tcgetattr(ends.slave)
        attrs[6][termios.VEOF] = b"\x05"  # the process chose another EOF character
        termios.tcsetattr(ends.slave, termios.TCSANOW, attrs)
        c = ends.copier()
        os.write(ends.client, b"a\nb\n")
        c.close_stdin()  # before the copy even started: the FIFO still holds both lines
        c.start()
        got = []
        deadline = time.monotonic() + 5
        while (not got or got[-1] != b"") and time.monotonic() < deadline:
            try:
                got.append(os.read(ends.slave, 100))
            except BlockingIOError:
                await asyncio.sleep(0.005)
        assert got == [b"a\n", b"b\n", b""]
        c.close()

    run(main)


def test_a_reader_that_stops_reading_bounds_the_buffer(ends: Ends) -> None:
    tty.setraw(ends.slave)
    os.set_blocking(ends.slave, True)
    total = 4 << 20
    pattern = bytes(range(256)) * 256

    def produce() -> None:
        left = total
        while left:
            left -= os.write(ends.slave, pattern[: min(left, len(pattern))])

    async def main() -> None:
        c = ends.copier()
        c.start()
        t = threading.Thread(target=produce, daemon=True)
        t.start()
        await asyncio.sleep(0.5)  # nobody reads the output pipe meanwhile
        assert len(c.outbuf) <= LIMIT
        assert t.is_alive()  # the process is held up, not the loop
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 10
        got = bytearray()
        while len(got) < total:
            chunk = read_some(ends.out_r)
            got += chunk
            if not chunk:
                await asyncio.sleep(0.001)
        t.join(5)
        assert got == (pattern * (total // len(pattern) + 1))[:total]
        c.close()

    run(main)


def test_output_is_flushed_then_closed_when_the_slave_is_gone(ends: Ends) -> None:
    async def main() -> None:
        c = ends.copier()
        os.write(ends.slave, b"last words\n")
        os.close(ends.slave)
        ends.slave = -1
        c.start()
        await asyncio.wait_for(c.finished.wait(), 5)
        data = b""
        while True:
            chunk = os.read(ends.out_r, 100)
            if not chunk:
                break
            data += chunk
        assert data == b"last words\r\n"  # then EOF: the copy closed its end
        assert c.master == c.out == c.stdin == c.hold == -1

    os.set_blocking(ends.out_r, True)
    run(main)


def test_freeze_and_thaw_lose_nothing(ends: Ends) -> None:
    tty.setraw(ends.slave)

    async def main() -> None:
        c = ends.copier()
        c.start()
        os.write(ends.client, b"before ")
        os.write(ends.slave, b"out1 ")
        out = Reader(ends.out_r)
        await until("first output", lambda: out.poll() == b"out1 ")
        # Bytes the first copy holds but has not written yet, as at a re-exec.
        c.inbuf += b"buffered-in "
        c.outbuf += b"buffered-out "
        state = json.loads(json.dumps(c.freeze()))
        assert c.master == -1  # given up, not closed
        os.write(ends.client, b"after")
        os.write(ends.slave, b"out2")
        c2 = PtyCopier.thaw(state)
        c2.start()
        slave = Reader(ends.slave)
        await until("input", lambda: slave.poll() == b"before buffered-in after")
        await until("output", lambda: out.poll() == b"out1 buffered-out out2")
        c2.close()

    run(main)


def test_resize_reaches_the_slave(ends: Ends) -> None:
    async def main() -> None:
        c = ends.copier()
        c.resize(132, 43)
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(ends.slave, termios.TIOCGWINSZ, bytes(8)))[
            :2
        ]
        assert (rows, cols) == (43, 132)
        c.close()

    run(main)
