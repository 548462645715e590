"""Handing a live ttrpc server over (quiesce, handoff, adopt), in one process and across exec.

Real unix sockets throughout; the peers are an ordinary ``Client`` or a raw socket, and they
never reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from shim.ttrpc import (
    MAX_MESSAGE_SIZE,
    Client,
    ClosedError,
    Code,
    ConnectionHandoff,
    Context,
    PendingCall,
    Server,
    ServerHandoff,
    TTRPCError,
)
from shim.ttrpc.codec import HEADER_SIZE, FrameHeader, MessageType, Request, Response, encode_frame

SVC = "test.v1.Handoff"
CHILD = Path(__file__).with_name("ttrpc_handoff_child.py")

Handler = Callable[[Context, bytes], Awaitable[bytes]]


def run(coro: Awaitable[None], timeout: float = 30.0) -> None:
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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir had open


def request_frame(sid: int, method: str, payload: bytes = b"") -> bytes:
    return encode_frame(sid, MessageType.REQUEST, Request(SVC, method, payload).encode())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, Response]:
    header = FrameHeader.decode(await reader.readexactly(HEADER_SIZE))
    assert header.type == MessageType.RESPONSE
    return header.stream_id, Response.decode(await reader.readexactly(header.length))


def transport_of(writer: asyncio.StreamWriter) -> asyncio.Transport:
    """The transport under a stream, to stop and resume reading: a peer slow to read."""
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    return transport


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class Handlers:
    """The same handlers for every server; each answer says which server gave it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.medium = asyncio.Event()
        self.ran: list[tuple[str, str, bytes]] = []

    def methods(self, tag: str) -> dict[str, Handler]:
        async def slow(ctx: Context, payload: bytes) -> bytes:
            self.ran.append((tag, "Slow", payload))
            await self.release.wait()
            return tag.encode() + b":slow:" + payload

        async def medium(ctx: Context, payload: bytes) -> bytes:
            self.ran.append((tag, "Medium", payload))
            await self.medium.wait()
            return tag.encode() + b":medium:" + payload

        async def fast(ctx: Context, payload: bytes) -> bytes:
            self.ran.append((tag, "Fast", payload))
            return tag.encode() + b":fast:" + payload

        async def remember(ctx: Context, payload: bytes) -> bytes:
            ctx.connection["name"] = payload.decode()
            return b""

        async def recall(ctx: Context, payload: bytes) -> bytes:
            return f"{tag}:{ctx.connection.get('name')}".encode()

        return {
            "Slow": slow,
            "Medium": medium,
            "Fast": fast,
            "Remember": remember,
            "Recall": recall,
        }

    def server(self, tag: str, max_in_flight: int = 128) -> Server:
        server = Server(max_in_flight=max_in_flight)
        server.register(SVC, self.methods(tag))
        return server

    def count(self, tag: str, method: str) -> int:
        return sum(1 for t, m, _ in self.ran if (t, m) == (tag, method))


def no_duplicates(caplog: pytest.LogCaptureFixture) -> None:
    """A response nobody waits for (a second answer, say) is logged by the client."""
    dropped = [r for r in caplog.records if "unknown stream" in r.getMessage()]
    assert not dropped, dropped


# -- in one process ------------------------------------------------------------------------


