"""Pod sandboxes without pause containers: what the Sandbox service (shim.pods.sandboxservice)
creates, holds and tears down when CRI runs a handler with ``sandboxer = "shim"``.

A sandbox is one small native process, ``embedshim-holder`` (holder/holder.c), started by the
daemon with no image, snapshot or runc: it joins the pod's cgroup (a leaf named after the
sandbox under the pod's cgroup parent, in every hierarchy) and the network namespace CRI made
(none: the node's, for hostNetwork pods), unshares fresh IPC and UTS namespaces (the pod's
hostname), writes the pod's sysctls, and, when the pod shares one, unshares a PID namespace
whose init it becomes.  Its pid is what SandboxStatus reports: CRI puts ``/proc/<pid>/ns/*``
in the spec of every container of the pod, and those are ordinary tasks of the daemon.

The holder's exit is watched like a task's init (pidfd, the reaper, the pinned BPF exit map)
CRI leaves the pod's hostname, hosts, resolv.conf and /dev/shm to such a controller: they are
made here too (shim.pods.podfiles).  Every sandbox is persisted (its own table in the daemon's
state store), so a restarted or reloaded daemon finds each holder again, and the exit of one
that died meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

from shim.api import sandbox_pb2
from shim.exits import exittrack
from shim.exits.reaper import Exit
from shim.oci.cgroups import cgroup_mounts
from shim.pods import podfiles
from shim.store.statestore import StoreError
from shim.tasks.task import Deps
from shim.ttrpc import TTRPCError
from shim.util import errors, log, procinfo

HOLDER = "embedshim-holder"
#: CRI's runtime.v1.NamespaceMode values
POD, CONTAINER, NODE = 0, 1, 2
#: How long a holder may take to announce itself
HOLDER_TIMEOUT = 10.0
#: What SandboxStatus reports as state (CRI's own names for a pod's states)
READY, NOTREADY = "SANDBOX_READY", "SANDBOX_NOTREADY"

_TABLE = """
CREATE TABLE IF NOT EXISTS sandbox (
    namespace   TEXT NOT NULL,
    id          TEXT NOT NULL,
    record      TEXT NOT NULL,
    PRIMARY KEY (namespace, id)
)
"""


@dataclass
class SandboxRecord:
    """One sandbox, as persisted (one JSON row; only this module reads it)."""

    namespace: str
    id: str
    bundle: str = ""
    netns: str = ""
    config: str = ""  # the PodConfig (hex of its wire bytes)
    pid: int = 0
    start_time: int = 0
    trace_id: int = 0
    cgroups: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # shim.pods.podfiles's directories
    exit_status: int | None = None
    exited_at: int | None = None
    created_at: int = field(default_factory=time.time_ns)


class SandboxStore:
    """The sandboxes' table, beside the tasks' in the same sqlite file (its own connection:
    the task store's schema and migrations stay as they are)."""

    def __init__(self, path: str) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA synchronous=NORMAL")  # as the task store's (WAL)
            self._db.execute(_TABLE)
        except sqlite3.Error as exc:
            raise StoreError(f"sandbox store {path}: {exc}") from exc

    def put(self, rec: SandboxRecord) -> None:
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO sandbox VALUES (?, ?, ?)",
                (rec.namespace, rec.id, json.dumps(asdict(rec))),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"sandbox store: {exc}") from exc

    def delete(self, namespace: str, id: str) -> None:
        try:
            self._db.execute("DELETE FROM sandbox WHERE namespace = ? AND id = ?", (namespace, id))
        except sqlite3.Error as exc:
            raise StoreError(f"sandbox store: {exc}") from exc

    def all(self) -> list[SandboxRecord]:
        names = {f.name for f in fields(SandboxRecord)}
        out = []
        for (text,) in self._db.execute("SELECT record FROM sandbox"):
            data = json.loads(text)
            out.append(SandboxRecord(**{k: v for k, v in data.items() if k in names}))
        return out

    def close(self) -> None:
        self._db.close()


def pod_config(options_type: str, options: bytes) -> sandbox_pb2.PodConfig:
    """The pod's config from CreateSandbox's options (CRI sends its PodSandboxConfig)."""
    if options_type and not options_type.endswith("PodSandboxConfig"):
        raise errors.invalid(f"options: {options_type[:200]!r} is not CRI's PodSandboxConfig")
    try:
        return sandbox_pb2.PodConfig.FromString(options)
    except Exception as exc:
        raise errors.invalid(f"options: bad PodSandboxConfig: {exc}") from None


