"""What the README says of the logs: each task's own lines reach containerd's log through the
bundle's ``log`` FIFO, and a containerd logging at debug level gets a daemon that does too."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.embed import RUNTIME, daemon_paths, daemons, embed_containerd
from integration.harness import Containerd, wait_for
from integration.prereq import bpf_problem


@pytest.fixture(params=["info", "debug"])
def leveled_containerd(request: pytest.FixtureRequest, busybox: str) -> Iterator[Containerd]:
    with embed_containerd(busybox, log_level=request.param) as c:
        yield c


def _lines(path: str, needle: str) -> list[str]:
    with open(path) as f:
        return [ln for ln in f.read().splitlines() if needle in ln]


def test_task_lines_reach_containerds_log_and_debug_follows_containerd(
    leveled_containerd: Containerd, busybox: str
) -> None:
    c = leveled_containerd
    debug = c.log_level == "debug"
    c.run(RUNTIME, busybox, "logged", "sh", "-c", "exit 4", detach=True)
    (daemon,) = daemons(c)
    assert ("-debug" in daemon.cmdline) == debug, daemon.cmdline
    wait_for(lambda: "STOPPED" in c.ctr("task", "ls").stdout, what="exited")
    c.ctr("task", "delete", "logged")

    def task_lines() -> list[str]:
        return _lines(c.log_path, " ns=test id=logged")

    want = ["container created", "container started", "process exited", "container deleted"]
    wait_for(lambda: len(task_lines()) >= len(want), what="the task's lines in containerd's log")
    lines = task_lines()
    assert [ln.split('msg="')[1].split('"')[0] for ln in lines] == want, lines
    assert "exit_status=4" in lines[2] and "exit_status=4" in lines[3], lines
    # The daemon's own log: debug lines only when containerd logs at debug level (such as
    # the BPF ring buffer's wake-up at the exit, when BPF exit tracking is on).
    if debug and bpf_problem() is None:
        wait_for(lambda: _lines(daemon_paths(c).log, "level=debug"), what="a debug line")
    if not debug:
        assert _lines(daemon_paths(c).log, "level=debug") == []
