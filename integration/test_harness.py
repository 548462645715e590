"""The harness against the stock runtime io.containerd.runc.v2 (also our baseline)."""

from __future__ import annotations

import os
import time

import pytest

from integration.harness import (
    CONTAINER_PATH,
    RUN_CONTAINERD,
    RUNC_RUNTIME,
    Containerd,
    HarnessError,
    ctr_run_args,
    import_busybox_image,
    mounts_under,
    parse_event,
    parse_table,
    process_refers_to,
    processes_matching,
    task_list,
    wait_for,
    with_fifo_dir,
)


def _assert_nothing_left(c: Containerd) -> None:
    procs = processes_matching(
        lambda p: not p.zombie and p.pid != os.getpid() and process_refers_to(p, [c.tmp])
    )
    assert procs == [], procs
    assert mounts_under(c.tmp) == []
    with open("/proc/self/mountinfo") as f:
        assert c.tmp not in f.read()
    assert not os.path.lexists(c.tmp)
    assert c.leftovers() == {"processes": [], "mounts": [], "files": [], "cgroups": []}


def test_layout(containerd: Containerd) -> None:
    assert containerd.running
    assert len(containerd.ttrpc_address) < 108
    assert os.path.exists(containerd.address) and os.path.exists(containerd.ttrpc_address)
    assert containerd.env["PATH"].split(":")[0].endswith("/bin")
    assert containerd.env["EMBEDSHIM_ROOT"] == containerd.tmp + "/embedshim"
    env = open(f"/proc/{containerd.pid}/environ", "rb").read().split(b"\0")
    assert f"EMBEDSHIM_ROOT={containerd.tmp}/embedshim".encode() in env
    rows = {(r[0], r[1]): r[-1] for r in parse_table(containerd.ctr("plugins", "ls").stdout)}
    # disabled plugins are not listed at all
    assert ("io.containerd.grpc.v1", "cri") not in rows
    assert ("io.containerd.snapshotter.v1", "aufs") not in rows
    assert rows[("io.containerd.snapshotter.v1", "overlayfs")] == "ok"
    assert rows[("io.containerd.snapshotter.v1", "native")] == "ok"
    assert rows[("io.containerd.grpc.v1", "tasks")] == "ok"


