"""Where an exec's time goes, call by call: both runtimes side by side on one private
containerd, interleaved (issue 14's profiling aid; not part of ``make bench``).

    python -m integration.bench.calls [--execs 80] [--states 4000]

exec    through containerd's gRPC Tasks API (what ``ctr task exec`` does, without ctr's own
        start and without stdio): Exec, Wait (sent first, as ctr does), Start, and Delete
        of a ``true`` exec, each timed on its own; the runtimes alternate who goes first.
state   a ttrpc State straight to each shim's socket (the call containerd makes 7 times per
        ``ctr task exec``), one after another: the per-call cost of each shim itself (the
        same blocking client for both).

Prints the median per call for each runtime and the difference.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import threading
import time
from collections.abc import Callable

from integration.bench.common import order
from integration.embed import embedshim_env, remove_bpf_pins
from integration.harness import (
    CONTAINER_PATH,
    EMBED_RUNTIME,
    RUNC_RUNTIME,
    Containerd,
    busybox_rootfs,
)
from integration.tasks_grpc import Tasks, tasks_client
from shim.api import shim_pb2
from shim.ttrpc.blocking import BlockingClient

RUNTIMES = {"embed": EMBED_RUNTIME, "runc-v2": RUNC_RUNTIME}
TRUE = {
    "args": ["true"],
    "cwd": "/",
    "env": [f"PATH={CONTAINER_PATH}"],
    "user": {"uid": 0, "gid": 0},
}
TASK_SERVICE = "containerd.task.v2.Task"


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def exec_calls(t: Tasks, cid: str, exec_id: str) -> dict[str, float]:
    """One exec of ``true`` in container ``cid``: ms per call."""
    out = {"Exec": _timed(lambda: t.exec(cid, exec_id, TRUE))}
    status: list[int] = []
    waiter = threading.Thread(target=lambda: status.append(t.wait(cid, exec_id)))
    waiter.start()
    time.sleep(0.002)  # the Wait is in flight before the Start, as ctr sends them
    out["Start"] = _timed(lambda: t.start(cid, exec_id))
    out["Wait after Start"] = _timed(waiter.join)
    out["Delete"] = _timed(lambda: t.delete_process(cid, exec_id))
    if status != [0]:
        raise RuntimeError(f"exec {exec_id} in {cid}: exit status {status}")
    return out


def state_calls(c: Containerd, cid: str, n: int) -> list[float]:
    """``n`` State calls straight to the shim serving ``cid``: ms each."""
    (address_file,) = glob.glob(f"{c.state}/io.containerd.runtime.v2.task/*/{cid}/address")
    with open(address_file) as f:
        address = f.read().strip()
    payload = shim_pb2.StateRequest(id=cid).SerializeToString()
    metadata = {"containerd-namespace-ttrpc": c.namespace}
    with BlockingClient(address) as client:
        return [
            _timed(lambda: client.call(TASK_SERVICE, "State", payload, metadata=metadata))
            for _ in range(n)
        ]


def report(times: dict[str, dict[str, list[float]]]) -> str:
    lines = [f"{'call (median ms)':24s} {'embed':>9s} {'runc-v2':>9s} {'diff':>9s}"]
    for call in times["embed"]:
        ours, theirs = (statistics.median(times[rt][call]) for rt in ("embed", "runc-v2"))
        digits = 3 if ours < 1 else 2
        lines.append(
            f"{call:24s} {ours:9.{digits}f} {theirs:9.{digits}f} {ours - theirs:+9.{digits}f}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--execs", type=int, default=80, help="execs per runtime")
    p.add_argument("--states", type=int, default=4000, help="State calls per runtime")
    args = p.parse_args()
    c = Containerd(extra_env=embedshim_env())
    try:
        rootfs = busybox_rootfs(os.path.join(c.tmp, "bb"))
        for name, runtime in RUNTIMES.items():
            c.ctr(*c.run_args(runtime, rootfs, name, "sleep", "100000", detach=True))
        times: dict[str, dict[str, list[float]]] = {rt: {} for rt in RUNTIMES}
        with tasks_client(c) as t:
            for i in range(args.execs):
                for rt in order(i, list(RUNTIMES)):
                    for call, ms in exec_calls(t, rt, f"x{i}").items():
                        times[rt].setdefault(call, []).append(ms)
        for rt in times:
            total = [sum(parts) for parts in zip(*times[rt].values(), strict=True)]
            times[rt]["exec, all calls"] = total
        for i in range(2):  # two rounds each, alternating
            for rt in order(i, list(RUNTIMES)):
                calls = state_calls(c, rt, args.states // 2)
                times[rt].setdefault("State (ttrpc, direct)", []).extend(calls)
        print(report(times))
    finally:
        for name in RUNTIMES:
            c.ctr("task", "delete", "-f", name, check=False)
            c.ctr("container", "delete", name, check=False)
        try:
            c.cleanup()
        finally:
            remove_bpf_pins(c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
