"""containerd's gRPC Tasks service, for what ctr 1.6 cannot do (Update, CloseIO of a terminal
exec, an exec on FIFOs the test owns) or cannot watch (Wait on one exec): a stub on the
instance's socket, the namespace in the metadata."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from integration.api import tasks_service_pb2 as pb
from integration.api import tasks_service_pb2_grpc as pb_grpc
from integration.harness import Containerd

LINUX_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
PROCESS_SPEC = "types.containerd.io/opencontainers/runtime-spec/1/Process"


class Tasks:
    def __init__(self, channel: grpc.Channel, namespace: str) -> None:
        self.stub = pb_grpc.TasksStub(channel)
        self.metadata = (("containerd-namespace", namespace),)

    def update(self, cid: str, resources: dict[str, Any] | bytes, type_url: str = "") -> None:
        value = resources if isinstance(resources, bytes) else json.dumps(resources).encode()
        req = pb.UpdateTaskRequest(container_id=cid)
        req.resources.type_url = type_url or LINUX_RESOURCES
        req.resources.value = value
        self.stub.Update(req, metadata=self.metadata, timeout=30)

    def wait(self, cid: str, exec_id: str = "", timeout: float = 30) -> int:
        req = pb.WaitRequest(container_id=cid, exec_id=exec_id)
        resp = self.stub.Wait(req, metadata=self.metadata, timeout=timeout)
        return int(resp.exit_status)

    def kill(self, cid: str, signal: int, exec_id: str = "") -> None:
        req = pb.KillRequest(container_id=cid, exec_id=exec_id, signal=signal)
        self.stub.Kill(req, metadata=self.metadata, timeout=30)

    def delete_process(self, cid: str, exec_id: str) -> pb.DeleteResponse:
        req = pb.DeleteProcessRequest(container_id=cid, exec_id=exec_id)
        resp: pb.DeleteResponse = self.stub.DeleteProcess(req, metadata=self.metadata, timeout=30)
        return resp

    def exec(
        self,
        cid: str,
        exec_id: str,
        process: dict[str, Any],
        *,
        stdin: str = "",
        stdout: str = "",
        stderr: str = "",
        terminal: bool = False,
    ) -> None:
        req = pb.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, stdin=stdin, stdout=stdout, stderr=stderr,
            terminal=terminal,
        )  # fmt: skip
        req.spec.type_url = PROCESS_SPEC
        req.spec.value = json.dumps(process).encode()
        self.stub.Exec(req, metadata=self.metadata, timeout=30)

    def start(self, cid: str, exec_id: str = "") -> int:
        req = pb.StartRequest(container_id=cid, exec_id=exec_id)
        return int(self.stub.Start(req, metadata=self.metadata, timeout=30).pid)

    def close_stdin(self, cid: str, exec_id: str = "") -> None:
        req = pb.CloseIORequest(container_id=cid, exec_id=exec_id, stdin=True)
        self.stub.CloseIO(req, metadata=self.metadata, timeout=30)

    def resize(self, cid: str, exec_id: str, width: int, height: int) -> None:
        req = pb.ResizePtyRequest(container_id=cid, exec_id=exec_id, width=width, height=height)
        self.stub.ResizePty(req, metadata=self.metadata, timeout=30)

    def pids(self, cid: str) -> pb.ListPidsResponse:
        req = pb.ListPidsRequest(container_id=cid)
        resp: pb.ListPidsResponse = self.stub.ListPids(req, metadata=self.metadata, timeout=30)
        return resp


@contextmanager
def tasks_client(c: Containerd, namespace: str | None = None) -> Iterator[Tasks]:
    channel = grpc.insecure_channel("unix://" + c.address)
    try:
        yield Tasks(channel, namespace or c.namespace)
    finally:
        channel.close()


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.RpcError) else None  # type: ignore[attr-defined]