def test_handoff_in_one_process(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="shim.ttrpc")
    h = Handlers()

    async def main() -> None:
        fds_at_start = open_fds()
        a = h.server("A")
        await a.start_unix(sock_path)
        client = await Client.connect(sock_path)
        await client.call(SVC, "Remember", b"tenant-1")
        slow = asyncio.create_task(client.call(SVC, "Slow", b"s1", timeout=30))
        medium = asyncio.create_task(client.call(SVC, "Medium", b"m1"))
        assert [await client.call(SVC, "Fast", b"%d" % i) for i in range(3)] == [
            b"A:fast:0",
            b"A:fast:1",
            b"A:fast:2",
        ]
        await until(lambda: h.count("A", "Slow") == 1 and h.count("A", "Medium") == 1)

        # A raw peer: one whole request, and half of the next in the same write.
        reader, writer = await asyncio.open_unix_connection(sock_path)
        split = request_frame(3, "Fast", b"split")
        writer.write(request_frame(1, "Fast", b"whole") + split[:13])
        assert await read_response(reader) == (1, Response(payload=b"A:fast:whole"))

        fds_before = open_fds()
        quiesce = asyncio.create_task(a.quiesce(keep=lambda ctx: ctx.method == "Slow"))
        await asyncio.sleep(0.05)  # quiesce is now waiting for Medium
        assert not quiesce.done()
        during = [
            asyncio.create_task(client.call(SVC, "Fast", b"d%d" % i, timeout=20)) for i in range(3)
        ]
        late_client = await Client.connect(sock_path)  # sits in the listen backlog
        late_call = asyncio.create_task(late_client.call(SVC, "Fast", b"late"))
        await asyncio.sleep(0.1)
        assert h.count("A", "Fast") == 4  # none of the new requests was read
        assert not any(t.done() for t in [*during, late_call])
        h.medium.set()
        await quiesce
        assert await medium == b"A:medium:m1"  # finished and answered before the handoff
        assert not slow.done()

        handoff = a.handoff()
        assert handoff.listen_fd >= 0
        assert all(os.get_inheritable(fd) for fd in handoff.fds())
        assert handoff.socket_file is not None and handoff.socket_file[0] == sock_path
        by_pending = {len(c.pending): c for c in handoff.connections}
        assert len(handoff.connections) == 2
        kept = by_pending[1]
        [call] = kept.pending
        assert (call.service, call.method, call.payload) == (SVC, "Slow", b"s1")
        assert 0 < call.timeout_nano <= 30 * 10**9
        assert kept.state == {"name": "tenant-1"}
        assert kept.unread == b""
        raw = by_pending[0]
        assert raw.unread == split[:13] and raw.last_stream_id == 1
        await a.close()  # a no-op now: the socket file stays for the adopter
        assert os.path.exists(sock_path)

        handoff = ServerHandoff.from_json(handoff.to_json())  # as it would cross an exec
        b = h.server("B")
        await b.adopt(handoff)
        assert not any(os.get_inheritable(fd) for fd in handoff.fds())
        assert await asyncio.gather(*during) == [b"B:fast:d0", b"B:fast:d1", b"B:fast:d2"]
        assert await late_call == b"B:fast:late"
        # Every handed-over descriptor replaced one of A's, which A has closed; the only new
        # ones are the late client's two ends.
        assert open_fds() == fds_before + 2
        writer.write(split[13:])
        assert await read_response(reader) == (3, Response(payload=b"B:fast:split"))
        writer.write(request_frame(3, "Fast", b"reused"))  # the id check carried over
        sid, response = await read_response(reader)
        assert sid == 3 and response.status.message.startswith("StreamID cannot be re-used")

        assert not slow.done()
        h.release.set()
        assert await slow == b"B:slow:s1"
        assert [(t, m) for t, m, _ in h.ran if m == "Slow"] == [("A", "Slow"), ("B", "Slow")]
        assert await client.call(SVC, "Recall", b"") == b"B:tenant-1"
        assert await client.call(SVC, "Fast", b"after") == b"B:fast:after"
        async with await Client.connect(sock_path) as fresh:  # B listens on A's socket
            assert await fresh.call(SVC, "Fast", b"new") == b"B:fast:new"

        writer.close()
        await writer.wait_closed()
        assert not client.closed
        await client.close()
        await late_client.close()
        await b.close()
        assert not os.path.exists(sock_path)  # B removes the socket file A created
        # Transports close their sockets a loop iteration after close()/abort().
        await until(lambda: open_fds() == fds_at_start, timeout=2)

    run(main())
    no_duplicates(caplog)


