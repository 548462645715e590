"""The goals of issue 14, side by side: each figure of ours against runc-v2's, its ratio and
whether it is met (pure; tested in tests/test_bench_stats.py).  The goals of issues 15
(``watch``'s cost) and 17 (pod sandboxes) follow the same rules against their own baselines
(:func:`watch_sandbox_goals`).

ratio = embed / runc-v2.  A latency, memory or CPU goal is met when the ratio is at most its
bound (1.0: at or below runc-v2's; 0.1 for memory), a throughput goal when it is at least 1.0.
A goal whose figure is missing on either side is "n/a", never met.  CPU per exec is reported
with its ratio but has no bound (the issue asks for the figure, not a target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EMBED = "embed"
RUNC = "runc-v2"
MEMORY_BOUND = 0.1


@dataclass
class Goal:
    name: str
    embed: float | None
    runc: float | None
    unit: str
    bound: float | None  # None: reported only
    higher_is_better: bool = False
    strict: bool = False  # "below", not "at or below"
    baseline: str = RUNC  # what ``runc`` holds (the ratio's denominator)

    @property
    def ratio(self) -> float | None:
        if self.embed is None or self.runc is None or self.runc <= 0:
            return None
        return self.embed / self.runc

    @property
    def met(self) -> bool | None:
        r = self.ratio
        if r is None or self.bound is None:
            return None
        if self.higher_is_better:
            return r > self.bound if self.strict else r >= self.bound
        return r < self.bound if self.strict else r <= self.bound

    @property
    def verdict(self) -> str:
        if self.bound is None:
            return "report" if self.embed is not None else "n/a"
        return {True: "met", False: "MISSED", None: "n/a"}[self.met]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "embed": self.embed,
            "runc_v2": self.runc,
            "unit": self.unit,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "bound": self.bound,
            "higher_is_better": self.higher_is_better,
            "strict": self.strict,
            "baseline": self.baseline,
            "met": self.met,
            "verdict": self.verdict,
        }


def dig(d: Any, *keys: str | int) -> Any:
    """``d[k1][k2]...``, or None where a key is missing (results of a partial run)."""
    for k in keys:
        try:
            d = d[k]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def _pair(results: dict[str, Any], *path: str | int) -> tuple[Any, Any]:
    """The same figure for both runtimes: ``path`` with the runtime key after its first part."""
    head, rest = path[0], path[1:]
    return dig(results, head, EMBED, *rest), dig(results, head, RUNC, *rest)


def goals(results: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    for level in dig(results, "scale", "levels") or []:
        n = level.get("n")
        for key, label in (("run_ms", "ctr run -d"), ("stop_delete_ms", "stop+delete")):
            for stat in ("p50", "p95"):
                e, r = dig(level, EMBED, key, stat), dig(level, RUNC, key, stat)
                out.append(Goal(f"{label} {stat}, N={n}", e, r, "ms", 1.0))
    for stat in ("p50", "p95"):
        e, r = _pair(results, "exec", "summary", stat)
        out.append(Goal(f"exec {stat}", e, r, "ms", 1.0))
    e, r = (dig(results, "scale", "throughput", rt, "per_s") for rt in (EMBED, RUNC))
    out.append(Goal("start+teardown, 8 at a time", e, r, "ctr/s", 1.0, higher_is_better=True))
    for op in ("RunPodSandbox", "StartContainer", "StopContainer", "StopPodSandbox"):
        for stat in ("p50", "p95"):
            e, r = _pair(results, "cri", op, "summary", stat)
            out.append(Goal(f"CRI {op} {stat}", e, r, "ms", 1.0))
    e, r = _pair(results, "cri", "first_pod_ms")
    out.append(Goal("CRI first pod (starts our daemon)", e, r, "ms", None))
    mem = results.get("memory") or {}
    both = {x["n"] for x in mem.get(EMBED, [])} & {x["n"] for x in mem.get(RUNC, [])}
    if both:
        n = max(both)
        e, r = (
            next(x["shim_pss_kib"] / 1024 for x in mem[rt] if x["n"] == n) for rt in (EMBED, RUNC)
        )
        out.append(Goal(f"shim PSS, N={n}", e, r, "MiB", MEMORY_BOUND))
        # Our sealed runc copy is shmem that no process maps, so PSS does not show it.
        e, r = (
            next(
                (x["shim_pss_kib"] + x.get("shim_memfd_kib", 0)) / 1024
                for x in mem[rt]
                if x["n"] == n
            )
            for rt in (EMBED, RUNC)
        )
        out.append(Goal(f"shim PSS + memfds held, N={n}", e, r, "MiB", None))
    else:
        out.append(Goal("shim PSS", None, None, "MiB", MEMORY_BOUND))
    e, r = _pair(results, "exit", "latency_us", "p99")
    out.append(
        Goal(
            "exit -> event p99",
            None if e is None else e / 1000,
            None if r is None else r / 1000,
            "ms",
            1.0,
        )  # fmt: skip
    )
    e, r = _pair(results, "exec", "cpu_ms_per_exec")
    out.append(Goal("CPU per exec (user+sys)", e, r, "ms", None))
    return out


#: issue 15: the container's flat-out fork rate with a watcher at least this share of its rate
#: without one ("unchanged within noise"; two rounds on a loaded 2-core VM move it ~5 %)
WATCH_SPEED_BOUND = 0.9
#: issue 17: ours with the Sandbox API, RunPodSandbox p50 at most this share of runc's handler's
SANDBOX_RUN_BOUND = 0.6
SANDBOXER = "embed-shim"  # integration.cri.node.SHIM_SANDBOXER (goals.py stays pure)


def watch_sandbox_goals(results: dict[str, Any]) -> list[Goal]:
    """Issue 15's and 17's goals from the ``watch`` and ``sandbox`` phases' results."""
    w = results.get("watch") or {}
    nw = "no watcher"
    out = [
        Goal(
            "watch: container forks/s flat out",
            w.get("speed_forks_per_s_on"),
            w.get("speed_forks_per_s_off"),
            "/s",
            WATCH_SPEED_BOUND,
            higher_is_better=True,
            baseline=nw,
        ),
        Goal(
            f"watch: forks/s at {w.get('rate_target', '-')}/s paced",
            w.get("forks_per_s_on"),
            w.get("forks_per_s_off"),
            "/s",
            WATCH_SPEED_BOUND,
            higher_is_better=True,
            baseline=nw,
        ),
        Goal(
            f"watch: daemon CPU at {w.get('rate_target', '-')} forks/s",
            w.get("daemon_cpu_pct_on"),
            w.get("daemon_cpu_pct_off"),
            "%",
            None,
            baseline=nw,
        ),
    ]
    h = dig(results, "sandbox", "handlers") or {}
    sb, runc = h.get(SANDBOXER) or {}, h.get("runc") or {}
    for op, key, bound in (
        ("RunPodSandbox", "run_ms", SANDBOX_RUN_BOUND),
        ("StopPodSandbox", "stop_ms", None),
        ("RemovePodSandbox", "remove_ms", None),
    ):
        out.append(
            Goal(
                f"{SANDBOXER}: {op} p50",
                dig(sb, key, "p50"),
                dig(runc, key, "p50"),
                "ms",
                bound,
                baseline="runc pod",
            )
        )
    pause = None
    if runc.get("sandbox_pss_kib") is not None and runc.get("cgroup_kib") is not None:
        pause = (runc["sandbox_pss_kib"] + runc["cgroup_kib"]) / 1024
    ours = sb.get("pod_kib")
    out.append(
        Goal(
            f"{SANDBOXER}: a pod's memory",
            None if ours is None else ours / 1024,
            pause,
            "MiB",
            1.0,
            strict=True,
            baseline="pause ctr",
        )
    )
    return out


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _bound(g: dict[str, Any]) -> str:
    bound = g.get("bound")
    if bound is None:
        return "-"
    op = (">" if g.get("higher_is_better") else "<") + ("" if g.get("strict") else "=")
    return f"{op} {bound:g}"


