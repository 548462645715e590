"""A daemon crash loses nothing (issue 11): the keeper holds containerd's connections, a new
daemon serves within a second, containerd notices nothing.

Every test kills the real daemon (kill -9, SIGSEGV, SIGABRT, an exception in its event loop,
MemoryError) under a real containerd and checks what a user relies on: tasks RUNNING with the
same pids, no /tasks/exit or /tasks/delete for them, no cleanup by containerd, output still
flowing, Waits in flight answered with the real exit code, exits while no daemon ran reported
with their codes, and the fallback when the daemon keeps dying.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from integration.embed import (
    RUNTIME,
    SHIM,
    Events,
    bundle_dir,
    call,
    containerd_version_env,
    daemon_paths,
    daemons,
    embed_containerd,
    journal_leftovers,
    oci_spec,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import (
    Containerd,
    ProcInfo,
    mounts_under,
    processes_matching,
    task_list,
    wait_for,
)
from integration.tasks_grpc import code_of, tasks_client
from shim.api import runc_options_pb2, shim_pb2
from shim.store.statestore import StateStore
from shim.ttrpc.blocking import BlockingClient
from shim.ttrpc.codec import FrameDecoder, MessageType, Request, Response, encode_frame
from shim.ttrpc.errors import TTRPCError

DAEMON_SERVICE = "embedshim.v1.Daemon"


def keepers(c: Containerd) -> list[ProcInfo]:
    return processes_matching(
        lambda p: (
            not p.zombie
            and bool(p.cmdline)
            and p.cmdline[-1] == "keeper"
            and any(a.endswith(SHIM) for a in p.cmdline)
            and c.address in p.cmdline
        )
    )


def info(c: Containerd, timeout: float = 2.0) -> dict[str, object] | None:
    try:
        with BlockingClient(daemon_paths(c).address, timeout=timeout) as client:
            out = client.call(DAEMON_SERVICE, "Info", b"")
    except (OSError, TTRPCError):
        return None
    data: dict[str, object] = json.loads(out)
    return data


def _start_all(c: Containerd, busybox: str, ids: list[str], *cmd: str, **kw: object) -> None:
    def one(cid: str) -> None:
        c.run(RUNTIME, busybox, cid, *cmd, detach=True, **kw)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(one, ids))


def _crash(c: Containerd, how: str) -> tuple[int, float]:
    """Crash the daemon ``how``; returns its pid and the seconds until a new one answered."""
    (daemon,) = daemons(c)
    t0 = time.monotonic()
    if how.startswith("SIG"):
        os.kill(daemon.pid, getattr(signal, how))
    else:
        try:
            with BlockingClient(daemon_paths(c).address, timeout=5.0) as client:
                client.call(DAEMON_SERVICE, "Fault", how.encode())
        except (OSError, TTRPCError):
            pass
    try:
        wait_for(
            lambda: (i := info(c, 0.5)) is not None and i["pid"] != daemon.pid,
            timeout=10,
            interval=0.01,
            what="a new daemon answering",
        )
    except Exception:
        with open(daemon_paths(c).log) as f:
            raise AssertionError("no new daemon; its log:\n" + f.read()[-4000:]) from None
    return daemon.pid, time.monotonic() - t0


def _exit_code_from_delete(c: Containerd, cid: str) -> int:
    r = c.ctr("task", "delete", cid)
    if "exit code" not in r.stderr:
        return 0
    return int(r.stderr.split("exit code")[1].split('"')[0].strip())


def _sentinel(c: Containerd, events: Events, busybox: str, name: str) -> None:
    """Every event published before now has reached the subscriber once this one has."""
    c.run(RUNTIME, busybox, name, "true", rm=True)
    events.exit_status(name)


def _no_teardown_by_containerd(c: Containerd, ids: list[str]) -> None:
    """containerd saw no shim of these tasks disconnect (it would have cleaned them up)."""
    torn = [
        line
        for line in c.log_tail(100000).splitlines()
        if "shim disconnected" in line and any(f"id={cid} " in line + " " for cid in ids)
    ]
    assert torn == [], torn


@pytest.fixture(params=["1.6", "2.2.7"])
def any_containerd(request: pytest.FixtureRequest, busybox: str) -> Iterator[Containerd]:
    """Debian's containerd 1.6, and containerd 2.2.7: the shim contract is the same."""
    with embed_containerd(busybox, containerd_version_env(request.param)) as c:
        yield c


