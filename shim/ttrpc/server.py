"""Asyncio ttrpc server over unix sockets.

A thin shell around :class:`~.codec.ServerConnection`: each request runs as its own task and
its response is written as soon as it is ready, so a slow handler never holds up the others.
The server must outlive anything a handler or a peer does: handler exceptions become statuses,
a bad connection is dropped alone, and each connection's memory is bounded by pausing reads.
A peer that starts a frame and never finishes it (slow-loris) is dropped after
``frame_timeout``, and the partial frames of all peers together stay under
``max_buffered_bytes`` (the connections holding the most are dropped first).

A live server can be handed over to another process, normally the same one after exec(), with
its peers noticing nothing: :meth:`Server.quiesce`, :meth:`Server.handoff`, then
:meth:`Server.adopt` on the other side (see :mod:`.handoff` for what crosses over).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import json
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .codec import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    FrameHeader,
    MessageType,
    Request,
    RequestReceived,
    RequestRejected,
    Response,
    ServerConnection,
    ServerConnectionState,
    Status,
    encode_frame,
    oversize_message,
    parse_address,
)
from .errors import Code, MessageTooLargeError, TTRPCError
from .handoff import ConnectionHandoff, PendingCall, ServerHandoff
from .journal import Journal, JournaledCall

__all__ = [
    "AcceptFilter",
    "ConnectionHandoff",
    "Context",
    "Handler",
    "PeerCred",
    "PendingCall",
    "Server",
    "ServerHandoff",
    "require_same_user",
]

logger = logging.getLogger(__package__ or "ttrpc")

_UCRED = struct.Struct("iII")  # struct ucred: pid_t, uid_t, gid_t

#: Connections accepted per wake-up of the listening socket, as asyncio's own servers do.
_ACCEPT_BATCH = 128
#: After running out of descriptors (EMFILE and kin), how long to stop accepting.
_ACCEPT_RETRY_DELAY = 1.0

#: How long a peer may take to finish a frame it has started (while we are reading it).
FRAME_TIMEOUT = 30.0
#: Bytes of unfinished frames held for all connections together.
MAX_BUFFERED_BYTES = 16 * MAX_MESSAGE_SIZE

#: Journaled connections take a request out of the socket only once it is whole and written to
#: the journal; a frame larger than this is read as it comes instead (a unix socket queues only
#: what the sender's buffer holds, about 200 KiB by default), and is the one kind of request a
#: crash in the middle of its arrival can cost (its connection is then dropped).
PEEK_FRAME_MAX = 64 << 10
_PEEK_BYTES = PEEK_FRAME_MAX + HEADER_SIZE

#: How long :meth:`Server.quiesce` gives cancelled handlers to unwind and the last responses
#: to reach the kernel once its ``timeout`` is used up.
QUIESCE_GRACE = 1.0


class PeerCred(NamedTuple):
    """The connecting process as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


class PeerGone(asyncio.Event):
    """Set once a connection is gone; :meth:`when_set` also calls back then, so that a
    handler can wait for its own result and its peer's departure at once without a task
    per wait."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def when_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the loop) once set, or soon if set already; returns what
        forgets it."""
        if self.is_set():
            asyncio.get_running_loop().call_soon(callback)
            return _nothing
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            asyncio.get_running_loop().call_soon(callback)


