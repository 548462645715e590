"""A hundred containers created and started at once, then killed and deleted at once.

All must come out right (each running as its own child of the one daemon; each reporting
137 after SIGKILL), no request may starve, and the daemon must keep answering a probe
throughout: nothing holds the event loop, or a lock others wait on, while runc runs.  And a
hundred container lifecycles run in their normal time beside a `runc pause` that hangs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from integration.embed import (
    RUNTIME,
    call,
    oci_spec,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd, task_list, wait_for
from integration.soak import daemon_pid, snapshot
from shim.api import runc_options_pb2, shim_pb2
from shim.ttrpc import Client, Code, TTRPCError
from shim.ttrpc.blocking import BlockingClient

N = 100
TASK_SERVICE = "containerd.task.v2.Task"


class Probe:
    """Asks the daemon for one task's state every 50 ms and records how long it took."""

    def __init__(self, address: str) -> None:
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._client = BlockingClient(address, timeout=30)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        req = shim_pb2.StateRequest(id="probe").SerializeToString()
        meta = {"containerd-namespace-ttrpc": "probe"}
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._client.call(TASK_SERVICE, "State", req, metadata=meta, timeout=30)
            self.latencies.append(time.monotonic() - t0)
            time.sleep(0.05)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(30)
        self._client.close()
        return self.latencies


def _all_at_once(fn: object, ids: list[str]) -> dict[str, float]:
    """Run ``fn(cid)`` for every id in its own thread, released together; durations."""
    gate = threading.Barrier(len(ids))
    took: dict[str, float] = {}

    def one(cid: str) -> None:
        gate.wait()
        t0 = time.monotonic()
        fn(cid)  # type: ignore[operator]
        took[cid] = time.monotonic() - t0

    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(one, ids))
    return took


def _summary(what: str, took: dict[str, float]) -> str:
    values = sorted(took.values())
    return (
        f"{what}: median {statistics.median(values):.2f}s, "
        f"p95 {values[int(len(values) * 0.95) - 1]:.2f}s, max {values[-1]:.2f}s"
    )


def test_hundred_containers_at_once(containerd: Containerd, busybox: str) -> None:
    c = containerd
    probe_bundle = write_bundle(c, "probe", "probe", oci_spec(busybox, "sleep", "1000"))
    address = start_daemon(c, probe_bundle, "probe", "probe")
    req = shim_pb2.CreateTaskRequest(id="probe", bundle=probe_bundle)
    run(call(address, "Create", req, "probe"))
    before = snapshot(c)
    ids = [f"p{i:03d}" for i in range(N)]
    probe = Probe(address)
    try:
        started = _all_at_once(
            lambda cid: c.run(RUNTIME, busybox, cid, "sleep", "1000", detach=True, timeout=300),
            ids,
        )
        tasks = task_list(c)
        assert sorted(tasks) == ids
        assert all(status == "RUNNING" for _, status in tasks.values()), tasks
        pids = [pid for pid, _ in tasks.values()]
        assert len(set(pids)) == N
        daemon = daemon_pid(c)
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == daemon
        killed = _all_at_once(lambda cid: c.ctr("task", "kill", "-s", "KILL", cid), ids)
        wait_for(
            lambda: all(s == "STOPPED" for _, s in task_list(c).values()),
            timeout=60,
            what="all STOPPED",
        )
        codes: dict[str, str] = {}

        def delete(cid: str) -> None:
            codes[cid] = c.ctr("task", "delete", cid, timeout=300).stderr
            c.ctr("container", "delete", cid)

        deleted = _all_at_once(delete, ids)
    finally:
        latencies = probe.stop()
    wrong = {cid: err for cid, err in codes.items() if "exit code 137" not in err}
    assert wrong == {} and len(codes) == N
    assert task_list(c) == {}
    print(
        "\n"
        + "\n".join(
            [
                _summary("run -d (create+start)", started),
                _summary("kill", killed),
                _summary("delete", deleted),
                f"probe State calls: {len(latencies)}, median "
                f"{statistics.median(latencies) * 1000:.1f} ms, p99 "
                f"{sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000:.0f} ms, "
                f"max {max(latencies) * 1000:.0f} ms",
            ]
        )
    )
    # Nobody starved: every request finished well inside containerd's own timeouts, and
    # the daemon answered the probe promptly the whole time (on two cores shared with a
    # hundred runc, ctr and shim processes, so a scheduling hiccup is allowed for).
    for took in (started, killed, deleted):
        assert max(took.values()) < 120, _summary("slowest", took)
    assert max(latencies) < 2.0, max(latencies)
    after = wait_for(lambda: (s := snapshot(c)).exact() == before.exact() and s, timeout=30)
    assert after
    _kill_and_delete(address, "probe", "probe")


