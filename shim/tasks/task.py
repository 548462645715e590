"""A task (one container: its init process and its execs) and the registry of all tasks.

The daemon serves every container of every namespace of one containerd, so tasks are keyed
by (namespace, id).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from shim.api import events_pb2, mount_pb2, shim_pb2
from shim.events.events import Publisher
from shim.exits.exittrack import ExitTracker
from shim.exits.exitwatch import ExitWatch
from shim.exits.memcg import MemoryCgroup
from shim.exits.oom import OOMWatcher
from shim.exits.reaper import Reaper
from shim.io.procio import FdKeeper, ProcessIO
from shim.io.stdio import Stdio
from shim.oci import piddir
from shim.oci.bundle import Bundle, check_path
from shim.oci.cgroups import Cgroup, CgroupError
from shim.oci.checkpoint import WORK_DIR, RestoreSpec, require_criu
from shim.oci.mount import MAX_MOUNTS, Mount, mount, unmount_all
from shim.oci.runc import Runc, RuncError, resolve
from shim.oci.runcoptions import (  # noqa: F401 (RUNC_OPTIONS, RUNTIME_OPTIONS: for importers)
    RUNC_OPTIONS,
    RUNTIME_OPTIONS,
    RuncOptions,
    decode_options,
    for_bundle,
    stored,
)
from shim.oci.runcoptions import is_clean_absolute as _is_clean_absolute
from shim.oci.sealedrunc import SealedCopies
from shim.store.statestore import ProcessRecord, StateStore, StoreError, best_effort
from shim.tasks.execprocess import ExecProcess, parse_spec
from shim.tasks.faults import Faults
from shim.tasks.lifecycle import Op, Status
from shim.tasks.process import InitProcess, Process
from shim.util import errors, identifiers, log, procinfo
from shim.util.paths import DaemonPaths
from shim.watch.watchd import WatchHub


@dataclass
class Deps:
    """What tasks need from the daemon."""

    paths: DaemonPaths
    reaper: Reaper
    exits: ExitWatch
    store: StateStore
    events: Publisher
    tracker: ExitTracker | None = None
    oom: OOMWatcher | None = None
    keeper: FdKeeper | None = None  # holds stdio fds across a crash (shim.cmd.keeperlink)
    #: where Create takes bundles from (None: bundle.allowed_roots(), the default)
    bundle_roots: tuple[str, ...] | None = None
    watch: WatchHub | None = None  # the `watch` stream: our containers' cgroups (shim.watch.watchd)
    runc_copies: SealedCopies | None = None  # sealed copies runc runs from (shim.oci.sealedrunc)
    pid_dir: str | None = None  # where runc writes pid files (shim.oci.piddir); None: bundles
    faults: Faults = field(default_factory=Faults)  # crash windows armed by tests (Fault)


def find_runc(runc: Runc, from_options: bool) -> str:
    """runc's path, or an error that says which setting points nowhere."""
    path = resolve(runc.binary, runc.path)
    if path is not None:
        return path
    if from_options:
        raise errors.invalid(f"options.binary_name: {runc.binary!r} not found or not executable")
    raise errors.precondition(f"runc: {runc.binary!r} not found in the daemon's PATH ({runc.path})")


