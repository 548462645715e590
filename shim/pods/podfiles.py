"""The files of a pod that CRI leaves to a sandbox controller other than its own.

With pause containers, CRI's podsandbox controller writes each pod's ``hostname``, ``hosts``
and ``resolv.conf`` under ``<containerd root>/io.containerd.grpc.v1.cri/sandboxes/<id>`` and
mounts a tmpfs for the pod's ``/dev/shm`` at ``<containerd state>/io.containerd.grpc.v1.cri/
sandboxes/<id>/shm``; CreateContainer then bind-mounts whichever of them exists into every
container of the pod.  With ``sandboxer = "shim"`` nobody makes them unless the shim does
(containerd's internal/cri/server/container_create.go: "could be delegated to remote sandbox
controller"), so the Sandbox service makes the same files, and removes them with the pod.
"""

from __future__ import annotations

import os
import socket

from shim.api import sandbox_pb2
from shim.oci import mount
from shim.util.fsutil import is_mountpoint

CRI_DIR = "io.containerd.grpc.v1.cri"
#: CRI's size of a pod's /dev/shm (defaultShmSize)
SHM_SIZE = 64 << 20
NODE = 2  # runtime.v1.NamespaceMode NODE


def containerd_dirs(bundle: str) -> tuple[str, str] | None:
    """containerd's (root, state) from a sandbox bundle ``<state>/<plugin>/<ns>/<id>``, whose
    ``work`` link points at ``<root>/<plugin>/<ns>/<id>``; None if it is not one."""
    try:
        work = os.readlink(os.path.join(bundle, "work"))
    except OSError:
        return None
    root = os.path.dirname(os.path.dirname(os.path.dirname(work)))
    state = os.path.dirname(os.path.dirname(os.path.dirname(bundle)))
    if not os.path.isabs(root) or not os.path.isabs(state) or root == "/" or state == "/":
        return None
    return root, state


def resolv_conf(dns: sandbox_pb2.PodDNS) -> str:
    """resolv.conf from the pod's DNS settings, as CRI writes it."""
    out = ""
    if dns.searches:
        out += f"search {' '.join(dns.searches)}\n"
    if dns.servers:
        out += "".join(f"nameserver {s}\n" for s in dns.servers)
    if dns.options:
        out += f"options {' '.join(dns.options)}\n"
    return out


def where(bundle: str, id: str) -> list[str]:
    """The directories :func:`make` writes for this pod ([] outside containerd's tree)."""
    dirs = containerd_dirs(bundle)
    if dirs is None:
        return []
    return [os.path.join(d, CRI_DIR, "sandboxes", id) for d in dirs]


def make(bundle: str, id: str, config: sandbox_pb2.PodConfig) -> list[str]:
    """Write the pod's files; the directories made (to hand to :func:`remove` later)."""
    import shutil  # here, not at the top: see remove()

    made = where(bundle, id)
    if not made:
        return []
    root, volatile = made
    try:
        os.makedirs(root, mode=0o755, exist_ok=True)
        _write(os.path.join(root, "hostname"), (config.hostname or socket.gethostname()) + "\n")
        shutil.copyfile("/etc/hosts", os.path.join(root, "hosts"))
        resolv = os.path.join(root, "resolv.conf")
        if config.HasField("dns_config"):
            _write(resolv, resolv_conf(config.dns_config))
        else:
            shutil.copyfile("/etc/resolv.conf", resolv)
        nsopts = config.linux.security_context.namespace_options
        if nsopts.ipc != NODE:
            shm = os.path.join(volatile, "shm")
            os.makedirs(shm, mode=0o700, exist_ok=True)
            if not is_mountpoint(shm):
                mount.mount(
                    mount.Mount(
                        "tmpfs", "shm", ("nosuid", "nodev", "noexec", f"mode=1777,size={SHM_SIZE}")
                    ),
                    shm,
                )
    except BaseException:
        remove(made)
        raise
    return made


def remove(dirs: list[str]) -> None:
    """Unmount the pod's /dev/shm and remove its files."""
    # shutil is imported only by the pod calls that use it: with bz2, lzma and zlib behind
    # it, it costs every daemon about 0.25 MB (issue 14), pods or not.
    import shutil

    for d in dirs:
        shm = os.path.join(d, "shm")
        if os.path.isdir(shm):
            mount.unmount_all(shm)
        shutil.rmtree(d, ignore_errors=True)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