def arm_fault(containerd: Containerd, what: bytes) -> None:
    """Ask the daemon for one of its Faults (shim.tasks.service.TaskService.fault)."""
    with BlockingClient(daemon_paths(containerd).address, timeout=5.0) as client:
        client.call(DAEMON_SERVICE, "Fault", what)


def no_zombies_under_us(containerd: Containerd) -> None:
    """Wait until neither the daemon nor the keeper has an unreaped child."""
    ours = {p.pid for p in [*daemons(containerd), *keepers(containerd)]}
    wait_for(
        lambda: not processes_matching(lambda p: p.zombie and p.ppid in ours),
        what="no zombie left under the daemon or the keeper",
    )


def next_exec_keeps_its_code(containerd: Containerd) -> None:
    """The next daemon runs a new exec of container ``box`` and reports its own exit code,
    and leaves no zombie."""
    r = containerd.ctr("task", "exec", "--exec-id", "e2", "box", "sh", "-c", "exit 3",
                       check=False)  # fmt: skip
    assert r.returncode == 3, r.stderr
    no_zombies_under_us(containerd)


def test_kill9_on_containerd_1_6_and_2(any_containerd: Containerd, busybox: str) -> None:
    _kill9_containers_keep_running(any_containerd, busybox, 10)


def test_kill9_with_100_containers(containerd: Containerd, busybox: str) -> None:
    _kill9_containers_keep_running(containerd, busybox, 100)


def _kill9_containers_keep_running(containerd: Containerd, busybox: str, count: int) -> None:
    """kill -9 of the daemon: a new one answers within 1 s, every task keeps running as the
    same process, output keeps flowing, the Wait in flight gets the real exit code, exec /
    pause / resume / metrics / kill work on, and containerd publishes nothing and tears
    nothing down."""
    events = Events(containerd)
    ctl = os.path.join(containerd.tmp, "ctl")
    os.makedirs(ctl)
    ids = [f"live{i:03d}" for i in range(count)]
    _start_all(containerd, busybox, ids, "sleep", "100000")
    # A foreground `ctr run`: its Wait is in flight across the crash, and its output comes
    # through the FIFOs containerd made, read by ctr.
    talker = containerd.ctr_async(
        *containerd.run_args(
            RUNTIME, busybox, "talker", "sh", "-c",
            "i=0; while [ ! -e /ctl/stop ]; do echo line $i; i=$((i+1)); sleep 0.02; done; "
            "exit 7",
            extra=("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw"),
        )
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(talker.stdout or []), daemon=True).start()
    wait_for(lambda: len(lines) > 5, what="talker output")
    before = task_list(containerd)
    (keeper,) = keepers(containerd)

    old_pid, took = _crash(containerd, "SIGKILL")
    assert took < 1.0, f"a new daemon answered only after {took:.2f}s"
    (daemon,) = daemons(containerd)
    assert daemon.ppid == keeper.pid and daemon.pid != old_pid
    seen = len(lines)
    wait_for(lambda: len(lines) > seen + 5, what="output after the crash")
    after = task_list(containerd)
    assert after == before, "a task changed"
    assert all(after[cid][1] == "RUNNING" for cid in [*ids, "talker"])
    assert all(os.path.exists(f"/proc/{after[cid][0]}") for cid in ids)

    # The tasks still work: exec, pause/resume, stats, kill.
    r = containerd.ctr("task", "exec", "--exec-id", "e1", ids[0], "sh", "-c", "exit 5",
                       check=False)  # fmt: skip
    assert r.returncode == 5, r.stderr
    containerd.ctr("task", "pause", ids[1])
    assert task_list(containerd)[ids[1]][1] == "PAUSED"
    containerd.ctr("task", "resume", ids[1])
    assert task_list(containerd)[ids[1]][1] == "RUNNING"
    assert "memory" in containerd.ctr("task", "metrics", "--format", "json", ids[2]).stdout
    containerd.ctr("task", "kill", "-s", "KILL", ids[3])
    wait_for(lambda: task_list(containerd)[ids[3]][1] == "STOPPED", what="killed")
    assert _exit_code_from_delete(containerd, ids[3]) == 137
    assert events.exit_status(ids[3]) == 137

    # The Wait that was in flight returns the real exit code.
    open(os.path.join(ctl, "stop"), "w").close()
    assert talker.wait(timeout=30) == 7
    assert events.exit_status("talker") == 7

    _sentinel(containerd, events, busybox, "sentinel")
    for cid in [*ids[:3], *ids[4:]]:
        inits = [e for e in events.payloads("/tasks/exit", cid) if f'"id":"{cid}"' in e]
        assert inits == [], cid
        assert events.payloads("/tasks/delete", cid) == [], cid
    _no_teardown_by_containerd(containerd, [*ids[:3], *ids[4:]])
    log = open(daemon_paths(containerd).log).read()
    assert "daemon died" in log and "daemon restarted after a crash" in log
    i = info(containerd)
    assert i is not None and i["crashes"] == 1 and i["generation"] == 2
    events.close()


