"""Helpers for tests of our runtime: find its daemon, talk to it directly, start it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from integration.harness import Containerd, ProcInfo, parse_event, processes_matching, wait_for
from shim.paths import DaemonPaths
from shim.ttrpc import Client

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
    BPF pins in a bpffs dir of its own (removed by remove_bpf_pins).

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
            remove_bpf_pins(c)


def bundle_dir(c: Containerd, namespace: str, id: str) -> str:
    """Where containerd would put the bundle of (namespace, id): the only place the daemon
    accepts one from."""
    return os.path.join(c.state, "io.containerd.runtime.v2.task", namespace, id)


def daemon_paths(c: Containerd) -> DaemonPaths:
    return DaemonPaths.for_containerd(c.address, root=c.embedshim_root)


def bpf_pin_root(c: Containerd) -> str:
    key = os.path.basename(daemon_paths(c).dir)
    return os.path.join(BPF_TEST_ROOT, key)


def remove_bpf_pins(c: Containerd) -> None:
    """Unpin this instance's BPF program and maps (it detaches once nobody holds them)."""
    from shim.exittrack import ExitTracker

    ExitTracker.uninstall(bpf_pin_root(c))
    try:
        os.rmdir(BPF_TEST_ROOT)
    except OSError:
        pass


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


class Events:
    """A `ctr events` subscriber collecting lines in the background."""

    def __init__(self, c: Containerd) -> None:
        self.proc = c.ctr_async("events")
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            self.lines.append(line)

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
        payload = found[-1]
        if '"exit_status":' not in payload:
            return 0  # proto3 JSON omits zero
        return int(payload.split('"exit_status":')[1].split(",")[0].split("}")[0])

    def close(self) -> None:
        self.proc.kill()


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
