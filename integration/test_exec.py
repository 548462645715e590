"""Exec processes (runc exec straight from the daemon): statuses, events, signals, many runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from integration.embed import (
    RUNTIME,
    TASK_SERVICE,
    Events,
    bpf_pin_root,
    bundle_dir,
    daemon_paths,
    pending_requests,
)
from integration.harness import Containerd, parse_event, task_list, wait_for
from integration.tasks_grpc import code_of, tasks_client
from shim.api import runc_options_pb2, shim_pb2
from shim.exits.exittrack import ExitTracker
from shim.ttrpc import Client, Code, TTRPCError


@pytest.fixture
def box(containerd: Containerd, busybox: str) -> str:
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    return "box"


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exec_exit_codes(containerd: Containerd, box: str, events: Events, code: int) -> None:
    r = containerd.ctr(
        "task", "exec", "--exec-id", f"x{code}", box, "sh", "-c", f"exit {code}", check=False
    )
    assert r.returncode == code, r.stderr
    payloads = wait_for(lambda: events.payloads("/tasks/exit", box)[-1:], what="exec exit")
    assert f'"id":"x{code}"' in payloads[0]
    if code:
        assert f'"exit_status":{code}' in payloads[0]


def test_exec_events_in_order_and_output(containerd: Containerd, box: str, events: Events) -> None:
    r = containerd.ctr("task", "exec", "--exec-id", "ev", box, "sh", "-c", "echo out; echo err >&2")
    assert (r.stdout, r.stderr) == ("out\n", "err\n")
    wait_for(lambda: events.payloads("/tasks/exit", box), what="exit")
    topics = [
        t
        for t in ("/tasks/exec-added", "/tasks/exec-started", "/tasks/exit")
        for _ in events.payloads(t, box)
    ]
    assert topics == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    order = [ev[1] for ev in map(parse_event, list(events.lines)) if ev and '"box"' in ev[2]]
    assert order.index("/tasks/exec-added") < order.index("/tasks/exec-started")
    assert order.index("/tasks/exec-started") < order.index("/tasks/exit")


@pytest.mark.parametrize(("sig", "want"), [("KILL", 137), ("TERM", 143)])
def test_exec_killed_by_signal(containerd: Containerd, box: str, sig: str, want: int) -> None:
    proc = subprocess.Popen(
        containerd.ctr_argv("task", "exec", "--exec-id", "long", box, "sleep", "1000"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def running() -> bool:  # exec'd: the signal reaches sleep, not runc's init
            pid = {e: p for p, e in _ps(containerd, box).items()}.get("long")
            return pid is not None and _cmdline(pid) == ["sleep", "1000"]

        wait_for(running, what="the exec running sleep")
        containerd.ctr("task", "kill", "--exec-id", "long", "-s", sig, box)
        assert proc.wait(timeout=20) == want
    finally:
        proc.kill()
        proc.wait()


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def test_exec_running_for_seconds(containerd: Containerd, box: str) -> None:
    t0 = time.monotonic()
    r = containerd.ctr(
        "task", "exec", "--exec-id", "slow", box, "sh", "-c", "sleep 2; exit 6", check=False
    )
    assert r.returncode == 6 and time.monotonic() - t0 >= 2


def test_exec_true_is_reliable_200_times(containerd: Containerd, box: str) -> None:
    failures = []
    for i in range(200):
        r = containerd.ctr("task", "exec", "--exec-id", f"t{i}", box, "true", check=False)
        if r.returncode != 0:
            failures.append((i, r.returncode, r.stderr))
    assert failures == []
    tracker = ExitTracker.open_existing(bpf_pin_root(containerd))
    assert tracker is not None
    try:
        assert list(tracker.exits()) == []  # every record consumed
        assert len(tracker.tracked()) == 1  # only the container's init
    finally:
        tracker.close()
    # No file per exec is left behind: not runc's pid files (in the bundle), nor anything in
    # the daemon's directory (process specs and runc's logs are memfds).
    bundle = bundle_dir(containerd, containerd.namespace, box)
    assert [f for f in os.listdir(bundle) if "exec" in f] == []
    assert not os.path.exists(os.path.join(daemon_paths(containerd).dir, "exec"))


def test_exec_errors(containerd: Containerd, box: str, busybox: str) -> None:
    r = containerd.ctr("task", "exec", "--exec-id", "nf", box, "/no/such/binary", check=False)
    assert r.returncode != 0 and "no such file" in r.stderr.lower(), r.stderr
    assert "/no/such/binary" in r.stderr  # runc's own error, from its log (a memfd per exec)
    # The container is untouched.
    assert (
        containerd.ctr("task", "exec", "--exec-id", "ok", box, "true", check=False).returncode == 0
    )
    # Exec in a stopped container is refused.
    containerd.run(RUNTIME, busybox, "done", "true", detach=True)
    wait_for(lambda: "STOPPED" in containerd.ctr("task", "ls").stdout, what="stopped")
    r = containerd.ctr("task", "exec", "--exec-id", "late", "done", "true", check=False)
    assert r.returncode != 0 and "not running" in r.stderr, r.stderr


def test_concurrent_execs(containerd: Containerd, box: str) -> None:
    results: dict[int, int] = {}

    def one(i: int) -> None:
        r = containerd.ctr(
            "task", "exec", "--exec-id", f"c{i}", box, "sh", "-c", f"exit {i}", check=False
        )
        results[i] = r.returncode

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i for i in range(20)}


def _ps(c: Containerd, cid: str) -> dict[int, str]:
    """``ctr task ps`` as {pid: exec id, or "" for the container's own processes}."""
    out = {}
    for line in c.ctr("task", "ps", cid).stdout.splitlines()[1:]:
        pid, _, info = line.strip().partition(" ")
        out[int(pid)] = info.split("ExecID:")[1].split(",")[0] if "ExecID:" in info else ""
    return out


def test_ps_names_the_exec_of_each_pid(containerd: Containerd, box: str) -> None:
    containerd.ctr("task", "exec", "-d", "--exec-id", "sl1", box, "sleep", "1000")
    containerd.ctr("task", "exec", "-d", "--exec-id", "sl2", box, "sleep", "2000")
    init_pid = task_list(containerd)[box][0]
    ps = _ps(containerd, box)
    assert ps[init_pid] == ""
    by_exec = {e: pid for pid, e in ps.items() if e}
    assert set(by_exec) == {"sl1", "sl2"}
    with open(f"/proc/{by_exec['sl2']}/cmdline") as f:
        assert f.read().split("\0")[:2] == ["sleep", "2000"]
    with tasks_client(containerd) as tasks:
        infos = {p.pid: p.info for p in tasks.pids(box).processes}
        assert infos[by_exec["sl1"]].type_url == "containerd.runc.v1.ProcessDetails"
        details = runc_options_pb2.ProcessDetails()
        details.ParseFromString(infos[by_exec["sl1"]].value)
        assert details.exec_id == "sl1"
        assert not infos[init_pid].type_url
        for exec_id in by_exec:
            tasks.kill(box, 9, exec_id)
            assert tasks.wait(box, exec_id) == 137
    assert set(_ps(containerd, box).values()) == {""}  # exited execs are not named


def test_kill_wait_and_delete_of_one_exec(containerd: Containerd, box: str, events: Events) -> None:
    containerd.ctr("task", "exec", "-d", "--exec-id", "one", box, "sleep", "1000")
    containerd.ctr("task", "exec", "-d", "--exec-id", "two", box, "sleep", "1000")
    with tasks_client(containerd) as tasks, ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(tasks.wait, box, "one", 30)
        wait_one = shim_pb2.WaitRequest(id=box, exec_id="one").SerializeToString()
        wait_for(lambda: ("Wait", wait_one) in pending_requests(containerd), what="Wait read")
        with pytest.raises(grpc.RpcError) as info:
            tasks.delete_process(box, "one")
        assert code_of(info.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert not waiter.done()
        containerd.ctr("task", "kill", "--exec-id", "one", "-s", "TERM", box)
        # The Wait was in the daemon before the TERM, and returns the TERM's 143
        assert waiter.result(timeout=20) == 143
        assert tasks.wait(box, "one") == 143  # again, at once
        # Only that exec ended.
        assert "two" in _ps(containerd, box).values()
        assert task_list(containerd)[box][1] == "RUNNING"
        r = containerd.ctr("task", "delete", "--exec-id", "one", box, check=False)
        assert r.returncode == 143, r.stderr  # ctr exits with the deleted process's status
        for call in (
            lambda: tasks.wait(box, "one", 5),
            lambda: tasks.kill(box, 9, "one"),
            lambda: tasks.delete_process(box, "one"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert code_of(info.value) == grpc.StatusCode.NOT_FOUND
        tasks.kill(box, 9, "two")
        assert tasks.wait(box, "two") == 137
        resp = tasks.delete_process(box, "two")
        assert (resp.id, resp.exit_status) == ("two", 137) and resp.pid > 0

    def both_exits() -> list[str] | None:
        found = events.payloads("/tasks/exit", box)
        return found if len(found) == 2 else None

    exits = wait_for(both_exits, what="both exec exits")
    assert '"id":"one"' in exits[0] and '"exit_status":143' in exits[0]
    assert '"id":"two"' in exits[1] and '"exit_status":137' in exits[1]
    assert set(_ps(containerd, box).values()) == {""}
    assert task_list(containerd)[box][1] == "RUNNING"


def test_failed_exec_start_releases_wait(containerd: Containerd, box: str, events: Events) -> None:
    """CRI's ExecSync defers containerd's WithProcessKill, which calls Wait, then Kill, and
    on NotFound waits for that Wait: after a Start that ran nothing, Wait must end at once
    (else ExecSync of a missing binary hangs a minute), with no exit event for it."""
    spec = {"args": ["/no/such/binary"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    exec_req = shim_pb2.ExecProcessRequest(id=box, exec_id="bad")
    exec_req.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process"
    exec_req.spec.value = json.dumps(spec).encode()
    meta = {"containerd-namespace-ttrpc": containerd.namespace}

    async def scenario() -> tuple[Code, float, shim_pb2.WaitResponse, Code]:
        async with await Client.connect(daemon_paths(containerd).address) as client:

            async def call(method: str, msg: object) -> bytes:
                payload = msg.SerializeToString()  # type: ignore[attr-defined]
                return await client.call(TASK_SERVICE, method, payload, metadata=meta, timeout=30)

            await call("Exec", exec_req)
            # containerd's order: Wait is on the wire before Start (the same connection,
            # so the daemon reads it first)
            waiting = asyncio.ensure_future(
                call("Wait", shim_pb2.WaitRequest(id=box, exec_id="bad"))
            )
            pending = client._protocol._pending  # stream id -> reply future, once written
            while not pending:
                await asyncio.sleep(0)
            try:
                await call("Start", shim_pb2.StartRequest(id=box, exec_id="bad"))
                start_code = Code.OK
            except TTRPCError as exc:
                start_code = exc.code
            t = time.monotonic()
            waited = shim_pb2.WaitResponse.FromString(await asyncio.wait_for(waiting, 5))
            took = time.monotonic() - t
            try:
                await call("Kill", shim_pb2.KillRequest(id=box, exec_id="bad", signal=9))
                kill_code = Code.OK
            except TTRPCError as exc:
                kill_code = exc.code
            await call("Delete", shim_pb2.DeleteRequest(id=box, exec_id="bad"))
            return start_code, took, waited, kill_code

    start_code, took, waited, kill_code = asyncio.run(scenario())
    assert start_code != Code.OK
    assert took < 1, took
    assert waited.exit_status == 255
    assert kill_code == Code.NOT_FOUND
    # the container is untouched: an exec after it runs, and its exit event is the sentinel
    # (the daemon sends events in order) after which an exit of "bad" would have come
    assert (
        containerd.ctr("task", "exec", "--exec-id", "ok", box, "true", check=False).returncode == 0
    )
    exits = wait_for(
        lambda: [p for p in events.payloads("/tasks/exit", box) if '"id":"ok"' in p],
        what="the exit of ok",
    )
    assert len(exits) == 1
    assert not [p for p in events.payloads("/tasks/exit", box) if '"id":"bad"' in p]
    assert not [p for p in events.payloads("/tasks/exec-started", box) if '"exec_id":"bad"' in p]