def test_ctr_run_rm_exit_status(containerd: Containerd, busybox: str) -> None:
    t0 = time.monotonic()
    r = containerd.run(
        RUNC_RUNTIME, busybox, "c1", "sh", "-c", "echo hi; exit 7", rm=True, check=False
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 7, r
    assert r.stdout.strip() == "hi"
    assert containerd.ctr("containers", "ls", "-q").stdout.split() == []
    print(f"containerd start {containerd.start_seconds:.3f}s, ctr run --rm {elapsed:.3f}s")


def test_plain_ctr_run_args(containerd: Containerd, busybox: str) -> None:
    args = ctr_run_args(RUNC_RUNTIME, busybox, "plain", "echo", "ok", rm=True)
    assert args[:3] == ["run", "--runtime", RUNC_RUNTIME]
    assert args[-5:] == ["--rootfs", busybox, "plain", "echo", "ok"]
    r = containerd.ctr(*args)
    assert r.stdout.strip() == "ok"


def test_detached_task_listed_running(containerd: Containerd, busybox: str) -> None:
    containerd.run(RUNC_RUNTIME, busybox, "d1", "sleep", "1000", detach=True)
    tasks = task_list(containerd)
    pid, status = tasks["d1"]
    assert status == "RUNNING" and pid > 0
    cg = open(f"/proc/{pid}/cgroup").read()
    assert containerd.cgroup_path("d1") in cg
    containerd.ctr("task", "kill", "-s", "KILL", "d1")
    wait_for(lambda: task_list(containerd)["d1"][1] == "STOPPED", 10)


def test_events_stream(containerd: Containerd, busybox: str) -> None:
    from integration.embed import Events

    ev = Events(containerd)  # subscribed once this returns (a sentinel came through)
    try:
        containerd.run(RUNC_RUNTIME, busybox, "e1", "true", rm=True)
        wait_for(lambda: "/tasks/delete" in ev.topics("e1"), 10, what="/tasks/delete event")
    finally:
        ev.close()
    events = [e for e in map(parse_event, ev.lines) if e]
    assert all(ns == "test" for ns, _, _ in events)
    topics = ev.topics("e1")
    assert "/tasks/create" in topics and "/tasks/start" in topics and "/tasks/exit" in topics


def test_cleanup_leaves_nothing(busybox: str) -> None:
    c = Containerd(watch_paths=[busybox])
    try:
        import_busybox_image(c, rootfs=busybox)
        c.run(RUNC_RUNTIME, busybox, "r1", "sleep", "1000", detach=True)
        c.run(
            RUNC_RUNTIME,
            "docker.io/library/esh-busybox:latest",
            "i1",
            "sleep",
            "1000",
            detach=True,
            image=True,
        )
        assert {k: v[1] for k, v in task_list(c).items()} == {"r1": "RUNNING", "i1": "RUNNING"}
        assert mounts_under(c.tmp), "image container rootfs should be mounted under the tmp dir"
        assert processes_matching(lambda p: process_refers_to(p, [c.tmp]))
    finally:
        c.cleanup()
    _assert_nothing_left(c)
    c.cleanup()  # idempotent


def _host_fifo_dirs() -> set[str]:
    try:
        return set(os.listdir(f"{RUN_CONTAINERD}/fifo"))
    except FileNotFoundError:
        return set()


def test_ctr_leaves_no_fifo_dir_on_the_host(containerd: Containerd, busybox: str) -> None:
    """ctr keeps a process's FIFOs in /run/containerd/fifo unless told otherwise and leaves
    their directory there when the process is detached or fails: every ctr command the
    harness runs keeps them in the test's temp dir instead."""
    before = _host_fifo_dirs()
    run = containerd.run_args(RUNC_RUNTIME, busybox, "box", "sleep", "1000", detach=True)
    k = run.index("--fifo-dir")
    containerd.ctr(*run[:k], *run[k + 2 :])  # the harness puts it back
    containerd.ctr("task", "exec", "-d", "--exec-id", "d1", "box", "sleep", "1000")
    r = containerd.ctr("task", "exec", "--exec-id", "x3", "box", "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3
    r = containerd.ctr("t", "exec", "--exec-id", "nf", "box", "/no/such/binary", check=False)
    assert r.returncode != 0
    env = f"PATH={CONTAINER_PATH}"
    containerd.ctr("container", "create", "--env", env, "--rootfs", busybox, "c2", "true")
    assert containerd.ctr("task", "start", "c2", check=False).returncode == 0
    assert _host_fifo_dirs() - before == set()


def test_with_fifo_dir() -> None:
    assert with_fifo_dir(["task", "exec", "--exec-id", "e", "c", "true"], "/f") == [
        "task", "exec", "--fifo-dir", "/f", "--exec-id", "e", "c", "true"
    ]  # fmt: skip
    assert with_fifo_dir(["run", "--fifo-dir", "/x", "-d"], "/f") == [
        "run",
        "--fifo-dir",
        "/x",
        "-d",
    ]
    assert with_fifo_dir(["task", "ls"], "/f") == ["task", "ls"]
    log = ["t", "exec", "--log-uri", "binary:///x", "c", "true"]
    assert with_fifo_dir(log, "/f") == log  # ctr takes one of the two
    assert with_fifo_dir(["images", "exec"], "/f") == ["images", "exec"]


def test_cleanup_after_containerd_kill9(busybox: str) -> None:
    """Shims and containers outlive a SIGKILLed containerd; cleanup still finds them."""
    c = Containerd(watch_paths=[busybox])
    try:
        import_busybox_image(c, rootfs=busybox)
        c.run(RUNC_RUNTIME, busybox, "k1", "sleep", "1000", detach=True)
        c.run(
            RUNC_RUNTIME,
            "docker.io/library/esh-busybox:latest",
            "k2",
            "sleep",
            "1000",
            detach=True,
            image=True,
        )
        pids = [p for p, _ in task_list(c).values()]
        c.kill9()
        assert all(os.path.exists(f"/proc/{p}") for p in pids)
    finally:
        c.cleanup()
    _assert_nothing_left(c)
    assert not any(
        os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
        for p in pids
    )


def test_restart_keeps_tasks(containerd: Containerd, busybox: str) -> None:
    containerd.run(RUNC_RUNTIME, busybox, "s1", "sleep", "1000", detach=True)
    pid = task_list(containerd)["s1"][0]
    containerd.kill9()
    t0 = time.monotonic()
    assert containerd.ctr("version", check=False).returncode != 0
    assert time.monotonic() - t0 < 5, "ctr must fail fast against a dead containerd"
    containerd.restart()
    assert task_list(containerd)["s1"] == (pid, "RUNNING")


def test_cleanup_after_partial_start() -> None:
    c = Containerd(start=False)
    assert os.path.isdir(c.tmp)
    c.cleanup()
    assert not os.path.exists(c.tmp)


def test_image_import(containerd: Containerd) -> None:
    ref = import_busybox_image(containerd)  # builds its own rootfs in the temp dir
    r = containerd.ctr(
        *ctr_run_args(
            RUNC_RUNTIME,
            ref,
            "img1",
            "echo",
            "ok",
            rm=True,
            image=True,
            fifo_dir=containerd.fifo_dir,
        )
    )
    assert r.stdout.strip() == "ok"


@pytest.mark.parametrize("cri", [True])
def test_cri_flag_keeps_plugin(cri: bool) -> None:
    with Containerd(cri=cri) as c:
        out = c.ctr("plugins", "ls").stdout
        line = next(ln for ln in out.splitlines() if "io.containerd.grpc.v1" in ln and "cri" in ln)
        assert line.split()[-1] == "ok", out
    assert not os.path.exists(c.tmp)


def test_busybox_image_fixture(containerd: Containerd, busybox_image: str) -> None:
    r = containerd.run(
        RUNC_RUNTIME, busybox_image, "img2", "sh", "-c", "echo $PATH", rm=True, image=True
    )
    assert "/bin" in r.stdout


def test_failed_start_reports_log_and_cleans_up() -> None:
    made: list[str] = []

    class Broken(Containerd):
        def config_toml(self) -> str:
            made.append(self.tmp)
            return "version = 2\nthis is not toml ]]]\n"

    with pytest.raises(HarnessError, match="containerd log tail"):
        Broken()
    assert made and not os.path.exists(made[0])