def holder_argv(
    holder: str, config: sandbox_pb2.PodConfig, netns: str, cgroups: list[str]
) -> list[str]:
    """The holder's command line for this pod (see holder/holder.c)."""
    nsopts = config.linux.security_context.namespace_options
    host_network = nsopts.network == NODE
    argv = [holder]
    for d in cgroups:
        argv += ["-cgroup", d]
    if netns and not host_network:
        argv += ["-netns", netns]
    if nsopts.ipc != NODE:
        argv.append("-ipc")
    if not host_network:  # a hostNetwork pod has the node's hostname, as with pause
        argv += ["-uts", config.hostname]
    for key, value in sorted(config.linux.sysctls.items()):
        argv += ["-sysctl", f"{key}={value}"]
    if nsopts.pid == POD:
        argv.append("-pid")
    return argv


def cgroup_dirs(parent: str, id: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The holder's cgroup in every hierarchy: ``<parent>/<id>``, as runc would make the
    pause container's (a systemd slice parent is expanded to its path, the leaf then
    ``embedshim-<id>.scope``).  [] without a parent: the holder stays in the daemon's."""
    if not parent:
        return []
    if parent.endswith(".slice"):
        parts = parent[: -len(".slice")].split("-")
        rel = "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))
        rel = f"{rel}/embedshim-{id}.scope"
    else:
        rel = f"{parent.strip('/')}/{id}"
    if ".." in rel.split("/"):
        raise errors.invalid(f"cgroup parent {parent!r}")
    with open(mountinfo) as f:
        mounts = cgroup_mounts(f.read())
    dirs = []
    seen = set()
    for m in mounts:
        if m.point in seen or any(c.startswith("name=") for c in m.controllers):
            continue
        seen.add(m.point)
        dirs.append(os.path.join(m.point, rel))
    return dirs


class Sandbox:
    def __init__(self, rec: SandboxRecord) -> None:
        self.rec = rec
        self.exited = asyncio.Event()
        self.lock = asyncio.Lock()
        if rec.exited_at is not None:
            self.exited.set()

    @property
    def running(self) -> bool:
        return self.rec.pid > 0 and not self.exited.is_set()