@pytest.mark.parametrize("how", ["SIGSEGV", "SIGABRT", "exception", "memory"])
def test_every_kind_of_crash_is_survived(containerd: Containerd, busybox: str, how: str) -> None:
    events = Events(containerd)
    ids = ["a", "b"]
    _start_all(containerd, busybox, ids, "sleep", "100000")
    before = task_list(containerd)
    _crash(containerd, how)
    assert task_list(containerd) == before
    containerd.ctr("task", "kill", "-s", "KILL", "a")
    wait_for(lambda: task_list(containerd)["a"][1] == "STOPPED", what="a STOPPED")
    assert _exit_code_from_delete(containerd, "a") == 137
    _sentinel(containerd, events, busybox, "sentinel")
    assert events.payloads("/tasks/exit", "b") == []
    _no_teardown_by_containerd(containerd, ["b"])
    if how in ("exception", "memory"):
        log = open(daemon_paths(containerd).log).read()
        assert "unexpected error in the event loop" in log
    events.close()


def test_exit_while_no_daemon_runs_is_reported_with_its_code(
    containerd: Containerd, busybox: str
) -> None:
    """The keeper is stopped so no daemon comes back while the containers exit: a detached
    one with 42, a foreground one (its Wait in flight) with 9, an OOM-killed one."""
    events = Events(containerd)
    ctl = os.path.join(containerd.tmp, "ctl")
    os.makedirs(ctl)
    bind = ("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw")
    containerd.run(RUNTIME, busybox, "d42", "sh", "-c",
                   "while [ ! -e /ctl/go ]; do sleep 0.02; done; exit 42",
                   detach=True, extra=bind)  # fmt: skip
    containerd.run(RUNTIME, busybox, "hog", "sh", "-c",
                   "while [ ! -e /ctl/go ]; do sleep 0.02; done; "
                   "x=a; while true; do x=$x$x$x$x; done",
                   detach=True, extra=(*bind, "--memory-limit", str(32 << 20)))  # fmt: skip
    fg = containerd.ctr_async(
        *containerd.run_args(RUNTIME, busybox, "fg9", "sh", "-c",
                             "while [ ! -e /ctl/go ]; do sleep 0.02; done; exit 9", extra=bind)
    )  # fmt: skip
    wait_for(lambda: task_list(containerd).get("fg9", (0, ""))[1] == "RUNNING", what="fg9")
    pids = {cid: pid for cid, (pid, _) in task_list(containerd).items()}
    (keeper,) = keepers(containerd)
    (daemon,) = daemons(containerd)
    os.kill(keeper.pid, signal.SIGSTOP)
    try:
        os.kill(daemon.pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{daemon.pid}/fd/0"), what="daemon dead")
        open(os.path.join(ctl, "go"), "w").close()
        wait_for(
            lambda: all(not os.path.exists(f"/proc/{p}/fd/0") for p in pids.values()),
            timeout=30,
            what="every container exited",
        )
        assert events.payloads("/tasks/exit", "d42") == []  # nobody could say so yet
    finally:
        os.kill(keeper.pid, signal.SIGCONT)
    assert events.exit_status("d42") == 42
    assert events.exit_status("hog") == 137
    assert fg.wait(timeout=30) == 9
    assert events.exit_status("fg9") == 9
    topics = [t for t in events.topics("hog") if t in ("/tasks/oom", "/tasks/exit")]
    assert topics[0] == "/tasks/oom" and topics[-1] == "/tasks/exit", topics
    _no_teardown_by_containerd(containerd, ["hog"])
    assert _exit_code_from_delete(containerd, "d42") == 42
    events.close()


@pytest.mark.parametrize("how", ["reload", "SIGKILL", "no daemon"])
def test_exec_exit_code_across_a_daemon_restart(
    containerd: Containerd, busybox: str, how: str
) -> None:
    """An exec that exits across a reload, a kill -9 of the daemon, or while no daemon runs
    at all (keeper stopped) is reported with its own code (42) to the `ctr task exec` whose
    Wait was in flight; it is the daemon's own child (runc exec'd it, no wrapper in between)
    and leaves no zombie."""
    ctl = os.path.join(containerd.tmp, "ctl")
    os.makedirs(ctl)
    bind = ("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw")
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True, extra=bind)
    fg = containerd.ctr_async(
        "task", "exec", "--exec-id", "e1", "box", "sh", "-c",
        "while [ ! -e /ctl/go ]; do sleep 0.02; done; exit 42",
    )  # fmt: skip
    (daemon,) = daemons(containerd)
    (keeper,) = keepers(containerd)

    def execs() -> list[ProcInfo]:
        """The exec'd process, once runc is done and it is the daemon's."""
        return processes_matching(lambda p: p.ppid == daemon.pid and p.comm == "sh")

    wait_for(lambda: len(execs()) == 1, what="the exec running as the daemon's child")
    (exec_proc,) = execs()
    exec_pid = exec_proc.pid
    go = os.path.join(ctl, "go")
    if how == "reload":
        log_path = daemon_paths(containerd).log
        reloads = open(log_path).read().count("daemon reloaded")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_for(lambda: open(log_path).read().count("daemon reloaded") > reloads, what="reload")
        open(go, "w").close()
    elif how == "SIGKILL":
        _crash(containerd, "SIGKILL")
        open(go, "w").close()
    else:
        os.kill(keeper.pid, signal.SIGSTOP)
        try:
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{daemon.pid}/fd/0"), what="daemon dead")
            open(go, "w").close()
            wait_for(lambda: not os.path.exists(f"/proc/{exec_pid}/fd/0"), what="exec exited")
        finally:
            os.kill(keeper.pid, signal.SIGCONT)
    assert fg.wait(timeout=30) == 42, fg.stderr.read() if fg.stderr else ""
    next_exec_keeps_its_code(containerd)


