"""The goals of issue 14, side by side: each figure of ours against runc-v2's, its ratio and
whether it is met (pure; tested in tests/test_bench_stats.py).

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
        return r >= self.bound if self.higher_is_better else r <= self.bound

    @property
    def verdict(self) -> str:
        if self.bound is None:
            return "report" if self.ratio is not None else "n/a"
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
            "met": self.met,
            "verdict": self.verdict,
        }


def _get(d: Any, *keys: str | int) -> Any:
    for k in keys:
        try:
            d = d[k]
        except (KeyError, IndexError, TypeError):
            return None
    return d


def _pair(results: dict[str, Any], *path: str | int) -> tuple[Any, Any]:
    """The same figure for both runtimes: ``path`` with the runtime key after its first part."""
    head, rest = path[0], path[1:]
    return _get(results, head, EMBED, *rest), _get(results, head, RUNC, *rest)


def goals(results: dict[str, Any]) -> list[Goal]:
    out: list[Goal] = []
    for level in _get(results, "scale", "levels") or []:
        n = level.get("n")
        for key, label in (("run_ms", "ctr run -d"), ("stop_delete_ms", "stop+delete")):
            for stat in ("p50", "p95"):
                e, r = _get(level, EMBED, key, stat), _get(level, RUNC, key, stat)
                out.append(Goal(f"{label} {stat}, N={n}", e, r, "ms", 1.0))
    for stat in ("p50", "p95"):
        e, r = _pair(results, "exec", "summary", stat)
        out.append(Goal(f"exec {stat}", e, r, "ms", 1.0))
    e, r = (_get(results, "scale", "throughput", rt, "per_s") for rt in (EMBED, RUNC))
    out.append(Goal("start+teardown, 8 at a time", e, r, "ctr/s", 1.0, higher_is_better=True))
    for op in ("RunPodSandbox", "StartContainer", "StopContainer", "StopPodSandbox"):
        for stat in ("p50", "p95"):
            e, r = _pair(results, "cri", op, "summary", stat)
            out.append(Goal(f"CRI {op} {stat}", e, r, "ms", 1.0))
    mem = results.get("memory") or {}
    both = {x["n"] for x in mem.get(EMBED, [])} & {x["n"] for x in mem.get(RUNC, [])}
    if both:
        n = max(both)
        e, r = (
            next(x["shim_pss_kib"] / 1024 for x in mem[rt] if x["n"] == n) for rt in (EMBED, RUNC)
        )
        out.append(Goal(f"shim PSS, N={n}", e, r, "MiB", MEMORY_BOUND))
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


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The goals as table lines (from their JSON form, so a saved run prints the same)."""
    lines = [
        "Goals of issue 14 (ratio = embed / runc-v2)",
        f"  {'figure':<34} {'embed':>9} {'runc-v2':>9} {'unit':<5} {'ratio':>6} "
        f"{'goal':>8}  verdict",
    ]
    for g in rows:
        bound = g.get("bound")
        goal = "-" if bound is None else f"{'>=' if g.get('higher_is_better') else '<='} {bound:g}"
        lines.append(
            f"  {g['name']:<34} {_num(g.get('embed')):>9} {_num(g.get('runc_v2')):>9} "
            f"{g['unit']:<5} {_num(g.get('ratio')):>6} {goal:>8}  {g['verdict']}"
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
    ax.set_xlabel("embed / runc-v2 (log); black tick = goal")
    ax.set_title("Issue 14 goals: green met, red missed, grey reported", fontsize=10)
