"""The in-flight journal: every request read from a connection and not yet answered.

A server whose connections outlive it (another process holds duplicates of the sockets)
writes each request frame here *before* taking it out of the socket, and removes the entry
once its handler has finished and the answer was written.  If the process dies in between, its
successor finds here exactly the requests nobody answered, and nothing read was lost: a frame
is either still in the socket, or here, or both (then the successor skips the copy in the
socket by its stream id, see :meth:`Journal.load`).

Entries live in slot files of fixed-size slots, reused: ``slots.512`` and ``slots.8192``
(a request and its answer fit one slot of the smaller size that holds both).  Recording a
request is one ``pwrite`` of a header (connection, stream id, length, CRC-32) and the frame;
its answer, appended in the slot, another; forgetting it, a third that zeroes the slot's
magic.  A slot cut short by the writer's death fails its CRC and is as good as none (its
frame is still in the socket, unread; an answer cut short never reached the socket).  No file
is created or removed per request: on a busy node the journal is the daemon's most frequent
disk work, and on a disk file system (``/run`` is not tmpfs everywhere) creating and
unlinking an inode per request cost a fifth of the daemon's CPU per exec.  A frame too large
for a slot gets a file of its own, ``<connection>.<stream id>`` (the frame, then its answer
appended); an answer that no longer fits its slot moves the request there with it.  Each
connection's state (:attr:`.server.Context.connection`, JSON) takes a slot too, as a frame of
stream 0 (no request has that stream id; older images kept it in ``<connection>.state``,
still read).  Nothing is synced: the journal survives the process, not the
machine, and lives best on tmpfs (``/run``).  Older images wrote one file per request (and
before that the answer beside it, as ``<connection>.<stream id>.r``): :meth:`Journal.load`
still reads those.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import struct
import zlib

from .codec import HEADER_SIZE, FrameHeader, Request, encode_frame

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


# A slot: the request's header and frame, then the answer's header and frame.
_REQUEST = struct.Struct("<4sIIII")  # magic, connection, stream id, frame length, CRC-32
_ANSWER = struct.Struct("<4sII")  # magic, frame length, CRC-32
_REQUEST_MAGIC = b"ejR1"
_ANSWER_MAGIC = b"ejA1"
_FREE = b"\0" * len(_REQUEST_MAGIC)
#: slot sizes, smallest first; a request takes the first one leaving this much for its answer
_SIZES = (512, 8192)
_ANSWER_ROOM = (256, 2048)
#: a connection's state: a frame of this type on stream 0 (requests are on odd streams)
_STATE_STREAM = 0
_STATE_TYPE = 0x53


def _crc(*parts: bytes | memoryview | int) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part.to_bytes(4, "little") if isinstance(part, int) else part, crc)
    return crc


class _Slots:
    """One slot file: which slot holds which request, and which are free (lowest first,
    so the file stays as short as the most requests ever in flight at once)."""

    def __init__(self, path: str, size: int) -> None:
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.count = -(-os.fstat(self.fd).st_size // size)  # the last slot may be short
        self.free: list[int] = []  # a heap
        self.used: dict[tuple[int, int], tuple[int, int]] = {}  # key -> (slot, frame length)

    def scan(self) -> list[tuple[int, int, int, bytes, bytes | None]]:
        """Every valid slot: (slot, connection, stream id, frame, answer or None); the rest
        are free."""
        data = os.pread(self.fd, self.count * self.size, 0).ljust(self.count * self.size, b"\0")
        found = []
        for slot in range(self.count):
            base = slot * self.size
            magic, conn, sid, length, crc = _REQUEST.unpack_from(data, base)
            start = base + _REQUEST.size
            end = start + length
            if magic != _REQUEST_MAGIC or end + _ANSWER.size > base + self.size:
                continue
            frame = data[start:end]
            if _crc(conn, sid, frame) != crc or _whole_frame(frame) != length:
                continue  # cut short by the writer's death, or stale
            answer = None
            amagic, alength, acrc = _ANSWER.unpack_from(data, end)
            astart = end + _ANSWER.size
            if amagic == _ANSWER_MAGIC and astart + alength <= base + self.size:
                candidate = data[astart : astart + alength]
                if _crc(candidate) == acrc and _whole_frame(candidate) == alength:
                    answer = candidate
            found.append((slot, conn, sid, frame, answer))
        return found

    def take(self) -> int:
        if self.free:
            return heapq.heappop(self.free)
        self.count += 1
        return self.count - 1

    def put_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    def put(
        self, key: tuple[int, int], frame: bytes | memoryview, answer: bytes | None = None
    ) -> None:
        """Write the request (and its answer) into a free slot; raises OSError (the slot
        stays free)."""
        slot = self.take()
        try:
            self.write(slot, key, frame, answer)
        except OSError:
            self.put_back(slot)
            raise

    def write(
        self,
        slot: int,
        key: tuple[int, int],
        frame: bytes | memoryview,
        answer: bytes | None = None,
    ) -> None:
        """The request (and its answer, if given) into ``slot``; raises OSError."""
        conn, sid = key
        tail = (
            _ANSWER.pack(_ANSWER_MAGIC, len(answer), _crc(answer)) + answer
            if answer is not None
            else bytes(_ANSWER.size)  # no stale answer of the slot's last user
        )
        header = _REQUEST.pack(_REQUEST_MAGIC, conn, sid, len(frame), _crc(conn, sid, frame))
        os.pwrite(self.fd, b"".join((header, frame, tail)), slot * self.size)
        self.used[key] = (slot, len(frame))

    def clear(self, key: tuple[int, int]) -> None:
        slot, _ = self.used.pop(key)
        self.free_slot(slot)

    def free_slot(self, slot: int) -> None:
        try:
            os.pwrite(self.fd, _FREE, slot * self.size)
        finally:
            self.put_back(slot)

    def read_frame(self, key: tuple[int, int]) -> bytes:
        slot, length = self.used[key]
        return os.pread(self.fd, length, slot * self.size + _REQUEST.size)


class Journal:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._states: dict[int, str] = {}  # what was last written, to write only changes
        self._saved: dict[int, object] = {}  # the same, as read back from that JSON
        self._slots = [_Slots(os.path.join(directory, f"slots.{size}"), size) for size in _SIZES]
        for slots in self._slots:
            in_use = set()
            for slot, conn, sid, frame, answer in slots.scan():
                key = (conn, sid)
                other = self._slots_of(key)
                if other is not None:  # moved when its answer was written: keep the whole one
                    if answer is None:
                        continue
                    with contextlib.suppress(OSError):
                        other.clear(key)
                in_use.add(slot)
                slots.used[key] = (slot, len(frame))
            slots.free = [slot for slot in range(slots.count) if slot not in in_use]
            heapq.heapify(slots.free)

    def close(self) -> None:
        for slots in self._slots:
            os.close(slots.fd)

    def _path(self, connection: int, name: str) -> str:
        return os.path.join(self.dir, f"{connection}.{name}")

    def _slots_of(self, key: tuple[int, int]) -> _Slots | None:
        for slots in self._slots:
            if key in slots.used:
                return slots
        return None

    def _fitting(self, need: int, room: bool) -> _Slots | None:
        for slots, extra in zip(self._slots, _ANSWER_ROOM, strict=True):
            if need + (extra if room else 0) <= slots.size:
                return slots
        return None

    def record(self, connection: int, stream_id: int, frame: bytes | memoryview) -> None:
        """Write one request frame; raises OSError (the caller then must not consume it)."""
        key = (connection, stream_id)
        old = self._slots_of(key)
        if old is not None:
            old.clear(key)
        slots = self._fitting(_REQUEST.size + len(frame) + _ANSWER.size, room=True)
        if slots is None:
            self._write_file(key, frame)
            return
        slots.put(key, frame)

    def answer(self, connection: int, stream_id: int, frame: bytes) -> None:
        """The response about to be written for a journaled request, kept with it (raises
        OSError)."""
        key = (connection, stream_id)
        slots = self._slots_of(key)
        if slots is None:
            fd = os.open(self._path(key[0], str(key[1])), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                os.write(fd, frame)
            finally:
                os.close(fd)
            return
        slot, length = slots.used[key]
        end = _REQUEST.size + length + _ANSWER.size + len(frame)
        if end <= slots.size:
            tail = _ANSWER.pack(_ANSWER_MAGIC, len(frame), _crc(frame)) + frame
            os.pwrite(slots.fd, tail, slot * slots.size + _REQUEST.size + length)
            return
        # Too large for its slot: request and answer move together, then the old slot goes
        # (a successor finding both takes the one with the answer).
        request = slots.read_frame(key)
        bigger = self._fitting(end, room=False)
        if bigger is None:
            self._write_file(key, request + frame)
        else:
            bigger.put(key, request, frame)
        slots.clear(key)

    def _write_file(self, key: tuple[int, int], data: bytes | memoryview) -> None:
        fd = os.open(
            self._path(key[0], str(key[1])),
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
            0o600,
        )
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def done(self, connection: int, stream_id: int) -> None:
        """Forget a request (and its answer), after it."""
        key = (connection, stream_id)
        slots = self._slots_of(key)
        if slots is not None:
            slots.clear(key)
            return
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
        key = (connection, _STATE_STREAM)
        frame = encode_frame(_STATE_STREAM, _STATE_TYPE, text.encode())
        old = self._slots_of(key)
        old_slot = old.used[key][0] if old is not None else -1
        slots = self._fitting(_REQUEST.size + len(frame) + _ANSWER.size, room=False)
        if slots is None:  # larger than a slot: a file, as older images kept it
            tmp = self._path(connection, "state.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self._path(connection, "state"))
            if old is not None:
                old.clear(key)
        else:
            # The new one whole before the old one goes: a successor finds one or the other.
            slots.put(key, frame)
            if old is not None:
                if old is not slots:
                    del old.used[key]
                old.free_slot(old_slot)
        self._states[connection] = text
        self._saved[connection] = json.loads(text)  # a copy the caller cannot change

    def state(self, connection: int) -> dict[str, object]:
        slots = self._slots_of((connection, _STATE_STREAM))
        try:
            if slots is not None:
                frame = slots.read_frame((connection, _STATE_STREAM))
                data = json.loads(frame[HEADER_SIZE:])
            else:
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
        """The connection is gone: its state goes (its calls go as they finish)."""
        self._states.pop(connection, None)
        self._saved.pop(connection, None)
        slots = self._slots_of((connection, _STATE_STREAM))
        if slots is not None:
            with contextlib.suppress(OSError):
                slots.clear((connection, _STATE_STREAM))
        for what in ("state", "midread", "midwrite"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(connection, what))

    def load(self) -> dict[int, list[JournaledCall]]:
        """Every complete entry, by connection, in stream order (slots are read as they are;
        files of older images cut short are removed)."""
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
        seen = {(c.connection, c.stream_id): c for calls in out.values() for c in calls}
        for slots in self._slots:
            for _, conn, sid, kept, reply in slots.scan():
                if sid == _STATE_STREAM:
                    continue  # a connection's state, not a call
                known = seen.get((conn, sid))
                if known is None:
                    call = seen[conn, sid] = JournaledCall(conn, sid, kept, reply)
                    out.setdefault(conn, []).append(call)
                elif known.answer is None and reply is not None:
                    known.frame, known.answer = kept, reply  # moved with its answer
        for calls in out.values():
            calls.sort(key=lambda c: c.stream_id)
        return out

    def connections_with_state(self) -> set[int]:
        in_slots = {conn for s in self._slots for conn, sid in s.used if sid == _STATE_STREAM}
        return in_slots | {
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
