"""Pods without pause containers (``sandboxer = "shim"``, containerd 2.x): the sandbox our
daemon holds keeps every guarantee a task has.  A daemon crash, a reload and a containerd
restart leave the pod READY with the same holder and its containers running; the holder's
exit (even killed from outside) makes the pod NOTREADY, as a dead pause container does; and
removing the pod leaves no holder, cgroup, file or mount behind."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import threading

import grpc
import pytest

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import SHIM_SANDBOXER, CriNode, Pod, poll, rpc_code
from integration.embed import crash_daemon, daemon_paths, daemons, keeper_of
from integration.harness import _proc_info, wait_for
from shim.api import sandbox_pb2
from shim.pods.sandbox import HOLDER, cgroup_dirs
from shim.pods.sandboxservice import SANDBOX_SERVICE
from shim.tasks.service import NAMESPACE_KEY
from shim.ttrpc.blocking import BlockingClient
from shim.util import packaged


def _holder(node: CriNode, pod_id: str) -> int:
    r = node.runtime.PodSandboxStatus(
        cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
    )
    return int(json.loads(r.info["info"])["pid"])


def _state(node: CriNode, pod_id: str) -> int | None:
    """The pod's state; None while CRI is still starting (UNAVAILABLE).

    Anything else fails, on purpose: containerd never reconnects to a shim, so a
    "ttrpc: closed" means containerd's connection to the daemon closed and containerd has
    written the sandbox's shim off (its dead-shim path), which a daemon crash or restart
    must never cause (the keeper holds the connection).  What the daemon and containerd
    logged comes with the failure."""
    try:
        r = node.runtime.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    except grpc.RpcError as exc:
        if rpc_code(exc) == grpc.StatusCode.UNAVAILABLE:
            return None
        raise AssertionError(f"PodSandboxStatus: {exc}\n{_logs(node)}") from None
    return int(r.status.state)


def _logs(node: CriNode) -> str:
    """The daemon's log, and what containerd logged about its shim connections and errors,
    for a failure message."""

    def lines(path: str) -> list[str]:
        try:
            with open(path, errors="replace") as f:
                return f.read().splitlines()
        except OSError as exc:
            return [str(exc)]

    daemon = lines(daemon_paths(node.ctrd).log)[-30:]
    about = ("to shim", "shim disconnected", "=error", "=warn")
    ctrd = [line for line in lines(node.ctrd.log_path) if any(a in line for a in about)]
    return "\n".join(["--- daemon log ---", *daemon, "--- containerd log ---", *ctrd[-20:]])


def _alive(pid: int) -> bool:
    info = _proc_info(pid)
    return info is not None and not info.zombie


@pytest.mark.parametrize("cri_node", ["2.2.7"], indirect=True)
def test_sandbox_survives_crash_reload_and_containerd_restart(cri_node: CriNode) -> None:
    node = cri_node
    try:
        pod = node.run_pod(SHIM_SANDBOXER)
        holder = _holder(node, pod.id)
        info = node.sandbox_info(pod)
        cgroups, netns = info["cgroups"], info["netns"]
        assert cgroups and all(os.path.isdir(d) for d in cgroups)
        long = node.run_container(pod, ["sleep", "100000"], name="long")
        short = node.run_container(pod, ["sh", "-c", "sleep 2; exit 3"], name="short")

        # a daemon crash: the keeper restarts it, nothing changes for CRI
        pids = {p.pid for p in daemons(node.ctrd)}
        (daemon,) = daemons(node.ctrd)
        crash_daemon(daemon)
        wait_for(lambda: {p.pid for p in daemons(node.ctrd)} - pids, what="a new daemon")
        assert node.exec_sync(long, ["true"]).exit_code == 0
        st = node.wait_exited(short)
        assert st.exit_code == 3, st
        assert node.pod_status(pod).state == cri.SANDBOX_READY
        assert _holder(node, pod.id) == holder and _alive(holder)

        # a reload (SIGHUP: the daemon re-executes itself)
        log_path = daemon_paths(node.ctrd).log
        reloads = open(log_path).read().count("daemon reloaded")
        (daemon,) = daemons(node.ctrd)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_for(lambda: open(log_path).read().count("daemon reloaded") > reloads, what="reload")
        assert node.pod_status(pod).state == cri.SANDBOX_READY
        assert node.exec_sync(long, ["true"]).exit_code == 0

        # containerd restarts: it finds the sandbox again through our daemon
        node.ctrd.restart()
        poll(lambda: _state(node, pod.id) == cri.SANDBOX_READY, timeout=30, what="pod READY again")
        assert _holder(node, pod.id) == holder and _alive(holder)
        assert node.status(long).state == cri.CONTAINER_RUNNING
        assert node.exec_sync(long, ["true"]).exit_code == 0
        log = node.ctrd.log_tail(100000).splitlines()
        torn = [ln for ln in log if "shim disconnected" in ln and pod.id in ln]
        assert torn == [], torn

        # the holder killed from outside: WaitSandbox answers, CRI marks the pod NOTREADY
        os.kill(holder, signal.SIGKILL)
        poll(lambda: node.pod_status(pod).state == cri.SANDBOX_NOTREADY, what="pod NOTREADY")

        node.stop_pod(pod)
        node.remove_pod(pod)
        assert not _alive(holder)
        assert not any(os.path.exists(d) for d in cgroups), cgroups
        assert not netns or not os.path.exists(netns)
        sandboxes = os.path.join(node.ctrd.root, "io.containerd.grpc.v1.cri", "sandboxes")
        assert pod.id not in (os.listdir(sandboxes) if os.path.isdir(sandboxes) else [])
        with open("/proc/self/mountinfo") as f:
            assert pod.id not in f.read()
    finally:
        node.remove_all_pods()


@pytest.mark.parametrize("cri_node", ["2.2.7"], indirect=True)
def test_holder_exit_while_no_daemon_runs_is_reported(cri_node: CriNode) -> None:
    """The holder dies while the daemon is down (its keeper stopped, so nothing restarts it
    yet): the pinned BPF map kept the status, and the next daemon answers WaitSandbox with
    it (137: SIGKILL); CRI marks the pod NOTREADY."""
    node = cri_node
    try:
        pod = node.run_pod(SHIM_SANDBOXER)
        holder = _holder(node, pod.id)
        (daemon,) = daemons(node.ctrd)
        keeper = keeper_of(daemon)
        os.kill(keeper, signal.SIGSTOP)
        try:
            crash_daemon(daemon)
            wait_for(lambda: not _alive(daemon.pid), what="daemon dead")
            os.kill(holder, signal.SIGKILL)
            wait_for(lambda: not _alive(holder), what="holder dead")
        finally:
            os.kill(keeper, signal.SIGCONT)
        with BlockingClient("unix://" + daemon_paths(node.ctrd).socket) as client:
            out = client.call(
                SANDBOX_SERVICE,
                "WaitSandbox",
                sandbox_pb2.WaitSandboxRequest(sandbox_id=pod.id).SerializeToString(),
                metadata={NAMESPACE_KEY: "k8s.io"},
                timeout=30,
            )
        assert sandbox_pb2.WaitSandboxResponse.FromString(out).exit_status == 137
        poll(lambda: _state(node, pod.id) == cri.SANDBOX_NOTREADY, what="pod NOTREADY")
        node.stop_pod(pod)
        node.remove_pod(pod)
    finally:
        node.remove_all_pods()


def _holders_in(parent: str) -> list[int]:
    """The holder processes in the pod's leaf cgroups under ``parent`` (any hierarchy)."""
    pids: set[int] = set()
    for procs in glob.glob(f"/sys/fs/cgroup/*{parent}/*/cgroup.procs"):
        with open(procs) as f:
            pids.update(int(x) for x in f.read().split())
    out = []
    for pid in sorted(pids):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe) == HOLDER:
            out.append(pid)
    return out


