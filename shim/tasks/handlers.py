"""What every ttrpc service of the daemon wraps its handlers in (shim.tasks.service's Task and
Daemon services, shim.pods.sandboxservice's Sandbox service): one place, so all answer alike."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from shim.store.statestore import StoreError
from shim.ttrpc import Code, Context, Handler, TTRPCError
from shim.util import log

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def parse(cls: type[M], payload: bytes) -> M:
    """A request's message, or INVALID_ARGUMENT naming the message that did not decode."""
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"bad {cls.DESCRIPTOR.name}: {exc}") from None
    return msg


async def unless_gone(ctx: Context, waiting: Awaitable[T]) -> T:
    """``waiting``, given up once the caller has disconnected: a Wait nobody will read must
    not outlive its connection (or a peer could pile them up without bound).  A future of
    the handler's own is awaited straight (the handler wakes as soon as it is done: no task
    in between); anything else runs in a task raced against the departure."""
    if isinstance(waiting, asyncio.Future):
        return await _future_unless_gone(ctx, waiting)
    task = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(ctx.gone.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():  # cancelled just now, done only at its next step
        raise TTRPCError(Code.CANCELLED, "the caller went away")
    return task.result()


async def _future_unless_gone(ctx: Context, fut: asyncio.Future[T]) -> T:
    if fut.done():
        return fut.result()

    def peer_left() -> None:
        if not fut.done():
            fut.set_exception(TTRPCError(Code.CANCELLED, "the caller went away"))

    forget = ctx.gone.when_set(peer_left)
    try:
        return await fut
    finally:
        forget()


def guard(
    name: str,
    fn: Callable[[Context, bytes], Awaitable[bytes]],
    replayed: Callable[[Context, bytes], Awaitable[bytes]] | None = None,
) -> Handler:
    """Every handler answers with a proper code; nothing it raises can hurt the daemon.
    ``replayed`` answers instead of ``fn`` a call a dead daemon left unanswered."""

    async def handler(ctx: Context, payload: bytes) -> bytes:
        try:
            if ctx.replayed and replayed is not None:
                return await replayed(ctx, payload)
            return await fn(ctx, payload)
        except TTRPCError:
            raise
        except StoreError as exc:
            log.event("state store error", logging.ERROR, method=name, error=exc)
            raise TTRPCError(Code.UNAVAILABLE, str(exc)) from None
        except Exception as exc:
            log.event("request failed", logging.ERROR, method=name, error=repr(exc))
            raise TTRPCError(Code.UNKNOWN, f"{name}: {exc}") from None

    return handler
