"""A command run on the slave side of a fresh pty, driven the way a user at a terminal would:
typed bytes in, the screen's bytes out, and window-size changes (SIGWINCH) from the outside."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence

_CSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _take_terminal() -> None:  # pragma: no cover - runs in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtySession:
    """``argv`` with the pty's slave as stdin/stdout/stderr and controlling terminal (so a
    resize reaches it as SIGWINCH, like in a terminal emulator)."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], rows: int = 24, cols: int = 80
    ) -> None:
        self.master, slave = os.openpty()
        set_size(slave, rows, cols)
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=dict(env),
                start_new_session=True,
                preexec_fn=_take_terminal,
            )
        except BaseException:
            os.close(self.master)
            raise
        finally:
            os.close(slave)
        self.screen = bytearray()  # everything read so far
        self.mark = 0  # expect() searches from here

    def write(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.master, data) :]

    def resize(self, rows: int, cols: int) -> None:
        set_size(self.master, rows, cols)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the command and everything it started closed the terminal
            chunk = b""
        if not chunk:
            raise EOFError(f"terminal closed; screen so far: {bytes(self.screen[-500:])!r}")
        # The shell's line editor may redraw what was typed, with control sequences inside
        # the text (``printf 'h\x1b[Jalf '``): tests look for what a person would see.
        pending = self._partial + chunk
        cut = pending.rfind(b"\x1b")
        if cut >= 0 and _CSI.match(pending, cut) is None and len(pending) - cut < 16:
            pending, self._partial = pending[:cut], pending[cut:]  # a sequence split by read
        else:
            self._partial = b""
        self.screen += _CSI.sub(b"", pending)
        return True

    _partial = b""

    def expect(self, pattern: bytes, timeout: float = 15.0) -> re.Match[bytes]:
        """Wait for ``pattern`` (a regex) after the mark; move the mark past it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.screen, self.mark)
            if m:
                self.mark = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{pattern!r} not seen in {timeout}s; after the mark: "
                    f"{bytes(self.screen[self.mark :][-800:])!r}"
                )
            try:
                self._read(min(left, 0.5))
            except EOFError:
                m = rx.search(self.screen, self.mark)
                if m:
                    self.mark = m.end()
                    return m
                raise

    def drain(self, quiet: float = 0.2) -> None:
        """Read until nothing comes for ``quiet`` seconds; move the mark to the end."""
        try:
            while self._read(quiet):
                pass
        except EOFError:
            pass
        self.mark = len(self.screen)

    def wait(self, timeout: float = 20.0) -> int:
        """The command's exit code, reading (so it is never blocked on the terminal)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.proc.args!r} still running after {timeout}s")
            try:
                self._read(0.1)
            except EOFError:
                time.sleep(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
