"""Asyncio ttrpc client: many concurrent unary calls over one unix-socket connection.

Like Go's client, a lost connection fails every pending call with :class:`ClosedError` and then
runs the ``on_close`` callback once, which is how a caller notices that its peer went away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

from .codec import ClientConnection, Request, Response, parse_address
from .errors import ClosedError, Code, TTRPCError

__all__ = ["Client"]

logger = logging.getLogger(__package__ or "ttrpc")


class Client:
    """A connection to a ttrpc server; use :meth:`connect` to make one."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: _ClientProtocol,
    ) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def connect(cls, address: str, *, on_close: Callable[[], object] | None = None) -> Client:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_unix_connection(
            lambda: _ClientProtocol(on_close), parse_address(address)
        )
        return cls(transport, protocol)

    @property
    def closed(self) -> bool:
        return self._protocol.lost.done()

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> bytes:
        """Make one unary call and return the response payload.

        Raises TTRPCError for a non-OK status (DEADLINE_EXCEEDED when ``timeout`` passes first,
        RESOURCE_EXHAUSTED for a request over the size limit) and ClosedError if the
        connection is or becomes unusable.
        """
        pairs: list[tuple[str, str]] = []
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                pairs.append((key.lower(), value))
        timeout_nano = 0
        if timeout is not None:
            # A zero nano timeout means "none" on the wire; never turn a tiny one into that.
            timeout_nano = max(1, int(timeout * 1e9))
        request = Request(service, method, bytes(payload), timeout_nano, tuple(pairs))
        try:
            async with asyncio.timeout(timeout):
                response = await self._protocol.call(request)
        except TimeoutError:
            raise TTRPCError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from None
        if not response.status.ok:
            raise response.status.to_error()
        return response.payload

    async def close(self) -> None:
        """Close the connection; pending calls fail with ClosedError."""
        self._transport.close()
        await asyncio.shield(self._protocol.lost)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, on_close: Callable[[], object] | None) -> None:
        self._conn = ClientConnection()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._on_close = on_close
        self._writable = asyncio.Event()
        self._writable.set()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        for event in self._conn.receive_data(data):
            future = self._pending.pop(event.stream_id, None)
            if future is None:
                # The caller gave up (timeout, cancellation); Go logs and drops these too.
                logger.debug("ttrpc response for unknown stream %d dropped", event.stream_id)
            elif not future.done():
                future.set_result(event.response)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ClosedError())
        self._writable.set()  # wake writers so they see the closed state
        if not self.lost.done():
            self.lost.set_result(None)
        if self._on_close is not None:
            try:
                self._on_close()
            except Exception:
                logger.exception("ttrpc on_close callback failed")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def call(self, request: Request) -> Response:
        # Wait for room first: id allocation and the write must then happen with no await in
        # between, or a later id could reach the wire first and the server would reject it.
        while not self._writable.is_set():
            await self._writable.wait()
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClosedError()
        stream_id, data = self._conn.send_request(request)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        transport.write(data)
        try:
            return await future
        finally:
            self._pending.pop(stream_id, None)
