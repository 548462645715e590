"""A client for the kubelet streaming protocol over WebSocket (what ``kubectl exec`` speaks).

The URL CRI's Exec and Attach return is served by the kubelet streaming server embedded in
containerd's CRI plugin; it accepts SPDY/3.1 or, with ``Upgrade: websocket``, RFC 6455
WebSocket carrying the channel sub-protocol ``v4.channel.k8s.io``: each binary message starts
with one channel byte — 0 stdin, 1 stdout, 2 stderr, 3 error (a JSON metav1.Status once the
process ends), 4 resize (JSON ``{"Width": w, "Height": h}``).  That protocol has no
half-close: stdin ends only when the connection does.  stdlib only: the handshake, masked
client frames, fragmented and control frames, close.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

PROTOCOL = "v4.channel.k8s.io"
_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


class StreamError(RuntimeError):
    """The streaming server refused the session or broke the protocol."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.2: clients must mask)."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class ChannelSession:
    """One exec/attach session: collects output per channel in a reader thread."""

    def __init__(self, sock: socket.socket, url: str, timeout: float = 10) -> None:
        self.sock = sock
        self.buffers: dict[int, bytes] = {STDOUT: b"", STDERR: b"", ERROR: b""}
        self.closed = threading.Event()
        self.close_code: int | None = None
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        sock.settimeout(timeout)
        self._handshake(url)
        sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    # -- handshake --------------------------------------------------------------------

    def _handshake(self, url: str) -> None:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: {parts.netloc}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {PROTOCOL}\r\n"
            f"Origin: http://{parts.netloc}\r\n"
            "\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise StreamError(f"no handshake answer; got {head!r}")
            head += chunk
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise StreamError(f"handshake refused: {lines[0]!r}")
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
        }
        accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise StreamError(f"bad Sec-WebSocket-Accept in {headers}")
        self.protocol = headers.get("sec-websocket-protocol", "")
        if self.protocol != PROTOCOL:
            raise StreamError(f"server chose sub-protocol {self.protocol!r}")

    # -- reading ----------------------------------------------------------------------

    def _read_frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = _recv_exact(self.sock, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", _recv_exact(self.sock, 2))[0]
        elif n == 127:
            n = struct.unpack("!Q", _recv_exact(self.sock, 8))[0]
        mask = _recv_exact(self.sock, 4) if b1 & 0x80 else b""
        data = _recv_exact(self.sock, n) if n else b""
        if mask:
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return bool(b0 & 0x80), b0 & 0x0F, data

    def _read_loop(self) -> None:
        message, opcode = b"", _OP_BINARY
        try:
            while True:
                fin, op, data = self._read_frame()
                if op == _OP_PING:
                    self._send(_OP_PONG, data)
                    continue
                if op == _OP_PONG:
                    continue
                if op == _OP_CLOSE:
                    if len(data) >= 2:
                        self.close_code = struct.unpack("!H", data[:2])[0]
                    self._send(_OP_CLOSE, data[:2])
                    break
                if op != _OP_CONT:
                    message, opcode = b"", op
                message += data
                if fin:
                    self._deliver(opcode, message)
                    message = b""
        except (EOFError, OSError):
            pass
        finally:
            with self._cond:
                self.closed.set()
                self._cond.notify_all()

    def _deliver(self, opcode: int, message: bytes) -> None:
        if opcode == _OP_TEXT:  # base64 protocols only; v4 binary sends none
            raise StreamError("unexpected text message")
        if not message:
            return
        with self._cond:
            ch = message[0]
            self.buffers[ch] = self.buffers.get(ch, b"") + message[1:]
            self._cond.notify_all()

    # -- writing ----------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(_frame(opcode, payload))

    def send_stdin(self, data: bytes) -> None:
        self._send(_OP_BINARY, bytes([STDIN]) + data)

    def resize(self, width: int, height: int) -> None:
        body = json.dumps({"Width": width, "Height": height}).encode()
        self._send(_OP_BINARY, bytes([RESIZE]) + body)

    # -- waiting ----------------------------------------------------------------------

    def wait_for(self, cond: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0 or (self.closed.is_set() and not cond()):
                    raise StreamError(f"{what or 'condition'} not met; buffers {self.buffers}")
                self._cond.wait(min(left, 0.1))

    def wait_output(self, needle: bytes, channel: int = STDOUT, timeout: float = 10) -> None:
        self.wait_for(lambda: needle in self.buffers.get(channel, b""), timeout, repr(needle))

    def wait_closed(self, timeout: float = 20) -> None:
        if not self.closed.wait(timeout):
            raise StreamError(f"session still open after {timeout}s; buffers {self.buffers}")

    def status(self) -> dict[str, Any]:
        """The metav1.Status the server sent on the error channel (once the process ended)."""
        raw = self.buffers.get(ERROR, b"")
        return dict(json.loads(raw)) if raw else {}

    def exit_code(self) -> int:
        """0 for ``Success``; the ExitCode cause of ``NonZeroExitCode``."""
        st = self.status()
        if st.get("status") == "Success":
            return 0
        for cause in st.get("details", {}).get("causes", []):
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        raise StreamError(f"no exit code in {st}")

    def close(self) -> None:
        """Send a close frame (ends stdin for the server) and drop the connection."""
        if not self.closed.is_set():
            try:
                self._send(_OP_CLOSE, struct.pack("!H", 1000))
                self.closed.wait(2)
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
