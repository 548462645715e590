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
appended to the same file, just before it goes to the socket: a successor that finds a whole
answer frame after the request sends it again rather than running the request a second time
(a peer that had it already drops the copy: ttrpc clients ignore answers to streams they no
longer wait on); an answer cut short is as good as none (it never reached the socket).  One
file created and one removed per request, and no rename: on a busy node this is the
daemon's most frequent disk work.  (Older images wrote the answer beside it, as
``<connection>.<stream id>.r``; :meth:`Journal.load` still reads those.)  Each
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
        self._saved: dict[int, object] = {}  # the same, as read back from that JSON

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
        """The response about to be written for a journaled request, appended to it (raises
        OSError)."""
        fd = os.open(
            self._path(connection, str(stream_id)), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        )
        try:
            os.write(fd, frame)
        finally:
            os.close(fd)

    def done(self, connection: int, stream_id: int) -> None:
        """Forget a request (and its answer), after it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(connection, str(stream_id)))

    def save_state(self, connection: int, state: dict[str, object]) -> None:
        """Keep a connection's state, if it changed since last time."""
        if self._saved.get(connection) == state:
            return  # compared with what was written, read back: no JSON per request
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
        self._saved[connection] = json.loads(text)  # a copy the caller cannot change

    def state(self, connection: int) -> dict[str, object]:
        try:
            with open(self._path(connection, "state")) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        self._states[connection] = json.dumps(data, sort_keys=True)
        self._saved[connection] = json.loads(self._states[connection])
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
        self._saved.pop(connection, None)
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
                    data = f.read()
            except OSError:
                continue
            size = _whole_frame(data)
            if size is None:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # the writer died mid-write: the frame is still unread
                continue
            frame, answer = data[:size], data[size:]
            if _whole_frame(answer) != len(answer):
                answer = b""  # cut short: it never reached the socket
            if not answer and name in answers:  # an older image's answer, beside it
                with contextlib.suppress(OSError), open(path + ".r", "rb") as f:
                    answer = f.read()
            if len(data) != len(frame) + len(answer) or name in answers:
                # One file again, as a successor appends its own answer to it.
                with contextlib.suppress(OSError):
                    with open(path, "r+b") as f:
                        f.truncate(size)
                        f.seek(size)
                        f.write(answer)
                    if name in answers:
                        os.unlink(path + ".r")
            call = JournaledCall(int(conn_text), int(stream_text), frame, answer or None)
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


def _whole_frame(data: bytes) -> int | None:
    """The length of the whole frame at the start of ``data``, None if it is cut short."""
    if len(data) < HEADER_SIZE:
        return None
    size = HEADER_SIZE + FrameHeader.decode(data[:HEADER_SIZE]).length
    return size if len(data) >= size else None