def test_exec_gone_before_its_start_was_published_keeps_its_exit_code(
    containerd: Containerd, busybox: str
) -> None:
    """An exec whose process had already ended when the daemon read its pid (too early for
    the BPF exit map) and the daemon killed right after that exec's first record was written,
    before TaskExecStarted and its exit went out (the Fault ``kill-in-exec-exit-window``):
    the `ctr task exec` in flight gets the exec's own exit code from the next daemon, not 255
    (unknown), and no zombie is left."""
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    (daemon,) = daemons(containerd)
    log_path = daemon_paths(containerd).log
    arm_fault(containerd, b"kill-in-exec-exit-window")
    r = containerd.ctr("task", "exec", "--exec-id", "e1", "box", "sh", "-c", "exit 7",
                       check=False)  # fmt: skip
    assert not os.path.exists(f"/proc/{daemon.pid}/fd/0"), "the Fault did not kill the daemon"
    assert r.returncode == 7, r.stderr
    assert "exec exit status unknown" not in open(log_path).read()
    next_exec_keeps_its_code(containerd)


def test_init_gone_before_its_registration_keeps_its_exit_code(
    containerd: Containerd, busybox: str
) -> None:
    """A container's init killed after `runc create` and before its BPF registration (as the
    OOM killer could while runc sets it up), and the daemon killed right after that exit was
    written to the record (the Fault ``kill-in-create-exit-window``): the next daemon reports
    the init's real end, SIGKILL (137), not 255 (unknown), and no zombie is left."""
    containerd.run(RUNTIME, busybox, "first", "sleep", "100000", detach=True)
    (daemon,) = daemons(containerd)
    log_path = daemon_paths(containerd).log
    events = Events(containerd)
    try:
        arm_fault(containerd, b"kill-in-create-exit-window")
        args = containerd.run_args(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
        containerd.ctr(*args, check=False)  # its Start finds the init gone: ctr may fail
        assert not os.path.exists(f"/proc/{daemon.pid}/fd/0"), "the Fault did not kill the daemon"
        assert events.exit_status("box") == 137
        assert "exit status unknown" not in open(log_path).read()
        # the early exit was written to the record, not refused by the store
        assert "init gone before its BPF registration" not in open(log_path).read()
        assert task_list(containerd)["first"][1] == "RUNNING"
    finally:
        events.close()
    no_zombies_under_us(containerd)


def test_delete_done_but_not_answered_is_answered_by_the_next_daemon(
    containerd: Containerd, busybox: str
) -> None:
    """The daemon is killed right after a Delete removed an exec, then a task, and before
    its answer (the Fault ``kill-after-delete``: the window a crash hits by chance): the
    next daemon answers the `ctr task delete` with the process's real exit status, and
    nothing of either is left."""
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    containerd.ctr("task", "exec", "-d", "--exec-id", "e1", "box", "sh", "-c", "exit 5")
    with tasks_client(containerd) as tasks:
        assert tasks.wait("box", "e1") == 5
    log_path = daemon_paths(containerd).log

    def delete_killing_the_daemon(*args: str) -> subprocess.CompletedProcess[str]:
        (daemon,) = daemons(containerd)
        arm_fault(containerd, b"kill-after-delete")
        r = containerd.ctr("task", "delete", *args, check=False)
        assert not os.path.exists(f"/proc/{daemon.pid}/fd/0"), "the daemon lived on"
        return r

    def replayed() -> int:
        return open(log_path).read().count("delete of the dead daemon answered")

    r = delete_killing_the_daemon("--exec-id", "e1", "box")
    assert r.returncode == 5, r.stderr  # ctr exits with the deleted exec's status
    assert replayed() == 1
    with tasks_client(containerd) as tasks:
        with pytest.raises(grpc.RpcError) as exc:
            tasks.delete_process("box", "e1")
        assert code_of(exc.value) == grpc.StatusCode.NOT_FOUND
    assert task_list(containerd)["box"][1] == "RUNNING"
    containerd.ctr("task", "kill", "-s", "KILL", "box")
    with tasks_client(containerd) as tasks:
        assert tasks.wait("box") == 137
    r = delete_killing_the_daemon("box")
    assert r.returncode == 0 and "exit with non-zero exit code 137" in r.stderr, r.stderr
    assert replayed() == 2
    assert "box" not in task_list(containerd)
    bundle = bundle_dir(containerd, containerd.namespace, "box")
    assert not os.path.exists(bundle) and mounts_under(os.path.dirname(bundle)) == []
    paths = daemon_paths(containerd)
    runc_root = paths.runc_root_for(containerd.namespace)
    assert not os.path.isdir(runc_root) or os.listdir(runc_root) == []
    store = StateStore(paths.store)
    try:
        assert store.count() == 0
    finally:
        store.close()


SLOW_RUNC = """#!/bin/sh
# runc, one second late to create: time enough for the daemon to die meanwhile.
for a in "$@"; do [ "$a" = create ] && sleep 1; done
exec runc "$@"
"""


@pytest.mark.parametrize("caller", ["waits", "leaves"])
def test_create_in_flight(containerd: Containerd, busybox: str, caller: str) -> None:
    """The daemon dies while runc creates a container.  A caller still waiting gets its
    container (the new daemon undoes the half-made one and creates it again); for a caller
    that left while no daemon ran, nothing is left behind: no runc state, mount, cgroup or
    store row."""
    ns = "direct"
    fake = os.path.join(containerd.tmp, "slow-runc")
    with open(fake, "w") as f:
        f.write(SLOW_RUNC)
    os.chmod(fake, 0o755)
    b = write_bundle(containerd, ns, "c1", oci_spec(busybox, "sleep", "1000"))
    address = start_daemon(containerd, b, ns, "c1")
    req = shim_pb2.CreateTaskRequest(id="c1", bundle=b)
    req.options.type_url = "containerd.runc.v1.Options"
    req.options.value = runc_options_pb2.Options(binary_name=fake).SerializeToString()
    frame = encode_frame(
        1,
        MessageType.REQUEST,
        Request(
            "containerd.task.v2.Task",
            "Create",
            req.SerializeToString(),
            metadata=(("containerd-namespace-ttrpc", ns),),
        ).encode(),
    )
    peer = socket.socket(socket.AF_UNIX)
    peer.connect(daemon_paths(containerd).socket)
    peer.sendall(frame)
    wait_for(lambda: _running(fake), what="runc create under way")
    (keeper,) = keepers(containerd)
    (daemon,) = daemons(containerd)
    runc_root = daemon_paths(containerd).runc_root_for(ns)
    if caller == "waits":
        os.kill(daemon.pid, signal.SIGKILL)
        peer.settimeout(60)
        decoder = FrameDecoder()
        frames: list[object] = []
        while not frames:
            data = peer.recv(65536)
            assert data, "connection closed"
            frames = list(decoder.feed(data))
        response = Response.decode(frames[0].payload)  # type: ignore[attr-defined]
        assert response.status.code == 0, response.status
        pid = shim_pb2.CreateTaskResponse.FromString(response.payload).pid
        assert pid > 0 and os.path.exists(f"/proc/{pid}")
        assert sorted(os.listdir(runc_root)) == ["c1"]
        run(call(address, "Delete", shim_pb2.DeleteRequest(id="c1"), ns))
    else:
        os.kill(keeper.pid, signal.SIGSTOP)
        try:
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda: not os.path.exists(f"/proc/{daemon.pid}/fd/0"), what="dead")
            peer.close()
        finally:
            os.kill(keeper.pid, signal.SIGCONT)
        wait_for(lambda: info(containerd) is not None, what="a new daemon")
        wait_for(lambda: not _running(fake), timeout=30, what="the dead daemon's runc done")
        wait_for(
            lambda: not os.path.isdir(runc_root) or os.listdir(runc_root) == [],
            timeout=30,
            what="runc state removed",
        )
        log_path = daemon_paths(containerd).log
        wait_for(lambda: "interrupted create undone" in open(log_path).read(), what="undone")
    peer.close()
    assert not os.path.isdir(runc_root) or os.listdir(runc_root) == []
    assert mounts_under(b) == []
    assert not os.path.exists("/sys/fs/cgroup/memory/c1")  # runc's default cgroup for it
    store = StateStore(daemon_paths(containerd).store)
    try:
        assert store.count() == 0
    finally:
        store.close()
    wait_for(lambda: journal_leftovers(containerd) == [], what="nothing left in the journal")