def _rootfs_mounts(req: shim_pb2.CreateTaskRequest) -> list[Mount]:
    """The rootfs mounts containerd asked for, each one checked before any is made."""
    if len(req.rootfs) > MAX_MOUNTS:
        raise errors.invalid(f"rootfs: {len(req.rootfs)} mounts, more than {MAX_MOUNTS}")
    mounts = [Mount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
    for i, m in enumerate(mounts):
        problem = m.problem()
        if problem is not None:
            raise errors.invalid(f"rootfs[{i}]: {problem}")
    return mounts


class Task:
    def __init__(
        self,
        namespace: str,
        id: str,
        bundle: Bundle,
        runc: Runc,
        deps: Deps,
        io: Stdio,
        options_blob: bytes | None,
    ) -> None:
        self.namespace = namespace
        self.id = id
        self.bundle = bundle
        self.runc = runc
        self.deps = deps
        self.options_blob = options_blob
        self.init = InitProcess(self, "", io)
        self.execs: dict[str, Process] = {}
        self.rootfs: list[mount_pb2.Mount] = []
        self.cgroup: Cgroup | None = None  # found from the init once it exists
        self._bg: set[asyncio.Task[Any]] = set()
        self._log_fd = -1
        self._log_pending: list[str] = []  # lines for the log FIFO, written once answered
        self._log_close = False  # close the FIFO once the pending lines are out
        # OOM kills (shim/exits/oom.py): the memory cgroup, the kernel's count last seen there,
        # and the count containerd has received /tasks/oom for.
        self.memcg: MemoryCgroup | None = None
        self.oom_kills = 0
        self.oom_published = 0

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` in the background, keeping a reference and logging a failure."""
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._bg.add(t)

        def _done(t: asyncio.Task[Any]) -> None:
            self._bg.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.event(
                    "background task failed",
                    logging.ERROR,
                    ns=self.namespace,
                    id=self.id,
                    task=name,
                    error=t.exception(),
                )

        t.add_done_callback(_done)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise errors.not_found(f"exec {exec_id!r} of {self.id} not found") from None

    def cgroup_of_init(self) -> Cgroup:
        """The container's cgroup; after a restart, found again from the live init."""
        if self.cgroup is None:
            p = self.init
            if p.exited or not p.pid_is_ours():
                raise errors.not_found(f"container {self.id} has no cgroup: its init has exited")
            try:
                self.cgroup = Cgroup.of_pid(p.pid)
            except CgroupError as exc:
                raise errors.not_found(f"container {self.id}: {exc}") from None
        return self.cgroup

    def open_log(self) -> None:
        """Open the bundle's ``log`` FIFO, which containerd copies into its own log."""
        try:
            self._log_fd = os.open(self.bundle.shim_log, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._log_fd = -1

    def log_line(self, msg: str, **fields: object) -> None:
        """A line for containerd's log, written after the current step of the loop: the
        write wakes containerd's copier, which on a busy machine ran before our answer went
        out.  Lines keep their order, and the FIFO closes after the last one."""
        if self._log_fd < 0 or self._log_close:
            return
        self._log_pending.append(log.line(msg, ns=self.namespace, id=self.id, **fields))
        if len(self._log_pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._flush_log)
            except RuntimeError:  # no loop (a restore before it runs): now
                self._flush_log()

    def _flush_log(self) -> None:
        lines, self._log_pending = self._log_pending, []
        if self._log_fd >= 0 and lines:
            try:
                os.write(self._log_fd, "".join(lines).encode())
            except OSError:
                pass
        if self._log_close and self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def watch_oom(self) -> None:
        """Watch the container's memory cgroup for OOM kills (once its cgroup is known).
        Kills counted there before the container existed are not its own."""
        if self.deps.watch is not None:
            self.deps.watch.add(self)  # same moment: the init is alive in its cgroup
        if self.memcg is None:
            self.memcg = MemoryCgroup.of(self.cgroup) if self.cgroup is not None else None
            if self.memcg is None:
                log.event("no memory cgroup, no OOM events", ns=self.namespace, id=self.id)
                return
            self.oom_kills = self.oom_published = self.memcg.oom_kills() or 0
        if self.deps.oom is not None:
            self.deps.oom.watch((self.namespace, self.id), self.memcg, self.check_oom)

    def unwatch_oom(self) -> None:
        if self.deps.oom is not None:
            self.deps.oom.unwatch((self.namespace, self.id))

    def check_oom(self) -> None:
        """Publish /tasks/oom if the kernel counted a kill we have not seen yet."""
        count = self.memcg.oom_kills() if self.memcg is not None else None
        if count is None or count <= self.oom_kills:
            return
        self.oom_kills = count
        self.deps.store.update(self.namespace, self.id, oom_kills=count)
        self.publish_oom()

    def publish_oom(self) -> None:
        """/tasks/oom for the count last seen; persisted as published once containerd has it."""
        store, ns, id, count = self.deps.store, self.namespace, self.id, self.oom_kills

        def sent() -> None:
            self.oom_published = max(self.oom_published, count)
            store.update(ns, id, oom_published=self.oom_published)

        self.deps.events.publish(ns, events_pb2.TaskOOM(container_id=id), on_sent=sent)
        log.event("OOM kill", logging.WARNING, ns=ns, id=id, oom_kills=count)
        self.log_line("OOM kill", oom_kills=count)

    def pid_file(self, exec_id: str = "") -> str:
        """Where runc writes the pid of the init ("") or of an exec: the daemon's pid
        directory on tmpfs (shim.oci.piddir), else the bundle."""
        if self.deps.pid_dir is None:
            return os.path.join(self.bundle.path, piddir.base_name(exec_id))
        return os.path.join(self.deps.pid_dir, piddir.file_name(self.namespace, self.id, exec_id))

    def close(self) -> None:
        self.unwatch_oom()
        if self.deps.watch is not None:
            self.deps.watch.remove(self)
        if self._log_fd >= 0:
            self._log_close = True
            if not self._log_pending:
                self._flush_log()
        for t in list(self._bg):
            if t.get_name().startswith("exit-"):
                t.cancel()


class Tasks:
    """Every task this daemon serves, keyed by (namespace, id)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._tasks: dict[tuple[str, str], Task | None] = {}  # None: being created
        # Tasks deleted while the store could not be written (disk full): their records
        # are removed at the next create or delete that finds the store writable.
        self._forget_later: set[tuple[str, str]] = set()
        self._kept: dict[str, int] = {}  # during restore only
        self._warned_empty_options = False  # said once per daemon
        #: called when the last task has gone (the daemon's idle exit)
        self.on_empty: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._tasks)

    def get(self, namespace: str, id: str) -> Task:
        task = self._tasks.get((namespace, id))
        if task is None:
            raise errors.not_found(f"container {id!r} not found in namespace {namespace!r}")
        return task

    def find(self, namespace: str, id: str) -> Task | None:
        return self._tasks.get((namespace, id))

    def all(self) -> list[Task]:
        return [t for t in self._tasks.values() if t is not None]

    async def create(self, namespace: str, req: shim_pb2.CreateTaskRequest) -> Task:
        identifiers.validate("namespace", namespace)
        identifiers.validate("id", req.id)
        key = (namespace, req.id)
        if key in self._tasks:
            raise errors.already_exists(f"container {req.id!r} already exists in {namespace!r}")
        self._forget_pending()
        self._tasks[key] = None
        try:
            task = await self._create(namespace, req)
        except BaseException:
            del self._tasks[key]
            if not self._tasks:
                self.on_empty()
            raise
        self._tasks[key] = task
        return task

    async def _create(self, namespace: str, req: shim_pb2.CreateTaskRequest) -> Task:
        bundle = Bundle.load(check_path(req.bundle, namespace, req.id, self.deps.bundle_roots))
        bundle.check_rootfs()
        opts = self._options(namespace, req, bundle)
        restore: RestoreSpec | None = None
        if req.checkpoint:
            await require_criu(
                self.deps.reaper, f"restore of {req.id} from {req.checkpoint}", opts.criu
            )
            if not _is_clean_absolute(req.checkpoint) or not os.path.isdir(req.checkpoint):
                raise errors.invalid(f"checkpoint: {req.checkpoint[:100]!r} is not a directory")
            if req.parent_checkpoint and not _is_clean_absolute(req.parent_checkpoint):
                raise errors.invalid(
                    f"parent_checkpoint: {req.parent_checkpoint[:100]!r} is not a clean path"
                )
            restore = RestoreSpec(
                image=req.checkpoint,
                work=opts.criu_work_path or os.path.join(bundle.path, WORK_DIR),
                parent=req.parent_checkpoint,
                no_pivot=opts.no_pivot,
            )
        runc = self._runc(namespace, opts)
        find_runc(runc, from_options=opts.binary != "runc")
        io = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        io.check()
        mounts = _rootfs_mounts(req)
        blob = stored(opts) if req.options.type_url or opts.systemd_cgroup else None
        task = Task(namespace, req.id, bundle, runc, self.deps, io, blob)
        task.rootfs = list(req.rootfs)
        mounted = False
        try:
            if req.rootfs:
                os.makedirs(bundle.rootfs, mode=0o711, exist_ok=True)
                for m in mounts:
                    mounted = True
                    mount(m, bundle.rootfs)
            if restore is not None:
                task.init.prepare_restore(restore)
            else:
                await task.init.create(opts.no_pivot, opts.no_new_keyring)
        except BaseException as exc:
            log.event("create failed", logging.ERROR, ns=namespace, id=req.id, error=exc)
            await self._undo_create(task, mounted)
            if isinstance(exc, OSError | TimeoutError):
                raise errors.internal(f"create {req.id}: {exc!r}") from None
            if isinstance(exc, RuncError):
                raise errors.internal(str(exc)) from None
            raise
        task.open_log()
        event = events_pb2.TaskCreate(
            container_id=task.id,
            bundle=bundle.path,
            io=events_pb2.TaskIO(
                stdin=io.stdin, stdout=io.stdout, stderr=io.stderr, terminal=io.terminal
            ),
            pid=task.init.pid,
            checkpoint=req.checkpoint,
        )
        for rm in req.rootfs:
            event.rootfs.add(type=rm.type, source=rm.source, target=rm.target, options=rm.options)
        self.deps.events.publish(namespace, event)
        log.event("container created", ns=namespace, id=task.id, pid=task.init.pid)
        task.log_line("container created", pid=task.init.pid)
        return task

    def _options(
        self, namespace: str, req: shim_pb2.CreateTaskRequest, bundle: Bundle
    ) -> RuncOptions:
        """runc's settings for a new task: its runtime options, then its spec's cgroupsPath
        (systemd's form turns the systemd driver on; see shim.oci.runcoptions)."""
        opts = decode_options(req.options.type_url, req.options.value)
        opts, by_path = for_bundle(opts, bundle.config)
        if by_path:
            log.event(
                "systemd cgroup driver: cgroupsPath is slice:prefix:name",
                logging.DEBUG,
                ns=namespace,
                id=req.id,
                cgroups_path=bundle.config["linux"]["cgroupsPath"],
            )
        if opts.source.endswith("without settings") and not self._warned_empty_options:
            self._warned_empty_options = True
            log.event(
                "runtime options without settings: runc runs with its defaults (containerd "
                "1.6 sends a handler's options table only as ConfigPath; see README)",
                logging.WARNING,
                ns=namespace,
                id=req.id,
            )
        return opts

    async def _undo_create(self, task: Task, mounted: bool) -> None:
        """Leave no runc state, mount, record, fd or logging program behind after a failed
        create."""
        try:
            await task.runc.delete(task.id, force=True)
        except RuncError:
            pass
        await task.init.close_io()
        if mounted:
            try:
                unmount_all(task.bundle.rootfs)
            except OSError as exc:
                log.event("unmount failed", logging.ERROR, ns=task.namespace, id=task.id, error=exc)
        self._forget(task.namespace, task.id, "undo create")
        task.init.cleanup_files()
        task.close()

    def _runc(self, namespace: str, opts: RuncOptions, root: str = "") -> Runc:
        """runc as a task's options (or its record's root) say.  A ``Root`` setting is
        the parent of one runc root per namespace, as for containerd's runc shim."""
        if not root:
            root = (
                os.path.join(opts.root, namespace)
                if opts.root
                else self.deps.paths.runc_root_for(namespace)
            )
        return Runc(
            self.deps.reaper,
            root=root,
            binary=opts.binary,
            systemd_cgroup=opts.systemd_cgroup,
            criu=opts.criu,
            copies=self.deps.runc_copies,
        )

    async def recover_create(self, namespace: str, req: shim_pb2.CreateTaskRequest) -> None:
        """Remove what a Create left behind when its daemon died in the middle of it (it has
        no task: the store row is written last).  The dead daemon's runc may still be at work:
        wait for it first, then delete the container runc made, and unmount the rootfs."""
        try:
            bundle = check_path(req.bundle, namespace, req.id, self.deps.bundle_roots)
            opts = decode_options(req.options.type_url, req.options.value)
        except Exception as exc:
            log.event("interrupted create: nothing to undo", ns=namespace, id=req.id, error=exc)
            return
        await procinfo.wait_while_running(
            lambda argv: os.fsencode(bundle) in argv, "runc create of the dead daemon"
        )
        runc = self._runc(namespace, opts)
        try:
            await runc.delete(req.id, force=True)
        except (RuncError, OSError):
            pass
        try:
            unmount_all(os.path.join(bundle, "rootfs"))
        except OSError as exc:
            log.event("unmount failed", logging.ERROR, ns=namespace, id=req.id, error=exc)
        self._forget(namespace, req.id, "interrupted create")
        log.event("interrupted create undone", ns=namespace, id=req.id)

    def _forget(
        self, namespace: str, id: str, what: str, answer: tuple[int, int, int] | None = None
    ) -> None:
        self._forget_pending()
        store = self.deps.store
        if not best_effort(
            lambda: store.delete(namespace, id, answer=answer), what, ns=namespace, id=id
        ):
            self._forget_later.add((namespace, id))

    def _forget_pending(self) -> None:
        for namespace, id in list(self._forget_later):
            if (namespace, id) in self._tasks:
                self._forget_later.discard((namespace, id))  # a new task of that name
                continue
            try:
                self.deps.store.delete(namespace, id)
            except StoreError:
                return
            self._forget_later.discard((namespace, id))
            log.event("state record removed at last", ns=namespace, id=id)

    def restore(
        self,
        queued_exits: set[tuple[str, str, str]] = frozenset(),  # type: ignore[assignment]
        queued_ooms: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
        io_state: dict[str, dict[str, Any]] | None = None,
        kept: dict[str, int] | None = None,
    ) -> None:
        """Take back every task a previous daemon persisted (after a crash or a re-exec):
        running ones are watched again, OOM kills and exits that happened meanwhile are
        reported, in that order (unless ``queued_exits`` / ``queued_ooms`` say the event is
        already queued to go out).  ``io_state`` is what a re-exec handed over of the
        processes' stdio (terminal copies, logging programs); ``kept`` what the keeper held
        of it for a daemon that crashed (by name; see ProcessIO.kept_state)."""
        io_state = dict(io_state or {})
        self._kept = kept if kept is not None else {}
        try:
            self._restore_all(queued_exits, queued_ooms, io_state)
        finally:
            for name, fd in self._kept.items():  # of processes that are gone
                os.close(fd)
                if self.deps.keeper is not None:
                    self.deps.keeper.drop(name)
            self._kept = {}
            for key, state in io_state.items():  # nobody took these: close their fds
                log.event("stdio state not taken back", logging.WARNING, process=key)
                for fd in ProcessIO.handoff_fds(state):
                    try:
                        os.close(fd)
                    except OSError:
                        pass

    def handoff_io(self) -> dict[str, dict[str, Any]]:
        """Every process's stdio state that must survive the daemon's re-exec."""
        out: dict[str, dict[str, Any]] = {}
        for task in self.all():
            for p in (task.init, *task.execs.values()):
                state = p.pio.handoff() if p.pio is not None else None
                if state is not None:
                    out[_io_key(task.namespace, task.id, p.exec_id)] = state
        return out

    def _adopt_io(self, p: Process, io_state: dict[str, dict[str, Any]]) -> None:
        state = io_state.pop(_io_key(p.task.namespace, p.task.id, p.exec_id), None)
        exits = None
        if state is None and self._kept:
            state = ProcessIO.kept_state(p.keeper_key(), self._kept)
            exits = self.deps.exits  # the logging program is the keeper's child now
            if state is not None:
                log.event("stdio taken back from the keeper", **p.fields())
        if state is not None:
            p.pio = p.new_io()
            p.pio.adopt(state, exits)
        elif p.io.terminal and not p.exited:
            log.event("terminal lost with the previous daemon", logging.WARNING, **p.fields())

    def _restore_all(
        self,
        queued_exits: set[tuple[str, str, str]],
        queued_ooms: set[tuple[str, str]],
        io_state: dict[str, dict[str, Any]],
    ) -> None:
        records = list(self.deps.store.all())
        for rec in records:
            if rec.exec_id:
                continue
            if (rec.namespace, rec.id, "") in queued_exits:
                rec.exit_published = True
            if (rec.namespace, rec.id) in queued_ooms:
                rec.oom_published = rec.oom_kills
            try:
                task = self._restore(rec)
                for erec in records:
                    if erec.exec_id and (erec.namespace, erec.id) == (rec.namespace, rec.id):
                        if (erec.namespace, erec.id, erec.exec_id) in queued_exits:
                            erec.exit_published = True
                        task.execs[erec.exec_id] = ExecProcess.restore(task, erec)
                for p in (task.init, *task.execs.values()):
                    self._adopt_io(p, io_state)
            except Exception as exc:
                log.event(
                    "cannot restore task",
                    logging.ERROR,
                    ns=rec.namespace,
                    id=rec.id,
                    error=repr(exc),
                )
                continue
            self._tasks[(rec.namespace, rec.id)] = task
            log.event(
                "task restored",
                ns=rec.namespace,
                id=rec.id,
                pid=rec.pid,
                status=str(task.init.status),
            )

    def _restore(self, rec: ProcessRecord) -> Task:
        bundle = Bundle.load(rec.bundle)
        options = shim_pb2.CreateTaskRequest().options
        if rec.options:
            options.ParseFromString(rec.options)
        opts = decode_options(options.type_url, options.value)
        runc = self._runc(rec.namespace, opts, rec.runc_root)
        io = Stdio(rec.stdin, rec.stdout, rec.stderr, rec.terminal)
        task = Task(rec.namespace, rec.id, bundle, runc, self.deps, io, rec.options)
        task.open_log()
        p = task.init
        p.pid, p.start_time, p.trace_id = rec.pid, rec.start_time, rec.trace_id
        p.tracked = bool(rec.trace_id)  # may be registered: its entries go with its exit
        p.status = Status(rec.status)
        self._restore_oom(task, rec)
        spec = RestoreSpec.decode(rec.checkpoint)
        if rec.exit_status is not None:
            p.restore_exited(rec.exit_status, rec.exited_at, rec.exit_published)
        elif spec is not None and p.status == Status.CREATED and not p.pid:
            p.restore_from = spec  # created from a checkpoint, not started yet
        elif procinfo.is_same(p.pid, p.start_time):
            # Still there (maybe a zombie child of ours): the watcher gets its exit.
            p.watch_exit(p.before_exit)
            try:
                task.cgroup = Cgroup.of_pid(p.pid)
            except CgroupError:
                pass
            p.reconcile_freezer()
            task.watch_oom()
        else:
            # It exited while no daemon watched; the pinned BPF map saw it.
            p.set_exited(*self._exit_from_bpf(p.trace_id))
        return task

    @staticmethod
    def _restore_oom(task: Task, rec: ProcessRecord) -> None:
        """OOM kills the previous daemon saw but containerd never got, then those the
        kernel counted while no daemon watched: both before any exit of this task."""
        task.memcg = MemoryCgroup.decode(rec.memcg)
        task.oom_kills, task.oom_published = rec.oom_kills, rec.oom_published
        if task.oom_published < task.oom_kills:
            task.publish_oom()
        task.check_oom()

    def _exit_from_bpf(self, trace_id: int) -> tuple[int, int]:
        tracker = self.deps.tracker
        record = tracker.lookup_exit(trace_id) if tracker is not None and trace_id else None
        if record is None:
            log.event("exit status unknown", logging.WARNING, trace_id=trace_id)
            return 255, time.time_ns()
        return record.exit_status, record.exited_at_wall_ns()

    def add_exec(self, namespace: str, req: shim_pb2.ExecProcessRequest) -> ExecProcess:
        task = self.get(namespace, req.id)
        # The request itself first, then whether it can be done now.
        identifiers.validate("exec_id", req.exec_id)
        spec = parse_spec(req.spec.value)
        io = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        io.check()
        if req.exec_id in task.execs:
            raise errors.already_exists(f"exec {req.exec_id!r} of {req.id} already exists")
        task.init.allow(Op.EXEC)
        p = ExecProcess(task, req.exec_id, io, spec)
        p.added()  # persisted first: if the store refuses, there is no exec
        task.execs[req.exec_id] = p
        log.event("exec added", **p.fields())
        return p

    def deleted(self, namespace: str, id: str, exec_id: str) -> tuple[int, int, int] | None:
        """What the Delete of a process gone answered (for a Delete replayed after a crash
        between the removal and its answer); None if the store does not know."""
        try:
            return self.deps.store.deleted(namespace, id, exec_id)
        except StoreError:
            return None

    async def delete(self, namespace: str, id: str, exec_id: str) -> tuple[int, int, int]:
        task = self.get(namespace, id)
        if exec_id:
            p = task.process(exec_id)
            assert isinstance(p, ExecProcess)
            result = await p.delete()
            await p.close_io()
            task.execs.pop(exec_id, None)
            log.event("exec deleted", **p.fields(), exit_status=result[1])
            return result
        running = [e for e, p in task.execs.items() if not p.exited and p.status == Status.RUNNING]
        if running:
            raise errors.precondition(f"container {id} still has running exec processes {running}")
        for p in list(task.execs.values()):
            assert isinstance(p, ExecProcess)
            await p.delete()
            await p.close_io()
        task.execs.clear()
        pid, status, exited_at = await task.init.delete()
        await task.init.close_io()
        try:
            unmount_all(task.bundle.rootfs)
        except OSError as exc:
            log.event("unmount failed", logging.ERROR, ns=namespace, id=id, error=exc)
        # After the answer: an unlink on a busy ext4 /run costs more than the rest of it.
        asyncio.get_running_loop().call_soon(task.init.cleanup_files)
        self._forget(namespace, id, "delete", (pid, status, exited_at))
        event = events_pb2.TaskDelete(container_id=id, pid=pid, exit_status=status)
        event.exited_at.FromNanoseconds(exited_at)
        self.deps.events.publish(namespace, event)
        log.event("container deleted", ns=namespace, id=id, pid=pid, exit_status=status)
        task.log_line("container deleted", exit_status=status)
        task.close()
        self._tasks.pop((namespace, id), None)
        if not self._tasks:
            self.on_empty()
        return pid, status, exited_at


def _io_key(namespace: str, id: str, exec_id: str) -> str:
    return f"{namespace}/{id}/{exec_id}"
