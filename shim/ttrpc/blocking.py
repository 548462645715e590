"""A blocking, one-call-at-a-time ttrpc client for short-lived command-line processes.

The ``start`` and ``delete`` subcommands make one or two calls and exit; they should not pay
for importing asyncio.  This runs the same sans-IO codec over a plain blocking socket: a
``_socket.socket``, since the ``socket`` module imports enum and selectors (about 40M
instructions, more than the rest of such a process).
"""

import _socket

from .codec import (
    Frame,
    FrameDecoder,
    MessageType,
    Request,
    Response,
    encode_frame,
    parse_address,
)
from .errors import ClosedError


class BlockingClient:
    def __init__(self, address: str, timeout: float = 5.0) -> None:
        path = parse_address(address)
        self._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError:
            self._sock.close()
            raise
        self._decoder = FrameDecoder()
        self._next_stream = 1

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "BlockingClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One unary call; raises TTRPCError for a non-OK status, ClosedError on EOF."""
        stream = self._next_stream
        self._next_stream += 2
        if timeout is not None:
            self._sock.settimeout(timeout)
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=max(1, int(timeout * 1e9)) if timeout else 0,
            metadata=tuple((metadata or {}).items()),
        )
        self._sock.sendall(encode_frame(stream, MessageType.REQUEST, request.encode()))
        while True:
            data = self._sock.recv(65536)
            if not data:
                raise ClosedError("ttrpc: closed")
            for event in self._decoder.feed(data):
                if isinstance(event, Frame) and event.stream_id == stream:
                    response = Response.decode(event.payload)
                    if not response.status.ok:
                        raise response.status.to_error()
                    return response.payload