def _announced(pid: int) -> bool:
    """The holder is set up and waiting (it puts /dev/null on stdout after that)."""
    try:
        return os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    except OSError:
        return False


def _freeze(path: str, state: str) -> None:
    with open(os.path.join(path, "freezer.state"), "w") as f:
        f.write(state)


@pytest.mark.parametrize("cri_node", ["2.2.7"], indirect=True)
@pytest.mark.parametrize("shared_pid", [False, True], ids=["own-pid", "shared-pid"])
def test_daemon_crash_during_start_sandbox_leaves_one_holder(
    cri_node: CriNode, shared_pid: bool
) -> None:
    """The daemon dies (kill -9) after its holder is set up and before its pid is stored:
    the replayed StartSandbox must not leave that holder beside its own.  The window is
    held open from outside: the pod's freezer cgroup parent is frozen, so the holder stops
    as it joins; then either the daemon is killed while it is stopped there (a -pid holder's
    parent then dies of SIGPIPE on announcing, its PID namespace's init lives on), or the
    daemon is stopped, the holder thawed to announce into its pipe, and the daemon killed."""
    node = cri_node
    parent = f"/{node.ctrd.cgroup_parent}/podcrash-{int(shared_pid)}"  # one per case
    freezer = f"/sys/fs/cgroup/freezer{parent}"
    if not os.path.isdir("/sys/fs/cgroup/freezer"):
        pytest.fail("missing prerequisite: a cgroup v1 freezer hierarchy")
    os.makedirs(freezer, exist_ok=True)
    _freeze(freezer, "FROZEN")
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["pod"] = node.run_pod(
                SHIM_SANDBOXER, cgroup_parent=parent, shared_pid=shared_pid
            )
        except Exception as exc:
            result["error"] = exc

    runner = threading.Thread(target=run)
    keeper = 0
    try:
        runner.start()
        (first,) = wait_for(lambda: _holders_in(parent), what="the holder in the pod's cgroup")
        (daemon,) = daemons(node.ctrd)
        keeper = keeper_of(daemon)
        os.kill(keeper, signal.SIGSTOP)  # no new daemon until the orphan is what it will be
        if shared_pid:
            crash_daemon(daemon)
            wait_for(lambda: not _alive(daemon.pid), what="daemon dead")
            _freeze(freezer, "THAWED")
            wait_for(lambda: not _alive(first), what="the holder's parent dead (SIGPIPE)")
            (orphan,) = wait_for(lambda: _holders_in(parent), what="its init")
        else:
            os.kill(daemon.pid, signal.SIGSTOP)
            _freeze(freezer, "THAWED")
            wait_for(lambda: _announced(first), what="the holder announced")
            crash_daemon(daemon)
            wait_for(lambda: not _alive(daemon.pid), what="daemon dead")
            orphan = first
        assert _announced(orphan) and _alive(orphan)
        os.kill(keeper, signal.SIGCONT)
        keeper = 0
        runner.join(60)
        assert not runner.is_alive() and "error" not in result, result
        pod = result["pod"]
        assert isinstance(pod, Pod)
        assert node.pod_status(pod).state == cri.SANDBOX_READY
        holder = _holder(node, pod.id)
        assert _holders_in(parent) == [holder], (_holders_in(parent), holder)
        assert not _alive(orphan) and not _alive(first)
        cid = node.run_container(pod, ["sleep", "100000"], name="c")
        assert node.exec_sync(cid, ["true"]).exit_code == 0
        # the pod's containers get cgroups of their own beside the holder's leaf: only a
        # holder is ever in that leaf (what the replayed start relies on)
        spec = node.container_info(cid)["runtimeSpec"]
        assert spec["linux"]["cgroupsPath"] == f"{parent}/{cid}", spec["linux"]
        assert _holders_in(parent) == [holder]
        cgroups = node.sandbox_info(pod)["cgroups"]
        assert all(d.endswith(f"{parent}/{pod.id}") for d in cgroups), cgroups

        node.stop_pod(pod)
        node.remove_pod(pod)
        assert not _alive(holder) and _holders_in(parent) == []
        assert not any(os.path.exists(d) for d in cgroups), cgroups
        with open("/proc/self/mountinfo") as f:
            assert pod.id not in f.read()
    finally:
        if keeper:
            os.kill(keeper, signal.SIGCONT)
        _freeze(freezer, "THAWED")
        runner.join(60)
        node.remove_all_pods()


