"""Sans-IO ttrpc: the frame format, the three messages on the wire, and per-connection state.

Nothing here touches a socket or an event loop: bytes go in, events and bytes come out, so the
protocol can be tested exhaustively (split reads, garbage, oversize frames) without IO, and the
asyncio layer stays a thin shell around it.

The protobuf encoding of ``ttrpc.Request``/``ttrpc.Response``/``google.rpc.Status`` is written by
hand: they are five small messages, and doing it here keeps the package free of a protobuf
dependency (the RPC payloads themselves stay opaque bytes).

The short-lived ``start`` and ``delete`` subcommands import this module, so it imports nothing
but its siblings: the messages are small ``__slots__`` classes rather than dataclasses, the
enums come from ``_intenum``, the header is packed without ``struct``, and there is no
``from __future__ import annotations`` (each of those imports costs more than this module).
"""

from .errors import Code, MessageTooLargeError, ProtocolError, TTRPCError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from enum import IntEnum
else:
    from ._intenum import IntEnum

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_STREAM_ID",
    "ClientConnection",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameHeader",
    "MessageType",
    "OversizedFrame",
    "Request",
    "RequestReceived",
    "RequestRejected",
    "Response",
    "ResponseReceived",
    "ServerConnection",
    "ServerConnectionState",
    "Status",
    "encode_frame",
    "oversize_message",
    "parse_address",
]

MAX_MESSAGE_SIZE = 4 << 20
"""Largest payload a frame may carry; also why a valid header's first byte is always 0."""

HEADER_SIZE = 10
MAX_STREAM_ID = 0xFFFF_FFFF


class MessageType(IntEnum):
    """Frame types. Unknown values are legal on the wire and must be ignored by receivers."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(IntEnum):
    """Frame flags; a unary request carries none.  (An IntFlag before; combined flags are
    plain ints, which is all the codec needs.)"""

    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


def oversize_message(length: int, limit: int = MAX_MESSAGE_SIZE) -> str:
    """The status text Go's ttrpc uses, kept verbatim because peers may log or match it."""
    return f"message length {length} exceed maximum message size of {limit}"


def parse_address(address: str) -> str:
    """Unix socket path for ``unix:///path``, ``/path``, or abstract ``@name`` / ``\\0name``.

    containerd writes addresses as ``unix://...``; ``@`` is the usual spelling of the abstract
    namespace, which the kernel knows as a leading NUL.
    """
    if address.startswith("unix://"):
        address = address[len("unix://") :]
    if address.startswith("@"):
        address = "\0" + address[1:]
    if not address or address == "\0":
        raise ValueError(f"empty unix socket address {address!r}")
    return address


# --------------------------------------------------------------------------------------------
# Protobuf wire format: just enough for the ttrpc envelope messages.

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5
_U64 = 1 << 64