def table(
    rows: list[dict[str, Any]],
    title: str = "Goals of issue 14 (ratio = embed / runc-v2)",
    columns: tuple[str, str] = ("embed", "runc-v2"),
) -> list[str]:
    """The goals as table lines (from their JSON form, so a saved run prints the same)."""
    width = max([34, *(len(g["name"]) for g in rows)])
    base = any(g.get("baseline", RUNC) != RUNC for g in rows)
    lines = [
        title,
        f"  {'figure':<{width}} {columns[0]:>9} {columns[1]:>9} {'unit':<5} {'ratio':>6} "
        f"{'goal':>8}  verdict" + ("    baseline" if base else ""),
    ]
    for g in rows:
        lines.append(
            f"  {g['name']:<{width}} {_num(g.get('embed')):>9} {_num(g.get('runc_v2')):>9} "
            f"{g['unit']:<5} {_num(g.get('ratio')):>6} {_bound(g):>8}  "
            + (f"{g['verdict']:<7} vs {g.get('baseline')}" if base else g["verdict"])
        )
    met = sum(1 for g in rows if g.get("met") is True)
    judged = sum(1 for g in rows if g.get("met") is not None)
    lines.append(f"  {met} of {judged} goals met")
    return lines


def plot(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Ratios as horizontal bars (green met, red missed, grey reported), each goal's bound a
    black tick."""
    shown = [g for g in rows if g.get("ratio") is not None]
    ys = list(range(len(shown)))
    colors = [{True: "tab:green", False: "tab:red", None: "tab:gray"}[g.get("met")] for g in shown]
    ax.barh(ys, [g["ratio"] for g in shown], color=colors)
    for y, g in zip(ys, shown, strict=True):
        if g.get("bound") is not None:
            ax.plot([g["bound"]] * 2, [y - 0.4, y + 0.4], color="black", linewidth=1.5)
        ax.text(g["ratio"], y, f" {g['ratio']:.2f}", va="center", fontsize=7)
    ax.set_yticks(ys, [g["name"] for g in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", alpha=0.3)
    ax.set_xlabel("ours / baseline (log; runc-v2, no watcher, runc pod, pause); black tick = goal")
    ax.set_title("Goals of issues 14, 15, 17: green met, red missed, grey reported", fontsize=10)
