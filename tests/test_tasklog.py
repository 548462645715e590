"""A task's lines for containerd's log (the bundle's ``log`` FIFO) go out after the step
that made them (after the answer of the request being served), in order, and the FIFO
closes after the last of them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

from shim.io.stdio import Stdio
from shim.oci.bundle import Bundle
from shim.tasks.task import Task


def test_lines_go_out_after_the_step_in_order_then_the_fifo_closes(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "log")
    reader = os.open(tmp_path / "log", os.O_RDONLY | os.O_NONBLOCK)
    deps = SimpleNamespace(oom=None, watch=None)  # what closing a task looks at
    task = Task("ns", "c1", Bundle(str(tmp_path), {}), None, deps, Stdio(), None)  # type: ignore[arg-type]

    async def main() -> tuple[bytes, bytes]:
        task.open_log()
        task.log_line("container created", pid=7)
        task.log_line("container deleted", exit_status=0)
        task.close()  # Delete closes the task in the same step as its last line
        try:
            during = os.read(reader, 4096)
        except BlockingIOError:
            during = b""
        await asyncio.sleep(0)
        return during, os.read(reader, 4096)

    try:
        during, after = asyncio.run(main())
        assert during == b""
        lines = after.decode().splitlines()
        assert [ln.split('msg="')[1].split('"')[0] for ln in lines] == [
            "container created",
            "container deleted",
        ], lines
        assert "ns=ns id=c1" in lines[0] and "pid=7" in lines[0]
        assert os.read(reader, 4096) == b""  # the writer is closed: EOF
        task.log_line("too late")  # after close: nothing, no error
    finally:
        os.close(reader)