def _nothing() -> None:
    pass


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
    #: learned about the peer, e.g. which tenant the connection serves). It survives a
    #: :meth:`Server.handoff` as JSON, so keep it to JSON types (str keys).
    connection: dict[str, object] = field(default_factory=dict)
    #: Set once the connection is gone. Handlers are not cancelled when their peer leaves
    #: (see :class:`Server`); one that only waits on the peer's behalf may watch this.
    gone: PeerGone = field(default_factory=PeerGone)
    #: The call was found in the journal of a server that died while running it: its handler
    #: may have done some or all of its work already, and the peer may even have its answer.
    replayed: bool = False

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
    its deadline, :meth:`close` and :meth:`quiesce` cancel it.

    ``frame_timeout`` (seconds, None for none) drops a peer that has begun a frame and not
    finished it in that time, counted only while the server is reading from it.
    ``max_buffered_bytes`` bounds the unfinished frames held for all peers together: past
    it, the connections holding the most are dropped until the total fits again.

    With a ``journal``, connections given to :meth:`serve_kept` (sockets another process holds
    duplicates of, so that they outlive this one) are read crash-safely: each request is
    written to the journal before it leaves the socket and removed once answered, and
    :meth:`serve_kept` takes back what a dead predecessor left there.  The answers of the
    ``repeatable`` methods ((service, method) pairs a successor can simply run again) are not
    journaled; every other answer is, so that a successor sends it again
    instead of running the request twice.
    """

    def __init__(
        self,
        *,
        accept_filter: AcceptFilter | None = None,
        max_in_flight: int = 128,
        max_in_flight_bytes: int = 4 * MAX_MESSAGE_SIZE,
        frame_timeout: float | None = FRAME_TIMEOUT,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
        journal: Journal | None = None,
        repeatable: Collection[tuple[str, str]] = (),
    ) -> None:
        self.accept_filter = accept_filter
        self.journal = journal
        self._repeatable = frozenset(repeatable)
        # Journaled connections are read by us, not by asyncio: one edge-triggered epoll for
        # all of them, itself watched by the loop (a frame that is not whole yet must not
        # make its socket look readable again and again).
        self._epoll: select.epoll | None = None
        self._peekers: dict[int, _ServerProtocol] = {}
        self._peek_buffer = bytearray(_PEEK_BYTES) if journal is not None else bytearray()
        self._max_in_flight = max_in_flight
        self._max_in_flight_bytes = max_in_flight_bytes
        self._frame_timeout = frame_timeout
        self._max_buffered = max_buffered_bytes
        self._buffered = 0  # sum of every connection's unfinished-frame bytes
        #: Connections dropped for not finishing a frame in time or for holding too much.
        self.dropped_connections = 0
        self._services: dict[str, dict[str, Handler]] = {}
        # Our own accept loop, not asyncio's Server: that one drops a socket accepted just
        # before its close() (3.11 asserts in Server._attach), and quiesce() must not.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._accepting = False  # the listening socket is registered with the loop
        # Accepted sockets on their way to connection_made().
        self._accept_tasks: set[asyncio.Task[None]] = set()
        self._unlink: tuple[str, int, int] | None = None
        self._connections: set[_ServerProtocol] = set()
        self._handlers: dict[asyncio.Task[None], _ServerProtocol] = {}
        self._closing = False
        self._hold_only = False
        self._closed = asyncio.Event()
        self._quiescing = False
        self._quiesced = False
        self._handed_off = False

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

    @property
    def buffered_bytes(self) -> int:
        """Bytes of unfinished frames held for all connections now."""
        return self._buffered

    async def start_unix(self, path: str, mode: int = 0o600) -> None:
        """Bind and listen on ``path`` and chmod it to ``mode``; see :func:`parse_address`.

        An existing file at ``path`` is not removed: deciding that a socket is stale is the
        caller's business. The socket file is unlinked again by :meth:`close`.
        """
        if self._sock is not None or self._closing or self._quiescing:
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

    async def start_sock(self, sock: socket.socket, *, accept: bool = True) -> None:
        """Serve on an already-listening socket, e.g. one inherited across exec.

        With ``accept=False`` the socket is only held (someone else accepts on it and passes
        the connections to :meth:`serve_kept`) until :meth:`accept_now`."""
        if self._sock is not None or self._closing or self._quiescing:
            raise RuntimeError("server already started or closed")
        sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._hold_only = not accept
        if accept:
            self._start_accepting()

    def accept_now(self) -> None:
        """Start accepting on a socket :meth:`start_sock` was told only to hold."""
        self._hold_only = False
        self._start_accepting()

    async def serve_kept(
        self,
        fd: int,
        key: int,
        *,
        journaled: list[JournaledCall] | None = None,
        state: dict[str, object] | None = None,
    ) -> None:
        """Serve a connection accepted elsewhere, known there as ``key``.

        A fresh one goes through the accept filter.  One that a dead predecessor served
        (``journaled`` is what its journal holds for ``key``, maybe nothing; ``state`` its
        connection state) is not: the calls in ``journaled`` are run again, marked
        :attr:`Context.replayed`, and their copies still in the socket are skipped.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            logger.error("ttrpc kept connection %d unusable: %s", key, exc)
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        if journaled is None and state is None:
            await self._connect(sock, None, key)
            return
        if self.journal is not None and key in self.journal.broken():
            # A predecessor died in the middle of a frame: nobody can find the next one.
            logger.error("ttrpc kept connection %d was left mid-frame; closing it", key)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            self.journal.forget_connection(key)
            return
        pending = [_pending_from_journal(c) for c in journaled or () if c.answer is None]
        adopted = ConnectionHandoff(
            fd, b"", 0, dict(state or {}), [p for p in pending if p is not None], key=key
        )
        adopted.answers = [(c.stream_id, c.answer) for c in journaled or () if c.answer]
        skip = max((call.stream_id for call in journaled or ()), default=0)
        await self._connect(sock, adopted, key, skip)

    async def close(self) -> None:
        """Stop accepting, drop every connection and cancel the handlers still running."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            self._stop_accepting()
            if self._sock is not None:
                self._sock.close()
            self._remove_socket_file()
            accepting = list(self._accept_tasks)
            for task in accepting:
                task.cancel()
            if accepting:
                await asyncio.gather(*accepting, return_exceptions=True)
            for conn in list(self._connections):
                conn.abort()
            self._close_epoll()
            handlers = list(self._handlers)
            for task in handlers:
                task.cancel()
            if handlers:
                await asyncio.gather(*handlers, return_exceptions=True)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        """Return once :meth:`close` has finished."""
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Handing the server over ---------------------------------------------------------------

    async def quiesce(self, *, keep: Callable[[Context], bool], timeout: float = 10.0) -> None:
        """Bring the server to rest so that :meth:`handoff` can pass it on; peers see nothing.

        Stops accepting (connections wait in the listen backlog) and stops reading every
        connection: requests that arrive from now on stay in the kernel's socket buffers for
        whoever adopts the connection. Requests already read but not started (the server was
        at its in-flight limit) are not started; they become pending calls.

        Then waits until every running handler has finished and its response has been
        written to the socket, except handlers for which ``keep(ctx)`` is true (a long
        ``Wait``, say): those are cancelled at once, without answering, and recorded as
        pending, to be run again by the adopting server. ``keep`` is asked once per handler
        running when quiesce starts; if it raises, the handler is not kept.

        Handlers still running after ``timeout`` seconds are treated like kept ones: cancelled
        and run again after the handoff, so a handler that is not idempotent may have done
        part of its work twice. Cancelled handlers then get up to :data:`QUIESCE_GRACE`
        seconds to unwind; one that ignores cancellation keeps running here but its answer is
        never sent (the adopter's is).

        A response the peer does not take within the same bounds cannot be handed over (the
        new process would interleave its own frames with the rest of it): that connection is
        closed instead, and its peer sees its calls fail. A kept handler whose peer has
        already disconnected is simply cancelled.

        After quiesce, :meth:`handoff` (or :meth:`close`) is the only thing left to do.
        """
        if self._closing or self._quiescing:
            raise RuntimeError("server already closed or quiesced")
        self._quiescing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stop_accepting()
        for conn in list(self._connections):
            conn.quiesce()
        # Sockets already accepted are quiesced as their connection_made() runs.
        if self._accept_tasks:
            await asyncio.wait(self._accept_tasks, timeout=max(0.0, deadline - loop.time()))

        for task, conn in list(self._handlers.items()):
            ctx = conn.context_of(task)
            if ctx is not None and self._keep(keep, ctx):
                conn.abandon(task)
        running = set(self._handlers)
        if running:
            await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
        late = [
            task
            for task, conn in self._handlers.items()
            if not task.done() and not conn.abandoned(task)
        ]
        for task in late:
            ctx = self._handlers[task].context_of(task)
            logger.warning(
                "ttrpc handler %s/%s still running after %.1fs: cancelled, to be run again "
                "after the handoff",
                ctx.service if ctx else "?",
                ctx.method if ctx else "?",
                timeout,
            )
            self._handlers[task].abandon(task)
        grace = max(deadline, loop.time() + QUIESCE_GRACE)
        unwinding = [task for task in self._handlers if not task.done()]
        if unwinding:
            await asyncio.wait(unwinding, timeout=max(0.0, grace - loop.time()))
            for task in unwinding:
                if not task.done():
                    logger.error("ttrpc handler ignores cancellation; its answer is dropped")

        conns = list(self._connections)
        drained = await asyncio.gather(*(conn.drain(grace) for conn in conns))
        for conn, ok in zip(conns, drained, strict=True):
            if not ok and conn.live:
                logger.error(
                    "ttrpc peer %s did not take its responses in time; closing the "
                    "connection instead of handing it over",
                    conn.peer,
                )
                conn.abort()
        self._quiesced = True

    def handoff(self) -> ServerHandoff:
        """Pass the quiesced server on: what :meth:`adopt` needs, with inheritable fds.

        Duplicates every socket as an inheritable descriptor (no CLOEXEC, so it survives
        exec()), then drops this server's transports without shutting the sockets down: the
        duplicates keep the connections open, and the peers notice nothing. The server is
        unusable afterwards (:meth:`close` is a no-op) and no longer removes its socket file;
        the adopter does. Raises TypeError, before touching anything, if a connection's
        state (:attr:`Context.connection`) is not JSON-serialisable.

        If the exec fails, hand the result to ``Server().adopt()`` in this same process.
        """
        if not self._quiesced:
            raise RuntimeError("handoff() needs a completed quiesce()")
        if self._handed_off or self._closing:
            raise RuntimeError("server already handed off or closed")
        conns = [conn for conn in self._connections if conn.live]
        for conn in conns:
            try:
                json.dumps(conn.state, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"ttrpc connection state is not JSON-serialisable: {exc}") from exc

        fds: list[int] = []
        try:
            for conn in conns:
                fds.append(_inheritable_dup(conn.fileno()))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        listen_fd = -1
        if self._sock is not None:
            try:
                listen_fd = _inheritable_dup(self._sock.fileno())
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            self._sock.close()
        now = asyncio.get_running_loop().time()
        handoff = ServerHandoff(
            listen_fd, [conn.hand_off(fd, now) for conn, fd in zip(conns, fds, strict=True)]
        )
        handoff.socket_file = self._unlink
        self._unlink = None
        self._handed_off = True
        self._closing = True
        for conn in list(self._connections):
            conn.abort(shutdown=False)  # anything not handed over (closing already)
        self._close_epoll()
        self._closed.set()
        return handoff

    async def adopt(self, handoff: ServerHandoff, *, accept: bool = True) -> None:
        """Take over a server handed off by :meth:`handoff`, normally in the exec'd process.

        Every descriptor is made CLOEXEC again first. Serves on ``listen_fd`` (unless -1) as
        :meth:`start_sock` would (with ``accept=False`` only holding it, as there: a keeper
        accepts, and a connection we accepted ourselves would die with us), and takes every
        connection back: the unread bytes are fed to
        the decoder, the stream-id check and :attr:`Context.connection` continue, and each
        pending call is run as if it had just arrived, answering on its original stream.
        Adopted connections are not put through the accept filter again. A connection whose
        descriptor is unusable is logged and skipped. The server must be fresh (handlers may
        be registered; it must not be started).
        """
        if self._sock is not None or self._closing or self._quiescing or self._connections:
            raise RuntimeError("adopt() needs a fresh server")
        for fd in handoff.fds():
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        usable: list[tuple[ConnectionHandoff, socket.socket]] = []
        for conn in handoff.connections:
            try:
                usable.append((conn, socket.socket(fileno=conn.fd)))
            except OSError as exc:
                logger.error("ttrpc handed-over connection fd %d unusable: %s", conn.fd, exc)
                with contextlib.suppress(OSError):
                    os.close(conn.fd)
        if handoff.listen_fd >= 0:
            try:
                try:
                    listener = socket.socket(fileno=handoff.listen_fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.close(handoff.listen_fd)
                    raise
                try:
                    await self.start_sock(listener, accept=accept)
                except BaseException:
                    listener.close()
                    raise
            except BaseException:
                for _, sock in usable:
                    sock.close()
                raise
            self._unlink = handoff.socket_file
        for index, (conn, sock) in enumerate(usable):
            try:
                await self._connect(sock, conn)
            except BaseException:
                for _, rest in usable[index + 1 :]:
                    rest.close()
                raise

    # Accepting -----------------------------------------------------------------------------

    def _start_accepting(self) -> None:
        if self._accepting or self._closing or self._quiescing or self._sock is None:
            return
        if self._hold_only:
            return
        assert self._loop is not None
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        self._accepting = True

    def _stop_accepting(self) -> None:
        """Stop taking connections; new ones wait in the kernel's listen backlog."""
        if self._accepting:
            assert self._loop is not None and self._sock is not None
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept_ready(self) -> None:
        assert self._loop is not None and self._sock is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                logger.error(
                    "ttrpc accept failed: %s; not accepting for %.0fs", exc, _ACCEPT_RETRY_DELAY
                )
                self._stop_accepting()
                self._loop.call_later(_ACCEPT_RETRY_DELAY, self._start_accepting)
                return
            task = self._loop.create_task(self._connect(conn, None))
            self._accept_tasks.add(task)
            task.add_done_callback(functools.partial(self._accepted, conn))

    def _accepted(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self._accept_tasks.discard(task)
        if task.cancelled():
            sock.close()  # by close(), maybe before the task ever ran: nobody else will

    async def _connect(
        self,
        sock: socket.socket,
        adopted: ConnectionHandoff | None,
        key: int | None = None,
        skip_through: int = 0,
    ) -> None:
        """Put an accepted (or handed-over) socket under a transport; returns once made."""
        loop = asyncio.get_running_loop()
        if key is None and adopted is not None:
            key = adopted.key
        try:
            sock.setblocking(False)
            await loop.connect_accepted_socket(
                lambda: _ServerProtocol(self, adopted, key, skip_through, sock), sock
            )
        except Exception as exc:
            what = f"handed-over connection fd {adopted.fd}" if adopted else "connection"
            logger.error("ttrpc %s not taken: %s", what, exc)
            sock.close()

    def _peek_register(self, conn: _ServerProtocol, fd: int) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            asyncio.get_running_loop().add_reader(self._epoll.fileno(), self._peek_ready)
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._peekers[fd] = conn

    def _peek_unregister(self, fd: int) -> None:
        # Before the descriptor closes: the socket lives on in the other holder's process,
        # so closing alone would leave it registered.
        if self._peekers.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _peek_ready(self) -> None:
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0, 256):
            conn = self._peekers.get(fd)
            if conn is not None:
                if events & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                    conn.peer_closed = True  # what is in the socket now is all there will be
                conn.read_journaled()

    def _close_epoll(self) -> None:
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
            self._peekers.clear()

    def _keep(self, keep: Callable[[Context], bool], ctx: Context) -> bool:
        try:
            return bool(keep(ctx))
        except Exception:
            logger.exception("ttrpc quiesce keep() failed for %s/%s", ctx.service, ctx.method)
            return False

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

    def _account(self, delta: int) -> None:
        """Track unfinished-frame bytes; past the budget, drop the largest holders."""
        self._buffered += delta
        if self._buffered <= self._max_buffered:
            return
        for conn in sorted(self._connections, key=lambda c: c.buffered_counted, reverse=True):
            if self._buffered <= self._max_buffered or conn.buffered_counted == 0:
                break
            logger.warning(
                "ttrpc peer %s holds %d bytes of unfinished frames (all peers: %d, limit %d); "
                "dropping the connection",
                conn.peer,
                conn.buffered_counted,
                self._buffered,
                self._max_buffered,
            )
            self.dropped_connections += 1
            conn.abort()

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
        timeout_cm = asyncio.timeout_at(ctx.deadline) if ctx.deadline is not None else None
        try:
            if timeout_cm is None:  # most calls have none: no timer, no context manager
                result = await handler(ctx, payload)
            else:
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
            if isinstance(exc, TimeoutError) and timeout_cm is not None and timeout_cm.expired():
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


def _step_now(loop: asyncio.AbstractEventLoop, ready: collections.deque[asyncio.Handle],
              queued: int) -> bool:  # fmt: skip
    """Run now the first step of the task just created, which create_task queued last among
    the loop's ready callbacks, as Python 3.12's eager tasks do: most handlers answer
    without waiting for anything, and are then answered here instead of two turns of the
    loop later.  Not from inside another task (a step cannot run inside one)."""
    if len(ready) != queued + 1 or asyncio.current_task(loop) is not None:
        return False
    ready.pop()._run()
    return True


def _error(code: Code, message: str) -> Response:
    return Response(Status(code, message))


def _inheritable_dup(fd: int) -> int:
    new = os.dup(fd)
    os.set_inheritable(new, True)
    return new


@dataclass
class _Call:
    """A request received on a connection, from decoding until it is answered."""

    stream_id: int
    request: Request
    deadline: float | None  # in loop time
    ctx: Context | None = None  # once started
    replayed: bool = False

    @classmethod
    def received(cls, stream_id: int, request: Request, now: float) -> _Call:
        # The deadline runs from receipt, as in Go's server, not from when a slot is free.
        deadline = now + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        return cls(stream_id, request, deadline)

    def pending(self, now: float) -> PendingCall:
        timeout_nano = 0
        if self.deadline is not None:
            timeout_nano = max(1, int((self.deadline - now) * 1e9))
        request = self.request
        return PendingCall(
            self.stream_id,
            request.service,
            request.method,
            request.payload,
            list(request.metadata),
            timeout_nano,
        )


class _ServerProtocol(asyncio.Protocol):
    """One accepted (or adopted) connection."""

    def __init__(
        self,
        server: Server,
        adopted: ConnectionHandoff | None = None,
        key: int | None = None,
        skip_through: int = 0,
        sock: socket.socket | None = None,
    ) -> None:
        self._server = server
        self._adopted = adopted
        self._raw_sock = sock  # asyncio's transport hides recv() behind its wrapper
        # Journaled: read through the server's epoll, each request journaled before it is
        # taken out of the socket (see read_journaled).
        self._key = key
        self._journal = server.journal if key is not None else None
        self._skip_through = skip_through  # stream ids the journal already holds
        self._sock: socket.socket | None = None
        self._in_journal: set[int] = set()  # stream ids journaled and not done
        self._handed_off = False
        self._partial = False  # the start of a frame waits in the socket for its rest
        self.peer_closed = False
        self._journal_failed = False
        self._conn = ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._peer: PeerCred | None = None
        self._state: dict[str, object] = adopted.state if adopted is not None else {}
        self._tasks: dict[asyncio.Task[None], _Call] = {}
        # Requests decoded but not started: at the in-flight limit (at most one read's worth),
        # or while quiesced.
        self._backlog: collections.deque[_Call] = collections.deque()
        # Calls whose handler was cancelled by quiesce(), to be run again by the adopter;
        # their answers, should a handler produce one anyway, are never written.
        self._abandoned: dict[int, _Call] = {}
        self._in_flight_bytes = 0
        self._write_paused = False
        self._read_paused = False
        self._quiesced = False
        self._flushed = asyncio.Event()
        self._counted = 0  # our unfinished-frame bytes, as added to the server's total
        self._gone = PeerGone()
        self._frame_timer: asyncio.TimerHandle | None = None

    # asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = _peer_cred(transport.get_extra_info("socket"))
        adopted, self._adopted = self._adopted, None
        if adopted is None and not self._server._admit(self._peer):
            logger.info("ttrpc connection from %s refused by the accept filter", self._peer)
            if self._key is not None:  # held elsewhere too: make sure the peer sees the end
                with contextlib.suppress(OSError):
                    if self._raw_sock is not None:
                        self._raw_sock.shutdown(socket.SHUT_RDWR)
            transport.abort()
            return
        self._server._connections.add(self)
        if self._journal is not None:
            transport.pause_reading()  # for good: read_journaled() reads this socket
            # pause_writing/resume_writing say exactly when an answer is only partly written
            transport.set_write_buffer_limits(high=0, low=0)
            self._sock = self._raw_sock
            assert self._sock is not None
            self._server._peek_register(self, self._sock.fileno())
        if adopted is not None:
            self._resume(adopted)
        if self._server._quiescing:
            self.quiesce()  # accepted just before quiesce() stopped accepting
        self._start_backlog()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        self._receive(self._conn.receive_data(data))
        self._start_backlog()
        self._update_reading()
        self._update_buffered()

    def eof_received(self) -> bool | None:
        if self._conn.mid_frame:
            logger.debug("ttrpc peer %s closed mid-frame", self._peer)
        return None  # close our side; handlers' answers are dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._sock is not None:
            self._server._peek_unregister(self._sock.fileno())
            self._sock = None
        if self._journal is not None and not self._handed_off:
            assert self._key is not None
            self._drop_backlog()
            self._journal.forget_connection(self._key)
        self._transport = None
        self._cancel_frame_timer()
        self._release_buffered()
        self._conn.release()  # up to a whole frame's memory, back at once
        self._gone.set()
        # Requests not yet started are dropped; running handlers finish, unanswered.
        self._backlog.clear()
        self._flushed.set()

    def pause_writing(self) -> None:
        if self._journal is not None and self._key is not None:
            self._journal.mark(self._key, "midwrite", True)
        self._write_paused = True
        self._flushed.clear()
        self._update_reading()

    def resume_writing(self) -> None:
        if self._journal is not None and self._key is not None:
            self._journal.mark(self._key, "midwrite", False)
        self._write_paused = False
        self._flushed.set()
        self._update_reading()

    # used by Server ---------------------------------------------------------------------

    @property
    def peer(self) -> PeerCred | None:
        return self._peer

    @property
    def buffered_counted(self) -> int:
        return self._counted

    @property
    def state(self) -> dict[str, object]:
        return self._state

    @property
    def live(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def fileno(self) -> int:
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        return int(sock.fileno())

    def abort(self, *, shutdown: bool = True) -> None:
        """Drop the connection now; requests not yet started are forgotten.

        A journaled connection is shut down too (unless ``shutdown`` is false: it is being
        handed over), or the other holder's duplicate would keep it open for the peer."""
        self._drop_backlog()
        self._cancel_frame_timer()
        self._release_buffered()
        if self._transport is not None:
            if shutdown and self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            self._transport.abort()

    def context_of(self, task: asyncio.Task[None]) -> Context | None:
        call = self._tasks.get(task)
        return call.ctx if call is not None else None

    def quiesce(self) -> None:
        """Stop reading and starting requests for good; make drain() track the write buffer."""
        if self._quiesced:
            return
        self._quiesced = True
        self._update_reading()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            # With both marks at zero, pause_writing/resume_writing say exactly whether
            # anything is still buffered, so drain() can wait for the buffer to empty.
            transport.set_write_buffer_limits(high=0, low=0)

    def abandoned(self, task: asyncio.Task[None]) -> bool:
        call = self._tasks.get(task)
        return call is not None and call.stream_id in self._abandoned

    def abandon(self, task: asyncio.Task[None]) -> None:
        """Cancel a handler without answering; its call is run again after the handoff."""
        call = self._tasks.get(task)
        if call is None or task.done():
            return
        self._abandoned[call.stream_id] = call
        task.cancel()

    async def drain(self, deadline: float) -> bool:
        """Wait until every byte written has reached the kernel; False if not by deadline."""
        while self.live:
            assert self._transport is not None
            if not self._transport.get_write_buffer_size():
                return True
            self._flushed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._flushed.wait()
            except TimeoutError:
                return False
        return False

    def hand_off(self, fd: int, now: float) -> ConnectionHandoff:
        """Describe this quiesced connection around ``fd`` (a duplicate) and let go of it."""
        assert self._quiesced
        state = self._conn.export_state()
        calls = sorted([*self._abandoned.values(), *self._backlog], key=lambda c: c.stream_id)
        handoff = ConnectionHandoff(
            fd=fd,
            unread=state.unread,
            last_stream_id=state.last_stream_id,
            state=self._state,
            pending=[call.pending(now) for call in calls],
            discard=state.discard,
            key=self._key,
        )
        self._backlog.clear()
        self._handed_off = True  # the journal entries stay: the adopter answers them
        self.abort(shutdown=False)  # our descriptor only: the duplicate keeps it open
        return handoff

    # internals --------------------------------------------------------------------------

    def _resume(self, adopted: ConnectionHandoff) -> None:
        now = asyncio.get_running_loop().time()
        if self._journal is not None:
            # What a predecessor journaled is still journaled, until answered here.
            self._in_journal.update(p.stream_id for p in adopted.pending)
        for stream_id, answer in adopted.answers:
            # Answered by a predecessor that died just before or after sending it.
            assert self._journal is not None and self._key is not None
            if self._transport is not None:
                self._transport.write(answer)
            self._journal.done(self._key, stream_id)
        for pending in adopted.pending:
            request = Request(
                pending.service,
                pending.method,
                pending.payload,
                pending.timeout_nano,
                tuple(pending.metadata),
            )
            call = _Call.received(pending.stream_id, request, now)
            call.replayed = pending.replayed
            self._backlog.append(call)
        state = ServerConnectionState(adopted.last_stream_id, adopted.unread, adopted.discard)
        self._receive(self._conn.restore_state(state))
        self._update_buffered()

    def _receive(self, events: list[RequestReceived | RequestRejected]) -> None:
        now = asyncio.get_running_loop().time()
        journal = self._journal
        for event in events:
            sid = event.stream_id
            if sid <= self._skip_through:
                continue  # a dead predecessor journaled it: it is pending already
            if isinstance(event, RequestReceived):
                if journal is not None and sid not in self._in_journal:
                    # read as it came (a large frame): journaled only now
                    assert self._key is not None
                    frame = encode_frame(sid, MessageType.REQUEST, event.request.encode())
                    if self._record(journal, self._key, sid, frame):
                        self._in_journal.add(sid)
                self._backlog.append(_Call.received(sid, event.request, now))
            else:
                self._write(sid, Response(event.status))
                if journal is not None:
                    self._journal_done(sid)

    def _at_limit(self) -> bool:
        return (
            len(self._tasks) >= self._server._max_in_flight
            or self._in_flight_bytes >= self._server._max_in_flight_bytes
        )

    def _start_backlog(self) -> None:
        while self._backlog and not self._quiesced and not self._at_limit():
            self._start(self._backlog.popleft())

    def _start(self, call: _Call) -> None:
        request = call.request
        metadata: dict[str, list[str]] = {}
        for key, value in request.metadata:
            metadata.setdefault(key.lower(), []).append(value)
        ctx = Context(
            service=request.service,
            method=request.method,
            metadata=metadata,
            deadline=call.deadline,
            peer=self._peer,
            stream_id=call.stream_id,
            connection=self._state,
            gone=self._gone,
            replayed=call.replayed,
        )
        call.ctx = ctx
        self._in_flight_bytes += len(request.payload)
        loop = asyncio.get_running_loop()
        ready: collections.deque[asyncio.Handle] | None = getattr(loop, "_ready", None)
        queued = len(ready) if ready is not None else -1
        task = loop.create_task(self._serve(ctx, request.payload))
        self._tasks[task] = call
        self._server._handlers[task] = self
        if ready is not None and _step_now(loop, ready, queued) and task.done():
            self._settle(task)  # answered in its first step: nothing left for the loop
            return
        # A callback, not a finally: a task cancelled before its first step never runs one.
        task.add_done_callback(self._task_done)

    async def _serve(self, ctx: Context, payload: bytes) -> None:
        response = await self._server._dispatch(ctx, payload)
        if ctx.stream_id not in self._abandoned:
            journaled = (ctx.service, ctx.method) not in self._server._repeatable
            self._write(ctx.stream_id, response, journaled)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._settle(task)
        if self._transport is not None:
            self._start_backlog()
        self._update_reading()

    def _settle(self, task: asyncio.Task[None]) -> None:
        """A handler's task is over: its journal entry goes (if it was answered)."""
        call = self._tasks.pop(task, None)
        self._server._handlers.pop(task, None)
        if call is not None:
            self._in_flight_bytes -= len(call.request.payload)
            unanswered = call.stream_id in self._abandoned or (
                task.cancelled() and not self._server._closing
            )  # cancelled without an answer by an exiting loop: a successor answers it
            if self._journal is not None and not unanswered:
                # Answered (or its peer is gone): out of the journal, after the answer.
                self._journal_done(call.stream_id)
                if self._transport is not None and self._key is not None:
                    try:
                        self._journal.save_state(self._key, self._state)
                    except OSError as err:
                        logger.error("ttrpc journal: connection state not saved: %s", err)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("ttrpc request task failed", exc_info=exc)

    def _write(self, stream_id: int, response: Response, journaled: bool = True) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        try:
            data = self._conn.send_response(stream_id, response)
        except MessageTooLargeError as exc:
            logger.error("ttrpc response on stream %d too large: %s", stream_id, exc.message)
            status = Status(Code.RESOURCE_EXHAUSTED, oversize_message(exc.length, exc.limit))
            data = self._conn.send_response(stream_id, Response(status))
        if journaled and self._journal is not None and stream_id in self._in_journal:
            # A successor sends this again instead of running the request again.
            assert self._key is not None
            try:
                self._journal.answer(self._key, stream_id, data)
            except OSError as exc:
                logger.error("ttrpc journal: answer not written: %s", exc)
        transport.write(data)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        busy = self._quiesced or self._write_paused or bool(self._backlog) or self._at_limit()
        if busy and not self._read_paused:
            self._read_paused = True
            if self._journal is None:
                transport.pause_reading()
        elif not busy and self._read_paused:
            self._read_paused = False
            if self._journal is None:
                transport.resume_reading()
            else:
                # Edge-triggered: what arrived while paused raises no new event.
                asyncio.get_running_loop().call_soon(self.read_journaled)
        self._update_frame_timer()

    def read_journaled(self) -> None:
        """Read a journaled connection: each whole request frame is journaled, then taken out
        of the socket, then decoded.  A partial frame stays in the socket until the rest
        arrives (the next edge), unless it is too large to ever be queued whole."""
        journal, sock, key = self._journal, self._sock, self._key
        assert journal is not None and key is not None
        while not self._read_paused and sock is not None and self.live:
            try:
                if self._conn.mid_frame:
                    data = sock.recv(_PEEK_BYTES)  # finishing a large frame as it comes
                    if data:
                        self.data_received(data)
                        if not self._conn.mid_frame:
                            journal.mark(key, "midread", False)
                        continue
                else:
                    # One buffer for every connection (reads never interleave): peeking 64 KiB
                    # into a fresh bytes object each time fragments the heap.
                    buf = self._server._peek_buffer
                    n = sock.recv_into(buf, _PEEK_BYTES, socket.MSG_PEEK)
                    if n:
                        with memoryview(buf)[:n] as view:
                            size, large = self._journal_whole_frames(journal, key, view)
                            whole = bytes(view[:size])
                        if size:
                            _consume(sock, size, buf)
                            self._partial = False
                            self.data_received(whole)
                            if size == n < _PEEK_BYTES and not self.peer_closed:
                                # All that had arrived was read; whatever comes after the
                                # peek raises a new edge: no empty peek to learn that.
                                return
                        elif large or self.peer_closed:
                            # Cannot wait for it whole (too large, or nothing more is coming:
                            # the codec then sees the truncation): read it as it comes.
                            self._partial = False
                            journal.mark(key, "midread", True)
                            self.data_received(sock.recv(n))
                            if not self._conn.mid_frame:
                                journal.mark(key, "midread", False)
                        else:
                            self._partial = True  # the rest raises the next edge
                            self._update_frame_timer()
                            return
                        continue
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.debug("ttrpc peer %s: %s", self._peer, exc)
                self.abort(shutdown=False)
                return
            # end of stream
            if self._transport is not None:
                self.eof_received()
                self._transport.close()
            return

    def _journal_whole_frames(
        self, journal: Journal, key: int, view: memoryview
    ) -> tuple[int, bool]:
        """Journal the requests among the whole frames at the start of ``view``; returns
        their length, and whether the frame after them is too large to wait for whole."""
        pos = 0
        while len(view) - pos >= HEADER_SIZE:
            header = FrameHeader.decode(view[pos : pos + HEADER_SIZE])
            end = pos + HEADER_SIZE + header.length
            if header.length > PEEK_FRAME_MAX:
                return pos, True
            if end > len(view):
                break
            sid = header.stream_id
            if header.type == MessageType.REQUEST and sid > self._skip_through:
                if self._record(journal, key, sid, view[pos:end]):
                    self._in_journal.add(sid)
            pos = end
        return pos, False

    def _drop_backlog(self) -> None:
        """Forget the requests read and not started (and, unless the connection is being
        handed over, their journal entries: nobody will run them)."""
        if self._journal is not None and not self._handed_off:
            for call in self._backlog:
                self._journal_done(call.stream_id)
        self._backlog.clear()

    def _journal_done(self, sid: int) -> None:
        assert self._journal is not None and self._key is not None
        if sid in self._in_journal:
            self._in_journal.discard(sid)
            self._journal.done(self._key, sid)

    def _record(self, journal: Journal, key: int, sid: int, frame: bytes | memoryview) -> bool:
        """Journal a request; if the journal cannot be written (disk full), serve it anyway,
        only not crash-safely (said once per connection)."""
        try:
            journal.record(key, sid, frame)
        except OSError as exc:
            if not self._journal_failed:
                self._journal_failed = True
                logger.error(
                    "ttrpc journal not written (%s): requests of %s are served without it",
                    exc,
                    self._peer,
                )
            return False
        return True

    def _update_frame_timer(self) -> None:
        """Time an unfinished frame, but only while we read: a peer we stopped reading
        (at the in-flight limit, or not taking its answers) cannot finish one."""
        timeout = self._server._frame_timeout
        running = (
            timeout is not None
            and self._transport is not None
            and not self._read_paused
            and (self._conn.mid_frame or self._partial)
        )
        if not running:
            self._cancel_frame_timer()
        elif self._frame_timer is None:
            assert timeout is not None
            loop = asyncio.get_running_loop()
            self._frame_timer = loop.call_later(timeout, self._frame_timed_out)

    def _cancel_frame_timer(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        if self._transport is None or not (self._conn.mid_frame or self._partial):
            return
        logger.warning(
            "ttrpc peer %s did not finish a frame within %gs; dropping the connection",
            self._peer,
            self._server._frame_timeout,
        )
        self._server.dropped_connections += 1
        self.abort()

    def _update_buffered(self) -> None:
        if self._transport is None:
            return
        now = self._conn.buffered
        delta, self._counted = now - self._counted, now
        if delta:
            self._server._account(delta)

    def _release_buffered(self) -> None:
        if self._counted:
            counted, self._counted = self._counted, 0
            self._server._account(-counted)


def _consume(sock: socket.socket, size: int, scratch: bytearray) -> None:
    """Take ``size`` bytes already seen with MSG_PEEK out of the socket (into ``scratch``)."""
    while size > 0:
        size -= sock.recv_into(scratch, min(size, len(scratch)))


def _pending_from_journal(call: JournaledCall) -> PendingCall | None:
    """The journaled request, to be run again (None if it does not decode as one)."""
    try:
        request = call.request()
    except Exception:
        logger.error("ttrpc journal: entry %r is not a request; dropped", call)
        return None
    return PendingCall(
        call.stream_id,
        request.service,
        request.method,
        request.payload,
        list(request.metadata),
        request.timeout_nano,
        replayed=True,
    )
