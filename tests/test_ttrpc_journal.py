"""Journaled connections: a server that dies mid-call loses no request.

The connection's socket is shared, as the keeper shares it with the daemon: the test keeps a
duplicate of the server's end, "kills" the first server by dropping its descriptor without a
word to the peer, and hands the duplicate and the journal to a second server, as a restarted
daemon gets them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Awaitable

import pytest

from shim.ttrpc import Context, Server
from shim.ttrpc.codec import (
    HEADER_SIZE,
    FrameDecoder,
    MessageType,
    Request,
    Response,
    encode_frame,
)
from shim.ttrpc.journal import Journal
from shim.ttrpc.server import PEEK_FRAME_MAX

SVC = "test.v1.Journal"


def run(coro: Awaitable[None], timeout: float = 20.0) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout):
            await coro

    asyncio.run(main())


def request_frame(stream_id: int, method: str, payload: bytes = b"") -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, Request(SVC, method, payload).encode())


class Peer:
    """The client end, raw: sends frames, collects responses by stream id."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = FrameDecoder()
        self.responses: dict[int, list[Response]] = {}

    async def read_until(self, stream_id: int, timeout: float = 5.0) -> Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while stream_id not in self.responses:
            if loop.time() > deadline:
                raise AssertionError(f"no answer on stream {stream_id}")
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            assert data, "server closed the connection"
            for frame in self.decoder.feed(data):
                self.responses.setdefault(frame.stream_id, []).append(
                    Response.decode(frame.payload)
                )
        return self.responses[stream_id][0]


def own_files(journal_dir: str) -> list[str]:
    """Files of single requests (too large for a slot, or an older image's)."""
    return sorted(n for n in os.listdir(journal_dir) if not n.startswith("slots."))


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def journal_dir() -> str:
    return tempfile.mkdtemp(prefix="journal", dir="/tmp")


def test_request_is_journaled_until_answered(journal_dir: str) -> None:
    journal = Journal(journal_dir)
    release = None

    async def main() -> None:
        nonlocal release
        release = asyncio.Event()

        async def slow(ctx: Context, payload: bytes) -> bytes:
            assert release is not None
            await release.wait()
            return b"done:" + payload

        server = Server(journal=journal)
        server.register(SVC, {"Slow": slow})
        client, theirs = socket.socketpair()
        await server.serve_kept(os.dup(theirs.fileno()), 7)
        theirs.close()
        peer = Peer(client)
        client.sendall(request_frame(1, "Slow", b"x"))
        for _ in range(200):
            if journal.load().get(7):
                break
            await asyncio.sleep(0.005)
        calls = journal.load()[7]
        assert [c.stream_id for c in calls] == [1]
        assert calls[0].frame == request_frame(1, "Slow", b"x")
        release.set()
        resp = await peer.read_until(1)
        assert resp.payload == b"done:x"
        await asyncio.sleep(0.01)
        assert journal.load() == {}
        await server.close()
        client.close()

    run(main())