def _running(needle: str) -> bool:
    return bool(processes_matching(lambda p: not p.zombie and needle in p.cmdline))


def test_crash_loop_falls_back_to_teardown(containerd: Containerd, busybox: str) -> None:
    """Five crashes within a minute: the keeper stops restarting the daemon and lets go of
    the connections; containerd tears the tasks down and learns their real exit codes."""
    events = Events(containerd)
    containerd.run(RUNTIME, busybox, "done33", "sh", "-c", "exit 33", detach=True)
    containerd.run(RUNTIME, busybox, "live", "sleep", "100000", detach=True)
    wait_for(lambda: task_list(containerd)["done33"][1] == "STOPPED", what="done33")
    (keeper,) = keepers(containerd)
    for _ in range(4):
        _crash(containerd, "SIGKILL")
    (daemon,) = daemons(containerd)
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{keeper.pid}/fd/0"), what="keeper gave up")
    wait_for(lambda: not task_list(containerd), timeout=30, what="every task dropped")
    assert events.exit_status("done33") == 33
    assert events.exit_status("live") == 137
    log = open(daemon_paths(containerd).log).read()
    assert "crash loop" in log
    assert daemons(containerd) == [] and keepers(containerd) == []
    r = containerd.run(RUNTIME, busybox, "after", "sh", "-c", "echo again", check=False)
    assert r.stdout == "again\n" and r.returncode == 0
    events.close()


