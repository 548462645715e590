"""Exit tracking against the real kernel: bpf/exitsnoop.bpf.o + shim.exits.exittrack.

Needs root (or CAP_BPF+CAP_PERFMON+CAP_SYS_ADMIN), kernel BTF and libbpf.so.1.
Every test session works under its own /sys/fs/bpf/embedshim-test-<pid>-<rand>
directory, removed at the end (which detaches every link loaded here).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from integration.prereq import bpf_problem, missing
from shim.exits import libbpf
from shim.exits.exittrack import (
    EXITS_MAX,
    LAYOUT_VERSION,
    MAPS,
    PROG_NAME,
    TRACKED_MAX,
    ExitRecord,
    ExitTracker,
    TrackedMapFull,
    default_object_path,
    process_start_boottime,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "BPF exit tracking is Linux-only"
    problem = bpf_problem()
    return None if problem is None else missing(problem)


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

SYS_EXIT = {"x86_64": 60, "aarch64": 93}.get(platform.machine())
_trace_ids = itertools.count(1000)


def next_id() -> int:
    return next(_trace_ids)


# ----------------------------------------------------------------- fixtures


class Pins:
    """Per-session pin area; hands out fresh pin roots and tracks trackers."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.trackers: list[ExitTracker] = []
        self.link_ids: set[int] = set()

    def root(self, name: str) -> str:
        return os.path.join(self.base, name)

    def open(self, root: str) -> ExitTracker:
        t = ExitTracker.open(root)
        self.trackers.append(t)
        self.link_ids.add(t.link_id)
        return t


@pytest.fixture(scope="session")
def pins() -> Iterator[Pins]:
    libbpf.ensure_bpffs("/sys/fs/bpf")
    base = f"/sys/fs/bpf/embedshim-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(base, mode=0o700)
    p = Pins(base)
    try:
        yield p
    finally:
        for t in p.trackers:
            t.close()
        shutil.rmtree(base, ignore_errors=True)
        assert not os.path.exists(base)
        # with the pins and our fds gone every link loaded here must detach
        # (the kernel frees bpffs inodes after an RCU grace period)
        deadline = time.monotonic() + 5
        alive = set(p.link_ids)
        while alive and time.monotonic() < deadline:
            for lid in list(alive):
                try:
                    os.close(libbpf.link_get_fd_by_id(lid))
                except libbpf.BPFError as e:
                    if e.errno == errno.ENOENT:
                        alive.discard(lid)
            time.sleep(0.02)
        assert not alive, f"links still attached after cleanup: {alive}"


@pytest.fixture(scope="session")
def tracker(pins: Pins) -> ExitTracker:
    return pins.open(pins.root("shared"))


