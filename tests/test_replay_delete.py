"""A Delete the dead daemon did but did not answer: the store keeps what it answered, in the
same transaction as the removal, and a replayed Delete (or Cleanup) answers that."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.api import shim_pb2
from shim.store import statestore
from shim.store.statestore import ProcessRecord, StateStore, StoreError
from shim.tasks import faults
from shim.tasks.faults import Faults
from shim.tasks.service import DAEMON_SERVICE, NAMESPACE_KEY, TASK_SERVICE, TaskService
from shim.ttrpc import Code, Context, TTRPCError
from shim.util import errors

ANSWER = (4242, 137, 1_700_000_000_123_456_789)


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(str(tmp_path / "state.db"))
    s.put(ProcessRecord(namespace="ns", id="c1", pid=4242))
    s.put(ProcessRecord(namespace="ns", id="c1", exec_id="e1", pid=4300))
    return s


def test_delete_keeps_the_answer_with_the_removal(store: StateStore) -> None:
    assert store.deleted("ns", "c1", "e1") is None
    store.delete("ns", "c1", "e1", answer=(4300, 5, 7))
    assert store.get("ns", "c1", "e1") is None and store.get("ns", "c1") is not None
    assert store.deleted("ns", "c1", "e1") == (4300, 5, 7)
    assert store.deleted("ns", "c1") is None  # the task is still there
    store.delete("ns", "c1", answer=ANSWER)
    assert store.count() == 0
    assert store.deleted("ns", "c1") == ANSWER
    assert store.deleted("other", "c1") is None
    # A task created again under the same id is not answered from its predecessor's record.
    store.put(ProcessRecord(namespace="ns", id="c1"))
    assert store.deleted("ns", "c1") is None
    store.delete("ns", "c1")  # without an answer (undo create): no record, the old one stays
    store.delete("ns", "c1", answer=(1, 2, 3))
    assert store.deleted("ns", "c1") == (1, 2, 3)  # the newest


def test_removal_and_record_are_one_transaction(store: StateStore) -> None:
    """If the record cannot be written, the process is not removed either (and the error
    is the store's own, which best_effort logs)."""
    with sqlite3.connect(store.path) as db:
        db.execute("CREATE TRIGGER no BEFORE INSERT ON deleted BEGIN SELECT RAISE(ABORT, 'x'); END")
    with pytest.raises(StoreError):
        store.delete("ns", "c1", answer=ANSWER)
    assert store.get("ns", "c1") is not None and store.get("ns", "c1", "e1") is not None
    store.delete("ns", "c1")  # the store still works, in autocommit as before
    assert store.count() == 0


def test_records_are_bounded_by_count_and_age(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = statestore.MAX_DELETED + 50
    for i in range(n):
        store.delete("ns", f"t{i}", answer=(i, 0, 0))
    with sqlite3.connect(store.path) as db:
        kept = db.execute("SELECT COUNT(*) FROM deleted").fetchone()[0]
    assert statestore.MAX_DELETED <= kept < statestore.MAX_DELETED + statestore.PRUNE_EVERY
    assert store.deleted("ns", "t0") is None
    assert store.deleted("ns", f"t{n - 1}") == (n - 1, 0, 0)
    store.close()
    # Older than the TTL: not answered, and gone when the store is next opened.
    monkeypatch.setattr(statestore, "DELETED_TTL_NS", -(10**12))
    reopened = StateStore(store.path)
    assert reopened.deleted("ns", f"t{n - 1}") is None
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM deleted").fetchone()[0] == 0


def test_store_of_the_previous_schema_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as db:
        for i, script in enumerate(statestore.MIGRATIONS[:-1]):
            db.executescript(script + f"; PRAGMA user_version={i + 1};")
    s = StateStore(path)
    s.put(ProcessRecord(namespace="ns", id="c1"))
    s.delete("ns", "c1", answer=ANSWER)
    assert s.deleted("ns", "c1") == ANSWER


class FakeTasks:
    """The registry as the service sees it: c1 with exec e1, deleted through the real store."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.live = {("ns", "c1", ""), ("ns", "c1", "e1")}
        self.deps = SimpleNamespace(faults=Faults())

    def get(self, ns: str, id: str) -> object:
        raise errors.not_found(f"container {id!r} not found")

    def find(self, ns: str, id: str) -> None:
        return None

    def all(self) -> list[object]:
        return []

    async def delete(self, ns: str, id: str, exec_id: str) -> tuple[int, int, int]:
        if (ns, id, exec_id) not in self.live:
            raise errors.not_found(f"process {id}/{exec_id} not found")
        self.live.discard((ns, id, exec_id))
        answer = (4300, 5, 7) if exec_id else ANSWER
        self.store.delete(ns, id, exec_id or None, answer=answer)
        return answer

    def deleted(self, ns: str, id: str, exec_id: str) -> tuple[int, int, int] | None:
        return self.store.deleted(ns, id, exec_id)


def _call(
    svc: TaskService, method: str, payload: bytes, replayed: bool, daemon: bool = False
) -> bytes:
    table = svc.daemon_methods() if daemon else svc.methods()
    ctx = Context(
        service=DAEMON_SERVICE if daemon else TASK_SERVICE,
        method=method,
        metadata={NAMESPACE_KEY: ["ns"]},
        replayed=replayed,
    )
    return asyncio.run(table[method](ctx, payload))


def _delete(svc: TaskService, exec_id: str, replayed: bool) -> tuple[int, int, int]:
    req = shim_pb2.DeleteRequest(id="c1", exec_id=exec_id).SerializeToString()
    resp = shim_pb2.DeleteResponse.FromString(_call(svc, "Delete", req, replayed))
    return resp.pid, resp.exit_status, resp.exited_at.ToNanoseconds()


def test_a_replayed_delete_gets_the_answer_the_dead_daemon_would_have_sent(
    store: StateStore,
) -> None:
    svc = TaskService(FakeTasks(store), lambda: None)  # type: ignore[arg-type]
    assert _delete(svc, "e1", replayed=False) == (4300, 5, 7)
    assert _delete(svc, "e1", replayed=True) == (4300, 5, 7)
    assert _delete(svc, "", replayed=False) == ANSWER
    assert _delete(svc, "", replayed=True) == ANSWER
    # Only a replayed request is answered from the record: a fresh Delete of a task gone
    # is NotFound, as containerd expects.
    for exec_id in ("", "e1"):
        with pytest.raises(TTRPCError) as info:
            _delete(svc, exec_id, replayed=False)
        assert info.value.code == Code.NOT_FOUND
    # Cleanup (the `delete` subcommand) replayed: the same.
    out = _call(svc, "Cleanup", b"ns\0c1", replayed=True, daemon=True)
    assert shim_pb2.DeleteResponse.FromString(out).exit_status == ANSWER[1]


def test_a_replayed_delete_of_a_process_never_deleted_is_not_found(store: StateStore) -> None:
    svc = TaskService(FakeTasks(store), lambda: None)  # type: ignore[arg-type]
    for exec_id in ("", "e2"):
        req = shim_pb2.DeleteRequest(id="c9", exec_id=exec_id).SerializeToString()
        with pytest.raises(TTRPCError) as info:
            _call(svc, "Delete", req, replayed=True)
        assert info.value.code == Code.NOT_FOUND
    with pytest.raises(TTRPCError) as info:
        _call(svc, "Cleanup", b"ns\0c9", replayed=True, daemon=True)
    assert info.value.code == Code.NOT_FOUND


def test_fault_kill_after_delete_kills_between_the_removal_and_the_answer(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed: list[tuple[int, int, bool]] = []

    def kill(pid: int, sig: int) -> None:
        killed.append((pid, sig, store.get("ns", "c1", "e1") is None))
        raise SystemExit  # stands for the death: no answer

    monkeypatch.setattr(faults.os, "kill", kill)
    svc = TaskService(FakeTasks(store), lambda: None)  # type: ignore[arg-type]
    assert _delete(svc, "e1", replayed=False) == (4300, 5, 7)
    assert killed == []
    _call(svc, "Fault", b"kill-after-delete", replayed=False, daemon=True)
    with pytest.raises(SystemExit):
        _delete(svc, "", replayed=False)
    assert killed == [(os.getpid(), signal.SIGKILL, True)]
    assert store.get("ns", "c1") is None and store.deleted("ns", "c1") == ANSWER
    with pytest.raises(TTRPCError) as info:
        _call(svc, "Fault", b"bogus", replayed=False, daemon=True)
    assert info.value.code == Code.INVALID_ARGUMENT