def test_keeper_killed_daemon_serves_on(containerd: Containerd, busybox: str) -> None:
    """kill -9 of the keeper costs nothing: the daemon keeps its connections and accepts
    new ones itself.  Only a daemon crash after that ends the tasks (the old behaviour),
    each with its real exit code."""
    events = Events(containerd)
    containerd.run(RUNTIME, busybox, "done5", "sh", "-c", "exit 5", detach=True)
    containerd.run(RUNTIME, busybox, "live", "sleep", "100000", detach=True)
    wait_for(lambda: task_list(containerd)["done5"][1] == "STOPPED", what="done5")
    (keeper,) = keepers(containerd)
    (daemon,) = daemons(containerd)
    os.kill(keeper.pid, signal.SIGKILL)
    wait_for(lambda: not keepers(containerd), what="keeper gone")
    r = containerd.run(RUNTIME, busybox, "new", "sh", "-c", "echo hi; exit 3", check=False)
    assert (r.stdout, r.returncode) == ("hi\n", 3)
    assert task_list(containerd)["live"][1] == "RUNNING"
    assert [d.pid for d in daemons(containerd)] == [daemon.pid]
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not task_list(containerd), timeout=30, what="every task dropped")
    assert events.exit_status("done5") == 5
    assert events.exit_status("live") == 137
    events.close()


