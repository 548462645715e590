"""Kubernetes' view of a daemon crash (issue 11): pods and containers stay as they were, CRI's
waits in flight get the real exit code, exec works on, and the kubelet would see nothing.

Only for our handler: runc-v2 has no daemon to crash (a crashed runc-v2 shim costs its pod).
"""

from __future__ import annotations

from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import CriNode
from integration.embed import crash_daemon, daemons
from integration.harness import wait_for


def test_daemon_crash_is_invisible_to_cri(cri_node: CriNode) -> None:
    node = cri_node
    try:
        pod = node.run_pod("embed")
        long = node.run_container(pod, ["sleep", "100000"], name="long")
        # Exits with 3 while CRI waits on it across the crash.
        short = node.run_container(pod, ["sh", "-c", "sleep 2; exit 3"], name="short")
        before = node.status(long)
        pids = {p.pid for p in daemons(node.ctrd)}
        (daemon,) = daemons(node.ctrd)
        crash_daemon(daemon)
        wait_for(
            lambda: {p.pid for p in daemons(node.ctrd)} - pids, what="a new daemon", interval=0.02
        )
        assert node.exec_sync(long, ["sh", "-c", "echo hi; exit 4"]).exit_code == 4
        st = node.wait_exited(short)
        assert st.exit_code == 3 and st.reason == "Error", st
        now = node.status(long)
        assert now.state == cri.CONTAINER_RUNNING
        assert now.started_at == before.started_at
        assert node.pod_status(pod).state == cri.SANDBOX_READY
        node.stop(long, timeout=0)
        st = node.wait_exited(long)
        assert st.exit_code == 137, st
        # The sandbox is still up: containerd never saw its shim disconnect.
        log = node.ctrd.log_tail(100000).splitlines()
        torn = [line for line in log if "shim disconnected" in line and pod.id in line]
        assert torn == [], torn
    finally:
        node.remove_all_pods()
