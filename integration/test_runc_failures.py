"""When runc itself fails: missing, refusing a config, hanging, or its state disk full.

Each is a clear error to containerd, and the container running beside it is not affected:
it keeps running, and its exit status still comes through.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import pytest

from integration.embed import (
    RUNTIME,
    call,
    daemon_paths,
    oci_spec,
    run,
    start_daemon,
    write_bundle,
)
from integration.harness import Containerd, mounts_under, task_list, wait_for
from shim.api import runc_options_pb2, shim_pb2
from shim.store.statestore import StateStore
from shim.ttrpc import Code, TTRPCError

NS = "direct"


def _bystander(c: Containerd, busybox: str) -> int:
    c.run(RUNTIME, busybox, "keep", "sleep", "1000", detach=True)
    return task_list(c)["keep"][0]


def _bystander_unaffected(c: Containerd, pid: int) -> None:
    """Still running as the same process; killed, it reports 137 and goes away."""
    assert task_list(c)["keep"] == (pid, "RUNNING")
    c.ctr("task", "kill", "-s", "KILL", "keep")
    wait_for(lambda: task_list(c)["keep"][1] == "STOPPED", what="keep STOPPED")
    assert "exit code 137" in c.ctr("task", "delete", "keep").stderr
    c.ctr("container", "delete", "keep")


def _runc_ids(root: str) -> list[str]:
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def _create(address: str, bundle: str, id: str, **options: object) -> bytes:
    req = shim_pb2.CreateTaskRequest(id=id, bundle=bundle)
    if options:
        req.options.type_url = "containerd.runc.v1.Options"
        req.options.value = runc_options_pb2.Options(**options).SerializeToString()  # type: ignore[arg-type]
    return run(call(address, "Create", req, NS))


def test_runc_refusing_the_config(containerd: Containerd, busybox: str) -> None:
    pid = _bystander(containerd, busybox)
    r = containerd.run(RUNTIME, busybox, "bad", "/no/such/binary", check=False, rm=True)
    assert r.returncode != 0
    assert "/no/such/binary" in r.stderr and "no such file" in r.stderr.lower(), r.stderr
    assert "bad" not in task_list(containerd)
    assert _runc_ids(daemon_paths(containerd).runc_root_for("test")) == ["keep"]
    _bystander_unaffected(containerd, pid)


def test_runc_missing(containerd: Containerd, busybox: str) -> None:
    # The daemon's own PATH without runc: nothing can run, and it says why.
    b = write_bundle(containerd, NS, "m1", oci_spec(busybox, "true"))
    venv_bin = os.path.join(sys.prefix, "bin")
    address = start_daemon(containerd, b, NS, "m1", env={"PATH": venv_bin})
    with pytest.raises(TTRPCError) as info:
        _create(address, b, "m1")
    assert info.value.code == Code.FAILED_PRECONDITION
    assert "runc" in info.value.message and "PATH" in info.value.message, info.value.message
    assert sorted(os.listdir(b)) == ["address", "config.json"]


def test_runc_binary_option_pointing_nowhere(containerd: Containerd, busybox: str) -> None:
    pid = _bystander(containerd, busybox)
    b = write_bundle(containerd, NS, "m2", oci_spec(busybox, "true"))
    with pytest.raises(TTRPCError) as info:
        _create(daemon_paths(containerd).address, b, "m2", binary_name="/nowhere/runc")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.message.startswith("options.binary_name:"), info.value.message
    _bystander_unaffected(containerd, pid)


def test_runc_hanging_is_killed_at_the_timeout(containerd: Containerd, busybox: str) -> None:
    """A runc that never returns costs its own request an error after
    EMBEDSHIM_RUNC_TIMEOUT, and blocks nobody else meanwhile."""
    timeout = 3.0
    fake = os.path.join(containerd.tmp, "hung-runc")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\nexec sleep 600\n")
    os.chmod(fake, 0o755)
    b = write_bundle(containerd, NS, "h1", oci_spec(busybox, "true"))
    address = start_daemon(containerd, b, NS, "h1", env={"EMBEDSHIM_RUNC_TIMEOUT": str(timeout)})
    pid = _bystander(containerd, busybox)
    outcome: list[object] = []

    def hung_create() -> None:
        t0 = time.monotonic()
        try:
            _create(address, b, "h1", binary_name=fake)
        except TTRPCError as exc:
            outcome.append(exc)
        outcome.append(time.monotonic() - t0)

    worker = threading.Thread(target=hung_create)
    worker.start()
    try:
        daemon = _daemon_pid(containerd)
        (hung,) = wait_for(lambda: _hung_runcs(daemon), what="the create waiting on runc")
        t0 = time.monotonic()
        r = containerd.run(
            RUNTIME, busybox, "meanwhile", "sh", "-c", "exit 3", rm=True, check=False
        )
        took = time.monotonic() - t0
        assert r.returncode == 3, r.stderr
        # the hang lasted all along: the other container ran beside it, not after it
        assert not outcome, "the other container should have finished first"
        assert _hung_runcs(daemon) == [hung]
        assert took < timeout, took
    finally:
        worker.join(60)
    err, elapsed = outcome
    assert isinstance(err, TTRPCError) and "runc create: timed out after 3s" in err.message, err
    # runc create, then the cleanup's runc delete, each killed at the timeout.
    assert timeout <= elapsed < 3 * timeout, elapsed  # type: ignore[operator]
    assert not _hung_runcs(_daemon_pid(containerd)), "hung runc not killed"
    _bystander_unaffected(containerd, pid)


def _hung_runcs(daemon: int) -> list[str]:
    """The fake runc (``sleep 600``) running as a child of the daemon."""
    return [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _cmdline(p) == ["sleep", "600"] and _parent(p) == daemon
    ]


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def _daemon_pid(c: Containerd) -> int:
    with open(daemon_paths(c).pidfile) as f:
        return int(f.read())


def _mount_tmpfs(target: str, size: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(target, exist_ok=True)
    if libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, f"size={size},mode=700".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def _fill(directory: str) -> str:
    """Take every free byte of the filesystem of ``directory``; returns the file."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


