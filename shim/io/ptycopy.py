"""Copying between a terminal process's pty master and its stdio, on the daemon's event loop.

A terminal process's stdio is the pty slave, so, unlike other processes, its bytes have to
pass through the daemon: stdin FIFO -> master, master -> stdout (FIFO, file or logger pipe).
Everything is non-blocking with one bounded buffer per direction, and each readiness
callback does one read or one write: a reader that stops reading stops only this copy (the
buffer fills, the master is no longer read, the process blocks in its own write), never the
loop or another task.

The daemon keeps a writer of its own on the stdin FIFO (``hold``), so the FIFO never reads
as EOF because no client is attached yet or one went away; EOF on stdin comes only from
CloseIO: the FIFO is drained, then the terminal's VEOF character is written to the master
(twice after a partial line: the first one only ends the line), which is what a user's
Ctrl-D does.

``freeze`` stops copying and returns the whole state (fds and unwritten bytes), so a
re-executed daemon can take the copy over with ``thaw``.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
import struct
import termios
from typing import Any

from shim.util import log
from shim.util.fsutil import close_quietly

LIMIT = 64 * 1024
#: The copy's descriptors: the pty master, the stdin FIFO (read), our own writer holding
#: that FIFO open, the stdout FIFO (write).
FD_NAMES = ("master", "stdin", "hold", "out")
TIOCGPTPEER = 0x5441
DEFAULT_VEOF = b"\x04"
_LINE_ENDS = (b"", b"\n", b"\r")


def _pollable(fd: int) -> bool:
    """epoll refuses regular files (they are always ready): those are written in full."""
    return fd >= 0 and not stat.S_ISREG(os.fstat(fd).st_mode)


def veof_char(master: int) -> bytes:
    """The slave's VEOF character (as the process set it), read through a peer fd."""
    try:
        peer = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return DEFAULT_VEOF
    try:
        cc = termios.tcgetattr(peer)[6]
        ch = cc[termios.VEOF]
        return ch if isinstance(ch, bytes) and ch not in (b"", b"\0") else DEFAULT_VEOF
    except termios.error:
        return DEFAULT_VEOF
    finally:
        os.close(peer)