def test_dead_server_calls_are_answered_by_the_next_one(journal_dir: str) -> None:
    """Server A reads two calls and dies before answering; B answers both, once each, with
    `replayed` set, and serves new calls on the same connection."""
    journal = Journal(journal_dir)

    async def main() -> None:
        client, theirs = socket.socketpair()
        kept = os.dup(theirs.fileno())  # the keeper's copy

        hang = asyncio.Event()

        async def never(ctx: Context, payload: bytes) -> bytes:
            await hang.wait()
            return b""

        a = Server(journal=journal)
        a.register(SVC, {"Wait": never, "Echo": never})
        await a.serve_kept(os.dup(theirs.fileno()), 3)
        theirs.close()
        peer = Peer(client)
        client.sendall(request_frame(1, "Wait", b"w") + request_frame(3, "Echo", b"e"))
        for _ in range(200):
            if len(journal.load().get(3, [])) == 2:
                break
            await asyncio.sleep(0.005)
        assert [c.stream_id for c in journal.load()[3]] == [1, 3]
        # A dies: its descriptor goes, nothing is said to the peer (the keeper's copy holds).
        a._close_epoll()
        for conn in list(a._connections):
            conn._journal = None  # a dead process does no bookkeeping
            assert conn._transport is not None
            conn._transport.abort()
        await asyncio.sleep(0.01)
        client.sendall(request_frame(5, "Echo", b"new"))  # arrives while nobody serves

        seen: list[tuple[str, bool]] = []

        async def echo(ctx: Context, payload: bytes) -> bytes:
            seen.append((ctx.method, ctx.replayed))
            return ctx.method.encode() + b":" + payload

        b = Server(journal=Journal(journal_dir))
        b.register(SVC, {"Wait": echo, "Echo": echo})
        await b.serve_kept(kept, 3, journaled=journal.load()[3], state={})
        assert (await peer.read_until(1)).payload == b"Wait:w"
        assert (await peer.read_until(3)).payload == b"Echo:e"
        assert (await peer.read_until(5)).payload == b"Echo:new"
        await asyncio.sleep(0.05)
        assert {k: len(v) for k, v in peer.responses.items()} == {1: 1, 3: 1, 5: 1}
        assert seen == [("Wait", True), ("Echo", True), ("Echo", False)]
        assert journal.load() == {}
        await b.close()
        client.close()

    run(main())


def test_journaled_but_unread_frame_is_served_once(journal_dir: str) -> None:
    """A died after journaling a frame and before taking it out of the socket: B finds it in
    both places and runs it once."""
    journal = Journal(journal_dir)

    async def main() -> None:
        client, theirs = socket.socketpair()
        frame = request_frame(9, "Echo", b"twice?")
        client.sendall(frame)
        journal.record(4, 9, frame)  # as A would have, just before its death
        count = 0

        async def echo(ctx: Context, payload: bytes) -> bytes:
            nonlocal count
            count += 1
            return payload

        b = Server(journal=journal)
        b.register(SVC, {"Echo": echo})
        await b.serve_kept(os.dup(theirs.fileno()), 4, journaled=journal.load()[4], state={})
        theirs.close()
        peer = Peer(client)
        assert (await peer.read_until(9)).payload == b"twice?"
        client.sendall(request_frame(11, "Echo", b"next"))
        assert (await peer.read_until(11)).payload == b"next"
        assert count == 2 and len(peer.responses[9]) == 1
        await b.close()
        client.close()

    run(main())


def test_cut_short_entry_is_dropped(journal_dir: str) -> None:
    journal = Journal(journal_dir)
    frame = request_frame(1, "Echo", b"0123456789")
    with open(os.path.join(journal_dir, "2.1"), "wb") as f:
        f.write(frame[: HEADER_SIZE + 3])  # the writer died mid-write
    assert journal.load() == {}
    assert not os.path.exists(os.path.join(journal_dir, "2.1"))


def test_split_and_large_frames_without_spinning(journal_dir: str) -> None:
    """A frame arriving in pieces waits in the socket without the loop spinning; a frame
    larger than can wait whole is read as it comes; both are answered."""
    journal = Journal(journal_dir)

    async def main() -> None:
        async def size(ctx: Context, payload: bytes) -> bytes:
            return str(len(payload)).encode()

        server = Server(journal=journal)
        server.register(SVC, {"Size": size})
        client, theirs = socket.socketpair()
        await server.serve_kept(os.dup(theirs.fileno()), 1)
        theirs.close()
        peer = Peer(client)
        frame = request_frame(1, "Size", b"a" * 1000)
        cpu = time.process_time()
        client.sendall(frame[:7])
        await asyncio.sleep(0.3)
        client.sendall(frame[7:500])
        await asyncio.sleep(0.3)
        client.sendall(frame[500:])
        assert (await peer.read_until(1)).payload == b"1000"
        assert time.process_time() - cpu < 0.2, "the loop spun on a partial frame"
        big = request_frame(3, "Size", b"b" * (PEEK_FRAME_MAX * 4))
        await asyncio.get_running_loop().sock_sendall(client, big)
        assert (await peer.read_until(3)).payload == str(PEEK_FRAME_MAX * 4).encode()
        await asyncio.sleep(0.01)
        assert journal.load() == {}
        await server.close()
        client.close()

    run(main())


