"""What a quiesced ttrpc server hands to its successor, typically the same process after exec().

:meth:`.server.Server.handoff` produces a :class:`ServerHandoff`; :meth:`to_json` turns it
into text the old process writes somewhere (a file, an environment variable), and
:meth:`from_json` reads it back for :meth:`.server.Server.adopt` in the new one. The file
descriptors in it are inheritable duplicates of the sockets, so they survive exec().

This module imports neither asyncio nor the server, so parsing a handoff is cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field

__all__ = ["ConnectionHandoff", "PendingCall", "ServerHandoff"]

FORMAT_VERSION = 1


@dataclass
class PendingCall:
    """A request the old server had received but not answered; the new one runs it again.

    ``timeout_nano`` is the time that was left of the caller's deadline when it was handed
    over (at least 1 if the deadline had already passed, so it fails at once), or 0 for none.
    ``metadata`` is in wire order, keys as the client sent them.
    """

    stream_id: int
    service: str
    method: str
    payload: bytes
    metadata: list[tuple[str, str]]
    timeout_nano: int
    #: Found in a dead server's journal rather than handed over by a live one: the handler
    #: may have done part of its work already (see :attr:`.server.Context.replayed`).
    replayed: bool = False


@dataclass
class ConnectionHandoff:
    """One live connection.

    ``state`` is the connection's :attr:`.server.Context.connection` dict; it crosses the
    exec as JSON, so it must hold only JSON types (dicts with str keys, lists, str, int,
    float, bool, None) and comes back with tuples turned into lists.
    ``unread`` are bytes received but not yet a complete frame, ``discard`` the rest of an
    oversized frame still to skip (its rejection was already answered).
    ``pending`` is in arrival order.
    """

    fd: int
    unread: bytes
    last_stream_id: int
    state: dict[str, object]
    pending: list[PendingCall]
    discard: int = 0
    #: The connection's number with whoever holds duplicates of it (see :mod:`.journal`).
    key: int | None = None
    #: Answers a dead predecessor had journaled for requests of this connection, to be sent
    #: (again) as they are; never part of a re-exec handoff, so not in the JSON.
    answers: list[tuple[int, bytes]] = field(default_factory=list)


@dataclass
class ServerHandoff:
    """A whole server: its listening socket (or -1) and its connections.

    ``socket_file`` is the ``(path, st_dev, st_ino)`` of the socket file the server created,
    so the adopting server removes it on close as the original would have; None if the
    socket was inherited, abstract, or there is no listener.
    """

    listen_fd: int
    connections: list[ConnectionHandoff] = field(default_factory=list)
    socket_file: tuple[str, int, int] | None = None

    def fds(self) -> list[int]:
        """Every file descriptor in the handoff."""
        fds = [self.listen_fd] if self.listen_fd >= 0 else []
        return fds + [conn.fd for conn in self.connections]

    def close_fds(self) -> None:
        """Close every descriptor: give the connections up instead of adopting them."""
        for fd in self.fds():
            with contextlib.suppress(OSError):
                os.close(fd)

    def to_json(self) -> str:
        """Text form; bytes are base64. Raises TypeError if a connection state is not JSON."""
        return json.dumps(
            {
                "version": FORMAT_VERSION,
                "listen_fd": self.listen_fd,
                "socket_file": list(self.socket_file) if self.socket_file else None,
                "connections": [
                    {
                        "fd": conn.fd,
                        "unread": _b64(conn.unread),
                        "discard": conn.discard,
                        "key": conn.key,
                        "last_stream_id": conn.last_stream_id,
                        "state": conn.state,
                        "pending": [
                            {
                                "stream_id": call.stream_id,
                                "service": call.service,
                                "method": call.method,
                                "payload": _b64(call.payload),
                                "metadata": [[key, value] for key, value in call.metadata],
                                "timeout_nano": call.timeout_nano,
                            }
                            for call in conn.pending
                        ],
                    }
                    for conn in self.connections
                ],
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ServerHandoff:
        """Parse :meth:`to_json` output; raises ValueError if it is malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"handoff is not JSON: {exc}") from None
        obj = _dict(data, "handoff")
        if obj.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported handoff version {obj.get('version')!r}")
        socket_file = None
        raw_file = obj.get("socket_file")
        if raw_file is not None:
            items = _list(raw_file, "socket_file")
            if len(items) != 3:
                raise ValueError("socket_file must be [path, st_dev, st_ino]")
            socket_file = (
                _str(items[0], "socket_file path"),
                _int(items[1], "socket_file st_dev"),
                _int(items[2], "socket_file st_ino"),
            )
        connections = [
            _connection(_dict(item, "connection"))
            for item in _list(obj.get("connections", []), "connections")
        ]
        return cls(_int(obj.get("listen_fd"), "listen_fd"), connections, socket_file)


def _connection(obj: dict[str, object]) -> ConnectionHandoff:
    pending = []
    for item in _list(obj.get("pending", []), "pending"):
        call = _dict(item, "pending call")
        metadata = []
        for pair in _list(call.get("metadata", []), "metadata"):
            kv = _list(pair, "metadata pair")
            if len(kv) != 2:
                raise ValueError("metadata pair must be [key, value]")
            metadata.append((_str(kv[0], "metadata key"), _str(kv[1], "metadata value")))
        pending.append(
            PendingCall(
                stream_id=_int(call.get("stream_id"), "stream_id"),
                service=_str(call.get("service"), "service"),
                method=_str(call.get("method"), "method"),
                payload=_unb64(call.get("payload", ""), "payload"),
                metadata=metadata,
                timeout_nano=_int(call.get("timeout_nano", 0), "timeout_nano"),
            )
        )
    return ConnectionHandoff(
        fd=_int(obj.get("fd"), "fd"),
        unread=_unb64(obj.get("unread", ""), "unread"),
        last_stream_id=_int(obj.get("last_stream_id", 0), "last_stream_id"),
        state=_dict(obj.get("state", {}), "state"),
        pending=pending,
        discard=_int(obj.get("discard", 0), "discard"),
        key=None if obj.get("key") is None else _int(obj.get("key"), "key"),
    )


# base64 is imported by the two functions below, which only a reload runs: a module-level
# import would cost every daemon its memory for nothing (issue 14's memory bound).


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(_str(value, what), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"{what} is not base64: {exc}") from None


def _dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, not {type(value).__name__}")
    return value


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, not {type(value).__name__}")
    return value


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    return value
