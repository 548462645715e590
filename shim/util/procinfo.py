"""Facts about a process from /proc and its pidfd, used to tell a recycled pid from ours."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections.abc import Callable, Iterator

PIDFD_GET_INFO = 0xC048FF0B
PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO_SIZE = 72
_EXIT_CODE_OFFSET = 60


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    # The command name may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[19])


def is_running(pid: int, expected_start_time: int) -> bool:
    """``is_same`` and not yet a zombie: the process has not exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0] != b"Z" and expected_start_time > 0 and int(rest[19]) == expected_start_time


def is_same(pid: int, expected_start_time: int) -> bool:
    """Whether ``pid`` is still the process that started at ``expected_start_time``."""
    return pid > 0 and expected_start_time > 0 and start_time(pid) == expected_start_time


def pidfd_exit_status(pidfd: int) -> int | None:
    """The wait status of a reaped process, from PIDFD_GET_INFO (Linux 6.15+), or None."""
    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError:
        return None
    mask = struct.unpack_from("=Q", buf, 0)[0]
    if not mask & PIDFD_INFO_EXIT:
        return None
    value: int = struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)[0]
    return value


def pidfd_exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (its pidfd polls readable), reaped or
    still a zombie."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def open_pidfd(pid: int, expected_start_time: int) -> int | None:
    """A pidfd for ``pid`` if it is still the process we know, else None.

    The start time is checked after the pidfd is opened, so the fd cannot refer to a process
    that took the pid over between the check and the open.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if expected_start_time and start_time(pid) != expected_start_time:
        os.close(fd)
        return None
    return fd


async def wait_while_running(
    match: Callable[[list[bytes]], bool], what: str, timeout: float = 30.0
) -> None:
    """Until no process's argv satisfies ``match`` (say, a runc a dead daemon started and
    that still runs), or ``timeout``: then logged and given up."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(match(argv) for argv in _argvs()):
            return
        await asyncio.sleep(0.05)
    from shim.util import log

    log.event("still running; going on", logging.WARNING, what=what)


def _argvs() -> Iterator[list[bytes]]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    yield f.read().split(b"\0")
            except OSError:
                continue
