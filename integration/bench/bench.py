"""Benchmark io.containerd.embed.v1 (one daemon per containerd) against io.containerd.runc.v2
(one shim per container) on one private containerd.

    python -m integration.bench.bench [--quick] [--out DIR]

Phases (the two runtimes are interleaved inside every phase, so drift hits both alike):

memory     for N in 1, 10, 50, 100: start N ``sleep`` containers (4 at a time), wait until all
           are RUNNING, sum PSS and RSS of the shim processes, read containerd's RSS, tear
           them down (4 at a time).  Marginal memory = least-squares slope of PSS over N.
start      sequential ``ctr run -d`` wall time, and ``ctr task delete -f`` + ``ctr container
           delete`` wall time; the floor is ``runc run -d`` / ``runc kill`` + ``runc delete``
           of the same OCI spec without containerd.
exit       a container blocks in ``read x < /fifos/<id>``; we write the FIFO at t0 and time
           the ``/tasks/exit`` event reaching a ``ctr events`` subscriber.
exec       ``ctr task exec --exec-id e<i> <id> true`` wall time, and the CPU time of the shim
           processes per exec (``cpu_per_exec``).
scale      ``ctr run -d`` and stop+delete with N = 10 and 300 running; throughput 8 at a time
           (integration/bench/scale.py).
cri        RunPodSandbox, StartContainer, StopContainer, StopPodSandbox per CRI handler
           (integration/bench/cri.py).

The goals of issue 14 (integration/bench/goals.py) are printed with their ratios to runc-v2.

Results: a JSON file and a PNG next to it (default ``bench/out/``), and a table on stdout.
Everything runs inside a harness :class:`~integration.harness.Containerd` whose
``cleanup()`` removes every container, shim, mount and cgroup, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import ctypes
import datetime
import errno
import json
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from integration.bench import goals
from integration.bench.common import (
    EMBED,
    RUNC,
    SLEEP,
    ms,
    order,
    process_cpu_s,
    process_tree_cpu_s,
    slope,
    summarize,
    system_cpu_s,
)
from integration.bench.cri import phase_cri
from integration.bench.goals import dig as _get
from integration.bench.sandboxcost import phase_sandbox
from integration.bench.scale import phase_scale
from integration.bench.watchcost import phase_watch
from integration.harness import (
    EMBED_RUNTIME,
    RUNC_RUNTIME,
    TASK_DIR,
    Containerd,
    HarnessError,
    all_processes,
    busybox_rootfs,
    parse_event,
    reap_stale,
    remove_shared_dirs,
    shared_dirs,
    task_list,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "bench" / "out"
EMBED_SHIM = "containerd-shim-embed-v1"
RUNC_SHIM = "containerd-shim-runc-v2"
EXIT_CODE = 3

FLOOR = "runc-floor"
RUNTIMES = {EMBED: EMBED_RUNTIME, RUNC: RUNC_RUNTIME}
PHASES = ("memory", "start", "exit", "exec", "scale", "cri", "watch", "sandbox")

#: our daemon lingers 10 s (EMBEDSHIM_IDLE_EXIT) after its last task; wait this long for it
IDLE_WAIT = 30.0

# Targets (the brief): PSS ratio, marginal memory.
PSS_RATIO_TARGET = 20.0
MARGINAL_TARGET_KIB = 200.0

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------------------------
# statistics (pure; tested in tests/test_bench_stats.py)


def _offset_seconds(offset: str) -> int:
    """``+0000`` / ``-07:00`` / ``Z`` as seconds east of UTC."""
    if offset in ("Z", "z", ""):
        return 0
    sign = -1 if offset[0] == "-" else 1
    digits = offset[1:].replace(":", "")
    if len(digits) != 4 or not digits.isdigit():
        raise ValueError(f"bad UTC offset {offset!r}")
    return sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)


def _to_ns(date: str, clock: str, offset: str) -> int:
    whole, _, frac = clock.partition(".")
    t = datetime.datetime.strptime(f"{date} {whole}", "%Y-%m-%d %H:%M:%S")
    secs = calendar.timegm(t.timetuple()) - _offset_seconds(offset)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fraction in {clock!r}")
    return secs * 1_000_000_000 + int((frac + "000000000")[:9])


def parse_rfc3339_ns(s: str) -> int:
    """``2026-11-22T00:14:35.721606002Z`` (protobuf JSON timestamps) as Unix nanoseconds."""
    date, sep, rest = s.partition("T")
    if not sep:
        raise ValueError(f"not an RFC 3339 time: {s!r}")
    if rest.endswith(("Z", "z")):
        return _to_ns(date, rest[:-1], "Z")
    for i in range(len(rest) - 1, 0, -1):
        if rest[i] in "+-":
            return _to_ns(date, rest[:i], rest[i:])
    raise ValueError(f"no UTC offset in {s!r}")


def parse_event_time_ns(line: str) -> int | None:
    """The envelope timestamp of a ``ctr events`` line
    (``2026-11-22 00:14:35.722087497 +0000 UTC ...``) as Unix nanoseconds."""
    parts = line.split(" ", 3)
    if len(parts) < 3:
        return None
    try:
        return _to_ns(parts[0], parts[1], parts[2])
    except ValueError:
        return None


# --------------------------------------------------------------------------------------
# /proc


def smaps_rollup_kib(pid: int) -> tuple[int, int, int] | None:
    """(PSS, RSS, USS) of ``pid`` in KiB from /proc/PID/smaps_rollup (USS = private clean +
    private dirty: what its exit would free); None if it is gone."""
    vals = {"Pss:": -1, "Rss:": -1, "Private_Clean:": -1, "Private_Dirty:": -1}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(" ")
                if key in vals:
                    vals[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if min(vals.values()) < 0:
        return None
    return vals["Pss:"], vals["Rss:"], vals["Private_Clean:"] + vals["Private_Dirty:"]


def held_memfd_kib(pids: list[int]) -> int:
    """KiB in the memfds ``pids`` hold, each counted once: our daemon's sealed runc copy
    (shim/oci/sealedrunc.py) is shmem no process maps, so no PSS shows it."""
    seen: dict[tuple[int, int], int] = {}
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            path = os.path.join(fd_dir, fd)
            try:
                if not os.readlink(path).startswith("/memfd:"):
                    continue
                st = os.stat(path)
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512 // 1024
    return sum(seen.values())


def shim_cpu_with_children_s(runtime: str, address: str) -> float:
    """CPU seconds of a runtime's long-lived shim processes and everything they reaped: for
    ours the daemon and its keeper (runc, the exec'd processes end up in the
    daemon's children's counters), for runc-v2 every shim (runc, the exec'd processes).
    Helpers still running are not in it: sample when none is (no exec in flight)."""
    total = 0.0
    for pid in shim_pids(runtime, address):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                last = f.read().rstrip(b"\0").rsplit(b"\0", 1)[-1]
        except OSError:
            continue
        if runtime == RUNC or last in (b"daemon", b"keeper"):
            total += process_tree_cpu_s(pid)
    return total


def _address_arg(cmdline: Sequence[str]) -> str:
    for i, a in enumerate(cmdline[:-1]):
        if a in ("-address", "--address"):
            return cmdline[i + 1]
    return ""


def shim_pids(runtime: str, address: str) -> list[int]:
    """The shim processes of one containerd (by its gRPC ``address``).

    embed: the daemon (``containerd-shim-embed-v1 ... daemon`` with ``-address <address>``),
    its keeper (its parent, ``... keeper``), and every helper below it (logging programs,
    pod holders): its descendants in its own PID namespace, less transient ``runc``
    calls.  Container processes live in PID
    namespaces of their own and never count.  runc-v2: every ``containerd-shim-runc-v2 ...
    -address <address>``."""
    procs = [p for p in all_processes() if not p.zombie]
    if runtime == RUNC:
        return sorted(
            p.pid
            for p in procs
            if p.cmdline
            and os.path.basename(p.cmdline[0]) == RUNC_SHIM
            and _address_arg(p.cmdline) == address
        )
    daemons = {
        p.pid
        for p in procs
        if any(os.path.basename(a) == EMBED_SHIM for a in p.cmdline[:3])  # [python, -SE,] script
        and "daemon" in p.cmdline
        and _address_arg(p.cmdline) == address
    }
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    by_pid = {p.pid: p for p in procs}
    out, todo = set(daemons), [(d, _pidns(d)) for d in daemons]
    for d in daemons:  # its keeper (holds the connections across a crash): ours too
        parent = by_pid.get(by_pid[d].ppid)
        if parent is not None and parent.cmdline and parent.cmdline[-1] == "keeper":
            out.add(parent.pid)
    while todo:
        parent, ns = todo.pop()
        for c in children.get(parent, []):
            todo.append((c, ns))
            cmd = by_pid[c].cmdline
            if ns and _pidns(c) == ns and cmd and os.path.basename(cmd[0]) != "runc":
                out.add(c)
    return sorted(out)


def _pidns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------
# progress, signals


class Progress:
    """One status line on stderr (rewritten in place on a terminal; every few seconds
    otherwise)."""

    def __init__(self, stream: IO[str] = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._last = -1e9
        self._shown = False

    def __call__(self, msg: str, force: bool = False) -> None:
        now = time.monotonic()
        line = f"[{now - self.t0:6.1f}s] {msg}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + line[:width])
            self.stream.flush()
            self._shown = True
        elif force or now - self._last >= 5.0:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last = now

    def clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def note(self, msg: str) -> None:
        """A line that stays."""
        self.clear()
        self.stream.write(msg + "\n")
        self.stream.flush()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------
# events


@dataclass
class Event:
    arrival_ns: int
    envelope_ns: int | None
    namespace: str
    topic: str
    payload: dict[str, Any]


class EventStream:
    """``ctr events`` read from the main thread (select + os.read), each chunk stamped with
    time.time_ns() as it arrives."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self._buf = b""
        self.pending: list[Event] = []

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return
        data = os.read(self.fd, 1 << 16)
        now = time.time_ns()
        if not data:
            raise HarnessError(f"ctr events exited ({self.proc.poll()})")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            parsed = parse_event(line)
            if parsed is None:
                continue
            ns, topic, payload = parsed
            try:
                body = json.loads(payload) if payload else {}
            except json.JSONDecodeError:
                body = {}
            self.pending.append(
                Event(
                    now,
                    parse_event_time_ns(line),
                    ns,
                    topic,
                    body if isinstance(body, dict) else {},
                )
            )

    def wait(self, pred: Callable[[Event], bool], timeout: float) -> Event | None:
        """The first pending or arriving event matching ``pred`` (removed from pending);
        None on timeout."""
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.pending):
                if pred(self.pending[i]):
                    return self.pending.pop(i)
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._pump(left)

    def drain(self) -> None:
        self._pump(0)
        self.pending.clear()


