"""Exit statuses are never lost: the matrix, many at once, and with nobody watching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from integration.embed import (
    RUNTIME,
    SHIM,
    Events,
    bpf_pin_root,
    daemon_paths,
    daemons,
    keeper_of,
    kill_daemon_for_good,
    status_of,
)
from integration.harness import Containerd, task_list, wait_for
from integration.prereq import bpf_problem, missing
from integration.tasks_grpc import tasks_client
from shim.api import shim_pb2
from shim.exits.exittrack import ExitTracker
from shim.store.statestore import StateStore

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


def _capture_deletes(c: Containerd, bundle: str) -> str:
    """Make containerd's next `delete` of the task in ``bundle`` go through a wrapper that
    runs ours and keeps a copy of what it wrote to containerd: the only way to see the
    status containerd got from a `delete` it ran while starting up (it neither logs nor
    publishes it).  containerd 1.6 runs the binary named in the bundle's
    ``shim-binary-path``; returns the directory the copies go to."""
    out_dir = os.path.join(c.tmp, "deletes")
    os.makedirs(out_dir)
    wrapper = os.path.join(c.tmp, "delete-capture")
    recorded = os.path.join(bundle, "shim-binary-path")
    with open(recorded) as f:
        real = f.read().strip()
    assert real.endswith(SHIM), real
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n"
            "for last; do :; done\n"
            f'[ "$last" = delete ] || exec {real} "$@"\n'
            f'echo "$@" > {out_dir}/$$.args\n'
            f'{real} "$@" > {out_dir}/$$.out\n'
            "rc=$?\n"
            f"cat {out_dir}/$$.out\n"
            "exit $rc\n"
        )
    os.chmod(wrapper, 0o755)
    with open(recorded, "w") as f:
        f.write(wrapper)
    return out_dir


def _captured_deletes(out_dir: str, cid: str) -> list[shim_pb2.DeleteResponse]:
    found = []
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".args"):
            continue
        with open(os.path.join(out_dir, name)) as f:
            args = f.read().split()
        if args[args.index("-id") + 1] == cid:
            with open(os.path.join(out_dir, name[: -len(".args")] + ".out"), "rb") as f:
                found.append(shim_pb2.DeleteResponse.FromString(f.read()))
    return found


@pytest.mark.parametrize("back", ["delete", "daemon"])
def test_exit_recorded_while_no_daemon_runs(
    containerd: Containerd, busybox: str, back: str
) -> None:
    """containerd and the daemon both dead; the container exits; the pinned program still
    records its status, and containerd gets the real code when it is back:

    * ``delete``: the keeper is killed too, so no daemon comes back.  containerd, starting,
      cannot reach one and runs `delete` for the task, which reads the code from the map.
      (containerd 1.6 publishes no event then, and forgets the task: what `delete` hands it
      is all.)
    * ``daemon``: the keeper, held stopped meanwhile, restarts the daemon, which restores
      the task: containerd reconnects, Wait and `ctr task delete` give the code,
      /tasks/delete carries it and /tasks/exit is forwarded once."""
    c = containerd
    ctl = os.path.join(c.tmp, "ctl")
    os.makedirs(ctl)
    c.run(RUNTIME, busybox, "lone", "sh", "-c",
          "while [ ! -e /ctl/go ]; do sleep 0.02; done; exit 42", detach=True,
          extra=("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw"))  # fmt: skip
    pid = task_list(c)["lone"][0]
    trace_id = _trace_id(c, "test", "lone")
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", "test", "lone")
    c.kill9()
    (daemon,) = daemons(c)
    keeper = keeper_of(daemon)
    if back == "delete":
        kill_daemon_for_good(c)
    else:
        os.kill(keeper, signal.SIGSTOP)
    try:
        if back == "daemon":
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda: not daemons(c), what="daemon gone")
        exit_after_ns = time.time_ns()
        open(os.path.join(ctl, "go"), "w").close()
        wait_for(lambda: not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid), timeout=10)
        exited_by_ns = time.time_ns()
        tracker = ExitTracker.open_existing(bpf_pin_root(c))
        assert tracker is not None, "BPF program not pinned"
        try:
            record = wait_for(lambda: tracker.lookup_exit(trace_id), what="exit record")
            assert record.pid == pid and record.exit_status == 42
        finally:
            tracker.close()
    finally:
        if back == "daemon":
            os.kill(keeper, signal.SIGCONT)
    if back == "delete":
        out_dir = _capture_deletes(c, bundle)
        c.start()
        wait_for(lambda: "lone" not in task_list(c), timeout=20, what="task cleaned up")
        (resp,) = _captured_deletes(out_dir, "lone")
        assert (resp.pid, resp.exit_status) == (pid, 42)
        # when it exited, not when `delete` ran
        assert exit_after_ns <= resp.exited_at.ToNanoseconds() <= exited_by_ns
    else:
        wait_for(lambda: daemons(c), what="the keeper restarting the daemon")
        c.log_level = "debug"  # its log names each event forwarded to it
        c.start()
        events = Events(c)
        try:
            assert task_list(c)["lone"] == (pid, "STOPPED")
            with tasks_client(c) as tasks:
                assert tasks.wait("lone") == 42
            r = c.ctr("task", "delete", "lone")
            assert "exit code 42" in r.stderr, r.stderr
            (deleted,) = wait_for(lambda: events.payloads("/tasks/delete", "lone"), what="delete")
            assert status_of(deleted) == 42 and f'"pid":{pid}' in deleted, deleted
        finally:
            events.close()
        assert _forwarded(c).count("/tasks/exit") == 1
    tracker = ExitTracker.open_existing(bpf_pin_root(c))
    assert tracker is not None
    try:
        assert tracker.lookup_exit(trace_id) is None  # consumed
    finally:
        tracker.close()


def _forwarded(c: Containerd) -> list[str]:
    """Topics of the events a debug-level containerd was forwarded, in order."""
    with open(c.log_path) as f:
        return [
            ln.split("topic=")[1].split()[0]
            for ln in f.read().splitlines()
            if 'msg="event forwarded"' in ln and "topic=" in ln
        ]


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
    from integration.embed import embedshim_env, remove_host_leftovers

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
            remove_host_leftovers(c)


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
