"""Init and exec processes: what each operation does to a container's processes.

Whether an operation is allowed, and the status it leads to, is ``shim.tasks.lifecycle``'s table;
the methods below do the work and then the transition, each persisting the new status before
it is published, so a crash never loses what containerd was told.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from shim.api import events_pb2
from shim.exits import exittrack
from shim.exits.reaper import Exit, exited_unreaped
from shim.io.procio import ProcessIO
from shim.io.stdio import Stdio
from shim.oci import checkpoint
from shim.oci.bundle import read_pid
from shim.oci.cgroups import Cgroup, CgroupError
from shim.oci.checkpoint import CheckpointOptions, RestoreSpec
from shim.oci.runc import RuncError, is_not_found
from shim.store.statestore import ProcessRecord, best_effort
from shim.tasks.lifecycle import Op, Status, transition
from shim.util import errors, log, procinfo
from shim.util.fsutil import remove_tree
from shim.util.paths import short_hash

if TYPE_CHECKING:
    from shim.tasks.task import Task


DELETE_WAIT = 10.0


#: the exit status of a death by SIGKILL, the only one an OOM kill gives
KILLED = 128 + signal.SIGKILL


class Process:
    """What init and exec processes share: identity, stdio, and the exit transition."""

    def __init__(self, task: Task, exec_id: str, io: Stdio) -> None:
        self.task = task
        self.exec_id = exec_id
        self.io = io
        self.pid = 0
        self.start_time = 0
        self.trace_id = 0
        # Registered with the BPF exit map (a restored process may be: taken as registered).
        self.tracked = False
        # (status, exited_at) already in the store's record (an exit known when it started).
        self.exit_in_record: tuple[int, int] | None = None
        self.status = Status.CREATED
        self.exit_status = 0
        self.exited_at: int | None = None  # wall clock ns
        self.pio: ProcessIO | None = None  # what the daemon holds of its stdio
        self._exited = asyncio.Event()
        self._exit_waiters: list[asyncio.Future[tuple[int, int | None]]] = []
        # Held across every transition (start, pause, resume, exit), so that the events leave
        # in the order the transitions happened: a fast exit cannot overtake its start.
        # It is this process's alone: held across its own runc calls (each bounded by the
        # runc timeout), it delays only this process's transitions, never another container.
        self.start_lock = asyncio.Lock()
        # Kills still running (their answers not yet written): a Delete waits for them (see
        # InitProcess.kill).
        self._kills = 0
        self._no_kills = asyncio.Event()
        self._no_kills.set()

    @property
    def id(self) -> str:
        """The process id containerd uses in events: the exec id, or the container id."""
        return self.exec_id or self.task.id

    def fields(self) -> dict[str, object]:
        return {
            "ns": self.task.namespace,
            "id": self.task.id,
            "exec_id": self.exec_id or None,
            "pid": self.pid,
        }

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            namespace=self.task.namespace,
            id=self.task.id,
            exec_id=self.exec_id,
            bundle=self.task.bundle.path,
            pid=self.pid,
            start_time=self.start_time,
            trace_id=self.trace_id,
            status=str(self.status),
            stdin=self.io.stdin,
            stdout=self.io.stdout,
            stderr=self.io.stderr,
            terminal=self.io.terminal,
            runc_root=self.task.runc.root,
            options=self.task.options_blob,
        )

    def new_io(self) -> ProcessIO:
        t = self.task
        return ProcessIO(
            self.io,
            t.namespace,
            self.id,
            t.deps.reaper,
            t.deps.paths.console_dir,
            t.deps.keeper,
            self.keeper_key(),
        )

    def keeper_key(self) -> str:
        """This process's stdio fds' name with the keeper: short, and free of separators."""
        t = self.task
        return short_hash(f"{t.namespace}/{t.id}/{self.exec_id}", 20)

    def close_stdin(self) -> None:
        if self.pio is not None:
            self.pio.close_stdin()

    def resize(self, width: int, height: int) -> None:
        if self.pio is not None:
            self.pio.resize(width, height)

    async def close_io(self) -> None:
        """At Delete: a terminal's last output, then the logging program, then nothing."""
        if self.pio is not None:
            await self.pio.close()
            self.pio = None

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def state(self) -> Status:
        """The status the lifecycle table reads: an exited process is stopped until deleted."""
        if self.exited and self.status != Status.DELETED:
            return Status.STOPPED
        return self.status

    @property
    def kind(self) -> str:
        return "exec" if self.exec_id else "container"

    def allow(self, op: Op) -> Status:
        """The status ``op`` leads to, or its refusal (``shim.tasks.lifecycle.TABLE``)."""
        return transition(self.state, op, self.kind, self.id)

    def reported_status(self) -> Status:
        """The status State answers with."""
        return self.status

    async def wait(self) -> tuple[int, int | None]:
        return await self.exit_waiter()

    def exit_waiter(self) -> asyncio.Future[tuple[int, int | None]]:
        """A future of (exit status, exited_at), resolved by the exit transition (or done
        already): for a Wait, which then wakes at once (see handlers.unless_gone)."""
        fut: asyncio.Future[tuple[int, int | None]] = asyncio.get_running_loop().create_future()
        if self._exited.is_set():
            fut.set_result((self.exit_status, self.exited_at))
        else:
            self._exit_waiters.append(fut)
        return fut

    def _mark_exited(self) -> None:
        self._exited.set()
        waiters, self._exit_waiters = self._exit_waiters, []
        for fut in waiters:
            if not fut.done():  # not given up (its caller left, its handler cancelled)
                fut.set_result((self.exit_status, self.exited_at))

    def watch_exit(
        self,
        before_exit: Callable[[], Awaitable[None]] | None = None,
        fut: asyncio.Future[Exit] | None = None,
    ) -> None:
        """Start watching the process (call right after its pid is known; ``fut``: the exit
        watch's future for it, if the caller took it already)."""
        if fut is None:
            fut = self.task.deps.exits.watch(self.pid, self.start_time, self.trace_id)
        self.task.spawn(self._on_exit(fut, before_exit), f"exit-{self.task.id}-{self.exec_id}")

    async def _on_exit(
        self,
        fut: asyncio.Future[Exit],
        before_exit: Callable[[], Awaitable[None]] | None,
    ) -> None:
        ex = await fut
        async with self.start_lock:
            if before_exit is not None:
                await before_exit()
            self.set_exited(ex.status, ex.at)

    def set_exited(self, status: int, at: int) -> None:
        """The exit transition, exactly once: containerd hears of it (TaskExit, the Waits'
        answers) only once a daemon crash cannot lose it; an OOM kill the kernel counted
        goes out first (it is usually what ended the process).

        Kept means in our store, or, for a process registered with the pinned BPF exit map,
        there: the kernel wrote it at the exit, and it stays until :meth:`untrack`, which
        waits for the store.  Such an exit goes out at once and its record is written just
        after, off the path of the answers (a write is 40-70 µs of a Wait's answer here)."""
        if self.exited:
            return
        if not self.exec_id or status == KILLED:
            # An exec the kernel's OOM killer took dies of SIGKILL; any other exit of an exec
            # has no kill to report first (the OOM watch reports those of other processes).
            self.task.check_oom()
        self.exit_status = status
        self.exited_at = at
        self.status = transition(self.status, Op.EXIT, self.kind, self.id)
        recorded = (status, at) == self.exit_in_record
        if self.tracked and not recorded:
            self.publish_exit()
            self._mark_exited()
            _soon(self._record_exit, status, at)
        else:
            if recorded:
                self.untrack()
            else:
                self._record_exit(status, at)
            self.publish_exit()
            self._mark_exited()
        if not self.exec_id:
            self.task.unwatch_oom()  # no process left in the container to be killed
        log.event("process exited", **self.fields(), exit_status=status)
        self.task.log_line("process exited", exec_id=self.exec_id, exit_status=status)

    def _record_exit(self, status: int, at: int) -> None:
        """The exit into the store, then the BPF entries that kept it until now go."""
        best_effort(
            lambda: self.task.deps.store.update(
                self.task.namespace,
                self.task.id,
                self.exec_id,
                status=str(Status.STOPPED),
                exit_status=status,
                exited_at=at,
            ),
            "exit",
            **self.fields(),
        )
        self.untrack()

    def start_failed(self, status: int) -> None:
        """No process ran, so there is no exit to persist or publish; but a Wait already
        in flight must end.  containerd's ``WithProcessKill`` (what CRI's ExecSync defers)
        waits for the process after Kill answers NotFound, so an unreleased Wait would hang
        it until its deadline."""
        self.status = Status.STOPPED
        self.exit_status = status
        self.exited_at = time.time_ns()
        self._mark_exited()

    def restore_exited(self, status: int, at: int | None, published: bool) -> None:
        """A restarted daemon takes back an exit its predecessor persisted; the event goes
        out again only if containerd never got it."""
        self.exit_status = status
        self.exited_at = at or time.time_ns()
        self.status = Status.STOPPED
        if not published:
            self.publish_exit()
        self.untrack()
        self._mark_exited()

    def publish_exit(self) -> None:
        store = self.task.deps.store
        ns, id, exec_id = self.task.namespace, self.task.id, self.exec_id
        event = events_pb2.TaskExit(
            container_id=id, id=self.id, pid=self.pid, exit_status=self.exit_status
        )
        event.exited_at.FromNanoseconds(self.exited_at or 0)
        fields = self.fields()

        def sent() -> None:
            best_effort(
                lambda: store.update(ns, id, exec_id, exit_published=True),
                "exit published",
                **fields,
            )

        self.task.deps.events.publish(ns, event, on_sent=sent)

    def track(self) -> None:
        """Register the process with the pinned BPF exit map (when BPF is on)."""
        self.tracked = exittrack.track(
            self.task.deps.tracker, self.pid, self.trace_id, self.start_time, **self.fields()
        )

    def untrack(self) -> None:
        """Drop the process's BPF entries, once its exit is persisted (none to drop for one
        that exited before it was registered, or was untracked already)."""
        if self.tracked:
            exittrack.untrack(self.task.deps.tracker, self.pid, self.trace_id, **self.fields())
            self.tracked = False

    def pid_is_ours(self) -> bool:
        return procinfo.is_same(self.pid, self.start_time)


