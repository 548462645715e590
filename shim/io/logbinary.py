"""``binary:///path?args`` stdio: a logging program gets the process's output, as containerd
documents it.

The program runs with only ``CONTAINER_ID`` and ``CONTAINER_NAMESPACE`` in its environment
(containerd passes the process id: an exec's own id for an exec), the URI's query as
arguments (each key, then its first value), fd 3 the read end of the process's stdout pipe,
fd 4 that of its stderr pipe, and fd 5 a pipe it writes to or closes once it is ready.  The
process is created only after that.  The daemon keeps no end of the output pipes: the
program sees EOF when the process and whatever inherited its stdout and stderr are gone, so
a daemon restart changes nothing for it.  At Delete it gets a moment to finish, then SIGTERM,
then SIGKILL.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal

from shim.exits.exitwatch import ExitWatch
from shim.exits.reaper import Exit, Reaper
from shim.util import errors, limits, log, procinfo

READY_TIMEOUT = 30.0
EXIT_GRACE = 2.0  # for the program to finish on its own (it has seen EOF by then)
TERM_GRACE = 10.0  # after SIGTERM, before SIGKILL


def command(uri: str) -> list[str]:
    """argv for a ``binary://`` URI: the path, then each query key and its first value."""
    # Here, not at the top: urllib.parse (with ipaddress) costs the daemon about 0.4 MB, and
    # only binary:// stdio needs it (see shim.io.stdio._urlparse).
    from urllib.parse import parse_qsl, urlparse

    parsed = urlparse(uri)
    bad = parsed.netloc or not os.path.isabs(parsed.path) or "\0" in uri
    if parsed.scheme != "binary" or bad:
        raise errors.invalid(f"stdout: {uri!r} is not a binary:///<absolute path> URI")
    argv = [parsed.path]
    seen: set[str] = set()
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        if key not in seen:
            seen.add(key)
            argv += [key, value]
    return argv


def _above(fd: int, floor: int) -> int:
    """``fd`` moved to a number >= floor, so dup2 onto 3, 4, 5 cannot clobber another."""
    if fd >= floor:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(fd)
    return new


class LoggingBinary:
    def __init__(self, pid: int, start_time: int, exited: asyncio.Future[Exit]) -> None:
        self.pid = pid
        self.start_time = start_time
        self.exited = exited

    @classmethod
    async def start(
        cls, uri: str, process_id: str, namespace: str, reaper: Reaper
    ) -> tuple[LoggingBinary, int, int]:
        """Start the program and wait until it is ready; returns it with the write ends of
        the stdout and stderr pipes (for the process)."""
        argv = command(uri)
        if not os.access(argv[0], os.X_OK):
            raise errors.invalid(f"stdout: logging binary {argv[0]} is not an executable file")
        env = {"CONTAINER_ID": process_id, "CONTAINER_NAMESPACE": namespace}
        fds: dict[str, int] = {}
        try:
            fds["out_r"], fds["out_w"] = os.pipe()
            fds["err_r"], fds["err_w"] = os.pipe()
            fds["ready_r"], fds["ready_w"] = os.pipe()
            for name in ("out_r", "err_r", "ready_w"):
                fds[name] = _above(fds[name], 6)
            pid = _spawn(argv, [fds["out_r"], fds["err_r"], fds["ready_w"]], env)
        except OSError as exc:
            for fd in fds.values():
                os.close(fd)
            raise errors.invalid(f"stdout: cannot start logging binary {argv[0]}: {exc}") from None
        exited = reaper.watch(pid)
        logger = cls(pid, procinfo.start_time(pid), exited)
        for name in ("out_r", "err_r", "ready_w"):  # the program holds these now
            os.close(fds[name])
        try:
            await _wait_ready(fds["ready_r"])
        except BaseException:
            os.close(fds["out_w"])
            os.close(fds["err_w"])
            logger.kill()
            raise
        finally:
            os.close(fds["ready_r"])
        log.event("logging binary ready", ns=namespace, id=process_id, logger=logger.pid)
        return logger, fds["out_w"], fds["err_w"]

    def alive(self) -> bool:
        return not self.exited.done()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        # Until the reaper has its status, the pid cannot have been reused.
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    async def stop(self) -> None:
        """Let the program finish, then SIGTERM, then SIGKILL (containerd's order)."""
        for grace, sig in ((EXIT_GRACE, signal.SIGTERM), (TERM_GRACE, signal.SIGKILL)):
            if not self.alive():
                return
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self.exited)
                return
            except TimeoutError:
                log.event("logging binary still running", logging.WARNING, pid=self.pid, signal=sig)
                self.kill(sig)

    def handoff(self) -> list[int]:
        return [self.pid, self.start_time]

    @classmethod
    def adopt(
        cls, state: list[int], reaper: Reaper, exits: ExitWatch | None = None
    ) -> LoggingBinary | None:
        """The program a previous image of this daemon started, if it still runs (still our
        child after a re-exec, which keeps the pid; the keeper's after a crash: then
        ``exits`` watches it by pidfd)."""
        pid, start_time = int(state[0]), int(state[1])
        if not procinfo.is_same(pid, start_time):
            return None
        if exits is not None:
            return cls(pid, start_time, exits.watch(pid, start_time))
        return cls(pid, start_time, reaper.watch(pid))


def _spawn(argv: list[str], fds: list[int], env: dict[str, str]) -> int:
    """posix_spawn with the pipes on 3, 4, 5, stdio on /dev/null, signals at default.

    (subprocess cannot put an fd on a chosen number without a preexec_fn, which is unsafe
    in a threaded process.  glibc's posix_spawn leaves its reserved signals 32 and 33 ignored
    in the child; that matters for a container's processes, not for a logging program.)
    """
    null = os.devnull
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, fds[0], 3),
        (os.POSIX_SPAWN_DUP2, fds[1], 4),
        (os.POSIX_SPAWN_DUP2, fds[2], 5),
    ]
    defaults = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}

    def posix_spawn(path: str, argv: list[str]) -> int:
        return os.posix_spawn(
            path, argv, env, file_actions=actions, setsigmask=(), setsigdef=defaults
        )

    return limits.spawn(posix_spawn, argv[0], argv)  # the daemon's original open-file limit


async def _wait_ready(fd: int) -> None:
    """A byte or EOF on the readiness pipe (a program that exits closes it: containerd
    counts that as ready too), with a deadline containerd does not have."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await ready
    except TimeoutError:
        raise errors.internal(
            f"logging binary gave no readiness signal within {READY_TIMEOUT:.0f}s"
        ) from None
    finally:
        loop.remove_reader(fd)
