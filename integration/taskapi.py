"""containerd's Tasks API over gRPC, for what ctr cannot do (CloseIO on a terminal exec, an
exec whose FIFOs the test owns).  Messages are encoded by hand: a handful of scalar fields,
numbered as in containerd 1.6's api/services/tasks/v1/tasks.proto."""

from __future__ import annotations

import json
from typing import Any

import grpc

SERVICE = "/containerd.services.tasks.v1.Tasks/"
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode(*fields: tuple[int, str | bytes | bool | int]) -> bytes:
    """A message from (field number, value) pairs: str/bytes length-delimited, bool/int
    varint.  Zero values are left out, as proto3 does."""
    out = bytearray()
    for num, value in fields:
        if isinstance(value, bool | int):
            if value:
                out += _varint(num << 3) + _varint(int(value))
        else:
            data = value.encode() if isinstance(value, str) else value
            if data:
                out += _varint(num << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def first_varint(data: bytes, field: int) -> int:
    """The value of varint field ``field`` in a message (0 when absent)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            if num == field:
                return value
        elif wire == 2:
            n, i = _read_varint(data, i)
            i += n
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"wire type {wire}")
    return 0


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


class Tasks:
    def __init__(self, address: str, namespace: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.metadata = (("containerd-namespace", namespace),)

    def call(self, method: str, payload: bytes, timeout: float = 30.0) -> bytes:
        fn = self.channel.unary_unary(SERVICE + method)
        result: bytes = fn(payload, metadata=self.metadata, timeout=timeout)
        return result

    def exec(
        self,
        container_id: str,
        exec_id: str,
        process: dict[str, Any],
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
    ) -> None:
        spec = encode((1, PROCESS_SPEC_URL), (2, json.dumps(process).encode()))
        self.call(
            "Exec",
            encode(
                (1, container_id),
                (2, stdin),
                (3, stdout),
                (4, stderr),
                (5, terminal),
                (6, spec),
                (7, exec_id),
            ),  # fmt: skip
        )

    def start(self, container_id: str, exec_id: str = "") -> int:
        return first_varint(self.call("Start", encode((1, container_id), (2, exec_id))), 1)

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self.call("CloseIO", encode((1, container_id), (2, exec_id), (3, True)))

    def resize(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        self.call("ResizePty", encode((1, container_id), (2, exec_id), (3, width), (4, height)))

    def wait(self, container_id: str, exec_id: str = "", timeout: float = 30.0) -> int:
        """The exit status; grpc.RpcError (DEADLINE_EXCEEDED) if still running."""
        reply = self.call("Wait", encode((1, container_id), (2, exec_id)), timeout=timeout)
        return first_varint(reply, 1)

    def delete_process(self, container_id: str, exec_id: str) -> None:
        self.call("DeleteProcess", encode((1, container_id), (2, exec_id)))

    def close(self) -> None:
        self.channel.close()
