"""The process lifecycle table, cell by cell: what each status allows, what it leads to, and
the exact refusal (code and words) containerd and its users see otherwise."""

from __future__ import annotations

import pytest

from shim.tasks.lifecycle import TABLE, Op, Status, transition
from shim.ttrpc import Code, TTRPCError

C, R, P, S, D = Status.CREATED, Status.RUNNING, Status.PAUSED, Status.STOPPED, Status.DELETED
NO, GONE = Code.FAILED_PRECONDITION, Code.NOT_FOUND

#: (op, status) -> the next status, or (code, message) for container "c1" / exec "e1".
EXPECTED: dict[tuple[Op, Status], Status | tuple[Code, str, str]] = {
    (Op.START, C): R,
    (Op.START, R): (NO, "container c1 is running, not created", "exec e1 is running, not created"),
    (Op.START, P): (NO, "container c1 is paused, not created", "exec e1 is paused, not created"),
    (Op.START, S): (NO, "container c1 is stopped, not created", "exec e1 is stopped, not created"),
    (Op.START, D): (NO, "container c1 is deleted, not created", "exec e1 is deleted, not created"),
    (Op.PAUSE, C): (NO, "cannot pause task in created state: c1", ""),
    (Op.PAUSE, R): P,
    (Op.PAUSE, P): (NO, "cannot pause a paused container: c1", ""),
    (Op.PAUSE, S): (NO, "cannot pause a stopped container: c1", ""),
    (Op.PAUSE, D): (NO, "cannot pause a stopped container: c1", ""),
    (Op.RESUME, C): (NO, "cannot resume task in created state: c1", ""),
    (Op.RESUME, R): (NO, "cannot resume a running process: c1", ""),
    (Op.RESUME, P): R,
    (Op.RESUME, S): (NO, "cannot resume a stopped container: c1", ""),
    (Op.RESUME, D): (NO, "cannot resume a stopped container: c1", ""),
    (Op.KILL, C): C,
    (Op.KILL, R): R,
    (Op.KILL, P): P,
    (Op.KILL, S): (GONE, "process c1 already finished", "process e1 already finished"),
    (Op.KILL, D): (GONE, "process c1 already finished", "process e1 already finished"),
    (Op.UPDATE, C): C,
    (Op.UPDATE, R): R,
    (Op.UPDATE, P): P,
    (Op.UPDATE, S): (NO, "cannot update a stopped container: c1", ""),
    (Op.UPDATE, D): (NO, "cannot update a stopped container: c1", ""),
    (Op.CHECKPOINT, C): (NO, "cannot checkpoint container c1: it is created", ""),
    (Op.CHECKPOINT, R): R,
    (Op.CHECKPOINT, P): P,
    (Op.CHECKPOINT, S): (NO, "cannot checkpoint container c1: it is stopped", ""),
    (Op.CHECKPOINT, D): (NO, "cannot checkpoint container c1: it is deleted", ""),
    (Op.DELETE, C): D,
    (Op.DELETE, R): (
        NO,
        "cannot delete a running process: c1",
        "cannot delete a running process: exec e1",
    ),
    (Op.DELETE, P): (
        NO,
        "cannot delete a paused process: c1",
        "cannot delete a paused process: exec e1",
    ),
    (Op.DELETE, S): D,
    (Op.DELETE, D): D,
    (Op.EXEC, C): (NO, "container c1 is not running", ""),
    (Op.EXEC, R): R,
    (Op.EXEC, P): (NO, "cannot exec in a paused state: container c1", ""),
    (Op.EXEC, S): (NO, "container c1 is not running", ""),
    (Op.EXEC, D): (NO, "container c1 is not running", ""),
    (Op.START_EXEC, C): (NO, "container c1 is not running", ""),
    (Op.START_EXEC, R): R,
    (Op.START_EXEC, P): (NO, "cannot start an exec in a paused container c1", ""),
    (Op.START_EXEC, S): (NO, "container c1 is not running", ""),
    (Op.START_EXEC, D): (NO, "container c1 is not running", ""),
    (Op.EXIT, C): S,
    (Op.EXIT, R): S,
    (Op.EXIT, P): S,
    (Op.EXIT, S): S,
    (Op.EXIT, D): D,
}


def test_every_operation_has_a_cell_for_every_status() -> None:
    assert set(TABLE) == set(Op)
    for op, row in TABLE.items():
        assert set(row) == set(Status), op
    assert set(EXPECTED) == {(op, status) for op in Op for status in Status}


@pytest.mark.parametrize(("op", "status"), sorted(EXPECTED, key=str))
def test_cell(op: Op, status: Status) -> None:
    expected = EXPECTED[op, status]
    if isinstance(expected, Status):
        assert transition(status, op, "container", "c1") is expected
        assert transition(status, op, "exec", "e1") is expected
        return
    code, for_container, for_exec = expected
    with pytest.raises(TTRPCError) as info:
        transition(status, op, "container", "c1")
    assert (info.value.code, info.value.message) == (code, for_container)
    if for_exec:  # operations containerd asks of an exec too
        with pytest.raises(TTRPCError) as info:
            transition(status, op, "exec", "e1")
        assert (info.value.code, info.value.message) == (code, for_exec)


def test_every_refusal_names_the_process() -> None:
    for op, row in TABLE.items():
        for status, cell in row.items():
            if isinstance(cell, Status):
                continue
            with pytest.raises(TTRPCError) as info:
                transition(status, op, "container", "c-42")
            assert "c-42" in info.value.message, (op, status)
