"""Sans-IO tests for shim.ttrpc.codec: frames, messages, connection state machines."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given
from hypothesis import strategies as st

from shim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    ClientConnection,
    Flags,
    Frame,
    FrameDecoder,
    FrameHeader,
    MessageType,
    OversizedFrame,
    Request,
    RequestReceived,
    RequestRejected,
    Response,
    ResponseReceived,
    ServerConnection,
    ServerConnectionState,
    Status,
    encode_frame,
    parse_address,
)
from shim.ttrpc.errors import Code, MessageTooLargeError, ProtocolError

# -- frames -------------------------------------------------------------------------------


def test_header_layout_is_big_endian() -> None:
    raw = FrameHeader(0x01020304, 0x0A0B0C0D, 2, 4).encode()
    assert raw == bytes([1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D, 2, 4])
    assert FrameHeader.decode(raw) == FrameHeader(0x01020304, 0x0A0B0C0D, 2, 4)


def test_header_decode_wrong_size() -> None:
    with pytest.raises(ProtocolError):
        FrameHeader.decode(b"\0" * 9)


def test_encode_frame_refuses_oversize() -> None:
    encode_frame(1, MessageType.REQUEST, b"x" * MAX_MESSAGE_SIZE)  # exactly the limit is fine
    with pytest.raises(MessageTooLargeError) as info:
        encode_frame(1, MessageType.REQUEST, b"x" * (MAX_MESSAGE_SIZE + 1))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert info.value.message == (
        f"message length {MAX_MESSAGE_SIZE + 1} exceed maximum message size of 4194304"
    )


def test_decoder_byte_by_byte() -> None:
    frames = [
        encode_frame(1, MessageType.REQUEST, b"hello"),
        encode_frame(3, MessageType.REQUEST, b""),
        encode_frame(5, 7, b"unknown type", 0x80),
    ]
    decoder = FrameDecoder()
    events = []
    for byte in b"".join(frames):
        events += decoder.feed(bytes([byte]))
    assert events == [
        Frame(1, 1, 0, b"hello"),
        Frame(3, 1, 0, b""),
        Frame(5, 7, 0x80, b"unknown type"),
    ]
    assert not decoder.mid_frame


def test_decoder_random_splits() -> None:
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(50)]
    stream = b"".join(
        encode_frame(2 * i + 1, MessageType.RESPONSE, p) for i, p in enumerate(payloads)
    )
    decoder = FrameDecoder()
    events = []
    pos = 0
    while pos < len(stream):
        step = rng.randrange(1, 5000)
        events += decoder.feed(stream[pos : pos + step])
        pos += step
    assert [e.payload for e in events if isinstance(e, Frame)] == payloads


def test_decoder_mid_frame() -> None:
    decoder = FrameDecoder()
    assert not decoder.mid_frame
    decoder.feed(encode_frame(1, 1, b"abc")[:11])
    assert decoder.mid_frame


def test_oversize_is_reported_early_and_skipped_without_buffering() -> None:
    length = MAX_MESSAGE_SIZE + 100
    decoder = FrameDecoder()
    events = decoder.feed(FrameHeader(length, 9, 1, 0).encode())
    assert events == [OversizedFrame(9, 1, 0, length)]
    chunk = b"\xff" * 65536
    sent = 0
    while sent + len(chunk) <= length:
        assert decoder.feed(chunk) == []
        assert decoder.buffered == 0
        sent += len(chunk)
    # The rest of the oversized payload and a following frame arrive in one read.
    tail = b"\xff" * (length - sent) + encode_frame(11, 1, b"next")
    assert decoder.feed(tail) == [Frame(11, 1, 0, b"next")]
    assert not decoder.mid_frame


def test_garbage_header_is_oversize_not_crash() -> None:
    decoder = FrameDecoder()
    events = decoder.feed(b"GET / HTTP/1.1\r\n")
    assert len(events) == 1 and isinstance(events[0], OversizedFrame)
    assert decoder.buffered == 0


def test_decoder_memory_bounded_by_one_frame() -> None:
    decoder = FrameDecoder(max_size=100)
    decoder.feed(FrameHeader(100, 1, 1, 0).encode() + b"x" * 99)
    assert decoder.buffered <= 100
    assert decoder.feed(b"x") == [Frame(1, 1, 0, b"x" * 100)]
    assert decoder.buffered == 0


@given(st.binary(max_size=2000), st.lists(st.integers(1, 50), max_size=100))
def test_decoder_never_raises_on_random_bytes(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_size=64)
    pos = 0
    for cut in cuts:
        decoder.feed(data[pos : pos + cut])
        pos += cut
    decoder.feed(data[pos:])


# -- messages -------------------------------------------------------------------------------


def test_request_known_bytes() -> None:
    request = Request("svc", "M", b"\x01", 5, (("k", "v"),))
    assert request.encode() == (
        b"\x0a\x03svc"
        + b"\x12\x01M"
        + b"\x1a\x01\x01"
        + b"\x20\x05"
        + b"\x2a\x06\x0a\x01k\x12\x01v"
    )


def test_negative_ints_use_ten_bytes() -> None:
    encoded = Request(timeout_nano=-1).encode()
    assert encoded == b"\x20" + b"\xff" * 9 + b"\x01"
    assert Request.decode(encoded).timeout_nano == -1
    assert Status.decode(Status(code=-2).encode()).code == -2


def test_empty_messages() -> None:
    assert Request.decode(b"") == Request()
    assert Response.decode(b"") == Response()
    assert Response().encode() == b"\x0a\x00"  # status always present, as Go sends it


def test_unknown_fields_and_mismatched_wire_types_are_skipped() -> None:
    extra = b"\x30\x07" + b"\x3a\x02hi" + b"\x45\x01\x02\x03\x04" + b"\x49" + b"\0" * 8
    wrong_type = b"\x08\x01"  # field 1 (service) as a varint: protobuf treats it as unknown
    decoded = Request.decode(extra + wrong_type + Request("s", "m").encode())
    assert decoded == Request("s", "m")


def test_response_status_merges_like_protobuf() -> None:
    first = b"\x0a\x02\x08\x05"  # status{code=5}
    second = b"\x0a\x03\x12\x01x"  # status{message="x"}
    assert Response.decode(first + second).status == Status(5, "x")


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a",  # tag, no length
        b"\x0a\x05ab",  # length past end
        b"\x0a\x02\xff\xfe",  # invalid UTF-8 in a string
        b"\x20" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x20" + b"\xff" * 9 + b"\x7f",  # varint over 64 bits
        b"\x0b",  # group start
        b"\x00\x00",  # field number 0
        b"\x2a\x02\x0a\x05",  # truncated nested KeyValue
    ],
)
def test_bad_request_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        Request.decode(data)


def test_status_to_error_maps_unknown_codes() -> None:
    assert Status(99, "odd").to_error().code == Code.UNKNOWN
    err = Status(Code.NOT_FOUND, "gone", (("type.googleapis.com/x", b"\x01"),)).to_error()
    assert (err.code, err.message, err.details) == (
        Code.NOT_FOUND,
        "gone",
        (("type.googleapis.com/x", b"\x01"),),
    )


_text = st.text(max_size=30)
_int64 = st.integers(-(2**63), 2**63 - 1)
_int32 = st.integers(-(2**31), 2**31 - 1)
_requests = st.builds(
    Request,
    _text,
    _text,
    st.binary(max_size=200),
    _int64,
    st.lists(st.tuples(_text, _text), max_size=5).map(tuple),
)
_statuses = st.builds(
    Status, _int32, _text, st.lists(st.tuples(_text, st.binary(max_size=20)), max_size=3).map(tuple)
)
_responses = st.builds(Response, _statuses, st.binary(max_size=200))


@given(_requests)
def test_request_round_trip(request: Request) -> None:
    assert Request.decode(request.encode()) == request


@given(_responses)
def test_response_round_trip(response: Response) -> None:
    assert Response.decode(response.encode()) == response


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    for cls in (Request, Response, Status):
        try:
            cls.decode(data)
        except ProtocolError:
            pass


# -- cross-check against the real protobuf library ------------------------------------------


def _protobuf_classes() -> dict[str, type]:
    """Build ttrpc.proto and google/rpc/status.proto at runtime; no generated code needed."""
    pool = descriptor_pool.DescriptorPool()
    F = descriptor_pb2.FieldDescriptorProto

    def add_file(name: str, package: str, deps: list[str], messages: dict[str, list]) -> None:
        file = descriptor_pb2.FileDescriptorProto(
            name=name, package=package, syntax="proto3", dependency=deps
        )
        for msg_name, fields in messages.items():
            msg = file.message_type.add(name=msg_name)
            for fname, number, ftype, label, type_name in fields:
                f = msg.field.add(name=fname, number=number, type=ftype, label=label)
                if type_name:
                    f.type_name = type_name
        pool.Add(file)

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    add_file(
        "google/protobuf/any.proto",
        "google.protobuf",
        [],
        {"Any": [("type_url", 1, F.TYPE_STRING, opt, ""), ("value", 2, F.TYPE_BYTES, opt, "")]},
    )
    add_file(
        "google/rpc/status.proto",
        "google.rpc",
        ["google/protobuf/any.proto"],
        {
            "Status": [
                ("code", 1, F.TYPE_INT32, opt, ""),
                ("message", 2, F.TYPE_STRING, opt, ""),
                ("details", 3, F.TYPE_MESSAGE, rep, ".google.protobuf.Any"),
            ]
        },
    )
    add_file(
        "ttrpc/request.proto",
        "ttrpc",
        ["google/rpc/status.proto"],
        {
            "KeyValue": [("key", 1, F.TYPE_STRING, opt, ""), ("value", 2, F.TYPE_STRING, opt, "")],
            "Request": [
                ("service", 1, F.TYPE_STRING, opt, ""),
                ("method", 2, F.TYPE_STRING, opt, ""),
                ("payload", 3, F.TYPE_BYTES, opt, ""),
                ("timeout_nano", 4, F.TYPE_INT64, opt, ""),
                ("metadata", 5, F.TYPE_MESSAGE, rep, ".ttrpc.KeyValue"),
            ],
            "Response": [
                ("status", 1, F.TYPE_MESSAGE, opt, ".google.rpc.Status"),
                ("payload", 2, F.TYPE_BYTES, opt, ""),
            ],
        },
    )
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
        for name in ("ttrpc.Request", "ttrpc.Response")
    }


_PB = _protobuf_classes()


@given(_requests)
def test_request_matches_protobuf(request: Request) -> None:
    pb = _PB["ttrpc.Request"](
        service=request.service,
        method=request.method,
        payload=request.payload,
        timeout_nano=request.timeout_nano,
    )
    for key, value in request.metadata:
        pb.metadata.add(key=key, value=value)
    assert request.encode() == pb.SerializeToString(deterministic=True)
    parsed = _PB["ttrpc.Request"].FromString(request.encode())
    assert parsed == pb
    assert Request.decode(pb.SerializeToString()) == request


@given(_responses)
def test_response_matches_protobuf(response: Response) -> None:
    pb = _PB["ttrpc.Response"](payload=response.payload)
    pb.status.SetInParent()
    pb.status.code = response.status.code
    pb.status.message = response.status.message
    for type_url, value in response.status.details:
        pb.status.details.add(type_url=type_url, value=value)
    assert response.encode() == pb.SerializeToString(deterministic=True)
    assert Response.decode(pb.SerializeToString()) == response


# -- connection state machines ---------------------------------------------------------------


def test_client_stream_ids_odd_and_increasing() -> None:
    client = ClientConnection()
    ids = [client.send_request(Request("s", "m"))[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_client_refuses_oversize_without_using_an_id() -> None:
    client = ClientConnection()
    with pytest.raises(MessageTooLargeError):
        client.send_request(Request("s", "m", b"x" * MAX_MESSAGE_SIZE))
    assert client.send_request(Request("s", "m"))[0] == 1


def test_client_server_exchange_byte_by_byte() -> None:
    client, server = ClientConnection(), ServerConnection()
    wire = b""
    for i in range(3):
        wire += client.send_request(Request("svc", "M", bytes([i]), 0, (("K", "v"),)))[1]
    events = []
    for byte in wire:
        events += server.receive_data(bytes([byte]))
    assert [e.stream_id for e in events] == [1, 3, 5]
    assert all(isinstance(e, RequestReceived) for e in events)
    # Answer out of order; the client pairs by stream id.
    back = b"".join(server.send_response(sid, Response(payload=b"r%d" % sid)) for sid in (5, 1, 3))
    replies = []
    for byte in back:
        replies += client.receive_data(bytes([byte]))
    assert replies == [ResponseReceived(sid, Response(payload=b"r%d" % sid)) for sid in (5, 1, 3)]


def _request_frame(sid: int, flags: int = 0) -> bytes:
    return encode_frame(sid, MessageType.REQUEST, Request("s", "m").encode(), flags)


def test_server_rejects_even_and_reused_stream_ids() -> None:
    server = ServerConnection()
    events = server.receive_data(
        _request_frame(2) + _request_frame(5) + _request_frame(3) + _request_frame(5)
    )
    kinds = [(type(e).__name__, e.stream_id) for e in events]
    assert kinds == [
        ("RequestRejected", 2),
        ("RequestReceived", 5),
        ("RequestRejected", 3),
        ("RequestRejected", 5),
    ]
    for event in events:
        if isinstance(event, RequestRejected):
            assert event.status.code == Code.INVALID_ARGUMENT


def test_server_rejects_bad_request_proto() -> None:
    server = ServerConnection()
    [event] = server.receive_data(encode_frame(1, MessageType.REQUEST, b"\x0a\x09"))
    assert isinstance(event, RequestRejected)
    assert event.status.code == Code.INVALID_ARGUMENT
    # The stream id was still consumed, and the connection goes on.
    [event] = server.receive_data(_request_frame(3))
    assert isinstance(event, RequestReceived)


def test_server_ignores_unknown_types_and_data() -> None:
    server = ServerConnection()
    wire = encode_frame(1, 9, b"?") + encode_frame(1, MessageType.DATA, b"d")
    wire += encode_frame(1, MessageType.RESPONSE, b"")
    assert server.receive_data(wire) == []


def test_server_rejects_streaming_requests() -> None:
    server = ServerConnection()
    [event] = server.receive_data(_request_frame(1, flags=Flags.REMOTE_OPEN))
    assert isinstance(event, RequestRejected)
    assert event.status.code == Code.UNIMPLEMENTED


def test_server_oversize_then_next_request() -> None:
    server = ServerConnection(max_size=50)
    big = FrameHeader(60, 1, MessageType.REQUEST, 0).encode() + b"\0" * 60
    events = server.receive_data(big + _request_frame(3))
    assert events[0] == RequestRejected(
        1, Status(Code.RESOURCE_EXHAUSTED, "message length 60 exceed maximum message size of 50")
    )
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 3


# -- handing a connection over (export_state / restore_state) ---------------------------------


def _kinds(events: list[RequestReceived | RequestRejected]) -> list[tuple[str, int]]:
    return [(type(e).__name__, e.stream_id) for e in events]


def test_unconsumed_at_every_split_point_restores_the_same_decoder() -> None:
    wire = encode_frame(1, 1, b"hello") + encode_frame(3, 1, b"") + encode_frame(5, 7, b"x" * 20)
    expected = FrameDecoder().feed(wire)
    for cut in range(len(wire) + 1):
        first = FrameDecoder()
        before = first.feed(wire[:cut])
        unread = first.unconsumed()
        assert wire[:cut].endswith(unread)
        assert first.mid_frame == bool(unread)
        second = FrameDecoder()
        assert second.feed(unread) == []  # never a complete frame
        assert before + second.feed(wire[cut:]) == expected


def test_server_state_round_trip_at_every_split_point() -> None:
    wire = b"".join(_request_frame(sid) for sid in (1, 3, 5))
    for cut in range(len(wire) + 1):
        first = ServerConnection()
        events = first.receive_data(wire[:cut])
        state = first.export_state()
        assert (
            state.last_stream_id == first.last_stream_id == (events[-1].stream_id if events else 0)
        )
        second = ServerConnection()
        assert second.restore_state(state) == []
        events += second.receive_data(wire[cut:])
        assert _kinds(events) == [
            ("RequestReceived", 1),
            ("RequestReceived", 3),
            ("RequestReceived", 5),
        ]
        # The ordering check carries over: an old id is still refused.
        assert _kinds(second.receive_data(_request_frame(1))) == [("RequestRejected", 1)]


def test_server_state_while_skipping_an_oversized_frame() -> None:
    first = ServerConnection(max_size=50)
    head = FrameHeader(60, 1, MessageType.REQUEST, 0).encode() + b"\0" * 25
    assert _kinds(first.receive_data(head)) == [("RequestRejected", 1)]
    state = first.export_state()
    assert state == ServerConnectionState(last_stream_id=0, unread=b"", discard=35)
    second = ServerConnection(max_size=50)
    assert second.restore_state(state) == []
    assert _kinds(second.receive_data(b"\0" * 35 + _request_frame(3))) == [("RequestReceived", 3)]


def test_restore_state_only_on_a_fresh_connection() -> None:
    server = ServerConnection()
    server.receive_data(_request_frame(1))
    with pytest.raises(ValueError):
        server.restore_state(ServerConnectionState(5))
    with pytest.raises(ValueError):
        ServerConnection().restore_state(ServerConnectionState(MAX_STREAM_ID + 1))
    decoder = FrameDecoder()
    decoder.feed(b"\0\0")
    with pytest.raises(ValueError):
        decoder.skip(3)


def test_client_oversize_and_bad_response_become_statuses() -> None:
    client = ClientConnection(max_size=50)
    big = FrameHeader(60, 1, MessageType.RESPONSE, 0).encode() + b"\0" * 60
    bad = encode_frame(3, MessageType.RESPONSE, b"\x0a\x09")
    events = client.receive_data(big + bad + encode_frame(5, MessageType.DATA, b""))
    assert [(e.stream_id, e.response.status.code) for e in events] == [
        (1, Code.RESOURCE_EXHAUSTED),
        (3, Code.INTERNAL),
    ]


def test_header_size_constant() -> None:
    assert HEADER_SIZE == len(FrameHeader(0, 0, 0).encode())


@pytest.mark.parametrize(
    ("address", "path"),
    [
        ("unix:///run/x.sock", "/run/x.sock"),
        ("/run/x.sock", "/run/x.sock"),
        ("@abstract", "\0abstract"),
        ("\0abstract", "\0abstract"),
        ("unix://@abstract", "\0abstract"),
    ],
)
def test_parse_address(address: str, path: str) -> None:
    assert parse_address(address) == path


def test_parse_address_empty() -> None:
    for address in ("", "unix://", "@"):
        with pytest.raises(ValueError):
            parse_address(address)


def test_codec_import_does_not_pull_in_asyncio() -> None:
    code = (
        "import sys; import shim.ttrpc; import shim.ttrpc.codec; "
        "from shim.ttrpc import ServerHandoff as H; H.from_json(H(-1).to_json()); "
        "assert 'asyncio' not in sys.modules, 'asyncio imported'; "
        "from shim.ttrpc import Server, Client; assert 'asyncio' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_release_drops_the_frame_in_progress() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(1, MessageType.REQUEST, b"x" * 100_000)
    assert decoder.feed(frame[:60_000]) == []
    assert decoder.mid_frame and decoder.buffered > 50_000
    decoder.release()
    assert not decoder.mid_frame and decoder.buffered == 0
    # An oversized frame being skipped is forgotten too.
    decoder.feed(FrameHeader(MAX_MESSAGE_SIZE + 1, 3, 1, 0).encode())
    assert decoder.discarding
    decoder.release()
    assert decoder.discarding == 0 and not decoder.mid_frame
