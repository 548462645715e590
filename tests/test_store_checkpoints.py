"""The daemon's store checkpoints its WAL from a thread, never inside a write of the event
loop (shim/store/statestore.py)."""

from __future__ import annotations

import os
import sqlite3
import time

from shim.store import statestore
from shim.store.statestore import ProcessRecord, StateStore


def _wal_pages(path: str) -> int:
    try:
        size = os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0
    return max(0, size - 32) // (4096 + 24)


def _fill(store: StateStore, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        store.put(ProcessRecord(namespace="ns", id=f"c{i}", options=b"x" * 2000))


def test_writes_do_not_checkpoint_and_the_thread_does(tmp_path, monkeypatch):
    monkeypatch.setattr(statestore, "CHECKPOINT_EVERY", 100)
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    store.checkpoint_in_background()
    cp = store._checkpointer
    assert cp is not None
    try:
        _fill(store, 99)
        time.sleep(0.2)
        assert cp.done == 0  # below the threshold: the writes alone never checkpoint
        assert _wal_pages(path) > 0
        before = cp.done
        _fill(store, 1, start=99)  # the 100th write asks the thread for one
        deadline = time.monotonic() + 5
        while cp.done == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cp.done == before + 1
        # What was checkpointed is in the database file itself: a reader that ignores the
        # WAL (immutable, no -wal read) sees every row.
        ro = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
        try:
            assert ro.execute("SELECT COUNT(*) FROM process").fetchone()[0] == 100
        finally:
            ro.close()
    finally:
        store.close()


def test_without_the_thread_sqlite_checkpoints_inside_a_write(tmp_path):
    """What the daemon avoids: a plain store (the `delete` subcommand's) lets sqlite
    checkpoint by itself once the WAL passes 1000 pages."""
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    try:
        _fill(store, 1500)
        assert _wal_pages(path) < 1100  # reset by an automatic checkpoint on the way
    finally:
        store.close()


def test_the_daemons_store_lets_the_wal_grow_between_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(statestore, "CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(statestore, "CHECKPOINT_PERIOD", 3600.0)
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    store.checkpoint_in_background()
    try:
        _fill(store, 1500)
        assert _wal_pages(path) > 1000  # no write paid for a checkpoint
    finally:
        store.close()
    reopened = StateStore(path)  # nothing lost: a WAL not checkpointed is read back
    try:
        assert reopened.count() == 1500
    finally:
        reopened.close()
