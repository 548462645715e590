"""Exec processes, run through the runc_exec wrapper so no exit can be missed.

``runc exec --detach`` re-parents the exec'd process as soon as it forks it, so a fast exit
could be gone before anyone had a pidfd or a map entry for it.  The wrapper is a child
subreaper: the process becomes its child, stays its zombie until the wrapper has written the
status to a file, and the wrapper tells us ``pid``/``exit``/``error`` over a pipe.  The status
file outlives a daemon restart; the pinned BPF map is the backup if the wrapper itself dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

from shim import errors, limits, log, procinfo
from shim.api import events_pb2
from shim.lifecycle import Op, Status
from shim.process import Process
from shim.reaper import Exit
from shim.runc import find_executable
from shim.statestore import ProcessRecord, StoreError, best_effort
from shim.stdio import Stdio

if TYPE_CHECKING:
    from shim.task import Task

START_TIMEOUT = 30.0
UNKNOWN = 255


def _wrapper_command() -> list[str]:
    """The C wrapper if it is built (no interpreter start-up per exec), else the script."""
    import runc_exec

    return runc_exec.command()


class ExecProcess(Process):
    def __init__(self, task: Task, exec_id: str, io: Stdio, spec: bytes) -> None:
        super().__init__(task, exec_id, io)
        self.spec = spec
        self.helper_pid = 0
        self.helper_start = 0
        self._pidfd: int | None = None

    @classmethod
    def restore(cls, task: Task, rec: ProcessRecord) -> ExecProcess:
        """Take back an exec a previous daemon image started.  Its wrapper (still our child
        after a re-exec) writes the status file; the pipe to it did not survive the exec."""
        p = cls(
            task,
            rec.exec_id,
            Stdio(rec.stdin, rec.stdout, rec.stderr, rec.terminal),
            rec.options or b"{}",
        )
        p.pid, p.start_time, p.trace_id = rec.pid, rec.start_time, rec.trace_id
        p.helper_pid, p.helper_start = rec.helper_pid, rec.helper_start
        p.status = Status(rec.status)
        if rec.exit_status is not None:
            p.restore_exited(rec.exit_status, rec.exited_at, rec.exit_published)
        elif p.status == Status.RUNNING:
            p._pidfd = procinfo.open_pidfd(p.pid, p.start_time)
            task.spawn(p._await_helper(), f"exit-{p.id}")
        return p

    async def _await_helper(self) -> None:
        """Wait for the wrapper (or, if it is not ours any more, the process) to finish."""
        exits = self.task.deps.exits
        if procinfo.is_same(self.helper_pid, self.helper_start):
            await exits.watch(self.helper_pid, self.helper_start)
        elif procinfo.is_same(self.pid, self.start_time):
            await exits.watch(self.pid, self.start_time, self.trace_id)
        status, at = self.status_from_elsewhere()
        async with self.start_lock:
            self.set_exited(status, at)
        self._close_pidfd()

    def reported_status(self) -> Status:
        """A running exec is as paused as its container (the runc shim says the same)."""
        init = self.task.init
        if self.status == Status.RUNNING and not self.exited and init.status == Status.PAUSED:
            return Status.PAUSED
        return self.status

    @property
    def dir(self) -> str:
        """Where the process spec, pid file and status file live (ours, not the bundle)."""
        t = self.task
        return os.path.join(t.deps.paths.dir, "exec", t.namespace, t.id, self.exec_id)

    @property
    def status_file(self) -> str:
        return os.path.join(self.dir, "status")

    def record(self) -> ProcessRecord:
        rec = super().record()
        rec.options = self.spec
        rec.helper_pid = self.helper_pid
        rec.helper_start = self.helper_start
        return rec

    def added(self) -> None:
        """Persisted, then announced (TaskExecAdded)."""
        self.task.deps.store.put(self.record())
        self.task.deps.events.publish(
            self.task.namespace,
            events_pb2.TaskExecAdded(container_id=self.task.id, exec_id=self.exec_id),
        )

    async def start(self) -> int:
        running = self.allow(Op.START)
        self.task.init.allow(Op.START_EXEC)
        async with self.start_lock:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            with open(os.path.join(self.dir, "process.json"), "wb") as f:
                f.write(self.spec)
            wrapper = _wrapper_command()
            pio = self.pio = self.new_io()
            await pio.open()
            r, w = os.pipe()
            try:
                self.helper_pid = self._spawn_wrapper(wrapper, pio.triple, w, pio.console_path)
                self.helper_start = procinfo.start_time(self.helper_pid)
                helper_exit = self.task.deps.reaper.watch(self.helper_pid)
            except BaseException:
                os.close(r)
                pio.abort()
                raise
            finally:
                pio.runc_done()
                os.close(w)
            lines = _LineReader(r)
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    first = await lines.next()
            except TimeoutError:
                first = "error runc_exec gave no pid in time"
            word, _, rest = first.partition(" ")
            if word != "pid":
                message = rest if word == "error" else "runc_exec exited without a pid"
                await self._failed(lines, helper_exit)
                raise errors.internal(f"exec {self.exec_id}: {message}")
            pid_s, _, start_s = rest.partition(" ")
            self.pid, self.start_time = int(pid_s), int(start_s or 0)
            self._pidfd = procinfo.open_pidfd(self.pid, self.start_time)
            try:
                await pio.attach_console()
            except (OSError, TimeoutError) as exc:
                # A terminal nobody can reach: the process is of no use to anyone.
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                await lines.next()
                self._close_pidfd()
                await self._failed(lines, helper_exit)
                message = f"exec {self.exec_id}: no terminal from runc: {exc!r}"
                raise errors.internal(message) from None
            # The process runs: from here on a store that cannot be written costs only the
            # record (and the BPF backup, which needs a trace id), not the exec.
            try:
                self.trace_id = self.task.deps.store.next_trace_id()
            except StoreError as exc:
                log.event("no trace id", logging.ERROR, **self.fields(), error=exc)
            if self.trace_id:
                self.track()
            self.status = running
            best_effort(
                lambda: self.task.deps.store.put(self.record()), "exec started", **self.fields()
            )
            self.task.deps.events.publish(
                self.task.namespace,
                events_pb2.TaskExecStarted(
                    container_id=self.task.id, exec_id=self.exec_id, pid=self.pid
                ),
            )
            self.task.spawn(self._await_exit(lines, helper_exit), f"exit-{self.id}")
        log.event("exec started", **self.fields())
        return self.pid

    async def _failed(self, lines: _LineReader, helper_exit: asyncio.Future[Exit]) -> None:
        """No process to track after all: forget this exec's files, record and stdio."""
        lines.close()
        await helper_exit
        await self.close_io()  # a logging program may still be writing runc's error down
        self._remove_files()
        best_effort(
            lambda: self.task.deps.store.delete(self.task.namespace, self.task.id, self.exec_id),
            "exec failed",
            **self.fields(),
        )
        self.start_failed(UNKNOWN)

    def _spawn_wrapper(
        self,
        wrapper: list[str],
        stdio: tuple[int, int, int],
        sync_fd: int,
        console_socket: str | None,
    ) -> int:
        runc = self.task.runc
        binary = find_executable(runc.binary, runc.env.get("PATH", "")) or runc.binary
        argv = [
            *wrapper,
            "--sync-fd", str(sync_fd),
            "--status-file", self.status_file,
            "--runc", binary,
            "--root", runc.root,
            "--log", os.path.join(self.dir, "runc.log"),
            "--timeout", str(max(1, round(runc.timeout))),
            "--pid-file", os.path.join(self.dir, "pid"),
            "--process", os.path.join(self.dir, "process.json"),
        ]  # fmt: skip
        if runc.systemd_cgroup:
            argv.append("--systemd-cgroup")
        if console_socket:
            argv += ["--console-socket", console_socket]
        nofile = limits.child_soft()
        if nofile is not None:
            argv += ["--nofile", str(nofile)]
        argv.append(self.task.id)
        proc = subprocess.Popen(
            argv,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            pass_fds=(sync_fd,),
            env=runc.env,
            restore_signals=True,
        )
        proc.returncode = 0  # the reaper, not Popen, collects it
        return proc.pid

    async def _await_exit(self, lines: _LineReader, helper_exit: asyncio.Future[Exit]) -> None:
        line = await lines.next()
        lines.close()
        word, _, rest = line.partition(" ")
        if word == "exit":
            status_s, _, at_s = rest.partition(" ")
            status, at = int(status_s), int(at_s or time.time_ns())
        else:
            await helper_exit
            status, at = self.status_from_elsewhere()
        async with self.start_lock:
            self.set_exited(status, at)
        self._close_pidfd()

    def status_from_elsewhere(self) -> tuple[int, int]:
        """The wrapper said no ``exit``: its status file, else the pinned BPF record."""
        found = read_status_file(self.status_file)
        if found is not None:
            return found
        tracker = self.task.deps.tracker
        record = tracker.lookup_exit(self.trace_id) if tracker and self.trace_id else None
        if record is not None:
            return record.exit_status, record.exited_at_wall_ns()
        log.event("exec exit status unknown", logging.WARNING, **self.fields())
        return UNKNOWN, time.time_ns()

    async def kill(self, sig: int) -> None:
        self.allow(Op.KILL)
        fd = self._pidfd
        if fd is None:
            raise errors.not_found(f"process {self.id} already finished")
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            raise errors.not_found(f"process {self.id} already finished") from None

    async def delete(self) -> tuple[int, int, int]:
        self.status = self.allow(Op.DELETE)
        self.untrack()
        self._close_pidfd()
        self._remove_files()
        best_effort(
            lambda: self.task.deps.store.delete(self.task.namespace, self.task.id, self.exec_id),
            "exec deleted",
            **self.fields(),
        )
        return self.pid, self.exit_status, self.exited_at or time.time_ns()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _remove_files(self) -> None:
        try:
            with os.scandir(self.dir) as entries:  # a flat directory of our own files
                for entry in entries:
                    os.unlink(entry.path)
            os.rmdir(self.dir)
        except OSError:
            pass
        for d in (os.path.dirname(self.dir), os.path.dirname(os.path.dirname(self.dir))):
            try:
                os.rmdir(d)
            except OSError:
                break


def read_status_file(path: str) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            status_s, _, at_s = f.read().strip().partition(" ")
        return int(status_s), int(at_s or time.time_ns())
    except (OSError, ValueError):
        return None


def parse_spec(value: bytes) -> bytes:
    """The OCI Process JSON containerd sends for an exec, checked enough for runc."""
    try:
        spec = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise errors.invalid(f"spec: not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise errors.invalid("spec: not a JSON object")
    args = spec.get("args")
    if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
        raise errors.invalid("spec: args must be a non-empty list of strings")
    return value


class _LineReader:
    """Lines from the wrapper's sync pipe, read on the event loop."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._eof = False
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            self._eof = True
            self._loop.remove_reader(self._fd)
        self._buf += chunk
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> str:
        """The next line, or '' at EOF."""
        while b"\n" not in self._buf and not self._eof:
            self._waiter = self._loop.create_future()
            await self._waiter
        line, sep, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace") if sep or line else ""

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
