"""Exec processes: ``runc exec --detach`` straight from the daemon, no wrapper in between.

The daemon is a child subreaper: when runc exits, the process it started is re-parented to
us, and our reaper keeps any exit nobody has claimed yet, so an exec that exits at once is
still reported with its own code (an exit kept from before runc was started is of an earlier
process with a recycled pid, and is not taken).  Across a restart the exit comes from the
exit watch: our reaper after a re-exec, else the pinned BPF record.  Records of execs an
older image started through its exec wrapper (``helper_pid``; removed since) are still
taken back after a reload: the wrapper, already running, writes the status file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from shim.api import events_pb2
from shim.exits.reaper import Exit, exited_unreaped
from shim.io.procio import ProcessIO
from shim.io.stdio import Stdio
from shim.oci.runc import RuncError
from shim.store.statestore import ProcessRecord, StoreError, best_effort
from shim.tasks.lifecycle import Op, Status
from shim.tasks.process import Process
from shim.util import errors, log, procinfo

if TYPE_CHECKING:
    from shim.tasks.task import Task

UNKNOWN = 255


class ExecProcess(Process):
    def __init__(self, task: Task, exec_id: str, io: Stdio, spec: bytes) -> None:
        super().__init__(task, exec_id, io)
        self.spec = spec
        self.helper_pid = 0
        self.helper_start = 0
        self._pidfd: int | None = None
        self._restored = False  # taken back from the store: may have an older image's files

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
        p.tracked = bool(rec.trace_id)  # may be registered: its entries go with its exit
        p.helper_pid, p.helper_start = rec.helper_pid, rec.helper_start
        p._restored = True
        p.status = Status(rec.status)
        if rec.exit_status is not None:
            p.restore_exited(rec.exit_status, rec.exited_at, rec.exit_published)
        elif p.status == Status.RUNNING:
            # No start time (an older image's exec gone before its pid was read): its pid may
            # be another process's by now, so no pidfd a Kill could reach that one through.
            p._pidfd = procinfo.open_pidfd(p.pid, p.start_time) if p.start_time else None
            task.spawn(p._await_helper(), f"exit-{p.id}")
        return p

    async def _await_helper(self) -> None:
        """Wait for the process (or an older image's wrapper, which writes its status)."""
        exits = self.task.deps.exits
        if self.helper_pid and procinfo.is_same(self.helper_pid, self.helper_start):
            await exits.watch(self.helper_pid, self.helper_start)
            status, at = self.status_from_elsewhere()
        elif procinfo.is_same(self.pid, self.start_time):
            ex = await exits.watch(self.pid, self.start_time, self.trace_id)
            status, at = self.status_from_elsewhere() if self.helper_pid else (ex.status, ex.at)
        else:
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
        """Where an older image kept this exec's files (a directory per exec; the wrapper of
        a record with ``helper_pid`` writes ``status`` there).  Read after a restore only."""
        t = self.task
        return os.path.join(t.deps.paths.dir, "exec", t.namespace, t.id, self.exec_id)

    @property
    def status_file(self) -> str:
        return os.path.join(self.dir, "status")

    @property
    def pid_file(self) -> str:
        """runc's pid file, beside the init's (Task.pid_file)."""
        return self.task.pid_file(self.exec_id)

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
            pio = self.pio = self.new_io()
            await pio.open()
            since = time.time_ns()
            try:
                pid = await self._runc_exec(pio)
            except (RuncError, OSError, ValueError) as exc:
                pio.runc_done()
                await self._failed()
                message = exc.message if isinstance(exc, RuncError) else f"no pid: {exc}"
                raise errors.internal(f"exec {self.exec_id}: {message}") from None
            except BaseException:
                pio.runc_done()
                pio.abort()
                raise
            pio.runc_done()
            self.pid = pid
            exited = self.task.deps.exits.watch(pid, 0, since=since)
            faults = self.task.deps.faults
            if faults.exec_exit_window:
                await faults.wait_for_exit(exited)
            if not exited.done():  # still ours, alive or a zombie: its pid is not reused yet
                self.start_time = procinfo.start_time(pid)
                self._pidfd = procinfo.open_pidfd(pid, self.start_time)
            try:
                await pio.attach_console()
            except (OSError, TimeoutError) as exc:
                # A terminal nobody can reach: the process is of no use to anyone.
                if self._pidfd is not None:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                await exited
                self._close_pidfd()
                await self._failed()
                message = f"exec {self.exec_id}: no terminal from runc: {exc!r}"
                raise errors.internal(message) from None
            # The process runs: from here on a store that cannot be written costs only the
            # record (and the BPF backup, which needs a trace id), not the exec.
            try:
                self.trace_id = self.task.deps.store.next_trace_id()
            except StoreError as exc:
                log.event("no trace id", logging.ERROR, **self.fields(), error=exc)
            if self.trace_id and not exited.done():
                self.track()
            # An exit the BPF map cannot have (it came before the registration) is known now
            # and goes into the first record of the exec: a crash from here on loses nothing.
            gone = exited.result() if exited.done() else exited_unreaped(pid)
            self.status = running
            started: dict[str, object] = {
                "pid": pid,
                "start_time": self.start_time,
                "trace_id": self.trace_id,
                "status": str(running),
            }
            if gone is not None:
                started.update(exit_status=gone.status, exited_at=gone.at)
            t = self.task
            if (
                best_effort(
                    lambda: t.deps.store.update(t.namespace, t.id, self.exec_id, **started),
                    "exec started",
                    **self.fields(),
                )
                and gone is not None
            ):
                self.exit_in_record = gone.status, gone.at  # its exit transition writes nothing
            if gone is not None and faults.exec_exit_window:
                faults.kill_daemon()
            self.task.deps.events.publish(
                self.task.namespace,
                events_pb2.TaskExecStarted(
                    container_id=self.task.id, exec_id=self.exec_id, pid=self.pid
                ),
            )
            log.event("exec started", **self.fields())
            if gone is not None:
                # Ended already (a short command, a probe), reaped or still a zombie: its
                # exit transition now, after TaskExecStarted and before the answer, as the
                # runc shim does, so that a Wait sent before Start is answered with it (not
                # a loop turn later, when the reaper gets to the zombie; it still does, and
                # nobody waits for that).
                self.set_exited(gone.status, gone.at)
                self._close_pidfd()
            else:
                # Its event after TaskExecStarted: the exit transition waits for start_lock.
                self.task.spawn(self._await_exit(exited), f"exit-{self.id}")
        return self.pid

    async def _runc_exec(self, pio: ProcessIO) -> int:
        """``runc exec`` with the process spec and runc's log in memory (memfds runc opens
        through ``/proc/self/fd``: no file made and removed per exec); returns the pid."""
        pid_file = self.pid_file
        spec_fd = os.memfd_create("exec-process", os.MFD_CLOEXEC)
        log_fd = -1
        try:
            os.write(spec_fd, self.spec)  # a memfd takes it whole (no short write)
            log_fd = os.memfd_create("exec-runc-log", os.MFD_CLOEXEC)
            await self.task.runc.exec(
                self.task.id,
                f"/proc/self/fd/{spec_fd}",
                pid_file,
                pio.triple,
                console_socket=pio.console_path,
                log_path=f"/proc/self/fd/{log_fd}",  # this exec's alone: its error is its own
                pass_fds=(spec_fd, log_fd),
            )
        finally:
            os.close(spec_fd)
            if log_fd >= 0:
                os.close(log_fd)
        try:
            with open(pid_file) as f:
                return int(f.read().strip())
        finally:
            # Once Start is answered: an unlink on ext4 costs ~0.7 ms here.  A crash before
            # it leaves the file to Delete (or to the bundle's removal).
            asyncio.get_running_loop().call_soon(_unlink, pid_file)

    async def _failed(self) -> None:
        """No process to track after all: forget this exec's files, record and stdio."""
        await self.close_io()  # a logging program may still be writing runc's error down
        self._remove_files()
        best_effort(
            lambda: self.task.deps.store.delete(self.task.namespace, self.task.id, self.exec_id),
            "exec failed",
            **self.fields(),
        )
        self.start_failed(UNKNOWN)

    async def _await_exit(self, exited: asyncio.Future[Exit]) -> None:
        ex = await exited
        async with self.start_lock:
            self.set_exited(ex.status, ex.at)
        self._close_pidfd()

    def status_from_elsewhere(self) -> tuple[int, int]:
        """An exit our reaper did not see: an older image's wrapper's status file, else the
        pinned BPF record."""
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
        answer = self.pid, self.exit_status, self.exited_at or time.time_ns()
        best_effort(
            lambda: self.task.deps.store.delete(
                self.task.namespace, self.task.id, self.exec_id, answer=answer
            ),
            "exec deleted",
            **self.fields(),
        )
        return answer

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _remove_files(self) -> None:
        """This exec's pid file, if runc wrote one and died before we read it; and for an exec
        an older image started, its directory (see :attr:`dir`)."""
        _unlink(self.pid_file)
        if not self._restored:
            return
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


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
