"""Containers: CreateContainer / StartContainer / ContainerStatus / StopContainer /
RemoveContainer, logs, restarts in the same sandbox, many containers in one pod, OOM."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from integration.cri import crilog
from integration.cri.api import cri_api_pb2 as cri
from integration.cri.node import RUNTIME_TYPES, CriNode, is_ours, poll, rpc_code
from integration.cri.test_pods import serving_process
from integration.embed import Events
from integration.harness import _proc_info, wait_for

MiB = 1 << 20


def _alive(pid: int) -> bool:
    info = _proc_info(pid)
    return info is not None and not info.zombie


def test_container_status_through_its_lifecycle(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    t0 = time.time_ns()
    failing = node.create_container(pod, ["sh", "-c", "sleep 1; exit 7"], name="failing")
    ok = node.create_container(pod, ["true"], name="ok")
    t1 = time.time_ns()
    for cid, name in ((failing, "failing"), (ok, "ok")):
        st = node.status(cid)
        assert st.state == cri.CONTAINER_CREATED
        assert t0 <= st.created_at <= t1
        assert st.started_at == 0 and st.finished_at == 0
        assert st.metadata.name == name and st.metadata.attempt == 0
        assert dict(st.labels) == {"esh-container": name}
        assert dict(st.annotations) == {"esh/container": name}
        assert node.container_info(cid)["runtimeType"] == RUNTIME_TYPES[handler]

    node.start(failing)
    running = node.status(failing)
    assert running.state == cri.CONTAINER_RUNNING
    assert running.started_at >= running.created_at
    assert running.finished_at == 0
    states = {c.id: c.state for c in node.containers(pod)}
    assert states == {failing: cri.CONTAINER_RUNNING, ok: cri.CONTAINER_CREATED}
    node.start(ok)

    st = node.wait_exited(failing)
    assert st.exit_code == 7
    assert st.reason == "Error"
    assert st.finished_at - st.started_at >= 900_000_000  # it slept 1 s before exiting
    st = node.wait_exited(ok)
    assert (st.exit_code, st.reason) == (0, "Completed")
    # both set; no order between them: CRI stamps started_at when Start returns, and a
    # process as short as `true` may have exited (finished_at, from the shim) before that
    assert st.started_at > 0 and st.finished_at >= st.created_at

    # starting an exited container again is refused; the kubelet creates a new attempt
    with pytest.raises(grpc.RpcError):
        node.start(ok)


def test_stop_container_sigterm_then_sigkill(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    # exits on SIGTERM, with a status of its own, after logging it
    polite = node.run_container(
        pod,
        [
            "sh",
            "-c",
            "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 1 & wait; done",
        ],
        name="polite",
    )
    # busybox sleep as pid 1 has no SIGTERM handler: only the SIGKILL after the grace ends it
    stubborn = node.run_container(pod, ["sleep", "1000"], name="stubborn")
    log = os.path.join(pod.log_dir, "polite/0.log")
    poll(lambda: os.path.exists(log) and "ready" in open(log).read(), what="polite ready")

    t = time.monotonic()
    node.stop(polite, timeout=30)
    took = time.monotonic() - t
    st = node.status(polite)
    assert st.state == cri.CONTAINER_EXITED
    assert (st.exit_code, st.reason) == (42, "Error")
    assert took < 5, f"a container that exits on SIGTERM took {took:.1f}s to stop"
    assert "got TERM" in crilog.lines(crilog.parse(open(log).read()), "stdout")

    pid = int(node.container_info(stubborn)["pid"])
    t = time.monotonic()
    node.stop(stubborn, timeout=2)
    took = time.monotonic() - t
    st = node.status(stubborn)
    assert st.state == cri.CONTAINER_EXITED
    assert (st.exit_code, st.reason) == (137, "Error")
    assert 2 <= took < 7, f"StopContainer(timeout=2) of a SIGTERM-deaf container took {took:.1f}s"
    assert not _alive(pid)
    node.stop(stubborn, timeout=2)  # idempotent on an exited container


def test_remove_container(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    exited = node.run_container(pod, ["true"])
    node.wait_exited(exited)
    node.remove(exited)
    running = node.run_container(pod, ["sleep", "1000"])
    pid = int(node.container_info(running)["pid"])
    node.remove(running)  # a running container is stopped, then removed
    assert not _alive(pid)
    for cid in (exited, running):
        with pytest.raises(grpc.RpcError) as exc:
            node.status(cid)
        assert rpc_code(exc.value) == grpc.StatusCode.NOT_FOUND
        node.remove(cid)  # idempotent
    assert node.containers(pod) == []
    assert node.pod_status(pod).state == cri.SANDBOX_READY


def test_container_logs_in_cri_format(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    script = "echo out1; echo err1 >&2; echo out2; printf 'a%.0s' $(seq 1 20000); echo; echo done"
    t0 = time.time_ns()
    cid = node.run_container(pod, ["sh", "-c", script], name="logger")
    node.wait_exited(cid)
    t1 = time.time_ns()
    path = os.path.join(pod.log_dir, "logger/0.log")
    assert node.status(cid).log_path == path
    records = crilog.parse(open(path).read())
    assert crilog.lines(records, "stdout") == ["out1", "out2", "a" * 20000, "done"]
    assert crilog.lines(records, "stderr") == ["err1"]
    # the 20000-byte line is split at containerd's 16 KiB max line size: P then F
    assert [r.tag for r in records if r.stream == "stdout"] == ["F", "F", "P", "F", "F"]
    for stream in ("stdout", "stderr"):
        times = [r.time_ns for r in records if r.stream == stream]
        assert times == sorted(times)
        assert all(t0 - 10**9 <= t <= t1 for t in times)


def test_restart_in_the_same_sandbox(node: CriNode, handler: str) -> None:
    """The kubelet restarts a container by creating attempt N+1 in the same sandbox."""
    pod = node.run_pod(handler)
    pause = node.sandbox_info(pod)["pid"]
    script = "echo run; exit 1"
    first = node.run_container(pod, ["sh", "-c", script], name="app", attempt=0)
    assert node.wait_exited(first).exit_code == 1
    # same name and attempt while the first still exists: the name is taken
    with pytest.raises(grpc.RpcError):
        node.create_container(pod, ["true"], name="app", attempt=0)
    second = node.run_container(pod, ["sh", "-c", script], name="app", attempt=1)
    st = node.wait_exited(second)
    assert st.exit_code == 1 and st.metadata.attempt == 1
    assert node.status(first).metadata.attempt == 0
    for attempt in (0, 1):
        lines = crilog.lines(
            crilog.parse(open(f"{pod.log_dir}/app/{attempt}.log").read()), "stdout"
        )
        assert lines == ["run"]
    # the sandbox was not touched: same pause process, still ready
    assert node.sandbox_info(pod)["pid"] == pause
    assert node.pod_status(pod).state == cri.SANDBOX_READY
    node.remove(first)
    third = node.run_container(pod, ["sleep", "1000"], name="app", attempt=2)
    assert node.status(third).state == cri.CONTAINER_RUNNING
    assert {c.id for c in node.containers(pod)} == {second, third}


def test_many_containers_in_one_pod(node: CriNode, handler: str) -> None:
    pod = node.run_pod(handler)
    n = 8
    before = serving_process(node, handler)
    ids = [node.run_container(pod, ["sleep", "1000"], name=f"c{i}") for i in range(n)]
    listed = node.containers(pod)
    assert {c.id for c in listed} == set(ids)
    assert all(c.state == cri.CONTAINER_RUNNING for c in listed)
    nets, hosts = set(), set()
    for cid in ids:
        r = node.exec_sync(cid, ["sh", "-c", "readlink /proc/self/ns/net; hostname"])
        net, host = r.stdout.decode().split()
        nets.add(net)
        hosts.add(host)
    assert len(nets) == 1 and hosts == {pod.config.hostname}  # they share the pod's
    # embed: the one daemon serves them all; runc.v2: one shim per pod (grouped by sandbox)
    serving = serving_process(node, handler)
    assert len(serving) == 1, serving
    if is_ours(handler):
        assert serving == before
    node.stop_pod(pod)
    assert all(node.status(c).state == cri.CONTAINER_EXITED for c in ids)
    assert all(node.status(c).exit_code == 137 for c in ids)


def test_oom_killed_container_reports_oomkilled(node: CriNode, handler: str) -> None:
    events = Events(node.ctrd)
    try:
        pod = node.run_pod(handler)
        # dd fills a 64 MiB buffer from /dev/zero: over a 16 MiB limit (there is no swap)
        cid = node.run_container(
            pod, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"], memory_limit=16 * MiB
        )
        st = node.wait_exited(cid)
        assert st.exit_code == 137
        # CRI in containerd 1.6 learns OOMKilled only from the /tasks/oom event, and only if
        # that event is handled before the exit.  embedshim publishes it before the exit,
        # always; containerd-shim-runc-v2 sends it from its own OOM watcher, which can lose
        # that race (seen here: reason "Error" once in several runs), so the baseline is
        # held only to the event itself.
        if is_ours(handler):
            assert st.reason == "OOMKilled"
        else:
            assert st.reason in ("OOMKilled", "Error")
        wait_for(lambda: events.payloads("/tasks/oom", cid), what="/tasks/oom")
    finally:
        events.close()
