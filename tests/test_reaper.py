"""The reaper keeps an exit nobody claimed yet, but not for a later process with its pid."""

from __future__ import annotations

import asyncio
import os
import time

from shim.exits.reaper import Reaper


def test_an_early_exit_is_kept_for_its_watcher_and_not_for_a_recycled_pid() -> None:
    async def main() -> None:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            since = time.time_ns()
            pid = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", "exit 7"])
            while pid not in reaper._unclaimed:
                await asyncio.sleep(0.01)  # reaped on SIGCHLD before anyone watched it
            # A process started after that exit (same pid, recycled) must not get it...
            later = reaper.watch(pid, since=time.time_ns())
            assert not later.done()
            reaper.forget(pid)
            # ...but the one whose starter took ``since`` before it ran does.
            pid2 = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", "exit 9"])
            while pid2 not in reaper._unclaimed:
                await asyncio.sleep(0.01)
            ex = await reaper.watch(pid2, since=since)
            assert (ex.pid, ex.status) == (pid2, 9)
        finally:
            reaper.close()

    asyncio.run(asyncio.wait_for(main(), 10))
