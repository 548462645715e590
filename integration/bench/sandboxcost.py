"""What a pod's sandbox costs, through CRI on containerd 2.2.7, for three runtime handlers:
runc's (``io.containerd.runc.v2``, a pause container and one runc shim per pod), ours with a
pause container (``embed``) and ours with the Sandbox API (``embed-shim``, no pause container:
our holder process, shim/pods/sandbox.py).

    .venv/bin/python -m integration.bench.sandboxcost              # 20 pods per handler
    .venv/bin/python -m integration.bench.sandboxcost --pods 5 --out /tmp/sb.json

For each handler, in turns (runc, embed, embed-shim, so drift hits all alike): 3 warm-up pods
(run, stop, remove), then ``--pods`` pods run one after the other (RunPodSandbox timed, no
container in them), the memory they cost measured with all of them up, then each stopped
(StopPodSandbox timed) and removed (RemovePodSandbox timed).  Memory per pod, averaged over
the pods:

* ``sandbox_pss_kib``: PSS (/proc/PID/smaps_rollup) of the pod's sandbox process: the pause
  container's process, or our holder;
* ``server_pss_kib``: what serves the pod, per pod: runc's handler starts one
  containerd-shim-runc-v2 per pod (its PSS); ours has one daemon for all (its PSS growth
  from before the pods to with them, divided by their number; an anchor pod keeps it up);
* ``cgroup_kib``: memory charged to the pod's cgroup (cgroup v1 ``memory.usage_in_bytes``,
  v2 ``memory.current`` of the pod's cgroup parent): the sandbox process's pages and the page
  cache it touched;
* ``pod_kib`` = sandbox + server PSS + cgroup: all a pod adds (an upper bound: the sandbox
  process's own anonymous pages are in its PSS and in its cgroup's charge).  The issue's
  target compares it with a pause container's: the pause process's PSS and its cgroup's
  charge (runc's handler's ``sandbox_pss_kib + cgroup_kib``).

Runs on its own (below) and as the ``sandbox`` phase of ``make bench`` (:func:`phase_sandbox`).
Needs root, ../shared/containerd2 and what the CRI suite needs (busybox-static, CNI plugins).
Prints a table and writes JSON (``bench/out/sandboxcost-<time>.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from integration.bench.goals import SANDBOX_RUN_BOUND
from integration.cri.node import (
    SHIM_SANDBOXER,
    CriNode,
    Pod,
    cni_cache_dirs,
    drop_cni_cache,
    is_ours,
)
from integration.embed import CONTAINERD2_BIN, containerd_version_env, daemons
from integration.harness import busybox_rootfs, processes_matching

if TYPE_CHECKING:
    from integration.bench.bench import Bench

HANDLERS = ("runc", "embed", SHIM_SANDBOXER)
WARMUP = 3
#: target of issue 17: RunPodSandbox p50 of ours with the Sandbox API at most this share of
#: runc's handler's (the bench's goal, one figure for both)
RUN_RATIO_TARGET = SANDBOX_RUN_BOUND


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed(call: Callable[[], object]) -> float:
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1000


def cgroup_kib(parent: str) -> int:
    """Memory charged to a cgroupfs pod cgroup (``/<parent>``), v1 or v2."""
    for path in (
        f"/sys/fs/cgroup/memory{parent}/memory.usage_in_bytes",
        f"/sys/fs/cgroup{parent}/memory.current",
        f"/sys/fs/cgroup/unified{parent}/memory.current",
    ):
        try:
            with open(path) as f:
                return int(f.read()) // 1024
        except OSError:
            continue
    return 0


def runc_shims(node: CriNode) -> dict[int, int]:
    """pid -> PSS of this node's containerd-shim-runc-v2 processes."""
    procs = processes_matching(
        lambda p: (
            not p.zombie
            and os.path.basename((p.cmdline or [""])[0]) == "containerd-shim-runc-v2"
            and node.ctrd.address in p.cmdline
        )
    )
    return {p.pid: pss_kib(p.pid) for p in procs}


def daemon_pss(node: CriNode) -> int:
    return sum(pss_kib(p.pid) for p in daemons(node.ctrd))


def sandbox_pid(node: CriNode, pod: Pod) -> int:
    return int(node.sandbox_info(pod)["pid"])


