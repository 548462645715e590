"""Pod sandboxes: RunPodSandbox / PodSandboxStatus / StopPodSandbox / RemovePodSandbox,
with the pod's own network (CNI bridge) and with the node's (hostNetwork)."""

from __future__ import annotations

import ipaddress
import os
import time

import grpc
import pytest

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import (
    POD_SUBNET,
    RUNTIME_TYPES,
    SHIM_SANDBOXER,
    CriNode,
    is_ours,
    poll,
    rpc_code,
)
from integration.embed import daemons
from integration.harness import _proc_info, processes_matching


def _alive(pid: int) -> bool:
    info = _proc_info(pid)
    return info is not None and not info.zombie


def serving_process(node: CriNode, handler: str) -> set[int]:
    """The pids that serve this node's tasks for ``handler``: our one daemon, or runc.v2's
    shims (Debian's in /usr/bin, or 2.2.7's own)."""
    if is_ours(handler):
        return {p.pid for p in daemons(node.ctrd)}
    return {
        p.pid
        for p in processes_matching(
            lambda p: (
                not p.zombie
                and os.path.basename((p.cmdline or [""])[0]) == "containerd-shim-runc-v2"
                and node.ctrd.address in p.cmdline
            )
        )
    }


# host_network: see conftest.runs (not with the Sandbox API on containerd 2.2.7)
def test_pod_sandbox_lifecycle(node: CriNode, handler: str, host_network: bool) -> None:
    t0 = time.time_ns()
    pod = node.run_pod(handler, host_network=host_network)
    t1 = time.time_ns()

    # PodSandboxStatus: what the kubelet reads back (state, ids, echoes, network)
    st = node.pod_status(pod)
    assert st.id == pod.id
    assert st.state == cri.SANDBOX_READY
    assert t0 <= st.created_at <= t1
    assert st.metadata == pod.config.metadata
    assert dict(st.labels) == dict(pod.config.labels)
    assert dict(st.annotations) == dict(pod.config.annotations)
    assert st.runtime_handler == handler
    ns = st.linux.namespaces.options
    assert ns.network == (cri.NODE if host_network else cri.POD)
    if host_network:
        assert st.network.ip == ""  # the kubelet uses the node's IP
    else:
        assert ipaddress.ip_address(st.network.ip) in ipaddress.ip_network(POD_SUBNET)
    listed = node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items
    assert [p.id for p in listed] == [pod.id]
    assert listed[0].runtime_handler == handler

    # the pause container (embed-shim: our holder) is a child of this handler's runtime
    info = node.sandbox_info(pod)
    assert info["runtimeType"] == RUNTIME_TYPES[handler]
    pause = _proc_info(int(info["pid"]))
    assert pause is not None and pause.ppid in serving_process(node, handler), pause
    netns = os.stat(f"/proc/{pause.pid}/ns/net").st_ino
    assert (netns == node.netns_inode()) == host_network

    # a container of the pod sees the pod's network: its IP, or the node's namespace
    cid = node.run_container(pod, ["sleep", "1000"])
    out = node.exec_sync(cid, ["sh", "-c", "readlink /proc/self/ns/net; ip -o -4 addr"])
    assert out.exit_code == 0, out.stderr
    assert out.stdout.decode().splitlines()[0] == f"net:[{netns}]"
    if not host_network:
        assert f"inet {st.network.ip}/" in out.stdout.decode()

    # StopPodSandbox: NOTREADY, the pause and the containers are gone; idempotent
    node.stop_pod(pod)
    assert node.pod_status(pod).state == cri.SANDBOX_NOTREADY
    assert node.status(cid).state == cri.CONTAINER_EXITED
    poll(lambda: not _alive(pause.pid), what="pause process gone")
    node.stop_pod(pod)
    if handler == SHIM_SANDBOXER:  # CRI shows what the sandbox controller reports
        cni_netns = info["netns"]
        assert bool(cni_netns) != host_network
    else:
        cni_netns = info["cniResult"]["Interfaces"]["eth0"]["Sandbox"] if not host_network else ""
    if cni_netns:
        assert not os.path.exists(cni_netns), "the pod netns outlived StopPodSandbox"

    # RemovePodSandbox: gone for good (NotFound), containers too; idempotent
    node.remove_pod(pod)
    with pytest.raises(grpc.RpcError) as exc:
        node.pod_status(pod)
    assert rpc_code(exc.value) == grpc.StatusCode.NOT_FOUND
    assert node.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items == []
    assert node.containers() == []
    node.remove_pod(pod)


def test_shared_pid_namespace_and_sysctls(node: CriNode, handler: str) -> None:
    """A pod with shareProcessNamespace: its containers see each other's processes, pid 1
    is the sandbox's process (pause, or our holder) and reaps the pod's orphans; the pod's
    sysctls (an IPC one and a network one) hold in its containers."""
    sysctls = {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_unprivileged_port_start": "81"}
    pod = node.run_pod(handler, shared_pid=True, sysctls=sysctls)
    sandbox_pid = int(node.sandbox_info(pod)["pid"])
    first = node.run_container(pod, ["sleep", "1001"])
    second = node.run_container(pod, ["sleep", "1002"])
    r = node.exec_sync(second, ["sh", "-c", "readlink /proc/1/ns/pid; ps -o pid,args"])
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"pid:[{os.stat(f'/proc/{sandbox_pid}/ns/pid').st_ino}]"
    assert any(ln.split()[0] == "1" for ln in lines[2:]), lines
    assert any("sleep 1001" in ln for ln in lines) and any("sleep 1002" in ln for ln in lines)
    # an orphan of the pod (its parent gone at once) is reaped by pid 1: no zombie stays
    assert node.exec_sync(first, ["sh", "-c", "(sleep 0.2 &); true"]).exit_code == 0

    def no_zombie() -> bool:
        out = node.exec_sync(first, ["sh", "-c", "cat /proc/[0-9]*/stat"]).stdout.decode()
        return not any(") Z " in ln for ln in out.splitlines())

    time.sleep(0.4)
    poll(no_zombie, timeout=5, what="orphan reaped by the pod's pid 1")
    for key, value in sysctls.items():
        path = "/proc/sys/" + key.replace(".", "/")
        assert node.exec_sync(second, ["cat", path]).stdout.decode().strip() == value
    node.stop_pod(pod)
    assert node.status(first).state == node.status(second).state == cri.CONTAINER_EXITED
    poll(lambda: not _alive(sandbox_pid), what="sandbox process gone")
    node.remove_pod(pod)