def test_dropped_connection_is_shut_down_for_every_holder(journal_dir: str) -> None:
    """When the server drops a journaled connection, the peer sees it closed even though
    another process (here: a duplicate) still holds the socket."""

    async def main() -> None:
        server = Server(journal=Journal(journal_dir), accept_filter=lambda peer: False)
        client, theirs = socket.socketpair()
        keeper_copy = os.dup(theirs.fileno())
        await server.serve_kept(os.dup(theirs.fileno()), 1)  # refused by the filter
        theirs.close()
        client.settimeout(2.0)
        assert client.recv(1) == b""
        os.close(keeper_copy)
        await server.close()
        client.close()

    run(main())


def test_partial_frame_then_eof_closes_and_slow_loris_is_dropped(journal_dir: str) -> None:
    """A frame's start left in the socket is still timed (slow-loris) and, once the peer
    has shut down, read and found truncated: both connections are closed."""

    async def main() -> None:
        server = Server(journal=Journal(journal_dir), frame_timeout=0.3)
        a, theirs_a = socket.socketpair()
        b, theirs_b = socket.socketpair()
        await server.serve_kept(os.dup(theirs_a.fileno()), 1)
        await server.serve_kept(os.dup(theirs_b.fileno()), 2)
        theirs_a.close()
        theirs_b.close()
        a.sendall(b"\x00")
        a.shutdown(socket.SHUT_WR)
        b.sendall(request_frame(1, "Echo", b"x")[:12])  # and nothing more
        loop = asyncio.get_running_loop()
        for peer in (a, b):
            peer.setblocking(False)
            try:
                assert await asyncio.wait_for(loop.sock_recv(peer, 1), 3.0) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread: also closed
        assert server.dropped_connections == 1  # b, by the frame timer
        await server.close()
        a.close()
        b.close()

    run(main())


def test_journaled_answer_is_sent_again_not_recomputed(journal_dir: str) -> None:
    """A died after writing its answer to the journal (and maybe to the socket): B sends that
    answer and does not run the request again."""
    journal = Journal(journal_dir)

    async def main() -> None:
        client, theirs = socket.socketpair()
        frame = request_frame(7, "Delete", b"once")
        journal.record(5, 7, frame)
        answer = encode_frame(7, MessageType.RESPONSE, Response(payload=b"first").encode())
        journal.answer(5, 7, answer)
        runs = 0

        async def delete(ctx: Context, payload: bytes) -> bytes:
            nonlocal runs
            runs += 1
            return b"second"

        b = Server(journal=journal)
        b.register(SVC, {"Delete": delete})
        await b.serve_kept(os.dup(theirs.fileno()), 5, journaled=journal.load()[5], state={})
        theirs.close()
        peer = Peer(client)
        assert (await peer.read_until(7)).payload == b"first"
        await asyncio.sleep(0.05)
        assert runs == 0 and journal.load() == {} and own_files(journal_dir) == []
        await b.close()
        client.close()

    run(main())


