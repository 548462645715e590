"""What one daemon holds, measured from outside: for leak checks (soak, concurrency).

A snapshot counts the daemon's descriptors, threads and memory, the entries of its pinned
BPF maps, the rows of its state store, zombies under the instance's processes, mounts under
the instance's temp dir and runc's containers.  Everything but memory must come back
exactly to where it started once the containers are gone.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass

from integration.embed import bpf_pin_root, daemon_paths
from integration.harness import Containerd, all_processes, mounts_under
from shim.exits.exittrack import ExitTracker
from shim.store.statestore import StateStore


@dataclass(frozen=True)
class Snapshot:
    daemon_pid: int
    fds: int
    threads: int
    rss_kb: int
    bpf_tracked: int
    bpf_exits: int
    store_rows: int
    zombies: int
    mounts: int
    runc_containers: int
    exec_dirs: int

    def exact(self) -> dict[str, int]:
        """Everything that must return to its starting value (all but memory)."""
        d = asdict(self)
        del d["rss_kb"]
        return d

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def daemon_pid(c: Containerd) -> int:
    with open(daemon_paths(c).pidfile) as f:
        return int(f.read())


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _runc_containers(c: Containerd) -> int:
    root = daemon_paths(c).runc_root
    total = 0
    for ns in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        out = subprocess.run(
            ["runc", "--root", os.path.join(root, ns), "list", "-q"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        total += len(out.split())
    return total


def snapshot(c: Containerd) -> Snapshot:
    pid = daemon_pid(c)
    tracker = ExitTracker.open_existing(bpf_pin_root(c))
    try:
        tracked = len(tracker.tracked()) if tracker else -1
        exits = len(list(tracker.exits())) if tracker else -1
    finally:
        if tracker is not None:
            tracker.close()
    store = StateStore(daemon_paths(c).store)
    try:
        rows = store.count()
    finally:
        store.close()
    ours = {pid, c.pid}
    zombies = sum(1 for p in all_processes() if p.zombie and p.ppid in ours)
    exec_root = os.path.join(daemon_paths(c).dir, "exec")
    exec_dirs = sum(len(files) + len(dirs) for _, dirs, files in os.walk(exec_root))
    return Snapshot(
        daemon_pid=pid,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        rss_kb=_status(pid, "VmRSS"),
        bpf_tracked=tracked,
        bpf_exits=exits,
        store_rows=rows,
        zombies=zombies,
        mounts=len(mounts_under(c.tmp)),
        runc_containers=_runc_containers(c),
        exec_dirs=exec_dirs,
    )
