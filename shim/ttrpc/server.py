"""Asyncio ttrpc server over unix sockets.

A thin shell around :class:`~.codec.ServerConnection`: each request runs as its own task and
its response is written as soon as it is ready, so a slow handler never holds up the others.
The server must outlive anything a handler or a peer does: handler exceptions become statuses,
a bad connection is dropped alone, and each connection's memory is bounded by pausing reads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .codec import (
    MAX_MESSAGE_SIZE,
    RequestReceived,
    Response,
    ServerConnection,
    Status,
    oversize_message,
    parse_address,
)
from .errors import Code, MessageTooLargeError, TTRPCError

__all__ = ["AcceptFilter", "Context", "Handler", "PeerCred", "Server", "require_same_user"]

logger = logging.getLogger(__package__ or "ttrpc")

_UCRED = struct.Struct("iII")  # struct ucred: pid_t, uid_t, gid_t


class PeerCred(NamedTuple):
    """The connecting process as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass
class Context:
    """What a handler knows about its call besides the payload.

    ``deadline`` is in the event loop's clock (``loop.time()``), or None when the client set
    no timeout; the server enforces it by cancelling the handler.
    """

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    deadline: float | None = None
    peer: PeerCred | None = None
    stream_id: int = 0
    #: State shared by every call on the same connection (a handler may remember what it
    #: learned about the peer, e.g. which tenant the connection serves).
    connection: dict[str, object] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        """First value of a metadata key (keys are case-insensitive), or None."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None


Handler = Callable[[Context, bytes], Awaitable[bytes]]
AcceptFilter = Callable[[PeerCred | None], bool]


def require_same_user(peer: PeerCred | None) -> bool:
    """Accept filter admitting only our own euid/egid, like containerd's Go shims do."""
    return peer is not None and peer.uid == os.geteuid() and peer.gid == os.getegid()


def _peer_cred(sock: socket.socket | None) -> PeerCred | None:
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return PeerCred(*_UCRED.unpack(raw))


