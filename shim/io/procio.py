"""What the daemon holds of one process's stdio, from Create (or exec Start) to Delete.

``open`` prepares the three fds runc hands to the process (shim/io/stdio.py), starts a
``binary://`` logging program first if there is one, and for a terminal the console socket
and the copy's ends.  ``runc_done`` drops the fds only the process needed once runc has
them; ``attach_console`` takes the pty master and starts the copy.
``abort`` undoes everything of a process that did not come to be; ``close`` (Delete) lets
a terminal's copy drain, then stops the logging program.

Across the daemon's re-exec, ``handoff`` gives up the copy's fds and buffers and the logging
program's pid, and ``adopt`` takes them back in the new image.  Across a crash, the keeper
holds duplicates of the copy's fds and a pidfd of the logging program (``keep``), under names
that say whose they are; the next daemon rebuilds both from them (``kept_state``); only the
bytes the copy had read and not yet written are lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

from shim.exits.exitwatch import ExitWatch
from shim.exits.reaper import Reaper
from shim.io.consolesocket import ConsoleSocket
from shim.io.logbinary import LoggingBinary
from shim.io.ptycopy import FD_NAMES, PtyCopier
from shim.io.stdio import Stdio, open_console_input, open_input, open_output, output_scheme
from shim.util import log, procinfo
from shim.util.fsutil import close_quietly

DRAIN_TIMEOUT = 2.0  # at Delete, for a terminal's last output (containerd waits as long)


class FdKeeper(Protocol):
    """Who holds descriptors for the next daemon (shim.cmd.keeperlink.KeeperLink)."""

    def keep(self, name: str, fd: int) -> None: ...
    def drop(self, name: str) -> None: ...


class ProcessIO:
    def __init__(
        self,
        io: Stdio,
        namespace: str,
        process_id: str,
        reaper: Reaper,
        console_dir: str,
        keeper: FdKeeper | None = None,
        key: str = "",
    ) -> None:
        self.io = io
        self._keeper = keeper
        self._key = key  # names this process's fds with the keeper (see kept_state)
        self._kept: list[str] = []
        self._frozen = False
        self._watch_copy: asyncio.Future[None] | None = None
        self.namespace = namespace
        self.process_id = process_id  # containerd's: the exec id, or the container id
        self._reaper = reaper
        self._console_dir = console_dir
        self.triple = (-1, -1, -1)
        self._runc_fds: list[int] = []  # the process's own; closed once runc has them
        self._tty: dict[str, int] = {}  # the copy's stdin/hold/out, until the master comes
        self.console: ConsoleSocket | None = None
        self.copier: PtyCopier | None = None
        self.logger: LoggingBinary | None = None
        self.stdin_closed = False

    @property
    def fields(self) -> dict[str, object]:
        return {"ns": self.namespace, "id": self.process_id}

    @property
    def console_path(self) -> str | None:
        return self.console.path if self.console is not None else None

    async def open(self) -> None:
        try:
            await self._open()
        except BaseException:
            self.abort()
            raise

    async def _open(self) -> None:
        io = self.io
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._runc_fds.append(null)
        out = err = null
        kind = output_scheme(io)
        if kind == "binary":
            self.logger, out_w, err_w = await LoggingBinary.start(
                io.stdout, self.process_id, self.namespace, self._reaper
            )
            if self._keeper is not None:
                pidfd = procinfo.open_pidfd(self.logger.pid, self.logger.start_time)
                if pidfd is not None:
                    name = f"log.{self._key}.{self.logger.pid}.{self.logger.start_time}"
                    self._keep(name, pidfd)
                    os.close(pidfd)
            if io.terminal:
                self._tty["out"] = out_w
                os.close(err_w)  # a terminal has one output; the program sees EOF on fd 4
            else:
                self._runc_fds += [out_w, err_w]
                out, err = out_w, err_w
        elif kind == "file" or (kind == "fifo" and io.terminal):
            if io.stdout:
                out = err = open_output("stdout", io.stdout)
                self._tty_or_runc("out", out)
        elif kind == "fifo":
            if io.stdout:
                out = open_output("stdout", io.stdout)
                self._runc_fds.append(out)
            if io.stderr and io.stderr == io.stdout:
                err = out
            elif io.stderr:
                err = open_output("stderr", io.stderr)
                self._runc_fds.append(err)
        if io.terminal:
            if io.stdin:
                self._tty["stdin"], self._tty["hold"] = open_console_input(io.stdin)
            self.console = ConsoleSocket(self._console_dir)
            self.triple = (null, null, null)
        else:
            stdin = null
            if io.stdin:
                stdin = open_input(io.stdin)
                self._runc_fds.append(stdin)
            self.triple = (stdin, out, err)

    def _tty_or_runc(self, name: str, fd: int) -> None:
        if self.io.terminal:
            self._tty[name] = fd
        else:
            self._runc_fds.append(fd)

    def runc_done(self) -> None:
        """runc holds the process's fds now: drop ours, so readers see
        EOF when the process is done with them."""
        for fd in self._runc_fds:
            close_quietly(fd)
        self._runc_fds = []
        self.triple = (-1, -1, -1)

    async def attach_console(self) -> None:
        """Take the pty master runc sent and start copying (a terminal process only)."""
        if self.console is None:
            return
        try:
            master = await self.console.receive()
        finally:
            self.console.close()
            self.console = None
        tty, self._tty = self._tty, {}
        self.copier = PtyCopier(
            master, tty.get("stdin", -1), tty.get("hold", -1), tty.get("out", -1), self.fields
        )
        if self.stdin_closed:
            self.copier.close_stdin()
        self.copier.start()
        self._keep_copy()

    def _keep_copy(self) -> None:
        if self._keeper is None or self.copier is None:
            return
        for which, fd in self.copier.fds().items():
            if fd >= 0:
                self._keep(f"tty.{self._key}.{which}", fd)
        self._unkeep_copy_when_done(self.copier)

    def _unkeep_copy_when_done(self, copier: PtyCopier) -> None:
        """Once the copy is over, the keeper lets go of its fds too: its duplicate of the
        stdout FIFO's writer would keep the client from ever seeing EOF."""

        async def wait() -> None:
            await copier.finished.wait()
            if self._frozen or self._keeper is None:
                return  # handed over, not over
            for name in [n for n in self._kept if n.startswith("tty.")]:
                self._keeper.drop(name)
                self._kept.remove(name)

        self._watch_copy = asyncio.ensure_future(wait())

    def _keep(self, name: str, fd: int) -> None:
        assert self._keeper is not None
        self._keeper.keep(name, fd)
        self._kept.append(name)

    def _unkeep(self) -> None:
        if self._keeper is not None:
            for name in self._kept:
                self._keeper.drop(name)
        self._kept = []

    def close_stdin(self) -> None:
        """CloseIO.  A terminal's copy ends its stdin (VEOF); other processes read the FIFO
        themselves and see EOF when the last client writer closes: nothing to do here."""
        self.stdin_closed = True
        if self.copier is not None:
            self.copier.close_stdin()

    def resize(self, width: int, height: int) -> None:
        if self.copier is None:
            return  # like containerd's runc shim: no console, nothing to resize
        try:
            self.copier.resize(width, height)
        except OSError as exc:
            log.event("resize failed", logging.WARNING, **self.fields, error=exc)

    def abort(self) -> None:
        """The process did not come to be: close everything, kill the logging program."""
        self._unkeep()
        self._close_fds()
        if self.copier is not None:
            self.copier.close()
        if self.logger is not None:
            self.logger.kill()

    async def close(self) -> None:
        """Delete: the terminal's last output out (for a while), then the logging program."""
        self._unkeep()
        if self.copier is not None:
            if not await self.copier.wait(DRAIN_TIMEOUT):
                log.event("terminal still open at delete; closing it", **self.fields)
            self.copier.close()
        self._close_fds()
        if self.logger is not None:
            await self.logger.stop()

    def _close_fds(self) -> None:
        self.runc_done()
        for fd in self._tty.values():
            close_quietly(fd)
        self._tty = {}
        if self.console is not None:
            self.console.close()
            self.console = None

    # --- across the daemon's re-exec ---

    def handoff(self) -> dict[str, Any] | None:
        """The copy's fds (made inheritable) and buffers, the logging program; or None."""
        state: dict[str, Any] = {"kept": list(self._kept)}
        self._frozen = True
        if self.copier is not None and not self.copier.finished.is_set():
            state["console"] = self.copier.freeze()
            for fd in PtyCopier.fds_of(state["console"]):
                os.set_inheritable(fd, True)
        if self.logger is not None and self.logger.alive():
            state["logger"] = self.logger.handoff()
        if len(state) == 1:
            return None
        state["stdin_closed"] = self.stdin_closed
        return state

    @staticmethod
    def handoff_fds(state: dict[str, Any]) -> list[int]:
        console = state.get("console")
        return PtyCopier.fds_of(console) if console else []

    def adopt(self, state: dict[str, Any], exits: ExitWatch | None = None) -> None:
        """Take back what ``handoff`` gave up in the previous image (or what ``kept_state``
        found with the keeper after a crash: then the logging program is not our child, and
        ``exits`` watches it)."""
        self.stdin_closed = bool(state.get("stdin_closed"))
        self._kept = list(state.get("kept", ()))
        console = state.get("console")
        if console:
            self.copier = PtyCopier.thaw(console, self.fields)
            self.copier.start()
            if any(n.startswith("tty.") for n in self._kept):
                self._unkeep_copy_when_done(self.copier)
        logger = state.get("logger")
        if logger:
            self.logger = LoggingBinary.adopt(logger, self._reaper, exits)

    @staticmethod
    def kept_state(key: str, kept: dict[str, int]) -> dict[str, Any] | None:
        """What a dead daemon had the keeper hold for the process ``key``, as ``adopt``
        takes it (the descriptors are taken out of ``kept``); None if nothing."""
        state: dict[str, Any] = {"kept": []}
        copy = {}
        for which in FD_NAMES:
            name = f"tty.{key}.{which}"
            fd = kept.pop(name, -1)
            copy[which] = fd
            if fd >= 0:
                state["kept"].append(name)
        if copy["master"] >= 0:
            state["console"] = PtyCopier.fresh_state(copy)
        else:
            for fd in copy.values():
                close_quietly(fd)
        for name in [n for n in kept if n.startswith(f"log.{key}.")]:
            close_quietly(kept.pop(name))
            _, _, pid, start = name.split(".")
            state["logger"] = [int(pid), int(start)]
            state["kept"].append(name)
        return state if len(state) > 1 else None
