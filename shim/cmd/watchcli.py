"""``watch``: stream the processes inside our containers (exec, exit, OOM kill), live.

Connects to the daemon's ``watch.sock`` (see shim.watch.watchd), prints a table (or ``--json``, one
object a line), and keeps going until interrupted: when no daemon runs it says so and waits
for one; when the daemon goes away (reload, crash and restart by the keeper, idle exit) it
reconnects and resumes after the last event it printed.  ``--stats`` prints the per-container
counters once, in the Prometheus text format, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from shim.cmd.flags import NAME, Flags
from shim.util.paths import DaemonPaths
from shim.watch.watchd import socket_path
from shim.watch.watchevents import EVENTS, TABLE_HEADER, Filter, prometheus, table_row

RETRY = 0.2  # seconds between connection attempts


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"{NAME} -address ADDR watch", description=__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--ns", action="append", default=[], help="only this namespace (repeatable)")
    p.add_argument("--id", action="append", default=[], help="only this container (repeatable)")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        help=f"only these events, comma-separated or repeated: {', '.join(EVENTS)}",
    )
    p.add_argument("--stats", action="store_true", help="counters per container (Prometheus)")
    return p.parse_args(argv)


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def _say(msg: str) -> None:
    sys.stderr.write(f"watch: {msg}\n")
    sys.stderr.flush()


def stats(path: str) -> int:
    s = _connect(path)
    if s is None:
        _say(f"no embedshim daemon runs (nothing listens on {path})")
        return 1
    with s:
        s.sendall(b'{"stats": true}\n')
        data = b"".join(iter(lambda: s.recv(65536), b""))
    reply = json.loads(data)
    sys.stdout.write(prometheus(reply.get("containers", []), int(reply.get("drops", 0))))
    return 0


def stream(path: str, flt: Filter, as_json: bool) -> int:
    out = sys.stdout
    state = _State()
    waiting_said = False
    if not as_json:
        out.write(TABLE_HEADER)
        out.flush()
    while True:
        s = _connect(path)
        if s is None:
            if not waiting_said:
                if state.connected_before:
                    _say("waiting for the daemon to come back")
                else:
                    _say(f"no embedshim daemon runs yet (nothing listens on {path}); waiting")
                waiting_said = True
            time.sleep(RETRY)
            continue
        waiting_said = False
        try:
            _read_stream(s, flt, state, as_json)
        except OSError:
            pass  # reset by a dying daemon: as good as closed
        finally:
            s.close()
        _say("the daemon closed the stream (reload, restart or exit); reconnecting")


class _State:
    """What outlives one connection: where to resume, and whether a daemon answered yet."""

    def __init__(self) -> None:
        self.after = 0  # ktime of the last event printed
        self.connected_before = False


def _read_stream(s: socket.socket, flt: Filter, state: _State, as_json: bool) -> None:
    """Print one connection's events until it ends: a chunk at a time, flushed once each
    (``--json`` passes the daemon's lines through as they are)."""
    out = sys.stdout.buffer
    s.sendall(json.dumps({"filter": flt.to_json(), "after": state.after}).encode() + b"\n")
    rest = b""
    while chunk := s.recv(1 << 16):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        printed: list[bytes] = []
        for raw in lines:
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            kind = ev.get("event")
            if kind == "hello":
                verb = "reconnected to" if state.connected_before else "connected to"
                pid, drops = ev.get("daemon_pid"), ev.get("drops", 0)
                _say(f"{verb} the daemon (pid {pid}); events dropped so far: {drops}")
                state.connected_before = True
                continue
            if kind == "error":
                raise SystemExit(f"watch: {ev.get('message')}")
            if kind in EVENTS:
                state.after = max(state.after, int(ev.get("ktime", 0)))
            # drops notices are part of the stream: "-- N events dropped" in the table
            printed.append(raw + b"\n" if as_json else table_row(ev).encode())
        if printed:
            out.write(b"".join(printed))
            out.flush()


def main(flags: Flags, argv: list[str]) -> int:
    if not flags.address:
        sys.stderr.write("watch: -address (containerd's address) is required\n")
        return 2
    args = _args(argv)
    events = [e.strip() for arg in args.event for e in arg.split(",") if e.strip()]
    try:
        flt = Filter(args.ns, args.id, events)
    except ValueError as exc:
        sys.stderr.write(f"watch: {exc}\n")
        return 2
    path = socket_path(DaemonPaths.for_containerd(flags.address))
    try:
        if args.stats:
            return stats(path)
        return stream(path, flt, args.json)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # the reader went away (`| head`): nothing more to say, and nowhere to say it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