def set_size(fd: int, width: int, height: int) -> None:
    """TIOCSWINSZ: the kernel tells the slave's foreground process group (SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


class PtyCopier:
    """The copy for one terminal process.  fds: ``master`` (the pty master), ``stdin`` (the
    FIFO's read end, -1 without stdin), ``hold`` (our writer on it), ``out`` (-1: output is
    read and dropped).  The copier owns them all and closes them when it finishes."""

    def __init__(
        self,
        master: int,
        stdin: int = -1,
        hold: int = -1,
        out: int = -1,
        fields: dict[str, object] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.fields = fields or {}
        self.master, self.stdin, self.hold, self.out = master, stdin, hold, out
        for fd in (master, stdin, out):
            if fd >= 0:
                os.set_blocking(fd, False)
        self._out_pollable = _pollable(out)
        self.inbuf = bytearray()  # stdin -> master
        self.outbuf = bytearray()  # master -> out
        self.eof_owed = b""  # VEOF characters still to write after inbuf
        self.last_in = b""  # the last byte written to the master
        self.closing_stdin = False  # CloseIO: finish stdin once the FIFO is drained
        self.master_eof = False  # every holder of the slave has closed it
        self.finished = asyncio.Event()
        self.bytes_in = 0
        self.bytes_out = 0
        self._readers: set[int] = set()
        self._writers: set[int] = set()

    # --- what the process service asks for ---

    def resize(self, width: int, height: int) -> None:
        if self.master >= 0:
            set_size(self.master, width, height)

    def close_stdin(self) -> None:
        """CloseIO: release our writer; stdin ends (VEOF) once the FIFO is drained."""
        self.closing_stdin = True
        self._drop("hold")
        if not self.finished.is_set():
            self._update()

    def start(self) -> None:
        """Start copying (level-triggered: what is already waiting is picked up)."""
        self._update()

    async def wait(self, timeout: float) -> bool:
        """Wait until the process side is done and all output written; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self.finished.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Stop now, dropping what is not written yet."""
        for name in ("stdin", "hold", "out", "master"):
            self._drop(name)
        self.inbuf.clear()
        self.outbuf.clear()
        self.finished.set()

    # --- handoff across the daemon's re-exec ---

    def freeze(self) -> dict[str, Any]:
        """Stop copying and give up every fd (not closed) and unwritten byte, as JSON data."""
        import base64  # freeze, fresh_state and thaw only: a reload or a crash (issue 14)

        self._unwatch_all()
        state = {
            "master": self.master,
            "stdin": self.stdin,
            "hold": self.hold,
            "out": self.out,
            "inbuf": base64.b64encode(bytes(self.inbuf)).decode(),
            "outbuf": base64.b64encode(bytes(self.outbuf)).decode(),
            "eof_owed": base64.b64encode(self.eof_owed).decode(),
            "last_in": base64.b64encode(self.last_in).decode(),
            "closing_stdin": self.closing_stdin,
            "master_eof": self.master_eof,
        }
        self.master = self.stdin = self.hold = self.out = -1
        self.finished.set()
        return state

    def fds(self) -> dict[str, int]:
        """The copy's descriptors by name (FD_NAMES; -1 for none)."""
        return {name: getattr(self, name) for name in FD_NAMES}

    @staticmethod
    def fresh_state(fds: dict[str, int]) -> dict[str, Any]:
        """A ``freeze`` state for these fds with nothing buffered (a crash lost the buffers)."""
        import base64

        empty = base64.b64encode(b"").decode()
        return {
            **{k: fds.get(k, -1) for k in FD_NAMES},
            "inbuf": empty,
            "outbuf": empty,
            "eof_owed": empty,
            "last_in": empty,
            "closing_stdin": False,
            "master_eof": False,
        }

    @staticmethod
    def fds_of(state: dict[str, Any]) -> list[int]:
        return [int(state[k]) for k in FD_NAMES if int(state[k]) >= 0]

    @classmethod
    def thaw(cls, state: dict[str, Any], fields: dict[str, object] | None = None) -> PtyCopier:
        """The copy ``freeze`` stopped, taken over (call ``start`` to run it)."""
        import base64

        for fd in cls.fds_of(state):
            os.set_inheritable(fd, False)
        c = cls(int(state["master"]), int(state["stdin"]), int(state["hold"]),
                int(state["out"]), fields)  # fmt: skip
        c.inbuf = bytearray(base64.b64decode(state["inbuf"]))
        c.outbuf = bytearray(base64.b64decode(state["outbuf"]))
        c.eof_owed = base64.b64decode(state["eof_owed"])
        c.last_in = base64.b64decode(state["last_in"])
        c.closing_stdin = bool(state["closing_stdin"])
        c.master_eof = bool(state["master_eof"])
        return c

    # --- the copy: each callback does one read or one write, then _update ---

    def _on_stdin(self) -> None:
        room = LIMIT - len(self.inbuf)
        if self.stdin < 0 or room <= 0:
            return
        try:
            data = os.read(self.stdin, room)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.inbuf += data
            self._write_master()
        else:
            self._end_stdin()
        self._update()

    def _end_stdin(self) -> None:
        """stdin is over (EOF, or drained after CloseIO): owe the process its VEOF."""
        self._drop("stdin")
        self._drop("hold")
        if self.master >= 0 and not self.master_eof:
            ch = veof_char(self.master)
            ended = bytes(self.inbuf[-1:]) if self.inbuf else self.last_in
            self.eof_owed = ch if ended in (*_LINE_ENDS, ch) else ch + ch
            self._write_master()

    def _write_master(self) -> None:
        data = self.inbuf if self.inbuf else self.eof_owed
        if self.master < 0 or not data:
            return
        try:
            n = os.write(self.master, data)
        except BlockingIOError:
            return
        except OSError:
            # The slave side is gone: nobody will read stdin any more.
            self.inbuf.clear()
            self.eof_owed = b""
            self._drop("stdin")
            self._drop("hold")
            return
        self.last_in = bytes(data[n - 1 : n]) if n > 0 else self.last_in
        self.bytes_in += n
        if self.inbuf:
            del self.inbuf[:n]
        else:
            self.eof_owed = self.eof_owed[n:]

    def _on_master_writable(self) -> None:
        self._write_master()
        self._update()

    def _on_master_readable(self) -> None:
        # A pty hands out at most 4095 bytes per read: read on until the buffer is full or
        # the pty empty (at most LIMIT bytes per callback), then write once.
        got = 0
        while self.master >= 0 and not self.master_eof and got < LIMIT:
            room = LIMIT - len(self.outbuf)
            if room <= 0:
                break
            try:
                data = os.read(self.master, room)
            except BlockingIOError:
                break
            except OSError as exc:  # EIO: every holder of the slave closed it
                if exc.errno != errno.EIO:
                    log.event("pty read failed", logging.WARNING, **self.fields, error=exc)
                data = b""
            if not data:
                self.master_eof = True
                break
            got += len(data)
            self.bytes_out += len(data)
            if self.out >= 0:
                self.outbuf += data
        if self.outbuf:
            self._write_out()
        self._update()

    def _write_out(self) -> None:
        while self.outbuf and self.out >= 0:
            try:
                n = os.write(self.out, self.outbuf)
            except BlockingIOError:
                return
            except OSError as exc:  # EPIPE from a logger that went away, ENOSPC, ...
                log.event("terminal output dropped", logging.WARNING, **self.fields, error=exc)
                self._drop("out")
                self.outbuf.clear()
                return
            del self.outbuf[:n]
            if self._out_pollable:
                return  # one write per callback; the rest when it is writable again

    def _on_out_writable(self) -> None:
        self._write_out()
        self._update()

    def _update(self) -> None:
        """Watch exactly what can make progress; finish once the process side is done."""
        if self.finished.is_set():
            return
        if self.closing_stdin and self.stdin >= 0 and not self.inbuf and _fifo_empty(self.stdin):
            self._end_stdin()
        if self.master_eof and not self.outbuf:
            log.event(
                "terminal closed", logging.DEBUG, **self.fields,
                bytes_in=self.bytes_in, bytes_out=self.bytes_out,
            )  # fmt: skip
            self.close()
            return
        self._watch(self._readers, self.stdin, len(self.inbuf) < LIMIT, self._on_stdin)
        busy_in = bool(self.inbuf or self.eof_owed)
        self._watch(self._writers, self.master, busy_in, self._on_master_writable)
        reading = not self.master_eof and len(self.outbuf) < LIMIT
        self._watch(self._readers, self.master, reading, self._on_master_readable)
        if self._out_pollable:
            self._watch(self._writers, self.out, bool(self.outbuf), self._on_out_writable)

    def _watch(self, kind: set[int], fd: int, want: bool, callback: Any) -> None:
        if fd < 0 or want == (fd in kind):
            return
        reading = kind is self._readers
        if want:
            (self._loop.add_reader if reading else self._loop.add_writer)(fd, callback)
            kind.add(fd)
        else:
            (self._loop.remove_reader if reading else self._loop.remove_writer)(fd)
            kind.discard(fd)

    def _unwatch_all(self) -> None:
        for fd in self._readers:
            self._loop.remove_reader(fd)
        for fd in self._writers:
            self._loop.remove_writer(fd)
        self._readers.clear()
        self._writers.clear()

    def _drop(self, name: str) -> None:
        """Stop watching one of our fds, then close it (never the other way round: a closed
        number can be reused at once)."""
        fd: int = getattr(self, name)
        if fd < 0:
            return
        if fd in self._readers:
            self._loop.remove_reader(fd)
            self._readers.discard(fd)
        if fd in self._writers:
            self._loop.remove_writer(fd)
            self._writers.discard(fd)
        setattr(self, name, -1)
        close_quietly(fd)


def _fifo_empty(fd: int) -> bool:
    """Nothing to read in the FIFO right now (FIONREAD)."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return True
    return int.from_bytes(buf, "little") == 0