class InitProcess(Process):
    """The container's first process, driven through runc."""

    # Set for a task created from a checkpoint until it starts (by `runc restore`).
    restore_from: RestoreSpec | None = None

    def record(self) -> ProcessRecord:
        rec = super().record()
        task = self.task
        rec.memcg = task.memcg.encode() if task.memcg is not None else ""
        rec.oom_kills, rec.oom_published = task.oom_kills, task.oom_published
        rec.checkpoint = self.restore_from.encode() if self.restore_from is not None else ""
        return rec

    async def create(self, no_pivot: bool, no_new_keyring: bool) -> None:
        """runc create with the process's stdio; on failure the caller undoes it (and
        ``pio.abort()``)."""
        task = self.task
        pio = self.pio = self.new_io()
        await pio.open()
        try:
            await task.runc.create(
                task.id,
                task.bundle.path,
                task.pid_file(),
                pio.triple,
                no_pivot=no_pivot,
                no_new_keyring=no_new_keyring,
                console_socket=pio.console_path,
                log_path=task.bundle.runc_log,
            )
        finally:
            pio.runc_done()
        await pio.attach_console()
        self.pid = read_pid(task.pid_file())
        self.start_time = procinfo.start_time(self.pid)
        self.trace_id = task.deps.store.next_trace_id()
        self._find_cgroup()
        # Persisted before anything watches its exit: if the store refuses (disk full), the
        # create is undone and no exit of this never-announced task is ever published.
        task.deps.store.put(self.record())
        # The init waits in `runc init` until `runc start`, but the OOM killer or a kill -9
        # may end it while runc sets it up.
        if task.deps.faults.create_exit_window:
            await task.deps.faults.kill_init(self.pid)
        self._watch_from_now()

    def _watch_from_now(self) -> None:
        """Register the init (its record stored) with the BPF exit map and watch its exit.
        An exit that came before the registration the map cannot have: our reaper or the
        zombie has it, and it goes into the record at once, so a crash before the exit
        transition loses nothing."""
        task = self.task
        self.track()
        exited = task.deps.exits.watch(self.pid, self.start_time, self.trace_id)
        gone = exited.result() if exited.done() else exited_unreaped(self.pid)
        if gone is not None:
            best_effort(
                lambda: task.deps.store.update(
                    task.namespace, task.id, exit_status=gone.status, exited_at=gone.at
                ),
                "init gone before its BPF registration",
                **self.fields(),
            )
            if task.deps.faults.create_exit_window:
                task.deps.faults.kill_daemon()
        self.watch_exit(self.before_exit, exited)

    def _find_cgroup(self) -> None:
        """The container's cgroup (for stats, the freezer, OOM kills), from its live init."""
        try:
            self.task.cgroup = Cgroup.of_pid(self.pid)
        except CgroupError as exc:
            log.event("cgroup not found", logging.WARNING, **self.fields(), error=exc)
        self.task.watch_oom()

    def prepare_restore(self, spec: RestoreSpec) -> None:
        """Created from a checkpoint: nothing runs until start restores it."""
        self.restore_from = spec
        self.trace_id = self.task.deps.store.next_trace_id()
        self.task.deps.store.put(self.record())

    async def _restore(self, spec: RestoreSpec) -> None:
        """``runc restore`` instead of ``runc start``: the restored init becomes ours."""
        task = self.task
        await checkpoint.require_criu(task.deps.reaper, f"restore of {task.id}", task.runc.criu)
        pio = self.pio = self.new_io()
        await pio.open()
        try:
            await task.runc.restore(
                task.id,
                task.bundle.path,
                spec.args(task.pid_file()),
                pio.triple,
                log_path=task.bundle.runc_log,
                console_socket=pio.console_path,
            )
        except BaseException:
            pio.abort()
            raise
        finally:
            pio.runc_done()
        await pio.attach_console()
        self.pid = read_pid(task.pid_file())
        self.start_time = procinfo.start_time(self.pid)
        self._find_cgroup()
        self.restore_from = None
        self.status = Status.RUNNING
        task.deps.store.put(self.record())  # before the watch, which may add the exit to it
        self._watch_from_now()

    async def before_exit(self) -> None:
        """What must happen before the init's exit is reported."""
        if self.status == Status.PAUSED:
            # Thaw what is left (other processes, a shared pid namespace) so that runc can
            # kill and delete it; the runc shim does the same.
            try:
                await self.task.runc.resume(self.task.id, log_path=self.task.bundle.runc_log)
            except RuncError as exc:
                log.event("resume after exit failed", logging.DEBUG, **self.fields(), error=exc)
        await self.kill_all_if_shared_pidns()

    async def kill_all_if_shared_pidns(self) -> None:
        # Without its own pid namespace the container's other processes outlive the init.
        if self.task.bundle.has_private_pid_namespace():
            return
        try:
            await self.task.runc.kill(self.task.id, signal.SIGKILL, all=True)
        except RuncError:
            pass

    async def start(self) -> int:
        self.allow(Op.START)
        async with self.start_lock:
            running = self.allow(Op.START)  # it may have exited meanwhile
            try:
                if self.restore_from is not None:
                    await self._restore(self.restore_from)
                else:
                    await self.task.runc.start(self.task.id, log_path=self.task.bundle.runc_log)
            except RuncError as exc:
                raise errors.internal(str(exc)) from None
            self._set_started(running)
        return self.pid

    def _set_started(self, running: Status) -> None:
        self.status = running
        best_effort(
            lambda: self.task.deps.store.update(
                self.task.namespace, self.task.id, status=str(running)
            ),
            "started",
            **self.fields(),
        )
        self.task.deps.events.publish(
            self.task.namespace, events_pb2.TaskStart(container_id=self.task.id, pid=self.pid)
        )
        log.event("container started", **self.fields())
        self.task.log_line("container started", pid=self.pid)

    async def started_meanwhile(self) -> bool:
        """After a crash, for a Start the dead daemon left unanswered: whether runc started
        the container anyway (its ``runc start`` may have outlived the daemon).  If it did,
        the container is taken as started now, and said so; the Start is answered, not run
        again (runc would refuse: "cannot start an already running container")."""
        if self.status != Status.CREATED or self.restore_from is not None:
            return self.status != Status.CREATED
        runc, id = self.task.runc, self.task.id
        await procinfo.wait_while_running(
            lambda argv: (
                b"start" in argv and os.fsencode(id) in argv and os.fsencode(runc.root) in argv
            ),
            "runc start of the dead daemon",
        )
        try:
            state = await runc.state(id)
        except RuncError:
            return False
        if state.get("status") not in ("running", "paused", "stopped"):
            return False
        async with self.start_lock:
            if self.status == Status.CREATED:
                self._set_started(self.allow(Op.START))
        return True

    async def checkpoint(self, path: str, opts: CheckpointOptions) -> str:
        """Dump the running (or paused) container with CRIU; returns the image path."""
        task = self.task
        self.allow(Op.CHECKPOINT)
        image = opts.image_path or path
        if not os.path.isabs(image):
            raise errors.invalid(f"checkpoint: image path {image!r} is not an absolute path")
        await checkpoint.require_criu(task.deps.reaper, f"checkpoint of {task.id}", task.runc.criu)
        work = opts.work_path or os.path.join(task.bundle.path, checkpoint.WORK_DIR)
        try:
            os.makedirs(image, exist_ok=True)
            os.makedirs(work, exist_ok=True)
            await task.runc.checkpoint(
                task.id, checkpoint.checkpoint_args(image, work, opts), task.bundle.runc_log
            )
        except RuncError as exc:
            dump = checkpoint.keep_dump_log(work, task.bundle.path)
            raise errors.internal(f"{exc} (CRIU log: {dump or 'none'})") from None
        except OSError as exc:
            raise errors.internal(f"checkpoint of {task.id}: {exc}") from None
        finally:
            if not opts.work_path:
                remove_tree(work)
        task.deps.events.publish(
            task.namespace, events_pb2.TaskCheckpointed(container_id=task.id, checkpoint=image)
        )
        log.event("container checkpointed", **self.fields(), image=image, exit=opts.exit)
        task.log_line("container checkpointed", image=image)
        return image

    def _persist_status(self, status: Status) -> None:
        """After runc did it: a store that cannot be written costs the record, not the
        transition (a restarted daemon checks the freezer anyway)."""
        self.status = status
        best_effort(
            lambda: self.task.deps.store.update(
                self.task.namespace, self.task.id, status=str(status)
            ),
            str(status),
            **self.fields(),
        )

    async def pause(self) -> None:
        """Freeze the container's cgroup (runc pause): RUNNING -> PAUSED, /tasks/paused."""
        await self._freezer(Op.PAUSE, self.task.runc.pause, events_pb2.TaskPaused, "pause")

    async def resume(self) -> None:
        """Thaw the container's cgroup (runc resume): PAUSED -> RUNNING, /tasks/resumed."""
        await self._freezer(Op.RESUME, self.task.runc.resume, events_pb2.TaskResumed, "resume")

    async def _freezer(
        self,
        op: Op,
        runc_verb: Callable[..., Awaitable[None]],
        event: type[events_pb2.TaskPaused] | type[events_pb2.TaskResumed],
        verb: str,
    ) -> None:
        """``runc pause``/``resume`` under the start lock, then the record and the event."""
        task = self.task
        async with self.start_lock:
            status = self.allow(op)
            try:
                await runc_verb(task.id, log_path=task.bundle.runc_log)
            except RuncError as exc:
                raise errors.internal(f"OCI runtime {verb} failed: {exc}") from None
            self._persist_status(status)
            task.deps.events.publish(task.namespace, event(container_id=task.id))
        log.event(f"container {verb}d", **self.fields())

    def reconcile_freezer(self) -> None:
        """After a restart, believe the freezer over the record: a daemon that died between
        ``runc pause`` (or resume) and persisting it left the record one step behind."""
        cg = self.task.cgroup
        if cg is None or self.status not in (Status.RUNNING, Status.PAUSED):
            return
        frozen = cg.frozen()
        if frozen is None:
            return
        actual = Status.PAUSED if frozen else Status.RUNNING
        if actual != self.status:
            log.event("status corrected from the freezer", **self.fields(), status=str(actual))
            self._persist_status(actual)

    async def update(self, resources: bytes) -> None:
        """Apply new OCI LinuxResources (JSON) to the container's cgroup (runc update)."""
        task = self.task
        self.allow(Op.UPDATE)
        # Our own temp file (tempfile would pull shutil, bz2 and lzma into the daemon).
        path = os.path.join(task.deps.paths.dir, f"update-{os.urandom(8).hex()}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(resources)
            await task.runc.update(task.id, path, log_path=task.bundle.runc_log)
        except RuncError as exc:
            raise errors.internal(f"OCI runtime update failed: {exc}") from None
        finally:
            os.unlink(path)
        log.event("container updated", **self.fields())

    async def kill(self, sig: int, all: bool) -> None:
        """Signal through ``runc kill``.  The process may exit, and containerd hear of it,
        before runc itself is done: containerd then deletes the task and closes its
        connection, so a Delete must not be answered before this Kill is (see
        :meth:`delete`), or the Kill fails with "ttrpc: closed"."""
        if not all:
            self.allow(Op.KILL)
        if self._signal_directly(sig, all):
            return
        self._kills += 1
        self._no_kills.clear()
        try:
            await self.task.runc.kill(self.task.id, sig, all=all)
        except RuncError as exc:
            if is_not_found(exc):
                raise errors.not_found(f"process {self.id} already finished") from None
            raise errors.internal(str(exc)) from None
        finally:
            # The answer is written by this same task before it next yields, so a Delete
            # woken by this is answered after it.
            self._kills -= 1
            if not self._kills:
                self._no_kills.set()

    def _signal_directly(self, sig: int, all: bool) -> bool:
        """Signal the init through the pidfd the exit watch holds, as ``runc kill`` would,
        without starting runc (a Go program: ~5 ms and as much CPU per stop here).  Only
        where runc would do no more: a running or created init (a paused one needs runc's
        thaw), one signal to it, or SIGKILL to all of a container with its own pid
        namespace (the kernel kills every process there with its init).  False: runc's job.
        An init that has exited (readable pidfd, its exit not yet handled) is not found, as
        runc says of a zombie init; for ``all``, nothing is left to signal."""
        if all and not (sig == signal.SIGKILL and self.task.bundle.has_private_pid_namespace()):
            return False
        if self.exited or self.status not in (Status.RUNNING, Status.CREATED) or not self.pid:
            return False
        exits = self.task.deps.exits
        fd = exits.pidfd(self.pid) if exits is not None else None
        if fd is None:
            return False
        try:
            if procinfo.pidfd_exited(fd):
                raise ProcessLookupError
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            if all:
                return True
            raise errors.not_found(f"process {self.id} already finished") from None
        return True

    async def delete(self) -> tuple[int, int, int]:
        """Remove the container; returns (pid, exit status, exited_at ns)."""
        task = self.task
        deleted = self.allow(Op.DELETE)
        await self._no_kills.wait()  # each bounded by the runc timeout
        try:
            await task.runc.delete(task.id, force=True)
        except RuncError as exc:
            if not is_not_found(exc):
                raise errors.internal(str(exc)) from None
        if not self.exited and self.pid == 0:
            # Created from a checkpoint and never restored: nothing ran.
            self.set_exited(KILLED, time.time_ns())
        if not self.exited:
            # A created, never started init was just killed by `runc delete --force`.
            try:
                async with asyncio.timeout(DELETE_WAIT):
                    await self._exited.wait()
            except TimeoutError:
                log.event("no exit after runc delete", logging.WARNING, **self.fields())
                self.set_exited(KILLED, time.time_ns())
        self.status = deleted
        assert self.exited_at is not None
        return self.pid, self.exit_status, self.exited_at

    def cleanup_files(self) -> None:
        try:
            os.unlink(self.task.pid_file())
        except OSError:
            pass


def _soon(callback: Callable[[int, int], None], status: int, at: int) -> None:
    """``callback(status, at)`` once the loop's current step is over (at once outside one)."""
    try:
        asyncio.get_running_loop().call_soon(callback, status, at)
    except RuntimeError:
        callback(status, at)
