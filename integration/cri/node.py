"""A Kubernetes node in miniature: containerd with its CRI plugin, CNI, images, a CRI client.

containerd runs in a network namespace of its own (a bind-mounted file in its temp dir), so
the CNI bridge, the pods' veths and the streaming server never touch the host's network; the
pod sandboxes get network namespaces of their own under containerd's state dir.  Nothing can
be pulled here, so the busybox and pause images are built from busybox-static and imported
with ``ctr -n k8s.io images import``.  The two runtime handlers the suite compares are
``embed`` (our io.containerd.embed.v1) and ``runc`` (io.containerd.runc.v2); on containerd 2.x
also ``embed-shim``, ours with ``sandboxer = "shim"`` (our holder instead of a pause container).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import grpc

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.api import cri_api_pb2_grpc as cri_grpc
from integration.cri.wsstream import ChannelSession
from integration.embed import embedshim_env, remove_host_leftovers
from integration.harness import (
    Containerd,
    HarnessError,
    import_busybox_image,
    persistent_netns,
    wait_for,
)

K8S_NAMESPACE = "k8s.io"
BUSYBOX_IMAGE = "docker.io/library/esh-busybox:cri"
PAUSE_IMAGE = "registry.k8s.io/esh-pause:cri"
#: busybox ``sleep`` as pid 1 ignores SIGTERM (no handler, and pid 1 gets no default
#: action), so the pause entrypoint traps TERM/INT and exits, as the real pause does.
PAUSE_ENTRYPOINT = ("/bin/sh", "-c", 'trap "exit 0" TERM INT; while :; do sleep 1000 & wait; done')
#: runtime handler name -> containerd runtime type (the RuntimeClass ``handler`` names these)
HANDLERS = {"embed": "io.containerd.embed.v1", "runc": "io.containerd.runc.v2"}
#: ours again with the Sandbox API (``sandboxer = "shim"``, no pause container): 2.x only
SHIM_SANDBOXER = "embed-shim"
#: every handler's runtime type, that one included
RUNTIME_TYPES = {**HANDLERS, SHIM_SANDBOXER: HANDLERS["embed"]}


def handlers_of(version: str) -> list[str]:
    """The handlers a node of this containerd version runs the suite for."""
    return list(HANDLERS) if version.startswith("1.") else [*HANDLERS, SHIM_SANDBOXER]


def is_ours(handler: str) -> bool:
    """Served by our daemon (with pause containers or with the Sandbox API)."""
    return RUNTIME_TYPES[handler] == HANDLERS["embed"]


#: CNI's result cache (libcni's default), outside any temp dir; dropped if this run made it.
CNI_CACHE_DIRS = ("/var/lib/cni/results", "/var/lib/cni")


def cni_cache_dirs() -> set[str]:
    """The CNI cache directories there are now: :func:`drop_cni_cache` leaves them alone."""
    return {d for d in CNI_CACHE_DIRS if os.path.isdir(d)}


def drop_cni_cache(preexisting: set[str]) -> None:
    """Remove the (empty) CNI cache directories that were not in ``preexisting``."""
    for d in CNI_CACHE_DIRS:
        if d not in preexisting:
            with contextlib.suppress(OSError):
                os.rmdir(d)


BRIDGE = "esh-cni0"
POD_SUBNET = "10.250.0.0/24"
_CLONE_NEWNET = 0x40000000


def cni_conflist(data_dir: str) -> dict[str, Any]:
    """A bridge network with host-local IPAM (leases kept in ``data_dir``); no masquerade,
    so no iptables rule is written even in containerd's private netns."""
    return {
        "cniVersion": "0.4.0",
        "name": "esh-cri",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data_dir,
                },
            }
        ],
    }


@dataclass
class Pod:
    id: str
    config: cri.PodSandboxConfig
    handler: str
    containers: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> str:
        return self.config.log_directory


