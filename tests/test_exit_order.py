"""The exit transition's order: containerd hears of an exit only once a daemon crash cannot
lose it.  For a process registered with the pinned BPF exit map the kernel keeps the exit
until its entries go, so TaskExit and the Waits' answers go first and the record is written
a loop step later, the BPF entries dropped only after it; for one not registered the record
comes first."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

from shim.store.statestore import ProcessRecord, StateStore
from shim.util import procinfo
from tests.fakes import RecordingEvents, bundle_dir, close_tasks, restored_tasks


class _Tracker:
    """The BPF exit tracker as the exit transition uses it: what was dropped, in order."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.dropped: list[tuple[str, int, int | None]] = []

    def _recorded(self) -> int | None:
        rec = self.store.get("ns", "c1")
        return rec.exit_status if rec else None

    def delete_exit(self, trace_id: int) -> None:
        self.dropped.append(("exit", trace_id, self._recorded()))

    def unregister(self, pid: int) -> None:
        self.dropped.append(("pid", pid, self._recorded()))

    def lookup_exit(self, trace_id: int) -> None:
        return None


def _exit_of_a_restored_init(tmp_path: Path, trace_id: int) -> dict[str, Any]:
    bundle = bundle_dir(tmp_path)
    store = StateStore(str(tmp_path / "state.db"))
    events = RecordingEvents()
    tracker = _Tracker(store)
    child = subprocess.Popen(["sleep", "1000"])  # the container's init, our child
    store.put(
        ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), pid=child.pid,
                      start_time=procinfo.start_time(child.pid), trace_id=trace_id,
                      status="running")
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        tasks = restored_tasks(tmp_path, store, events, tracker=tracker)
        p = tasks.get("ns", "c1").init
        waiter = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0)
        out: dict[str, Any] = {}
        p.set_exited(5, 123)  # as the exit watch does, in one step of the loop
        rec = store.get("ns", "c1")
        out["in_step"] = {
            "published": [n for n, _ in events.sent if n == "TaskExit"],
            "answered": p.exited,
            "recorded": rec.exit_status if rec else None,
            "dropped": list(tracker.dropped),
        }
        out["wait"] = await asyncio.wait_for(waiter, 5)
        await asyncio.sleep(0)
        rec = store.get("ns", "c1")
        out["after"] = {"recorded": rec.exit_status if rec else None, "dropped": tracker.dropped}
        close_tasks(tasks)
        return out

    try:
        return asyncio.run(main())
    finally:
        child.kill()
        child.wait()
        store.close()


def test_a_registered_exit_goes_out_before_its_record(tmp_path: Path) -> None:
    out = _exit_of_a_restored_init(tmp_path, trace_id=77)
    # In the exit's own step: published and answered, not written, the BPF entries kept.
    assert out["in_step"] == {
        "published": ["TaskExit"],
        "answered": True,
        "recorded": None,
        "dropped": [],
    }
    assert out["wait"] == (5, 123)
    # The next step: the record, then the BPF entries (each dropped with the record there).
    pid = [d[1] for d in out["after"]["dropped"] if d[0] == "pid"]
    assert out["after"] == {"recorded": 5, "dropped": [("exit", 77, 5), ("pid", pid[0], 5)]}


def test_an_unregistered_exit_is_recorded_before_it_goes_out(tmp_path: Path) -> None:
    out = _exit_of_a_restored_init(tmp_path, trace_id=0)
    assert out["in_step"] == {
        "published": ["TaskExit"],
        "answered": True,
        "recorded": 5,
        "dropped": [],  # nothing registered, nothing to drop
    }
    assert out["wait"] == (5, 123)
    assert out["after"] == {"recorded": 5, "dropped": []}


def test_the_record_is_written_at_once_outside_a_loop(tmp_path: Path) -> None:
    """``delete`` without a daemon and other callers outside a loop: no step to wait for."""
    from shim.tasks.process import _soon

    calls: list[tuple[int, int]] = []
    _soon(lambda s, a: calls.append((s, a)), 3, 4)
    assert calls == [(3, 4)]
