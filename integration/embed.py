"""Helpers for tests of our runtime: find its daemon, talk to it directly, start it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from integration.harness import (
    Containerd,
    HarnessError,
    ProcInfo,
    parse_event,
    processes_matching,
    wait_for,
)
from shim.ttrpc import Client
from shim.util import wire
from shim.util.paths import DaemonPaths

RUNTIME = "io.containerd.embed.v1"
SHIM = "containerd-shim-embed-v1"
TASK_SERVICE = "containerd.task.v2.Task"
T = TypeVar("T")


BPF_TEST_ROOT = "/sys/fs/bpf/embedshim-test"
#: containerd 2.2.7 builds (its daemon, ctr and runc shim), beside the project: tests that
#: cover 2.x as well as Debian's 1.6 put this first on containerd's PATH (see its README).
CONTAINERD2_BIN = Path(__file__).resolve().parents[2] / "shared" / "containerd2" / "bin"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def containerd_version_env(version: str) -> dict[str, str]:
    """embedshim_env() for containerd ``version`` ("1.6": Debian's; "2.2.7": CONTAINERD2_BIN,
    skipping the test where that folder is missing)."""
    env = embedshim_env()
    if version == "2.2.7":
        if not (CONTAINERD2_BIN / "containerd").exists():
            import pytest

            pytest.skip(f"containerd 2.2.7 not found in {CONTAINERD2_BIN}")
        venv_bin = os.path.join(sys.prefix, "bin")
        env["PATH"] = f"{venv_bin}:{CONTAINERD2_BIN}:{SYSTEM_PATH}"
    return env


def embedshim_env() -> dict[str, str]:
    """The environment that keeps a test's daemon files in its containerd's temp dir and its
    BPF pins in a bpffs dir of its own (removed by remove_host_leftovers).

    Nothing tells the daemon where bundles are: every test's containerd has its ``state`` in
    its temp dir (not containerd's default /run/containerd), and the daemon learns it from
    the bundle ``start`` runs in, as it must on any node (k3s, a second containerd)."""
    return {
        "EMBEDSHIM_ROOT": "{tmp}/embedshim",
        "EMBEDSHIM_BPF_ROOT": BPF_TEST_ROOT,
    }


@contextlib.contextmanager
def embed_containerd(
    busybox: str,
    env: dict[str, str] | None = None,
    cls: type[Containerd] = Containerd,
    **kw: Any,
) -> Iterator[Containerd]:
    """A private containerd for our runtime (``env``: embedshim_env() or more); everything it
    and its shims and containers made is removed afterwards, pass or fail, BPF pins too."""
    c = cls(extra_env=env or embedshim_env(), watch_paths=[busybox], **kw)
    try:
        yield c
    finally:
        try:
            c.cleanup()
        finally:
            remove_host_leftovers(c)


def pending_requests(c: Containerd) -> list[tuple[str, bytes]]:
    """(method, payload) of every request the daemon has read and not yet answered, from its
    journal (see shim.ttrpc.journal): proof that a call has reached the daemon."""
    from shim.ttrpc.journal import Journal

    out = []
    for calls in Journal(daemon_paths(c).journal).load().values():
        for call in calls:
            request = call.request()
            out.append((request.method, request.payload))
    return out


def journal_leftovers(c: Containerd) -> list[str]:
    """What the daemon's journal still holds: requests read and not answered (by connection
    and stream id) and files of its own beside the slot files and connection states."""
    from shim.ttrpc.journal import Journal

    directory = daemon_paths(c).journal
    if not os.path.isdir(directory):
        return []
    out = [
        f"{conn}.{call.stream_id} {call.request().method}"
        for conn, calls in Journal(directory).load().items()
        for call in calls
    ]
    out += [
        name
        for name in os.listdir(directory)
        if not name.startswith("slots.") and not name.endswith(".state")
    ]
    return out


def runtime_info_failures(c: Containerd) -> list[str]:
    """containerd 2.x's complaints that a runtime's shim gave it no RuntimeInfo (``-info``),
    logged at every Create while it fails (the first three)."""
    with open(c.log_path, errors="replace") as f:
        return [line for line in f if "failed to load runtime info" in line][:3]


def bundle_dir(c: Containerd, namespace: str, id: str) -> str:
    """Where containerd would put the bundle of (namespace, id): the only place the daemon
    accepts one from."""
    return os.path.join(c.state, "io.containerd.runtime.v2.task", namespace, id)


def daemon_paths(c: Containerd) -> DaemonPaths:
    return DaemonPaths.for_containerd(c.address, root=c.embedshim_root)


def bpf_pin_root(c: Containerd) -> str:
    key = os.path.basename(daemon_paths(c).dir)
    return os.path.join(BPF_TEST_ROOT, key)


def remove_host_leftovers(c: Containerd) -> None:
    """What this instance's daemon keeps outside containerd's temp dir: its BPF program and
    maps, unpinned (the program detaches once nobody holds it), and its pid directory in
    /dev/shm (shim.oci.piddir), which a daemon killed rather than idle leaves behind."""
    from shim.exits.exittrack import ExitTracker
    from shim.oci import piddir
    from shim.watch.watchprobe import WatchProbe

    WatchProbe.uninstall(bpf_pin_root(c))
    ExitTracker.uninstall(bpf_pin_root(c))
    try:
        os.rmdir(BPF_TEST_ROOT)
    except OSError:
        pass
    shutil.rmtree(piddir.path_for(daemon_paths(c).dir), ignore_errors=True)


def daemons(c: Containerd) -> list[ProcInfo]:
    """The live daemon processes serving this containerd instance."""
    return processes_matching(
        lambda p: (
            not p.zombie
            and any(a.endswith(SHIM) for a in p.cmdline)
            and "daemon" in p.cmdline
            and c.address in p.cmdline
        )
    )


def keeper_of(daemon: ProcInfo) -> int:
    """The pid of the daemon's keeper (its parent, which restarts it after a crash)."""
    with open(f"/proc/{daemon.ppid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[-2:] == [b"keeper", b""], f"the daemon's parent is no keeper: {argv}"
    return daemon.ppid


# keeper/keeper.c: LOOP_CRASHES crashes within LOOP_WINDOW_S is a crash loop, and the keeper
# gives up (every connection closes).  CRI tests share one daemon for the whole session and
# crash it on purpose in several tests: their kills are paced so they never add up to one.
LOOP_CRASHES, LOOP_WINDOW_S = 5, 10.0
_deliberate_kills: dict[int, list[float]] = {}


def crash_daemon(daemon: ProcInfo, sig: int = signal.SIGKILL) -> None:
    """Kill the daemon as a crash would (its keeper restarts it), first waiting, if need be,
    until this kill cannot be the keeper's fifth within its crash-loop window."""
    keeper = daemon.ppid
    now = time.monotonic()
    recent = [t for t in _deliberate_kills.get(keeper, []) if now - t < LOOP_WINDOW_S]
    if len(recent) >= LOOP_CRASHES - 1:
        time.sleep(LOOP_WINDOW_S + 0.2 - (now - recent[-(LOOP_CRASHES - 1)]))
    _deliberate_kills[keeper] = [*recent, time.monotonic()]
    os.kill(daemon.pid, sig)


def kill_daemon_for_good(c: Containerd) -> int:
    """SIGKILL the daemon's keeper, then the daemon: nothing restarts it, as before the keeper
    existed (for tests of what happens while no daemon runs).  Returns the daemon's pid."""
    (daemon,) = daemons(c)
    with open(f"/proc/{daemon.ppid}/cmdline", "rb") as f:
        keeper = f.read().split(b"\0")[-2:-1] == [b"keeper"]
    if keeper:
        os.kill(daemon.ppid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{daemon.ppid}/fd/0"), what="keeper gone")
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not daemons(c), what="daemon gone")
    return daemon.pid


def oci_spec(rootfs: str, *args: str) -> dict[str, object]:
    """A minimal OCI config for a busybox rootfs (read-only, its own pid namespace)."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "args": list(args),
            "cwd": "/",
            "env": ["PATH=/bin:/sbin:/usr/bin"],
            "user": {"uid": 0, "gid": 0},
        },
        "root": {"path": rootfs, "readonly": True},
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")]},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    }


def write_bundle(c: Containerd, namespace: str, id: str, config: object) -> str:
    """A bundle where containerd would make it, with ``config`` (a dict or raw text)."""
    bundle = bundle_dir(c, namespace, id)
    os.makedirs(bundle)
    with open(os.path.join(bundle, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return bundle


async def call(
    address: str,
    method: str,
    msg: object,
    ns: str | None = "direct",
    service: str = TASK_SERVICE,
    timeout: float = 30,
) -> bytes:
    """One call straight to the daemon (``msg``: a protobuf message or raw bytes)."""
    payload = msg if isinstance(msg, bytes) else msg.SerializeToString()  # type: ignore[attr-defined]
    metadata = {"containerd-namespace-ttrpc": ns} if ns is not None else {}
    async with await Client.connect(address) as client:
        return await client.call(service, method, payload, metadata=metadata, timeout=timeout)


def start_daemon(
    c: Containerd,
    bundle: str,
    namespace: str = "test",
    id: str = "x",
    env: dict[str, str] | None = None,
) -> str:
    """Run the ``start`` subcommand as containerd would; returns the address it printed."""
    env = {**c.env, **(env or {})}
    env["TTRPC_ADDRESS"] = c.ttrpc_address
    out = subprocess.run(
        [
            os.path.join(sys.prefix, "bin", SHIM),
            "-namespace",
            namespace,
            "-address",
            c.address,
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            id,
            "start",
        ],
        cwd=bundle,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=20,
        check=True,
    )
    return out.stdout.decode()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


SENTINEL_TOPIC = "/esh-test/sentinel"
#: A type ctr knows how to print (it drops events whose type it cannot unmarshal).
_SENTINEL_TYPE = b"containerd.events.NamespaceCreate"


def publish_sentinel(c: Containerd, token: str, namespace: str | None = None) -> None:
    """Publish ``{"name": token}`` on SENTINEL_TOPIC through containerd's Events service
    (a PublishRequest encoded by hand: the tests have no stubs for that service)."""
    import grpc

    inner = wire.bytes_field(1, token.encode())  # NamespaceCreate.name
    event = wire.bytes_field(1, _SENTINEL_TYPE) + wire.bytes_field(2, inner)  # Any
    request = wire.bytes_field(1, SENTINEL_TOPIC.encode()) + wire.bytes_field(2, event)
    with grpc.insecure_channel(f"unix://{c.address}") as channel:
        publish = channel.unary_unary("/containerd.services.events.v1.Events/Publish")
        publish(request, metadata=(("containerd-namespace", namespace or c.namespace),), timeout=10)


class Events:
    """A `ctr events` subscriber collecting lines in the background.

    It is subscribed once the constructor returns (a sentinel event went through), and
    :meth:`sync` proves that every event containerd published before it was called has
    arrived: no test needs to sleep for either."""

    def __init__(self, c: Containerd) -> None:
        self.c = c
        self.proc = c.ctr_async("events")
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.sync()

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            self.lines.append(line)

    def sync(self, timeout: float = 15.0) -> int:
        """Publish a sentinel through containerd and wait until it comes through; returns
        its index in :attr:`lines` (everything published before it is at a lower index).
        Re-published every 0.2 s until seen: the first may go out before ctr subscribed."""
        token = f"esh-sentinel-{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout

        def seen() -> int | None:
            for i, line in enumerate(list(self.lines)):
                if token in line:
                    return i
            return None

        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"ctr events exited with {self.proc.returncode}")
            publish_sentinel(self.c, token)
            step = time.monotonic() + 0.2
            while time.monotonic() < step:
                index = seen()
                if index is not None:
                    return index
                time.sleep(0.005)
            if time.monotonic() > deadline:
                raise HarnessError(f"sentinel event not seen within {timeout}s")

    def payloads(self, topic: str, cid: str) -> list[str]:
        out = []
        for line in list(self.lines):
            ev = parse_event(line)
            if ev and ev[1] == topic and f'"container_id":"{cid}"' in ev[2].replace(" ", ""):
                out.append(ev[2].replace(" ", ""))
        return out

    def topics(self, cid: str) -> list[str]:
        """The topics of every event about container ``cid``, in order."""
        out = []
        for line in list(self.lines):
            ev = parse_event(line)
            if ev and f'"container_id":"{cid}"' in ev[2].replace(" ", ""):
                out.append(ev[1])
        return out

    def exit_status(self, cid: str, timeout: float = 15) -> int:
        found = wait_for(lambda: self.payloads("/tasks/exit", cid), timeout, what=f"exit {cid}")
        return status_of(found[-1])

    def close(self) -> None:
        self.proc.kill()


def status_of(payload: str) -> int:
    """The ``exit_status`` of an event's JSON payload (proto3 JSON omits a zero)."""
    payload = payload.replace(" ", "")
    if '"exit_status":' not in payload:
        return 0
    return int(payload.split('"exit_status":')[1].split(",")[0].split("}")[0])


def shim_command(c: Containerd, *args: str) -> subprocess.CompletedProcess[str]:
    """``containerd-shim-embed-v1 -address <c> <args>`` as an operator runs it (e.g. reload)."""
    env = {**os.environ, "EMBEDSHIM_ROOT": c.embedshim_root}
    return subprocess.run(
        [os.path.join(sys.prefix, "bin", SHIM), "-address", c.address, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
