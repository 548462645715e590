"""The daemon's persistent state: one sqlite3 database (WAL) per daemon.

Every task and exec is written here before containerd hears about it, and its exit is written
before the exit is published, so a restarted daemon, or the ``delete`` subcommand run after a
crash, knows every task and every exit status the old daemon knew.  Schema changes are
migrations keyed by ``PRAGMA user_version``.

The daemon's writes append to the WAL without syncing it (``synchronous=NORMAL``: the store
must survive the daemon, not the machine, whose containers die with it).  sqlite syncs only
when it copies the WAL back into the database, a checkpoint, which it does by itself inside
the write that takes the WAL past 1000 pages: three fdatasyncs, 5-6 ms on a disk (here every
130 execs or so), in the middle of one request while the event loop waits.  The daemon's
store turns that off and checkpoints from a thread of its own with a connection of its own
(:class:`Checkpointer`): sqlite lets the writer go on meanwhile, and the thread waits for
the disk without the GIL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

from shim.util import log

# Each entry upgrades the schema from version i to i+1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE process (
        namespace   TEXT NOT NULL,
        id          TEXT NOT NULL,
        exec_id     TEXT NOT NULL DEFAULT '',
        bundle      TEXT NOT NULL DEFAULT '',
        pid         INTEGER NOT NULL DEFAULT 0,
        start_time  INTEGER NOT NULL DEFAULT 0,
        trace_id    INTEGER NOT NULL DEFAULT 0,
        status      TEXT NOT NULL DEFAULT 'created',
        exit_status INTEGER,
        exited_at   INTEGER,
        stdin       TEXT NOT NULL DEFAULT '',
        stdout      TEXT NOT NULL DEFAULT '',
        stderr      TEXT NOT NULL DEFAULT '',
        terminal    INTEGER NOT NULL DEFAULT 0,
        runc_root   TEXT NOT NULL DEFAULT '',
        options     BLOB,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (namespace, id, exec_id)
    );
    CREATE TABLE counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counter VALUES ('trace_id', 0);
    """,
    # The exit event reached containerd: a restarted daemon re-publishes exits it lacks.
    """
    ALTER TABLE process ADD COLUMN exit_published INTEGER NOT NULL DEFAULT 0;
    """,
    # The exec wrapper older images ran (its status file outlives a daemon restart).
    """
    ALTER TABLE process ADD COLUMN helper_pid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE process ADD COLUMN helper_start INTEGER NOT NULL DEFAULT 0;
    """,
    # OOM kills: the container's memory cgroup ("v1:/sys/fs/cgroup/memory/..."), the
    # kernel's oom_kill count last seen there, and the count containerd was told of (so a
    # kill while no daemon ran, or an event lost in a crash, is reported on restore); and
    # the checkpoint a created task is to be restored from when it starts.
    """
    ALTER TABLE process ADD COLUMN memcg TEXT NOT NULL DEFAULT '';
    ALTER TABLE process ADD COLUMN oom_kills INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE process ADD COLUMN oom_published INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE process ADD COLUMN checkpoint TEXT NOT NULL DEFAULT '';
    """,
    # What a Delete answered, written with the removal: a Delete the dead daemon did but
    # did not answer is answered the same by its successor (see StateStore.delete).
    """
    CREATE TABLE deleted (
        seq         INTEGER PRIMARY KEY,
        namespace   TEXT NOT NULL,
        id          TEXT NOT NULL,
        exec_id     TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        exit_status INTEGER NOT NULL,
        exited_at   INTEGER NOT NULL,
        deleted_at  INTEGER NOT NULL
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
# Deletes remembered for a successor's replay (which comes within a second or so of the
# death): the newest this many, none older than this.
MAX_DELETED = 256
PRUNE_EVERY = 32  # the oldest go once in so many deletes (so at most MAX + PRUNE_EVERY - 1)
DELETED_TTL_NS = 3600 * 10**9
# Trace ids are taken from the persistent counter this many at a time: one write per so
# many creates instead of one per create (ids of a block a daemon did not use are skipped).
TRACE_ID_BLOCK = 64


@dataclass
class ProcessRecord:
    """One init (exec_id '') or exec process, as persisted."""

    namespace: str
    id: str
    exec_id: str = ""
    bundle: str = ""
    pid: int = 0
    start_time: int = 0
    trace_id: int = 0
    status: str = "created"
    exit_status: int | None = None
    exited_at: int | None = None  # wall clock, ns
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    runc_root: str = ""
    options: bytes | None = None
    created_at: int = field(default_factory=time.time_ns)
    exit_published: bool = False
    helper_pid: int = 0
    helper_start: int = 0
    memcg: str = ""
    oom_kills: int = 0
    oom_published: int = 0
    checkpoint: str = ""


_COLUMNS = [f.name for f in fields(ProcessRecord)]


class StoreError(Exception):
    """The store could not be read or written (disk full, corrupt file, newer schema)."""


def best_effort(write: Callable[[], object], what: str, **fields: object) -> bool:
    """Run a store write that must not fail the transition it records (an exit, a delete):
    when the disk is full the daemon keeps serving from memory and says so in its log."""
    try:
        write()
    except StoreError as exc:
        log.event("state not persisted", logging.ERROR, **fields, what=what, error=exc)
        return False
    return True


#: writes between two checkpoints (about 3 WAL pages each: sqlite's own default is 1000 pages)
CHECKPOINT_EVERY = 300
#: and at least this often (seconds) while anything was written
CHECKPOINT_PERIOD = 30.0


class Checkpointer:
    """Checkpoints the WAL of the database at ``path`` in a thread, when told to (after
    CHECKPOINT_EVERY writes) or every CHECKPOINT_PERIOD seconds after a write."""

    def __init__(self, path: str) -> None:
        # Opened here, and read once (which opens the WAL): the daemon's descriptors are
        # what they will stay from its start on, not one more at the first checkpoint.
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
        self._wanted = threading.Event()
        self._stop = False
        self._dirty = False
        self._writes = 0  # since the last request for a checkpoint
        self.done = 0  # checkpoints made (for tests)
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def wrote(self) -> None:
        """One more write: every CHECKPOINT_EVERY of them, the thread checkpoints."""
        self._dirty = True
        self._writes += 1
        if self._writes >= CHECKPOINT_EVERY:
            self._writes = 0
            self._wanted.set()

    def close(self) -> None:
        """Stop the thread; a last checkpoint of what was written is the next open's job."""
        self._stop = True
        self._wanted.set()
        self._thread.join(timeout=10.0)

    def _run(self) -> None:
        try:
            while True:
                self._wanted.wait(CHECKPOINT_PERIOD)
                self._wanted.clear()
                if self._stop:
                    return
                if not self._dirty:
                    continue
                self._dirty = False
                try:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except sqlite3.Error as exc:
                    log.event("state checkpoint failed", logging.WARNING, error=exc)
        finally:
            self._db.close()


