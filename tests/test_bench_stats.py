"""The bench's pure helpers: percentiles, least-squares slope, event time parsing, and the
verdicts on issue 14's goals."""

from __future__ import annotations

import os
import statistics
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integration.bench.bench import (
    PHASES,
    Config,
    held_memfd_kib,
    parse_event_time_ns,
    parse_rfc3339_ns,
)
from integration.bench.common import (
    linear_fit,
    order,
    percentile,
    process_tree_cpu_s,
    slope,
    summarize,
)
from integration.bench.goals import Goal, goals, watch_sandbox_goals
from integration.bench.goals import table as goals_table
from integration.bench.scale import chunks, throughput

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_percentile_known_values() -> None:
    xs = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert percentile(xs, 0) == 15.0
    assert percentile(xs, 100) == 50.0
    assert percentile(xs, 50) == 35.0
    assert percentile(xs, 25) == 20.0
    assert percentile(xs, 40) == pytest.approx(29.0)  # 1.6 ranks in: 20 + 0.6 * 15
    assert percentile(list(reversed(xs)), 40) == pytest.approx(29.0)  # order does not matter


def test_percentile_of_1_to_100() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)


def test_percentile_single_value_and_errors() -> None:
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


@given(st.lists(finite, min_size=2, max_size=60))
def test_percentile_matches_statistics_inclusive(xs: list[float]) -> None:
    # statistics.quantiles(n=100, method="inclusive") gives the 1st..99th percentiles
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    for q in (1, 25, 50, 95, 99):
        assert percentile(xs, q) == pytest.approx(qs[q - 1], rel=1e-9, abs=1e-6)


@given(st.lists(finite, min_size=1, max_size=60), st.floats(min_value=0, max_value=100))
def test_percentile_bounded_and_monotonic(xs: list[float], q: float) -> None:
    p = percentile(xs, q)
    assert min(xs) <= p <= max(xs)
    assert percentile(xs, min(100.0, q + 1)) >= p


def test_summarize() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"n": 3, "min": 1.0, "mean": 2.0, "p50": 2.0, "p95": 2.9, "p99": 2.98, "max": 3.0}
    assert summarize([]) == {"n": 0}


def test_slope_exact_line() -> None:
    xs = [1.0, 10.0, 50.0, 100.0]
    ys = [24000.0 + 48.5 * x for x in xs]
    m, b = linear_fit(xs, ys)
    assert m == pytest.approx(48.5)
    assert b == pytest.approx(24000.0)
    assert slope(xs, ys) == pytest.approx(48.5)


def test_slope_least_squares_by_hand() -> None:
    # points (0,1) (1,3) (2,2): mean x 1, mean y 2; sxy = (-1)(-1) + 0 + (1)(0) = 1; sxx = 2
    m, b = linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 2.0])
    assert m == pytest.approx(0.5)
    assert b == pytest.approx(1.5)


