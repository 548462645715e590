"""Server and client over real unix sockets (no pytest-asyncio: each test runs its own loop)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from shim.ttrpc import (
    MAX_MESSAGE_SIZE,
    Client,
    ClosedError,
    Code,
    Context,
    Server,
    TTRPCError,
)
from shim.ttrpc.codec import (
    HEADER_SIZE,
    FrameHeader,
    MessageType,
    Request,
    Response,
    encode_frame,
)
from shim.ttrpc.server import PeerCred, require_same_user

SVC = "test.v1.Echo"


def run(coro: Awaitable[None], timeout: float = 20.0) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(main())


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Short directory: sun_path is limited to 108 bytes, pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="ttrpc", dir="/tmp")
    yield os.path.join(directory, "s.sock")
    shutil.rmtree(directory, ignore_errors=True)


async def echo(ctx: Context, payload: bytes) -> bytes:
    return payload


@asynccontextmanager
async def serving(
    path: str, methods: dict[str, Callable[[Context, bytes], Awaitable[bytes]]], **kw: object
) -> AsyncIterator[Server]:
    server = Server(**kw)  # type: ignore[arg-type]
    server.register(SVC, {"Echo": echo, **methods})
    await server.start_unix(path)
    try:
        yield server
    finally:
        await server.close()


async def raw_connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


def request_frame(sid: int, method: str = "Echo", payload: bytes = b"", **kw: object) -> bytes:
    request = Request(SVC, method, payload, **kw)  # type: ignore[arg-type]
    return encode_frame(sid, MessageType.REQUEST, request.encode())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Response]:
    header = FrameHeader.decode(await reader.readexactly(HEADER_SIZE))
    assert header.type == MessageType.RESPONSE
    return header.stream_id, Response.decode(await reader.readexactly(header.length))


# -- basics ----------------------------------------------------------------------------------


def test_call_round_trip_with_context(sock_path: str) -> None:
    seen: list[Context] = []

    async def inspect(ctx: Context, payload: bytes) -> bytes:
        seen.append(ctx)
        return payload[::-1]

    async def main() -> None:
        async with serving(sock_path, {"Inspect": inspect}):
            client = await Client.connect("unix://" + sock_path)
            reply = await client.call(
                SVC,
                "Inspect",
                b"abc",
                timeout=30,
                metadata={"Containerd-Namespace": "k8s.io", "multi": ["a", "b"]},
            )
            assert reply == b"cba"
            assert await client.call(SVC, "Echo", b"") == b""
            await client.close()
            assert client.closed

    run(main())
    [ctx] = seen
    assert (ctx.service, ctx.method) == (SVC, "Inspect")
    assert ctx.metadata == {"containerd-namespace": ["k8s.io"], "multi": ["a", "b"]}
    assert ctx.get("CONTAINERD-namespace") == "k8s.io"
    assert ctx.deadline is not None
    assert ctx.peer == PeerCred(os.getpid(), os.getuid(), os.getgid())


def test_socket_mode_and_unlink_on_close(sock_path: str) -> None:
    async def main() -> None:
        server = Server()
        await server.start_unix(sock_path, mode=0o660)
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert server.listening_socket is not None
        await server.close()
        await server.wait_closed()
        assert not os.path.exists(sock_path)

    run(main())


def test_start_sock_inherited_socket_and_plain_path(sock_path: str) -> None:
    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen()
        server = Server()
        server.register(SVC, {"Echo": echo})
        await server.start_sock(listener)
        assert server.listening_socket is listener
        async with await Client.connect(sock_path) as client:
            assert await client.call(SVC, "Echo", b"x") == b"x"
        await server.close()

    run(main())


def test_abstract_socket() -> None:
    name = f"@ttrpc-test-{os.getpid()}"

    async def main() -> None:
        server = Server()
        server.register(SVC, {"Echo": echo})
        await server.start_unix(name)
        async with await Client.connect(name) as client:
            assert await client.call(SVC, "Echo", b"abs") == b"abs"
        await server.close()

    run(main())


def test_register_twice_is_an_error() -> None:
    server = Server()
    server.register(SVC, {"Echo": echo})
    server.register(SVC, {"Other": echo})
    with pytest.raises(ValueError):
        server.register(SVC, {"Echo": echo})


# -- errors ----------------------------------------------------------------------------------


def test_unknown_service_and_method(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, {}):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call("no.Such", "Echo", b"")
                assert (info.value.code, info.value.message) == (
                    Code.UNIMPLEMENTED,
                    "service no.Such",
                )
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Nope", b"")
                assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")

    run(main())


def test_handler_errors_and_server_survives(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def not_found(ctx: Context, payload: bytes) -> bytes:
        raise TTRPCError(Code.NOT_FOUND, "container x not found")

    async def boom(ctx: Context, payload: bytes) -> bytes:
        raise RuntimeError("kaboom")

    async def returns_none(ctx: Context, payload: bytes) -> bytes:
        return None  # type: ignore[return-value]

    async def main() -> None:
        methods = {"NotFound": not_found, "Boom": boom, "None": returns_none}
        async with serving(sock_path, methods):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "NotFound", b"")
                assert (info.value.code, info.value.message) == (
                    Code.NOT_FOUND,
                    "container x not found",
                )
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Boom", b"")
                assert (info.value.code, info.value.message) == (Code.UNKNOWN, "kaboom")
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "None", b"")
                assert info.value.code == Code.INTERNAL
                assert await client.call(SVC, "Echo", b"still here") == b"still here"

    with caplog.at_level(logging.ERROR, logger="shim.ttrpc"):
        run(main())
    assert any(
        r.name == "shim.ttrpc" and r.exc_info and "kaboom" in str(r.exc_info[1])
        for r in caplog.records
    )


def test_deadline_exceeded_enforced_by_server(sock_path: str) -> None:
    cancelled = asyncio.Event()

    async def slow(ctx: Context, payload: bytes) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    async def main() -> None:
        async with serving(sock_path, {"Slow": slow}):
            reader, writer = await raw_connect(sock_path)
            writer.write(request_frame(1, "Slow", timeout_nano=50_000_000))
            sid, response = await read_response(reader)
            assert sid == 1
            assert response.status.code == Code.DEADLINE_EXCEEDED
            assert cancelled.is_set()
            # No timeout_nano means no deadline.
            writer.write(request_frame(3, "Echo", b"ok"))
            assert (await read_response(reader))[1].payload == b"ok"
            writer.close()

    run(main())


def test_client_timeout_then_connection_still_usable(sock_path: str) -> None:
    release = asyncio.Event()

    async def wait(ctx: Context, payload: bytes) -> bytes:
        await release.wait()
        return b"late"

    async def main() -> None:
        # The server ignores deadlines here only because the handler finishes first; the client
        # must give up on its own clock either way.
        async with serving(sock_path, {"Wait": wait}):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Wait", b"", timeout=0.05)
                assert info.value.code == Code.DEADLINE_EXCEEDED
                release.set()
                assert await client.call(SVC, "Echo", b"next") == b"next"

    run(main())


# -- concurrency and framing -------------------------------------------------------------------


def test_calls_in_flight_answered_out_of_order(sock_path: str) -> None:
    gates = {name: asyncio.Event() for name in ("a", "b", "c")}
    started: list[str] = []

    async def gated(ctx: Context, payload: bytes) -> bytes:
        name = payload.decode()
        started.append(name)
        await gates[name].wait()
        return payload

    async def main() -> None:
        async with serving(sock_path, {"Gated": gated}):
            async with await Client.connect(sock_path) as client:
                finished: list[str] = []

                async def one(name: str) -> None:
                    finished.append((await client.call(SVC, "Gated", name.encode())).decode())

                tasks = [asyncio.create_task(one(n)) for n in ("a", "b", "c")]
                while len(started) < 3:
                    await asyncio.sleep(0.01)
                for name in ("c", "a", "b"):
                    gates[name].set()
                    while name not in finished:
                        await asyncio.sleep(0.01)
                await asyncio.gather(*tasks)
                assert finished == ["c", "a", "b"]

    run(main())


def test_request_sent_byte_by_byte(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, {}):
            reader, writer = await raw_connect(sock_path)
            wire = request_frame(1, "Echo", b"slowly") + request_frame(3, "Echo", b"again")
            for byte in wire:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            got = dict([await read_response(reader), await read_response(reader)])
            assert got[1].payload == b"slowly" and got[3].payload == b"again"
            writer.close()

    run(main())


def test_bad_stream_ids_rejected_connection_survives(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, {}):
            reader, writer = await raw_connect(sock_path)
            writer.write(request_frame(2, "Echo", b"even"))
            sid, response = await read_response(reader)
            assert (sid, response.status.code) == (2, Code.INVALID_ARGUMENT)
            writer.write(request_frame(7, "Echo", b"seven"))
            assert (await read_response(reader))[1].payload == b"seven"
            writer.write(request_frame(5, "Echo", b"backwards"))
            sid, response = await read_response(reader)
            assert (sid, response.status.code) == (5, Code.INVALID_ARGUMENT)
            writer.write(request_frame(7, "Echo", b"reused"))
            sid, response = await read_response(reader)
            assert (sid, response.status.code) == (7, Code.INVALID_ARGUMENT)
            writer.write(encode_frame(9, MessageType.REQUEST, b"\x0a\x7f"))  # bad Request proto
            sid, response = await read_response(reader)
            assert (sid, response.status.code) == (9, Code.INVALID_ARGUMENT)
            writer.write(encode_frame(11, 42, b"unknown type is ignored"))
            writer.write(request_frame(13, "Echo", b"fine"))
            assert await read_response(reader) == (13, Response(payload=b"fine"))
            writer.close()

    run(main())


def test_oversize_frame_while_other_call_in_flight(sock_path: str) -> None:
    release = asyncio.Event()

    async def wait(ctx: Context, payload: bytes) -> bytes:
        await release.wait()
        return b"waited"

    async def main() -> None:
        async with serving(sock_path, {"Wait": wait}) as server:
            reader, writer = await raw_connect(sock_path)
            writer.write(request_frame(1, "Wait"))
            length = MAX_MESSAGE_SIZE + 1
            writer.write(FrameHeader(length, 3, MessageType.REQUEST, 0).encode())
            chunk = b"\0" * (1 << 16)
            for offset in range(0, length, len(chunk)):
                writer.write(chunk[: length - offset])
                await writer.drain()
            writer.write(request_frame(5, "Echo", b"after"))
            got = [await read_response(reader), await read_response(reader)]
            assert got[0][0] == 3
            assert got[0][1].status.code == Code.RESOURCE_EXHAUSTED
            assert got[0][1].status.message == (
                "message length 4194305 exceed maximum message size of 4194304"
            )
            assert got[1] == (5, Response(payload=b"after"))
            release.set()
            assert await read_response(reader) == (1, Response(payload=b"waited"))
            assert server.connection_count == 1
            writer.close()

    run(main())


def test_client_refuses_oversize_request(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, {}):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Echo", b"x" * MAX_MESSAGE_SIZE)
                assert info.value.code == Code.RESOURCE_EXHAUSTED
                big = b"y" * (MAX_MESSAGE_SIZE - 100)  # fits, with room for the envelope
                assert await client.call(SVC, "Echo", big) == big

    run(main())


def test_oversize_response_becomes_status(sock_path: str) -> None:
    async def huge(ctx: Context, payload: bytes) -> bytes:
        return b"z" * MAX_MESSAGE_SIZE

    async def main() -> None:
        async with serving(sock_path, {"Huge": huge}):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Huge", b"")
                assert info.value.code == Code.RESOURCE_EXHAUSTED
                assert await client.call(SVC, "Echo", b"ok") == b"ok"

    run(main())


def test_peer_dropping_mid_frame_and_garbage_do_not_hurt_others(sock_path: str) -> None:
    async def main() -> None:
        async with serving(sock_path, {}) as server:
            async with await Client.connect(sock_path) as good:
                assert await good.call(SVC, "Echo", b"1") == b"1"
                _, quitter = await raw_connect(sock_path)
                quitter.write(request_frame(1, "Echo", b"never finished")[:15])
                await quitter.drain()
                quitter.close()
                greader, garbage = await raw_connect(sock_path)
                garbage.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                # Read as a frame header that is far too long: answered, then skipped.
                _, response = await read_response(greader)
                assert response.status.code == Code.RESOURCE_EXHAUSTED
                garbage.close()
                assert await good.call(SVC, "Echo", b"2") == b"2"
                for _ in range(100):
                    if server.connection_count == 1:
                        break
                    await asyncio.sleep(0.01)
                assert server.connection_count == 1

    run(main())


def test_max_in_flight_pauses_reading(sock_path: str) -> None:
    release = asyncio.Event()
    running = 0
    peak = 0

    async def wait(ctx: Context, payload: bytes) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return payload

    async def main() -> None:
        async with serving(sock_path, {"Wait": wait}, max_in_flight=2):
            async with await Client.connect(sock_path) as client:
                calls = [
                    asyncio.create_task(client.call(SVC, "Wait", bytes([i]))) for i in range(6)
                ]
                await asyncio.sleep(0.2)
                assert running == 2
                release.set()
                assert await asyncio.gather(*calls) == [bytes([i]) for i in range(6)]
        assert peak == 2

    run(main())


# -- connection lifecycle -----------------------------------------------------------------------


def test_server_close_fails_pending_calls_with_closed_error(sock_path: str) -> None:
    started = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def hang(ctx: Context, payload: bytes) -> bytes:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        return b""

    async def main() -> None:
        closes: list[str] = []
        server = Server()
        server.register(SVC, {"Hang": hang})
        await server.start_unix(sock_path)
        client = await Client.connect(sock_path, on_close=lambda: closes.append("closed"))
        pending = asyncio.create_task(client.call(SVC, "Hang", b""))
        await started.wait()
        await server.close()
        assert handler_cancelled.is_set()
        with pytest.raises(ClosedError):
            await pending
        assert client.closed
        assert closes == ["closed"]
        with pytest.raises(ClosedError):
            await client.call(SVC, "Echo", b"")
        await client.close()  # idempotent on a dead connection
        assert isinstance(ClosedError(), ConnectionError)

    run(main())


def test_accept_filter(sock_path: str) -> None:
    async def main() -> None:
        seen: list[PeerCred | None] = []

        def refuse(peer: PeerCred | None) -> bool:
            seen.append(peer)
            return False

        async with serving(sock_path, {}, accept_filter=refuse) as server:
            client = await Client.connect(sock_path)
            with pytest.raises(ClosedError):
                await client.call(SVC, "Echo", b"")
            assert seen and seen[0] is not None and seen[0].pid == os.getpid()
            assert server.connection_count == 0
            server.accept_filter = require_same_user
            async with await Client.connect(sock_path) as ok:
                assert await ok.call(SVC, "Echo", b"me") == b"me"

    run(main())


def test_accept_filter_exception_drops_connection(sock_path: str) -> None:
    def broken(peer: PeerCred | None) -> bool:
        raise RuntimeError("filter bug")

    async def main() -> None:
        async with serving(sock_path, {}, accept_filter=broken):
            client = await Client.connect(sock_path)
            with pytest.raises(ClosedError):
                await client.call(SVC, "Echo", b"")

    run(main())


def test_client_connect_failure(sock_path: str) -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            await Client.connect(sock_path)

    run(main())


def test_handler_finishes_after_peer_disconnects_but_close_cancels(sock_path: str) -> None:
    gate = asyncio.Event()
    events: list[str] = []

    async def work(ctx: Context, payload: bytes) -> bytes:
        events.append("start " + payload.decode())
        try:
            await gate.wait() if payload == b"finishes" else await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled " + payload.decode())
            raise
        events.append("done " + payload.decode())
        return b""

    async def main() -> None:
        server = Server()
        server.register(SVC, {"Work": work})
        await server.start_unix(sock_path)
        for sid, name in ((1, b"finishes"), (3, b"hangs")):
            _, writer = await raw_connect(sock_path)
            writer.write(request_frame(sid, "Work", name))
            await writer.drain()
            while not any(e.endswith(name.decode()) for e in events):
                await asyncio.sleep(0.01)
            writer.close()
        while server.connection_count:
            await asyncio.sleep(0.01)
        gate.set()
        while "done finishes" not in events:
            await asyncio.sleep(0.01)
        await server.close()  # cancels the handler whose peer is long gone
        assert events == ["start finishes", "start hangs", "done finishes", "cancelled hangs"]

    run(main())


def test_error_details_reach_the_client(sock_path: str) -> None:
    details = (("type.googleapis.com/test.Detail", b"\x08\x01"),)

    async def detailed(ctx: Context, payload: bytes) -> bytes:
        raise TTRPCError(Code.FAILED_PRECONDITION, "not now", details)

    async def main() -> None:
        async with serving(sock_path, {"Detailed": detailed}):
            async with await Client.connect(sock_path) as client:
                with pytest.raises(TTRPCError) as info:
                    await client.call(SVC, "Detailed", b"")
                assert info.value.code == Code.FAILED_PRECONDITION
                assert info.value.details == details

    run(main())


# -- slow and greedy peers -------------------------------------------------------------------


async def _wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_slow_loris_is_dropped_others_served(sock_path: str) -> None:
    """A peer that starts a frame and dribbles it is dropped after frame_timeout; an idle
    peer (no frame begun) is not; a well-behaved peer is served throughout."""

    async def main() -> None:
        async with serving(sock_path, {}, frame_timeout=0.5) as server:
            async with await Client.connect(sock_path) as good:
                idle_reader, idle = await raw_connect(sock_path)
                loris_reader, loris = await raw_connect(sock_path)
                frame = request_frame(1, "Echo", b"x" * 1000)
                t0 = asyncio.get_running_loop().time()
                closed_at = None
                for i in range(40):  # one byte every 50 ms: 2 s for 40 bytes of 1020
                    if server.dropped_connections:
                        closed_at = asyncio.get_running_loop().time() - t0
                        break
                    loris.write(frame[i : i + 1])
                    await loris.drain()
                    assert await good.call(SVC, "Echo", b"%d" % i) == b"%d" % i
                    await asyncio.sleep(0.05)
                assert closed_at is not None and 0.4 < closed_at < 1.5, closed_at
                assert await loris_reader.read() == b""  # dropped, never answered
                await _wait_until(lambda: server.connection_count == 2)
                assert server.dropped_connections == 1 and server.buffered_bytes == 0
                idle.write(request_frame(1, "Echo", b"still here"))
                assert (await read_response(idle_reader))[1].payload == b"still here"
                idle.close()
                loris.close()

    run(main())


def test_unfinished_frames_of_all_peers_are_bounded(sock_path: str) -> None:
    """Peers that each park most of a large frame: past max_buffered_bytes the biggest
    holders are dropped, the total stays bounded, and small calls go on."""
    limit = 3 * 100_000

    async def main() -> None:
        async with serving(sock_path, {}, max_buffered_bytes=limit) as server:
            async with await Client.connect(sock_path) as good:
                peers = []
                for n in range(6):
                    reader, writer = await raw_connect(sock_path)
                    frame = request_frame(1, "Echo", b"y" * (120_000 + n))
                    writer.write(frame[: len(frame) - 10])
                    await writer.drain()
                    peers.append((reader, writer))
                    await asyncio.sleep(0.05)
                    assert server.buffered_bytes <= limit
                    assert await good.call(SVC, "Echo", b"ok") == b"ok"
                assert server.dropped_connections >= 3
                await _wait_until(
                    lambda: server.connection_count == 1 + 6 - server.dropped_connections
                )
                for _, writer in peers:
                    writer.close()
                await _wait_until(lambda: server.connection_count == 1)
                assert server.buffered_bytes == 0

    run(main())


def test_the_biggest_holders_are_dropped_first(sock_path: str) -> None:
    """Over the budget, the connection holding the most goes, not the one that tipped it:
    200 kB then 50 kB parked, then 100 kB more (350 kB > 300 kB): the 200 kB peer is dropped,
    the other two finish their frames and are answered."""
    limit = 300_000

    async def main() -> None:
        async with serving(sock_path, {}, max_buffered_bytes=limit) as server:
            peers = []
            total = 0
            for size in (200_000, 50_000, 100_000):
                reader, writer = await raw_connect(sock_path)
                frame = request_frame(1, "Echo", b"y" * size)
                writer.write(frame[:-10])
                await writer.drain()
                peers.append((reader, writer, frame[-10:], size))
                if size != 100_000:
                    total += len(frame) - 10 - HEADER_SIZE  # the body held so far
                    await _wait_until(lambda t=total: server.buffered_bytes == t)
            await _wait_until(lambda: server.dropped_connections == 1)
            biggest, *rest = peers
            assert await biggest[0].read() == b""  # dropped: EOF
            for reader, writer, tail, size in rest:
                writer.write(tail)
                await writer.drain()
                _, response = await read_response(reader)
                assert response.status.ok and response.payload == b"y" * size
            for _, writer, _, _ in peers:
                writer.close()
            await _wait_until(lambda: server.buffered_bytes == 0)

    run(main())


def test_context_gone_is_set_when_the_peer_leaves(sock_path: str) -> None:
    seen: list[Context] = []

    async def hold(ctx: Context, payload: bytes) -> bytes:
        seen.append(ctx)
        await ctx.gone.wait()
        return b"nobody reads this"

    async def main() -> None:
        async with serving(sock_path, {"Hold": hold}) as server:
            _, writer = await raw_connect(sock_path)
            writer.write(request_frame(1, "Hold"))
            await writer.drain()
            await _wait_until(lambda: bool(seen))
            assert not seen[0].gone.is_set()
            writer.close()
            await _wait_until(lambda: seen[0].gone.is_set())
            await _wait_until(lambda: not server._handlers)

    run(main())