def _varint(value: int) -> bytes:
    """Encode a non-negative int < 2**64 (negatives must already be two's-complemented)."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _int_field(number: int, value: int) -> bytes:
    """A varint field; negative int32/int64 values take ten bytes, as protobuf requires."""
    if value == 0:
        return b""
    return _tag(number, _VARINT) + _varint(value % _U64)


def _bytes_field(number: int, value: bytes, *, always: bool = False) -> bytes:
    """A length-delimited field; proto3 omits empty scalars, but a set submessage is kept."""
    if not value and not always:
        return b""
    return _tag(number, _LEN) + _varint(len(value)) + value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    if pos < len(data) and data[pos] < 0x80:
        return data[pos], pos + 1  # one byte: every tag, and every length below 128
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ProtocolError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise ProtocolError("varint too long")
    if result >= _U64:
        raise ProtocolError("varint overflows 64 bits")
    return result, pos


def _fields(data: bytes) -> "Iterator[tuple[int, int, int | bytes]]":
    """Yield (field number, wire type, value) for each field, validating framing only."""
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtocolError("field number 0")
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _LEN:
            length, pos = _read_varint(data, pos)
            if length > end - pos:
                raise ProtocolError("truncated length-delimited field")
            value = data[pos : pos + length]
            pos += length
        elif wire_type == _I64 or wire_type == _I32:
            size = 8 if wire_type == _I64 else 4
            if size > end - pos:
                raise ProtocolError("truncated fixed-width field")
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        else:
            # Groups (3, 4) are long deprecated and never appear in these messages.
            raise ProtocolError(f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def _str(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"string field is not valid UTF-8: {exc.reason}") from None


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


# --------------------------------------------------------------------------------------------
# Immutable values: what ``@dataclass(frozen=True)`` gave, without importing dataclasses.

_set = object.__setattr__


class _Record:
    """A frozen value: its fields are its ``__slots__`` (in ``__init__`` order), set once by
    ``__init__``; equal to a record of the same class with equal fields, hashable, with a
    dataclass-style repr."""

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self.__slots__])

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join([f"{name}={getattr(self, name)!r}" for name in self.__slots__])
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return type(self), self._values()


# --------------------------------------------------------------------------------------------
# Messages. A field whose wire type does not match is skipped, as protobuf treats it as unknown.


class Status(_Record):
    """google.rpc.Status. ``details`` are google.protobuf.Any as opaque (type_url, value)."""

    __slots__ = ("code", "message", "details")
    code: int
    message: str
    details: tuple[tuple[str, bytes], ...]

    def __init__(
        self, code: int = Code.OK, message: str = "", details: tuple[tuple[str, bytes], ...] = ()
    ) -> None:
        _set(self, "code", code)
        _set(self, "message", message)
        _set(self, "details", details)

    def encode(self) -> bytes:
        if not self.code and not self.message and not self.details:
            return b""  # OK: every field at its default
        # The message is human text: a stray surrogate must not stop an error being reported.
        message = self.message.encode("utf-8", "replace")
        out = [_int_field(1, self.code), _bytes_field(2, message)]
        for type_url, value in self.details:
            any_msg = _bytes_field(1, type_url.encode()) + _bytes_field(2, value)
            out.append(_bytes_field(3, any_msg, always=True))
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> "Status":
        code = 0
        message = ""
        details: list[tuple[str, bytes]] = []
        for number, wire_type, value in _fields(data):
            if number == 1 and wire_type == _VARINT:
                assert isinstance(value, int)
                code = _signed(value, 32)
            elif number == 2 and wire_type == _LEN:
                assert isinstance(value, bytes)
                message = _str(value)
            elif number == 3 and wire_type == _LEN:
                assert isinstance(value, bytes)
                details.append(_decode_any(value))
        return cls(code, message, tuple(details))

    @property
    def ok(self) -> bool:
        return self.code == Code.OK

    def to_error(self) -> TTRPCError:
        return TTRPCError(Code.from_wire(self.code), self.message, self.details)

    @classmethod
    def from_error(cls, error: TTRPCError) -> "Status":
        return cls(int(error.code), error.message, error.details)


def _decode_any(data: bytes) -> tuple[str, bytes]:
    type_url = ""
    value = b""
    for number, wire_type, item in _fields(data):
        if number == 1 and wire_type == _LEN:
            assert isinstance(item, bytes)
            type_url = _str(item)
        elif number == 2 and wire_type == _LEN:
            assert isinstance(item, bytes)
            value = item
    return type_url, value


class Request(_Record):
    """ttrpc.Request. ``metadata`` keeps wire order and repeats, since keys may be multi-valued."""

    __slots__ = ("service", "method", "payload", "timeout_nano", "metadata")
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]

    def __init__(
        self,
        service: str = "",
        method: str = "",
        payload: bytes = b"",
        timeout_nano: int = 0,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        _set(self, "service", service)
        _set(self, "method", method)
        _set(self, "payload", payload)
        _set(self, "timeout_nano", timeout_nano)
        _set(self, "metadata", metadata)

    def encode(self) -> bytes:
        out = [
            _bytes_field(1, self.service.encode()),
            _bytes_field(2, self.method.encode()),
            _bytes_field(3, self.payload),
            _int_field(4, self.timeout_nano),
        ]
        for key, value in self.metadata:
            kv = _bytes_field(1, key.encode()) + _bytes_field(2, value.encode())
            out.append(_bytes_field(5, kv, always=True))
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> "Request":
        service = method = ""
        payload = b""
        timeout_nano = 0
        metadata: list[tuple[str, str]] = []
        for number, wire_type, value in _fields(data):
            if wire_type == _VARINT:
                assert isinstance(value, int)
                if number == 4:
                    timeout_nano = _signed(value, 64)
                continue
            if wire_type != _LEN:
                continue
            assert isinstance(value, bytes)
            if number == 1:
                service = _str(value)
            elif number == 2:
                method = _str(value)
            elif number == 3:
                payload = value
            elif number == 5:
                metadata.append(_decode_key_value(value))
        return cls(service, method, payload, timeout_nano, tuple(metadata))


def _decode_key_value(data: bytes) -> tuple[str, str]:
    key = value = ""
    for number, wire_type, item in _fields(data):
        if wire_type != _LEN:
            continue
        assert isinstance(item, bytes)
        if number == 1:
            key = _str(item)
        elif number == 2:
            value = _str(item)
    return key, value


_OK = Status()


class Response(_Record):
    """ttrpc.Response. The status is always encoded (even OK), as Go's server does."""

    __slots__ = ("status", "payload")
    status: Status
    payload: bytes

    def __init__(self, status: Status = _OK, payload: bytes = b"") -> None:
        _set(self, "status", status)
        _set(self, "payload", payload)

    def encode(self) -> bytes:
        return _bytes_field(1, self.status.encode(), always=True) + _bytes_field(2, self.payload)

    @classmethod
    def decode(cls, data: bytes) -> "Response":
        # A repeated submessage field merges; decoding the concatenation is exactly that merge.
        status_parts: list[bytes] = []
        payload = b""
        for number, wire_type, value in _fields(data):
            if wire_type != _LEN:
                continue
            assert isinstance(value, bytes)
            if number == 1:
                status_parts.append(value)
            elif number == 2:
                payload = value
        return cls(Status.decode(b"".join(status_parts)), payload)