def test_state_disk_full(containerd: Containerd, busybox: str) -> None:
    """EMBEDSHIM_ROOT on a tiny tmpfs, filled up: new containers are refused with a clear
    error (runc's state, or the state store); the running one is unaffected."""
    c = containerd
    _mount_tmpfs(c.embedshim_root, "8m")
    pid = _bystander(c, busybox)
    paths = daemon_paths(c)
    filler = _fill(c.embedshim_root)
    try:
        # Through containerd: runc cannot write its state.
        r = c.run(RUNTIME, busybox, "full1", "true", check=False, rm=True)
        assert r.returncode != 0
        assert "no space left on device" in r.stderr.lower(), r.stderr
        # runc's state elsewhere: now the state store itself is what is full.
        b = write_bundle(c, NS, "full2", oci_spec(busybox, "true"))
        alt_root = os.path.join(c.tmp, "runc-alt")
        with pytest.raises(TTRPCError) as info:
            _create(paths.address, b, "full2", root=alt_root)
        assert info.value.code == Code.UNAVAILABLE, info.value
        assert "state store" in info.value.message and "full" in info.value.message
        assert _runc_ids(os.path.join(alt_root, NS)) == []  # Root: one runc root per namespace
        assert _runc_ids(paths.runc_root_for("test")) == ["keep"]
        assert mounts_under(os.path.join(c.state)) == []
        # The running container exits and is deleted while the disk is still full.
        _bystander_unaffected(c, pid)
    finally:
        os.unlink(filler)
    # Space again: everything works, and nothing of the above is left in the store.
    r = c.run(RUNTIME, busybox, "after", "sh", "-c", "exit 5", rm=True, check=False)
    assert r.returncode == 5, r.stderr
    store = StateStore(paths.store)
    try:
        assert [(rec.namespace, rec.id) for rec in store.all()] == []
    finally:
        store.close()