# --------------------------------------------------------------------------------------
# the runc floor: runc without containerd, from a child subreaper


def floor_helper(runc_root: str) -> int:
    """``--floor-helper ROOT``: a subreaper that runs/removes runc containers on request
    (one JSON line in, one out) and times the runc calls itself.  It exists because a
    detached container's init is reparented to the nearest subreaper, and PID 1 of some
    machines never reaps: ``runc kill``/``delete`` would wait on a zombie forever."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    runc = ["runc", "--root", runc_root]
    pids: dict[str, int] = {}
    bundles: dict[str, str] = {}

    def remove(cid: str) -> None:
        subprocess.run([*runc, "kill", cid, "KILL"], capture_output=True, timeout=30)
        pid = pids.pop(cid, 0)
        if pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        subprocess.run([*runc, "delete", cid], capture_output=True, timeout=30, check=True)

    for line in sys.stdin:
        req = json.loads(line)
        cid = str(req["id"])
        resp: dict[str, Any]
        try:
            t0 = time.perf_counter()
            if req["op"] == "run":
                bundle = str(req["bundle"])
                bundles[cid] = bundle
                with open(os.path.join(bundle, "runc.err"), "w") as err:
                    r = subprocess.run(
                        [
                            *runc,
                            "run",
                            "-d",
                            "--pid-file",
                            os.path.join(bundle, "pid"),
                            "--bundle",
                            bundle,
                            cid,
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        cwd=bundle,
                        timeout=30,
                    )
                dt = time.perf_counter() - t0
                if r.returncode:
                    with open(os.path.join(bundle, "runc.err")) as f:
                        raise RuntimeError(f"runc run exited {r.returncode}: {f.read().strip()}")
                with open(os.path.join(bundle, "pid")) as f:
                    pids[cid] = int(f.read())
            else:
                remove(cid)
                dt = time.perf_counter() - t0
            resp = {"ok": True, "s": dt}
        except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as e:
            resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()
    for cid in list(pids):
        with contextlib.suppress(Exception):
            remove(cid)
    return 0


class Floor:
    """The bench's side of :func:`floor_helper`."""

    def __init__(self, c: Containerd) -> None:
        self.root = os.path.join(c.tmp, "runc-floor")
        self.bundles = os.path.join(c.tmp, "floor")
        os.makedirs(self.bundles, exist_ok=True)
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-m", "integration.bench.bench", "--floor-helper", self.root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
            env=c.env,
        )

    def _call(self, req: dict[str, str]) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise HarnessError(f"floor helper exited ({self.proc.poll()})")
        resp = json.loads(line)
        if not resp["ok"]:
            raise HarnessError(f"floor {req['op']} {req['id']}: {resp['error']}")
        return float(resp["s"])

    def run(self, cid: str, spec: dict[str, Any], cgroup: str) -> float:
        bundle = os.path.join(self.bundles, cid)
        os.makedirs(bundle, exist_ok=True)
        spec = json.loads(json.dumps(spec))
        spec["process"]["args"] = list(SLEEP)
        spec["process"]["terminal"] = False
        spec["linux"]["cgroupsPath"] = cgroup
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        return self._call({"op": "run", "id": cid, "bundle": bundle})

    def rm(self, cid: str) -> float:
        return self._call({"op": "rm", "id": cid})

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    quick: bool
    ns: list[int]
    exits: int
    seq: int
    execs: int
    scale_ns: list[int]
    scale_samples: int
    cri_pods: int
    cri_rounds: int = 1  # CRI phase: rounds of cri_pods pods (samples: rounds x pods)
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    concurrency: int = 4
    exit_batch: int = 10
    settle: float = 1.0
    watch_seconds: int = 10  # watch phase: seconds per paced round, rounds, flat-out forks
    watch_rounds: int = 2
    watch_speed_forks: int = 20000
    sandbox_pods: int = 20  # sandbox phase: pods per handler

    @classmethod
    def make(
        cls,
        quick: bool,
        ns: list[int] | None,
        exits: int | None,
        scale_ns: list[int] | None = None,
        phases: list[str] | None = None,
    ) -> Config:
        if quick:
            c = cls(True, [1, 5, 10], 20, 10, 20, [10, 30], 8, 4, settle=0.5)
            c.watch_seconds, c.watch_rounds, c.watch_speed_forks, c.sandbox_pods = 4, 1, 5000, 3
        else:
            # 150 runs per N and two rounds of 30 pods (60 RunPodSandbox, 120 StartContainer):
            # the p95 of 60 runs (of 30 pods) moved from 0.92 to 1.05 of runc-v2's between
            # four runs of one build, while all 240 runs pooled put ours below at every
            # quantile.  600 execs: an exec's time spreads over 15-47 ms here in two modes (see
            # the README) and its p50 sits between them, so it moves with the slow mode's
            # share, which differed by 0.04 between the runtimes within one run of 300
            c = cls(False, [1, 10, 50, 100], 100, 50, 600, [10, 300], 150, 30, cri_rounds=2)
        if ns:
            c.ns = sorted(set(ns))
        if exits:
            c.exits = exits
        if scale_ns:
            c.scale_ns = sorted(set(scale_ns))
        if phases:
            unknown = set(phases) - set(PHASES)
            if unknown:
                raise ValueError(f"unknown phase(s): {', '.join(sorted(unknown))}")
            c.phases = [p for p in PHASES if p in phases]
        return c


