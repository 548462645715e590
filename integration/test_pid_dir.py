"""runc writes our pid files in the daemon's directory on /dev/shm (shim/oci/piddir.py),
not in containerd's bundle; a directory somebody else made there is not used."""

from __future__ import annotations

import os

from integration.embed import RUNTIME, daemon_paths, daemons
from integration.harness import Containerd, wait_for
from shim.oci import piddir

NS = "test"


def _bundle(c: Containerd, cid: str) -> str:
    return os.path.join(c.state, "io.containerd.runtime.v2.task", NS, cid)


def test_pid_files_are_in_the_daemons_directory_not_the_bundle(
    containerd: Containerd, busybox: str
) -> None:
    containerd.run(RUNTIME, busybox, "p1", "sleep", "1000", detach=True)
    pid_dir = piddir.path_for(daemon_paths(containerd).dir)
    init = os.path.join(pid_dir, piddir.file_name(NS, "p1"))
    (pid,) = [p.pid for p in daemons(containerd)]
    with open(init) as f:
        assert os.path.exists(f"/proc/{f.read().strip()}")  # the container's init
    st = os.lstat(pid_dir)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700)
    r = containerd.ctr("task", "exec", "--exec-id", "x1", "p1", "sh", "-c", "exit 4", check=False)
    assert r.returncode == 4
    # The exec's pid file was read and removed; the bundle never had one.
    assert os.listdir(pid_dir) == [os.path.basename(init)]
    assert not [n for n in os.listdir(_bundle(containerd, "p1")) if n.endswith(".pid")]
    containerd.ctr("task", "kill", "-s", "KILL", "p1")
    containerd.ctr("task", "delete", "p1")
    wait_for(lambda: os.listdir(pid_dir) == [], what="the init's pid file removed")
    assert [p.pid for p in daemons(containerd)] == [pid]


def test_a_directory_made_by_somebody_else_is_left_alone(
    containerd: Containerd, busybox: str
) -> None:
    """Made before the daemon starts, by another user: pid files go to the bundle, as
    without the directory, and the containers do not notice."""
    pid_dir = piddir.path_for(daemon_paths(containerd).dir)
    os.mkdir(pid_dir, 0o700)
    os.chown(pid_dir, 65534, 65534)
    containerd.run(RUNTIME, busybox, "p2", "sleep", "1000", detach=True)
    assert os.path.exists(os.path.join(_bundle(containerd, "p2"), "init.pid"))
    r = containerd.ctr("task", "exec", "--exec-id", "x1", "p2", "sh", "-c", "exit 5", check=False)
    assert r.returncode == 5
    assert os.listdir(pid_dir) == []
    containerd.ctr("task", "kill", "-s", "KILL", "p2")
    containerd.ctr("task", "delete", "p2")
    assert os.stat(pid_dir).st_uid == 65534  # untouched