def test_backlog_and_late_handlers_become_pending(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests read but not started (in-flight limit) and handlers past the timeout move."""
    h = Handlers()

    async def main() -> None:
        a = h.server("A", max_in_flight=1)
        await a.start_unix(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        # One read brings both: Medium takes the only slot, Fast waits decoded in the backlog.
        writer.write(request_frame(1, "Medium", b"m") + request_frame(3, "Fast", b"queued"))
        await until(lambda: h.count("A", "Medium") == 1)
        await asyncio.sleep(0.05)
        assert h.count("A", "Fast") == 0

        await a.quiesce(keep=lambda ctx: False, timeout=0.1)  # Medium never finishes in time
        assert any("still running after" in r.getMessage() for r in caplog.records)
        handoff = a.handoff()
        [conn] = handoff.connections
        pending = [(c.stream_id, c.method, c.payload) for c in conn.pending]
        assert pending == [(1, "Medium", b"m"), (3, "Fast", b"queued")]
        assert conn.last_stream_id == 3

        b = h.server("B")
        await b.adopt(handoff)
        assert await read_response(reader) == (3, Response(payload=b"B:fast:queued"))
        h.medium.set()
        assert await read_response(reader) == (1, Response(payload=b"B:medium:m"))
        assert h.count("A", "Fast") == 0 and h.count("B", "Fast") == 1
        assert [t for t, m, _ in h.ran if m == "Medium"] == ["A", "B"]
        with pytest.raises(TimeoutError):  # and nothing else: A never answered
            async with asyncio.timeout(0.2):
                await reader.read(1)
        writer.close()
        await b.close()

    run(main())


def test_deadline_carries_over(sock_path: str) -> None:
    h = Handlers()

    async def main() -> None:
        a = h.server("A")
        await a.start_unix(sock_path)
        async with await Client.connect(sock_path) as client:
            call = asyncio.create_task(client.call(SVC, "Slow", b"", timeout=0.5))
            await until(lambda: h.count("A", "Slow") == 1)
            await a.quiesce(keep=lambda ctx: True)
            handoff = a.handoff()
            [pending] = handoff.connections[0].pending
            assert 0 < pending.timeout_nano < 500_000_000
            await asyncio.sleep(pending.timeout_nano / 1e9)  # the deadline passes meanwhile
            b = h.server("B")
            await b.adopt(handoff)
            with pytest.raises(TTRPCError) as info:
                await call
            assert info.value.code == Code.DEADLINE_EXCEEDED
            assert h.count("B", "Slow") == 1  # run again, and timed out at once
            assert await client.call(SVC, "Fast", b"x") == b"B:fast:x"
        await b.close()

    run(main())


@pytest.mark.parametrize("spins", range(6))
def test_connection_accepted_as_quiesce_starts(sock_path: str, spins: int) -> None:
    """Accepted but not yet made (or made but not yet read) when quiesce() begins: kept."""
    h = Handlers()

    async def main() -> None:
        a = h.server("A")
        await a.start_unix(sock_path)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(sock_path)  # complete at once: it waits in the listen backlog
        peer.sendall(request_frame(1, "Fast", b"early"))
        for _ in range(spins):
            await asyncio.sleep(0)  # let A get as far as it will into accepting it
        await a.quiesce(keep=lambda ctx: False)
        handoff = a.handoff()
        b = h.server("B")
        await b.adopt(handoff)
        reader, writer = await asyncio.open_unix_connection(sock=peer)
        sid, response = await read_response(reader)
        assert sid == 1 and response.payload in (b"A:fast:early", b"B:fast:early")
        writer.write(request_frame(3, "Fast", b"next"))
        assert await read_response(reader) == (3, Response(payload=b"B:fast:next"))
        assert h.count("A", "Fast") + h.count("B", "Fast") == 2
        writer.close()
        await b.close()

    run(main())


def test_kept_handler_that_answers_anyway_is_not_sent(sock_path: str) -> None:
    """A handler that swallows the cancellation and returns must not answer a second time."""
    started = asyncio.Event()
    runs: list[str] = []

    async def stubborn(ctx: Context, payload: bytes) -> bytes:
        runs.append("run")
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return b"from the old server"
        return b"never"

    async def main() -> None:
        a = Server()
        a.register(SVC, {"Wait": stubborn})
        await a.start_unix(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(request_frame(1, "Wait"))
        await started.wait()
        await a.quiesce(keep=lambda ctx: True)
        handoff = a.handoff()

        async def answer(ctx: Context, payload: bytes) -> bytes:
            return b"from the new server"

        b = Server()
        b.register(SVC, {"Wait": answer})
        await b.adopt(handoff)
        assert await read_response(reader) == (1, Response(payload=b"from the new server"))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await reader.read(1)
        writer.close()
        await b.close()

    run(main())


def test_buffered_response_is_flushed_before_the_handoff(sock_path: str) -> None:
    size = MAX_MESSAGE_SIZE - 64  # far more than the kernel buffers for a unix socket

    async def big(ctx: Context, payload: bytes) -> bytes:
        return b"x" * size

    async def echo(ctx: Context, payload: bytes) -> bytes:
        return payload

    async def main() -> None:
        a = Server()
        a.register(SVC, {"Big": big, "Echo": echo})
        await a.start_unix(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path, limit=2 * MAX_MESSAGE_SIZE)
        transport_of(writer).pause_reading()  # a slow peer: the answer waits in A's transport
        writer.write(request_frame(1, "Big"))
        await asyncio.sleep(0.2)
        quiesce = asyncio.create_task(a.quiesce(keep=lambda ctx: False))
        await asyncio.sleep(0.2)
        assert not quiesce.done()  # waiting for the peer to take the response
        writer.write(request_frame(3, "Echo", b"after"))  # stays in the kernel for B
        transport_of(writer).resume_reading()
        await quiesce
        handoff = a.handoff()
        assert len(handoff.connections) == 1
        b = Server()
        b.register(SVC, {"Big": big, "Echo": echo})
        await b.adopt(handoff)
        sid, response = await read_response(reader)
        assert sid == 1 and len(response.payload) == size
        assert await read_response(reader) == (3, Response(payload=b"after"))
        writer.close()
        await b.close()

    run(main())


def test_peer_not_taking_its_response_is_closed_not_handed_over(sock_path: str) -> None:
    async def big(ctx: Context, payload: bytes) -> bytes:
        return b"x" * (MAX_MESSAGE_SIZE - 64)

    async def main() -> None:
        a = Server()
        a.register(SVC, {"Big": big})
        await a.start_unix(sock_path)
        reader, writer = await asyncio.open_unix_connection(sock_path, limit=2 * MAX_MESSAGE_SIZE)
        transport_of(writer).pause_reading()
        writer.write(request_frame(1, "Big"))
        await asyncio.sleep(0.2)
        await a.quiesce(keep=lambda ctx: False, timeout=0.1)
        handoff = a.handoff()
        assert handoff.connections == []  # half a frame out: another writer would corrupt it
        transport_of(writer).resume_reading()
        with pytest.raises(asyncio.IncompleteReadError):
            await read_response(reader)
        writer.close()
        b = Server()
        await b.adopt(handoff)
        await b.close()

    run(main())


def test_state_must_be_json(sock_path: str) -> None:
    async def bad(ctx: Context, payload: bytes) -> bytes:
        ctx.connection["oops"] = {1, 2}
        return b""

    async def main() -> None:
        a = Server()
        a.register(SVC, {"Bad": bad})
        await a.start_unix(sock_path)
        async with await Client.connect(sock_path) as client:
            await client.call(SVC, "Bad", b"")
            await a.quiesce(keep=lambda ctx: False)
            with pytest.raises(TypeError, match="not JSON-serialisable"):
                a.handoff()
            await a.close()  # nothing was handed over: an ordinary close
            with pytest.raises(ClosedError):
                await client.call(SVC, "Bad", b"")

    run(main())


def test_misuse() -> None:
    async def main() -> None:
        server = Server()
        with pytest.raises(RuntimeError):
            server.handoff()
        await server.quiesce(keep=lambda ctx: False)
        with pytest.raises(RuntimeError):
            await server.quiesce(keep=lambda ctx: False)
        handoff = server.handoff()
        assert handoff == ServerHandoff(-1, [])
        with pytest.raises(RuntimeError):
            server.handoff()
        with pytest.raises(RuntimeError):
            await server.adopt(handoff)

    run(main())


def test_json_round_trip_and_validation() -> None:
    handoff = ServerHandoff(
        listen_fd=7,
        connections=[
            ConnectionHandoff(
                fd=9,
                unread=b"\0\x01\xff",
                last_stream_id=41,
                state={"namespace": "k8s.io", "n": [1, 2]},
                pending=[
                    PendingCall(41, "svc", "Wait", b"\x0a\x01x", [("k", "v"), ("k", "w")], 123)
                ],
                discard=5,
            )
        ],
        socket_file=("/run/x.sock", 2049, 1234),
    )
    text = handoff.to_json()
    assert ServerHandoff.from_json(text) == handoff
    assert ServerHandoff.from_json(text.encode()) == handoff
    assert handoff.fds() == [7, 9]
    for bad in (
        "",
        "[]",
        json.dumps({"version": 99, "listen_fd": -1}),
        json.dumps({"version": 1, "listen_fd": "3"}),
        json.dumps({"version": 1, "listen_fd": -1, "connections": [{"fd": 3, "unread": "!"}]}),
        json.dumps({"version": 1, "listen_fd": -1, "socket_file": ["/x", 1]}),
    ):
        with pytest.raises(ValueError):
            ServerHandoff.from_json(bad)


# -- across a real exec --------------------------------------------------------------------


def read_line(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not answer in time"
    return proc.stdout.readline().strip()


def test_handoff_across_exec(sock_path: str) -> None:
    handoff_path = os.path.join(os.path.dirname(sock_path), "handoff.json")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), sock_path, handoff_path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(proc) == "ready 0"

        async def main() -> None:
            client = await Client.connect(sock_path)
            before = json.loads(await client.call(SVC, "Info", b""))
            assert (before["pid"], before["generation"]) == (proc.pid, 0)
            await client.call(SVC, "Remember", b"tenant-1")
            slow = asyncio.create_task(client.call(SVC, "Slow", b"wait", timeout=30))
            await asyncio.sleep(0.1)

            proc.send_signal(signal.SIGHUP)
            # Whichever generation reads it answers it, once.
            racing = asyncio.create_task(client.call(SVC, "Info", b"", timeout=20))
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, read_line, proc) == "handing over 0"
            # Made once generation 0 has stopped reading: the next generation answers.
            after = json.loads(await client.call(SVC, "Info", b"", timeout=20))
            assert (after["pid"], after["generation"]) == (proc.pid, 1)
            assert json.loads(await racing)["pid"] == proc.pid
            assert await client.call(SVC, "Recall", b"") == b"tenant-1"
            assert not slow.done()
            await client.call(SVC, "Release", b"")
            assert await slow == b"wait answered by generation 1"

            # The same descriptors as before the exec, and none left inheritable.
            assert after["fds"]["count"] == before["fds"]["count"]
            assert after["fds"]["inheritable"] == []
            async with await Client.connect(sock_path) as fresh:
                info = json.loads(await fresh.call(SVC, "Info", b""))
                assert (info["pid"], info["generation"]) == (proc.pid, 1)
            assert not client.closed
            await client.close()

        run(main())
        assert read_line(proc) == "ready 1"
        assert proc.poll() is None
        assert not os.path.exists(handoff_path)
    finally:
        proc.kill()
        proc.wait()