class Server:
    """Serves registered services on one listening unix socket.

    ``max_in_flight`` and ``max_in_flight_bytes`` bound each connection: past either, the
    server stops reading that connection until handlers finish. Reading also stops while the
    peer is not reading our responses.

    A handler is not cancelled when its peer disconnects: a shim that has begun creating a
    container must finish its bookkeeping whether or not anyone waits for the answer. Only
    its deadline and :meth:`close` cancel it.
    """

    def __init__(
        self,
        *,
        accept_filter: AcceptFilter | None = None,
        max_in_flight: int = 128,
        max_in_flight_bytes: int = 4 * MAX_MESSAGE_SIZE,
    ) -> None:
        self.accept_filter = accept_filter
        self._max_in_flight = max_in_flight
        self._max_in_flight_bytes = max_in_flight_bytes
        self._services: dict[str, dict[str, Handler]] = {}
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._unlink: tuple[str, int, int] | None = None
        self._connections: set[_ServerProtocol] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = asyncio.Event()

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        """Add methods to a service; registering one method twice is a programming error."""
        table = self._services.setdefault(service, {})
        for name in methods:
            if name in table:
                raise ValueError(f"{service}/{name} is already registered")
        table.update(methods)

    @property
    def listening_socket(self) -> socket.socket | None:
        return self._sock

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start_unix(self, path: str, mode: int = 0o600) -> None:
        """Bind and listen on ``path`` and chmod it to ``mode``; see :func:`parse_address`.

        An existing file at ``path`` is not removed: deciding that a socket is stale is the
        caller's business. The socket file is unlinked again by :meth:`close`.
        """
        if self._server is not None or self._closing:
            raise RuntimeError("server already started or closed")
        address = parse_address(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            if not address.startswith("\0"):
                st = os.stat(address)
                self._unlink = (address, st.st_dev, st.st_ino)
                os.chmod(address, mode)
            sock.listen(128)
        except BaseException:
            sock.close()
            if self._unlink is not None:
                self._remove_socket_file()
            raise
        await self.start_sock(sock)

    async def start_sock(self, sock: socket.socket) -> None:
        """Serve on an already-listening socket, e.g. one inherited across exec."""
        if self._server is not None or self._closing:
            raise RuntimeError("server already started or closed")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerProtocol(self), sock=sock)
        self._sock = sock

    async def close(self) -> None:
        """Stop accepting, drop every connection and cancel the handlers still running."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            self._remove_socket_file()
            for conn in list(self._connections):
                conn.abort()
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _remove_socket_file(self) -> None:
        # Only unlink the file we created: a successor may have bound the same path since.
        if self._unlink is None:
            return
        path, dev, ino = self._unlink
        self._unlink = None
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)

    def _admit(self, peer: PeerCred | None) -> bool:
        if self._closing:
            return False
        if self.accept_filter is None:
            return True
        try:
            return bool(self.accept_filter(peer))
        except Exception:
            logger.exception("ttrpc accept filter failed; dropping connection from %s", peer)
            return False

    async def _dispatch(self, ctx: Context, payload: bytes) -> Response:
        """Run the handler and turn whatever happens into a Response."""
        methods = self._services.get(ctx.service)
        if methods is None:
            return _error(Code.UNIMPLEMENTED, f"service {ctx.service}")
        handler = methods.get(ctx.method)
        if handler is None:
            return _error(Code.UNIMPLEMENTED, f"method {ctx.method}")
        timeout_cm = asyncio.timeout_at(ctx.deadline)
        try:
            async with timeout_cm:
                result = await handler(ctx, payload)
        except TTRPCError as exc:
            return Response(Status.from_error(exc))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled (server closing): no answer
            return _error(Code.CANCELLED, "context canceled")
        except Exception as exc:
            if isinstance(exc, TimeoutError) and timeout_cm.expired():
                return _error(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
            logger.exception("ttrpc handler %s/%s failed", ctx.service, ctx.method)
            return _error(Code.UNKNOWN, str(exc) or type(exc).__name__)
        if not isinstance(result, bytes | bytearray | memoryview):
            logger.error(
                "ttrpc handler %s/%s returned %s, not bytes",
                ctx.service,
                ctx.method,
                type(result).__name__,
            )
            return _error(Code.INTERNAL, "handler returned no response bytes")
        return Response(Status(), bytes(result))


def _error(code: Code, message: str) -> Response:
    return Response(Status(code, message))


class _ServerProtocol(asyncio.Protocol):
    """One accepted connection."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._conn = ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._peer: PeerCred | None = None
        self._state: dict[str, object] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests decoded while at the in-flight limit; at most one read's worth.
        self._backlog: collections.deque[RequestReceived] = collections.deque()
        self._in_flight_bytes = 0
        self._write_paused = False
        self._read_paused = False

    # asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = _peer_cred(transport.get_extra_info("socket"))
        if not self._server._admit(self._peer):
            logger.warning("ttrpc connection from %s refused", self._peer)
            transport.abort()
            return
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        for event in self._conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self._backlog.append(event)
            else:
                self._write(event.stream_id, Response(event.status))
        self._start_backlog()
        self._update_reading()

    def eof_received(self) -> bool | None:
        if self._conn.mid_frame:
            logger.debug("ttrpc peer %s closed mid-frame", self._peer)
        return None  # close our side; handlers' answers are dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None
        # Requests not yet started are dropped; running handlers finish, unanswered.
        self._backlog.clear()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # internals --------------------------------------------------------------------------

    def abort(self) -> None:
        """Drop the connection now; requests not yet started are forgotten."""
        self._backlog.clear()
        if self._transport is not None:
            self._transport.abort()

    def _at_limit(self) -> bool:
        return (
            len(self._tasks) >= self._server._max_in_flight
            or self._in_flight_bytes >= self._server._max_in_flight_bytes
        )

    def _start_backlog(self) -> None:
        while self._backlog and not self._at_limit():
            self._start(self._backlog.popleft())

    def _start(self, event: RequestReceived) -> None:
        request = event.request
        metadata: dict[str, list[str]] = {}
        for key, value in request.metadata:
            metadata.setdefault(key.lower(), []).append(value)
        deadline = None
        loop = asyncio.get_running_loop()
        if request.timeout_nano > 0:
            deadline = loop.time() + request.timeout_nano / 1e9
        ctx = Context(
            service=request.service,
            method=request.method,
            metadata=metadata,
            deadline=deadline,
            peer=self._peer,
            stream_id=event.stream_id,
            connection=self._state,
        )
        size = len(request.payload)
        self._in_flight_bytes += size
        task = loop.create_task(self._serve(ctx, request.payload, size))
        self._tasks.add(task)
        self._server._handlers.add(task)

    async def _serve(self, ctx: Context, payload: bytes, size: int) -> None:
        try:
            response = await self._server._dispatch(ctx, payload)
            self._write(ctx.stream_id, response)
        finally:
            self._in_flight_bytes -= size
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
                self._server._handlers.discard(task)
            if self._transport is not None:
                self._start_backlog()
            self._update_reading()

    def _write(self, stream_id: int, response: Response) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            data = self._conn.send_response(stream_id, response)
        except MessageTooLargeError as exc:
            logger.error("ttrpc response on stream %d too large: %s", stream_id, exc.message)
            status = Status(Code.RESOURCE_EXHAUSTED, oversize_message(exc.length, exc.limit))
            data = self._conn.send_response(stream_id, Response(status))
        transport.write(data)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        busy = self._write_paused or bool(self._backlog) or self._at_limit()
        if busy and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not busy and self._read_paused:
            self._read_paused = False
            transport.resume_reading()
