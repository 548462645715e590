"""The bench's CRI phase: what the kubelet waits for, per runtime handler.

A CRI node of its own (integration/cri/node.py: containerd with its CRI plugin in a private
netns, CNI bridge, busybox and pause images) with both handlers, ``embed`` and ``runc``.
After one untimed pod per handler (its RunPodSandbox reported apart as the first pod: ours
also starts the daemon), ``rounds`` times: ``pods`` pods (the handlers alternate who goes
first): RunPodSandbox, then two containers joining the pod (CreateContainer untimed,
StartContainer timed), one at a time; then, pod by pod, StopContainer (timeout 0: SIGKILL,
as after a grace period) and RemoveContainer for each, StopPodSandbox and RemovePodSandbox.
Each CRI call's wall time, as the kubelet's gRPC client sees it.  Rounds, not more pods at
once: more samples under the same conditions (at most ``pods`` pods per handler up).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from integration.bench.common import ms, order, summarize

if TYPE_CHECKING:
    from integration.bench.bench import Bench

OPS = ("RunPodSandbox", "StartContainer", "StopContainer", "StopPodSandbox")
#: CRI handler name -> the bench's runtime key
HANDLER_KEYS = {"embed": "embed", "runc": "runc-v2"}
CONTAINERS_PER_POD = 2


def phase_cri(b: Bench) -> None:
    from integration.cri.node import CriNode, cni_cache_dirs, drop_cni_cache

    pods_n, rounds = b.cfg.cri_pods, b.cfg.cri_rounds
    handlers = list(HANDLER_KEYS)
    times: dict[str, dict[str, list[float]]] = {h: {op: [] for op in OPS} for h in handlers}
    preexisting = cni_cache_dirs()
    b.progress("CRI: starting a CRI node", force=True)
    node = CriNode(b.rootfs)

    def timed(h: str, op: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        times[h][op].append(time.perf_counter() - t0)
        return out

    first: dict[str, float] = {}
    warm: dict[str, Any] = {}
    try:
        # A pod per handler first, untimed in the rounds and kept to the end: on a fresh
        # containerd the first pod also starts our daemon (one Python start per containerd:
        # the node's start-up, not a pod's), as the other phases keep a warm container.  Its
        # time is reported on its own ("first pod").
        for h in handlers:
            t0 = time.perf_counter()
            warm[h] = node.run_pod(h)
            first[h] = time.perf_counter() - t0
        for r in range(rounds):
            pods: dict[str, list[Any]] = {h: [] for h in handlers}
            for i in range(pods_n):
                for h in order(r * pods_n + i, handlers):
                    b.progress(f"CRI: round {r + 1}/{rounds}, pod {i + 1}/{pods_n} {h}")
                    pod = timed(h, "RunPodSandbox", node.run_pod, h)
                    pods[h].append(pod)
                    for _ in range(CONTAINERS_PER_POD):
                        cid = node.create_container(pod, ["sleep", "100000"])
                        timed(h, "StartContainer", node.start, cid)
            for i in range(pods_n):
                for h in order(r * pods_n + i, handlers):
                    b.progress(f"CRI: round {r + 1}/{rounds}, stopping pod {i + 1}/{pods_n} {h}")
                    pod = pods[h][i]
                    for cid in pod.containers:
                        timed(h, "StopContainer", node.stop, cid, 0)
                        node.remove(cid)
                    timed(h, "StopPodSandbox", node.stop_pod, pod)
                    node.remove_pod(pod)
        for pod in warm.values():
            node.stop_pod(pod)
            node.remove_pod(pod)
    finally:
        node.close()
        drop_cni_cache(preexisting)
    out: dict[str, Any] = {
        "pods": pods_n,
        "rounds": rounds,
        "containers_per_pod": CONTAINERS_PER_POD,
    }
    for h, key in HANDLER_KEYS.items():
        out[key] = {
            op: {"summary": summarize(ms(times[h][op])), "ms": ms(times[h][op])} for op in OPS
        }
        out[key]["first_pod_ms"] = first[h] * 1000
    b.results["cri"] = out
