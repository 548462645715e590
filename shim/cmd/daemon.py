"""The daemon: one per containerd instance, serving every task of every namespace.

Started detached by ``containerd-shim-embed-v1 start`` (as ``containerd-shim-embed-v1
daemon ...`` so operators can tell it in ``ps``).  It is a child subreaper so every container
init is its child, listens on one 0600 ttrpc socket, and exits only when it serves no task
and no ``start`` has reserved it for a task on its way.

Its parent is normally the keeper (``keeper/keeper.c``, see ``shim.cmd.keeperlink``), which
accepts containerd's connections, keeps a duplicate of each and restarts the daemon if it
dies: the new daemon takes the connections back, answers what the dead one had read and not
answered (``shim.ttrpc.journal``) and finds its tasks in the store and the pinned BPF maps.
Without a keeper (its binary not built) it listens itself, and a crash ends every task.

SIGHUP upgrades it in place: it stops reading requests, lets the short ones finish, writes a
handoff (listening socket, containerd's connections with their unread bytes and pending
Waits, unsent events, terminal copies with their fds and logging programs) and re-execs
itself with the same pid, so its containers stay its children and containerd keeps its
connections.  The new image takes everything back from the handoff, the state store and the
pinned BPF maps.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable

from shim.api import events_pb2, events_service_pb2
from shim.cmd.keeperlink import Attached, KeeperLink
from shim.events.events import Publisher
from shim.exits.exittrack import ExitTracker
from shim.exits.exitwatch import ExitRecordLookup, ExitWatch
from shim.exits.oom import OOMWatcher
from shim.exits.reaper import Reaper, become_subreaper
from shim.io import consolesocket
from shim.oci import bundle, piddir
from shim.oci.sealedrunc import SealedCopies
from shim.pods.sandbox import Sandboxes
from shim.pods.sandboxservice import SANDBOX_SERVICE, SandboxService
from shim.store.statestore import StateStore
from shim.tasks.service import DAEMON_SERVICE, SAFE_TO_REPEAT, TASK_SERVICE, TaskService
from shim.tasks.task import Deps, Tasks
from shim.ttrpc import PeerCred, Server, require_same_user
from shim.ttrpc.journal import Journal
from shim.ttrpc.server import FRAME_TIMEOUT
from shim.util import limits, log
from shim.util.paths import DaemonPaths
from shim.watch.watchd import open_hub

# How long a `start`'s reservation keeps the daemon for a Create that has not come
# (EMBEDSHIM_RESERVATION_TTL overrides).  A daemon that never gets a task exits after it.
RESERVATION_TTL = 30.0
# How long an idle daemon stays up after its last task, so that a burst of short-lived
# containers does not pay for a daemon start each (EMBEDSHIM_IDLE_EXIT overrides; 0 = at once).
IDLE_EXIT = 10.0
HANDOFF_ENV = "EMBEDSHIM_HANDOFF"
QUIESCE_TIMEOUT = 10.0
# Calls that may wait for as long as a container runs: handed over, not waited for.
LONG_CALLS = frozenset({"Wait", "WaitSandbox"})


class Daemon:
    def __init__(
        self,
        paths: DaemonPaths,
        containerd_address: str,
        ttrpc_address: str,
        containerd_state: str = "",
    ) -> None:
        self.paths = paths
        self.containerd_address = containerd_address
        self.ttrpc_address = ttrpc_address
        #: the state directory of our containerd (``start`` learned it from its bundle), and
        #: so the only place Create takes bundles from, unless EMBEDSHIM_BUNDLE_ROOTS says
        #: otherwise
        self.containerd_state = containerd_state
        self.bundle_roots = bundle.allowed_roots(containerd_state or None)
        self.started_at = time.time_ns()
        self._stop = asyncio.Event()
        self._reload = False
        self._exiting = False
        self._last_shutdown = 0.0
        #: until when a daemon that has served no task yet stays up even without a
        #: reservation: those made before a crash or a reload are not known to this image
        self._held_until = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.keeper: KeeperLink | None = None
        self.attached: Attached | None = None
        self._recovery: asyncio.Task[None] | None = None
        #: where runc writes our pid files (shim.oci.piddir); None: in the bundles
        self.pid_dir: str | None = None

    async def run(self, ready_fd: int = -1) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_fatal_loop_error)
        become_subreaper()
        handoff = _read_handoff()
        self.keeper = KeeperLink.from_env()
        if self.keeper is not None:
            try:
                self.attached = self.keeper.attach()
            except (OSError, TimeoutError) as exc:
                log.event("keeper does not answer; running without it", logging.ERROR, error=exc)
                self.keeper = None
        elif handoff is None:
            from shim.util import packaged

            log.event(
                "running without a keeper: a crash of this daemon ends every task",
                logging.WARNING,
                reason=packaged.keeper_missing()
                if packaged.keeper() is None
                else "started without one (not by `start`)",
            )
        reaper = Reaper(loop)
        self.pid_dir = piddir.prepare(piddir.path_for(self.paths.dir))
        if self.pid_dir is None:
            log.event("pid files in the bundles: no private directory in " + piddir.SHM)
        store = StateStore(self.paths.store)
        store.checkpoint_in_background()
        publisher = Publisher(self.ttrpc_address)
        tracker = open_tracker(self.paths)
        exits = ExitWatch(loop, reaper, exit_record_lookup(tracker) if tracker else None)
        if tracker is not None:
            drain_ring(loop, tracker)
        oom = OOMWatcher(loop)
        self.watch = open_hub(self.paths)
        self.tasks = Tasks(
            Deps(
                self.paths,
                reaper,
                exits,
                store,
                publisher,
                tracker,
                oom,
                keeper=self.keeper,
                bundle_roots=self.bundle_roots,
                watch=self.watch,
                runc_copies=SealedCopies(),
                pid_dir=self.pid_dir,
            )
        )
        queued_exits, queued_ooms = _requeue_events(publisher, store, handoff)
        consolesocket.clear(self.paths.console_dir)  # no runc is connecting now
        io_state = handoff.get("io") if handoff is not None else None
        kept = self.attached.stored if self.attached is not None else {}
        if handoff is not None:  # the handoff has the live ones; these are duplicates
            for fd in kept.values():
                os.close(fd)
            kept = {}
        self.tasks.restore(
            queued_exits, queued_ooms, io_state if isinstance(io_state, dict) else None, kept
        )
        self.sandboxes = Sandboxes(self.tasks.deps, _holder())
        self.sandboxes.restore()
        reaper.reap()  # children that exited while no handler was installed (re-exec)
        await self.watch.start()
        publisher.start()
        self.service = TaskService(self.tasks, self._on_shutdown, self.info)
        self.tasks.on_empty = self.sandboxes.on_empty = self._on_shutdown
        journal = Journal(self.paths.journal) if self.attached is not None else None
        server = Server(
            accept_filter=admit_peer,
            frame_timeout=_frame_timeout(),
            journal=journal,
            repeatable=[(s, m) for s in (TASK_SERVICE, DAEMON_SERVICE) for m in SAFE_TO_REPEAT],
        )
        server.register(TASK_SERVICE, self.service.methods())
        server.register(DAEMON_SERVICE, self.service.daemon_methods())
        server.register(
            SANDBOX_SERVICE, SandboxService(self.sandboxes, self.service.reservations).methods()
        )
        if handoff is not None:
            from shim.ttrpc.server import ServerHandoff

            adopted = ServerHandoff.from_json(str(handoff["server"]))
            # With a keeper, it accepts (a connection accepted here would die with us).
            await server.adopt(adopted, accept=self.attached is None)
            if self.attached is not None:
                os.close(self.attached.listen_fd)  # the handed-over one is the same socket
                known = {conn.key for conn in adopted.connections}
                for key, fd in self.attached.connections.items():
                    if key in known:
                        os.close(fd)
                    else:  # accepted while we re-executed
                        await server.serve_kept(fd, key)
        elif self.attached is not None:
            assert journal is not None
            await self._take_back(server, journal, self.attached)
        else:
            # A socket file left by a daemon that died: `start` holds the start lock while
            # it runs us, so nobody else can be listening on it.
            try:
                os.unlink(self.paths.socket)
            except FileNotFoundError:
                pass
            await server.start_unix(self.paths.socket, mode=0o600)
        if self.keeper is not None:
            self._listen_to_keeper(self.keeper, server)
        with open(self.paths.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        att = self.attached
        log.event(
            "daemon reloaded"
            if handoff
            else "daemon restarted after a crash"
            if att is not None and att.generation > 1
            else "daemon started",
            pid=os.getpid(),
            socket=self.paths.socket,
            containerd=self.containerd_address,
            events=self.ttrpc_address,
            bundle_roots=":".join(self.bundle_roots),
            roots_from=bundle.roots_source(self.containerd_state or None),
            tasks=len(self.tasks),
            keeper=self.keeper.keeper_pid if self.keeper is not None else None,
            generation=att.generation if att is not None else None,
            crashes=att.crashes if att is not None else None,
            connections=len(att.connections) if att is not None else None,
        )
        if ready_fd >= 0:
            _signal_ready(ready_fd)
        # Idle from the start: a daemon that never gets a task (its Create failed, or
        # containerd went away after `start`) exits once no reservation holds it.
        self._last_shutdown = time.monotonic()
        self._held_until = self._last_shutdown + _reservation_ttl()
        self._arm_idle_exit()
        await self._stop.wait()
        if self._reload:
            await self._handoff_and_exec(server, publisher, exits, tracker, reaper, store, oom)
            return  # only if exec failed: keep serving is impossible now; exit
        log.event("daemon stopping", pid=os.getpid(), tasks=len(self.tasks))
        await server.close()
        await self.watch.close()
        await publisher.flush()
        await publisher.close()
        self.sandboxes.close()
        exits.close()
        oom.close()
        if tracker is not None:
            loop.remove_reader(tracker.ring_fd())
            tracker.close()  # the pinned program stays attached and keeps recording
        reaper.close()
        store.close()
        if self.pid_dir is not None:
            piddir.remove(self.pid_dir)
        try:
            os.unlink(self.paths.pidfile)
        except OSError:
            pass

    def info(self) -> dict[str, object]:
        att = self.attached
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "tasks": len(self.tasks),
            "sandboxes": len(self.sandboxes),
            "containerd": self.containerd_address,
            # Who holds the connections across a crash, and how many crashes it has seen.
            "keeper": self.keeper.keeper_pid if self.keeper is not None else None,
            "generation": att.generation if att is not None else None,
            "crashes": att.crashes if att is not None else None,
            "bundle_roots": list(self.bundle_roots),
        }

    async def _take_back(self, server: Server, journal: Journal, att: Attached) -> None:
        """After a crash (or at first start: then all is empty): serve the connections the
        keeper held, answer what the dead daemon had read and not answered, and clean up
        after what it was doing for connections that are gone."""
        listener = socket.socket(fileno=att.listen_fd)
        await server.start_sock(listener, accept=False)  # the keeper accepts
        journaled = journal.load()
        known = journal.connections_with_state() | set(journaled)
        if att.generation == 1:
            # A new keeper numbers connections from 1 again: whatever the journal holds is
            # from connections an earlier keeper let go of (a crash loop): none is ours.
            known_live = set()
        else:
            known_live = known & set(att.connections)
        # Calls of connections that are gone: out of the journal before any live connection
        # writes to it; an interrupted Create among them is undone in the background.
        orphans = []
        for key in known - known_live:
            for call in journaled.get(key, []):
                journal.done(key, call.stream_id)
                orphans.append(call)
            journal.forget_connection(key)
        if orphans:
            self._recovery = asyncio.get_running_loop().create_task(
                self.service.recover_unanswered(orphans)
            )
        for key, fd in att.connections.items():
            if key in known_live:
                await server.serve_kept(
                    fd, key, journaled=journaled.get(key, []), state=journal.state(key)
                )
            else:
                await server.serve_kept(fd, key)
        replayed = sum(len(journaled.get(k, [])) for k in known_live)
        if replayed:
            log.event("requests of the dead daemon answered again", count=replayed)

    def _listen_to_keeper(self, keeper: KeeperLink, server: Server) -> None:
        loop = asyncio.get_running_loop()
        taking: set[asyncio.Task[None]] = set()  # held until done (the loop's refs are weak)

        def connection(key: int, fd: int) -> None:
            task = loop.create_task(server.serve_kept(fd, key))
            taking.add(task)
            task.add_done_callback(taking.discard)

        def reaped(pid: int, status: int) -> None:
            log.event("orphan reaped by the keeper", logging.DEBUG, pid=pid, status=status)

        def gone() -> None:
            log.event(
                "keeper gone: accepting connections ourselves; a crash now would end every task",
                logging.WARNING,
                keeper=keeper.keeper_pid,
            )
            self.keeper = None
            server.accept_now()

        keeper.listen(connection, reaped, gone)

    def _on_sighup(self) -> None:
        log.event("reload requested", pid=os.getpid())
        self._reload = True
        self._stop.set()

    async def _handoff_and_exec(
        self,
        server: Server,
        publisher: Publisher,
        exits: ExitWatch,
        tracker: ExitTracker | None,
        reaper: Reaper,
        store: StateStore,
        oom: OOMWatcher,
    ) -> None:
        import base64  # only a reload needs it: not loaded by every daemon (issue 14)

        if self.keeper is not None:
            self.keeper.stop()  # new connections wait in the channel for the new image
        await server.quiesce(keep=lambda ctx: ctx.method in LONG_CALLS, timeout=QUIESCE_TIMEOUT)
        unsent = await publisher.detach()
        await self.watch.handoff()
        state = server.handoff()
        io_state = self.tasks.handoff_io()  # terminal copies stop here, their fds inherited
        self.sandboxes.close()
        exits.close()
        oom.close()  # kills from now on are counted by the kernel; the new image looks
        if tracker is not None:
            asyncio.get_running_loop().remove_reader(tracker.ring_fd())
            tracker.close()
        reaper.close()
        store.close()
        path = os.path.join(self.paths.dir, "handoff.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "server": state.to_json(),
                    "events": [
                        [ns, topic, base64.b64encode(payload).decode(), marked]
                        for ns, topic, payload, marked in unsent
                    ],
                    "io": io_state,
                },
                f,
            )
        env = limits.reexec_env(dict(os.environ))
        env[HANDOFF_ENV] = path
        if self.keeper is not None:
            self.keeper.before_exec(env)
        argv = _daemon_argv()
        log.event("re-executing", pid=os.getpid(), argv=" ".join(argv))
        logging.shutdown()
        os.execve(sys.executable, [sys.executable, *_interpreter_options(), *argv], env)

    def _on_shutdown(self) -> None:
        """A task went (Shutdown, or the last task removed by Delete, Cleanup or a failed
        Create): idle from now, once no task or reservation is left."""
        self._last_shutdown = time.monotonic()
        self._held_until = 0.0
        self._arm_idle_exit()

    @staticmethod
    def _idle_delay() -> float:
        return float(os.environ.get("EMBEDSHIM_IDLE_EXIT", IDLE_EXIT))

    def _idle_deadline(self) -> float | None:
        """When (time.monotonic()) the daemon may exit if nothing changes meanwhile: the
        idle delay after the last task left (or after it started), and not before every
        reservation (and a new daemon's hold) has expired; None while it serves a task."""
        if self._serving():
            return None
        ttl = _reservation_ttl()
        deadline = max(self._last_shutdown + self._idle_delay(), self._held_until)
        for t in self.service.reservations.values():
            deadline = max(deadline, t + ttl)
        return deadline

    def _arm_idle_exit(self) -> None:
        """(Re)arm the one idle timer for the current deadline, if the daemon serves no
        task; a task's leaving arms it again."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        deadline = self._idle_deadline()
        if deadline is None or self._exiting:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.monotonic())
        self._idle_timer = loop.call_later(delay, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        deadline = self._idle_deadline()
        if deadline is None:
            return
        if deadline > time.monotonic():  # a reservation or a task came and went
            self._arm_idle_exit()
        else:
            asyncio.ensure_future(self._exit_if_idle())

    def _idle(self) -> bool:
        now = time.monotonic()
        ttl = _reservation_ttl()
        res = self.service.reservations
        for key, t in list(res.items()):
            if now - t >= ttl:
                del res[key]
        return not self._serving() and not res

    def _serving(self) -> int:
        """Tasks and pod sandboxes: the daemon stays while it has either."""
        return len(self.tasks) + len(self.sandboxes)

    async def _exit_if_idle(self) -> None:
        """Exit if nothing is served; under the start lock, so a ``start`` racing with us
        either reserves us first or finds the socket gone and starts a new daemon."""
        if self._exiting or self._reload:
            return
        if not self._idle():
            self._arm_idle_exit()
            return
        self._exiting = True
        lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, lock_fd, fcntl.LOCK_EX)
            if not self._idle():
                self._exiting = False
                self._arm_idle_exit()  # a `start` reserved us meanwhile: until it expires
                return
            os.unlink(self.paths.socket)
            log.event("idle, exiting", pid=os.getpid())
            self._stop.set()
        finally:
            os.close(lock_fd)


def _holder() -> str | None:
    from shim.util import packaged

    return packaged.holder()


def _reservation_ttl() -> float:
    try:
        value = float(os.environ.get("EMBEDSHIM_RESERVATION_TTL", RESERVATION_TTL))
    except ValueError:
        return RESERVATION_TTL
    return value if value >= 0 else RESERVATION_TTL


def _fatal_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """An exception escaped to the event loop (a callback's, not a request's: those become
    statuses): the daemon's state can no longer be trusted.  Exit at once, without closing
    anything, as a crash would: the keeper starts a new daemon, which takes everything back
    from the keeper, the journal, the store and the BPF maps."""
    exc = context.get("exception")
    if exc is None or isinstance(exc, (ConnectionError, asyncio.CancelledError)):
        loop.default_exception_handler(context)  # asyncio's own notices: not ours to die of
        return
    logging.getLogger("embedshim").error(
        "unexpected error in the event loop; exiting for a restart: %s",
        context.get("message"),
        exc_info=exc if isinstance(exc, BaseException) else None,
    )
    logging.shutdown()
    os._exit(70)


def _signal_ready(fd: int) -> None:
    """Tell ``start`` we serve, through its pipe.  The same command line run again by hand
    or by a supervisor has no such pipe on that fd (or something else there): say nothing."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            log.event("no readiness pipe to signal", ready_fd=fd, error="not a pipe")
            return
        try:
            os.write(fd, b"ready\n")
        finally:
            os.close(fd)
    except OSError as exc:
        log.event("no readiness pipe to signal", ready_fd=fd, error=exc)


def _interpreter_options() -> list[str]:
    """The options Python itself was started with (``-SE`` from the launcher; see
    shim/cmd/launcher.py), so the re-executed daemon starts the same way."""
    count = len(sys.orig_argv) - len(sys.argv)
    if count < 1 or sys.orig_argv[count] != sys.argv[0]:
        return []  # not started as a script (python -m shim): as before, no options
    return list(sys.orig_argv[1:count])


def admit_peer(peer: PeerCred | None) -> bool:
    """Only our own user (root) may talk to the daemon; anyone else is dropped, and said so.

    The socket is 0600 in a 0700 directory, so a refused peer got past file permissions
    (CAP_DAC_OVERRIDE, or a descriptor passed to it): worth a warning."""
    if require_same_user(peer):
        return True
    log.event(
        "connection refused: peer is not our user",
        logging.WARNING,
        peer_pid=peer.pid if peer else None,
        uid=peer.uid if peer else None,
        gid=peer.gid if peer else None,
    )
    return False


def _frame_timeout() -> float:
    """Seconds a peer may take to finish a frame (``EMBEDSHIM_FRAME_TIMEOUT``)."""
    try:
        value = float(os.environ.get("EMBEDSHIM_FRAME_TIMEOUT", ""))
    except ValueError:
        return FRAME_TIMEOUT
    return value if value > 0 else FRAME_TIMEOUT


def _daemon_argv() -> list[str]:
    """This daemon's own command line, minus the one-shot readiness fd."""
    argv = list(sys.argv)
    if "-ready-fd" in argv:
        i = argv.index("-ready-fd")
        del argv[i : i + 2]
    return argv


def _read_handoff() -> dict[str, object] | None:
    path = os.environ.pop(HANDOFF_ENV, "")
    if not path:
        return None
    with open(path) as f:
        data: dict[str, object] = json.load(f)
    os.unlink(path)
    return data


def _requeue_events(
    publisher: Publisher, store: StateStore, handoff: dict[str, object] | None
) -> tuple[set[tuple[str, str, str]], set[tuple[str, str]]]:
    """Queue the previous image's unsent events, in order; returns the exits (namespace,
    container id, exec id) and OOMs (namespace, container id) among them, which restore
    must not publish a second time."""
    exits: set[tuple[str, str, str]] = set()
    ooms: set[tuple[str, str]] = set()
    if handoff is None:
        return exits, ooms
    import base64  # after a reload only: see _handoff_and_exec

    events = handoff.get("events")
    assert isinstance(events, list)
    for ns, topic, b64, marked in events:
        payload = base64.b64decode(b64)
        on_sent: Callable[[], None] | None = None
        if topic == "/tasks/exit":
            env = events_service_pb2.ForwardRequest.FromString(payload).envelope
            ev = events_pb2.TaskExit.FromString(env.event.value)
            exec_id = "" if ev.id == ev.container_id else ev.id
            key = (ns, ev.container_id, exec_id)
            exits.add(key)
            if marked:
                on_sent = functools.partial(store.update, *key, exit_published=True)
        elif topic == "/tasks/oom":
            env = events_service_pb2.ForwardRequest.FromString(payload).envelope
            cid = events_pb2.TaskOOM.FromString(env.event.value).container_id
            ooms.add((ns, cid))
            rec = store.get(ns, cid)
            if marked and rec is not None:
                on_sent = functools.partial(store.update, ns, cid, oom_published=rec.oom_kills)
        publisher.requeue(ns, topic, payload, on_sent)
    return exits, ooms


NO_BPF = "exit statuses of containers that exit while no daemon runs are lost"


def open_tracker(paths: DaemonPaths) -> ExitTracker | None:
    """The pinned BPF exit tracker, or None (said once in the log) where BPF cannot be used:
    the daemon then works with its reaper and pidfds alone."""
    if os.environ.get("EMBEDSHIM_BPF", "").lower() in ("off", "0", "no"):
        log.event(
            "BPF exit tracking disabled by EMBEDSHIM_BPF; using pidfd and waitid only",
            logging.WARNING,
            consequence=NO_BPF,
        )
        return None
    try:
        tracker = ExitTracker.open(paths.bpf_pin_root)
    except Exception as exc:
        ok, reason = ExitTracker.available(paths.bpf_pin_root, check_load=False)
        log.event(
            "BPF exit tracking unavailable; using pidfd and waitid only",
            logging.WARNING,
            reason=reason if not ok else str(exc),
            consequence=NO_BPF,
        )
        return None
    log.event("BPF exit tracking on", pins=tracker.pin_dir, link_id=tracker.link_id)
    return tracker


def drain_ring(loop: asyncio.AbstractEventLoop, tracker: ExitTracker) -> None:
    """Consume the BPF ring buffer's wake-ups as they come, so it never fills.

    They are only a hint: an exit is published once the process is really gone (the reaper
    collected it, or its pidfd became readable), with its status from the exits map."""
    try:
        fd = tracker.ring_fd()
    except OSError as exc:
        log.event("BPF ring buffer unavailable", logging.WARNING, error=exc)
        return

    def readable() -> None:
        for trace_id in tracker.poll_ring():
            log.event("exit noticed by BPF", logging.DEBUG, trace_id=trace_id)

    loop.add_reader(fd, readable)


def exit_record_lookup(tracker: ExitTracker) -> ExitRecordLookup:
    def lookup(trace_id: int) -> tuple[int, int] | None:
        record = tracker.lookup_exit(trace_id)
        if record is None:
            return None
        return record.wait_status, record.exited_at_wall_ns()

    return lookup


# rt_sigaction syscall numbers (glibc's sigaction refuses its reserved signals 32 and 33)
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "riscv64": 134, "ppc64le": 173, "s390x": 174}