def cycle(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    node.stop_pod(pod)
    node.remove_pod(pod)


def measure(node: CriNode, handler: str, pods: int, warmup: int = WARMUP) -> dict[str, Any]:
    anchor = node.run_pod(handler) if is_ours(handler) else None  # the daemon stays up
    for _ in range(warmup):
        cycle(node, handler)
    shims_before = runc_shims(node)
    daemon_before = daemon_pss(node)
    run_ms, stop_ms, remove_ms, made = [], [], [], []
    for _ in range(pods):
        t = time.perf_counter()
        made.append(node.run_pod(handler))
        run_ms.append((time.perf_counter() - t) * 1000)
    time.sleep(1.0)  # settle
    sandbox = [pss_kib(sandbox_pid(node, p)) for p in made]
    if is_ours(handler):
        server = (daemon_pss(node) - daemon_before) / pods
    else:
        new = {pid: kib for pid, kib in runc_shims(node).items() if pid not in shims_before}
        server = sum(new.values()) / pods
    cgroups = [cgroup_kib(p.config.linux.cgroup_parent) for p in made]
    for p in made:
        stop_ms.append(timed(lambda p=p: node.stop_pod(p)))
    for p in made:
        remove_ms.append(timed(lambda p=p: node.remove_pod(p)))
    if anchor is not None:
        node.stop_pod(anchor)
        node.remove_pod(anchor)

    def stats(ms: list[float]) -> dict[str, float]:
        return {"p50": percentile(ms, 0.5), "p95": percentile(ms, 0.95), "max": max(ms)}

    sandbox_avg = statistics.mean(sandbox)
    return {
        "pods": pods,
        "run_ms": stats(run_ms),
        "stop_ms": stats(stop_ms),
        "remove_ms": stats(remove_ms),
        "sandbox_pss_kib": round(sandbox_avg),
        "server_pss_kib": round(server),
        "cgroup_kib": round(statistics.mean(cgroups)),
        "pod_kib": round(sandbox_avg + server + statistics.mean(cgroups)),
    }


def phase_sandbox(b: Bench) -> None:
    """The bench's ``sandbox`` phase: every handler on one CRI node of containerd 2.2.7
    (its own, private), ``cfg.sandbox_pods`` pods each; "skipped" without containerd 2.2.7."""
    if not (CONTAINERD2_BIN / "containerd").exists():
        b.results["sandbox"] = {"skipped": f"containerd 2.2.7 not found in {CONTAINERD2_BIN}"}
        b.error(b.results["sandbox"]["skipped"])
        return
    pods = b.cfg.sandbox_pods
    warmup = 1 if b.cfg.quick else WARMUP
    preexisting = cni_cache_dirs()
    b.progress("sandbox: starting a containerd 2.2.7 CRI node", force=True)
    results: dict[str, Any] = {"containerd": "2.2.7", "warmup": warmup, "handlers": {}}
    b.results["sandbox"] = results
    node = CriNode(b.rootfs, env=containerd_version_env("2.2.7"))
    try:
        for h in HANDLERS:
            b.progress(f"sandbox: {h}, {warmup} warm-up + {pods} pods", force=True)
            results["handlers"][h] = measure(node, h, pods, warmup)
    finally:
        node.close()
        drop_cni_cache(preexisting)


def table(results: dict[str, Any], with_targets: bool = True) -> str:
    rows = [
        f"{'handler':<11} {'run p50':>8} {'p95':>7} {'stop p50':>9} {'p95':>7} "
        f"{'rm p50':>7} {'p95':>7} {'sandbox':>8} {'server':>7} {'pod':>7} {'cgroup':>7}",
        f"{'':<11} {'ms':>8} {'ms':>7} {'ms':>9} {'ms':>7} {'ms':>7} {'ms':>7} "
        f"{'KiB':>8} {'KiB':>7} {'KiB':>7} {'KiB':>7}",
    ]
    for h in HANDLERS:
        r = results["handlers"].get(h)
        if r is None:
            continue
        rows.append(
            f"{h:<11} {r['run_ms']['p50']:>8.1f} {r['run_ms']['p95']:>7.1f} "
            f"{r['stop_ms']['p50']:>9.1f} {r['stop_ms']['p95']:>7.1f} "
            f"{r['remove_ms']['p50']:>7.1f} {r['remove_ms']['p95']:>7.1f} "
            f"{r['sandbox_pss_kib']:>8} {r['server_pss_kib']:>7} {r['pod_kib']:>7} "
            f"{r['cgroup_kib']:>7}"
        )
    if with_targets:
        rows += targets(results)
    return "\n".join(rows)


def targets(results: dict[str, Any]) -> list[str]:
    h = results["handlers"]
    if "runc" not in h or SHIM_SANDBOXER not in h:
        return []
    ratio = h[SHIM_SANDBOXER]["run_ms"]["p50"] / h["runc"]["run_ms"]["p50"]
    ours = h[SHIM_SANDBOXER]["pod_kib"]
    pause = h["runc"]["sandbox_pss_kib"] + h["runc"]["cgroup_kib"]
    return [
        f"RunPodSandbox p50, {SHIM_SANDBOXER} / runc: {ratio:.2f} (target <= "
        f"{RUN_RATIO_TARGET}): {'MET' if ratio <= RUN_RATIO_TARGET else 'NOT MET'}",
        f"a pod of {SHIM_SANDBOXER}, {ours} KiB, vs a pause container (PSS + cgroup), "
        f"{pause} KiB: "
        f"{'MET' if ours < pause else 'NOT MET'}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=20, help="pods per handler (default 20)")
    ap.add_argument("--out", help="JSON file (default bench/out/sandboxcost-<time>.json)")
    args = ap.parse_args(argv)
    if not (CONTAINERD2_BIN / "containerd").exists():
        sys.stderr.write(f"sandboxcost: needs containerd 2.2.7 in {CONTAINERD2_BIN}\n")
        return 2
    env = containerd_version_env("2.2.7")
    top = tempfile.mkdtemp(prefix="esh-sbcost-")
    node = CriNode(busybox_rootfs(os.path.join(top, "bb")), env=env)
    results: dict[str, Any] = {"containerd": "2.2.7", "handlers": {}}
    try:
        for h in HANDLERS:
            sys.stderr.write(f"sandboxcost: {h} ...\n")
            results["handlers"][h] = measure(node, h, args.pods)
    finally:
        node.close()
        shutil.rmtree(top, ignore_errors=True)
    out = Path(args.out or f"bench/out/sandboxcost-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
