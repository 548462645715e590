"""runc runs from the daemon's sealed copy of its binary (shim/oci/sealedrunc.py).

With the real runc: the container's ``runc init`` (what waits for Start) is the copy, sealed
as runc requires before it skips its own clone or bind mount; the daemon keeps one copy
however many commands it runs; and the containers behave as before.
"""

from __future__ import annotations

import fcntl
import os

from integration.embed import (
    call,
    daemon_paths,
    oci_spec,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd
from shim.api import shim_pb2
from shim.oci.sealedrunc import NAME, SEALS

NS = "direct"  # what call() speaks in
COPY = f"/memfd:{NAME} (deleted)"


def _copies_held(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    held = 0
    for fd in os.listdir(fd_dir):
        try:
            held += os.readlink(os.path.join(fd_dir, fd)) == COPY
        except FileNotFoundError:
            pass
    return held


def test_runc_init_runs_from_one_sealed_copy(containerd: Containerd, busybox: str) -> None:
    ids = ["c1", "c2", "c3"]
    bundles = {
        i: write_bundle(containerd, NS, i, oci_spec(busybox, "sh", "-c", "exit 3")) for i in ids
    }
    address = start_daemon(containerd, bundles["c1"], NS, "c1")
    with open(daemon_paths(containerd).pidfile) as f:
        daemon = int(f.read())
    pids = {}
    for i in ids:
        created = run(call(address, "Create", shim_pb2.CreateTaskRequest(id=i, bundle=bundles[i])))
        pids[i] = shim_pb2.CreateTaskResponse.FromString(created).pid
    # The first Create ran runc from the disk (and made the copy meanwhile); the next ones
    # run it from the copy: runc init, waiting for Start, is the copy, sealed.
    for i in ids[1:]:
        exe = f"/proc/{pids[i]}/exe"
        assert os.readlink(exe) == COPY
        fd = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        finally:
            os.close(fd)
    assert _copies_held(daemon) == 1
    # And the containers are what they were: each runs its command, with its exit code.
    for i in ids:
        run(call(address, "Start", shim_pb2.StartRequest(id=i)))
        wait = shim_pb2.WaitResponse.FromString(
            run(call(address, "Wait", shim_pb2.WaitRequest(id=i)))
        )
        assert wait.exit_status == 3
        run(call(address, "Delete", shim_pb2.DeleteRequest(id=i)))
    assert _copies_held(daemon) == 1  # one copy, not one per command
