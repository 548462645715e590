"""The process lifecycle: one table says which operation each status allows, and what follows.

Init and exec processes alike ask it before they do anything (``Process.allow``); it is the
only place that decides, and the only place a refusal is worded, so every refusal names the
status it met and carries the gRPC code containerd branches on (NotFound from Kill is what
CRI ignores).  The wording is containerd's runc shim's wherever containerd or its tests read
it.  A process that has exited counts as stopped until it is deleted.

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
       |                  |
       +------exit--------+----> STOPPED --delete--> DELETED
"""

from __future__ import annotations

import enum

from shim.ttrpc import Code, TTRPCError


class Status(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


# containerd.v1.types.Status numbers
STATUS_NUMBER = {
    Status.CREATED: 1,
    Status.RUNNING: 2,
    Status.STOPPED: 3,
    Status.PAUSED: 4,
    Status.DELETED: 3,
}


class Op(enum.StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"  # a signal to this one process (``kill --all`` is runc's to judge)
    UPDATE = "update"
    CHECKPOINT = "checkpoint"
    DELETE = "delete"
    EXEC = "exec"  # asked of a container's init: add an exec to the container
    START_EXEC = "start exec"  # asked of a container's init: start one of its execs
    EXIT = "exit"  # the process ended: never refused, and a deleted one stays deleted


class Refused:
    """A refusal: its gRPC code and its message, a template of ``kind`` ("container" or
    "exec"), ``name`` (the container or exec id), ``label`` (the container id, or "exec ID")
    and ``status``."""

    __slots__ = ("code", "message")

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"Refused({self.code.name}, {self.message!r})"


def _no(message: str) -> Refused:
    return Refused(Code.FAILED_PRECONDITION, message)


_NOT_CREATED = _no("{kind} {name} is {status}, not created")
_FINISHED = Refused(Code.NOT_FOUND, "process {name} already finished")
_CANNOT_CHECKPOINT = _no("cannot checkpoint container {name}: it is {status}")
_NOT_RUNNING = _no("container {name} is not running")

C, R, P, S, D = Status.CREATED, Status.RUNNING, Status.PAUSED, Status.STOPPED, Status.DELETED

#: operation -> status -> the status it leads to, or why not.
TABLE: dict[Op, dict[Status, Status | Refused]] = {
    Op.START: {C: R, R: _NOT_CREATED, P: _NOT_CREATED, S: _NOT_CREATED, D: _NOT_CREATED},
    Op.PAUSE: {
        C: _no("cannot pause task in created state: {name}"),
        R: P,
        P: _no("cannot pause a paused container: {name}"),
        S: _no("cannot pause a stopped container: {name}"),
        D: _no("cannot pause a stopped container: {name}"),
    },
    Op.RESUME: {
        C: _no("cannot resume task in created state: {name}"),
        R: _no("cannot resume a running process: {name}"),
        P: R,
        S: _no("cannot resume a stopped container: {name}"),
        D: _no("cannot resume a stopped container: {name}"),
    },
    Op.KILL: {C: C, R: R, P: P, S: _FINISHED, D: _FINISHED},
    Op.UPDATE: {
        C: C,
        R: R,
        P: P,
        S: _no("cannot update a stopped container: {name}"),
        D: _no("cannot update a stopped container: {name}"),
    },
    Op.CHECKPOINT: {
        C: _CANNOT_CHECKPOINT,
        R: R,
        P: P,
        S: _CANNOT_CHECKPOINT,
        D: _CANNOT_CHECKPOINT,
    },
    Op.DELETE: {
        C: D,
        R: _no("cannot delete a running process: {label}"),
        P: _no("cannot delete a paused process: {label}"),
        S: D,
        D: D,
    },
    Op.EXEC: {
        C: _NOT_RUNNING,
        R: R,
        P: _no("cannot exec in a paused state: container {name}"),
        S: _NOT_RUNNING,
        D: _NOT_RUNNING,
    },
    Op.START_EXEC: {
        C: _NOT_RUNNING,
        R: R,
        P: _no("cannot start an exec in a paused container {name}"),
        S: _NOT_RUNNING,
        D: _NOT_RUNNING,
    },
    Op.EXIT: {C: S, R: S, P: S, S: S, D: D},
}

del C, R, P, S, D


def transition(status: Status, op: Op, kind: str, name: str) -> Status:
    """The status ``op`` leads to from ``status``; raises the refusal as a TTRPCError."""
    cell = TABLE[op][status]
    if isinstance(cell, Refused):
        label = name if kind == "container" else f"{kind} {name}"
        message = cell.message.format(kind=kind, name=name, label=label, status=status)
        raise TTRPCError(cell.code, message)
    return cell
