"""Running runc from the daemon's event loop.

Commands are spawned with fork+exec and their exits come from the daemon's reaper (never
``subprocess``, which would race the reaper for the status).  Every command has a deadline,
so a hung runc costs one request an error, not the daemon.  Errors carry runc's own message,
taken from its JSON log (``create`` hands its stdio to the container, so stderr is not ours).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from shim.exits.reaper import Reaper
from shim.oci.sealedrunc import SealedCopies
from shim.util import limits

DEFAULT_TIMEOUT = 30.0
TIMEOUT_ENV = "EMBEDSHIM_RUNC_TIMEOUT"


def default_timeout() -> float:
    """Seconds any runc command may take (``EMBEDSHIM_RUNC_TIMEOUT``, default 30)."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def find_executable(name: str, path: str) -> str | None:
    """``shutil.which`` without importing shutil (and bz2, lzma, fnmatch) into the daemon."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


# (name, PATH) -> where find_executable found it: every runc command looks its binary up,
# and walking PATH costs an access() per directory before the one that has it.
_found: dict[tuple[str, str], str] = {}


def resolve(name: str, path: str) -> str | None:
    """:func:`find_executable`, remembered: a path found before is taken again while it is
    still executable (one access() instead of a walk); gone, it is looked up afresh."""
    key = (name, path)
    known = _found.get(key)
    if known is not None and os.access(known, os.X_OK):
        return known
    found = find_executable(name, path)
    if found is None:
        _found.pop(key, None)
    else:
        _found[key] = found
    return found


def spawn(
    argv: list[str],
    stdio: tuple[int, int, int],
    env: dict[str, str] | None,
    path: str,
    pass_fds: Sequence[int] = (),
) -> int:
    """Start a child whose exit only our reaper collects.

    fork+exec through subprocess, not posix_spawn: glibc's posix_spawn leaves its reserved
    signals 32 and 33 ignored in the child, and runc would pass that on to the container.
    The Popen object is told the child is none of its business (a returncode is set), so it
    never waits for it and cannot steal the status from the reaper.  It runs with the soft
    open-file limit the daemon started with (shim.util.limits.spawn).  ``pass_fds`` are
    inherited with their numbers (the child stays on subprocess's vfork path: that depends
    only on preexec_fn, uid and gids).
    """

    def popen(path: str, argv: list[str]) -> int:
        proc = subprocess.Popen(
            argv,
            executable=path,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            env=env,
            close_fds=True,
            pass_fds=pass_fds,
            restore_signals=True,
        )
        proc.returncode = 0
        return proc.pid

    return limits.spawn(popen, path, argv)


async def execute(
    reaper: Reaper,
    argv: list[str],
    *,
    env: dict[str, str] | None,
    stdio: tuple[int, int, int] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pass_fds: Sequence[int] = (),
    copies: SealedCopies | None = None,
) -> tuple[int, bytes]:
    """Run ``argv`` (its program looked up on ``env``'s PATH; None: the daemon's own
    environment, inherited as it is) to the end, its exit collected
    by our reaper; returns (exit status, stdout and stderr) unless ``stdio`` replaces them.
    Raises FileNotFoundError if there is no such program, TimeoutError (after killing it)
    when it runs past ``timeout``.  ``pass_fds``: descriptors it inherits (see :func:`spawn`).
    ``copies``: the program runs from its sealed copy there (shim.oci.sealedrunc), made
    after this spawn if it has none yet."""
    loop = asyncio.get_running_loop()
    path = resolve(argv[0], (os.environ if env is None else env).get("PATH", ""))
    if path is None:
        raise FileNotFoundError(argv[0])
    executable, make_copy = copies.executable(path) if copies is not None else (path, False)
    out_r = out_w = -1
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        if stdio is None:
            out_r, out_w = os.pipe()
            stdio = (devnull, out_w, out_w)
        pid = spawn(argv, stdio, env, executable, pass_fds)
        exited = reaper.watch(pid)
    finally:
        os.close(devnull)
        if out_w >= 0:
            os.close(out_w)
    if make_copy and copies is not None:
        loop.call_soon(copies.make, path)  # while this one runs from the disk
    output = bytearray()
    reader_done: asyncio.Future[None] = loop.create_future()
    if out_r >= 0:
        os.set_blocking(out_r, False)

        def _readable() -> None:
            try:
                chunk = os.read(out_r, 65536)
            except BlockingIOError:
                return
            if chunk and len(output) < (4 << 20):
                output.extend(chunk)
            elif not chunk:
                loop.remove_reader(out_r)
                if not reader_done.done():
                    reader_done.set_result(None)

        loop.add_reader(out_r, _readable)
    else:
        reader_done.set_result(None)
    try:
        async with asyncio.timeout(timeout):
            ex = await asyncio.shield(exited)
            await reader_done
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await exited
        raise
    finally:
        if out_r >= 0:
            loop.remove_reader(out_r)
            os.close(out_r)
    return ex.status, bytes(output)


class RuncError(Exception):
    def __init__(self, command: str, message: str, status: int | None = None) -> None:
        super().__init__(f"runc {command}: {message}")
        self.command = command
        self.message = message
        self.status = status


def _last_error(log_path: str | None) -> str:
    """The last error runc wrote to its JSON log."""
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for raw in reversed(lines):
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", "")).strip()
    return ""


def _disk_full_hint(root: str) -> str:
    """runc 1.1 reports a full state directory as "unable to store init state: %!w(<nil>)";
    say what it means."""
    try:
        st = os.statvfs(root)
    except OSError:
        return ""
    if st.f_bavail == 0 or st.f_favail == 0:
        return f" (no space left on device for runc's state in {root})"
    return ""


@dataclass
class Runc:
    reaper: Reaper
    root: str
    binary: str = "runc"
    timeout: float = field(default_factory=default_timeout)
    systemd_cgroup: bool = False
    #: None: the daemon's own environment, which runc inherits as it is (no copy per task,
    #: and no conversion of every variable per command, as passing one would cost)
    env: dict[str, str] | None = None
    criu: str = ""  # runc's --criu: the CRIU binary for checkpoint and restore
    copies: SealedCopies | None = None  # runc runs from its sealed copy there

    @property
    def path(self) -> str:
        """The PATH runc is looked up on."""
        return (os.environ if self.env is None else self.env).get("PATH", "")

    def _argv(self, args: Sequence[str], log_path: str | None) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log_path:
            argv += ["--log", log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if self.criu:
            argv += ["--criu", self.criu]
        return argv + list(args)

    async def run(
        self,
        args: Sequence[str],
        *,
        stdio: tuple[int, int, int] | None = None,
        log_path: str | None = None,
        timeout: float | None = None,
        pass_fds: Sequence[int] = (),
    ) -> bytes:
        """Run ``runc <args>``; return its stdout (unless ``stdio`` replaces it)."""
        command = args[0] if args else ""
        limit = timeout if timeout is not None else self.timeout
        try:
            status, output = await execute(
                self.reaper,
                self._argv(args, log_path),
                env=self.env,
                stdio=stdio,
                timeout=limit,
                pass_fds=pass_fds,
                copies=self.copies,
            )
        except FileNotFoundError:
            raise RuncError(command, f"{self.binary} not found in PATH") from None
        except TimeoutError:
            raise RuncError(command, f"timed out after {limit:g}s; killed it") from None
        if status != 0:
            text = _last_error(log_path) or output.decode(errors="replace").strip()
            text = (text or f"exit status {status}") + _disk_full_hint(self.root)
            raise RuncError(command, text, status)
        return output

    async def create(
        self,
        id: str,
        bundle: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        *,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        console_socket: str | None = None,
        log_path: str | None = None,
    ) -> None:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self.run([*args, id], stdio=stdio, log_path=log_path)

    async def start(self, id: str, log_path: str | None = None) -> None:
        await self.run(["start", id], log_path=log_path)

    async def exec(
        self,
        id: str,
        process_file: str,
        pid_file: str,
        stdio: tuple[int, int, int],
        *,
        console_socket: str | None = None,
        log_path: str | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``runc exec --detach``: the process is left running, re-parented to us (we are
        its subreaper) when runc exits, so its exit reaches our reaper however early.
        ``process_file`` and ``log_path`` may name descriptors in ``pass_fds``
        (``/proc/self/fd/N``): runc opens both itself, before it starts ``runc init``."""
        args = ["exec", "--detach", "--pid-file", pid_file, "--process", process_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self.run([*args, id], stdio=stdio, log_path=log_path, pass_fds=pass_fds)

    async def kill(self, id: str, sig: int, all: bool = False) -> None:
        await self.run(["kill", *(["--all"] if all else []), id, str(sig)])

    async def delete(self, id: str, force: bool = False) -> None:
        await self.run(["delete", *(["--force"] if force else []), id])

    async def pause(self, id: str, log_path: str | None = None) -> None:
        await self.run(["pause", id], log_path=log_path)

    async def resume(self, id: str, log_path: str | None = None) -> None:
        await self.run(["resume", id], log_path=log_path)

    async def update(self, id: str, resources_file: str, log_path: str | None = None) -> None:
        """Apply an OCI LinuxResources JSON file to the running container's cgroup."""
        await self.run(["update", "--resources", resources_file, id], log_path=log_path)

    async def state(self, id: str) -> dict[str, object]:
        out = await self.run(["state", id])
        result: dict[str, object] = json.loads(out)
        return result

    async def checkpoint(
        self, id: str, args: Sequence[str], log_path: str | None = None, timeout: float = 600.0
    ) -> None:
        """``runc checkpoint <args> <id>`` (the CRIU options come from shim.oci.checkpoint)."""
        await self.run(["checkpoint", *args, id], log_path=log_path, timeout=timeout)

    async def restore(
        self,
        id: str,
        bundle: str,
        args: Sequence[str],
        stdio: tuple[int, int, int],
        log_path: str | None = None,
        timeout: float = 600.0,
        console_socket: str | None = None,
    ) -> None:
        """``runc restore --detach <args> --bundle <bundle> <id>``: the restored init is left
        running, re-parented to us (we are its subreaper)."""
        console = ["--console-socket", console_socket] if console_socket else []
        argv = ["restore", "--detach", *args, *console, "--bundle", bundle, id]
        await self.run(argv, stdio=stdio, log_path=log_path, timeout=timeout)

    async def ps(self, id: str) -> list[int]:
        out = await self.run(["ps", "--format", "json", id])
        pids = json.loads(out) or []
        return [int(p) for p in pids]


def is_not_found(err: RuncError) -> bool:
    """runc's ways of saying the container or process is gone."""
    text = err.message.lower()
    return any(
        s in text
        for s in (
            "not exist",
            "no such process",
            "not running",
            "process already finished",
            "container not running",
        )
    )