def test_connection_left_mid_frame_is_closed_by_the_successor(journal_dir: str) -> None:
    """A died while taking a large request out of the socket as it came: nobody can find
    the next frame's start, so B closes that connection (and only that one)."""
    journal = Journal(journal_dir)

    async def main() -> None:
        a = Server(journal=journal)
        gate = asyncio.Event()

        async def size(ctx: Context, payload: bytes) -> bytes:
            await gate.wait()
            return b""

        a.register(SVC, {"Size": size})
        client, theirs = socket.socketpair()
        kept = os.dup(theirs.fileno())
        await a.serve_kept(os.dup(theirs.fileno()), 9)
        theirs.close()
        big = request_frame(1, "Size", b"z" * (PEEK_FRAME_MAX * 8))
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        sending = loop.create_task(loop.sock_sendall(client, big[: len(big) // 2]))
        for _ in range(400):  # until A has read part of it
            if journal.broken() == {9}:
                break
            await asyncio.sleep(0.005)
        assert journal.broken() == {9}
        a._close_epoll()  # A dies
        for conn in list(a._connections):
            conn._journal = None
            assert conn._transport is not None
            conn._transport.abort()
        b = Server(journal=Journal(journal_dir))
        await b.serve_kept(kept, 9, journaled=[], state={})
        sending.cancel()
        with pytest.raises((ConnectionResetError, BrokenPipeError, AssertionError)):
            while True:
                data = await asyncio.wait_for(loop.sock_recv(client, 65536), 3.0)
                assert data, "closed"
        assert journal.broken() == set()
        gate.set()
        await b.close()
        client.close()

    run(main())


def test_answer_cut_short_is_no_answer_and_a_new_one_fits(journal_dir: str) -> None:
    """A died in the middle of appending its answer (so it never reached the socket): the
    request runs again, and the successor's answer is read back whole after another death."""
    journal = Journal(journal_dir)
    frame = request_frame(9, "Kill", b"x")
    journal.record(3, 9, frame)
    answer = encode_frame(9, MessageType.RESPONSE, Response(payload=b"done").encode())
    journal.answer(3, 9, answer[:-2])
    (call,) = journal.load()[3]
    assert call.frame == frame and call.answer is None
    journal.answer(3, 9, answer)
    (call,) = journal.load()[3]
    assert call.frame == frame and call.answer == answer
    journal.done(3, 9)
    assert journal.load() == {}


def test_an_older_images_answer_beside_the_request_is_read(journal_dir: str) -> None:
    """Images before one file per request wrote the answer to ``<conn>.<stream>.r``: after an
    upgrade the new image still sends it, and leaves one file that ``done`` removes."""
    frame = request_frame(11, "Delete", b"y")
    write_file(os.path.join(journal_dir, "4.11"), frame)
    answer = encode_frame(11, MessageType.RESPONSE, Response(payload=b"old").encode())
    write_file(os.path.join(journal_dir, "4.11.r"), answer)
    journal = Journal(journal_dir)
    (call,) = journal.load()[4]
    assert call.frame == frame and call.answer == answer
    assert own_files(journal_dir) == ["4.11"]
    journal.done(4, 11)
    assert own_files(journal_dir) == [] and journal.load() == {}


def test_an_older_images_file_per_request_is_read(journal_dir: str) -> None:
    """Images before the slot files wrote one file per request, its answer appended: a new
    image finds both, sends the answer, and removes the file when done."""
    w = request_frame(3, "Wait", b"w")
    d = request_frame(5, "Delete", b"d")
    answer = encode_frame(5, MessageType.RESPONSE, Response(payload=b"gone").encode())
    write_file(os.path.join(journal_dir, "2.3"), w)
    write_file(os.path.join(journal_dir, "2.5"), d + answer)
    journal = Journal(journal_dir)
    calls = journal.load()[2]
    assert [(c.stream_id, c.frame, c.answer) for c in calls] == [(3, w, None), (5, d, answer)]
    journal.done(2, 3)
    journal.done(2, 5)
    assert own_files(journal_dir) == [] and journal.load() == {}


def test_slots_are_reused_and_no_file_is_made_per_request(journal_dir: str) -> None:
    """The common case creates no file: requests come and go in the slot files, which grow
    only to the most requests in flight at once; a successor finds exactly those in flight."""
    journal = Journal(journal_dir)
    for round in range(50):
        for sid in range(1, 8, 2):
            journal.record(1, round * 8 + sid, request_frame(round * 8 + sid, "State"))
        for sid in range(1, 8, 2):
            journal.done(1, round * 8 + sid)
    assert own_files(journal_dir) == []
    assert os.path.getsize(os.path.join(journal_dir, "slots.512")) <= 4 * 512
    waits = {sid: request_frame(sid, "Wait", b"c%d" % sid) for sid in (1, 3, 5)}
    for sid, frame in waits.items():
        journal.record(7, sid, frame)
    journal.done(7, 3)
    successor = Journal(journal_dir)
    assert [(c.stream_id, c.frame) for c in successor.load()[7]] == [(1, waits[1]), (5, waits[5])]
    successor.done(7, 1)
    successor.done(7, 5)
    assert successor.load() == {} and Journal(journal_dir).load() == {}


def test_slot_cut_short_or_stale_is_no_entry(journal_dir: str) -> None:
    """A slot written only in part (the writer died in its pwrite) fails its checksum and is
    no entry; a reused slot never shows its last user's answer."""
    journal = Journal(journal_dir)
    frame = request_frame(9, "Kill", b"0123456789")
    journal.record(3, 9, frame)
    path = os.path.join(journal_dir, "slots.512")
    with open(path, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")  # as if the frame's bytes had not all landed
    assert Journal(journal_dir).load() == {}
    journal.record(3, 9, frame)
    answer = encode_frame(9, MessageType.RESPONSE, Response(payload=b"done").encode())
    journal.answer(3, 9, answer)
    journal.done(3, 9)
    again = request_frame(11, "Kill", b"0123456789")  # same length: same place for an answer
    journal.record(3, 11, again)
    (call,) = Journal(journal_dir).load()[3]
    assert (call.stream_id, call.frame, call.answer) == (11, again, None)


def test_large_frames_and_answers_move_to_larger_places(journal_dir: str) -> None:
    """A request too large for a small slot takes a large one, one too large for any slot a
    file; an answer too large for its slot moves the request with it.  A successor finds
    each with its answer, and nothing is left once they are done."""
    journal = Journal(journal_dir)
    small = request_frame(1, "Stats")
    medium = request_frame(3, "Create", b"m" * 3000)
    huge = request_frame(5, "Create", b"h" * 20000)
    for sid, frame in ((1, small), (3, medium), (5, huge)):
        journal.record(2, sid, frame)
    assert own_files(journal_dir) == ["2.5"]
    answers = {
        sid: encode_frame(sid, MessageType.RESPONSE, Response(payload=b"a" * n).encode())
        for sid, n in ((1, 1500), (3, 6000), (5, 10))
    }
    journal.answer(2, 1, answers[1])  # 1500 bytes: from a 512-byte slot to an 8 KiB one
    journal.answer(2, 3, answers[3])  # 3000 + 6000 bytes: to a file
    journal.answer(2, 5, answers[5])
    assert own_files(journal_dir) == ["2.3", "2.5"]
    found = {c.stream_id: (c.frame, c.answer) for c in Journal(journal_dir).load()[2]}
    assert found == {1: (small, answers[1]), 3: (medium, answers[3]), 5: (huge, answers[5])}
    for sid in (1, 3, 5):
        journal.done(2, sid)
    assert own_files(journal_dir) == [] and Journal(journal_dir).load() == {}


def test_handlers_answer_in_their_own_task_whether_or_not_they_wait(journal_dir: str) -> None:
    """Each handler runs in a task of its own from its first step (asyncio.timeout and
    current_task work there) whether it answers at once or waits; one batch of frames mixing
    both is answered, each once, and leaves nothing in the journal."""
    journal = Journal(journal_dir)

    async def main() -> None:
        release = asyncio.Event()
        tasks: list[asyncio.Task[object] | None] = []

        async def quick(ctx: Context, payload: bytes) -> bytes:
            tasks.append(asyncio.current_task())
            async with asyncio.timeout(5):  # needs a current task
                return b"quick:" + payload

        async def slow(ctx: Context, payload: bytes) -> bytes:
            tasks.append(asyncio.current_task())
            await release.wait()
            return b"slow:" + payload

        server = Server(journal=journal)
        server.register(SVC, {"Quick": quick, "Slow": slow})
        client, theirs = socket.socketpair()
        await server.serve_kept(os.dup(theirs.fileno()), 7)
        theirs.close()
        peer = Peer(client)
        frames = [request_frame(1, "Slow", b"a")]
        frames += [request_frame(sid, "Quick", b"%d" % sid) for sid in range(3, 203, 2)]
        client.sendall(b"".join(frames))  # one read: all of them in one batch
        for sid in range(3, 203, 2):
            assert (await peer.read_until(sid)).payload == b"quick:%d" % sid
        assert 1 not in peer.responses  # still waiting, and in the journal
        assert [c.stream_id for c in journal.load()[7]] == [1]
        release.set()
        assert (await peer.read_until(1)).payload == b"slow:a"
        await asyncio.sleep(0.01)
        assert all(len(r) == 1 for r in peer.responses.values())
        assert len(tasks) == 101 and None not in tasks and len(set(map(id, tasks))) == 101
        assert journal.load() == {}
        await server.close()
        client.close()

    run(main())


def test_answers_of_repeatable_methods_are_not_journaled(journal_dir: str) -> None:
    """A successor runs a repeatable call (one that only reads) again rather than resending
    its answer: that answer is never written; every other answer is."""
    answered: list[int] = []

    class Recording(Journal):
        def answer(self, connection: int, stream_id: int, frame: bytes) -> None:
            answered.append(stream_id)
            super().answer(connection, stream_id, frame)

    async def main() -> None:
        server = Server(journal=Recording(journal_dir), repeatable=[(SVC, "Read")])
        server.register(SVC, {"Read": echo_handler, "Change": echo_handler})
        client, theirs = socket.socketpair()
        await server.serve_kept(os.dup(theirs.fileno()), 7)
        theirs.close()
        peer = Peer(client)
        client.sendall(request_frame(1, "Read", b"r") + request_frame(3, "Change", b"c"))
        assert (await peer.read_until(1)).payload == b"r"
        assert (await peer.read_until(3)).payload == b"c"
        assert answered == [3]
        await server.close()
        client.close()

    run(main())


async def echo_handler(ctx: Context, payload: bytes) -> bytes:
    return payload


def test_connection_state_lives_in_a_slot(journal_dir: str) -> None:
    """A connection's state is kept without a file of its own (an inode made and removed
    per connection costs on a disk /run), survives for a successor, and is no call."""
    journal = Journal(journal_dir)
    journal.save_state(3, {"namespace": "k8s.io"})
    journal.save_state(3, {"namespace": "moby"})  # replaced, not added to
    journal.save_state(4, {"namespace": "default"})
    journal.record(3, 1, request_frame(1, "State"))
    assert own_files(journal_dir) == []
    successor = Journal(journal_dir)
    assert successor.state(3) == {"namespace": "moby"}
    assert successor.state(4) == {"namespace": "default"}
    assert successor.connections_with_state() == {3, 4}
    assert [(c, [x.stream_id for x in calls]) for c, calls in successor.load().items()] == [
        (3, [1])
    ]
    successor.forget_connection(3)
    after = Journal(journal_dir)
    assert after.state(3) == {} and after.connections_with_state() == {4}
    # an older image's state file is still read
    write_file(os.path.join(journal_dir, "7.state"), b'{"namespace": "old"}')
    assert Journal(journal_dir).state(7) == {"namespace": "old"}
    assert 7 in Journal(journal_dir).connections_with_state()
