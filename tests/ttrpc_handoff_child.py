"""A ttrpc server that re-executes itself on SIGHUP, handing its live server over.

Used by tests/test_ttrpc_handoff.py::test_handoff_across_exec. Usage:

    python ttrpc_handoff_child.py SOCKET HANDOFF_FILE [GENERATION]

Generation 0 listens on SOCKET; on SIGHUP it quiesces (keeping ``Slow`` calls), writes the
handoff to HANDOFF_FILE and execv()s itself with GENERATION + 1, which adopts the server from
that file. Each generation prints ``ready <generation>`` once it serves, and
``handing over <generation>`` once it has quiesced and stopped reading.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shim.ttrpc import Context, Server, ServerHandoff  # noqa: E402

SVC = "test.v1.Handoff"


def fd_report() -> dict[str, object]:
    fds = [int(name) for name in os.listdir("/proc/self/fd")]
    alive = []
    for fd in fds:
        try:
            inheritable = os.get_inheritable(fd)
        except OSError:
            continue  # the directory listdir had open
        alive.append((fd, inheritable))
    return {
        "count": len(alive),
        "inheritable": [fd for fd, inheritable in alive if inheritable and fd > 2],
    }


async def serve(sock_path: str, handoff_path: str, generation: int) -> None:
    release = asyncio.Event()
    reload = asyncio.Event()

    async def info(ctx: Context, payload: bytes) -> bytes:
        report = {"pid": os.getpid(), "generation": generation, "fds": fd_report()}
        return json.dumps(report).encode()

    async def slow(ctx: Context, payload: bytes) -> bytes:
        await release.wait()
        return b"%s answered by generation %d" % (payload, generation)

    async def release_slow(ctx: Context, payload: bytes) -> bytes:
        release.set()
        return b""

    async def remember(ctx: Context, payload: bytes) -> bytes:
        ctx.connection["name"] = payload.decode()
        return b""

    async def recall(ctx: Context, payload: bytes) -> bytes:
        return str(ctx.connection.get("name")).encode()

    server = Server()
    server.register(
        SVC,
        {
            "Info": info,
            "Slow": slow,
            "Release": release_slow,
            "Remember": remember,
            "Recall": recall,
        },
    )
    if generation == 0:
        await server.start_unix(sock_path)
    else:
        with open(handoff_path) as f:
            handoff = ServerHandoff.from_json(f.read())
        os.unlink(handoff_path)
        await server.adopt(handoff)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload.set)
    print("ready", generation, flush=True)

    await reload.wait()
    await server.quiesce(keep=lambda ctx: ctx.method == "Slow", timeout=5)
    handoff = server.handoff()
    print("handing over", generation, flush=True)
    tmp = handoff_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(handoff.to_json())
    os.rename(tmp, handoff_path)
    for fd in handoff.fds():
        os.set_inheritable(fd, True)  # handoff() already did; this is what exec relies on
    argv = [sys.executable, os.path.abspath(__file__), sock_path, handoff_path]
    os.execv(sys.executable, [*argv, str(generation + 1)])


def main() -> None:
    sock_path, handoff_path = sys.argv[1], sys.argv[2]
    generation = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    asyncio.run(serve(sock_path, handoff_path, generation))


if __name__ == "__main__":
    main()
