"""OOM kills: /tasks/oom before the /tasks/exit (137) they cause, live and across a daemon
re-exec, a daemon restart, and the offline `delete`."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from integration.embed import (
    RUNTIME,
    Events,
    daemon_paths,
    daemons,
    embed_containerd,
    kill_daemon_for_good,
    start_daemon,
)
from integration.harness import (
    Containerd,
    ProcInfo,
    processes_matching,
    task_list,
    wait_for,
)

LIMIT = str(32 << 20)  # 32 MiB
# busybox has no allocator: the shell holds 200 MB of command output in a variable.
HOG = 'x=$(head -c 200000000 /dev/zero | tr "\\0" a)'
# The same, once /ctl/go exists (so the kill happens when the test wants it).
HOG_ON_GO = f"while [ ! -e /ctl/go ]; do sleep 0.05; done; {HOG}"


@pytest.fixture
def debug_containerd(busybox: str) -> Iterator[Containerd]:
    """A private containerd logging at debug level: its log names every event it is
    forwarded ("event forwarded" topic=...), even those sent while no subscriber could
    be connected yet (during its own restart)."""
    with embed_containerd(busybox, log_level="debug") as c:
        yield c


def _ctl(c: Containerd) -> tuple[str, tuple[str, ...]]:
    ctl = os.path.join(c.tmp, "ctl")
    os.makedirs(ctl, exist_ok=True)
    extra = ("--memory-limit", LIMIT, "--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw")
    return ctl, extra


def _go(ctl: str) -> None:
    open(os.path.join(ctl, "go"), "w").close()


def _topics(events: Events, cid: str) -> list[str]:
    return events.topics(cid)


def _forwarded(c: Containerd) -> list[str]:
    """Topics of the events containerd was forwarded, in order (from its debug log)."""
    with open(c.log_path) as f:
        lines = f.read().splitlines()
    return [
        ln.split("topic=")[1].split()[0]
        for ln in lines
        if 'msg="event forwarded"' in ln and "topic=" in ln
    ]


def _exit_code_from_delete(c: Containerd, cid: str) -> int:
    r = c.ctr("task", "delete", cid)
    assert "exit code" in r.stderr, r.stderr
    return int(r.stderr.split("exit code")[1].split('"')[0].strip())


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_oom_killed_init_reports_oom_then_exit_137(
    containerd: Containerd, busybox: str, events: Events
) -> None:
    r = containerd.run(
        RUNTIME, busybox, "hog", "sh", "-c", HOG, extra=("--memory-limit", LIMIT), check=False
    )
    assert r.returncode == 137, r.stderr
    assert events.exit_status("hog") == 137
    wait_for(lambda: "/tasks/delete" in _topics(events, "hog"), what="delete event")
    topics = _topics(events, "hog")
    # One event per kill the kernel counts; it may kill more than one process of the hog's
    # pipeline.  Every one comes after the start and before the exit.
    ooms = [i for i, t in enumerate(topics) if t == "/tasks/oom"]
    assert ooms, topics
    assert topics.index("/tasks/start") < ooms[0] and ooms[-1] < topics.index("/tasks/exit")


def test_oom_killed_child_reports_oom_and_container_keeps_running(
    containerd: Containerd, busybox: str, events: Events
) -> None:
    """The kernel kills the subshell holding the memory, not the init: /tasks/oom comes
    from the live cgroup notification, with no exit to carry it."""
    out = os.path.join(containerd.tmp, "out.log")
    script = f"({HOG}); echo child status $?; exec sleep 100000"
    containerd.run(
        RUNTIME, busybox, "parent", "sh", "-c", script, detach=True,
        extra=("--memory-limit", LIMIT, "--log-uri", f"file://{out}"),
    )  # fmt: skip
    wait_for(lambda: events.payloads("/tasks/oom", "parent"), timeout=20, what="/tasks/oom")
    wait_for(lambda: os.path.exists(out) and "child status" in open(out).read(), what="output")
    assert open(out).read().endswith("child status 137\n")  # after the shell's "Killed"
    assert task_list(containerd)["parent"][1] == "RUNNING"
    assert "/tasks/exit" not in _topics(events, "parent")
    containerd.ctr("task", "kill", "-s", "KILL", "parent")
    assert events.exit_status("parent") == 137
    assert _topics(events, "parent").count("/tasks/oom") == 1


def test_oom_during_daemon_reexec_is_reported(
    containerd: Containerd, busybox: str, events: Events
) -> None:
    """The kill lands after the old image closed its OOM watch and before the new one
    restored the task (the daemon is held stopped in between): the new image finds it in
    the cgroup's count and reports it, before the exit."""
    ctl, extra = _ctl(containerd)
    containerd.run(RUNTIME, busybox, "reload", "sh", "-c", HOG_ON_GO, detach=True, extra=extra)
    pid = task_list(containerd)["reload"][0]
    (daemon,) = daemons(containerd)
    log_path = daemon_paths(containerd).log

    def log_text() -> str:
        with open(log_path) as f:
            return f.read()

    os.kill(daemon.pid, signal.SIGHUP)
    try:
        wait_for(lambda: "re-executing" in log_text(), interval=0.002, what="re-exec")
        os.kill(daemon.pid, signal.SIGSTOP)
        assert "daemon reloaded" not in log_text()
        _go(ctl)
        wait_for(lambda: _pid_gone(pid), what="container OOM-killed")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert events.exit_status("reload", timeout=30) == 137
    topics = _topics(events, "reload")
    assert topics.count("/tasks/oom") == 1, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")
    assert [d.pid for d in daemons(containerd)] == [daemon.pid]  # re-exec'd, not replaced
    text = log_text()
    # Found by the new image as it took the task back, not by a live watch.
    assert text.index("re-executing") < text.index('msg="OOM kill"') < text.index("daemon reloaded")
    assert _exit_code_from_delete(containerd, "reload") == 137


