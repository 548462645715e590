"""OOM accounting: cgroup lookup, counter parsing, the v2 inotify watch, and a restored
task reporting a kill it missed before its exit."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shim.exits.memcg import V1, V2, MemoryCgroup, parse_oom_kills
from shim.exits.oom import OOMWatcher
from shim.oci.cgroups import Cgroup, cgroup_mounts
from tests.fakes import RecordingEvents

V1_MOUNTINFO = """\
25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw
30 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 25 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "28 1 0:26 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def _memcg(tmp: Path, mountinfo: str, proc_cgroup: str, files: list[str]) -> MemoryCgroup | None:
    """The memory cgroup of a process in ``proc_cgroup``, with cgroup files under ``tmp``."""
    for rel in files:
        p = tmp / "cg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("")
    mounts = cgroup_mounts(mountinfo.replace("/sys/fs/cgroup", str(tmp / "cg")))
    return MemoryCgroup.of(Cgroup.resolve(proc_cgroup, mounts))


def test_counter_lines() -> None:
    v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n"
    assert parse_oom_kills(v1) == 3 and parse_oom_kills(v2) == 1
    assert parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n") is None  # before 4.13


def test_v1_memory_cgroup_on_a_hybrid_host(tmp_path: Path) -> None:
    cgroup = "12:memory:/ns/c1\n4:cpu,cpuacct:/ns/c1\n0::/ns/c1\n"
    got = _memcg(tmp_path, V1_MOUNTINFO, cgroup, ["memory/ns/c1/memory.oom_control"])
    assert got == MemoryCgroup(V1, str(tmp_path / "cg/memory/ns/c1"))
    assert got.counter_file.endswith("/ns/c1/memory.oom_control")
    assert MemoryCgroup.decode(got.encode()) == got


def test_v2_memory_cgroup(tmp_path: Path) -> None:
    got = _memcg(tmp_path, V2_MOUNTINFO, "0::/k8s/c2\n", ["k8s/c2/memory.events"])
    assert got == MemoryCgroup(V2, str(tmp_path / "cg/k8s/c2"))
    assert got.counter_file.endswith("/k8s/c2/memory.events")


def test_v2_without_the_memory_controller_is_none(tmp_path: Path) -> None:
    assert _memcg(tmp_path, V2_MOUNTINFO, "0::/k8s/c3\n", ["k8s/c3/cgroup.procs"]) is None


@pytest.mark.parametrize("text", ["", "v3:/x", "v1:", "nonsense"])
def test_bad_stored_cgroup(text: str) -> None:
    assert MemoryCgroup.decode(text) is None


def test_v2_watch_wakes_on_a_change_and_stops_on_unwatch(tmp_path: Path) -> None:
    """inotify on memory.events: a write to the file (here by us, by the kernel for real)
    calls back; after unwatch nothing does."""
    events = tmp_path / "memory.events"
    events.write_text("oom 0\noom_kill 0\n")
    cg = MemoryCgroup(V2, str(tmp_path))

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        watcher = OOMWatcher(loop)
        seen: list[int] = []
        woke = asyncio.Event()

        def callback() -> None:
            seen.append(cg.oom_kills() or 0)
            woke.set()

        watcher.watch(("ns", "c"), cg, callback)
        assert len(watcher) == 1
        events.write_text("oom 1\noom_kill 1\n")
        await asyncio.wait_for(woke.wait(), 5)
        watcher.unwatch(("ns", "c"))
        woke.clear()
        events.write_text("oom 2\noom_kill 2\n")
        await asyncio.sleep(0.2)
        assert not woke.is_set()
        watcher.close()
        return seen

    assert asyncio.run(main())[0] == 1


V1_MEMORY = "/sys/fs/cgroup/memory"


@pytest.mark.skipif(
    not os.path.exists(os.path.join(V1_MEMORY, "cgroup.event_control")) or os.geteuid() != 0,
    reason="needs root and a cgroup v1 memory hierarchy",
)
def test_v1_wake_up_reads_only_its_own_cgroup() -> None:
    """The kernel signals a v1 registration when its cgroup goes (every runc delete): only
    that container's counter is read again, not every container's; an unwatched cgroup's
    removal wakes nothing, and close leaves no fd behind."""
    base = os.path.join(V1_MEMORY, f"esh-oomtest-{os.getpid()}")
    paths = {name: f"{base}-{name}" for name in ("a", "b", "c")}
    for path in paths.values():
        os.mkdir(path)

    async def main() -> dict[str, int]:
        watcher = OOMWatcher(asyncio.get_running_loop())
        calls = dict.fromkeys(paths, 0)
        fds = len(os.listdir("/proc/self/fd"))
        for name, path in paths.items():
            watcher.watch(("ns", name), MemoryCgroup(V1, path), lambda n=name: _count(calls, n))
        assert len(watcher) == 3
        watcher.unwatch(("ns", "c"))
        os.rmdir(paths["c"])
        os.rmdir(paths["a"])
        for _ in range(100):
            await asyncio.sleep(0.01)
            if calls["a"]:
                break
        await asyncio.sleep(0.1)  # the first recheck (50 ms) too
        watcher.close()
        assert len(os.listdir("/proc/self/fd")) == fds
        return calls

    try:
        calls = asyncio.run(main())
    finally:
        for path in paths.values():
            if os.path.exists(path):
                os.rmdir(path)
    assert calls["a"] >= 2 and calls["b"] == 0 and calls["c"] == 0


