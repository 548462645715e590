"""The daemon's idle exit (EMBEDSHIM_IDLE_EXIT), the next `start` bringing one back, and the
race between the two that start.lock settles; a daemon that never gets a task exits too,
once the reservations of the `start`s that brought it up expire (EMBEDSHIM_RESERVATION_TTL).

An idle daemon exits only under the start lock, and only if no `start` reserved it
meanwhile; a `start` reserves under the same lock, or, finding no daemon, spawns one.  So a
`start` that meets a daemon on its way out either keeps it or gets a new one: never a dead
socket.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator

import pytest

from integration.embed import (
    RUNTIME,
    call,
    daemon_paths,
    daemons,
    embed_containerd,
    embedshim_env,
    keeper_of,
    oci_spec,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd, _proc_info, task_list, wait_for
from shim.api import shim_pb2
from shim.ttrpc import TTRPCError
from shim.ttrpc.blocking import BlockingClient

IDLE = 1.0
#: a start's reservation, shortened from 30 s
TTL = 4.0
DAEMON_SERVICE = "embedshim.v1.Daemon"


@pytest.fixture
def idle_containerd(busybox: str) -> Iterator[Containerd]:
    env = {
        **embedshim_env(),
        "EMBEDSHIM_IDLE_EXIT": str(IDLE),
        "EMBEDSHIM_RESERVATION_TTL": str(TTL),
    }
    with embed_containerd(busybox, env) as c:
        yield c


def _daemon_pids(c: Containerd) -> list[int]:
    return [p.pid for p in daemons(c)]


def _log(c: Containerd) -> str:
    with open(daemon_paths(c).log) as f:
        return f.read()


def _lock_waiters(path: str) -> set[int]:
    """Pids blocked in flock() on ``path`` (the ``->`` lines of /proc/locks)."""
    ino = os.stat(path).st_ino
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 6 and fields[1] == "->" and fields[2] == "FLOCK":
                if int(fields[6].rsplit(":", 1)[1]) == ino:
                    out.add(int(fields[5]))
    return out


def test_idle_exit_after_a_burst_and_the_next_start(
    idle_containerd: Containerd, busybox: str
) -> None:
    """A burst of short-lived containers is served by one daemon; it exits IDLE seconds
    after the last of them, not sooner; the next container brings a new one."""
    c = idle_containerd
    pids = set()
    for i in range(4):  # each closer than IDLE to the one before
        before = time.monotonic()
        r = c.run(RUNTIME, busybox, f"burst{i}", "sh", "-c", f"exit {i + 3}", rm=True, check=False)
        assert r.returncode == i + 3, r.stderr
        pids.update(_daemon_pids(c))
    assert len(pids) == 1, pids  # never restarted during the burst
    (first,) = pids
    wait_for(lambda: not _daemon_pids(c), timeout=IDLE + 10, what="idle exit")
    gone = time.monotonic()
    assert gone >= before + IDLE  # the last shutdown came after `before`
    assert _log(c).count("idle, exiting") == 1
    assert not os.path.exists(daemon_paths(c).socket)
    r = c.run(RUNTIME, busybox, "again", "sh", "-c", "exit 9", rm=True, check=False)
    assert r.returncode == 9, r.stderr
    (second,) = _daemon_pids(c)
    assert second != first


def test_a_start_that_reserved_keeps_the_daemon(idle_containerd: Containerd, busybox: str) -> None:
    """The daemon's idle timer fires while a `start` holds the lock (the test, here); the
    start reserves it: it stays, and serves the container that start was for."""
    c = idle_containerd
    paths = daemon_paths(c)
    c.run(RUNTIME, busybox, "first", "true", rm=True)
    (daemon,) = _daemon_pids(c)
    lock = os.open(paths.lock, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wait_for(lambda: daemon in _lock_waiters(paths.lock), timeout=IDLE + 10, what="idle exit")
        with BlockingClient(paths.address, timeout=5) as client:  # what `start` does
            assert client.call(DAEMON_SERVICE, "Reserve", b"test\0kept") == str(daemon).encode()
    finally:
        os.close(lock)
    r = c.run(RUNTIME, busybox, "kept", "sh", "-c", "exit 6", rm=True, check=False)
    assert r.returncode == 6, r.stderr
    assert _daemon_pids(c) == [daemon]
    assert "idle, exiting" not in _log(c)


def test_start_racing_the_idle_exit_always_gets_a_daemon(
    idle_containerd: Containerd, busybox: str
) -> None:
    """The daemon on its way out and containerd's `start` for a new container both wait on
    the lock, released at once: whichever wins, the container runs (on the old daemon, or
    on a new one once the old has removed its socket)."""
    c = idle_containerd
    paths = daemon_paths(c)
    outcomes = []
    for i in range(3):
        c.run(RUNTIME, busybox, f"warm{i}", "true", rm=True)  # a daemon, about to go idle
        (daemon,) = _daemon_pids(c)
        exits_before = _log(c).count("idle, exiting")
        lock = os.open(paths.lock, os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            wait_for(lambda d=daemon: d in _lock_waiters(paths.lock), timeout=IDLE + 10,
                     what="the daemon waiting to exit")  # fmt: skip
            run = c.ctr_async(*c.run_args(RUNTIME, busybox, f"race{i}", "sh", "-c", "exit 7",
                                          rm=True))  # fmt: skip
            wait_for(lambda: len(_lock_waiters(paths.lock)) >= 2, what="start waiting too")
        finally:
            os.close(lock)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 7, (out, err)
        exited = _log(c).count("idle, exiting") - exits_before
        assert exited in (0, 1)
        if exited:
            wait_for(lambda d=daemon: d not in _daemon_pids(c), what="old daemon gone")
        outcomes.append("new daemon" if exited else "kept")
        assert task_list(c) == {}
    print(f"\nstart vs idle exit: {outcomes}")


def _gone(pid: int) -> bool:
    info = _proc_info(pid)
    return info is None or info.zombie


def test_a_daemon_that_never_gets_a_task_exits(idle_containerd: Containerd, busybox: str) -> None:
    """`start` run as containerd runs it, twice, and never a Create (containerd failed or went
    away after `start`): the daemon stays while either reservation holds, then exits with
    status 0, its keeper with it, and the next `start` brings a new one that serves."""
    c = idle_containerd
    paths = daemon_paths(c)
    bundles = [write_bundle(c, "test", cid, oci_spec(busybox, "true")) for cid in ("n1", "n2")]
    first = time.monotonic()
    assert start_daemon(c, bundles[0], "test", "n1") == paths.address
    (daemon,) = daemons(c)
    keeper = keeper_of(daemon)
    time.sleep(1.5)
    last = time.monotonic()
    assert start_daemon(c, bundles[1], "test", "n2") == paths.address
    assert [p.pid for p in daemons(c)] == [daemon.pid]
    wait_for(lambda: _gone(daemon.pid) and _gone(keeper), timeout=TTL + 15, what="idle exit")
    gone = time.monotonic()
    assert gone >= last + TTL, (gone - first, gone - last)  # each reservation held it
    log = _log(c)
    assert log.count("idle, exiting") == 1
    (exited,) = [line for line in log.splitlines() if 'msg="daemon exited"' in line]
    assert f"daemon_pid={daemon.pid} " in exited and exited.endswith(" exit_code=0"), exited
    (keeper_line,) = [line for line in log.splitlines() if 'msg="keeper exiting"' in line]
    assert 'reason="daemon exited" exit_code=0' in keeper_line, keeper_line
    assert not os.path.exists(paths.socket) and not os.path.exists(paths.pidfile)
    print(f"\nno task: daemon and keeper gone {gone - first:.1f} s after the first start, "
          f"{gone - last:.1f} s after the second (reservation TTL {TTL} s)")  # fmt: skip
    r = c.run(RUNTIME, busybox, "next", "sh", "-c", "exit 5", rm=True, check=False)
    assert r.returncode == 5, r.stderr
    assert [p.pid for p in daemons(c)] != [daemon.pid]


def test_a_daemon_whose_only_create_failed_exits(idle_containerd: Containerd, busybox: str) -> None:
    """The Create a `start` reserved the daemon for fails: nothing holds the daemon any more,
    so it exits IDLE seconds later (not a reservation's TTL, not never)."""
    c = idle_containerd
    bundle = write_bundle(c, "test", "bad", "{not json")
    address = start_daemon(c, bundle, "test", "bad")
    (daemon,) = daemons(c)
    with pytest.raises(TTRPCError):
        run(call(address, "Create", shim_pb2.CreateTaskRequest(id="bad", bundle=bundle), "test"))
    failed = time.monotonic()
    wait_for(lambda: _gone(daemon.pid), timeout=TTL + 10, what="idle exit")
    assert IDLE <= time.monotonic() - failed < TTL
    assert _log(c).count("idle, exiting") == 1
