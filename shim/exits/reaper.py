"""The daemon's one and only reaper.

The daemon is a child subreaper, so every container init (orphaned when ``runc create`` exits)
and every orphan beneath it is re-parented to us.  Exactly one place may call wait: here, on
SIGCHLD, in the event-loop thread.  Statuses of the processes someone watches are handed to
them; a status nobody claimed yet (a container that exited before we read its pid file) is kept
for a while so the late watcher still gets it.  Nothing else in the daemon may use
``subprocess`` or asyncio's child watchers, which would race with this.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
UNCLAIMED_TTL = 300.0
UNCLAIMED_MAX = 4096


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(PR_SET_CHILD_SUBREAPER)")


def exit_status(wait_status: int) -> int:
    """containerd's convention: the exit code, or 128+signal for a death by signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    return 255


def exited_unreaped(pid: int) -> Exit | None:
    """The exit of our child ``pid`` if it has ended and is not reaped yet, without reaping
    it (WNOWAIT: the reaper still collects it).  For a process just registered with the BPF
    exit map: an exit before the registration is seen here, one after it is in the map."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        status = info.si_status
    else:  # killed or dumped: 128+signal, as exit_status() says
        status = 128 + info.si_status
    return Exit(pid, status, time.time_ns())


class Exit:
    __slots__ = ("pid", "status", "at")

    def __init__(self, pid: int, status: int, at: int) -> None:
        self.pid = pid
        self.status = status  # containerd's convention, see exit_status()
        self.at = at  # wall clock, ns

    def __repr__(self) -> str:
        return f"Exit(pid={self.pid}, status={self.status})"


class Reaper:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: dict[int, asyncio.Future[Exit]] = {}
        self._unclaimed: dict[int, tuple[Exit, float]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def close(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(self, pid: int, since: int = 0) -> asyncio.Future[Exit]:
        """A future for the exit of our child ``pid``; call it in the loop thread right
        after the pid became known, before yielding to the loop.  A kept exit from before
        ``since`` (wall clock, ns: when the caller started the program that made it) is of an
        earlier process with the same pid, not of this one."""
        fut = self._waiters.get(pid)
        if fut is not None:
            return fut
        fut = self._loop.create_future()
        found = self._unclaimed.pop(pid, None)
        if found is not None and found[0].at >= since:
            fut.set_result(found[0])
        else:
            self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        fut = self._waiters.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def pending(self) -> int:
        return len(self._waiters)

    def reap(self) -> None:
        """Collect every zombie child now."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            ex = Exit(pid, exit_status(wait_status), time.time_ns())
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(ex)
            else:
                self._stash(ex)

    def _stash(self, ex: Exit) -> None:
        now = time.monotonic()
        if len(self._unclaimed) >= UNCLAIMED_MAX:
            for pid, (_, t) in list(self._unclaimed.items()):
                if now - t > UNCLAIMED_TTL or len(self._unclaimed) >= UNCLAIMED_MAX:
                    del self._unclaimed[pid]
        self._unclaimed[ex.pid] = (ex, now)
