"""Watching processes for their exit, whoever their parent is.

For each init and exec process the watcher holds a pidfd, polled on the event loop.  The exit
status comes from, in this order: our reaper (when the daemon is the parent: it reaps on
SIGCHLD), the pinned BPF exit record (any parent, even while the daemon was down), the pidfd's
own exit info (Linux 6.15+), else it is unknown (255).  An exit is reported only once the
process is really gone: its pidfd has become readable, or the reaper has collected it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from shim.exits.reaper import Exit, Reaper, exit_status
from shim.util import log, procinfo

UNKNOWN_STATUS = 255

# (trace_id) -> (wait status, exited_at ns) from the BPF exit map, or None.
ExitRecordLookup = Callable[[int], "tuple[int, int] | None"]


class ExitWatch:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reaper: Reaper,
        lookup: ExitRecordLookup | None = None,
    ) -> None:
        self._loop = loop
        self._reaper = reaper
        self._lookup = lookup
        self._pidfds: dict[int, int] = {}

    def pidfd(self, pid: int) -> int | None:
        return self._pidfds.get(pid)

    def watch(
        self, pid: int, start_time: int, trace_id: int = 0, since: int = 0
    ) -> asyncio.Future[Exit]:
        """A future for the exit of ``pid``.  Call it in the loop thread as soon as the pid is
        known (for our children the reaper may already hold the status; ``since``: see
        :meth:`Reaper.watch`)."""
        fut: asyncio.Future[Exit] = self._loop.create_future()
        child = self._reaper.watch(pid, since)
        if child.done():
            # Reaped already: say so at once (a chained callback would leave the future
            # pending until the loop runs again, and the caller deciding now whether the exit
            # is known would take a dead process for a live one).
            _chain(child, fut)
            return fut
        if _is_our_child(pid):
            child.add_done_callback(lambda f: _chain(f, fut))
            self._hold_pidfd(pid, start_time)
            fut.add_done_callback(lambda _: self._release(pid))
            return fut
        self._reaper.forget(pid)
        held = self._hold_pidfd(pid, start_time)
        if held is None:
            # Gone already, or the pid was recycled: only the exit record can tell.
            fut.set_result(self._status_without_parent(pid, None, trace_id))
            return fut
        fd = held

        def _readable() -> None:
            self._loop.remove_reader(fd)
            if not fut.done():
                fut.set_result(self._status_without_parent(pid, fd, trace_id))

        self._loop.add_reader(fd, _readable)
        fut.add_done_callback(lambda _: self._release(pid))
        return fut

    def _hold_pidfd(self, pid: int, start_time: int) -> int | None:
        fd = procinfo.open_pidfd(pid, start_time)
        if fd is not None:
            old = self._pidfds.pop(pid, None)
            if old is not None:
                os.close(old)
            self._pidfds[pid] = fd
        return fd

    def _release(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def _status_without_parent(self, pid: int, pidfd: int | None, trace_id: int) -> Exit:
        if self._lookup is not None and trace_id:
            record = self._lookup(trace_id)
            if record is not None:
                wait_status, exited_at = record
                return Exit(pid, exit_status(wait_status), exited_at)
        if pidfd is not None:
            info = procinfo.pidfd_exit_status(pidfd)
            if info is not None:
                return Exit(pid, exit_status(info), time.time_ns())
        log.event("exit status unknown", logging.WARNING, pid=pid, trace_id=trace_id)
        return Exit(pid, UNKNOWN_STATUS, time.time_ns())

    def close(self) -> None:
        for pid in list(self._pidfds):
            self._release(pid)


def _is_our_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    ppid = int(data[data.rindex(b")") + 2 :].split()[1])
    return ppid == os.getpid()


def _chain(src: asyncio.Future[Exit], dst: asyncio.Future[Exit]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    else:
        dst.set_result(src.result())
