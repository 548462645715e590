"""The bench's scale phase: ``ctr run -d`` and stop+delete latency with N containers already
running, and throughput with 8 at a time.

Both runtimes grow together to each N (10 and 300; quick: 10 and 30) in alternating chunks
started 8 at a time through one pool, so each runtime's starts meet the same machine (N of
its own and N of the other's running); the walls of its chunks add up to its start time.
At each N, ``samples`` containers per runtime, alternating, are started with ``ctr run -d``
and at once stopped and deleted (``ctr task delete -f`` + ``ctr container delete``: kill,
exit event, task delete, container removal), one at a time.  At the end every container
goes, again in alternating chunks 8 at a time; throughput = containers / (start walls +
teardown walls).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from integration.bench.common import EMBED, RUNC, SLEEP, ms, order, summarize

if TYPE_CHECKING:
    from integration.bench.bench import Bench

CONCURRENCY = 8
CHUNK = 4 * CONCURRENCY


def throughput(containers: int, start_s: float, teardown_s: float) -> float | None:
    """Containers started and torn down per second of wall time; None without data."""
    total = start_s + teardown_s
    if containers <= 0 or total <= 0:
        return None
    return containers / total


def chunks(ids: Sequence[str], size: int) -> list[list[str]]:
    """``ids`` in consecutive pieces of at most ``size``."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def phase_scale(b: Bench) -> None:

    rts = [EMBED, RUNC]
    up: dict[str, list[str]] = {rt: [] for rt in rts}
    wall = {rt: {"start": 0.0, "teardown": 0.0} for rt in rts}
    counted = {rt: {"start": 0, "teardown": 0} for rt in rts}
    levels: list[dict[str, Any]] = []
    pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="scale")

    def batch(rt: str, fn: Callable[[str], float | None], ids: list[str], what: str) -> list[str]:
        """``fn`` over ``ids`` 8 at a time; the ids it succeeded for.  Adds the wall time."""
        t0 = time.perf_counter()
        done = list(pool.map(fn, ids))
        wall[rt][what] += time.perf_counter() - t0
        ok = [cid for cid, dt in zip(ids, done, strict=True) if dt is not None]
        counted[rt][what] += len(ok)
        return ok

    try:
        for n in b.cfg.scale_ns:
            j = 0
            while any(len(up[rt]) < n for rt in rts):
                for rt in order(j, rts):
                    have = len(up[rt])
                    ids = [f"n-{rt}-{k}" for k in range(have, min(n, have + CHUNK))]
                    if not ids:
                        continue
                    b.progress(f"scale: {rt} {have}/{n} running")

                    def start(cid: str, rt: str = rt) -> float | None:
                        return b.start_one(rt, cid, *SLEEP)

                    started = batch(rt, start, ids, "start")
                    up[rt] += started
                    if len(started) < len(ids):
                        n = min(n, len(up[rt]))  # do not retry for ever on failures
                j += 1
            running = b.wait_running([c for rt in rts for c in up[rt]], 60 + n)
            level: dict[str, Any] = {"n": n, "running": running}
            run_ms: dict[str, list[float]] = {rt: [] for rt in rts}
            down_ms: dict[str, list[float]] = {rt: [] for rt in rts}
            for i in range(b.cfg.scale_samples):
                for rt in order(i, rts):
                    cid = f"q{n}-{rt}-{i}"
                    b.progress(f"scale N={n}: {i + 1}/{b.cfg.scale_samples} {rt}")
                    dt = b.start_one(rt, cid, *SLEEP)
                    if dt is None:
                        continue
                    run_ms[rt] += ms([dt])
                    down = b.teardown_one(cid)
                    if down is not None:
                        down_ms[rt] += ms([down])
            for rt in rts:
                level[rt] = {
                    "run_ms": summarize(run_ms[rt]),
                    "stop_delete_ms": summarize(down_ms[rt]),
                    "run_samples_ms": run_ms[rt],
                    "stop_delete_samples_ms": down_ms[rt],
                }
            levels.append(level)
        pieces = {rt: chunks(up[rt], CHUNK) for rt in rts}
        for j in range(max(len(p) for p in pieces.values())):
            for rt in order(j, rts):
                if j < len(pieces[rt]):
                    b.progress(f"scale: tearing down {rt}")
                    batch(rt, b.teardown_one, pieces[rt][j], "teardown")
    finally:  # on an error or Ctrl-C, the harness's cleanup removes what is left
        pool.shutdown(wait=True, cancel_futures=True)
    b.results["scale"] = {
        "levels": levels,
        "throughput": {
            rt: {
                "concurrency": CONCURRENCY,
                "started": counted[rt]["start"],
                "torn_down": counted[rt]["teardown"],
                "start_wall_s": round(wall[rt]["start"], 3),
                "teardown_wall_s": round(wall[rt]["teardown"], 3),
                "per_s": throughput(
                    min(counted[rt]["start"], counted[rt]["teardown"]),
                    wall[rt]["start"],
                    wall[rt]["teardown"],
                ),
            }
            for rt in rts
        },
    }
