"""The containerd.task.v2.Task service: decode, find the task, call its process, encode.

Thin on purpose: behaviour lives in the process state machines (process.py) and the task
registry (task.py).  Also the daemon's own small service for the ``start`` and ``delete``
subcommands (reserve a slot before containerd connects; clean up one task).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable

from google.protobuf.message import DecodeError

from shim.api import runc_options_pb2, shim_pb2
from shim.oci.bundle import namespace_of
from shim.oci.cgroups import CgroupError
from shim.oci.checkpoint import decode_options as decode_checkpoint_options
from shim.oci.runc import RuncError
from shim.tasks.execprocess import ExecProcess
from shim.tasks.faults import Faults
from shim.tasks.handlers import guard, unless_gone
from shim.tasks.handlers import parse as _parse
from shim.tasks.lifecycle import STATUS_NUMBER, Status
from shim.tasks.task import Tasks
from shim.ttrpc import Code, Context, Handler, TTRPCError
from shim.ttrpc.journal import JournaledCall
from shim.util import errors, identifiers, log, wire

TASK_SERVICE = "containerd.task.v2.Task"
DAEMON_SERVICE = "embedshim.v1.Daemon"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
VERSION = "embedshim 0.1.0"
# Reservations `start` made that no Create has claimed yet; each expires after a while
# (daemon.RESERVATION_TTL), and past this many the oldest go first.
MAX_RESERVATIONS = 4096

EMPTY = b""

NOT_YET: dict[str, str] = {}  # RPCs still answered Unimplemented: none

# A request the daemon had read but not answered when it died is answered by the next daemon
# (see shim.ttrpc.journal); if the dead daemon had written its answer to the journal, that
# answer is sent again and nothing runs.  Otherwise these are run again as they are: reading,
# waiting, or converging on the same end.  Create, Start, Exec, Kill, Delete and Cleanup
# check first what the dead daemon got done (TaskService._replay_*; a Delete it had done
# except for the answer is answered from the store's record of it).  Anything else is
# answered Unavailable: it may or may not have taken effect.
SAFE_TO_REPEAT = frozenset(
    {"State", "Wait", "Pids", "Connect", "Shutdown", "Stats", "CloseIO",
     "ResizePty", "Reserve", "Info"}
)  # fmt: skip
# The Any types of Update's resources and of an exec's entry in Pids (bare type URLs, as
# containerd's typeurl registry names them).
LINUX_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
PROCESS_DETAILS = runc_options_pb2.ProcessDetails.DESCRIPTOR.full_name


class TaskService:
    def __init__(
        self,
        tasks: Tasks,
        on_shutdown: Callable[[], None],
        info: Callable[[], dict[str, object]] = dict,
    ) -> None:
        self.tasks = tasks
        self.on_shutdown = on_shutdown
        self.info = info
        self.reservations: dict[tuple[str, str], float] = {}

    def methods(self) -> dict[str, Handler]:
        table: dict[str, Handler] = {
            "Create": self.create,
            "Start": self.start,
            "State": self.state,
            "Wait": self.wait,
            "Kill": self.kill,
            "Delete": self.delete,
            "Pids": self.pids,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
            "CloseIO": self.close_io,
            "ResizePty": self.resize_pty,
            "Exec": self.exec,
            "Checkpoint": self.checkpoint,
            "Pause": self.pause,
            "Resume": self.resume,
            "Update": self.update,
            "Stats": self.stats,
        }
        for name in NOT_YET:
            table[name] = self._unimplemented(name)
        return {name: guard(name, fn, self._replayed(name, fn)) for name, fn in table.items()}

    def daemon_methods(self) -> dict[str, Handler]:
        table = {
            "Reserve": self.reserve,
            "Cleanup": self.cleanup,
            "Info": self.daemon_info,
            "Fault": self.fault,
        }
        return {name: guard(name, fn, self._replayed(name, fn)) for name, fn in table.items()}

    def _replayed(self, name: str, fn: Handler) -> Handler:
        """What answers a request a dead daemon left unanswered: what SAFE_TO_REPEAT says."""
        special = {
            "Create": self._replay_create,
            "Start": self._replay_start,
            "Exec": self._replay_exec,
            "Kill": self._replay_kill,
            "Delete": self._replay_delete,
            "Cleanup": self._replay_delete,
        }.get(name)

        async def handler(ctx: Context, payload: bytes) -> bytes:
            log.event("answering a request of the dead daemon", method=name, stream=ctx.stream_id)
            if name in SAFE_TO_REPEAT:
                return await fn(ctx, payload)
            if special is not None:
                return await special(ctx, payload, fn)
            raise TTRPCError(
                Code.UNAVAILABLE,
                f"embedshim: the daemon restarted while handling {name}; "
                "whether it took effect is unknown (check the task's state)",
            )

        return handler

    async def _replay_create(self, ctx: Context, payload: bytes, fn: Handler) -> bytes:
        """Done already (the store had the task): its answer; else undo what the dead
        daemon made of it and create it again."""
        req = _parse(shim_pb2.CreateTaskRequest, payload)
        ns = self._namespace(ctx, req.id, req.bundle)
        task = self.tasks.find(ns, req.id)
        if task is not None:
            return shim_pb2.CreateTaskResponse(pid=task.init.pid).SerializeToString()
        await self.tasks.recover_create(ns, req)
        return await fn(ctx, payload)

    async def _replay_start(self, ctx: Context, payload: bytes, fn: Handler) -> bytes:
        req = _parse(shim_pb2.StartRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        p = task.process(req.exec_id)
        started = p.status != Status.CREATED and p.pid
        if not started and not req.exec_id:
            started = await task.init.started_meanwhile()
        if started:
            return shim_pb2.StartResponse(pid=p.pid).SerializeToString()
        return await fn(ctx, payload)

    async def _replay_exec(self, ctx: Context, payload: bytes, fn: Handler) -> bytes:
        req = _parse(shim_pb2.ExecProcessRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        if req.exec_id in task.execs:
            return EMPTY
        return await fn(ctx, payload)

    async def _replay_kill(self, ctx: Context, payload: bytes, fn: Handler) -> bytes:
        """Sent again; a process that has exited meanwhile (of this very signal, most
        likely) is what the caller wanted, not an error."""
        try:
            return await fn(ctx, payload)
        except TTRPCError as exc:
            if exc.code != Code.NOT_FOUND:
                raise
            return EMPTY

    async def _replay_delete(self, ctx: Context, payload: bytes, fn: Handler) -> bytes:
        """Run again; a process already gone that the dead daemon deleted (and died before
        answering) gets the answer that daemon would have sent."""
        try:
            return await fn(ctx, payload)
        except TTRPCError as exc:
            if exc.code != Code.NOT_FOUND:
                raise
            if ctx.method == "Cleanup":
                (ns, id), exec_id = _ns_and_id(payload), ""
            else:
                req = _parse(shim_pb2.DeleteRequest, payload)
                ns, id, exec_id = self._namespace(ctx, req.id), req.id, req.exec_id
            answer = self.tasks.deleted(ns, id, exec_id)
            if answer is None:
                raise
        log.event("delete of the dead daemon answered", ns=ns, id=id, exec_id=exec_id)
        return wire.delete_response(*answer)

    async def recover_unanswered(self, calls: list[JournaledCall]) -> None:
        """Requests of a dead daemon whose connection is gone too: nobody wants an answer,
        but a Create it was in the middle of must leave nothing behind."""
        for call in calls:
            try:
                request = call.request()
            except Exception:
                continue
            log.event(
                "request of the dead daemon, its caller gone",
                method=request.method,
                stream=call.stream_id,
            )
            if (request.service, request.method) != (TASK_SERVICE, "Create"):
                continue
            try:
                req = shim_pb2.CreateTaskRequest.FromString(request.payload)
            except DecodeError:
                continue
            ns = namespace_of(req.bundle, req.id)
            if ns and self.tasks.find(ns, req.id) is None:
                await self.tasks.recover_create(ns, req)

    async def fault(self, ctx: Context, payload: bytes) -> bytes:
        """Crash on purpose, as a bug would (tests of crash survival; root only, like every
        call here, and no worse than root's kill -9): ``exception`` raises in the event
        loop, ``memory`` raises MemoryError there, ``kill-after-delete`` makes the next
        Delete kill -9 the daemon once the task or exec is gone and before the answer,
        ``kill-in-exec-exit-window`` makes the next exec Start wait for its process's end and
        kill -9 the daemon once that exec's first record is written,
        ``kill-in-create-exit-window`` makes the next Create kill its init before its BPF
        registration and kill -9 the daemon once that exit is in the record."""
        if self.tasks.deps.faults.arm(payload):  # a crash window (shim.tasks.faults)
            return EMPTY
        kinds: dict[bytes, type[BaseException]] = {
            b"exception": RuntimeError,
            b"memory": MemoryError,
        }
        kind = kinds.get(payload)
        if kind is None:
            known = [*sorted(kinds), *Faults.NAMES]
            raise errors.invalid(f"fault: {payload[:40]!r} is not one of {known}")

        def fail() -> None:
            raise kind(f"fault injected: {payload.decode()}")

        asyncio.get_running_loop().call_soon(fail)
        return EMPTY

    def _namespace(self, ctx: Context, id: str = "", bundle: str = "") -> str:
        """The namespace of a request.

        containerd 1.6 sends the namespace header only on some calls (those made from its own
        contexts, like the reconnect after a restart); calls it relays from its API clients
        carry none.  It does open one connection per task, so the namespace learned on a
        connection holds for every later call on it.  Create also tells it through the
        reservation ``start`` made and through the bundle path (``.../<namespace>/<id>``).
        """
        ns = ctx.get(NAMESPACE_KEY) or ctx.connection.get("namespace")
        if not ns and id:
            candidates = {n for (n, i) in self.reservations if i == id}
            candidates |= {t.namespace for t in self.tasks.all() if t.id == id}
            if len(candidates) == 1:
                ns = candidates.pop()
        if not ns and bundle:
            ns = namespace_of(bundle, id)
        if not isinstance(ns, str) or not ns:
            raise errors.invalid(f"cannot tell the namespace of this request ({NAMESPACE_KEY})")
        ctx.connection["namespace"] = ns
        return ns

    @staticmethod
    def _unimplemented(name: str) -> Handler:
        async def handler(ctx: Context, payload: bytes) -> bytes:
            raise errors.unimplemented(f"embedshim: {name} is not implemented yet")

        return handler

    async def create(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.CreateTaskRequest, payload)
        ns = self._namespace(ctx, req.id, req.bundle)
        self.reservations.pop((ns, req.id), None)
        task = await self.tasks.create(ns, req)
        return shim_pb2.CreateTaskResponse(pid=task.init.pid).SerializeToString()

    async def start(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.StartRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        if req.exec_id:
            p = task.process(req.exec_id)
            assert isinstance(p, ExecProcess)
            pid = await p.start()
        else:
            pid = await task.init.start()
        return shim_pb2.StartResponse(pid=pid).SerializeToString()

    async def state(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.StateRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        p = task.process(req.exec_id)
        resp = shim_pb2.StateResponse(
            id=p.id,
            bundle=task.bundle.path,
            pid=p.pid,
            status=STATUS_NUMBER[p.reported_status()],  # type: ignore[arg-type]
            stdin=p.io.stdin,
            stdout=p.io.stdout,
            stderr=p.io.stderr,
            terminal=p.io.terminal,
            exit_status=p.exit_status,
            exec_id=req.exec_id,
        )
        _set_time(resp.exited_at, p.exited_at)
        return resp.SerializeToString()

    async def wait(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.WaitRequest, payload)
        p = self.tasks.get(self._namespace(ctx, req.id), req.id).process(req.exec_id)
        status, exited_at = await unless_gone(ctx, p.exit_waiter())
        resp = shim_pb2.WaitResponse(exit_status=status)
        _set_time(resp.exited_at, exited_at)
        return resp.SerializeToString()

    async def kill(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.KillRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        if not 0 < req.signal < 65:
            raise errors.invalid(f"signal: {req.signal} is not a valid signal number")
        if req.exec_id:
            p = task.process(req.exec_id)
            assert isinstance(p, ExecProcess)
            await p.kill(req.signal)
        else:
            await task.init.kill(req.signal, req.all)
        return EMPTY

    async def delete(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.DeleteRequest, payload)
        pid, status, exited_at = await self.tasks.delete(
            self._namespace(ctx, req.id), req.id, req.exec_id
        )
        if self.tasks.deps.faults.after_delete:
            self.tasks.deps.faults.kill_daemon()  # Fault: the window a crash can hit
        resp = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
        resp.exited_at.FromNanoseconds(exited_at)
        return resp.SerializeToString()

    async def pids(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.PidsRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        try:
            pids = await task.runc.ps(task.id)
        except RuncError as exc:
            raise errors.internal(str(exc)) from None
        execs = {p.pid: p.exec_id for p in task.execs.values() if p.pid and not p.exited}
        resp = shim_pb2.PidsResponse()
        for pid in pids:
            info = resp.processes.add(pid=pid)
            exec_id = execs.get(pid)
            if exec_id:
                info.info.type_url = PROCESS_DETAILS
                info.info.value = runc_options_pb2.ProcessDetails(
                    exec_id=exec_id
                ).SerializeToString()
        return resp.SerializeToString()

    async def pause(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.PauseRequest, payload)
        await self.tasks.get(self._namespace(ctx, req.id), req.id).init.pause()
        return EMPTY

    async def resume(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.ResumeRequest, payload)
        await self.tasks.get(self._namespace(ctx, req.id), req.id).init.resume()
        return EMPTY

    async def update(self, ctx: Context, payload: bytes) -> bytes:
        """New resource limits (CRI's UpdateContainerResources); annotations are ignored."""
        req = _parse(shim_pb2.UpdateTaskRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        await task.init.update(_linux_resources(req.resources.type_url, req.resources.value))
        return EMPTY

    async def stats(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.StatsRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        cgroup = task.cgroup_of_init()
        # On the first Stats, not at start: the metrics messages (cgroups v1 and v2) cost
        # 0.1 MB, and plain containerd never asks (issue 14's memory bound; CRI does).
        from shim.oci import metrics

        try:
            type_url, value = metrics.collect(cgroup)
        except CgroupError as exc:
            raise errors.not_found(f"stats of {task.id}: {exc}") from None
        resp = shim_pb2.StatsResponse()
        resp.stats.type_url = type_url
        resp.stats.value = value
        return resp.SerializeToString()

    async def connect(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.ConnectRequest, payload)
        task = self.tasks.find(self._namespace(ctx, req.id), req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task.init.pid if task else 0, version=VERSION
        ).SerializeToString()

    async def exec(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.ExecProcessRequest, payload)
        self.tasks.add_exec(self._namespace(ctx, req.id), req)
        return EMPTY

    async def checkpoint(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.CheckpointTaskRequest, payload)
        task = self.tasks.get(self._namespace(ctx, req.id), req.id)
        opts = decode_checkpoint_options(req.options.type_url, req.options.value)
        await task.init.checkpoint(req.path, opts)
        return EMPTY

    async def shutdown(self, ctx: Context, payload: bytes) -> bytes:
        _parse(shim_pb2.ShutdownRequest, payload)
        self.on_shutdown()
        return EMPTY

    async def close_io(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.CloseIORequest, payload)
        p = self.tasks.get(self._namespace(ctx, req.id), req.id).process(req.exec_id)
        if req.stdin:
            p.close_stdin()
        return EMPTY

    async def resize_pty(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(shim_pb2.ResizePtyRequest, payload)
        p = self.tasks.get(self._namespace(ctx, req.id), req.id).process(req.exec_id)
        if req.width > 0xFFFF or req.height > 0xFFFF:
            raise errors.invalid(f"ResizePty: {req.width}x{req.height} is not a terminal size")
        p.resize(req.width, req.height)
        return EMPTY

    # --- the daemon's own service, for the start and delete subcommands ---

    async def reserve(self, ctx: Context, payload: bytes) -> bytes:
        """``start`` reserves the daemon for a task containerd is about to create, so an
        idle daemon does not exit between ``start`` and ``Create``."""
        ns, id = _ns_and_id(payload)
        self.reservations.pop((ns, id), None)
        while len(self.reservations) >= MAX_RESERVATIONS:
            del self.reservations[next(iter(self.reservations))]
        self.reservations[(ns, id)] = time.monotonic()
        return str(os.getpid()).encode()

    async def daemon_info(self, ctx: Context, payload: bytes) -> bytes:
        """The daemon's pid, image start time and task count, as JSON (for ``reload``)."""
        return json.dumps(self.info()).encode()

    async def cleanup(self, ctx: Context, payload: bytes) -> bytes:
        """``delete``: containerd gave up on one task; kill and remove it if we have it."""
        ns, id = _ns_and_id(payload)
        self.reservations.pop((ns, id), None)
        task = self.tasks.get(ns, id)
        p = task.init
        if not p.exited:
            try:
                await p.kill(9, all=True)
            except TTRPCError:
                pass
            await p.wait()
        pid, status, exited_at = await self.tasks.delete(ns, id, "")
        return wire.delete_response(pid, status, exited_at)


def _ns_and_id(payload: bytes) -> tuple[str, str]:
    """The ``namespace\\0id`` payload of the daemon's own service, both checked."""
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        raise errors.invalid("payload: not UTF-8") from None
    ns, _, id = text.partition("\0")
    return identifiers.validate("namespace", ns), identifiers.validate("id", id)


def _linux_resources(type_url: str, value: bytes) -> bytes:
    """The OCI LinuxResources JSON of an Update, checked enough to hand to runc."""
    if not type_url and not value:
        raise errors.invalid("resources: missing")
    if type_url and type_url.rsplit("/", 1)[-1] != LINUX_RESOURCES.rsplit("/", 1)[-1]:
        raise errors.invalid(
            f"resources: unsupported type {type_url[:200]!r}, want {LINUX_RESOURCES}"
        )
    try:
        resources = json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise errors.invalid(f"resources: not valid JSON: {exc}") from None
    if not isinstance(resources, dict):
        raise errors.invalid("resources: not a JSON object")
    return value


def _set_time(ts: object, ns: int | None) -> None:
    if ns is not None:
        ts.FromNanoseconds(ns)  # type: ignore[attr-defined]
