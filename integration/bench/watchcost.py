"""What ``watch`` costs (issue 15): a container forks and exits 5,000 short processes a
second; how much CPU does the daemon spend, with no watcher and with one, and does the
container itself get slower?

    python -m integration.bench.watchcost [--seconds 10] [--rate 5000] [--json]

Phases, each in a fresh container of one private containerd (embed runtime):

rate    a static C forker (compiled here, bind-mounted in) forks ``--rate`` children a second,
        each ``_exit(0)`` at once, for ``--seconds``; daemon CPU (utime + stime) is sampled
        over the steady window (after a 1 s warm-up), once without a watcher and once with
        ``watch --json`` reading into a pipe (whose own CPU and event count are reported).
speed   the same forker, flat out, for ``--speed-forks`` children: forks per second of the
        container with and without a watcher (the container's own speed).

Runs on its own, and as the ``watch`` phase of ``make bench`` (:func:`phase_watch`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from integration.bench.common import process_cpu_s
from integration.embed import RUNTIME, SHIM, daemons, embed_containerd
from integration.harness import Containerd, busybox_rootfs, task_list, wait_for

if TYPE_CHECKING:
    from integration.bench.bench import Bench

FORKER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/wait.h>
/* forker RATE SECONDS: RATE forks a second (0: flat out) for SECONDS (or, flat out, RATE=0
   and SECONDS = number of forks); prints "forks elapsed_s". */
int main(int argc, char **argv) {
    long rate = atol(argv[1]), arg = atol(argv[2]), n = 0;
    struct timespec t0, now, next;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    next = t0;
    for (;;) {
        pid_t p = fork();
        if (p == 0) _exit(0);
        if (p > 0) { waitpid(p, NULL, 0); n++; }
        if (rate == 0) { if (n >= arg) break; continue; }
        if (n % (rate / 1000 > 0 ? rate / 1000 : 1) == 0) {
            next.tv_nsec += 1000000;
            if (next.tv_nsec >= 1000000000) { next.tv_sec++; next.tv_nsec -= 1000000000; }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - t0.tv_sec >= arg) break;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    printf("%ld %.6f\n", n, (now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
"""