# --------------------------------------------------------------------------------------------
# Frames.


class FrameHeader(_Record):
    """The 10-byte big-endian frame header. ``type`` stays an int: unknown types are legal."""

    __slots__ = ("length", "stream_id", "type", "flags")
    length: int
    stream_id: int
    type: int
    flags: int

    def __init__(self, length: int, stream_id: int, type: int, flags: int = 0) -> None:
        _set(self, "length", length)
        _set(self, "stream_id", stream_id)
        _set(self, "type", type)
        _set(self, "flags", flags)

    def encode(self) -> bytes:
        # uint32 length, uint32 stream id, uint8 type, uint8 flags (what struct ">IIBB" does)
        return (
            self.length.to_bytes(4, "big")
            + self.stream_id.to_bytes(4, "big")
            + bytes((self.type, self.flags))
        )

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "FrameHeader":
        if len(data) != HEADER_SIZE:
            raise ProtocolError(f"frame header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(
            int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big"), data[8], data[9]
        )


def encode_frame(
    stream_id: int,
    type: int,
    payload: bytes,
    flags: int = 0,
    *,
    max_size: int = MAX_MESSAGE_SIZE,
) -> bytes:
    """Header plus payload; refuses an oversized payload, which the peer could only discard."""
    if len(payload) > max_size:
        raise MessageTooLargeError(len(payload), max_size)
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    return FrameHeader(len(payload), stream_id, type, flags).encode() + payload


class Frame(_Record):
    """A complete frame received."""

    __slots__ = ("stream_id", "type", "flags", "payload")
    stream_id: int
    type: int
    flags: int
    payload: bytes

    def __init__(self, stream_id: int, type: int, flags: int, payload: bytes) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "type", type)
        _set(self, "flags", flags)
        _set(self, "payload", payload)


class OversizedFrame(_Record):
    """A frame over the size limit was announced; its payload is being skipped, not stored."""

    __slots__ = ("stream_id", "type", "flags", "length")
    stream_id: int
    type: int
    flags: int
    length: int

    def __init__(self, stream_id: int, type: int, flags: int, length: int) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "type", type)
        _set(self, "flags", flags)
        _set(self, "length", length)


FrameEvent = Frame | OversizedFrame