class Sandboxes:
    """Every sandbox of the daemon, by (namespace, id)."""

    def __init__(self, deps: Deps, holder: str | None) -> None:
        self.deps = deps
        self.holder = holder
        self.store = SandboxStore(deps.store.path)
        self._all: dict[tuple[str, str], Sandbox] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        #: called when the last sandbox is gone (the daemon may then go idle)
        self.on_empty: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._all)

    def get(self, namespace: str, id: str) -> Sandbox:
        sb = self._all.get((namespace, id))
        if sb is None:
            raise errors.not_found(f"sandbox {id} in namespace {namespace}")
        return sb

    def find(self, namespace: str, id: str) -> Sandbox | None:
        return self._all.get((namespace, id))

    def create(self, namespace: str, id: str, bundle: str, netns: str, config: bytes) -> None:
        if (namespace, id) in self._all:
            return  # CreateSandbox sent again (a daemon restart): already done
        rec = SandboxRecord(namespace, id, bundle=bundle, netns=netns, config=config.hex())
        self.store.put(rec)
        self._all[(namespace, id)] = Sandbox(rec)

    async def start(self, namespace: str, id: str) -> Sandbox:
        sb = self.get(namespace, id)
        async with sb.lock:
            if sb.rec.pid:
                return sb
            if self.holder is None:
                raise errors.precondition(
                    f"{HOLDER} not found: build it (make setup) or use the podsandbox mode"
                )
            t0 = time.monotonic()
            rec = sb.rec
            config = sandbox_pb2.PodConfig.FromString(bytes.fromhex(rec.config))
            rec.cgroups = cgroup_dirs(config.linux.cgroup_parent, id)
            try:
                for d in rec.cgroups:
                    _make_cgroup(d)
                await kill_stale_holders(rec.cgroups)
                rec.files = podfiles.make(rec.bundle, id, config)
                pid = await self._spawn(holder_argv(self.holder, config, rec.netns, rec.cgroups))
            except BaseException:
                _remove_cgroups(rec.cgroups)
                podfiles.remove(rec.files)
                rec.cgroups, rec.files = [], []
                raise
            rec.pid = pid
            rec.start_time = procinfo.start_time(pid)
            rec.trace_id = self.deps.store.next_trace_id()
            self.store.put(rec)
            self._track(rec)
            self._watch(sb)
            log.event(
                "sandbox started",
                namespace=namespace,
                id=id,
                pid=pid,
                ms=round((time.monotonic() - t0) * 1000, 1),
            )
            return sb

    async def _spawn(self, argv: list[str]) -> int:
        """Run the holder; the pid it announces once the namespaces are made.  Started
        directly (not through shim.oci.runc.spawn's limits wrapper: it opens no files), its
        exit collected by our reaper."""
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                argv,
                executable=argv[0],
                stdin=subprocess.DEVNULL,
                stdout=w,
                stderr=w,
                env={},
                close_fds=True,
                restore_signals=True,
            )
            proc.returncode = 0  # never waited for here: the reaper collects it
            child = proc.pid
            exited = self.deps.reaper.watch(child)
        finally:
            os.close(w)
        out = bytearray()
        done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(r, False)

        def readable() -> None:
            try:
                chunk = os.read(r, 4096)
            except BlockingIOError:
                return
            if chunk and len(out) < 65536:
                out.extend(chunk)
            elif not chunk and not done.done():
                done.set_result(None)

        loop.add_reader(r, readable)
        try:
            async with asyncio.timeout(HOLDER_TIMEOUT):
                await done
                line = out.decode(errors="replace").strip()
                if not line.isdigit():
                    await exited
                    raise errors.internal(f"{HOLDER}: {line or 'exited without a pid'}")
                pid = int(line)
                if pid != child:  # a PID namespace's init: its parent exits now
                    ex = await exited
                    if ex.status != 0:
                        raise errors.internal(f"{HOLDER}: exited with status {ex.status}")
        except TimeoutError:
            os.kill(child, signal.SIGKILL)
            raise errors.internal(f"{HOLDER}: no pid after {HOLDER_TIMEOUT:.0f}s") from None
        finally:
            loop.remove_reader(r)
            os.close(r)
        return pid

    def _track(self, rec: SandboxRecord) -> None:
        exittrack.track(self.deps.tracker, rec.pid, rec.trace_id, rec.start_time, sandbox=rec.id)

    def _untrack(self, rec: SandboxRecord) -> None:
        exittrack.untrack(self.deps.tracker, rec.pid, rec.trace_id, sandbox=rec.id)

    def _watch(self, sb: Sandbox) -> None:
        rec = sb.rec
        fut = self.deps.exits.watch(rec.pid, rec.start_time, rec.trace_id)

        async def on_exit() -> None:
            ex: Exit = await fut
            self._set_exited(sb, ex.status, ex.at)

        t = asyncio.get_running_loop().create_task(on_exit())
        self._watchers.add(t)
        t.add_done_callback(self._watchers.discard)

    def _set_exited(self, sb: Sandbox, status: int, at: int) -> None:
        if sb.exited.is_set():
            return
        sb.rec.exit_status, sb.rec.exited_at = status, at
        try:
            self.store.put(sb.rec)
        except StoreError as exc:
            log.event("sandbox exit not persisted", logging.ERROR, id=sb.rec.id, error=exc)
        sb.exited.set()
        log.event("sandbox exited", id=sb.rec.id, pid=sb.rec.pid, status=status)

    async def stop(self, namespace: str, id: str, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the holder is gone."""
        sb = self.get(namespace, id)
        if not sb.running:
            if not sb.rec.pid:  # created, never started: nothing will ever exit
                self._set_exited(sb, 0, time.time_ns())
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, None)):
            if sb.exited.is_set():
                break
            if procinfo.is_running(sb.rec.pid, sb.rec.start_time):
                try:
                    os.kill(sb.rec.pid, sig)
                except ProcessLookupError:
                    pass
            try:
                async with asyncio.timeout(wait):
                    await sb.exited.wait()
            except TimeoutError:
                continue

    async def wait(self, namespace: str, id: str) -> SandboxRecord:
        sb = self.get(namespace, id)
        await sb.exited.wait()
        return sb.rec

    async def shutdown(self, namespace: str, id: str) -> None:
        """Stop if need be, then forget the sandbox: its cgroups, records, BPF entries."""
        sb = self.find(namespace, id)
        if sb is None:
            return
        async with sb.lock:  # a start in flight finishes first; its holder is then stopped
            if not sb.rec.pid:
                await self._sweep(sb.rec)
        await self.stop(namespace, id, 0)
        self._untrack(sb.rec)
        _remove_cgroups(sb.rec.cgroups)
        podfiles.remove(sb.rec.files)
        self.store.delete(namespace, id)
        del self._all[(namespace, id)]
        log.event("sandbox removed", namespace=namespace, id=id)
        if not self._all:
            self.on_empty()

    async def _sweep(self, rec: SandboxRecord) -> None:
        """A sandbox with no stored pid may still have what a start made before it failed or
        its daemon died: a holder in its leaf cgroups, the leaves, the pod's files.  All are
        named from the pod's config, so shutdown finds and removes them."""
        config = sandbox_pb2.PodConfig.FromString(bytes.fromhex(rec.config))
        try:
            rec.cgroups = cgroup_dirs(config.linux.cgroup_parent, rec.id)
        except TTRPCError:  # a parent no start could have used
            rec.cgroups = []
        await kill_stale_holders(rec.cgroups)
        rec.files = podfiles.where(rec.bundle, rec.id)

    def restore(self) -> None:
        """After a restart or a reload: every persisted sandbox, its holder watched again
        (one that exited meanwhile gets its status from the BPF exit map)."""
        for rec in self.store.all():
            sb = Sandbox(rec)
            self._all[(rec.namespace, rec.id)] = sb
            if sb.running:
                self._track(rec)  # again: a daemon may die between storing and registering
                self._watch(sb)
        if self._all:
            log.event("sandboxes restored", count=len(self._all))

    def close(self) -> None:
        for t in self._watchers:
            t.cancel()
        self.store.close()


def _make_cgroup(path: str) -> None:
    """mkdir -p, and in a cgroup v1 cpuset hierarchy each new level gets its parent's cpus
    and mems (the kernel leaves them empty, and an empty cpuset takes no process)."""
    missing = []
    d = path
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.makedirs(d, exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = os.path.join(d, name)
            try:
                with open(mine) as f:
                    if f.read().strip():
                        continue
                with open(os.path.join(os.path.dirname(d), name)) as f:
                    value = f.read().strip()
                with open(mine, "w") as f:
                    f.write(value)
            except FileNotFoundError:
                break  # not a cpuset hierarchy


def stale_holders(dirs: list[str]) -> list[int]:
    """Holders already in the pod's cgroups before its StartSandbox spawns one.

    Only a daemon that died during an earlier StartSandbox of this pod leaves one there: the
    leaf ``<parent>/<id>`` is named after the sandbox, which nothing else joins (the pod's
    containers get their own cgroups beside it), and its holder's pid was never stored.  Such
    a holder is one that announced its pid before the daemon died (or a -pid init whose
    parent did): any other dies of SIGPIPE when it writes to the dead daemon's pipe.  Having
    announced, it had joined every cgroup (its first step), so this finds all that survive."""
    pids: set[int] = set()
    for d in dirs:
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return sorted(p for p in pids if _is_holder(p))


def _is_holder(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:  # gone, or a zombie
        return False
    return os.path.basename(exe.removesuffix(" (deleted)")) == HOLDER


async def kill_stale_holders(dirs: list[str], timeout: float = HOLDER_TIMEOUT) -> list[int]:
    """SIGKILL each of :func:`stale_holders` and wait until it has exited (the keeper, whose
    orphan it is, reaps it); the sandbox was never reported started, so nothing uses it.
    Scanned again until none is left: a -pid holder may fork its init (into the same
    cgroups) between a scan and its kill, and nothing else forks there."""
    killed: list[int] = []
    for _ in range(4):  # a holder and its init, then an empty scan
        found = stale_holders(dirs)
        if not found:
            return killed
        for pid in found:
            if await _kill(pid, timeout):
                killed.append(pid)
                log.event("stale holder killed", pid=pid, cgroup=dirs[0])
    raise errors.internal(f"{HOLDER}s of an earlier start of this pod keep appearing")


async def _kill(pid: int, timeout: float) -> bool:
    """SIGKILL the holder ``pid`` and wait for its exit; False if it was gone already."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not _is_holder(pid):  # the pid was reused before the pidfd pinned it
            return False
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        try:
            await _exited(fd, timeout)
        except TimeoutError:
            raise errors.internal(
                f"{HOLDER} {pid} of an earlier start of this pod did not exit"
            ) from None
        return True
    finally:
        os.close(fd)


async def _exited(pidfd: int, timeout: float) -> None:
    """Once the process of ``pidfd`` has exited (a pidfd becomes readable then)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        async with asyncio.timeout(timeout):
            await done
    finally:
        loop.remove_reader(pidfd)


def _remove_cgroups(dirs: list[str]) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.event("sandbox cgroup not removed", logging.WARNING, dir=d, error=exc)


def goarch() -> str:
    """This machine's architecture in Go's (and so containerd's platform) words."""
    machine = os.uname().machine  # what platform.machine() reads, without its 0.1 MB module
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
