"""The errors the Task service answers with, mapped to the gRPC codes containerd expects.

containerd turns these codes into its errdefs (NotFound, AlreadyExists, ...) and branches on
them: CRI ignores NotFound from Kill, Delete tolerates NotFound, and so on.
"""

from __future__ import annotations

from shim.ttrpc import Code, TTRPCError


def not_found(what: str) -> TTRPCError:
    return TTRPCError(Code.NOT_FOUND, what)


def already_exists(what: str) -> TTRPCError:
    return TTRPCError(Code.ALREADY_EXISTS, what)


def invalid(what: str) -> TTRPCError:
    return TTRPCError(Code.INVALID_ARGUMENT, what)


def precondition(what: str) -> TTRPCError:
    return TTRPCError(Code.FAILED_PRECONDITION, what)


def unimplemented(what: str) -> TTRPCError:
    return TTRPCError(Code.UNIMPLEMENTED, what)


def unavailable(what: str) -> TTRPCError:
    return TTRPCError(Code.UNAVAILABLE, what)


def internal(what: str) -> TTRPCError:
    return TTRPCError(Code.UNKNOWN, what)
