"""Exit statuses are never lost: the matrix, many at once, and with nobody watching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from integration.embed import RUNTIME, Events, bpf_pin_root, daemon_paths, daemons
from integration.harness import Containerd, task_list, wait_for
from integration.prereq import bpf_problem, missing
from shim.exittrack import ExitTracker
from shim.statestore import StateStore

HOST_PID_NS = ("--with-ns", f"pid:/proc/{os.getpid()}/ns/pid")


CASES = [
    ("exit0", ("sh", "-c", "exit 0"), (), None, 0),
    ("exit1", ("sh", "-c", "exit 1"), (), None, 1),
    ("exit42", ("sh", "-c", "exit 42"), (), None, 42),
    ("exit255", ("sh", "-c", "exit 255"), (), None, 255),
    ("true", ("true",), (), None, 0),
    ("slow", ("sh", "-c", "sleep 2; exit 5"), (), None, 5),
    ("sigkill", ("sleep", "1000"), (), "KILL", 137),
    # A pid-namespace init ignores SIGTERM, so this one shares the host's pid namespace.
    ("sigterm", ("sleep", "1000"), HOST_PID_NS, "TERM", 143),
]


@pytest.mark.parametrize(("cid", "cmd", "extra", "sig", "want"), CASES, ids=[c[0] for c in CASES])
def test_exit_status_matrix(
    containerd: Containerd,
    busybox: str,
    events: Events,
    cid: str,
    cmd: tuple[str, ...],
    extra: tuple[str, ...],
    sig: str | None,
    want: int,
) -> None:
    # Wait: `ctr run` (attached) returns what the Wait RPC answered.
    if sig is None:
        r = containerd.run(RUNTIME, busybox, cid + "w", *cmd, extra=extra, check=False)
        assert r.returncode == want, r.stderr
        assert events.exit_status(cid + "w") == want
    # ctr task ls / ctr task delete / the event, for a detached one.
    containerd.run(RUNTIME, busybox, cid, *cmd, detach=True, extra=extra)
    if sig is not None:
        containerd.ctr("task", "kill", "-s", sig, cid)
    wait_for(lambda: task_list(containerd)[cid][1] == "STOPPED", timeout=15, what="STOPPED")
    assert events.exit_status(cid) == want
    r = containerd.ctr("task", "delete", cid)
    if want:
        assert f"exit code {want}" in r.stderr, r.stderr
    else:
        assert "exit code" not in r.stderr, r.stderr
    containerd.ctr("container", "delete", cid)


def test_hundred_short_lived_containers_at_once(containerd: Containerd, busybox: str) -> None:
    codes = {f"s{i:03d}": (i * 7) % 256 for i in range(100)}

    def run(cid: str) -> int:
        r = containerd.run(
            RUNTIME,
            busybox,
            cid,
            "sh",
            "-c",
            f"exit {codes[cid]}",
            rm=True,
            check=False,
            timeout=180,
        )
        return r.returncode

    with ThreadPoolExecutor(max_workers=25) as pool:
        got = dict(zip(codes, pool.map(run, codes), strict=True))
    wrong = {cid: (got[cid], want) for cid, want in codes.items() if got[cid] != want}
    assert wrong == {}
    assert task_list(containerd) == {}


def _trace_id(c: Containerd, ns: str, cid: str) -> int:
    store = StateStore(daemon_paths(c).store)
    try:
        rec = store.get(ns, cid)
        assert rec is not None
        return rec.trace_id
    finally:
        store.close()


def test_exit_recorded_while_no_daemon_runs(containerd: Containerd, busybox: str) -> None:
    """containerd and the daemon both dead; the container exits; the pinned program still
    records its status, and `delete` reports it once containerd is back."""
    containerd.run(RUNTIME, busybox, "lone", "sh", "-c", "sleep 2; exit 42", detach=True)
    pid = task_list(containerd)["lone"][0]
    trace_id = _trace_id(containerd, "test", "lone")
    containerd.kill9()
    (daemon,) = daemons(containerd)
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not daemons(containerd), what="daemon gone")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid), timeout=10)
    tracker = ExitTracker.open_existing(bpf_pin_root(containerd))
    assert tracker is not None, "BPF program not pinned"
    try:
        record = wait_for(lambda: tracker.lookup_exit(trace_id), what="exit record")
        assert record.pid == pid and record.exit_status == 42
    finally:
        tracker.close()
    # containerd comes back, cannot reach the daemon, runs `delete`: it reads the map.
    containerd.restart()
    wait_for(lambda: "lone" not in task_list(containerd), timeout=20, what="task cleaned up")
    tracker = ExitTracker.open_existing(bpf_pin_root(containerd))
    assert tracker is not None
    try:
        assert tracker.lookup_exit(trace_id) is None  # consumed by `delete`
    finally:
        tracker.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_frozen_daemon_then_killed_reports_real_status(
    containerd: Containerd, busybox: str, events: Events
) -> None:
    """containerd issue 8381: the daemon is frozen, the container dies of SIGTERM, the
    daemon is killed. containerd publishes /tasks/exit from `delete`: 143, not 137."""
    containerd.run(RUNTIME, busybox, "frozen", "sleep", "1000", detach=True, extra=HOST_PID_NS)
    pid = task_list(containerd)["frozen"][0]
    (daemon,) = daemons(containerd)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: _zombie(pid), what="container init exited")
    finally:
        os.kill(daemon.pid, signal.SIGKILL)
    assert events.exit_status("frozen", timeout=20) == 143


def test_maps_empty_after_delete(containerd: Containerd, busybox: str) -> None:
    for i in range(5):
        containerd.run(RUNTIME, busybox, f"m{i}", "sh", "-c", f"exit {i}", rm=True, check=False)
    containerd.run(RUNTIME, busybox, "live", "sleep", "1000", detach=True)
    live_pid = task_list(containerd)["live"][0]
    tracker = ExitTracker.open_existing(bpf_pin_root(containerd))
    assert tracker is not None
    try:
        assert list(tracker.exits()) == []
        assert list(tracker.tracked()) == [live_pid]
        containerd.ctr("task", "kill", "-s", "KILL", "live")
        wait_for(lambda: task_list(containerd)["live"][1] == "STOPPED")
        containerd.ctr("task", "delete", "live")
        assert list(tracker.exits()) == [] and tracker.tracked() == {}
        stats = tracker.stats()
        assert stats["exits_full"] == 0 and stats["ring_drop"] == 0, stats  # the daemon drains
    finally:
        tracker.close()


@pytest.mark.parametrize(
    "env", [{"EMBEDSHIM_BPF": "off"}, {"EMBEDSHIM_BPF_ROOT": "{tmp}/not-bpffs"}]
)
def test_without_bpf_the_daemon_says_so_and_keeps_working(
    busybox: str, env: dict[str, str]
) -> None:
    from integration.embed import embedshim_env, remove_bpf_pins

    c = Containerd(extra_env={**embedshim_env(), **env}, watch_paths=[busybox])
    try:
        r = c.run(RUNTIME, busybox, "nobpf", "sh", "-c", "exit 9", rm=True, check=False)
        assert r.returncode == 9, r.stderr
        c.run(RUNTIME, busybox, "nobpf2", "sleep", "1000", detach=True)
        c.ctr("task", "kill", "-s", "KILL", "nobpf2")
        wait_for(lambda: task_list(c)["nobpf2"][1] == "STOPPED")
        assert "exit code 137" in c.ctr("task", "delete", "nobpf2").stderr
        with open(daemon_paths(c).log) as f:
            text = f.read()
        assert text.count("using pidfd and waitid only") == 1, text
        assert "BPF exit tracking on" not in text
    finally:
        try:
            c.cleanup()
        finally:
            remove_bpf_pins(c)


def test_check_reports_features_and_mode() -> None:
    """Where root, BTF and libbpf are (bpffs root mounts itself), `check` must promise BPF
    exit tracking: a broken object, loader or pin path shows up here, not as a quiet
    fallback to pidfds alone."""
    exe = os.path.join(sys.prefix, "bin", "containerd-shim-embed-v1")
    out = subprocess.run([exe, "check"], capture_output=True, text=True, check=True).stdout
    for name in ("pidfd", "BTF", "bpffs", "BPF exit tracking", "runc", "cgroups"):
        assert name in out
    problem = bpf_problem()
    if problem is not None:
        assert "mode: pidfd+waitid only" in out, out
        pytest.skip(missing(f"cannot demand mode bpf+pidfd: {problem}"))
    assert "\nmode: bpf+pidfd\n" in out, out
    (row,) = [ln for ln in out.splitlines() if ln.startswith("BPF exit tracking")]
    assert row.split()[3] == "yes", row