def test_chaos_twenty_kills_during_churn(containerd: Containerd, busybox: str) -> None:
    """200 containers (or more: until the last kill) created, exec'd into, killed and deleted
    4 at a time while the daemon is killed 20 times at random moments (never 5 within the
    keeper's crash-loop window): every operation succeeds, every exit code is right, nothing
    is lost or left behind."""
    rng = random.Random(11)
    total, workers, kills = 200, 4, 20
    failures: list[str] = []
    done: list[str] = []
    stop = threading.Event()

    def cycle(i: int) -> None:
        cid = f"c{i:03d}"
        code = i % 50
        try:
            if i % 2:
                # Ends by itself with its code.
                containerd.run(RUNTIME, busybox, cid, "sh", "-c", f"sleep 0.3; exit {code}",
                               detach=True)  # fmt: skip
                want = code
            else:
                containerd.run(RUNTIME, busybox, cid, "sleep", "100000", detach=True)
                r = containerd.ctr("task", "exec", "--exec-id", "e", cid, "sh", "-c",
                                   f"exit {code}", check=False)  # fmt: skip
                if r.returncode != code:
                    failures.append(f"{cid}: exec returned {r.returncode}: {r.stderr}")
                containerd.ctr("task", "kill", "-s", "KILL", cid)
                want = 137
            wait_for(lambda: task_list(containerd)[cid][1] == "STOPPED", timeout=60, what=cid)
            got = _exit_code_from_delete(containerd, cid)
            if got != want:
                failures.append(f"{cid}: exit code {got}, want {want}")
            containerd.ctr("container", "delete", cid)
            done.append(cid)
        except Exception as exc:
            failures.append(f"{cid}: {exc!r}")

    def killer() -> None:
        for _ in range(kills):
            if stop.wait(rng.uniform(2.3, 3.3)):  # at most 4 in any 10 s
                return
            found = daemons(containerd)
            if found:
                os.kill(found[0].pid, signal.SIGKILL)
                killed.append(found[0].pid)

    killed: list[int] = []
    k = threading.Thread(target=killer)
    counter = iter(range(100_000))
    lock = threading.Lock()

    def worker() -> None:
        # At least `total` containers, and on until every kill has happened.
        while True:
            with lock:
                i = next(counter)
            if i >= total and not k.is_alive():
                return
            cycle(i)

    k.start()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda _: worker(), range(workers)))
    finally:
        stop.set()
        k.join()
    if failures:
        cids = {f.split(":")[0] for f in failures}
        with open(daemon_paths(containerd).log) as f:
            lines = [ln for ln in f if any(f"id={c} " in ln for c in cids) or "dead" in ln]
        raise AssertionError("\n".join([*failures[:10], "daemon log:", *lines[-60:]]))
    assert len(done) >= total
    assert len(killed) == kills
    wait_for(lambda: info(containerd) is not None, what="a daemon after the last kill")
    assert task_list(containerd) == {}
    paths = daemon_paths(containerd)
    runc_root = paths.runc_root_for("test")
    assert not os.path.isdir(runc_root) or os.listdir(runc_root) == []
    state_dir = os.path.join(containerd.state, "io.containerd.runtime.v2.task")
    assert mounts_under(state_dir) == []
    store = StateStore(paths.store)
    try:
        assert store.count() == 0
    finally:
        store.close()
    assert journal_leftovers(containerd) == []
    zombies = processes_matching(
        lambda p: p.zombie and p.ppid in {d.pid for d in daemons(containerd)}
    )
    assert zombies == []