class Child:
    """A forked child that blocks until released, then runs ``body``."""

    def __init__(self, body: Callable[[], None]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            try:
                os.close(w)
                os.read(r, 1)
                body()
            finally:
                os._exit(99)
        os.close(r)
        self.pid = pid
        self._w = w
        self.status: int | None = None

    def release(self) -> None:
        os.write(self._w, b"x")
        os.close(self._w)
        self._w = -1

    def wait(self) -> int:
        _, self.status = os.waitpid(self.pid, 0)
        return self.status

    def kill(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()
        if self._w >= 0:
            os.close(self._w)
            self._w = -1


@pytest.fixture
def spawn() -> Iterator[Callable[[Callable[[], None]], Child]]:
    children: list[Child] = []

    def _spawn(body: Callable[[], None]) -> Child:
        c = Child(body)
        children.append(c)
        return c

    yield _spawn
    for c in children:
        c.kill()


def wait_record(t: ExitTracker, trace_id: int, timeout: float = 5.0) -> ExitRecord:
    deadline = time.monotonic() + timeout
    while True:
        rec = t.lookup_exit(trace_id)
        if rec is not None:
            return rec
        if time.monotonic() > deadline:
            raise AssertionError(f"no exit record for trace id {trace_id}")
        time.sleep(0.005)


def register(t: ExitTracker, c: Child) -> int:
    tid = next_id()
    t.register(c.pid, tid, process_start_boottime(c.pid))
    return tid


def _exit_with(code: int) -> Callable[[], None]:
    return lambda: os._exit(code)


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _sys_exit(code: int) -> None:
    """Terminate only the calling thread (raw SYS_exit; ctypes drops the GIL)."""
    assert SYS_EXIT is not None
    ctypes.CDLL(None).syscall(SYS_EXIT, code)


def _thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "gone"
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def _wait_leader_zombie(pid: int) -> None:
    deadline = time.monotonic() + 5
    while _thread_state(pid, pid) not in ("Z", "X", "gone"):
        assert time.monotonic() < deadline, "leader thread did not exit"
        time.sleep(0.005)


# ------------------------------------------------------------------- tests


def test_layout_constants_match_source() -> None:
    with open(os.path.join(REPO, "bpf", "exitsnoop.bpf.c")) as f:
        src = f.read()
    assert f"#define EXITSNOOP_LAYOUT_VERSION {LAYOUT_VERSION}\n" in src
    assert f"int {PROG_NAME}(void *ctx)" in src
    assert f"#define MAX_TRACKED {TRACKED_MAX}\n" in src
    assert f"#define MAX_EXITS {EXITS_MAX}\n" in src
    assert default_object_path() == os.path.join(REPO, "bpf", "exitsnoop.bpf.o")


def test_available() -> None:
    ok, reason = ExitTracker.available()
    assert ok, reason


def test_committed_object_loads_attaches_and_pins(pins: Pins) -> None:
    root = pins.root("load")
    t0 = time.perf_counter()
    t = pins.open(root)
    load_ms = (time.perf_counter() - t0) * 1e3
    vdir = os.path.join(root, f"v{LAYOUT_VERSION}")
    assert t.pin_dir == vdir
    assert sorted(os.listdir(vdir)) == sorted([*MAPS, "link"])
    assert t.attached()
    link_fd = libbpf.obj_get(os.path.join(vdir, "link"))
    try:
        _, _, prog_id = libbpf.link_info(link_fd)
        prog_fd = libbpf.prog_get_fd_by_id(prog_id)
        assert libbpf.prog_name(prog_fd) == PROG_NAME
        os.close(prog_fd)
    finally:
        os.close(link_fd)
    assert t.tracked() == {}
    assert list(t.exits()) == []
    assert set(t.stats().values()) == {0}
    print(f"\nfull load+attach+pin: {load_ms:.1f} ms")


def test_reopen_reuses_pins(pins: Pins, tracker: ExitTracker) -> None:
    root = os.path.dirname(tracker.pin_dir)
    t0 = time.perf_counter()
    t2 = pins.open(root)
    open_ms = (time.perf_counter() - t0) * 1e3
    assert t2.link_id == tracker.link_id
    # both handles see the same maps
    tracker.register(1 << 23, 424242, 0)
    try:
        assert t2.tracked()[1 << 23] == (424242, 0)
    finally:
        assert t2.unregister(1 << 23)
    assert not tracker.unregister(1 << 23)
    t0 = time.perf_counter()
    assert t2.lookup_exit(1) is None
    lookup_us = (time.perf_counter() - t0) * 1e6
    print(f"\nopen pinned: {open_ms:.2f} ms, one lookup: {lookup_us:.0f} us")


def test_concurrent_open_loads_once(pins: Pins) -> None:
    root = pins.root("race")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from shim.exits.exittrack import ExitTracker
        sys.stdin.readline()
        t = ExitTracker.open({root!r})
        print(t.link_id)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for p in procs:  # start them together
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ids = {int(out) for out, _ in outs}
    assert len(ids) == 1, ids
    t = pins.open(root)
    assert t.link_id in ids and t.attached()


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_codes(tracker: ExitTracker, spawn: Callable[..., Child], code: int) -> None:
    c = spawn(_exit_with(code))
    start = process_start_boottime(c.pid)
    tid = register(tracker, c)
    assert tracker.tracked()[c.pid] == (tid, start)
    c.release()
    status = c.wait()
    rec = wait_record(tracker, tid)
    assert rec.trace_id == tid and rec.pid == c.pid
    assert rec.wait_status == status == code << 8
    assert rec.exit_status == code
    assert rec.signal == 0
    assert rec.start_boottime == start
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    assert now_boot - 10_000_000_000 < rec.exited_at_ns <= now_boot
    assert abs(rec.exited_at_wall_ns() - time.time_ns()) < 10_000_000_000
    assert rec.exited_at().tzinfo is not None
    assert c.pid not in tracker.tracked()  # the program drops the entry


@pytest.mark.parametrize(("sig", "expected"), [(signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_killed_by_signal(
    tracker: ExitTracker, spawn: Callable[..., Child], sig: int, expected: int
) -> None:
    c = spawn(_sleep_forever)
    tid = register(tracker, c)
    c.release()
    time.sleep(0.02)
    os.kill(c.pid, sig)
    status = c.wait()
    rec = wait_record(tracker, tid)
    assert rec.wait_status == status
    assert rec.signal == sig
    assert rec.exit_status == expected


@pytest.mark.skipif(SYS_EXIT is None, reason=f"SYS_exit number unknown on {platform.machine()}")
@pytest.mark.parametrize(
    ("case", "expected_status"),
    [
        ("group-exit", 6 << 8),  # leader SYS_exit(0), worker exit_group(6)
        ("thread-exit", 9 << 8),  # leader SYS_exit(3), last worker SYS_exit(9)
        ("killed", signal.SIGKILL),  # leader SYS_exit(0), then SIGKILL
    ],
)
def test_leader_exits_first(
    tracker: ExitTracker, spawn: Callable[..., Child], case: str, expected_status: int
) -> None:
    wr, ww = os.pipe()  # releases the worker

    def body() -> None:
        def worker() -> None:
            os.read(wr, 1)
            if case == "group-exit":
                os._exit(6)
            elif case == "thread-exit":
                _sys_exit(9)
            else:
                _sleep_forever()

        threading.Thread(target=worker, daemon=True).start()
        _sys_exit(3 if case == "thread-exit" else 0)

    c = spawn(body)
    os.close(wr)
    tid = register(tracker, c)
    c.release()
    _wait_leader_zombie(c.pid)
    time.sleep(0.05)
    # the leader is gone but the worker lives: no record yet
    assert tracker.lookup_exit(tid) is None
    assert c.pid in tracker.tracked()
    if case == "killed":
        os.kill(c.pid, signal.SIGKILL)
    else:
        os.write(ww, b"x")
    os.close(ww)
    status = c.wait()
    rec = wait_record(tracker, tid)
    assert rec.wait_status == status == expected_status
    assert tracker.stats()["duplicate"] == 0


def test_unregistered_pids_produce_no_records(
    tracker: ExitTracker, spawn: Callable[..., Child]
) -> None:
    before = {r.trace_id for r in tracker.exits()}
    recorded = tracker.stats()["recorded"]
    a = spawn(_exit_with(3))  # never registered
    b = spawn(_exit_with(4))  # registered then unregistered
    tid_b = register(tracker, b)
    assert tracker.unregister(b.pid)
    assert not tracker.unregister(b.pid)
    for c in (a, b):
        c.release()
        c.wait()
    time.sleep(0.05)
    assert {r.trace_id for r in tracker.exits()} == before
    assert tracker.lookup_exit(tid_b) is None
    assert tracker.stats()["recorded"] == recorded


def test_recycled_pid_guard(tracker: ExitTracker, spawn: Callable[..., Child]) -> None:
    """A tracked entry whose start time does not match (pid reused) is dropped, not recorded."""
    c = spawn(_exit_with(5))
    tid = next_id()
    tracker.register(c.pid, tid, process_start_boottime(c.pid) - 10_000_000)
    stale = tracker.stats()["stale"]
    c.release()
    c.wait()
    time.sleep(0.05)
    assert tracker.lookup_exit(tid) is None
    assert c.pid not in tracker.tracked()
    assert tracker.stats()["stale"] == stale + 1


def test_delete_and_iterate(tracker: ExitTracker, spawn: Callable[..., Child]) -> None:
    kids = [spawn(_exit_with(10 + i)) for i in range(3)]
    tids = [register(tracker, c) for c in kids]
    for c in kids:
        c.release()
        c.wait()
    recs = {r.trace_id: r for r in tracker.exits()}
    for i, tid in enumerate(tids):
        assert recs[tid].exit_status == 10 + i
    assert tracker.delete_exit(tids[0])
    assert not tracker.delete_exit(tids[0])
    assert tracker.lookup_exit(tids[0]) is None
    remaining = {r.trace_id for r in tracker.exits()}
    assert tids[0] not in remaining and {tids[1], tids[2]} <= remaining


def test_ring_buffer_notifies(tracker: ExitTracker, spawn: Callable[..., Child]) -> None:
    fd = tracker.ring_fd()
    tracker.poll_ring()  # drain notifications from earlier tests
    assert tracker.poll_ring() == []
    c = spawn(_exit_with(7))
    tid = register(tracker, c)
    c.release()
    r, _, _ = select.select([fd], [], [], 5)
    assert r == [fd], "ring fd did not become readable"
    assert tracker.poll_ring() == [tid]
    assert tracker.lookup_exit(tid) is not None  # the map stays the source of truth
    c.wait()

    async def via_asyncio() -> list[int]:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[list[int]] = loop.create_future()

        def on_readable() -> None:
            ids = tracker.poll_ring()
            if ids and not got.done():
                got.set_result(ids)

        loop.add_reader(fd, on_readable)
        try:
            c2 = spawn(_exit_with(8))
            tid2 = register(tracker, c2)
            c2.release()
            ids = await asyncio.wait_for(got, 5)
            c2.wait()
            assert tracker.lookup_exit(tid2) is not None
            return [tid2, *ids]
        finally:
            loop.remove_reader(fd)

    tid2, *ids = asyncio.run(via_asyncio())
    assert ids == [tid2]


def test_records_exit_while_no_process_holds_tracker(
    pins: Pins, spawn: Callable[..., Child]
) -> None:
    """Load+register in a subprocess that exits; the target dies afterwards; a
    fresh open of the pins finds the record: the pinned link keeps the
    program attached with no user-space holder."""
    root = pins.root("detached")
    target = spawn(_sleep_forever)
    target.release()
    tid = next_id()
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from shim.exits.exittrack import ExitTracker, process_start_boottime
        t = ExitTracker.open({root!r})
        t.register({target.pid}, {tid}, process_start_boottime({target.pid}))
        print(t.link_id)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    link_id = int(out.stdout)
    pins.link_ids.add(link_id)
    # this process never opened these pins; the loader is gone
    assert libbpf.is_bpffs(root)
    os.kill(target.pid, signal.SIGKILL)
    status = target.wait()
    t = pins.open(root)
    assert t.link_id == link_id  # re-used, not re-loaded
    rec = wait_record(t, tid)
    assert rec.pid == target.pid and rec.wait_status == status and rec.exit_status == 137


def test_tracked_map_full_raises(pins: Pins) -> None:
    t = pins.open(pins.root("full-tracked"))
    fake = 1 << 23  # above PID_MAX_LIMIT: never a real pid
    for i in range(TRACKED_MAX):
        t.register(fake + i, i + 1, 0)
    with pytest.raises(TrackedMapFull, match="tracked map full") as ei:
        t.register(fake + TRACKED_MAX, 1, 0)
    assert ei.value.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM)
    assert len(t.tracked()) == TRACKED_MAX
    t.register(fake, 77, 0)  # replacing an existing entry still works


def test_exits_map_full_keeps_tracked_entry(pins: Pins, spawn: Callable[..., Child]) -> None:
    """The program never drops an exit silently: when `exits` is full the
    tracked entry stays and `exits_full` is counted."""
    t = pins.open(pins.root("full-exits"))
    exits_fd = libbpf.obj_get(os.path.join(t.pin_dir, "exits"))
    try:
        for i in range(EXITS_MAX):
            libbpf.map_update(exits_fd, (1 << 40 | i).to_bytes(8, "little"), bytes(24))
    finally:
        os.close(exits_fd)
    c = spawn(_exit_with(9))
    tid = register(t, c)
    c.release()
    c.wait()
    time.sleep(0.05)
    assert t.lookup_exit(tid) is None
    assert t.tracked()[c.pid][0] == tid
    assert t.stats()["exits_full"] == 1
    assert t.stats()["recorded"] == 0


def test_process_start_boottime() -> None:
    mine = process_start_boottime(os.getpid())
    assert mine % 10_000_000 == 0
    assert 0 < mine <= time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    with pytest.raises(ProcessLookupError):
        process_start_boottime(1 << 23)


def test_exit_record_status_conversion() -> None:
    def rec(st: int) -> ExitRecord:
        return ExitRecord(1, 2, st, 0, 0)

    assert rec(0x0000).exit_status == 0
    assert rec(0x2A00).exit_status == 42
    assert rec(0xFF00).exit_status == 255
    assert rec(0x0009).exit_status == 137
    assert rec(0x000F).exit_status == 143
    assert rec(0x0086).exit_status == 134 and rec(0x0086).core_dumped
    with pytest.raises(AttributeError):
        rec(0).pid = 3
    assert rec(5) == rec(5) and rec(5) != rec(6)
