"""The vertical slice: ctr through our runtime on a real containerd and runc, on Debian's
containerd 1.6 and on containerd 2.2.7 (config version 3; skipped where
../shared/containerd2 is missing)."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from integration.embed import (
    RUNTIME,
    Events,
    call,
    containerd_version_env,
    daemon_paths,
    daemons,
    embed_containerd,
    kill_daemon_for_good,
    oci_spec,
    run,
    runtime_info_failures,
    start_daemon,
    write_bundle,
)
from integration.harness import (
    Containerd,
    mounts_under,
    parse_event,
    process_refers_to,
    processes_matching,
    task_list,
    wait_for,
)
from shim.api import shim_pb2
from shim.oci import piddir
from shim.ttrpc import Code, TTRPCError


@pytest.fixture(params=["1.6", "2.2.7"])
def containerd(request: pytest.FixtureRequest, busybox: str) -> Iterator[Containerd]:
    """conftest's private containerd, once per version: Debian's 1.6, and 2.2.7."""
    with embed_containerd(busybox, containerd_version_env(request.param)) as c:
        assert c.version[:1] == ((2,) if request.param == "2.2.7" else (1,))
        yield c
        # containerd 2.x asks our shim for its RuntimeInfo (-info) before the first task of
        # the runtime, and logs this at every Create while it fails
        assert not runtime_info_failures(c)


def test_run_prints_output_and_exits_with_the_container_status(
    containerd: Containerd, busybox: str
) -> None:
    r = containerd.run(RUNTIME, busybox, "demo", "sh", "-c", "echo hi; exit 7", check=False)
    assert r.stdout == "hi\n", r.stderr
    assert r.returncode == 7, r.stderr
    # ctr deleted the task; the container record goes with `ctr c rm`.
    assert "demo" not in task_list(containerd)


def test_kill_sigkill_reports_137(containerd: Containerd, busybox: str) -> None:
    containerd.run(RUNTIME, busybox, "k1", "sleep", "1000", detach=True)
    assert task_list(containerd)["k1"][1] == "RUNNING"
    containerd.ctr("task", "kill", "-s", "KILL", "k1")
    wait_for(lambda: task_list(containerd)["k1"][1] == "STOPPED", what="task STOPPED")
    r = containerd.ctr("task", "delete", "k1")
    assert "exit code 137" in r.stderr, r.stderr
    assert "k1" not in task_list(containerd)
    containerd.ctr("container", "delete", "k1")


def test_twenty_containers_share_one_daemon(containerd: Containerd, busybox: str) -> None:
    ids = [f"c{i:02d}" for i in range(20)]

    def start(cid: str) -> None:
        containerd.run(RUNTIME, busybox, cid, "sleep", "1000", detach=True)

    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(start, ids))
    tasks = task_list(containerd)
    assert all(tasks[cid][1] == "RUNNING" for cid in ids), tasks
    found = daemons(containerd)
    assert len(found) == 1, [p.cmdline for p in found]
    # Every container's init is a child of that one daemon (it is a subreaper).
    daemon_pid = found[0].pid
    for cid in ids:
        pid = tasks[cid][0]
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid == daemon_pid, (cid, pid, ppid)
    # No shim process per container: the daemon and its keeper, whose parent it is.
    shims = processes_matching(
        lambda p: (
            not p.zombie
            and any("containerd-shim" in a for a in p.cmdline)
            and process_refers_to(p, [containerd.tmp])
        )
    )
    assert sorted(p.cmdline[-1] for p in shims) == ["daemon", "keeper"], [p.cmdline for p in shims]
    keeper = next(p for p in shims if p.cmdline[-1] == "keeper")
    assert found[0].ppid == keeper.pid


def test_events_in_order_with_exit_status(containerd: Containerd, busybox: str) -> None:
    events = Events(containerd)  # subscribed once this returns: no sleep needed
    try:
        r = containerd.run(RUNTIME, busybox, "ev1", "sh", "-c", "exit 3", check=False)
        assert r.returncode == 3
        wait_for(lambda: "/tasks/delete" in events.topics("ev1"), what="/tasks/delete")
        events.sync()  # anything containerd published about ev1 is in by now
        assert events.topics("ev1") == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ]
        (exit_payload,) = events.payloads("/tasks/exit", "ev1")
        assert '"exit_status":3' in exit_payload, exit_payload
        assert '"id":"ev1"' in exit_payload, exit_payload
    finally:
        events.close()


# --- errors, straight through the daemon's ttrpc socket -------------------------------------


def _bundle(containerd: Containerd, busybox: str, ns: str, cid: str, config: object) -> str:
    return write_bundle(containerd, ns, cid, config)


def _spec(busybox: str, *args: str) -> dict[str, object]:
    return oci_spec(busybox, *args)


def _call(address: str, method: str, msg: object, ns: str = "direct") -> Coroutine[Any, Any, bytes]:
    return call(address, method, msg, ns)


def _code(address: str, method: str, msg: object) -> Code:
    with pytest.raises(TTRPCError) as info:
        run(_call(address, method, msg))
    return info.value.code


def test_errors_have_the_codes_containerd_expects(containerd: Containerd, busybox: str) -> None:
    good = _bundle(containerd, busybox, "direct", "e1", _spec(busybox, "sleep", "1000"))
    address = start_daemon(containerd, good, "direct", "e1")
    paths = daemon_paths(containerd)
    assert address == paths.address
    with open(os.path.join(good, "address")) as f:
        assert f.read() == address

    create = shim_pb2.CreateTaskRequest(id="e1", bundle=good)
    pid = shim_pb2.CreateTaskResponse.FromString(run(_call(address, "Create", create))).pid
    assert pid > 0
    try:
        assert _code(address, "Create", create) == Code.ALREADY_EXISTS
        assert _code(address, "State", shim_pb2.StateRequest(id="nope")) == Code.NOT_FOUND
        assert _code(address, "Kill", shim_pb2.KillRequest(id="nope", signal=9)) == Code.NOT_FOUND
        assert _code(address, "Create", shim_pb2.CreateTaskRequest(id="../x", bundle=good)) == (
            Code.INVALID_ARGUMENT
        )

        bad = _bundle(containerd, busybox, "direct", "e2", "{not json")
        req = shim_pb2.CreateTaskRequest(id="e2", bundle=bad)
        with pytest.raises(TTRPCError) as info:
            run(_call(address, "Create", req))
        assert info.value.code == Code.INVALID_ARGUMENT
        assert "config.json" in info.value.message
        # Nothing of e2 left: no runc state, no record, no mount, no pid file.
        runc_root = paths.runc_root_for("direct")
        assert not os.path.exists(os.path.join(runc_root, "e2"))
        assert sorted(os.listdir(bad)) == ["config.json"]
        assert mounts_under(bad) == []
        # runc refuses a config it cannot run: a clear error, nothing left behind.
        spec = _spec(busybox, "/no/such/binary")
        bad2 = _bundle(containerd, busybox, "direct", "e3", spec)
        with pytest.raises(TTRPCError) as info:
            run(_call(address, "Create", shim_pb2.CreateTaskRequest(id="e3", bundle=bad2)))
        assert "no such file" in info.value.message.lower(), info.value.message
        assert not os.path.exists(os.path.join(runc_root, "e3"))
        # The running task was not disturbed by any of it.
        state = shim_pb2.StateResponse.FromString(
            run(_call(address, "State", shim_pb2.StateRequest(id="e1")))
        )
        assert state.status == 1 and state.pid == pid  # CREATED, never started
    finally:
        run(_call(address, "Kill", shim_pb2.KillRequest(id="e1", signal=9)))
        wait = shim_pb2.WaitResponse.FromString(
            run(_call(address, "Wait", shim_pb2.WaitRequest(id="e1")))
        )
        assert wait.exit_status == 137
        run(_call(address, "Delete", shim_pb2.DeleteRequest(id="e1")))


def test_delete_subcommand_after_daemon_crash(containerd: Containerd, busybox: str) -> None:
    """kill -9 the daemon with no keeper to restart it: containerd runs `delete` per task,
    which ends each container and reports it; nothing is left running."""
    events = containerd.ctr_async("events")
    lines: list[str] = []
    threading.Thread(
        target=lambda: [lines.append(line) for line in events.stdout or []], daemon=True
    ).start()
    ids = ["d1", "d2", "d3"]
    for cid in ids:
        containerd.run(RUNTIME, busybox, cid, "sleep", "1000", detach=True)
    pids = {cid: pid for cid, (pid, _) in task_list(containerd).items()}
    pid_dir = piddir.path_for(daemon_paths(containerd).dir)
    assert sorted(os.listdir(pid_dir)) == [piddir.file_name("test", cid) for cid in ids]
    kill_daemon_for_good(containerd)
    wait_for(lambda: not task_list(containerd), timeout=20, what="containerd dropped the tasks")
    for cid in ids:
        wait_for(lambda cid=cid: not os.path.exists(f"/proc/{pids[cid]}"), what=f"{cid} gone")
    assert os.listdir(pid_dir) == []  # `delete` took each task's pid file too

    def exit_payloads(cid: str) -> list[str]:
        evs = [parse_event(x) for x in list(lines)]
        return [e[2] for e in evs if e and e[1] == "/tasks/exit" and f'"{cid}"' in e[2]]

    for cid in ids:
        payloads = wait_for(lambda cid=cid: exit_payloads(cid), what=f"/tasks/exit of {cid}")
        assert '"exit_status":137' in payloads[-1].replace(" ", ""), payloads
    out = subprocess.run(
        ["runc", "--root", daemon_paths(containerd).runc_root_for("test"), "list", "-q"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == ""
    events.kill()


def test_container_starts_with_no_signal_ignored(containerd: Containerd, busybox: str) -> None:
    """Nothing the daemon inherited or spawned with leaks into the container: glibc's
    posix_spawn, for one, would leave its signals 32 and 33 ignored."""
    r = containerd.run(RUNTIME, busybox, "sigs", "grep", "SigIgn", "/proc/self/status")
    assert r.stdout.split() == ["SigIgn:", "0000000000000000"], r.stdout