class FrameDecoder:
    """Turns a byte stream, split anywhere, into frames.

    Memory is bounded by one frame: an oversized frame is reported as soon as its header is
    seen and its payload is then dropped as it arrives, never buffered.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max_size = max_size
        self._buffer = bytearray()
        self._header: FrameHeader | None = None
        self._discard = 0

    @property
    def mid_frame(self) -> bool:
        """True if a frame has started but not finished: EOF now means a truncated frame."""
        return bool(self._buffer) or self._header is not None or self._discard > 0

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress."""
        return len(self._buffer)

    @property
    def discarding(self) -> int:
        """Payload bytes of an already-reported oversized frame still to be skipped."""
        return self._discard

    def unconsumed(self) -> bytes:
        """The bytes fed so far that are not yet part of a complete frame, as received.

        Feeding them to a fresh decoder (after :meth:`skip` of :attr:`discarding`) puts it in
        exactly this decoder's state, which is how a connection moves to another process.
        While an oversized frame is being skipped nothing is buffered, so this is empty.
        """
        if self._header is None:
            return bytes(self._buffer)
        return self._header.encode() + bytes(self._buffer)

    def release(self) -> None:
        """Forget the frame in progress and give its memory back (the stream is over)."""
        self._buffer = bytearray()
        self._header = None
        self._discard = 0

    def skip(self, count: int) -> None:
        """Discard the next ``count`` bytes: the rest of an oversized frame, already reported.

        Only for restoring a decoder's state, so only allowed between frames.
        """
        if count < 0:
            raise ValueError(f"cannot skip {count} bytes")
        if self.mid_frame and count:
            raise ValueError("skip() in the middle of a frame")
        self._discard = count

    def feed(self, data: bytes) -> list[FrameEvent]:
        if self._buffer or self._header is not None or self._discard:
            return self._feed(data)
        # Between frames, as nearly every read begins: whole frames straight from ``data``,
        # the rest (a part, an oversized one) buffered the general way.
        events: list[FrameEvent] = []
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE:
            length = int.from_bytes(data[pos : pos + 4], "big")
            start = pos + HEADER_SIZE
            if length > self._max_size or end - start < length:
                break
            stream_id = int.from_bytes(data[pos + 4 : pos + 8], "big")
            payload = bytes(data[start : start + length])
            events.append(Frame(stream_id, data[pos + 8], data[pos + 9], payload))
            pos = start + length
        if pos < end:
            events += self._feed(data[pos:])
        return events

    def _feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        buf = self._buffer
        buf += data
        pos = 0
        while True:
            if self._discard:
                skip = min(self._discard, len(buf) - pos)
                self._discard -= skip
                pos += skip
                if self._discard:
                    break
            header = self._header
            if header is None:
                if len(buf) - pos < HEADER_SIZE:
                    break
                header = FrameHeader.decode(memoryview(buf)[pos : pos + HEADER_SIZE])
                pos += HEADER_SIZE
                if header.length > self._max_size:
                    events.append(
                        OversizedFrame(header.stream_id, header.type, header.flags, header.length)
                    )
                    self._discard = header.length
                    continue
                self._header = header
            if len(buf) - pos < header.length:
                break
            payload = bytes(buf[pos : pos + header.length])
            pos += header.length
            self._header = None
            events.append(Frame(header.stream_id, header.type, header.flags, payload))
        del buf[:pos]
        return events


# --------------------------------------------------------------------------------------------
# Connection state machines.


class RequestReceived(_Record):
    """A well-formed unary request the server should dispatch."""

    __slots__ = ("stream_id", "request")
    stream_id: int
    request: Request

    def __init__(self, stream_id: int, request: Request) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "request", request)


class RequestRejected(_Record):
    """A request the protocol layer already refused; answer ``stream_id`` with ``status``."""

    __slots__ = ("stream_id", "status")
    stream_id: int
    status: Status

    def __init__(self, stream_id: int, status: Status) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "status", status)


ServerEvent = RequestReceived | RequestRejected


class ServerConnectionState(_Record):
    """What a :class:`ServerConnection` must remember to continue on another instance.

    ``unread`` holds bytes received but not yet part of a complete frame, ``discard`` the
    rest of an oversized frame still to be skipped (its rejection has been produced), and
    ``last_stream_id`` keeps the stream-id ordering check going.
    """

    __slots__ = ("last_stream_id", "unread", "discard")
    last_stream_id: int
    unread: bytes
    discard: int

    def __init__(self, last_stream_id: int = 0, unread: bytes = b"", discard: int = 0) -> None:
        _set(self, "last_stream_id", last_stream_id)
        _set(self, "unread", unread)
        _set(self, "discard", discard)


