"""``reload``: upgrade this containerd's daemon in place (SIGHUP: it re-execs, same pid).

Run after installing a new embedshim: the daemon keeps its socket, containerd's connections
and its containers, and comes back on the new code.  Prints the daemon's info before and
after, and fails if it does not answer again within the timeout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from shim.cmd.flags import NAME, Flags
from shim.ttrpc.blocking import BlockingClient
from shim.ttrpc.errors import TTRPCError
from shim.util.paths import DaemonPaths

DAEMON_SERVICE = "embedshim.v1.Daemon"
TIMEOUT = 30.0


def info(paths: DaemonPaths) -> dict[str, object] | None:
    try:
        with BlockingClient(paths.address, timeout=5.0) as client:
            out = client.call(DAEMON_SERVICE, "Info", b"")
    except (OSError, TTRPCError):
        return None
    data: dict[str, object] = json.loads(out)
    return data


def main(flags: Flags) -> int:
    if not flags.address:
        sys.stderr.write("reload: -address (containerd's address) is required\n")
        return 2
    paths = DaemonPaths.for_containerd(flags.address)
    before = info(paths)
    if before is None:
        sys.stderr.write(f"reload: no daemon answers on {paths.socket}\n")
        return 1
    pid = int(str(before["pid"]))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        if NAME.encode() not in f.read():
            sys.stderr.write(f"reload: pid {pid} is not an embedshim daemon\n")
            return 1
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        after = info(paths)
        if after is not None and after["started_at"] != before["started_at"]:
            sys.stdout.write(json.dumps({"before": before, "after": after}) + "\n")
            return 0 if after["pid"] == pid else 1
    sys.stderr.write(f"reload: daemon did not come back within {TIMEOUT:.0f}s; see {paths.log}\n")
    return 1