def test_a_connection_made_after_a_reload_survives_a_crash(
    containerd: Containerd, busybox: str
) -> None:
    """After a reload (SIGHUP: the daemon re-executes itself) the keeper still accepts
    containerd's connections, so the next crash loses none.  A connection the re-executed
    daemon accepted itself would close with it, and containerd, which never reconnects,
    would answer that pod's or task's every call with "ttrpc: closed".  The keeper is
    stopped while the connection is made, so only the daemon could take it then."""
    containerd.run(RUNTIME, busybox, "live", "sleep", "100000", detach=True)
    (daemon,) = daemons(containerd)
    (keeper,) = keepers(containerd)
    log_path = daemon_paths(containerd).log
    reloads = open(log_path).read().count("daemon reloaded")
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: open(log_path).read().count("daemon reloaded") > reloads, what="reload")
    os.kill(keeper.pid, signal.SIGSTOP)
    try:
        client = BlockingClient(daemon_paths(containerd).address, timeout=10.0)
        time.sleep(0.5)  # time for the daemon to take it, if it listened
    finally:
        os.kill(keeper.pid, signal.SIGCONT)
    with client:
        before = json.loads(client.call(DAEMON_SERVICE, "Info", b""))
        _crash(containerd, "SIGKILL")
        after = json.loads(client.call(DAEMON_SERVICE, "Info", b""))  # the same connection
    assert after["pid"] != before["pid"] == daemon.pid
    assert task_list(containerd)["live"][1] == "RUNNING"
