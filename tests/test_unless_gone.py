"""A Wait gives up when its caller leaves (handlers.unless_gone), with nothing left behind,
and wakes as soon as the exit is known."""

from __future__ import annotations

import asyncio

import pytest

from shim.tasks.handlers import unless_gone
from shim.ttrpc import Code, Context, TTRPCError


def test_a_future_is_answered_when_done() -> None:
    async def main() -> None:
        ctx = Context("svc", "Wait")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(unless_gone(ctx, fut))
        await asyncio.sleep(0)
        fut.set_result(7)
        await asyncio.sleep(0)  # one turn of the loop: no task in between
        assert waiting.done() and waiting.result() == 7
        assert ctx.gone._callbacks == []  # nothing left to call when the peer goes
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(8)
        assert await unless_gone(ctx, done) == 8

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["future", "coroutine"])
def test_the_caller_leaving_ends_the_wait(kind: str) -> None:
    async def main() -> None:
        ctx = Context("svc", "Wait")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def coroutine() -> int:
            return await asyncio.shield(fut)

        waiting = asyncio.ensure_future(unless_gone(ctx, fut if kind == "future" else coroutine()))
        await asyncio.sleep(0.01)
        ctx.gone.set()
        with pytest.raises(TTRPCError) as err:
            await asyncio.wait_for(waiting, 5)
        assert err.value.code == Code.CANCELLED
        assert ctx.gone._callbacks == []
        # a wait begun after the caller left ends at once
        later: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        with pytest.raises(TTRPCError):
            await asyncio.wait_for(unless_gone(ctx, later), 5)

    asyncio.run(main())