def build_forker(tmp: str) -> str:
    src = os.path.join(tmp, "forker.c")
    out = os.path.join(tmp, "bin", "forker")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(src, "w") as f:
        f.write(FORKER_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-static", "-o", out, src], check=True)
    return os.path.dirname(out)


class Watch:
    """``watch --json`` into a pipe, lines counted."""

    def __init__(self, c: Containerd) -> None:
        env = {**os.environ, "EMBEDSHIM_ROOT": c.embedshim_root}
        argv = [os.path.join(sys.prefix, "bin", SHIM), "-address", c.address, "watch", "--json"]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines = 0
        self.connected = threading.Event()
        threading.Thread(target=self._count, daemon=True).start()
        threading.Thread(target=self._err, daemon=True).start()

    def _count(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            self.lines += 1

    def _err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "connected to the daemon" in line:
                self.connected.set()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _run_forker(
    c: Containerd, rootfs: str, bindir: str, cid: str, rate: int, arg: int
) -> subprocess.Popen[str]:
    mount = f"type=bind,src={bindir},dst=/forker,options=rbind:ro"
    argv = c.ctr_argv(
        *c.run_args(RUNTIME, rootfs, cid, "/forker/forker", str(rate), str(arg),
                    extra=("--mount", mount))
    )  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(c: Containerd, p: subprocess.Popen[str], cid: str) -> tuple[int, float]:
    out, err = p.communicate(timeout=300)
    c.ctr("container", "delete", cid, check=False)
    forks, elapsed = out.split()[:2] if out.strip() else ("0", "0")
    if not out.strip():
        raise RuntimeError(f"forker printed nothing: {err}")
    return int(forks), float(elapsed)


def _rate_phase(
    c: Containerd, rootfs: str, bindir: str, cid: str, rate: int, seconds: int, watcher: bool
) -> dict[str, float]:

    w = Watch(c) if watcher else None
    if w is not None:
        w.connected.wait(20)
    (daemon,) = daemons(c)
    p = _run_forker(c, rootfs, bindir, cid, rate, seconds + 2)
    wait_for(lambda: cid in task_list(c), timeout=20, what="forker running")
    time.sleep(1.0)
    d0, w0, l0, t0 = process_cpu_s(daemon.pid), 0.0, 0, time.monotonic()
    if w is not None:
        w0, l0 = process_cpu_s(w.proc.pid), w.lines
    time.sleep(seconds - 1.0)
    d1, t1 = process_cpu_s(daemon.pid), time.monotonic()
    row = {"daemon_cpu_pct": 100 * (d1 - d0) / (t1 - t0)}
    if w is not None:
        row["watcher_cpu_pct"] = 100 * (process_cpu_s(w.proc.pid) - w0) / (t1 - t0)
        row["events_per_s"] = (w.lines - l0) / (t1 - t0)
    forks, elapsed = _finish(c, p, cid)
    row["forks_per_s"] = forks / elapsed
    if w is not None:
        w.stop()
    return row


def _speed_phase(c: Containerd, rootfs: str, bindir: str, cid: str, n: int, watcher: bool) -> float:
    w = Watch(c) if watcher else None
    if w is not None:
        w.connected.wait(20)
    p = _run_forker(c, rootfs, bindir, cid, 0, n)
    forks, elapsed = _finish(c, p, cid)
    if w is not None:
        w.stop()
    return forks / elapsed


def measure(
    busybox: str, seconds: int = 10, rate: int = 5000, speed_forks: int = 20000, rounds: int = 2
) -> dict[str, Any]:
    """The watch-cost row: daemon CPU % at ``rate`` forks/s without and with a watcher, the
    watcher's own CPU %, events/s it received, and the container's flat-out forks/s."""
    tmp = tempfile.mkdtemp(prefix="esh-watchcost-")
    try:
        bindir = build_forker(tmp)
        rows: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        speed: dict[str, list[float]] = {"off": [], "on": []}
        with embed_containerd(busybox) as c:
            c.run(RUNTIME, busybox, "keep", "sleep", "100000", detach=True)  # the daemon stays
            i = 0
            for _ in range(rounds):
                for mode in ("off", "on"):  # interleaved: drift hits both alike
                    i += 1
                    rows[mode].append(
                        _rate_phase(c, busybox, bindir, f"f{i}", rate, seconds, mode == "on")
                    )
                    i += 1
                    speed[mode].append(
                        _speed_phase(c, busybox, bindir, f"s{i}", speed_forks, mode == "on")
                    )
            c.ctr("task", "kill", "-s", "KILL", "keep", check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    out: dict[str, Any] = {"rate_target": rate, "seconds": seconds, "rounds": rounds}
    for mode in ("off", "on"):
        for key in rows[mode][0]:
            out[f"{key}_{mode}"] = round(mean([r[key] for r in rows[mode]]), 2)
        out[f"speed_forks_per_s_{mode}"] = round(mean(speed[mode]), 1)
        out[f"speed_samples_{mode}"] = [round(x, 1) for x in speed[mode]]
    return out


def phase_watch(b: Bench) -> None:
    """The bench's ``watch`` phase: :func:`measure` at the bench's size, on its own
    containerd (the forker must not share a machine-wide daemon with the other phases)."""
    cfg = b.cfg
    b.progress(
        f"watch: {cfg.watch_rounds} round(s) of {cfg.watch_seconds} s at 5000 forks/s", force=True
    )
    b.results["watch"] = measure(
        b.rootfs, cfg.watch_seconds, 5000, cfg.watch_speed_forks, cfg.watch_rounds
    )


def table(row: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"watch cost, container forking {row['rate_target']}/s "
            f"(mean of {row['rounds']} rounds of {row['seconds']} s):",
            f"  achieved forks/s            no watcher {row['forks_per_s_off']:>9.0f}   "
            f"watcher {row['forks_per_s_on']:>9.0f}",
            f"  daemon CPU %                no watcher {row['daemon_cpu_pct_off']:>9.2f}   "
            f"watcher {row['daemon_cpu_pct_on']:>9.2f}",
            f"  watch client CPU %                                watcher "
            f"{row['watcher_cpu_pct_on']:>9.2f}",
            f"  events/s received                                 watcher "
            f"{row['events_per_s_on']:>9.0f}",
            f"  container flat-out forks/s  no watcher {row['speed_forks_per_s_off']:>9.0f}   "
            f"watcher {row['speed_forks_per_s_on']:>9.0f}",
        ]
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--speed-forks", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rootfs = busybox_rootfs(tempfile.mkdtemp(prefix="esh-watchcost-bb-"))
    try:
        row = measure(rootfs, args.seconds, args.rate, args.speed_forks, args.rounds)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    print(json.dumps(row) if args.json else table(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
