"""`watch` on a CRI node: events of a pod's containers carry the pod's name, its Kubernetes
namespace and the container's name (from the OCI annotations CRI sets)."""

from __future__ import annotations

from integration.cri.node import HANDLERS, K8S_NAMESPACE, CriNode
from integration.test_watch import Watcher


def test_events_of_a_pod_carry_its_pod_name(node: CriNode) -> None:
    handler = next(h for h, runtime in HANDLERS.items() if runtime == "io.containerd.embed.v1")
    pod = node.run_pod(handler)  # the daemon serves the sandbox from here on
    w = Watcher(node.ctrd, "--json", "--ns", K8S_NAMESPACE)
    try:
        w.said("connected to the daemon")
        cid = node.run_container(pod, ["sh", "-c", "/bin/true; exit 5"], name="app")
        node.wait_exited(cid)
        true = w.wait_for(lambda e: e["event"] == "exec" and e.get("filename") == "/bin/true")
        done = w.wait_for(lambda e: e["event"] == "exit" and e.get("exit_code") == 5)
        for e in (true, done):
            assert e["namespace"] == K8S_NAMESPACE and e["container_id"] == cid
            assert e["pod"] == pod.config.metadata.name
            assert e["pod_namespace"] == pod.config.metadata.namespace == "default"
            assert e["container"] == "app"
    finally:
        w.stop()
