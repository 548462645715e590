"""Stdio URIs (shim/io/stdio.py) and the logging-binary protocol (shim/io/logbinary.py) on their
own: parsing, refusal of what containerd refuses, start/ready/stop of a real program."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from shim.exits.reaper import Reaper
from shim.io import logbinary
from shim.io.logbinary import LoggingBinary, command
from shim.io.stdio import Stdio, output_scheme
from shim.ttrpc import Code, TTRPCError


def test_command_from_uri() -> None:
    assert command("binary:///usr/bin/logger") == ["/usr/bin/logger"]
    # Each key once (its first value), in order; a bare key gets an empty value, as in Go.
    assert command("binary:///l?a=1&flag&a=2&b=x%20y") == ["/l", "a", "1", "flag", "", "b", "x y"]
    for bad in ("binary://relative/logger", "binary:", "file:///x"):
        with pytest.raises(TTRPCError) as err:
            command(bad)
        assert err.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("io", "want"),
    [
        (Stdio(), ""),
        (Stdio(stdin="/f/in"), ""),
        (Stdio(stdout="/f/out", stderr="/f/err"), "fifo"),
        (Stdio(stderr="/f/err"), "fifo"),
        (Stdio(stdout="fifo:///f/out"), "fifo"),
        (Stdio(stdout="file:///l", stderr="file:///l"), "file"),
        (Stdio(stdout="file:///l"), "file"),
        (Stdio(stdout="binary:///b?x=1", stderr="binary:///b?x=1"), "binary"),
        (Stdio(stdout="binary:///b", stderr="/f/err"), "binary"),
    ],
)
def test_output_scheme(io: Stdio, want: str) -> None:
    assert output_scheme(io) == want


@pytest.mark.parametrize(
    "io",
    [
        Stdio(stdout="foo:///x"),
        Stdio(stdout="/f/out", stderr="binary:///b"),
        Stdio(stdout="file:///a", stderr="file:///b"),
    ],
)
def test_refused_outputs(io: Stdio) -> None:
    with pytest.raises(TTRPCError) as err:
        output_scheme(io)
    assert err.value.code == Code.INVALID_ARGUMENT


PROGRAM = """#!{python} -S
import os, sys, time
if "slow" in sys.argv:
    time.sleep(30)
os.write(5, b"r")
with open(sys.argv[2], "wb") as f:
    f.write(os.environ["CONTAINER_ID"].encode() + b" " + os.read(3, 100) + os.read(4, 100))
"""


def _program(tmp_path: Path) -> str:
    p = tmp_path / "prog"
    p.write_text(PROGRAM.format(python=sys.executable))
    p.chmod(0o755)
    return str(p)


def test_start_ready_and_exit(tmp_path: Path) -> None:
    prog, dest = _program(tmp_path), tmp_path / "got"

    async def main() -> None:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            lb, out_w, err_w = await LoggingBinary.start(
                f"binary://{prog}?dest={dest}", "c1", "ns", reaper
            )
            os.write(out_w, b"o")
            os.write(err_w, b"e")
            os.close(out_w)
            os.close(err_w)
            await asyncio.wait_for(asyncio.shield(lb.exited), 10)
            await lb.stop()  # nothing left to do
        finally:
            reaper.close()

    asyncio.run(main())
    assert dest.read_bytes() == b"c1 oe"


def test_not_ready_in_time_is_an_error_and_the_program_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logbinary, "READY_TIMEOUT", 0.3)
    prog = _program(tmp_path)
    seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reaper = Reaper(loop)
        watch = reaper.watch
        reaper.watch = lambda pid: seen.append(pid) or watch(pid)  # type: ignore[method-assign]
        try:
            with pytest.raises(TTRPCError) as err:
                await LoggingBinary.start(f"binary://{prog}?dest=/dev/null&slow", "c", "n", reaper)
            assert "readiness" in err.value.message
            (pid,) = seen
            ex = await asyncio.wait_for(watch(pid), 5)
            assert ex.status == 128 + signal.SIGKILL
        finally:
            reaper.close()

    asyncio.run(main())


def test_missing_program_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            with pytest.raises(TTRPCError) as err:
                await LoggingBinary.start(f"binary://{tmp_path}/none", "c", "n", reaper)
            assert err.value.code == Code.INVALID_ARGUMENT
        finally:
            reaper.close()

    asyncio.run(main())