class StateStore:
    def __init__(self, path: str) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
            self._db.execute(
                "DELETE FROM deleted WHERE deleted_at < ?", (time.time_ns() - DELETED_TTL_NS,)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"state store {path}: {exc}") from exc
        self.path = path
        self._trace_next = self._trace_end = 0  # the block of trace ids taken, [next, end)
        self._checkpointer: Checkpointer | None = None

    def checkpoint_in_background(self) -> None:
        """Checkpoint from a thread (see the module's docstring), not inside our writes."""
        if self._checkpointer is None:
            try:
                checkpointer = Checkpointer(self.path)
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            except sqlite3.Error as exc:  # sqlite goes on checkpointing inside writes
                log.event("state checkpoints stay in the writes", logging.WARNING, error=exc)
                return
            self._checkpointer = checkpointer

    def _wrote(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wrote()

    def _migrate(self) -> None:
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"schema version {version} is newer than this embedshim knows ({SCHEMA_VERSION})"
            )
        for i in range(version, SCHEMA_VERSION):
            try:
                self._db.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[i]}; PRAGMA user_version={i + 1}; COMMIT;"
                )
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self._db.close()

    def _write(self, sql: str, args: tuple[object, ...]) -> None:
        try:
            self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"state store: {exc}") from exc
        self._wrote()

    def put(self, rec: ProcessRecord) -> None:
        """Insert or replace the whole record."""
        cols = ",".join(_COLUMNS)
        marks = ",".join("?" for _ in _COLUMNS)
        values = tuple(getattr(rec, c) for c in _COLUMNS)
        self._write(f"INSERT OR REPLACE INTO process ({cols}) VALUES ({marks})", values)

    def update(self, namespace: str, id: str, exec_id: str = "", **changes: object) -> None:
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown columns {sorted(unknown)}")
        sets = ",".join(f"{k}=?" for k in changes)
        self._write(
            f"UPDATE process SET {sets} WHERE namespace=? AND id=? AND exec_id=?",
            (*changes.values(), namespace, id, exec_id),
        )

    def get(self, namespace: str, id: str, exec_id: str = "") -> ProcessRecord | None:
        row = self._db.execute(
            f"SELECT {','.join(_COLUMNS)} FROM process WHERE namespace=? AND id=? AND exec_id=?",
            (namespace, id, exec_id),
        ).fetchone()
        return _record(row) if row else None

    def delete(
        self,
        namespace: str,
        id: str,
        exec_id: str | None = None,
        answer: tuple[int, int, int] | None = None,
    ) -> None:
        """Forget a process; with exec_id None, the task and all its execs.  ``answer``
        (pid, exit status, exited_at ns), what the Delete answers, is kept in the same
        transaction for :meth:`deleted`; now and then the oldest past MAX_DELETED go in it too."""
        args: tuple[str, ...] = (namespace, id)
        sql = "DELETE FROM process WHERE namespace=? AND id=?"
        if exec_id is not None:
            sql, args = sql + " AND exec_id=?", (namespace, id, exec_id)
        if answer is None:
            self._write(sql, args)
            return
        try:
            self._db.execute("BEGIN")
            try:
                self._db.execute(sql, args)
                seq = self._db.execute(
                    "INSERT INTO deleted (namespace, id, exec_id, pid, exit_status, exited_at,"
                    " deleted_at) VALUES (?,?,?,?,?,?,?)",
                    (namespace, id, exec_id or "", *answer, time.time_ns()),
                ).lastrowid
                if seq is not None and seq % PRUNE_EVERY == 0:
                    self._db.execute("DELETE FROM deleted WHERE seq <= ?", (seq - MAX_DELETED,))
                self._db.execute("COMMIT")
                self._wrote()
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"state store: {exc}") from exc

    def deleted(self, namespace: str, id: str, exec_id: str = "") -> tuple[int, int, int] | None:
        """What the last Delete of this process answered (pid, exit status, exited_at ns), if
        it is recent (DELETED_TTL_NS) and the process was not created again since."""
        try:
            row = self._db.execute(
                "SELECT pid, exit_status, exited_at FROM deleted WHERE namespace=? AND id=?"
                " AND exec_id=? AND deleted_at >= ? ORDER BY seq DESC LIMIT 1",
                (namespace, id, exec_id, time.time_ns() - DELETED_TTL_NS),
            ).fetchone()
            if row is None or self.get(namespace, id, exec_id) is not None:
                return None
        except sqlite3.Error as exc:
            raise StoreError(f"state store: {exc}") from exc
        return int(row[0]), int(row[1]), int(row[2])

    def all(self) -> Iterator[ProcessRecord]:
        rows = self._db.execute(
            f"SELECT {','.join(_COLUMNS)} FROM process ORDER BY created_at"
        ).fetchall()
        for row in rows:
            yield _record(row)

    def count(self) -> int:
        n: int = self._db.execute("SELECT COUNT(*) FROM process").fetchone()[0]
        return n

    def next_trace_id(self) -> int:
        """A trace id never handed out before by this store (persistent counter, taken
        TRACE_ID_BLOCK at a time)."""
        if self._trace_next >= self._trace_end:
            try:
                row = self._db.execute(
                    "UPDATE counter SET value = value + ? WHERE name='trace_id' RETURNING value",
                    (TRACE_ID_BLOCK,),
                ).fetchone()
            except sqlite3.Error as exc:
                raise StoreError(f"state store: {exc}") from exc
            self._wrote()
            end: int = row[0]
            self._trace_next, self._trace_end = end - TRACE_ID_BLOCK + 1, end + 1
        value = self._trace_next
        self._trace_next += 1
        return value


def _record(row: tuple[object, ...]) -> ProcessRecord:
    rec = ProcessRecord(**dict(zip(_COLUMNS, row, strict=True)))  # type: ignore[arg-type]
    rec.terminal = bool(rec.terminal)
    rec.exit_published = bool(rec.exit_published)
    return rec