class ServerConnection:
    """Server side of one connection: validates stream ids and decodes requests.

    Rules follow Go's ttrpc server: client streams are odd and strictly increasing, a bad id or
    a bad Request is answered on that stream only, unknown frame types are ignored.
    Streaming (request flags set, Data frames) is not supported; the Task API is unary.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._decoder = FrameDecoder(max_size)
        self._max_size = max_size
        self._last_stream_id = 0

    @property
    def mid_frame(self) -> bool:
        return self._decoder.mid_frame

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (what a slow or stalled peer costs us)."""
        return self._decoder.buffered

    def release(self) -> None:
        """The connection is gone: drop any unfinished frame now, not when collected."""
        self._decoder.release()

    @property
    def last_stream_id(self) -> int:
        """The highest stream id accepted so far (0 before the first request)."""
        return self._last_stream_id

    def export_state(self) -> ServerConnectionState:
        """Everything needed to continue this connection elsewhere; see :meth:`restore_state`.

        Requests already returned as events are the caller's to carry over.
        """
        return ServerConnectionState(
            self._last_stream_id, self._decoder.unconsumed(), self._decoder.discarding
        )

    def restore_state(self, state: ServerConnectionState) -> list[ServerEvent]:
        """Continue from ``state`` on a connection that has not received anything yet.

        Returns the events of feeding ``state.unread`` again; normally none, since it holds no
        complete frame, but a decoder with a different size limit may see things differently.
        """
        if self._last_stream_id or self._decoder.mid_frame:
            raise ValueError("restore_state() on a connection already in use")
        if not 0 <= state.last_stream_id <= MAX_STREAM_ID:
            raise ValueError(f"stream id {state.last_stream_id} out of range")
        self._last_stream_id = state.last_stream_id
        self._decoder.skip(state.discard)
        return self.receive_data(state.unread)

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        for frame in self._decoder.feed(data):
            if isinstance(frame, OversizedFrame):
                status = Status(
                    Code.RESOURCE_EXHAUSTED, oversize_message(frame.length, self._max_size)
                )
                events.append(RequestRejected(frame.stream_id, status))
            elif frame.type == MessageType.REQUEST:
                events.append(self._on_request(frame))
        return events

    def _on_request(self, frame: Frame) -> ServerEvent:
        sid = frame.stream_id
        if sid % 2 == 0:
            return _reject(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        if sid <= self._last_stream_id:
            return _reject(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_stream_id = sid
        if frame.flags & (Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED):
            return _reject(sid, Code.UNIMPLEMENTED, "streaming requests are not supported")
        try:
            request = Request.decode(frame.payload)
        except ProtocolError as exc:
            return _reject(sid, Code.INVALID_ARGUMENT, f"invalid request: {exc}")
        return RequestReceived(sid, request)

    def send_response(self, stream_id: int, response: Response) -> bytes:
        """Bytes to write; raises MessageTooLargeError if the response cannot be sent."""
        return encode_frame(
            stream_id, MessageType.RESPONSE, response.encode(), max_size=self._max_size
        )


def _reject(stream_id: int, code: Code, message: str) -> RequestRejected:
    return RequestRejected(stream_id, Status(code, message))


class ResponseReceived(_Record):
    """The answer for ``stream_id``; a local failure (oversize, undecodable) is a status too."""

    __slots__ = ("stream_id", "response")
    stream_id: int
    response: Response

    def __init__(self, stream_id: int, response: Response) -> None:
        _set(self, "stream_id", stream_id)
        _set(self, "response", response)


class ClientConnection:
    """Client side of one connection: allocates stream ids and decodes responses."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._decoder = FrameDecoder(max_size)
        self._max_size = max_size
        self._next_stream_id = 1

    @property
    def mid_frame(self) -> bool:
        return self._decoder.mid_frame

    def send_request(self, request: Request) -> tuple[int, bytes]:
        """Allocate the next stream id and frame the request.

        The id is taken only once the request is known to fit, so a refused send leaves no gap;
        the caller must write the bytes before framing another request, or ids arrive out of
        order and the server rejects them.
        """
        payload = request.encode()
        if len(payload) > self._max_size:
            raise MessageTooLargeError(len(payload), self._max_size)
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise TTRPCError(Code.RESOURCE_EXHAUSTED, "stream ids exhausted on this connection")
        self._next_stream_id += 2
        return stream_id, encode_frame(stream_id, MessageType.REQUEST, payload)

    def receive_data(self, data: bytes) -> list[ResponseReceived]:
        events: list[ResponseReceived] = []
        for frame in self._decoder.feed(data):
            if isinstance(frame, OversizedFrame):
                status = Status(
                    Code.RESOURCE_EXHAUSTED, oversize_message(frame.length, self._max_size)
                )
                events.append(ResponseReceived(frame.stream_id, Response(status)))
            elif frame.type == MessageType.RESPONSE:
                try:
                    response = Response.decode(frame.payload)
                except ProtocolError as exc:
                    response = Response(Status(Code.INTERNAL, f"invalid response: {exc}"))
                events.append(ResponseReceived(frame.stream_id, response))
        return events
