"""The in-flight journal: every request read from a connection and not yet answered.

A server whose connections outlive it (another process holds duplicates of the sockets)
writes each request frame here *before* taking it out of the socket, and removes the entry
once its handler has finished and the answer was written.  If the process dies in between, its
successor finds here exactly the requests nobody answered, and nothing read was lost: a frame
is either still in the socket, or here, or both (then the successor skips the copy in the
socket by its stream id, see :meth:`Journal.load`).

One file per request, ``<connection>.<stream id>``, holding the raw frame (header and
payload), written with one ``write``; a file cut short by the writer's death is recognised by
its header's length and dropped (its frame is still in the socket, unread).  The answer is
written beside it, ``<connection>.<stream id>.r``, just before it goes to the socket: a
successor that finds one sends it again rather than running the request a second time (a
peer that had it already drops the copy: ttrpc clients ignore answers to streams they no
longer wait on).  Each
connection's state (:attr:`.server.Context.connection`) is kept beside, as
``<connection>.state`` (JSON).  Nothing is synced: the journal survives the process, not the
machine, and lives best on tmpfs (``/run``).
"""

from __future__ import annotations

import contextlib
import json
import os

from .codec import HEADER_SIZE, FrameHeader, Request

__all__ = ["Journal", "JournaledCall"]


class JournaledCall:
    """A request frame found in the journal."""

    __slots__ = ("connection", "stream_id", "frame", "answer")

    def __init__(
        self, connection: int, stream_id: int, frame: bytes, answer: bytes | None = None
    ) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.frame = frame
        self.answer = answer  # the response frame, if it was about to be sent

    def __repr__(self) -> str:
        return f"JournaledCall({self.connection}.{self.stream_id}, {len(self.frame)} bytes)"

    def request(self) -> Request:
        """The request in the frame; raises ProtocolError if it is not one."""
        return Request.decode(self.frame[HEADER_SIZE:])


class Journal:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._states: dict[int, str] = {}  # what was last written, to write only changes

    def _path(self, connection: int, name: str) -> str:
        return os.path.join(self.dir, f"{connection}.{name}")

    def record(self, connection: int, stream_id: int, frame: bytes | memoryview) -> None:
        """Write one request frame; raises OSError (the caller then must not consume it)."""
        fd = os.open(
            self._path(connection, str(stream_id)),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, frame)
        finally:
            os.close(fd)

    def answer(self, connection: int, stream_id: int, frame: bytes) -> None:
        """The response about to be written for a journaled request (raises OSError)."""
        tmp = self._path(connection, f"{stream_id}.t")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, frame)
        finally:
            os.close(fd)
        os.rename(tmp, self._path(connection, f"{stream_id}.r"))  # whole, or not there

    def done(self, connection: int, stream_id: int, answered: bool = False) -> None:
        """Forget a request and its answer, after it: an answer left alone is removed by
        ``load``)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(connection, str(stream_id)))
        if answered:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(connection, f"{stream_id}.r"))

    def save_state(self, connection: int, state: dict[str, object]) -> None:
        """Keep a connection's state, if it changed since last time."""
        try:
            text = json.dumps(state, sort_keys=True)
        except (TypeError, ValueError):
            return
        if self._states.get(connection) == text:
            return
        tmp = self._path(connection, "state.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self._path(connection, "state"))
        self._states[connection] = text

    def state(self, connection: int) -> dict[str, object]:
        try:
            with open(self._path(connection, "state")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        self._states[connection] = json.dumps(data, sort_keys=True)
        return data

    def mark(self, connection: int, what: str, on: bool) -> None:
        """Say (or stop saying) that the connection's byte stream is in the middle of a
        frame a successor could not find the end of: ``midread`` (a large request taken out
        of the socket as it came) or ``midwrite`` (an answer only partly written)."""
        path = self._path(connection, what)
        if on:
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def broken(self) -> set[int]:
        """Connections a predecessor left in the middle of a frame (see ``mark``)."""
        return {
            int(name.partition(".")[0])
            for name in os.listdir(self.dir)
            if name.endswith((".midread", ".midwrite")) and name.partition(".")[0].isdigit()
        }

    def forget_connection(self, connection: int) -> None:
        """The connection is gone: its state file goes (its calls go as they finish)."""
        self._states.pop(connection, None)
        for what in ("state", "midread", "midwrite"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(connection, what))

    def load(self) -> dict[int, list[JournaledCall]]:
        """Every complete entry, by connection, in stream order; cut-short ones are removed."""
        out: dict[int, list[JournaledCall]] = {}
        names = os.listdir(self.dir)
        answers = {name[:-2] for name in names if name.endswith(".r")}
        for name in names:
            if name.endswith((".tmp", ".t")):  # a write the dead writer never finished
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, name))
                continue
            conn_text, _, stream_text = name.partition(".")
            if not conn_text.isdigit() or not stream_text.isdigit():
                if name.endswith(".r") and name[:-2] not in names:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.dir, name))  # of a request now done
                continue
            path = os.path.join(self.dir, name)
            try:
                with open(path, "rb") as f:
                    frame = f.read()
            except OSError:
                continue
            header = FrameHeader.decode(frame[:HEADER_SIZE]) if len(frame) >= HEADER_SIZE else None
            if header is None or len(frame) != HEADER_SIZE + header.length:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # the writer died mid-write: the frame is still unread
                continue
            answer = None
            if name in answers:
                with contextlib.suppress(OSError), open(path + ".r", "rb") as f:
                    answer = f.read()
            call = JournaledCall(int(conn_text), int(stream_text), frame, answer)
            out.setdefault(call.connection, []).append(call)
        for calls in out.values():
            calls.sort(key=lambda c: c.stream_id)
        return out

    def connections_with_state(self) -> set[int]:
        return {
            int(name.partition(".")[0])
            for name in os.listdir(self.dir)
            if name.endswith(".state") and name.partition(".")[0].isdigit()
        }
