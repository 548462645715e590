"""The pod sandbox holder (holder/holder.c) and what the daemon makes of a pod's config
(shim.pods.sandbox, shim.pods.podfiles): the namespaces, hostname, sysctls, PID namespace init that
reaps, no privilege left, failures said on stdout-less exit; the holder's command line, the
pod's cgroups and files; the sandboxes' table."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.api import sandbox_pb2 as pb
from shim.pods import podfiles
from shim.pods.sandbox import (
    SandboxRecord,
    SandboxStore,
    cgroup_dirs,
    holder_argv,
    kill_stale_holders,
    pod_config,
)
from shim.ttrpc import TTRPCError
from shim.util import packaged

NODE, CONTAINER, POD = 2, 1, 0


@pytest.fixture(scope="module")
def holder() -> str:
    path = packaged.holder()
    if path is None:
        pytest.fail("embedshim-holder is not built: make -C holder")
    return path


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _status(pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(field + ":"))


@pytest.fixture
def run_holder(holder: str) -> Iterator[list[int]]:
    """Holders started by a test, killed and reaped after it (this process is no
    subreaper: a -pid init is reaped by whoever adopts it)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start(holder: str, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen([holder, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    out = p.stdout.read()  # to EOF: the holder lets go of the pipe once ready
    return p, int(out)


def test_holder_makes_the_pods_namespaces(holder: str, run_holder: list[int]) -> None:
    p, pid = _start(holder, "-ipc", "-uts", "pod-a", "-sysctl", "kernel.shm_rmid_forced=1")
    run_holder.append(pid)
    assert pid == p.pid
    me = os.getpid()
    assert _ns(pid, "ipc") != _ns(me, "ipc") and _ns(pid, "uts") != _ns(me, "uts")
    assert _ns(pid, "net") == _ns(me, "net") and _ns(pid, "pid") == _ns(me, "pid")
    host = subprocess.run(
        ["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True
    )
    assert host.stdout.strip() == "pod-a"
    shm = subprocess.run(
        ["nsenter", "-t", str(pid), "-i", "cat", "/proc/sys/kernel/shm_rmid_forced"],
        capture_output=True,
        text=True,
    )
    assert shm.stdout.strip() == "1"
    # nothing left to it but waiting: no capability, no way to get one back
    assert _status(pid, "CapEff") == _status(pid, "CapBnd") == "0000000000000000"
    assert _status(pid, "NoNewPrivs") == "1"
    os.kill(pid, signal.SIGTERM)
    assert p.wait(timeout=5) == 0  # SIGTERM: a clean exit


def test_holder_as_pid_namespace_init_reaps_orphans(holder: str, run_holder: list[int]) -> None:
    p, pid = _start(holder, "-ipc", "-uts", "", "-pid")
    run_holder.append(pid)
    assert p.wait(timeout=5) == 0  # the parent exits once its init is ready
    assert pid != p.pid
    assert _status(pid, "NSpid").split()[-1] == "1"
    assert _ns(pid, "uts") != _ns(os.getpid(), "uts")
    # an orphan in the namespace: its parent (nsenter's sh) exits at once
    subprocess.run(
        ["nsenter", "-t", str(pid), "-p", "-F", "sh", "-c", "sleep 0.1 & exit 0"], check=True
    )

    def zombies() -> list[str]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                if ppid == pid:
                    out.append(stat)
        return out

    deadline = time.monotonic() + 5
    while zombies() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zombies() == []


@pytest.fixture
def pod_cgroups() -> Iterator[list[str]]:
    """A pod's leaf in two real cgroup v1 hierarchies (pids, freezer), removed after."""
    name = f"embedshim-test-stale-{os.getpid()}"
    dirs = [f"/sys/fs/cgroup/{h}/{name}" for h in ("pids", "freezer")]
    if not all(os.path.isdir(os.path.dirname(d)) for d in dirs):
        pytest.fail("missing prerequisite: cgroup v1 pids and freezer hierarchies")
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    yield dirs
    _write(f"{dirs[1]}/freezer.state", "THAWED")
    for d in dirs:
        for pid in open(f"{d}/cgroup.procs").read().split():
            os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:
            try:
                os.rmdir(d)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_stale_holder_in_the_pods_cgroup_is_killed_and_waited_for(
    holder: str, run_holder: list[int], pod_cgroups: list[str]
) -> None:
    """What a replayed StartSandbox finds of the dead daemon's start: the holder (killed,
    gone when this returns); anything else in the cgroup is left alone."""
    other = subprocess.Popen(["sleep", "1000"])
    try:
        _write(f"{pod_cgroups[0]}/cgroup.procs", str(other.pid))
        p, pid = _start(holder, *[a for d in pod_cgroups for a in ("-cgroup", d)])
        run_holder.append(pid)
        assert asyncio.run(kill_stale_holders(pod_cgroups)) == [pid]
        assert p.poll() == -signal.SIGKILL  # exited already: only reaping was left
        assert other.poll() is None
        assert asyncio.run(kill_stale_holders(pod_cgroups)) == []
    finally:
        other.kill()
        other.wait()


def test_stale_holder_that_cannot_exit_fails_the_start(
    holder: str, run_holder: list[int], pod_cgroups: list[str]
) -> None:
    """A holder that does not exit (frozen: v1 holds even SIGKILL) is an error, not a
    second holder beside it; it exits once thawed."""
    p, pid = _start(holder, *[a for d in pod_cgroups for a in ("-cgroup", d)])
    run_holder.append(pid)
    _write(f"{pod_cgroups[1]}/freezer.state", "FROZEN")
    with pytest.raises(TTRPCError, match=f"{pid} of an earlier start"):
        asyncio.run(kill_stale_holders(pod_cgroups, timeout=0.5))
    assert p.poll() is None
    _write(f"{pod_cgroups[1]}/freezer.state", "THAWED")
    assert p.wait(timeout=5) == -signal.SIGKILL


def test_holder_says_why_it_failed(holder: str) -> None:
    p = subprocess.run(
        [holder, "-netns", "/nonexistent/netns"], capture_output=True, text=True, timeout=5
    )
    assert p.returncode == 1 and p.stdout == ""
    assert "open /nonexistent/netns" in p.stderr
    p = subprocess.run([holder, "-bogus"], capture_output=True, text=True, timeout=5)
    assert p.returncode == 2 and p.stdout == ""


def _config(**ns: int) -> pb.PodConfig:
    c = pb.PodConfig(hostname="web-0")
    c.linux.cgroup_parent = "/kubepods/podX"
    opts = c.linux.security_context.namespace_options
    opts.network, opts.pid, opts.ipc = ns.get("net", POD), ns.get("pid", CONTAINER), POD
    c.linux.sysctls["net.ipv4.ip_forward"] = "1"
    return c


def test_holder_argv_follows_the_pods_namespace_options() -> None:
    argv = holder_argv("/h", _config(), "/run/netns/x", ["/cg/a"])
    assert argv == [
        "/h", "-cgroup", "/cg/a", "-netns", "/run/netns/x", "-ipc", "-uts", "web-0",
        "-sysctl", "net.ipv4.ip_forward=1",
    ]  # fmt: skip
    # hostNetwork: the node's network and hostname; a shared PID namespace: -pid
    argv = holder_argv("/h", _config(net=NODE, pid=POD), "", [])
    assert argv == ["/h", "-ipc", "-sysctl", "net.ipv4.ip_forward=1", "-pid"]


def test_pod_config_is_read_from_cris_options() -> None:
    wire = _config().SerializeToString()
    assert pod_config("type.googleapis.com/runtime.v1.PodSandboxConfig", wire).hostname == "web-0"
    with pytest.raises(TTRPCError):
        pod_config("type.googleapis.com/containerd.runc.v1.Options", wire)


def test_cgroup_dirs_one_per_hierarchy(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "31 25 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    dirs = cgroup_dirs("/kubepods/podX", "sb1", str(mountinfo))
    assert dirs == [
        "/sys/fs/cgroup/memory/kubepods/podX/sb1",
        "/sys/fs/cgroup/unified/kubepods/podX/sb1",
    ]
    dirs = cgroup_dirs("kubepods-besteffort-podY.slice", "sb1", str(mountinfo))
    assert dirs[0] == (
        "/sys/fs/cgroup/memory/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-podY.slice/embedshim-sb1.scope"
    )
    assert cgroup_dirs("", "sb1", str(mountinfo)) == []
    with pytest.raises(TTRPCError):
        cgroup_dirs("/a/../../etc", "sb1", str(mountinfo))


def test_pod_files_as_cri_writes_them(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    work = root / "io.containerd.sandbox.controller.v1.shim" / "k8s.io" / "sb1"
    bundle = state / "io.containerd.sandbox.controller.v1.shim" / "k8s.io" / "sb1"
    work.mkdir(parents=True)
    bundle.mkdir(parents=True)
    (bundle / "work").symlink_to(work)
    assert podfiles.containerd_dirs(str(bundle)) == (str(root), str(state))
    config = _config()
    config.linux.security_context.namespace_options.ipc = NODE  # no /dev/shm to mount
    config.dns_config.servers.extend(["10.0.0.10", "10.0.0.11"])
    config.dns_config.searches.append("default.svc.cluster.local")
    config.dns_config.options.append("ndots:5")
    made = podfiles.make(str(bundle), "sb1", config)
    files = root / "io.containerd.grpc.v1.cri" / "sandboxes" / "sb1"
    assert (files / "hostname").read_text() == "web-0\n"
    assert (files / "hosts").read_text() == Path("/etc/hosts").read_text()
    assert (files / "resolv.conf").read_text() == (
        "search default.svc.cluster.local\nnameserver 10.0.0.10\nnameserver 10.0.0.11\n"
        "options ndots:5\n"
    )
    podfiles.remove(made)
    assert not files.exists()


def test_sandbox_store_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = SandboxStore(path)
    rec = SandboxRecord("k8s.io", "sb1", pid=42, cgroups=["/cg/a"], exit_status=None)
    store.put(rec)
    store.close()
    again = SandboxStore(path)
    assert again.all() == [rec]
    again.delete("k8s.io", "sb1")
    assert again.all() == []
    again.close()