@dataclass
class Bench:
    c: Containerd
    cfg: Config
    progress: Progress
    rootfs: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    pool: ThreadPoolExecutor | None = None

    # -- ctr helpers --------------------------------------------------------------

    def error(self, msg: str) -> None:
        msg = " ".join(msg.split())[:400]
        self.errors.append(msg)
        self.progress.note(f"  ! {msg}")

    def start_one(self, rt: str, cid: str, *cmd: str, extra: Sequence[str] = ()) -> float | None:
        """``ctr run -d`` of a busybox container; its wall time, or None if it failed."""
        args = self.c.run_args(RUNTIMES[rt], self.rootfs, cid, *cmd, detach=True, extra=extra)
        t0 = time.perf_counter()
        r = self.c.ctr(*args, check=False, timeout=120)
        dt = time.perf_counter() - t0
        if r.returncode:
            self.error(f"{rt} ctr run {cid}: {r.stderr.strip() or r.stdout.strip()}")
            return None
        return dt

    def teardown_one(self, cid: str) -> float | None:
        """``ctr task delete -f`` (SIGKILL, wait, delete) then ``ctr container delete``."""
        t0 = time.perf_counter()
        r = self.c.ctr("task", "delete", "-f", cid, check=False, timeout=120)
        r2 = self.c.ctr("container", "delete", cid, check=False, timeout=120)
        dt = time.perf_counter() - t0
        if r.returncode or r2.returncode:
            self.error(f"teardown {cid}: {(r.stderr + r2.stderr).strip()}")
            return None
        return dt

    def parallel(
        self, fn: Callable[[str], float | None], ids: Sequence[str], what: str
    ) -> tuple[list[float], float]:
        """``fn`` over ``ids``, ``concurrency`` at a time: (per-call seconds, wall seconds)."""
        assert self.pool is not None
        t0 = time.perf_counter()
        futures: list[Future[float | None]] = [self.pool.submit(fn, i) for i in ids]
        times: list[float] = []
        for k, f in enumerate(futures, 1):
            dt = f.result()
            if dt is not None:
                times.append(dt)
            self.progress(f"{what}: {k}/{len(ids)}")
        return times, time.perf_counter() - t0

    def wait_running(self, ids: Sequence[str], timeout: float) -> int:
        """Wait until every task in ``ids`` is RUNNING; the number that are."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            try:
                tasks = task_list(self.c)
            except (subprocess.SubprocessError, HarnessError) as e:
                self.error(f"ctr task ls: {e}")
                tasks = {}
            n = sum(1 for i in want if tasks.get(i, (0, ""))[1] == "RUNNING")
            if n == len(want) or time.monotonic() > deadline:
                return n
            time.sleep(0.2)

    def leftover_tasks(self) -> list[str]:
        try:
            return list(task_list(self.c))
        except (subprocess.SubprocessError, HarnessError):
            return []

    # -- memory -------------------------------------------------------------------

    def measure(self, rt: str) -> dict[str, Any]:
        """Median of 3 samples of the shim processes' PSS/RSS/USS sums and containerd's
        RSS."""
        samples: list[tuple[int, int, int, int, int]] = []
        pids: list[int] = []
        for k in range(3):
            if k:
                time.sleep(0.25)
            pids = shim_pids(rt, self.c.address)
            pss = rss = uss = 0
            for pid in pids:
                m = smaps_rollup_kib(pid)
                if m is not None:
                    pss, rss, uss = pss + m[0], rss + m[1], uss + m[2]
            ctrd = smaps_rollup_kib(self.c.pid or 0)
            samples.append((pss, rss, uss, len(pids), ctrd[1] if ctrd else 0))
        samples.sort()
        pss, rss, uss, nprocs, ctrd_rss = samples[1]
        return {
            "shim_pss_kib": pss,
            "shim_memfd_kib": held_memfd_kib(pids),
            "shim_rss_kib": rss,
            "shim_uss_kib": uss,
            "shim_procs": nprocs,
            "shim_pids": pids if rt == EMBED else len(pids),
            "containerd_rss_kib": ctrd_rss,
        }

    def shim_cpu_s(self, rt: str) -> float:
        """CPU seconds (user + system) used so far by the live shim processes."""
        return sum(process_cpu_s(pid) for pid in shim_pids(rt, self.c.address))

    def wait_daemon_gone(self, what: str) -> bool:
        """Let the idle daemon exit (it lingers IDLE_EXIT s after its last task), so every
        memory round measures a daemon that served only its own N containers.  False (and
        an error) if it is still there after IDLE_WAIT s."""
        deadline = time.monotonic() + IDLE_WAIT
        while shim_pids(EMBED, self.c.address):
            if time.monotonic() > deadline:
                self.error(f"{what}: the idle daemon did not exit within {IDLE_WAIT:.0f} s")
                return False
            self.progress(f"{what}: waiting for the idle daemon to exit")
            time.sleep(0.2)
        return True

    def phase_memory(self) -> None:
        self.progress("memory", force=True)
        rows: dict[str, list[dict[str, Any]]] = {EMBED: [], RUNC: []}
        for i, n in enumerate(self.cfg.ns):
            for rt in order(i, [EMBED, RUNC]):
                ids = [f"m{n}-{rt}-{k}" for k in range(n)]

                def start(cid: str, rt: str = rt) -> float | None:
                    return self.start_one(rt, cid, *SLEEP)

                fresh = rt != EMBED or self.wait_daemon_gone(f"memory N={n} {rt}")
                cpu0, shim0 = system_cpu_s(), self.shim_cpu_s(rt)
                starts, start_wall = self.parallel(start, ids, f"memory N={n} {rt}: start")
                cpu1, shim1 = system_cpu_s(), self.shim_cpu_s(rt)
                running = self.wait_running(ids, 60 + n)
                if running != n:
                    self.error(f"memory N={n} {rt}: only {running}/{n} RUNNING")
                time.sleep(self.cfg.settle)
                self.progress(f"memory N={n} {rt}: measuring")
                row: dict[str, Any] = {
                    "n": n,
                    "running": running,
                    "fresh_daemon": fresh,
                    **self.measure(rt),
                }
                cpu2, shim2 = system_cpu_s(), self.shim_cpu_s(rt)
                teardowns, teardown_wall = self.parallel(
                    self.teardown_one, ids, f"memory N={n} {rt}: teardown"
                )
                cpu3, shim3 = system_cpu_s(), self.shim_cpu_s(rt)
                row.update(
                    start_wall_s=round(start_wall, 4),
                    teardown_wall_s=round(teardown_wall, 4),
                    start_cpu_s=round(cpu1 - cpu0, 2),
                    teardown_cpu_s=round(cpu3 - cpu2, 2),
                    shim_cpu_start_s=round(shim1 - shim0, 2),
                    # runc-v2 shims exit during teardown, taking their counters with them
                    shim_cpu_teardown_s=round(shim3 - shim2, 2) if rt == EMBED else None,
                    start_ms=ms(starts),
                    teardown_ms=ms(teardowns),
                )
                rows[rt].append(row)
                left = [t for t in self.leftover_tasks() if t in set(ids)]
                if left:
                    self.error(f"memory N={n} {rt}: tasks left after teardown: {left}")
        marginal: dict[str, float | None] = {}
        marginal_uss: dict[str, float | None] = {}
        for rt, rs in rows.items():
            xs = [float(r["running"]) for r in rs]
            for key, dest in (("shim_pss_kib", marginal), ("shim_uss_kib", marginal_uss)):
                try:
                    dest[rt] = round(slope(xs, [float(r[key]) for r in rs]), 1)
                except ValueError:
                    dest[rt] = None
        self.results["marginal_uss_kib_per_container"] = marginal_uss
        concurrent: dict[str, Any] = {}
        for rt, rs in rows.items():
            concurrent[rt] = {
                "start_ms": summarize([x for r in rs for x in r["start_ms"]]),
                "teardown_ms": summarize([x for r in rs for x in r["teardown_ms"]]),
            }
        self.results["memory"] = rows
        self.results["marginal_pss_kib_per_container"] = marginal
        self.results["concurrent_latency"] = concurrent

    # -- sequential start / teardown, and the runc floor ---------------------------

    def phase_start(self) -> None:
        self.progress("start latency", force=True)
        m = self.cfg.seq
        # one warm container per runtime keeps our daemon up and the shim binaries cached
        warm = {rt: f"warm-{rt}" for rt in (EMBED, RUNC)}
        for rt, cid in warm.items():
            if self.start_one(rt, cid, *SLEEP) is None:
                raise HarnessError(f"cannot start a {rt} container; see errors above")
        spec_path = os.path.join(
            self.c.state, TASK_DIR, self.c.namespace, warm[RUNC], "config.json"
        )
        with open(spec_path) as f:
            spec = json.load(f)
        floor = Floor(self.c)
        starts: dict[str, list[float]] = {EMBED: [], RUNC: [], FLOOR: []}
        teardowns: dict[str, list[float]] = {EMBED: [], RUNC: [], FLOOR: []}
        try:
            names = [EMBED, RUNC, FLOOR]
            for i in range(m):
                for rt in order(i, names):
                    cid = f"s-{rt}-{i}"
                    self.progress(f"start latency: {i + 1}/{m} {rt}")
                    if rt == FLOOR:
                        try:
                            starts[rt].append(floor.run(cid, spec, self.c.cgroup_path(cid)))
                        except HarnessError as e:
                            self.error(str(e))
                    else:
                        dt = self.start_one(rt, cid, *SLEEP)
                        if dt is not None:
                            starts[rt].append(dt)
            ids = [f"s-{rt}-{i}" for i in range(m) for rt in (EMBED, RUNC)]
            running = self.wait_running(ids, 60)
            if running != len(ids):
                self.error(f"start latency: only {running}/{len(ids)} RUNNING")
            for i in range(m):
                for rt in order(i, names):
                    cid = f"s-{rt}-{i}"
                    self.progress(f"teardown latency: {i + 1}/{m} {rt}")
                    if rt == FLOOR:
                        try:
                            teardowns[rt].append(floor.rm(cid))
                        except HarnessError as e:
                            self.error(str(e))
                    else:
                        dt = self.teardown_one(cid)
                        if dt is not None:
                            teardowns[rt].append(dt)
        finally:
            floor.close()
            for cid in warm.values():
                self.teardown_one(cid)
        self.results["start"] = {
            rt: {"summary": summarize(ms(v)), "ms": ms(v)} for rt, v in starts.items()
        }
        self.results["teardown"] = {
            rt: {"summary": summarize(ms(v)), "ms": ms(v)} for rt, v in teardowns.items()
        }

    # -- exit latency -------------------------------------------------------------

    def subscribe(self) -> EventStream:
        """Start ``ctr events`` and make sure it is subscribed (a probe container's
        /containers/create event arrives)."""
        stream = EventStream(self.c.ctr_async("events"))
        for k in range(50):
            cid = f"probe-{k}"
            self.c.ctr("containers", "create", "--rootfs", self.rootfs, cid, "true")

            def created(e: Event, cid: str = cid) -> bool:
                return e.topic == "/containers/create" and e.payload.get("id") == cid

            ev = stream.wait(created, 0.5)
            self.c.ctr("containers", "delete", cid, check=False)
            if ev is not None:
                stream.drain()
                return stream
        raise HarnessError("ctr events never delivered an event")

    def phase_exit(self) -> None:
        self.progress("exit latency", force=True)
        fifos = os.path.join(self.c.tmp, "fifos")
        os.makedirs(fifos, exist_ok=True)
        mount = ["--mount", f"type=bind,src={fifos},dst=/fifos,options=rbind:rw"]
        stream = self.subscribe()
        lat: dict[str, list[int]] = {EMBED: [], RUNC: []}
        detect: dict[str, list[int]] = {EMBED: [], RUNC: []}
        publish: dict[str, list[int]] = {EMBED: [], RUNC: []}
        deliver: dict[str, list[int]] = {EMBED: [], RUNC: []}
        statuses: dict[str, dict[str, int]] = {EMBED: {}, RUNC: {}}
        batches = math.ceil(self.cfg.exits / self.cfg.exit_batch)
        done = {EMBED: 0, RUNC: 0}
        for b in range(batches):
            for rt in order(b, [EMBED, RUNC]):
                size = min(self.cfg.exit_batch, self.cfg.exits - done[rt])
                ids = [f"x-{rt}-{b}-{k}" for k in range(size)]
                started = []
                for cid in ids:
                    os.mkfifo(os.path.join(fifos, cid))
                    script = f"read x < /fifos/{cid}; exit {EXIT_CODE}"
                    self.progress(f"exit latency: {rt} {done[rt]}/{self.cfg.exits}: start {cid}")
                    if self.start_one(rt, cid, "sh", "-c", script, extra=mount) is not None:
                        started.append(cid)
                for cid in started:
                    self.progress(f"exit latency: {rt} {done[rt]}/{self.cfg.exits}")
                    s = self._one_exit(stream, rt, cid, os.path.join(fifos, cid))
                    if s is not None:
                        t0, ev, status = s
                        lat[rt].append(ev.arrival_ns - t0)
                        statuses[rt][str(status)] = statuses[rt].get(str(status), 0) + 1
                        exited = ev.payload.get("exited_at")
                        if isinstance(exited, str) and ev.envelope_ns is not None:
                            ex = parse_rfc3339_ns(exited)
                            detect[rt].append(ex - t0)
                            publish[rt].append(ev.envelope_ns - ex)
                            deliver[rt].append(ev.arrival_ns - ev.envelope_ns)
                    done[rt] += 1
                for cid in ids:
                    self.progress(f"exit latency: {rt} {done[rt]}/{self.cfg.exits}: clean up")
                    self.teardown_one(cid)
                    os.unlink(os.path.join(fifos, cid))
                stream.drain()
        stream.proc.kill()

        def us(v: list[int]) -> dict[str, float]:
            return summarize([x / 1000.0 for x in v])

        self.results["exit"] = {
            rt: {
                "latency_us": us(lat[rt]),
                "detect_us": us(detect[rt]),
                "shim_publish_us": us(publish[rt]),
                "deliver_us": us(deliver[rt]),
                "exit_statuses": statuses[rt],
                "latency_samples_us": [round(x / 1000.0, 1) for x in lat[rt]],
            }
            for rt in (EMBED, RUNC)
        }

    def _one_exit(
        self, stream: EventStream, rt: str, cid: str, fifo: str
    ) -> tuple[int, Event, int] | None:
        if (
            stream.wait(
                lambda e: e.topic == "/tasks/start" and e.payload.get("container_id") == cid, 10
            )
            is None
        ):
            self.error(f"exit {rt} {cid}: no /tasks/start event")
            return None
        # O_NONBLOCK open of the write end fails with ENXIO until sh has the read end open
        deadline = time.monotonic() + 10
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    self.error(f"exit {rt} {cid}: open fifo: {e}")
                    return None
                time.sleep(0.002)
        try:
            t0 = time.time_ns()
            os.write(fd, b"x\n")
        finally:
            os.close(fd)
        ev = stream.wait(
            lambda e: (
                e.topic == "/tasks/exit"
                and e.payload.get("container_id") == cid
                and e.payload.get("id", cid) == cid
            ),
            10,
        )
        if ev is None:
            self.error(f"exit {rt} {cid}: no /tasks/exit event within 10 s")
            return None
        status = int(ev.payload.get("exit_status", 0))
        if status != EXIT_CODE:
            self.error(f"exit {rt} {cid}: exit_status {status}, expected {EXIT_CODE}")
        return t0, ev, status

    # -- exec ---------------------------------------------------------------------

    def exec_one(self, cid: str, exec_id: str) -> tuple[float | None, str]:
        args = ("task", "exec", "--exec-id", exec_id, "--fifo-dir", self.c.fifo_dir, cid, "true")
        t0 = time.perf_counter()
        r = self.c.ctr(*args, check=False, timeout=60)
        dt = time.perf_counter() - t0
        if r.returncode:
            return None, (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")
        return dt, ""

    def phase_exec(self) -> None:
        self.progress("exec latency", force=True)
        ids = {rt: f"e-{rt}" for rt in (EMBED, RUNC)}
        out: dict[str, Any] = {}
        times: dict[str, list[float]] = {}
        cpu0: dict[str, float] = {}
        try:
            for rt, cid in ids.items():
                if self.start_one(rt, cid, *SLEEP) is None:
                    out[rt] = {"skipped": "could not start a container"}
                    continue
                dt, err = self.exec_one(cid, "probe")
                if dt is None:
                    why = "not implemented" if "not implemented" in err.lower() else "failed"
                    out[rt] = {"skipped": f"ctr task exec {why}: {err}"}
                    self.progress.note(f"  exec on {rt} skipped: {err}")
                else:
                    times[rt] = []
            time.sleep(self.cfg.settle)  # the probe's helpers reaped, into the counters
            cpu0 = {rt: shim_cpu_with_children_s(rt, self.c.address) for rt in times}
            for i in range(self.cfg.execs):
                for rt in order(i, sorted(times)):
                    self.progress(f"exec latency: {i + 1}/{self.cfg.execs} {rt}")
                    dt, err = self.exec_one(ids[rt], f"e{i}")
                    if dt is None:
                        self.error(f"exec {rt} e{i}: {err}")
                    else:
                        times[rt].append(dt)
            time.sleep(self.cfg.settle)
            for rt, before in cpu0.items():
                used = shim_cpu_with_children_s(rt, self.c.address) - before
                out[rt] = {"cpu_s": round(used, 3)}
                if times[rt]:
                    out[rt]["cpu_ms_per_exec"] = round(used * 1000 / len(times[rt]), 3)
        finally:
            for cid in ids.values():
                if cid in self.leftover_tasks():
                    self.teardown_one(cid)
                else:
                    self.c.ctr("container", "delete", cid, check=False)
        for rt, v in times.items():
            out.setdefault(rt, {}).update(summary=summarize(ms(v)), ms=ms(v))
        self.results["exec"] = out


# --------------------------------------------------------------------------------------
# targets, table, plot


@dataclass
class Target:
    name: str
    met: bool | None
    detail: str


def evaluate(results: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    mem = results.get("memory") or {}
    both = {r["n"] for r in mem.get(EMBED, [])} & {r["n"] for r in mem.get(RUNC, [])}
    nmax = max(both) if both else None
    row_e: dict[str, Any] | None = next((r for r in mem.get(EMBED, []) if r["n"] == nmax), None)
    row_r: dict[str, Any] | None = next((r for r in mem.get(RUNC, []) if r["n"] == nmax), None)
    name = f"total shim PSS at N={nmax} <= 1/{PSS_RATIO_TARGET:.0f} of runc-v2's"
    if row_e and row_r and row_e["shim_pss_kib"] > 0:
        e, r = row_e["shim_pss_kib"], row_r["shim_pss_kib"]
        held = row_e.get("shim_memfd_kib", 0)
        out.append(
            Target(
                name,
                e * PSS_RATIO_TARGET <= r,
                f"{e / 1024:.1f} vs {r / 1024:.1f} MiB (1/{r / e:.1f})"
                + (
                    f"; plus {held / 1024:.1f} MiB in memfds no PSS shows (the sealed runc"
                    f" copy): 1/{r / (e + held):.1f} with them"
                    if held
                    else ""
                ),
            )
        )
    else:
        out.append(Target(name, None, "not measured"))
    marg = _get(results, "marginal_pss_kib_per_container", EMBED)
    name = f"marginal memory per container < {MARGINAL_TARGET_KIB:.0f} KiB"
    out.append(
        Target(name, None, "not measured")
        if marg is None
        else Target(
            name,
            marg < MARGINAL_TARGET_KIB,
            f"{marg:.0f} KiB/container (PSS slope; USS slope "
            f"{_fmt(_get(results, 'marginal_uss_kib_per_container', EMBED), digits=0)} KiB)"
            + (" (negative: noise outweighs growth over this range of N)" if marg < 0 else ""),
        )
    )
    e, r = (
        _get(results, "start", EMBED, "summary", "p50"),
        _get(results, "start", RUNC, "summary", "p50"),
    )
    name = "start latency p50 no worse than runc-v2's"
    out.append(
        Target(name, None, "not measured")
        if e is None or r is None
        else Target(name, e <= r, f"{e:.1f} vs {r:.1f} ms")
    )
    e, r = (
        _get(results, "exit", EMBED, "latency_us", "p99"),
        _get(results, "exit", RUNC, "latency_us", "p99"),
    )
    name = "exit latency p99 no worse than runc-v2's"
    out.append(
        Target(name, None, "not measured")
        if e is None or r is None
        else Target(name, e <= r, f"{e / 1000:.2f} vs {r / 1000:.2f} ms")
    )
    name = f"{nmax} containers started and torn down faster than runc-v2"
    if row_e and row_r:
        e = row_e["start_wall_s"] + row_e["teardown_wall_s"]
        r = row_r["start_wall_s"] + row_r["teardown_wall_s"]
        out.append(Target(name, e < r, f"{e:.2f} vs {r:.2f} s"))
    else:
        out.append(Target(name, None, "not measured"))
    return out


def _fmt(v: Any, scale: float = 1.0, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v * scale:.{digits}f}"


def _watch_sandbox_lines(results: dict[str, Any]) -> list[str]:
    """The ``watch`` and ``sandbox`` phases' own tables (watchcost.py, sandboxcost.py)."""
    from integration.bench import sandboxcost, watchcost

    lines: list[str] = []
    w = results.get("watch")
    if w:
        lines += ["", "Watch (issue 15; a private containerd, embed runtime)", watchcost.table(w)]
    sb = results.get("sandbox")
    if sb and "skipped" in sb:
        lines += ["", f"Pod sandboxes (issue 17): skipped: {sb['skipped']}"]
    elif sb and sb.get("handlers"):
        n = next(iter(sb["handlers"].values()))["pods"]
        lines += [
            "",
            f"Pod sandboxes (issue 17; CRI on containerd {sb.get('containerd')}, {n} pods per "
            "handler, no container in them; memory per pod)",
            sandboxcost.table(sb, with_targets=False),
        ]
    return lines


