"""Crash windows a test arms through the daemon's ``Fault`` call (root only, like every call
there, and no worse than root's ``kill -9``): the daemon kills itself with SIGKILL at a point
where a crash must lose nothing.  One object per daemon, in the tasks' Deps, so no module
holds test state and the task code says plainly where each window is."""

from __future__ import annotations

import asyncio
import os
import signal

from shim.exits.reaper import Exit, exited_unreaped


class Faults:
    """Which windows are armed.  Each kills the daemon the first time it is reached (the
    keeper starts the next one, whose tasks are what the test then checks)."""

    def __init__(self) -> None:
        #: Delete: the task or exec is gone, its answer not sent
        self.after_delete = False
        #: exec Start waits for its process to end; killed once the exec's first record (with
        #: that exit) is written, before TaskExecStarted and the exit go out
        self.exec_exit_window = False
        #: Create kills its init right after ``runc create``, before its BPF registration (as
        #: the OOM killer could); killed once that exit is in the record
        self.create_exit_window = False

    #: the windows' names in the Fault call
    NAMES = (b"kill-after-delete", b"kill-in-exec-exit-window", b"kill-in-create-exit-window")

    def arm(self, name: bytes) -> bool:
        """Arm the window the Fault call names; False if ``name`` is none of :data:`NAMES`."""
        if name == b"kill-after-delete":
            self.after_delete = True
        elif name == b"kill-in-exec-exit-window":
            self.exec_exit_window = True
        elif name == b"kill-in-create-exit-window":
            self.create_exit_window = True
        else:
            return False
        return True

    @staticmethod
    def kill_daemon() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    async def wait_for_exit(exited: asyncio.Future[Exit]) -> None:
        """The exec's process ended (bounded: a process that does not end is left running)."""
        try:
            async with asyncio.timeout(10):
                await asyncio.shield(exited)
        except TimeoutError:
            pass

    @staticmethod
    async def kill_init(pid: int) -> None:
        """SIGKILL to the created init, then wait until it has ended (a zombie of ours)."""
        os.kill(pid, signal.SIGKILL)
        for _ in range(1000):
            if exited_unreaped(pid) is not None or not os.path.exists(f"/proc/{pid}"):
                return
            await asyncio.sleep(0.01)