def _call(node: CriNode, method: str, msg: object) -> bytes:
    with BlockingClient("unix://" + daemon_paths(node.ctrd).socket) as client:
        return client.call(
            SANDBOX_SERVICE,
            method,
            msg.SerializeToString(),  # type: ignore[attr-defined]
            metadata={NAMESPACE_KEY: "k8s.io"},
            timeout=30,
        )


def _stale_holder(dirs: list[str]) -> subprocess.Popen[bytes]:
    """A holder in the pod's leaves of the pids and freezer hierarchies, as a dead daemon's
    start leaves it (announced, waiting), not known to the daemon."""
    holder = packaged.holder()
    assert holder is not None
    leaves = [d for d in dirs if d.split("/")[4] in ("pids", "freezer")]
    assert len(leaves) == 2, dirs
    for d in leaves:
        os.makedirs(d, exist_ok=True)
    p = subprocess.Popen(
        [holder, *[a for d in leaves for a in ("-cgroup", d)]], stdout=subprocess.PIPE
    )
    assert p.stdout is not None and int(p.stdout.read()) == p.pid
    return p


@pytest.mark.parametrize("cri_node", ["2.2.7"], indirect=True)
def test_start_and_shutdown_remove_a_holder_left_in_the_pods_cgroups(cri_node: CriNode) -> None:
    """What the daemon finds of a start that never stored its pid: StartSandbox kills that
    holder before it spawns its own; ShutdownSandbox of a sandbox never started kills it and
    removes the pod's leaves (as CRI does when a RunPodSandbox fails)."""
    node = cri_node
    keep = node.run_pod(SHIM_SANDBOXER)  # the daemon stays up while it has a pod
    parent = f"/{node.ctrd.cgroup_parent}/podstale"
    config = sandbox_pb2.PodConfig(
        hostname="stale", linux=sandbox_pb2.PodLinux(cgroup_parent=parent)
    )
    stale: list[subprocess.Popen[bytes]] = []
    try:
        for id in ("stale-start", "stale-shutdown"):
            req = sandbox_pb2.CreateSandboxRequest(sandbox_id=id, bundle_path=node.ctrd.tmp)
            req.options.type_url = "type.googleapis.com/runtime.v1.PodSandboxConfig"
            req.options.value = config.SerializeToString()
            _call(node, "CreateSandbox", req)
        dirs = cgroup_dirs(parent, "stale-start")
        stale.append(_stale_holder(dirs))
        out = _call(node, "StartSandbox", sandbox_pb2.StartSandboxRequest(sandbox_id="stale-start"))
        pid = sandbox_pb2.StartSandboxResponse.FromString(out).pid
        assert stale[0].wait(timeout=5) == -signal.SIGKILL
        assert _holders_in(parent) == [pid] and _alive(pid)

        dirs2 = cgroup_dirs(parent, "stale-shutdown")
        stale.append(_stale_holder(dirs2))
        _call(
            node, "ShutdownSandbox", sandbox_pb2.ShutdownSandboxRequest(sandbox_id="stale-shutdown")
        )
        assert stale[1].wait(timeout=5) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in dirs2), dirs2

        _call(node, "ShutdownSandbox", sandbox_pb2.ShutdownSandboxRequest(sandbox_id="stale-start"))
        assert not _alive(pid) and _holders_in(parent) == []
        assert not any(os.path.exists(d) for d in dirs), dirs
    finally:
        for p in stale:
            p.kill()
            p.wait()
        node.stop_pod(keep)
        node.remove_pod(keep)
