"""The reaper keeps an exit nobody claimed yet, but not for a later process with its pid."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from shim.exits.reaper import Reaper, exited_unreaped


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


def test_an_exit_not_yet_reaped_is_seen_and_left_for_the_reaper() -> None:
    """exited_unreaped: None while the child runs, its code (or 128+signal) once it ended,
    and the zombie stays for the one reaper to collect, with the same status."""
    pid = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", "sleep 100"])
    try:
        assert exited_unreaped(pid) is None
    finally:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (ex := exited_unreaped(pid)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ex is not None and (ex.pid, ex.status) == (pid, 128 + signal.SIGKILL)
    assert exited_unreaped(pid) is not None  # still a zombie: not reaped
    assert os.waitpid(pid, 0) == (pid, signal.SIGKILL)
    pid = os.spawnv(os.P_NOWAIT, "/bin/sh", ["sh", "-c", "exit 7"])
    while (ex := exited_unreaped(pid)) is None:
        time.sleep(0.01)
    assert ex.status == 7
    assert os.waitpid(pid, 0)[1] >> 8 == 7
    assert exited_unreaped(pid) is None  # reaped: not ours any more