def _count(calls: dict[str, int], name: str) -> None:
    calls[name] += 1


def test_v1_watch_of_a_missing_cgroup_is_logged_not_raised(tmp_path: Path) -> None:
    async def main() -> int:
        watcher = OOMWatcher(asyncio.get_running_loop())
        watcher.watch(("ns", "c"), MemoryCgroup(V1, str(tmp_path / "gone")), lambda: None)
        n = len(watcher)
        watcher.close()
        return n

    assert asyncio.run(main()) == 0


# --- a restored task: a kill counted while no daemon ran goes out before its exit ---


def test_restore_reports_a_missed_kill_before_the_exit(tmp_path: Path) -> None:
    from shim.exits.reaper import Reaper
    from shim.store.statestore import ProcessRecord, StateStore
    from shim.tasks.task import Deps, Tasks
    from shim.util.paths import DaemonPaths

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    cgdir = tmp_path / "memcg"
    cgdir.mkdir()
    (cgdir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    store = StateStore(str(tmp_path / "state.db"))
    # The daemon saw no kill; the init's pid is long gone (start time never matches).
    store.put(
        ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), pid=2**22 - 5,
                      start_time=1, trace_id=7, status="running",
                      memcg=MemoryCgroup(V1, str(cgdir)).encode())
    )  # fmt: skip
    events = RecordingEvents()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reaper = Reaper(loop)
        paths = DaemonPaths(str(tmp_path))
        exits = None  # the exit comes from the (absent) BPF map: status unknown, 255
        deps = Deps(paths, reaper, exits, store, events)  # type: ignore[arg-type]
        tasks = Tasks(deps)
        tasks.restore()
        task = tasks.get("ns", "c1")
        assert task.init.exited and task.oom_kills == task.oom_published == 1
        for t in tasks.all():
            t.close()
        reaper.close()

    asyncio.run(main())
    assert [name for name, _ in events.sent] == ["TaskOOM", "TaskExit"]
    rec = store.get("ns", "c1")
    assert rec is not None and (rec.oom_kills, rec.oom_published) == (1, 1)
    # Restored again (say, another re-exec): nothing new, nothing sent twice.
    events.sent.clear()
    store.update("ns", "c1", exit_published=True)

    async def again() -> None:
        loop = asyncio.get_running_loop()
        reaper = Reaper(loop)
        deps = Deps(DaemonPaths(str(tmp_path)), reaper, None, store, events)  # type: ignore[arg-type]
        tasks = Tasks(deps)
        tasks.restore()
        for t in tasks.all():
            t.close()
        reaper.close()

    asyncio.run(again())
    assert events.sent == []
    store.close()


def test_v2_removed_cgroup_drops_its_watch_and_leaves_the_others(tmp_path: Path) -> None:
    """A removed memory.events (the cgroup gone: IN_IGNORED) drops that container's watch;
    another container's change still calls back its own callback only."""
    cgs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "memory.events").write_text("oom_kill 0\n")
        cgs[name] = MemoryCgroup(V2, str(tmp_path / name))

    async def main() -> list[str]:
        watcher = OOMWatcher(asyncio.get_running_loop())
        seen: list[str] = []
        woke = asyncio.Event()

        def callback(name: str) -> None:
            seen.append(name)
            woke.set()

        for name, cg in cgs.items():
            watcher.watch(("ns", name), cg, lambda n=name: callback(n))
        (tmp_path / "a" / "memory.events").unlink()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(watcher) == 1:
                break
        assert len(watcher) == 1
        (tmp_path / "b" / "memory.events").write_text("oom_kill 1\n")
        await asyncio.wait_for(woke.wait(), 5)
        watcher.unwatch(("ns", "a"))  # already dropped: nothing happens
        watcher.close()
        return seen

    assert asyncio.run(main()) == ["b"]