def test_slope_errors() -> None:
    with pytest.raises(ValueError):
        slope([1.0], [2.0])
    with pytest.raises(ValueError):
        slope([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError):
        slope([1.0, 2.0], [2.0])


@given(
    st.lists(st.integers(min_value=0, max_value=1000), min_size=2, max_size=20, unique=True),
    st.floats(min_value=-1e4, max_value=1e4),
    st.floats(min_value=-1e4, max_value=1e4),
)
def test_slope_recovers_any_line(xs: list[int], m: float, b: float) -> None:
    fx = [float(x) for x in xs]
    assert slope(fx, [m * x + b for x in fx]) == pytest.approx(m, rel=1e-6, abs=1e-6)


def test_parse_rfc3339_ns() -> None:
    assert parse_rfc3339_ns("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_rfc3339_ns("2026-11-22T00:14:35.721606002Z") == 1795306475_721606002
    assert parse_rfc3339_ns("2026-11-22T00:14:35.7216Z") == 1795306475_721600000
    assert parse_rfc3339_ns("2026-11-22T01:14:35.5+01:00") == 1795306475_500000000
    with pytest.raises(ValueError):
        parse_rfc3339_ns("2026-11-22 00:14:35Z")


def test_parse_event_time_ns() -> None:
    line = (
        "2026-11-22 00:14:35.722087497 +0000 UTC test /tasks/exit "
        '{"container_id":"e2","id":"e2","pid":29998,"exit_status":3}'
    )
    assert parse_event_time_ns(line) == 1795306475_722087497
    assert (
        parse_event_time_ns("2026-11-22 00:14:35 -0130 X ns /t {}")
        == (1795306475 + 5400) * 1_000_000_000
    )
    assert parse_event_time_ns("garbage") is None


def test_order_alternates() -> None:
    assert order(0, ["a", "b"]) == ["a", "b"]
    assert order(1, ["a", "b"]) == ["b", "a"]
    assert order(4, ["a", "b", "c"]) == ["b", "c", "a"]


# -- issue 14's goals, throughput, chunks --------------------------------------------------


def test_throughput_and_chunks() -> None:
    assert throughput(300, 10.0, 5.0) == 20.0
    assert throughput(0, 1.0, 1.0) is None
    assert throughput(5, 0.0, 0.0) is None
    assert chunks(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert chunks([], 8) == []
    with pytest.raises(ValueError):
        chunks(["a"], 0)


def test_goal_verdicts() -> None:
    faster = Goal("x", 9.0, 10.0, "ms", 1.0)
    assert faster.ratio == pytest.approx(0.9) and faster.met is True and faster.verdict == "met"
    equal = Goal("x", 10.0, 10.0, "ms", 1.0)
    assert equal.met is True  # "at or below"
    slower = Goal("x", 10.5, 10.0, "ms", 1.0)
    assert slower.met is False and slower.verdict == "MISSED"
    more = Goal("t", 24.0, 23.3, "ctr/s", 1.0, higher_is_better=True)
    assert more.met is True
    assert Goal("t", 21.3, 23.3, "ctr/s", 1.0, higher_is_better=True).met is False
    memory = Goal("pss", 24.9, 254.0, "MiB", 0.1)
    assert memory.met is True and Goal("pss", 26.0, 254.0, "MiB", 0.1).met is False
    missing = Goal("x", None, 10.0, "ms", 1.0)
    assert missing.ratio is None and missing.met is None and missing.verdict == "n/a"
    assert Goal("x", 1.0, 0.0, "ms", 1.0).ratio is None  # no division by zero
    report = Goal("cpu", 3.0, 2.0, "ms", None)
    assert report.met is None and report.verdict == "report" and report.ratio == 1.5
    d = slower.as_dict()
    assert d["ratio"] == 1.05 and d["met"] is False and d["runc_v2"] == 10.0


def _summary(p50: float, p95: float) -> dict[str, float]:
    return {"n": 10, "p50": p50, "p95": p95}


def test_goals_from_results() -> None:
    level = {
        "n": 300,
        "embed": {"run_ms": _summary(60, 70), "stop_delete_ms": _summary(40, 50)},
        "runc-v2": {"run_ms": _summary(55, 80), "stop_delete_ms": _summary(40, 45)},
    }
    results = {
        "scale": {
            "levels": [level],
            "throughput": {"embed": {"per_s": 21.3}, "runc-v2": {"per_s": 23.3}},
        },
        "exec": {
            "embed": {"summary": _summary(20, 30), "cpu_ms_per_exec": 6.0},
            "runc-v2": {"summary": _summary(25, 31), "cpu_ms_per_exec": 8.0},
        },
        "cri": {
            "embed": {"StartContainer": {"summary": _summary(40, 45)}},
            "runc-v2": {"StartContainer": {"summary": _summary(20, 29)}},
        },
        "memory": {
            "embed": [
                {"n": 10, "shim_pss_kib": 20 * 1024},
                {"n": 100, "shim_pss_kib": 25 * 1024, "shim_memfd_kib": 8 * 1024},
            ],
            "runc-v2": [
                {"n": 10, "shim_pss_kib": 30 * 1024},
                {"n": 100, "shim_pss_kib": 254 * 1024},
            ],
        },
        "exit": {
            "embed": {"latency_us": {"p99": 820.0}},
            "runc-v2": {"latency_us": {"p99": 1480.0}},
        },
    }
    by_name = {g.name: g for g in goals(results)}
    assert by_name["ctr run -d p50, N=300"].met is False
    assert by_name["ctr run -d p95, N=300"].met is True
    assert by_name["stop+delete p50, N=300"].met is True
    assert by_name["stop+delete p95, N=300"].met is False
    assert by_name["exec p50"].met is True and by_name["exec p95"].met is True
    assert by_name["start+teardown, 8 at a time"].met is False
    assert by_name["CRI StartContainer p50"].ratio == 2.0
    assert by_name["CRI RunPodSandbox p50"].verdict == "n/a"  # not measured: never met
    pss = by_name["shim PSS, N=100"]
    assert (pss.embed, pss.runc, pss.met) == (25.0, 254.0, True)
    held = by_name["shim PSS + memfds held, N=100"]  # the runc copy: reported beside it
    assert (held.embed, held.runc, held.verdict) == (33.0, 254.0, "report")
    assert by_name["exit -> event p99"].embed == pytest.approx(0.82)
    assert by_name["CPU per exec (user+sys)"].ratio == 0.75
    lines = goals_table([g.as_dict() for g in goals(results)])
    assert any("ctr run -d p50, N=300" in ln and "MISSED" in ln and "1.09" in ln for ln in lines)
    # judged: 4 scale, 2 exec, throughput, 2 StartContainer, PSS, exit (unmeasured: n/a)
    assert lines[-1] == "  6 of 11 goals met"


def test_process_tree_cpu_counts_reaped_children() -> None:
    """A child's CPU shows in its parent's counters once it has been waited for."""
    import os
    import subprocess
    import sys

    before = process_tree_cpu_s(os.getpid())
    subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True, timeout=120)
    assert process_tree_cpu_s(os.getpid()) - before >= 0.2
    assert process_tree_cpu_s(2**22 + 1) == 0.0  # no such process


def test_config_phases_and_scale() -> None:
    full = Config.make(False, None, None)
    assert full.phases == list(PHASES) and full.scale_ns == [10, 300]
    assert (full.scale_samples, full.cri_pods, full.cri_rounds, full.execs) == (150, 30, 2, 600)
    assert {"watch", "sandbox"} <= set(PHASES)  # one `make bench` measures everything
    assert (full.watch_rounds, full.watch_seconds, full.sandbox_pods) == (2, 10, 20)
    small = Config.make(True, None, None)
    assert small.watch_rounds == 1 and small.watch_seconds < 10 and small.sandbox_pods < 20
    quick = Config.make(True, None, None, [300, 10, 10], ["cri", "scale"])
    assert quick.scale_ns == [10, 300] and quick.phases == ["scale", "cri"]  # run in order
    with pytest.raises(ValueError, match="unknown phase"):
        Config.make(True, None, None, None, ["memory", "bogus"])


def test_strict_goal_is_below_not_at() -> None:
    assert Goal("m", 9.9, 10.0, "MiB", 1.0, strict=True).met is True
    assert Goal("m", 10.0, 10.0, "MiB", 1.0, strict=True).met is False  # "below"
    assert Goal("s", 10.0, 10.0, "/s", 1.0, higher_is_better=True, strict=True).met is False
    assert Goal("c", 3.0, 0.0, "%", None).verdict == "report"  # baseline 0: still reported


def _sandbox(run_p50: float, pod_kib: int, sandbox_pss: int, cgroup: int) -> dict[str, Any]:
    ms = {"p50": run_p50, "p95": run_p50 * 2, "max": run_p50 * 3}
    return {
        "run_ms": ms,
        "stop_ms": ms,
        "remove_ms": ms,
        "pod_kib": pod_kib,
        "sandbox_pss_kib": sandbox_pss,
        "cgroup_kib": cgroup,
    }


def test_watch_sandbox_goals() -> None:
    results = {
        "watch": {
            "rate_target": 5000,
            "speed_forks_per_s_off": 4000.0,
            "speed_forks_per_s_on": 3500.0,  # 0.875 < 0.9: slowed beyond noise
            "forks_per_s_off": 4990.0,
            "forks_per_s_on": 4980.0,
            "daemon_cpu_pct_off": 0.0,
            "daemon_cpu_pct_on": 12.5,
        },
        "sandbox": {
            "handlers": {
                "runc": _sandbox(300.0, 3000, 400, 200),  # a pause container: 600 KiB
                "embed": _sandbox(200.0, 900, 300, 200),
                "embed-shim": _sandbox(150.0, 700, 100, 0),  # 0.5 of runc's; 700 > 600
            }
        },
    }
    by = {g.name: g for g in watch_sandbox_goals(results)}
    speed = by["watch: container forks/s flat out"]
    assert speed.ratio == pytest.approx(0.875) and speed.verdict == "MISSED"
    assert by["watch: forks/s at 5000/s paced"].verdict == "met"
    cpu = by["watch: daemon CPU at 5000 forks/s"]
    assert (cpu.embed, cpu.met, cpu.verdict) == (12.5, None, "report")
    run = by["embed-shim: RunPodSandbox p50"]
    assert run.ratio == 0.5 and run.verdict == "met" and run.baseline == "runc pod"
    assert by["embed-shim: StopPodSandbox p50"].verdict == "report"
    mem = by["embed-shim: a pod's memory"]
    assert mem.runc == pytest.approx(600 / 1024) and mem.met is False
    results["sandbox"]["handlers"]["embed-shim"]["run_ms"]["p50"] = 181.0  # 0.603 > 0.6
    results["sandbox"]["handlers"]["embed-shim"]["pod_kib"] = 599
    by = {g.name: g for g in watch_sandbox_goals(results)}
    assert by["embed-shim: RunPodSandbox p50"].verdict == "MISSED"
    assert by["embed-shim: a pod's memory"].verdict == "met"
    lines = goals_table([g.as_dict() for g in by.values()], "t", ("ours", "baseline"))
    assert any("a pod's memory" in ln and "< 1" in ln and "vs pause ctr" in ln for ln in lines)
    assert lines[-1] == "  2 of 4 goals met"  # speed and RunPodSandbox missed


def test_sandbox_goal_names_the_phase_handler() -> None:
    from integration.bench.goals import SANDBOXER
    from integration.bench.sandboxcost import HANDLERS
    from integration.cri.node import SHIM_SANDBOXER

    assert SANDBOXER == SHIM_SANDBOXER and {"runc", SANDBOXER} <= set(HANDLERS)


def test_watch_sandbox_goals_unmeasured_or_skipped() -> None:
    for results in ({}, {"sandbox": {"skipped": "no containerd 2.2.7"}}):
        gs = watch_sandbox_goals(results)
        assert gs and all(g.met is None and g.verdict == "n/a" for g in gs)


def test_held_memfds_are_counted_once() -> None:
    fd = os.memfd_create("held", os.MFD_CLOEXEC)
    dup = os.dup(fd)
    try:
        before = held_memfd_kib([os.getpid()])
        os.write(fd, b"x" * (1 << 20))
        assert held_memfd_kib([os.getpid(), os.getpid()]) - before == 1024  # one MiB, once
    finally:
        os.close(dup)
        os.close(fd)