def table(results: dict[str, Any], targets: Sequence[Target]) -> str:
    meta = results.get("meta", {})
    lines = [
        f"embedshim bench ({'quick' if _get(results, 'config', 'quick') else 'full'}): "
        f"{meta.get('cpus')} cores, {_fmt(meta.get('mem_gib'))} GiB, kernel {meta.get('kernel')}, "
        f"containerd {meta.get('containerd')}, runc {meta.get('runc')}, "
        f"shim @ {meta.get('commit')}",
        "",
        "Memory (KiB; shim = sum over shim processes)",
        f"{'N':>5} | {'embed PSS':>10} {'RSS':>8} {'USS':>8} {'procs':>5} {'ctrd RSS':>9} "
        f"{'start+down s':>12} | {'runc-v2 PSS':>11} {'RSS':>8} {'USS':>8} {'procs':>5} "
        f"{'ctrd RSS':>9} {'start+down s':>12}",
    ]
    mem = results.get("memory") or {}
    by_n: dict[int, dict[str, Any]] = {}
    for rt in (EMBED, RUNC):
        for r in mem.get(rt, []):
            by_n.setdefault(r["n"], {})[rt] = r
    for n in sorted(by_n):
        cells = []
        for rt, w in ((EMBED, 10), (RUNC, 11)):
            r = by_n[n].get(rt)
            if r is None:
                cells.append(" " * (w + 49))
                continue
            run = "" if r["running"] == n else f" ({r['running']} up)"
            cells.append(
                f"{r['shim_pss_kib']:>{w}} {r['shim_rss_kib']:>8} "
                f"{r.get('shim_uss_kib', '-'):>8} {r['shim_procs']:>5} "
                f"{r['containerd_rss_kib']:>9} "
                f"{r['start_wall_s']:>5.2f}+{r['teardown_wall_s']:<6.2f}{run}"
            )
        lines.append(f"{n:>5} | {cells[0]} | {cells[1]}")
    for n in sorted(by_n):
        cells = []
        for rt in (EMBED, RUNC):
            r = by_n[n].get(rt) or {}
            cells.append(
                f"{rt}: machine {_fmt(r.get('start_cpu_s'), digits=2)} + "
                f"{_fmt(r.get('teardown_cpu_s'), digits=2)} s, shims "
                f"{_fmt(r.get('shim_cpu_start_s'), digits=2)} + "
                f"{_fmt(r.get('shim_cpu_teardown_s'), digits=2)} s"
            )
        lines.append(f"  CPU for N={n} start + teardown: {cells[0]}; {cells[1]}")
    marg = results.get("marginal_pss_kib_per_container") or {}
    lines.append(
        f"marginal PSS per container (least-squares slope): embed {_fmt(marg.get(EMBED))} KiB, "
        f"runc-v2 {_fmt(marg.get(RUNC))} KiB"
    )
    marg_uss = results.get("marginal_uss_kib_per_container") or {}
    lines.append(
        f"marginal USS per container (least-squares slope): embed "
        f"{_fmt(marg_uss.get(EMBED))} KiB, runc-v2 {_fmt(marg_uss.get(RUNC))} KiB"
    )
    lines += ["", f"Latency (ms){'':<27} {'embed':>22} {'runc-v2':>22} {'runc floor':>22}"]

    def row(label: str, section: str, key: str, stats: Sequence[str], scale: float = 1.0) -> None:
        cells = []
        for rt in (EMBED, RUNC, FLOOR):
            d = _get(results, section, rt)
            if isinstance(d, dict) and "skipped" in d:
                cells.append(f"{'skipped':>22}")
                continue
            s = _get(d, key)
            if not s or not s.get("n"):
                cells.append(f"{'-':>22}")
                continue
            cells.append(f"{' / '.join(_fmt(s.get(k), scale) for k in stats):>22}")
        lines.append(f"{label:<39} {' '.join(cells)}")

    p = ("p50", "p95", "max")
    row("start, sequential   p50 / p95 / max", "start", "summary", p)
    row("teardown, sequential p50 / p95 / max", "teardown", "summary", p)
    row("start, 4 at a time  p50 / p95 / max", "concurrent_latency", "start_ms", p)
    row("teardown, 4 at a time p50/p95/max", "concurrent_latency", "teardown_ms", p)
    row("exit -> event       p50 / p99 / max", "exit", "latency_us", ("p50", "p99", "max"), 1e-3)
    row("  exit -> exited_at p50 / p99 / max", "exit", "detect_us", ("p50", "p99", "max"), 1e-3)
    row(
        "  exited_at -> envelope p50/p99/max",
        "exit",
        "shim_publish_us",
        ("p50", "p99", "max"),
        1e-3,
    )
    row("  envelope -> ctr   p50 / p99 / max", "exit", "deliver_us", ("p50", "p99", "max"), 1e-3)
    row("exec                p50 / p95 / max", "exec", "summary", ("p50", "p95", "max"))
    cpu = [_get(results, "exec", rt, "cpu_ms_per_exec") for rt in (EMBED, RUNC)]
    lines.append(
        f"{'exec CPU per exec (ms, user+sys)':<39} {_fmt(cpu[0], digits=2):>22} "
        f"{_fmt(cpu[1], digits=2):>22}"
    )
    for rt in (EMBED, RUNC):
        why = _get(results, "exec", rt, "skipped")
        if why:
            lines.append(f"  exec on {rt} skipped: {why}")
    env = results.get("environment") or []
    if env:
        loads = ", ".join(f"{e['phase']} {e['loadavg'][0]:.1f}" for e in env)
        lines.append(f"1-min load average as each phase began: {loads} ({meta.get('cpus')} cores)")
    others = max((e.get("other_containerds", 0) for e in env), default=0)
    if others:
        lines.append(
            f"note: up to {others} other containerd instance(s) ran during the bench "
            "(other test runs?): expect noisier latencies"
        )
    lines += _watch_sandbox_lines(results)
    lines += ["", *goals.table(results.get("goals") or [])]
    if results.get("goals_watch_sandbox"):
        lines += [
            "",
            *goals.table(
                results["goals_watch_sandbox"],
                "Goals of issues 15 (watch) and 17 (pod sandboxes) (ratio = ours / baseline)",
                ("ours", "baseline"),
            ),
        ]
    lines += ["", "Targets"]
    for t in targets:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t.met]
        lines.append(f"  [{mark}] {t.name}: {t.detail}")
    logs = results.get("logs") or {}
    if logs.get("daemon_errors") or logs.get("daemon_warnings"):
        lines.append(
            f"our daemon logged {logs.get('daemon_errors')} error(s) and "
            f"{logs.get('daemon_warnings')} warning(s): {logs.get('daemon_log')}"
        )
    errs = results.get("errors") or []
    if errs:
        lines += ["", f"Errors ({len(errs)}):"] + [f"  {e}" for e in errs[:20]]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Write the PNG; None on success, else why not."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        import matplotlib.ticker  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    colors = {EMBED: "tab:green", RUNC: "tab:blue", FLOOR: "tab:gray"}
    fig, (ax1, ax2, ax3) = plt.subplots(
        1, 3, figsize=(22, 6.5), gridspec_kw={"width_ratios": [1, 1, 0.9]}
    )
    mem = results.get("memory") or {}
    for rt in (EMBED, RUNC):
        rows = mem.get(rt) or []
        if not rows:
            continue
        ns = [r["running"] for r in rows]
        ax1.plot(
            ns,
            [r["shim_pss_kib"] / 1024 for r in rows],
            "o-",
            color=colors[rt],
            label=f"{rt} shim PSS",
        )
        ax1.plot(
            ns,
            [r["shim_rss_kib"] / 1024 for r in rows],
            "o--",
            color=colors[rt],
            alpha=0.6,
            label=f"{rt} shim RSS",
        )
        ax1.plot(
            ns,
            [r["containerd_rss_kib"] / 1024 for r in rows],
            ":",
            color=colors[rt],
            alpha=0.6,
            label=f"containerd RSS ({rt} run)",
        )
    target = [
        (r["running"], r["shim_pss_kib"] / 1024 / PSS_RATIO_TARGET) for r in mem.get(RUNC) or []
    ]
    if target:
        ax1.plot(
            [t[0] for t in target],
            [t[1] for t in target],
            "-",
            color="tab:red",
            alpha=0.4,
            linewidth=3,
            label=f"target: runc-v2 shim PSS / {PSS_RATIO_TARGET:.0f}",
        )
    ax1.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xlabel("running containers (N)")
    ax1.set_ylabel("MiB (log scale)")
    marg = results.get("marginal_pss_kib_per_container") or {}
    ax1.set_title(
        f"Shim memory vs N (marginal PSS: embed {_fmt(marg.get(EMBED), digits=0)} KiB, "
        f"runc-v2 {_fmt(marg.get(RUNC), digits=0)} KiB)",
        fontsize=10,
    )
    ax1.grid(True, which="both", alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:  # a run of some phases may have none
        ax1.legend(fontsize=8)

    cats: list[tuple[str, str, str, str, float]] = [
        ("start p50", "start", "summary", "p50", 1.0),
        ("start p95", "start", "summary", "p95", 1.0),
        ("teardown p50", "teardown", "summary", "p50", 1.0),
        ("exit p50", "exit", "latency_us", "p50", 1e-3),
        ("exit p99", "exit", "latency_us", "p99", 1e-3),
        ("exec p50", "exec", "summary", "p50", 1.0),
        ("exec p99", "exec", "summary", "p99", 1.0),
    ]
    width = 0.27
    for j, rt in enumerate((EMBED, RUNC, FLOOR)):
        xs, hs = [], []
        for i, (_, sec, key, stat, scale) in enumerate(cats):
            v = _get(results, sec, rt, key, stat)
            if v is not None:
                xs.append(i + (j - 1) * width)
                hs.append(v * scale)
        if xs:
            bars = ax2.bar(xs, hs, width, color=colors[rt], label=rt)
            ax2.bar_label(bars, fmt="%.1f", fontsize=7)
    ax2.set_xticks(range(len(cats)), [c[0] for c in cats], fontsize=9)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_ylabel("ms (log scale)")
    ax2.set_title("Latency (missing bar = not measured / not implemented)", fontsize=10)
    ax2.grid(True, axis="y", which="both", alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:  # a run of some phases may have none
        ax2.legend(fontsize=8)
    goals.plot(ax3, [*(results.get("goals") or []), *(results.get("goals_watch_sandbox") or [])])
    w = results.get("watch") or {}
    if "daemon_cpu_pct_on" in w:  # its ratio to ~0 % says little: the figures themselves
        ax3.text(
            0.99,
            0.01,
            f"watch, {w['rate_target']} forks/s: daemon CPU {w['daemon_cpu_pct_off']:.1f} % "
            f"without a watcher, {w['daemon_cpu_pct_on']:.1f} % with one",
            transform=ax3.transAxes,
            ha="right",
            fontsize=7,
        )
    meta = results.get("meta", {})
    fig.suptitle(
        f"embedshim vs runc-v2 — {meta.get('cpus')} cores, {_fmt(meta.get('mem_gib'))} GiB, "
        f"containerd {meta.get('containerd')}, {meta.get('started')}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------
# main


def _first_line(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (r.stdout.strip().splitlines() or ["?"])[0]


def machine() -> dict[str, Any]:
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "shim"])
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "containerd": _first_line(["containerd", "--version"]).split()[-1],
        "runc": _first_line(["runc", "--version"]).split()[-1],
        "commit": commit + ("+dirty" if dirty not in ("", "?") else ""),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def keep_logs(c: Containerd, json_path: Path) -> dict[str, Any]:
    """Copy containerd's and our daemon's logs next to the JSON (the temp dir is about to
    go) and count the daemon's warnings and errors."""
    from integration.embed import daemon_paths

    out: dict[str, Any] = {}
    daemon_log = daemon_paths(c).log
    for name, src in (("containerd", c.log_path), ("daemon", daemon_log)):
        if os.path.exists(src):
            dst = json_path.with_suffix(f".{name}.log")
            shutil.copyfile(src, dst)
            out[f"{name}_log"] = str(dst)
    if os.path.exists(daemon_log):
        with open(daemon_log, errors="replace") as f:
            text = f.read().splitlines()
        errors = [ln for ln in text if "level=error" in ln]
        out["daemon_warnings"] = sum(1 for ln in text if "level=warn" in ln)
        out["daemon_errors"] = len(errors)
        out["daemon_first_errors"] = errors[:5]
    return out


def _load() -> dict[str, Any]:
    """What else is running: load average, and containerd instances other than ``mine``
    (other harness runs skew the numbers)."""
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"loadavg": [float(x) for x in load]}


def other_containerds(mine: int | None) -> int:
    return sum(
        1
        for p in all_processes()
        if not p.zombie and p.pid != mine and p.cmdline[:1] == ["containerd"]
    )


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "the bench needs root (containerd, runc, mounts, cgroups)"
    need = ("containerd", "ctr", "runc", RUNC_SHIM)
    missing = [b for b in need if shutil.which(b) is None]
    if not os.access(os.path.join(sys.prefix, "bin", EMBED_SHIM), os.X_OK):
        missing.append(f"{sys.prefix}/bin/{EMBED_SHIM} (make setup)")
    if missing:
        return "missing: " + ", ".join(missing)
    if not os.access("/bin/busybox", os.X_OK):
        return "needs a static /bin/busybox (busybox-static)"
    return None


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, _raise_interrupt) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(
    cfg: Config, out_dir: Path, progress: Progress
) -> tuple[dict[str, Any], list[Target], Path]:
    from integration.embed import embedshim_env, remove_host_leftovers

    preexisting = set(shared_dirs())
    reap_stale()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"bench-{'quick-' if cfg.quick else ''}{stamp}.json"
    results: dict[str, Any] = {"meta": machine(), "config": cfg.__dict__.copy()}
    progress("starting containerd", force=True)
    c = Containerd(extra_env=embedshim_env())
    bench = Bench(c, cfg, progress)
    results_ok = False
    try:
        bench.rootfs = busybox_rootfs(os.path.join(c.tmp, "bb"))
        bench.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="bench")
        bench.results = results
        results["meta"]["containerd_start_s"] = round(c.start_seconds, 3)
        env: list[dict[str, Any]] = []
        results["environment"] = env
        phases = [
            ("memory", bench.phase_memory),
            ("start", bench.phase_start),
            ("exit", bench.phase_exit),
            ("exec", bench.phase_exec),
            ("scale", lambda: phase_scale(bench)),
            ("cri", lambda: phase_cri(bench)),
            ("watch", lambda: phase_watch(bench)),
            ("sandbox", lambda: phase_sandbox(bench)),
        ]
        for name, phase in phases:
            if name not in cfg.phases:
                continue
            env.append({"phase": name, **_load(), "other_containerds": other_containerds(c.pid)})
            phase()
        env.append({"phase": "end", **_load(), "other_containerds": other_containerds(c.pid)})
        results_ok = True
    finally:
        results["errors"] = bench.errors
        results["complete"] = results_ok
        if bench.pool is not None:
            bench.pool.shutdown(wait=False, cancel_futures=True)
        progress("cleaning up", force=True)
        with contextlib.suppress(Exception):
            results["logs"] = keep_logs(c, json_path)
        try:
            try:
                c.cleanup()
            finally:
                remove_host_leftovers(c)
        except HarnessError as e:
            bench.errors.append(f"cleanup: {e}")
            progress.note(f"cleanup incomplete: {e}")
        remove_shared_dirs(preexisting)
        targets = evaluate(results)
        results["targets"] = [t.__dict__ for t in targets]
        results["goals"] = [g.as_dict() for g in goals.goals(results)]
        results["goals_watch_sandbox"] = [g.as_dict() for g in goals.watch_sandbox_goals(results)]
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        progress.clear()
    return results, targets, json_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m integration.bench.bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: N = 1, 5, 10; 20 exits (< 2 min)"
    )
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})"
    )
    ap.add_argument(
        "--ns", type=lambda s: [int(x) for x in s.split(",")], help="container counts, e.g. 1,10,50"
    )
    ap.add_argument("--exits", type=int, help="exits per runtime")
    ap.add_argument(
        "--scale-ns",
        type=lambda s: [int(x) for x in s.split(",")],
        help="running containers for the scale phase (default 10,300; quick 10,30)",
    )
    ap.add_argument(
        "--phases",
        type=lambda s: s.split(","),
        help=f"only these phases, e.g. scale,cri (default all: {','.join(PHASES)})",
    )
    ap.add_argument("--floor-helper", metavar="RUNC_ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor_helper:
        return floor_helper(args.floor_helper)
    why = preflight()
    if why:
        sys.stderr.write(f"bench: {why}\n")
        return 2
    try:
        cfg = Config.make(args.quick, args.ns, args.exits, args.scale_ns, args.phases)
    except ValueError as e:
        ap.error(str(e))
    progress = Progress()
    try:
        with _signals_as_interrupt():
            results, targets, json_path = run(cfg, args.out, progress)
    except KeyboardInterrupt:
        progress.note("interrupted; everything was cleaned up (partial results were written)")
        return 130
    png = json_path.with_suffix(".png")
    why_not = plot(results, png)
    print(table(results, targets))
    print(f"\nresults: {json_path}")
    print(f"plot:    {png}" if why_not is None else f"plot:    none: {why_not}")
    return 0 if results.get("complete") else 1


if __name__ == "__main__":
    sys.exit(main())