def test_oom_while_no_daemon_runs_is_reported_by_the_restarted_daemon(
    debug_containerd: Containerd, busybox: str
) -> None:
    """containerd and the daemon both down; the container is OOM-killed; a new daemon
    restores the task from its store and reports the kill, then the exit."""
    c = debug_containerd
    ctl, extra = _ctl(c)
    c.run(RUNTIME, busybox, "down", "sh", "-c", HOG_ON_GO, detach=True, extra=extra)
    pid = task_list(c)["down"][0]
    bundle = os.path.join(c.state, "io.containerd.runtime.v2.task", "test", "down")
    c.kill9()
    kill_daemon_for_good(c)
    assert "/tasks/oom" not in _forwarded(c)
    _go(ctl)
    wait_for(lambda: _pid_gone(pid), what="container OOM-killed")
    start_daemon(c, bundle, "test", "down")  # as containerd would: restores the task
    c.start()  # reconnects to the new daemon through the bundle's address file
    wait_for(lambda: "/tasks/exit" in _forwarded(c), timeout=30, what="exit forwarded")
    topics = _forwarded(c)
    assert topics.count("/tasks/oom") == 1, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit")
    assert task_list(c)["down"][1] == "STOPPED"
    assert _exit_code_from_delete(c, "down") == 137


def test_oom_while_no_daemon_runs_is_reported_by_delete(
    debug_containerd: Containerd, busybox: str
) -> None:
    """No daemon comes back: containerd runs `delete` for the task, which publishes the
    kill the cgroup counted before containerd publishes the exit."""
    c = debug_containerd
    ctl, extra = _ctl(c)
    c.run(RUNTIME, busybox, "gone", "sh", "-c", HOG_ON_GO, detach=True, extra=extra)
    pid = task_list(c)["gone"][0]
    c.kill9()
    kill_daemon_for_good(c)
    _go(ctl)
    wait_for(lambda: _pid_gone(pid), what="container OOM-killed")
    c.start()
    wait_for(lambda: "gone" not in task_list(c), timeout=20, what="task cleaned up")
    # Sent from the background once containerd listens (it ran `delete` while starting).
    wait_for(lambda: "/tasks/oom" in _forwarded(c), timeout=20, what="/tasks/oom forwarded")
    # Only a `delete` (or the child it leaves retrying) can send it: once none is left,
    # the count is final.
    wait_for(lambda: not _deletes(c, "gone"), timeout=40, what="no delete left running")
    assert _forwarded(c).count("/tasks/oom") == 1


def _deletes(c: Containerd, cid: str) -> list[ProcInfo]:
    """Live `delete` subcommands for ``cid`` of this containerd (and their forked
    children, which keep the command line)."""
    return processes_matching(
        lambda p: (
            not p.zombie
            and p.cmdline[-1:] == ["delete"]
            and c.address in p.cmdline
            and cid in p.cmdline
        )
    )
