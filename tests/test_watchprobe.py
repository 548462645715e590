"""The watch program in the kernel: a process in a registered cgroup (v2) is counted and, only
while someone watches, put in the ring; a process anywhere else is neither."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from integration.prereq import bpf_problem, missing
from shim.exits import libbpf
from shim.oci.cgroups import cgroup_mounts
from shim.watch.watchevents import decode
from shim.watch.watchprobe import WatchProbe, cgroup_id_of_pid


def _v2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        return next((m.point for m in cgroup_mounts(f.read()) if m.v2 and m.root == "/"), None)


def _skip_reason() -> str | None:
    problem = bpf_problem()
    if problem is not None:
        return missing(problem)
    return None if _v2_mount() else missing("no cgroup2 hierarchy mounted")


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


@pytest.fixture
def probe() -> Iterator[WatchProbe]:
    libbpf.ensure_bpffs("/sys/fs/bpf")
    root = f"/sys/fs/bpf/embedshim-test-watch-{uuid.uuid4().hex[:8]}"
    p = WatchProbe.open(root)
    try:
        yield p
    finally:
        p.close()
        WatchProbe.uninstall(root)
        assert not os.path.exists(root)


@pytest.fixture
def cgroup() -> Iterator[str]:
    d = os.path.join(_v2_mount() or "", f"esh-watch-{uuid.uuid4().hex[:8]}")
    os.mkdir(d)
    try:
        yield d
    finally:
        os.rmdir(d)


def _run_in(cgroup: str | None, script: str) -> None:
    """Run ``sh -c script`` (moved into ``cgroup`` first: the exec of sh happens there)."""
    pre = f"echo $$ > {cgroup}/cgroup.procs; " if cgroup else ""
    p = subprocess.run(["/bin/sh", "-c", pre + f"exec /bin/sh -c '{script}'"], check=False)
    assert p.returncode == 3


def _ring(probe: WatchProbe) -> list[dict[str, object]]:
    out: list[bytes] = []
    with libbpf.RingBuffer(probe.events_fd(), out.append) as ring:
        ring.consume()
    return [got[1] for got in map(decode, out) if got is not None]


def test_counts_and_streams_only_registered_cgroups(probe: WatchProbe, cgroup: str) -> None:
    cgid = os.stat(cgroup).st_ino
    probe.add_container(cgid)
    assert probe.counters(cgid) == {"execs": 0, "exits": 0, "signaled": 0, "core_dumps": 0,
                                    "oom_kills": 0}  # fmt: skip
    # nobody watches: counters only, the ring stays empty
    _run_in(cgroup, "/bin/true; exit 3")
    c = probe.counters(cgid)
    assert c is not None and c["execs"] == 2 and c["exits"] >= 2, c  # sh, true; true, sh
    assert _ring(probe) == []
    # watching: records, decoded
    probe.watching = True
    try:
        _run_in(cgroup, "/bin/true; exit 3")
        _run_in(None, "/bin/true; exit 3")  # outside: not counted, not streamed
    finally:
        probe.watching = False
    events = _ring(probe)
    execs = [e["filename"] for e in events if e["event"] == "exec"]
    assert execs == ["/bin/sh", "/bin/true"], events
    exits = [e.get("exit_code") for e in events if e["event"] == "exit"]
    assert exits[-1] == 3 and set(exits) <= {0, 3}, events
    c2 = probe.counters(cgid)
    assert c2 is not None and c2["execs"] == 4 and c2["exits"] == 2 * c["exits"], (c, c2)
    assert probe.drops() == 0
    # re-adding keeps the counters; removing stops the counting
    probe.add_container(cgid)
    assert probe.counters(cgid) == c2
    assert probe.remove_container(cgid)
    _run_in(cgroup, "exit 3")
    assert probe.counters(cgid) is None


def test_cgroup_id_of_a_process(cgroup: str) -> None:
    p = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs; read x"],
                         stdin=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(200):
            if cgroup_id_of_pid(p.pid) is not None:
                break
            time.sleep(0.01)
        assert cgroup_id_of_pid(p.pid) == os.stat(cgroup).st_ino
    finally:
        p.communicate(b"\n")
    assert cgroup_id_of_pid(p.pid) is None  # gone
