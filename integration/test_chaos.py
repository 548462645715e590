"""Restart and recovery, each with 20 containers: containerd killed, the daemon reloaded in
place while containers come and go, the daemon killed without its keeper, and a recycled pid.
(A daemon killed under its keeper: test_crash.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from integration.embed import RUNTIME, SHIM, daemon_paths, daemons, shim_command
from integration.harness import Containerd, mounts_under, task_list, wait_for
from shim.store.statestore import ProcessRecord, StateStore

N = 20


def _start_all(
    c: Containerd, busybox: str, specs: dict[str, tuple[str, ...]], **kw: object
) -> None:
    def one(cid: str) -> None:
        c.run(RUNTIME, busybox, cid, *specs[cid], detach=True, **kw)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, specs))


def _exit_code_from_delete(c: Containerd, cid: str) -> int:
    r = c.ctr("task", "delete", cid)
    if "exit code" not in r.stderr:
        return 0
    return int(r.stderr.split("exit code")[1].split('"')[0].strip())


def test_containerd_killed_and_restarted(containerd: Containerd, busybox: str) -> None:
    ctl = os.path.join(containerd.tmp, "ctl")
    os.makedirs(ctl)
    log_file = os.path.join(containerd.tmp, "counter.log")
    specs: dict[str, tuple[str, ...]] = {f"run{i:02d}": ("sleep", "100000") for i in range(14)}
    for i in range(5):
        # Exits with 10+i once told to, while containerd is down.
        specs[f"exit{i}"] = (
            "sh", "-c", f"while [ ! -e /ctl/go{i} ]; do sleep 0.05; done; exit {10 + i}",
        )  # fmt: skip
    _start_all(
        containerd,
        busybox,
        specs,
        extra=("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw"),
    )
    containerd.run(
        RUNTIME, busybox, "talker", "sh", "-c",
        "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done",
        detach=True, extra=("--log-uri", f"file://{log_file}"),
    )  # fmt: skip
    (daemon,) = daemons(containerd)
    wait_for(lambda: os.path.getsize(log_file) > 0, what="output before")

    containerd.kill9()
    for i in range(5):
        open(os.path.join(ctl, f"go{i}"), "w").close()
    size_down = os.path.getsize(log_file)
    wait_for(lambda: os.path.getsize(log_file) > size_down, what="output while containerd is down")
    assert not containerd.running
    containerd.start()

    tasks = task_list(containerd)
    running = [cid for cid in specs if cid.startswith("run")] + ["talker"]
    assert {cid: tasks[cid][1] for cid in running} == dict.fromkeys(running, "RUNNING")
    assert [p.pid for p in daemons(containerd)] == [daemon.pid]  # the same daemon, kept
    for i in range(5):
        cid = f"exit{i}"
        wait_for(lambda cid=cid: task_list(containerd)[cid][1] == "STOPPED", what=cid)
        assert _exit_code_from_delete(containerd, cid) == 10 + i
    size = os.path.getsize(log_file)
    wait_for(lambda: os.path.getsize(log_file) > size, what="output after restart")
    # The restarted containerd still drives the old tasks.
    containerd.ctr("task", "kill", "-s", "KILL", "run00")
    wait_for(lambda: task_list(containerd)["run00"][1] == "STOPPED")
    assert _exit_code_from_delete(containerd, "run00") == 137


def test_reload_while_containers_come_and_go(containerd: Containerd, busybox: str) -> None:
    """Three reloads, each while a foreground `ctr run` waits on a running container (held
    until the reload is done) and others start and exit around it."""
    ctl = os.path.join(containerd.tmp, "ctl")
    os.makedirs(ctl)
    specs: dict[str, tuple[str, ...]] = {f"long{i:02d}": ("sleep", "100000") for i in range(10)}
    # Exits 42 on SIGTERM: proof that the reloaded daemon signals a task it took back.
    specs["long00"] = ("sh", "-c", 'trap "exit 42" TERM; while :; do sleep 1000 & wait; done')
    _start_all(containerd, busybox, specs)
    (daemon,) = daemons(containerd)
    with open(f"/proc/{daemon.pid}/stat") as f:
        start_ticks = f.read().rsplit(")", 1)[1].split()[19]
    results: dict[str, int] = {}
    want = {f"short{i:02d}": 20 + i for i in range(N - 10)}
    held = ["short02", "short05", "short08"]  # each runs until a reload has been done
    mount = ("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw")

    def churn() -> None:
        for cid, code in want.items():
            script = (
                f"while [ ! -e /ctl/{cid} ]; do sleep 0.05; done; exit {code}"
                if cid in held
                else f"sleep 0.3; exit {code}"
            )
            r = containerd.run(RUNTIME, busybox, cid, "sh", "-c", script, rm=True, check=False,
                               extra=mount, timeout=120)  # fmt: skip
            results[cid] = r.returncode

    worker = threading.Thread(target=churn)
    worker.start()
    infos = []
    try:
        for cid in held:
            wait_for(
                lambda cid=cid: task_list(containerd).get(cid, (0, ""))[1] == "RUNNING",
                timeout=60,
                what=f"{cid} running",
            )
            assert cid not in results  # its `ctr run` is waiting on it
            r = shim_command(containerd, "reload")
            assert r.returncode == 0, r.stderr
            infos.append(json.loads(r.stdout))
            open(os.path.join(ctl, cid), "w").close()  # now let it exit
    finally:
        for cid in held:  # never leave the churn stuck on a failure above
            open(os.path.join(ctl, cid), "w").close()
        worker.join(timeout=180)
    assert results == want  # 0 wrong codes, the held ones' Waits across a reload included
    tasks = task_list(containerd)
    assert {cid: tasks[cid][1] for cid in specs} == dict.fromkeys(specs, "RUNNING")  # 0 dropped
    assert len(infos) == len(held)
    for info in infos:
        assert info["after"]["pid"] == info["before"]["pid"] == daemon.pid
        assert info["after"]["started_at"] > info["before"]["started_at"]  # a new image
    with open(f"/proc/{daemon.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[19] == start_ticks  # the same process
    containerd.ctr("task", "kill", "-s", "TERM", "long00")
    containerd.ctr("task", "kill", "-s", "KILL", "long01")
    for cid in ("long00", "long01"):
        wait_for(lambda cid=cid: task_list(containerd)[cid][1] == "STOPPED", what=cid)
    assert _exit_code_from_delete(containerd, "long00") == 42
    assert _exit_code_from_delete(containerd, "long01") == 137
    assert task_list(containerd)["long02"][1] == "RUNNING"  # only those two were signalled


def test_daemon_killed_without_keeper_every_task_reported_and_cleaned(
    containerd: Containerd, busybox: str, busybox_image: str, events: object
) -> None:
    """With its keeper gone first (so nothing holds containerd's connections), a daemon
    crash is what it was before the keeper: containerd tears every task down, each with its
    real exit status, and nothing is left behind."""
    from integration.embed import Events

    assert isinstance(events, Events)
    codes = {f"done{i}": 30 + i for i in range(5)}
    for cid, code in codes.items():
        containerd.run(RUNTIME, busybox, cid, "sh", "-c", f"exit {code}", detach=True)
    specs = {f"live{i:02d}": ("sleep", "100000") for i in range(10)}
    _start_all(containerd, busybox, specs)
    images = [f"img{i}" for i in range(N - 15)]
    for cid in images:  # overlay rootfs mounted by the shim
        containerd.run(RUNTIME, busybox_image, cid, "sleep", "100000", detach=True, image=True)
    for cid in codes:
        wait_for(lambda cid=cid: task_list(containerd)[cid][1] == "STOPPED")
    pids = {cid: pid for cid, (pid, _) in task_list(containerd).items()}
    state_dir = os.path.join(containerd.state, "io.containerd.runtime.v2.task")
    assert len(mounts_under(state_dir)) == len(images)

    (daemon,) = daemons(containerd)
    os.kill(daemon.ppid, signal.SIGKILL)  # its keeper
    wait_for(lambda: not os.path.exists(f"/proc/{daemon.ppid}/fd/0"), what="keeper gone")
    os.kill(daemon.pid, signal.SIGKILL)
    wait_for(lambda: not task_list(containerd), timeout=30, what="every task dropped")
    for cid, code in codes.items():
        assert events.exit_status(cid) == code
    for cid in [*specs, *images]:
        assert events.exit_status(cid) == 137
    live = [pid for cid, pid in pids.items() if cid not in codes]
    wait_for(lambda: not [p for p in live if os.path.exists(f"/proc/{p}")], what="all gone")
    runc_root = daemon_paths(containerd).runc_root_for("test")
    out = subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True,
                         text=True)  # fmt: skip
    assert out.stdout.split() == []
    assert mounts_under(state_dir) == []
    store = StateStore(daemon_paths(containerd).store)
    try:
        assert store.count() == 0
    finally:
        store.close()
    # A new daemon comes up for the next container.
    r = containerd.run(RUNTIME, busybox, "after", "sh", "-c", "echo again", check=False)
    assert r.stdout == "again\n" and r.returncode == 0


def test_recycled_pid_is_never_signalled(containerd: Containerd, busybox: str) -> None:
    """A state row whose pid now belongs to an unrelated process: neither `delete` nor a
    restored daemon may signal it."""
    bystander = subprocess.Popen(["sleep", "1000"])
    try:
        containerd.run(RUNTIME, busybox, "real", "sleep", "100000", detach=True)
        paths = daemon_paths(containerd)
        bundle = os.path.join(containerd.state, "io.containerd.runtime.v2.task", "test", "real")
        store = StateStore(paths.store)
        try:
            for cid in ("ghost1", "ghost2"):
                store.put(ProcessRecord(namespace="test", id=cid, bundle=bundle,
                                        pid=bystander.pid, start_time=12345, status="running",
                                        runc_root=paths.runc_root_for("test")))  # fmt: skip
        finally:
            store.close()
        # The daemon takes the rows back on reload: it must not adopt the bystander.
        r = shim_command(containerd, "reload")
        assert r.returncode == 0, r.stderr
        code = _ttrpc_kill(paths.address, "ghost1")
        assert code == "NOT_FOUND"
        # `delete` for the other ghost, with no daemon in the way.
        env = {**os.environ, "EMBEDSHIM_ROOT": containerd.embedshim_root}
        (daemon,) = daemons(containerd)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            subprocess.run(
                [os.path.join(sys.prefix, "bin", SHIM), "-namespace", "test", "-address",
                 containerd.address, "-id", "ghost2", "-bundle", "/nonexistent", "delete"],
                env=env, capture_output=True, timeout=20, check=True,
            )  # fmt: skip
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        time.sleep(0.2)
        assert bystander.poll() is None, "the unrelated process was killed"
        with open(paths.log) as f:
            assert "task restored" in f.read()
    finally:
        bystander.kill()
        bystander.wait()


def _ttrpc_kill(address: str, cid: str) -> str:
    import asyncio

    from shim.api import shim_pb2
    from shim.ttrpc import Client, TTRPCError

    async def go() -> str:
        async with await Client.connect(address) as client:
            try:
                await client.call(
                    "containerd.task.v2.Task",
                    "Kill",
                    shim_pb2.KillRequest(id=cid, signal=9).SerializeToString(),
                    metadata={"containerd-namespace-ttrpc": "test"},
                    timeout=10,
                )
            except TTRPCError as exc:
                return exc.code.name
        return "OK"

    return asyncio.run(go())
