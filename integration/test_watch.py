"""`watch`: exec, exit and OOM events of the processes inside our containers, from the kernel,
tagged with their container; nothing from outside them; nothing lost across a reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from integration.embed import (
    BPF_TEST_ROOT,
    RUNTIME,
    SHIM,
    daemons,
    embed_containerd,
    shim_command,
)
from integration.harness import Containerd, task_list, wait_for
from integration.prereq import bpf_problem, missing

SEGV = 'sh -c "kill -SEGV \\$\\$"; /bin/true; exit 4'


@pytest.fixture
def c(busybox: str) -> Iterator[Containerd]:
    problem = bpf_problem()
    if problem is not None:
        pytest.skip(missing(f"watch needs BPF: {problem}"))
    with embed_containerd(busybox) as ctrd:
        yield ctrd


class Watcher:
    """``containerd-shim-embed-v1 -address A watch --json ...`` running, its lines collected."""

    def __init__(self, c: Containerd, *args: str) -> None:
        env = {**os.environ, "EMBEDSHIM_ROOT": c.embedshim_root}
        argv = [os.path.join(sys.prefix, "bin", SHIM), "-address", c.address, "watch", *args]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.errors), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in list(self.lines) if ln.startswith("{")]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.events() if pred(e)]
            return bool(found)

        wait_for(seen, timeout=timeout, what=f"watch event; have {self.lines[-5:]} {self.errors}")
        return found[0]

    def said(self, text: str, timeout: float = 20) -> None:
        wait_for(
            lambda: any(text in e for e in self.errors),
            timeout=timeout,
            what=f"{text}: {self.errors}",
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    ws: list[Watcher] = []
    yield ws
    for w in ws:
        w.stop()


def _watch(c: Containerd, ws: list[Watcher], *args: str) -> Watcher:
    w = Watcher(c, "--json", *args)
    ws.append(w)
    return w


def _check(c: Containerd) -> subprocess.CompletedProcess[str]:
    """``check`` as an operator runs it, with the test daemon's BPF pin root."""
    env = {**os.environ, "EMBEDSHIM_ROOT": c.embedshim_root, "EMBEDSHIM_BPF_ROOT": BPF_TEST_ROOT}
    argv = [os.path.join(sys.prefix, "bin", SHIM), "-address", c.address, "check"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def _metric(text: str, name: str, ns: str, cid: str) -> int:
    """One container's value of metric ``name`` in a Prometheus text."""
    want = f'embedshim_container_{name}_total{{namespace="{ns}",container_id="{cid}"}}'
    values = [int(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(want + " ")]
    assert len(values) == 1, f"{want} not in:\n{text}"
    return values[0]


def _keep_daemon(c: Containerd, busybox: str, cid: str = "keep") -> None:
    c.run(RUNTIME, busybox, cid, "sleep", "1000", detach=True)


def _end(c: Containerd, *cids: str) -> None:
    for cid in cids:
        c.ctr("task", "kill", "-s", "KILL", cid, check=False)
    for cid in cids:
        wait_for(lambda cid=cid: task_list(c).get(cid, (0, "STOPPED"))[1] == "STOPPED", timeout=20)
        c.ctr("task", "delete", cid, check=False)
        c.ctr("container", "delete", cid, check=False)


def test_a_shell_that_segfaults_execs_and_exits_4(
    c: Containerd, busybox: str, watchers: list[Watcher]
) -> None:
    w = _watch(c, watchers)
    w.said("no embedshim daemon runs yet")  # and it waits
    _keep_daemon(c, busybox)
    w.said("connected to the daemon")
    c.run(RUNTIME, busybox, "seg", "sh", "-c", SEGV, check=False)
    init_exit = w.wait_for(
        lambda e: e["event"] == "exit" and e["container_id"] == "seg" and e.get("exit_code") == 4
    )
    segv = w.wait_for(lambda e: e["event"] == "exit" and e.get("signal") == 11)
    true = w.wait_for(lambda e: e["event"] == "exec" and e.get("filename") == "/bin/true")
    assert segv["container_id"] == "seg" and segv["namespace"] == c.namespace
    assert segv["comm"] == "sh" and segv["core_dumped"] in (True, False)
    assert segv["pid"] != init_exit["pid"] and segv["ppid"] == init_exit["pid"]
    assert true["container_id"] == "seg" and true["ppid"] == init_exit["pid"]
    assert init_exit["comm"] == "sh"
    for e in (init_exit, segv, true):
        assert e["time"].endswith("Z") and len(e["time"]) == len("2026-01-01T00:00:00.123456789Z")
    # the first program of the container: its init exec'd sh
    first = w.wait_for(lambda e: e["event"] == "exec" and e["pid"] == init_exit["pid"])
    assert first["filename"] in ("/bin/sh", "sh") or first["filename"].endswith("/sh")
    # the filters: only exits of "seg", nothing of "keep"
    f = _watch(c, watchers, "--id", "seg", "--event", "exit")
    table = Watcher(c, "--id", "seg")  # the readable table
    watchers.append(table)
    f.said("connected to the daemon")
    table.said("connected to the daemon")
    c.ctr("container", "delete", "seg")  # `ctr run` deleted its task
    c.run(RUNTIME, busybox, "seg", "sh", "-c", SEGV, detach=True)  # the task stays for --stats
    c.ctr("task", "exec", "--exec-id", "x1", "keep", "/bin/true")
    f.wait_for(lambda e: e.get("exit_code") == 4)
    wait_for(lambda: any(ln.rstrip().endswith("exit code 4") for ln in table.lines), what="row")
    assert table.lines[0].split() == ["TIME", "EVENT", "NAMESPACE", "CONTAINER", "POD", "PID",
                                      "COMM", "DETAIL"]  # fmt: skip
    assert any(" seg " in ln and "signal 11 (SIGSEGV)" in ln for ln in table.lines), table.lines
    w.wait_for(lambda e: e["container_id"] == "keep" and e.get("filename") == "/bin/true")
    assert {e["container_id"] for e in f.events()} == {"seg"}
    assert {e["event"] for e in f.events()} == {"exit"}
    # counters, in the Prometheus text format
    r = shim_command(c, "watch", "--stats")
    assert r.returncode == 0, r.stderr
    ns = c.namespace
    assert _metric(r.stdout, "process_signal_exits", ns, "seg") == 1
    assert _metric(r.stdout, "process_signal_exits", ns, "keep") == 0
    assert _metric(r.stdout, "execs", ns, "seg") >= 3  # sh, the inner sh, /bin/true
    lines = r.stdout.splitlines()
    assert "# TYPE embedshim_container_execs_total counter" in lines
    assert "embedshim_watch_events_dropped_total 0" in lines
    check = _check(c)
    assert "events dropped: 0" in check.stdout, check.stdout
    _end(c, "keep", "seg")


def test_processes_outside_our_containers_never_appear(
    c: Containerd, busybox: str, watchers: list[Watcher]
) -> None:
    _keep_daemon(c, busybox)
    w = _watch(c, watchers)
    w.said("connected to the daemon")
    outside = []
    for _ in range(30):
        p = subprocess.Popen(["/bin/sh", "-c", "/bin/true"])
        outside.append(p.pid)
        p.wait()
    # a container of the stock runtime (runc.v2, not ours) on the same containerd
    r = c.run(
        "io.containerd.runc.v2", busybox, "other", "sh", "-c", "/bin/true; exit 3", check=False
    )
    assert r.returncode == 3, r
    c.ctr("task", "exec", "--exec-id", "x1", "keep", "sh", "-c", "exit 7", check=False)
    w.wait_for(lambda e: e.get("exit_code") == 7)
    events = w.events()
    assert {e["container_id"] for e in events if "container_id" in e} == {"keep"}
    assert not [e for e in events if e.get("pid") in outside]
    assert not [e for e in events if e.get("exit_code") == 3]
    _end(c, "keep", "other")


def test_an_oom_kill_shows_an_oom_event(
    c: Containerd, busybox: str, watchers: list[Watcher]
) -> None:
    _keep_daemon(c, busybox)
    w = _watch(c, watchers, "--ns", c.namespace)
    w.said("connected to the daemon")
    hog = 'x=$(head -c 200000000 /dev/zero | tr "\\0" a)'
    c.run(
        RUNTIME,
        busybox,
        "hog",
        "sh",
        "-c",
        hog,
        extra=("--memory-limit", str(32 << 20)),
        detach=True,  # the task stays for --stats
    )
    oom = w.wait_for(lambda e: e["event"] == "oom")
    assert oom["container_id"] == "hog" and oom["pid"] > 0 and oom["comm"]
    killed = w.wait_for(lambda e: e["event"] == "exit" and e.get("signal") == 9)
    assert killed["container_id"] == "hog"
    r = shim_command(c, "watch", "--stats")
    assert _metric(r.stdout, "oom_kills", c.namespace, "hog") == 1
    assert killed["pid"] == oom["pid"]  # the victim's own exit, by SIGKILL
    _end(c, "keep", "hog")


def test_a_reload_during_a_watch_loses_no_event(
    c: Containerd, busybox: str, watchers: list[Watcher]
) -> None:
    n = 250
    script = (
        f'i=0; while [ $i -lt {n} ]; do sh -c "exit $i"; i=$((i+1)); sleep 0.02; done; sleep 1000'
    )
    _keep_daemon(c, busybox)
    w = _watch(c, watchers, "--id", "loop", "--event", "exit")
    w.said("connected to the daemon")
    c.run(RUNTIME, busybox, "loop", "sh", "-c", script, detach=True)
    w.wait_for(lambda e: e.get("exit_code") == 40)
    t0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    r = shim_command(c, "reload")
    assert r.returncode == 0, r.stderr
    w.said("reconnected to the daemon", timeout=30)
    t1 = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    w.wait_for(lambda e: e.get("exit_code") == n - 1, timeout=60)
    exits = [e for e in w.events() if e["comm"] == "sh"]  # not the sleeps
    assert [e["exit_code"] for e in exits] == list(range(n)), exits
    # some of them happened during the reload (the gap the ring and the backlog cover)
    assert any(t0 < e["ktime"] < t1 for e in exits)
    _end(c, "keep", "loop")


def test_a_watch_survives_a_daemon_crash(
    c: Containerd, busybox: str, watchers: list[Watcher]
) -> None:
    _keep_daemon(c, busybox)
    w = _watch(c, watchers, "--id", "keep")
    w.said("connected to the daemon")
    (daemon,) = daemons(c)
    os.kill(daemon.pid, signal.SIGKILL)  # the keeper starts a new daemon
    w.said("reconnected to the daemon", timeout=30)
    c.ctr("task", "exec", "--exec-id", "after", "keep", "sh", "-c", "exit 9", check=False)
    after = w.wait_for(lambda e: e.get("exit_code") == 9)
    assert after["container_id"] == "keep"
    _end(c, "keep")
