"""The ttrpc layer of a LIVE daemon under attack (hypothesis against its socket).

Garbage bytes, truncated frames, lengths past the limit, wrong frame types and flags,
requests for unknown services, garbage protobuf for every Task method, and slow-loris
peers.  Throughout, the daemon must not crash, must keep serving a bystander connection
opened before it all (so only offending connections are ever dropped), must answer every
well-framed call with a proper status, and its memory and descriptors must stay bounded.

The number of inputs tried is printed (``pytest -s``); ``EMBEDSHIM_FUZZ_SCALE`` multiplies it
for a long run (``make fuzz``).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.embed import (
    TASK_SERVICE,
    call,
    daemon_paths,
    embedshim_env,
    oci_spec,
    remove_host_leftovers,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd, wait_for
from shim.api import shim_pb2
from shim.ttrpc import Code, TTRPCError
from shim.ttrpc.blocking import BlockingClient
from shim.ttrpc.codec import HEADER_SIZE, MAX_MESSAGE_SIZE, MessageType, Request, encode_frame
from shim.ttrpc.errors import ClosedError
from shim.ttrpc.server import MAX_BUFFERED_BYTES

NS = "fuzz"
DAEMON_SERVICE = "embedshim.v1.Daemon"
SCALE = float(os.environ.get("EMBEDSHIM_FUZZ_SCALE", "1"))
FRAME_TIMEOUT = 1.0
#: How much the daemon's RSS may grow over a whole fuzz run.
RSS_SLACK_KB = 40 * 1024

TASK_METHODS: dict[str, type] = {
    "Create": shim_pb2.CreateTaskRequest,
    "Start": shim_pb2.StartRequest,
    "State": shim_pb2.StateRequest,
    "Wait": shim_pb2.WaitRequest,
    "Kill": shim_pb2.KillRequest,
    "Delete": shim_pb2.DeleteRequest,
    "Pids": shim_pb2.PidsRequest,
    "Connect": shim_pb2.ConnectRequest,
    "Shutdown": shim_pb2.ShutdownRequest,
    "CloseIO": shim_pb2.CloseIORequest,
    "Exec": shim_pb2.ExecProcessRequest,
    "Pause": shim_pb2.PauseRequest,
    "Resume": shim_pb2.ResumeRequest,
    "Checkpoint": shim_pb2.CheckpointTaskRequest,
    "ResizePty": shim_pb2.ResizePtyRequest,
    "Update": shim_pb2.UpdateTaskRequest,
    "Stats": shim_pb2.StatsRequest,
}
#: What a garbage request may be answered with; UNKNOWN would mean an unexpected exception.
#: Not DEADLINE_EXCEEDED: garbage is refused at once, it never waits for anything.
EXPECTED = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.UNIMPLEMENTED,
    Code.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS,
}
#: How long an answer to garbage may take (generous: two cores shared with other runs); the
#: requests carry no deadline, so a handler that hangs fails here instead of being answered
#: DEADLINE_EXCEEDED by the server.
ANSWER_WITHIN = 5.0


@dataclass
class Target:
    c: Containerd
    socket: str
    pid: int
    bystander: BlockingClient
    rss0: int = 0
    fds0: int = 0
    peak_rss: int = 0
    tried: dict[str, int] = field(default_factory=dict)

    def check(self) -> None:
        """Alive, the same process, and the bystander answered promptly."""
        os.kill(self.pid, 0)
        with open(daemon_paths(self.c).pidfile) as f:
            assert int(f.read()) == self.pid, "the daemon was replaced"
        t0 = time.monotonic()
        out = self.bystander.call(DAEMON_SERVICE, "Info", b"", timeout=5)
        assert b'"pid"' in out
        assert time.monotonic() - t0 < 2.0, "bystander starved"

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, rss_kb(self.pid))

    def count(self, what: str) -> None:
        self.tried[what] = self.tried.get(what, 0) + 1


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture(scope="module")
def daemon(busybox: str) -> Iterator[Target]:
    """One containerd and daemon for the whole module, with a created task ``keep`` that
    nothing may touch and a bystander connection that must keep working."""
    c = Containerd(
        extra_env={
            **embedshim_env(),
            "EMBEDSHIM_FRAME_TIMEOUT": str(FRAME_TIMEOUT),
            "EMBEDSHIM_IDLE_EXIT": "3600",
        },
        watch_paths=[busybox],
    )
    try:
        bundle = write_bundle(c, NS, "keep", oci_spec(busybox, "sleep", "1000"))
        address = start_daemon(c, bundle, NS, "keep")
        run(call(address, "Create", shim_pb2.CreateTaskRequest(id="keep", bundle=bundle), NS))
        paths = daemon_paths(c)
        with open(paths.pidfile) as f:
            pid = int(f.read())
        with BlockingClient(address, timeout=5) as bystander:
            t = Target(c, paths.socket, pid, bystander)
            t.check()
            t.rss0 = t.peak_rss = rss_kb(pid)
            t.fds0 = fd_count(pid)
            yield t
            t.check()  # the same connection still works after everything
        state = shim_pb2.StateResponse.FromString(
            run(call(address, "State", shim_pb2.StateRequest(id="keep"), NS))
        )
        assert state.status == 1  # keep was never touched
        run(call(address, "Kill", shim_pb2.KillRequest(id="keep", signal=9), NS))
        run(call(address, "Delete", shim_pb2.DeleteRequest(id="keep"), NS))
        growth = t.peak_rss - t.rss0
        print(
            f"\nfuzz: {sum(t.tried.values())} inputs tried against a live daemon "
            f"{dict(sorted(t.tried.items()))}; daemon RSS {t.rss0} kB, peak while fuzzing "
            f"{t.peak_rss} kB (+{growth} kB)"
        )
        assert growth < RSS_SLACK_KB, growth
    finally:
        try:
            c.cleanup()
        finally:
            remove_host_leftovers(c)


@pytest.fixture
def target(daemon: Target) -> Iterator[Target]:
    yield daemon
    daemon.check()
    # Every offending connection is closed again: the descriptors are back where they were.
    wait_for(lambda: fd_count(daemon.pid) == daemon.fds0, what="daemon fds back to baseline")


def _examples(n: int) -> int:
    return max(1, int(n * SCALE))


# -- raw byte streams -----------------------------------------------------------------------

_name = st.text(min_size=0, max_size=40)
_services = st.one_of(st.sampled_from([TASK_SERVICE, DAEMON_SERVICE]), _name)
_methods = st.one_of(st.sampled_from([*TASK_METHODS, "Reserve", "Cleanup", "Info"]), _name)


@st.composite
def _request_payload(draw: st.DrawFn) -> bytes:
    """A ttrpc Request, well-formed or not, whose inner payload is garbage or a mangled
    valid message."""
    inner = draw(st.binary(max_size=300))
    request = Request(
        draw(_services),
        draw(_methods),
        inner,
        draw(st.integers(0, 2**63 - 1) | st.just(0)),
        tuple(draw(st.lists(st.tuples(_name, _name), max_size=4))),
    )
    raw = request.encode()
    if draw(st.booleans()):
        return raw
    cut = draw(st.integers(0, len(raw)))
    return raw[:cut] + draw(st.binary(max_size=20))


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    payload = draw(_request_payload() | st.binary(max_size=200))
    stream = draw(st.integers(0, 2**32 - 1) | st.sampled_from([1, 3, 5, 7]))
    kind = draw(st.integers(0, 255) | st.just(int(MessageType.REQUEST)))
    flags = draw(st.integers(0, 255) | st.just(0))
    lie = draw(st.sampled_from(["honest", "honest", "short", "long", "past-limit", "huge"]))
    length = len(payload)
    if lie == "short":
        length = draw(st.integers(0, max(0, len(payload) - 1)))
    elif lie == "long":
        length = len(payload) + draw(st.integers(1, 1000))  # truncated: never completed
    elif lie == "past-limit":
        length = MAX_MESSAGE_SIZE + draw(st.integers(1, 1000))
    elif lie == "huge":
        length = draw(st.integers(MAX_MESSAGE_SIZE + 1, 2**32 - 1))
    return struct.pack(">IIBB", length, stream, kind, flags) + payload


_chunk = st.one_of(_frame(), st.binary(min_size=1, max_size=64))
_streams = st.tuples(
    st.lists(_chunk, min_size=1, max_size=6),
    st.sampled_from(["half-close", "close", "stall"]),
)


def _play(t: Target, chunks: list[bytes], ending: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(FRAME_TIMEOUT * 4)
    try:
        s.connect(t.socket)
        for chunk in chunks:
            s.sendall(chunk)
        if ending == "close":
            return
        if ending == "half-close":
            s.shutdown(socket.SHUT_WR)
        # Read what the daemon answers until it closes: after our EOF, or (stall) when
        # the frame timeout drops a peer left mid-frame.  A connection with no frame
        # begun stays open; stop reading it after a little while.
        deadline = time.monotonic() + (0.02 if ending == "stall" else FRAME_TIMEOUT * 4)
        s.settimeout(0.05)
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    return
            except TimeoutError:
                continue
        if ending == "half-close":
            raise AssertionError("the daemon did not close a connection after its EOF")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon dropped us: allowed, for an offender
    finally:
        s.close()


def test_fuzz_raw_streams(target: Target) -> None:
    @settings(
        max_examples=_examples(400),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(_streams)
    def one(stream: tuple[list[bytes], str]) -> None:
        chunks, ending = stream
        _play(target, chunks, ending)
        target.count("raw stream")
        target.check()
        target.sample()

    one()


# -- garbage protobuf for every method ------------------------------------------------------


def _valid(method: str) -> bytes:
    """A plausible request of ``method`` for a task that does not exist (so a mutation of
    it cannot reach the one real task)."""
    cls = TASK_METHODS[method]
    msg = cls()
    for name, value in (("id", "fz1"), ("exec_id", "e1"), ("bundle", "/nowhere/fz1")):
        if name in cls.DESCRIPTOR.fields_by_name:
            setattr(msg, name, value)
    return bytes(msg.SerializeToString())


@st.composite
def _garbage(draw: st.DrawFn, method: str) -> bytes:
    base = _valid(method)
    how = draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if how == "random" or not base:
        return draw(st.binary(max_size=400))
    data = bytearray(base)
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


def _answered(
    t: Target, service: str, method: str, payload: bytes, metadata: dict[str, str]
) -> None:
    """One well-framed call with a garbage payload and no deadline: it must get a proper
    error (or OK) within ANSWER_WITHIN seconds, on a connection that stays open."""
    t0 = time.monotonic()
    try:
        with BlockingClient("unix://" + t.socket, timeout=ANSWER_WITHIN) as client:
            client.call(service, method, payload, metadata=metadata)
    except TTRPCError as exc:
        assert exc.code in EXPECTED, (method, payload, exc)
    except ClosedError:
        raise AssertionError(f"{method}: connection dropped for a well-framed call") from None
    except TimeoutError:
        raise AssertionError(
            f"{method}: no answer within {ANSWER_WITHIN}s to garbage {payload!r}"
        ) from None
    took = time.monotonic() - t0
    assert took < ANSWER_WITHIN, (method, took)


@pytest.mark.parametrize("method", sorted(TASK_METHODS))
def test_fuzz_task_method_payloads(target: Target, method: str) -> None:
    @settings(
        max_examples=_examples(40),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(_garbage(method), st.sampled_from([NS, "", "other", "a/../b"]))
    def one(payload: bytes, ns: str) -> None:
        metadata = {"containerd-namespace-ttrpc": ns} if ns else {}
        _answered(target, TASK_SERVICE, method, payload, metadata)
        target.count(method)
        target.check()
        target.sample()

    one()


@pytest.mark.parametrize("method", ["Reserve", "Cleanup", "Info"])
def test_fuzz_daemon_service_payloads(target: Target, method: str) -> None:
    @settings(
        max_examples=_examples(60),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
    def one(payload: bytes) -> None:
        _answered(target, DAEMON_SERVICE, method, payload, {})
        target.count(method)
        target.check()

    one()


# -- slow and greedy peers ------------------------------------------------------------------


def test_slow_loris_and_parked_frames(target: Target) -> None:
    """Twenty peers dribbling a frame a byte at a time, and twenty parking 3.9 MB of a 4 MB
    frame each (80 MB together): each is dropped (frame timeout, or the buffer budget), the
    bystander is answered promptly throughout, and the memory comes back."""
    frame = encode_frame(
        1,
        MessageType.REQUEST,
        Request(
            TASK_SERVICE, "State", shim_pb2.StateRequest(id="keep").SerializeToString()
        ).encode(),
    )
    big = struct.pack(">IIBB", MAX_MESSAGE_SIZE, 1, MessageType.REQUEST, 0)
    big += b"\0" * (MAX_MESSAGE_SIZE - 100_000)
    peers: list[socket.socket] = []
    parked: list[socket.socket] = []
    latencies: list[float] = []
    peak = 0
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(target.socket)
            s.setblocking(False)
            peers.append(s)
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(target.socket)
            s.settimeout(10)
            try:
                s.sendall(big)
            except (BrokenPipeError, ConnectionResetError):
                pass  # dropped already: the buffer budget was exceeded
            parked.append(s)
            peak = max(peak, rss_kb(target.pid))
            target.count("parked frame")
        sent = 0
        start = time.monotonic()
        while time.monotonic() - start < FRAME_TIMEOUT * 4:
            for s in peers:
                try:
                    s.send(frame[sent : sent + 1])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
            sent = min(sent + 1, HEADER_SIZE + 3)  # never finishing the frame
            t0 = time.monotonic()
            target.check()
            latencies.append(time.monotonic() - t0)
            peak = max(peak, rss_kb(target.pid))
            time.sleep(0.1)
        for s in peers:
            target.count("slow-loris")
            assert _dropped(s), "a slow-loris peer was not dropped"
        for s in parked:
            assert _dropped(s), "a parked frame was not dropped"
    finally:
        for s in peers + parked:
            s.close()
    assert max(latencies) < 1.0, latencies
    # Bounded by the server's budget for unfinished frames, whatever the peers send.
    assert peak - target.rss0 < (MAX_BUFFERED_BYTES >> 10) + RSS_SLACK_KB, peak
    wait_for(lambda: rss_kb(target.pid) - target.rss0 < 20 * 1024, what="memory given back")
    print(f"\nparked/slow peers: daemon RSS {target.rss0} kB -> peak {peak} kB")


def _dropped(s: socket.socket) -> bool:
    s.setblocking(True)
    s.settimeout(FRAME_TIMEOUT * 3)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