def reset_inherited_ignores() -> None:
    """Give back their default disposition to signals ignored by whoever started us.

    An ignored signal survives every execve, down to runc and each container's processes;
    glibc's posix_spawn (GNU make 4.3 runs recipes with it, for one) leaves its reserved
    signals 32 and 33 ignored.  Python's own SIGPIPE/SIGXFSZ choice is left alone: children
    get those back through subprocess's restore_signals.
    """
    with open("/proc/self/status") as f:
        mask = next((int(x.split()[1], 16) for x in f if x.startswith("SigIgn:")), 0)
    keep = {signal.SIGPIPE, signal.SIGXFSZ}
    ignored = [n for n in range(1, 65) if mask >> (n - 1) & 1 and n not in keep]
    nr = _SYS_RT_SIGACTION.get(os.uname().machine)
    if not ignored or nr is None:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    act = ctypes.create_string_buffer(32)  # SIG_DFL, no flags, no restorer, empty mask
    for sig in ignored:
        libc.syscall(nr, sig, act, None, 8)
    log.event("inherited signal ignores reset", signals=",".join(map(str, ignored)))


def main(
    containerd_address: str,
    ttrpc_address: str,
    debug: bool,
    ready_fd: int,
    containerd_state: str = "",
) -> int:
    paths = DaemonPaths.for_containerd(containerd_address)
    paths.ensure()
    os.chdir(paths.dir)
    log.setup(paths.log, debug)
    if containerd_state and not bundle.is_clean_absolute(containerd_state):
        log.event(
            "daemon not started: -containerd-state is not a clean absolute path",
            logging.ERROR,
            containerd_state=containerd_state,
        )
        return 2
    reset_inherited_ignores()
    nofile = limits.raise_nofile()
    if "children" in nofile:
        log.event("open-file limit raised; programs we start get the original", **nofile)
    daemon = Daemon(paths, containerd_address, ttrpc_address, containerd_state)
    try:
        asyncio.run(daemon.run(ready_fd))
    except Exception:
        logging.getLogger("embedshim").exception("daemon failed")
        return 1
    return 0
