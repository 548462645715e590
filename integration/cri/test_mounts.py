"""A recursive read-only mount (Kubernetes ``recursiveReadOnly: Enabled``, CRI's
``recursive_read_only``) with our handler as with runc's.

containerd 2.x lets a container have one only if the handler's runtime says it can: CRI runs
each handler's shim with ``-info`` when it starts and looks for ``rro`` in the ``runc
features`` the shim reports (shim/cmd/info.py).  Without ``-info`` CRI refused such a container
for our handler ("runtime handler does not support recursive read-only mounts") and the task
manager logged "failed to load runtime info" for each container it created.  containerd 1.6
has no recursive read-only mounts (the field is unknown to it).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import CriNode
from integration.embed import runtime_info_failures

#: each path the container could write to sets one bit of its exit status
PROBES = (("/rro", 1), ("/rro/sub", 2), ("/ro", 4), ("/ro/sub", 8))


def test_recursive_read_only_mount(node: CriNode, handler: str) -> None:
    if node.ctrd.version < (2,):
        pytest.skip("containerd 1.6's CRI has no recursive read-only mounts (2.0 and later)")
    # CRI's view of the handler: what it read from the shim's -info (runc's for runc)
    features = {
        h.name: h.features for h in node.runtime.Status(cri.StatusRequest()).runtime_handlers
    }
    assert features[handler].recursive_read_only_mounts, features
    assert features["embed"] == features["runc"]
    # A host dir with a mount inside it: a read-only bind of it leaves that mount writable
    # unless it is recursive.
    src = os.path.join(node.ctrd.tmp, f"rro-{handler}")
    sub = os.path.join(src, "sub")
    os.makedirs(sub)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "rro", sub], check=True)
    try:
        pod = node.run_pod(handler)
        script = (
            "s=0; "
            + "".join(f"touch {path}/probe 2>/dev/null && s=$((s+{bit})); " for path, bit in PROBES)
            + "exit $s"
        )
        mounts = [
            cri.Mount(
                container_path="/rro", host_path=src, readonly=True, recursive_read_only=True
            ),
            cri.Mount(container_path="/ro", host_path=src, readonly=True),
        ]
        cid = node.run_container(pod, ["sh", "-c", script], mounts=mounts)
        st = node.wait_exited(cid)
        writable = [path for path, bit in PROBES if st.exit_code & bit]
        assert writable == ["/ro/sub"], (st.exit_code, st.reason, st.message)
        assert os.listdir(sub) == ["probe"]  # the one write went to the host's mount
    finally:
        node.remove_all_pods()
        subprocess.run(["umount", sub], check=False)
    # the task manager asked our shim too (before its first Create), and got an answer
    assert not runtime_info_failures(node.ctrd)
