"""What the bench and its phase modules share: the runtimes' names, pure statistics, and
CPU counters from /proc.  Phase modules import this, never ``bench.py`` (which imports them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

EMBED = "embed"
RUNC = "runc-v2"
SLEEP = ("sleep", "100000")

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# statistics (pure; tested in tests/test_bench_stats.py)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default, ``statistics.quantiles(method="inclusive")``)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """n, min, mean, p50, p95, p99, max of ``values`` (just n=0 when empty)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Ordinary least squares ``y = slope * x + intercept``; returns (slope, intercept)."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    if len(xs) < 2:
        raise ValueError("a line needs at least two points")
    mx = sum(xs) / len(xs)
    my = sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x values are equal")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return slope, my - slope * mx


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    return linear_fit(xs, ys)[0]


def ms(seconds: Sequence[float]) -> list[float]:
    return [round(s * 1000.0, 3) for s in seconds]


def order(i: int, names: Sequence[str]) -> list[str]:
    """``names`` rotated by ``i`` (alternates who goes first)."""
    k = i % len(names)
    return [*names[k:], *names[:k]]


# --------------------------------------------------------------------------------------
# CPU counters


def system_cpu_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait
    busy = sum(int(x) for i, x in enumerate(fields[:8]) if i not in (3, 4))
    return busy / _CLK_TCK


def _cpu_ticks(pid: int) -> list[int]:
    """utime, stime, cutime, cstime of ``pid`` (clock ticks); zeros if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return [int(x) for x in rest[11:15]]
    except (OSError, IndexError):
        return [0, 0, 0, 0]


def process_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` in seconds; 0 if it is gone."""
    return sum(_cpu_ticks(pid)[:2]) / _CLK_TCK


def process_tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and of its children it has waited for (cutime + cstime)."""
    return sum(_cpu_ticks(pid)) / _CLK_TCK