class CriNode:
    """containerd + CRI + CNI in a private netns, with a gRPC CRI client."""

    def __init__(
        self,
        busybox_rootfs: str,
        log_level: str = "info",
        *,
        env: dict[str, str] | None = None,
        extra_config: str = "",
        edit_config: Callable[[str], None] | None = None,
    ) -> None:
        """``env``: containerd's (embedshim_env() by default; containerd_version_env() for
        another containerd); ``extra_config``: TOML added to its config (more handlers);
        ``edit_config``: called with the config file's path before containerd starts."""
        self.ctrd = Containerd(
            cri=True,
            log_level=log_level,
            start=False,
            extra_env=env if env is not None else embedshim_env(),
            extra_config=extra_config,
            edit_config=edit_config,
            sandbox_image=PAUSE_IMAGE,
            watch_paths=[busybox_rootfs],
        )
        self.channel: grpc.Channel | None = None
        try:
            self.ctrd.netns = persistent_netns(os.path.join(self.ctrd.tmp, "netns"))
            os.makedirs(self.ctrd.cni_conf_dir, exist_ok=True)
            with open(os.path.join(self.ctrd.cni_conf_dir, "10-esh.conflist"), "w") as f:
                json.dump(cni_conflist(os.path.join(self.ctrd.tmp, "cni", "ipam")), f)
            self.ctrd.start()
            for ref, entrypoint, cmd in (
                (BUSYBOX_IMAGE, (), ("sh",)),
                (PAUSE_IMAGE, PAUSE_ENTRYPOINT, ()),
            ):
                import_busybox_image(
                    self.ctrd,
                    ref,
                    busybox_rootfs,
                    namespace=K8S_NAMESPACE,
                    entrypoint=entrypoint,
                    cmd=cmd,
                )
            self.channel = grpc.insecure_channel(f"unix://{self.ctrd.address}")
            self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
            self.images = cri_grpc.ImageServiceStub(self.channel)
            wait_for(self._network_ready, timeout=20, what="CRI NetworkReady")
        except BaseException:
            self.close()
            raise
        self.logs = os.path.join(self.ctrd.tmp, "pods")
        self._seq = 0

    # -- lifecycle --------------------------------------------------------------------

    def _network_ready(self) -> bool:
        conds = self.runtime.Status(cri.StatusRequest()).status.conditions
        return all(c.status for c in conds if c.type in ("RuntimeReady", "NetworkReady"))

    def close(self) -> None:
        """Remove every pod through CRI, then everything containerd made (harness cleanup)."""
        try:
            if self.channel is not None:
                with contextlib.suppress(grpc.RpcError):
                    self.remove_all_pods()
                self.channel.close()
                self.channel = None
        finally:
            try:
                self.ctrd.cleanup()
            finally:
                remove_host_leftovers(self.ctrd)

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every pod sandbox (and so its containers); their ids."""
        ids = [p.id for p in self.runtime.ListPodSandbox(cri.ListPodSandboxRequest()).items]
        for pid in ids:
            self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pid))
            self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pid))
        return ids

    # -- pods and containers ----------------------------------------------------------

    def _name(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-{self._seq}"

    def pod_config(
        self,
        name: str,
        host_network: bool = False,
        cgroup_parent: str | None = None,
        *,
        shared_pid: bool = False,
        sysctls: dict[str, str] | None = None,
    ) -> cri.PodSandboxConfig:
        """``cgroup_parent``: the kubelet's (``{uid}`` is the pod's uid); by default a cgroupfs
        path under the instance's cgroup parent."""
        uid = uuid.uuid4().hex
        if cgroup_parent is None:
            cgroup_parent = f"/{self.ctrd.cgroup_parent}/pod{{uid}}"
        log_dir = os.path.join(self.logs, f"default_{name}_{uid}")
        ns = cri.NamespaceOption(
            network=cri.NODE if host_network else cri.POD,
            pid=cri.POD if shared_pid else cri.CONTAINER,
            ipc=cri.POD,
        )
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default"),
            hostname="" if host_network else name,
            log_directory=log_dir,
            labels={"esh-test": "1"},
            annotations={"esh/annotation": name},
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent.replace("{uid}", uid),
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=ns),
                sysctls=sysctls or {},
            ),
        )

    def run_pod(
        self,
        handler: str,
        name: str = "",
        host_network: bool = False,
        cgroup_parent: str | None = None,
        **kw: Any,
    ) -> Pod:
        """``kw``: pod_config's (shared_pid, sysctls)."""
        config = self.pod_config(name or self._name("pod"), host_network, cgroup_parent, **kw)
        os.makedirs(config.log_directory, exist_ok=True)
        r = self.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler=handler)
        )
        return Pod(r.pod_sandbox_id, config, handler)

    def pod_status(self, pod: Pod) -> cri.PodSandboxStatus:
        return self.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id)
        ).status

    def sandbox_info(self, pod: Pod) -> dict[str, Any]:
        """CRI's verbose sandbox info (pid, runtimeType, ...), as the kubelet's debug view."""
        r = self.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id, verbose=True)
        )
        return dict(json.loads(r.info["info"]))

    def stop_pod(self, pod: Pod) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod.id))

    def remove_pod(self, pod: Pod) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod.id))

    def create_container(
        self,
        pod: Pod,
        command: Sequence[str],
        name: str = "",
        attempt: int = 0,
        *,
        tty: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
        memory_limit: int = 0,
        log_path: str | None = None,
        mounts: Sequence[cri.Mount] = (),
    ) -> str:
        name = name or self._name("c")
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt),
            image=cri.ImageSpec(image=BUSYBOX_IMAGE),
            command=list(command),
            log_path=log_path if log_path is not None else f"{name}/{attempt}.log",
            labels={"esh-container": name},
            annotations={"esh/container": name},
            tty=tty,
            stdin=stdin,
            stdin_once=stdin_once,
            mounts=list(mounts),
            linux=cri.LinuxContainerConfig(
                resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
                security_context=cri.LinuxContainerSecurityContext(
                    namespace_options=pod.config.linux.security_context.namespace_options
                ),
            ),
        )
        cid = self.runtime.CreateContainer(
            cri.CreateContainerRequest(
                pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config
            )
        ).container_id
        pod.containers.append(cid)
        return cid

    def start(self, cid: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=cid))

    def run_container(self, pod: Pod, command: Sequence[str], name: str = "", **kw: Any) -> str:
        cid = self.create_container(pod, command, name, **kw)
        self.start(cid)
        return cid

    def status(self, cid: str) -> cri.ContainerStatus:
        return self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid)).status

    def container_info(self, cid: str) -> dict[str, Any]:
        r = self.runtime.ContainerStatus(cri.ContainerStatusRequest(container_id=cid, verbose=True))
        return dict(json.loads(r.info["info"]))

    def wait_exited(self, cid: str, timeout: float = 30) -> cri.ContainerStatus:
        def exited() -> cri.ContainerStatus | None:
            st = self.status(cid)
            return st if st.state == cri.CONTAINER_EXITED else None

        return wait_for(exited, timeout=timeout, interval=0.05, what=f"{cid[:12]} EXITED")

    def stop(self, cid: str, timeout: int = 0) -> None:
        self.runtime.StopContainer(cri.StopContainerRequest(container_id=cid, timeout=timeout))

    def remove(self, cid: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=cid))

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout: int = 0) -> cri.ExecSyncResponse:
        return self.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout),
            timeout=timeout + 30,
        )

    def containers(self, pod: Pod | None = None) -> list[cri.Container]:
        flt = cri.ContainerFilter(pod_sandbox_id=pod.id if pod else "")
        return list(self.runtime.ListContainers(cri.ListContainersRequest(filter=flt)).containers)

    # -- the node's network namespace -------------------------------------------------

    def connect(self, host: str, port: int, timeout: float = 10) -> socket.socket:
        """A TCP connection made from inside containerd's network namespace (where the
        streaming server listens).  setns(CLONE_NEWNET) changes only the calling thread, and a
        socket keeps the namespace it was made in, so a short-lived thread makes it."""
        assert self.ctrd.netns is not None
        out: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(self.ctrd.netns or "", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                out.append(socket.create_connection((host, port), timeout=timeout))
            except BaseException as exc:  # handed to the caller
                out.append(exc)

        t = threading.Thread(target=make, daemon=True)
        t.start()
        t.join(timeout + 5)
        if not out:
            raise HarnessError(f"connect to {host}:{port} in the node netns timed out")
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def stream(self, url: str) -> ChannelSession:
        """Open the WebSocket session of an Exec/Attach URL."""
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        return ChannelSession(self.connect(parts.hostname, parts.port), url)

    def exec_stream(
        self, cid: str, cmd: Sequence[str], *, tty: bool = False, stdin: bool = False
    ) -> ChannelSession:
        url = self.runtime.Exec(
            cri.ExecRequest(
                container_id=cid, cmd=list(cmd), tty=tty, stdin=stdin, stdout=True, stderr=not tty
            )
        ).url
        return self.stream(url)

    def attach_stream(self, cid: str, *, tty: bool = False, stdin: bool = True) -> ChannelSession:
        url = self.runtime.Attach(
            cri.AttachRequest(container_id=cid, stdin=stdin, tty=tty, stdout=True, stderr=not tty)
        ).url
        return self.stream(url)

    def netns_inode(self) -> int:
        assert self.ctrd.netns is not None
        return os.stat(self.ctrd.netns).st_ino


def rpc_code(exc: BaseException) -> grpc.StatusCode | None:
    """The gRPC status code of a failed CRI call (None for anything else)."""
    code = exc.code() if isinstance(exc, grpc.RpcError) else None
    return code if isinstance(code, grpc.StatusCode) else None


def poll(cond: Callable[[], Any], timeout: float = 10, what: str = "") -> Any:
    """wait_for with a finer interval (CRI state changes are quick)."""
    return wait_for(cond, timeout=timeout, interval=0.02, what=what)


def now_ns() -> int:
    return time.time_ns()
