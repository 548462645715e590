"""An exec whose process has ended by the time ``runc exec`` returns (a probe, ``true``) is
answered as exited by Start itself, as the runc shim answers it: a Wait sent before Start
gets the status with Start's answer, not a loop turn later when the reaper collects the
zombie.  An exec still running when Start answers gets its exit later, once."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from shim.api import events_pb2, shim_pb2
from shim.store.statestore import ProcessRecord, StateStore
from shim.tasks.execprocess import ExecProcess
from shim.util import procinfo
from tests.fakes import RecordingEvents, bundle_dir, close_tasks, restored_tasks


class _Runc:
    """``runc exec`` as far as the daemon sees it: the process is started, runc exits, the
    pid is in the pid file.  ``argv``'s process is our child; with ``wait_dead`` this returns
    only once it has died (a zombie the reaper has not collected: no loop turn yet)."""

    def __init__(self, argv: list[str], wait_dead: bool) -> None:
        self.argv = argv
        self.wait_dead = wait_dead

    async def exec(self, id: str, process_file: str, pid_file: str, *a: Any, **kw: Any) -> None:
        pid = os.posix_spawn(self.argv[0], self.argv, {})
        if self.wait_dead:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        Path(pid_file).write_text(str(pid))


def _run(tmp_path: Path, argv: list[str], wait_dead: bool) -> dict[str, Any]:
    bundle = bundle_dir(tmp_path)
    store = StateStore(str(tmp_path / "state.db"))
    events = RecordingEvents()
    me = os.getpid()
    store.put(
        ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), pid=me,
                      start_time=procinfo.start_time(me), status="running")
    )  # fmt: skip

    async def main() -> dict[str, Any]:
        tasks = restored_tasks(tmp_path, store, events)
        task = tasks.get("ns", "c1")
        task.runc.exec = _Runc(argv, wait_dead).exec  # type: ignore[method-assign]
        spec = {"args": argv, "cwd": "/", "user": {"uid": 0, "gid": 0}}
        req = shim_pb2.ExecProcessRequest(id="c1", exec_id="e1")
        req.spec.value = json.dumps(spec).encode()
        p = tasks.add_exec("ns", req)
        assert isinstance(p, ExecProcess)
        pid = await p.start()
        out: dict[str, Any] = {"pid": pid, "exited_at_answer": p.exited}
        out["wait"] = await asyncio.wait_for(p.wait(), 10)
        await asyncio.sleep(0.05)  # the reaper's turn
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            out["collected"] = False
        except ChildProcessError:
            out["collected"] = True
        out["record"] = store.get("ns", "c1", "e1")
        out["events"] = list(events.sent)
        await tasks.delete("ns", "c1", "e1")
        close_tasks(tasks)
        return out

    try:
        return asyncio.run(main())
    finally:
        store.close()


def test_an_exec_dead_before_start_answers_is_exited_in_the_answer(tmp_path: Path) -> None:
    out = _run(tmp_path, ["/bin/sh", "-c", "exit 3"], wait_dead=True)
    assert out["exited_at_answer"] is True
    status, exited_at = out["wait"]
    assert status == 3 and exited_at > 0
    assert out["collected"]  # the reaper still took the zombie: nothing left behind
    rec = out["record"]
    assert rec is not None and rec.exit_status == 3


def test_the_exit_goes_out_once_after_exec_started(tmp_path: Path) -> None:
    out = _run(tmp_path, ["/bin/sh", "-c", "exit 3"], wait_dead=True)
    sent = out["events"]
    names = [n for n, _ in sent if n.startswith("TaskExec") or n == "TaskExit"]
    assert names == ["TaskExecAdded", "TaskExecStarted", "TaskExit"]
    (ex,) = [e for n, e in sent if n == "TaskExit"]
    assert isinstance(ex, events_pb2.TaskExit) and ex.exit_status == 3 and ex.id == "e1"


def test_an_exec_still_running_at_the_answer_exits_later(tmp_path: Path) -> None:
    out = _run(tmp_path, ["/bin/sh", "-c", "sleep 0.2; exit 4"], wait_dead=False)
    assert out["exited_at_answer"] is False
    assert out["wait"][0] == 4
    assert out["collected"]