def _hung_runcs(daemon: int) -> list[int]:
    """The fake runc's ``sleep 600`` (hanging in place of ``runc pause``), a daemon child."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")[:2]
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if argv == [b"sleep", b"600"] and ppid == daemon:
            out.append(int(name))
    return out


def _lifecycles(c: Containerd, busybox: str, ids: list[str]) -> dict[str, float]:
    """`ctr run --rm` (create, start, wait, delete) of each, four at a time; durations."""
    took: dict[str, float] = {}

    def one(cid: str) -> None:
        code = int(cid[1:]) % 200
        t0 = time.monotonic()
        r = c.run(
            RUNTIME, busybox, cid, "sh", "-c", f"exit {code}", rm=True, check=False, timeout=20
        )
        took[cid] = time.monotonic() - t0
        assert r.returncode == code, r.stderr

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, ids))
    return took


def _kill_and_delete(address: str, cid: str, ns: str) -> None:
    """Kill, wait for the exit, delete: as ctr and CRI do.  Kill returns once the signal is
    sent, not once the exit is recorded, so a Delete right after it may meet a running
    process and be refused (containerd's runc shim and client refuse it the same way)."""
    run(call(address, "Kill", shim_pb2.KillRequest(id=cid, signal=9), ns))
    run(call(address, "Wait", shim_pb2.WaitRequest(id=cid), ns, timeout=30))
    run(call(address, "Delete", shim_pb2.DeleteRequest(id=cid), ns))


def test_a_hung_runc_holds_up_no_other_container(containerd: Containerd, busybox: str) -> None:
    """`runc pause` of one container hangs (a fake runc, the daemon's runc timeout far
    away).  A hundred containers are created, started, waited for and deleted meanwhile,
    in their normal time, and all of it while that runc still hangs: a lock held across a
    runc call that others waited on (a global one) would hold every one of them until the
    hang ends."""
    c = containerd
    fake = os.path.join(c.tmp, "hang-pause-runc")
    with open(fake, "w") as f:
        f.write('#!/bin/sh\ncase " $* " in *" pause "*) exec sleep 600;; esac\nexec runc "$@"\n')
    os.chmod(fake, 0o755)
    bundle = write_bundle(c, "hang", "hung", oci_spec(busybox, "sleep", "1000"))
    address = start_daemon(c, bundle, "hang", "hung", env={"EMBEDSHIM_RUNC_TIMEOUT": "300"})
    req = shim_pb2.CreateTaskRequest(id="hung", bundle=bundle)
    req.options.type_url = "containerd.runc.v1.Options"
    req.options.value = runc_options_pb2.Options(binary_name=fake).SerializeToString()
    run(call(address, "Create", req, "hang"))
    run(call(address, "Start", shim_pb2.StartRequest(id="hung"), "hang"))
    baseline = _lifecycles(c, busybox, [f"b{i:03d}" for i in range(20)])
    daemon = daemon_pid(c)
    pause_error: list[BaseException] = []

    def pause() -> None:
        try:
            run(call(address, "Pause", shim_pb2.PauseRequest(id="hung"), "hang", timeout=400))
        except BaseException as exc:  # ended by the test killing the hung runc
            pause_error.append(exc)

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        (hung,) = wait_for(lambda: _hung_runcs(daemon), what="runc pause hanging")
        during = _lifecycles(c, busybox, [f"h{i:03d}" for i in range(N)])
        # Everything above happened while the pause still hung, holding its lock.
        assert _hung_runcs(daemon) == [hung] and pauser.is_alive()
        # The hung container's own state still answers, at once.
        t0 = time.monotonic()
        state = shim_pb2.StateResponse.FromString(
            run(call(address, "State", shim_pb2.StateRequest(id="hung"), "hang", timeout=5))
        )
        assert time.monotonic() - t0 < 2 and state.status == 2  # RUNNING
    finally:
        for pid in _hung_runcs(daemon):
            os.kill(pid, 9)
        pauser.join(60)
    assert pause_error, "the pause cannot have succeeded: its runc was killed"
    base_median = statistics.median(baseline.values())
    median = statistics.median(during.values())
    print(
        f"\nlifecycles beside a hung runc: {_summary('during', during)}; "
        f"{_summary('baseline', baseline)}"
    )
    assert median < 2 * base_median + 0.5, (median, base_median)
    assert max(during.values()) < 10 * base_median + 5, _summary("slowest", during)
    _kill_and_delete(address, "hung", "hang")
    assert task_list(c) == {}


def test_a_kill_is_answered_before_the_delete_after_its_exit(
    containerd: Containerd, busybox: str
) -> None:
    """The container can exit, and containerd hear of it, before `runc kill` is done
    (slow here: a fake runc sleeps after the real kill).  containerd then deletes the task
    and closes the task's connection; a Kill answered after the Delete fails there with
    "ttrpc: closed" (CRI's StopContainer / StopPodSandbox on a loaded node).  So the Kill
    is answered first.  (The container is paused: its kill is runc's, which thaws it; a
    running one is signalled through its pidfd, without runc.)"""
    c = containerd
    fake = os.path.join(c.tmp, "slow-kill-runc")
    with open(fake, "w") as f:
        f.write(
            '#!/bin/sh\ncase " $* " in *" kill "*) runc "$@"; rc=$?; sleep 2; exit $rc;; esac\n'
            'exec runc "$@"\n'
        )
    os.chmod(fake, 0o755)
    bundle = write_bundle(c, "sk", "sk", oci_spec(busybox, "sleep", "1000"))
    address = start_daemon(c, bundle, "sk", "sk")
    req = shim_pb2.CreateTaskRequest(id="sk", bundle=bundle)
    req.options.type_url = "containerd.runc.v1.Options"
    req.options.value = runc_options_pb2.Options(binary_name=fake).SerializeToString()
    run(call(address, "Create", req, "sk"))
    run(call(address, "Start", shim_pb2.StartRequest(id="sk"), "sk"))
    run(call(address, "Pause", shim_pb2.PauseRequest(id="sk"), "sk"))
    meta = {"containerd-namespace-ttrpc": "sk"}

    async def as_containerd() -> list[str]:
        answered: list[str] = []
        async with await Client.connect(address) as client:  # one connection, as the task's

            async def one(method: str, msg: object) -> None:
                payload = msg.SerializeToString()  # type: ignore[attr-defined]
                await client.call(TASK_SERVICE, method, payload, metadata=meta, timeout=30)
                answered.append(method)

            kill = asyncio.create_task(one("Kill", shim_pb2.KillRequest(id="sk", signal=9)))
            await one("Wait", shim_pb2.WaitRequest(id="sk"))  # the exit, as the event says it
            await one("Delete", shim_pb2.DeleteRequest(id="sk"))
            await kill
        return answered

    assert run(as_containerd()) == ["Wait", "Kill", "Delete"]
    assert task_list(c) == {}


def test_a_running_init_is_signalled_without_runc(containerd: Containerd, busybox: str) -> None:
    """Kill of a running init (one signal, or SIGKILL to all of a container with its own
    pid namespace) goes through the init's pidfd, as ``runc kill`` would do it, without
    starting runc; the exit status is the signal's.  A paused init's kill is runc's (it
    thaws the cgroup), and so is a signal other than SIGKILL to all.  A kill after the exit
    is NotFound, as runc answers."""
    c = containerd
    calls = os.path.join(c.tmp, "runc-calls")
    fake = os.path.join(c.tmp, "logging-runc")
    with open(fake, "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> {calls}\nexec runc "$@"\n')
    os.chmod(fake, 0o755)

    def kills() -> list[str]:
        with open(calls) as f:
            return [line for line in f.read().splitlines() if " kill " in f" {line} "]

    ns = "sig"
    address = ""
    for cid, kill, paused in (
        ("one", shim_pb2.KillRequest(id="one", signal=9), False),
        ("all", shim_pb2.KillRequest(id="all", signal=9, all=True), False),
        ("paused", shim_pb2.KillRequest(id="paused", signal=9), True),
    ):
        bundle = write_bundle(c, ns, cid, oci_spec(busybox, "sleep", "1000"))
        address = address or start_daemon(c, bundle, ns, cid)
        req = shim_pb2.CreateTaskRequest(id=cid, bundle=bundle)
        req.options.type_url = "containerd.runc.v1.Options"
        req.options.value = runc_options_pb2.Options(binary_name=fake).SerializeToString()
        run(call(address, "Create", req, ns))
        run(call(address, "Start", shim_pb2.StartRequest(id=cid), ns))
        if paused:
            run(call(address, "Pause", shim_pb2.PauseRequest(id=cid), ns))
        before = len(kills())
        run(call(address, "Kill", kill, ns))
        waited = shim_pb2.WaitResponse.FromString(
            run(call(address, "Wait", shim_pb2.WaitRequest(id=cid), ns, timeout=30))
        )
        assert waited.exit_status == 137, (cid, waited)
        assert len(kills()) - before == (1 if paused else 0), (cid, kills())
        if cid == "one":
            try:
                run(call(address, "Kill", kill, ns))
                raise AssertionError("a kill after the exit succeeded")
            except TTRPCError as exc:
                assert exc.code == Code.NOT_FOUND, exc
        deleted = shim_pb2.DeleteResponse.FromString(
            run(call(address, "Delete", shim_pb2.DeleteRequest(id=cid), ns))
        )
        assert deleted.exit_status == 137, (cid, deleted)
