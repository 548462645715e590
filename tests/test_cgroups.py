"""Finding a container's cgroup and reading its metrics, on fake cgroup trees (v1, hybrid,
unified) shaped like the kernel's files; the integration tests cover the real v1 host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.api import cgroups_v1_metrics_pb2 as v1pb
from shim.api import cgroups_v2_metrics_pb2 as v2pb
from shim.oci import metrics
from shim.oci.cgroups import Cgroup, CgroupError, cgroup_mounts, parse_proc_cgroup

HYBRID_MOUNTINFO = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:13 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/my\\040pids rw,nosuid shared:14 - cgroup cgroup rw,pids
"""
HYBRID_PROC = """\
12:pids:/test/box
4:cpu,cpuacct:/test/box
3:memory:/test/box
1:name=systemd:/user.slice
0::/user.slice
"""
UNIFIED_MOUNTINFO = (
    "30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate\n"
)


def test_hybrid_host_each_controller_has_its_directory() -> None:
    cg = Cgroup.resolve(HYBRID_PROC, cgroup_mounts(HYBRID_MOUNTINFO))
    assert not cg.unified
    assert cg.v1 == {
        "pids": "/sys/fs/cgroup/my pids/test/box",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct/test/box",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/test/box",
        "memory": "/sys/fs/cgroup/memory/test/box",
    }
    assert cg.dir("memory") == "/sys/fs/cgroup/memory/test/box"
    assert cg.dir("blkio") is None


def test_unified_host_one_directory() -> None:
    cg = Cgroup.resolve(
        "0::/system.slice/cri-containerd-x.scope\n", cgroup_mounts(UNIFIED_MOUNTINFO)
    )
    assert cg.unified and cg.v2 == "/sys/fs/cgroup/system.slice/cri-containerd-x.scope"
    assert cg.dir("memory") == cg.v2


def test_mount_of_a_subtree_and_a_cgroup_it_does_not_show() -> None:
    # Inside a container with its own cgroup mount of /kubepods/pod1 only.
    mountinfo = "40 30 0:30 /kubepods/pod1 /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    cg = Cgroup.resolve("3:memory:/kubepods/pod1/c1\n", cgroup_mounts(mountinfo))
    assert cg.v1 == {"memory": "/sys/fs/cgroup/memory/c1"}
    with pytest.raises(CgroupError):
        Cgroup.resolve("3:memory:/elsewhere/c1\n", cgroup_mounts(mountinfo))


def test_parse_proc_cgroup_leaves_out_named_hierarchies() -> None:
    v1, v2 = parse_proc_cgroup(HYBRID_PROC)
    assert "name=systemd" not in v1 and v1["cpuacct"] == "/test/box"
    assert v2 == "/user.slice"


def test_of_pid_of_a_gone_process() -> None:
    with pytest.raises(CgroupError):
        Cgroup.of_pid(0x7FFFFFFF)


def test_our_own_cgroup_reads() -> None:
    cg = Cgroup.of_pid(os.getpid())
    assert cg.exists()
    type_url, value = metrics.collect(cg)
    assert type_url in (metrics.V1_TYPE, metrics.V2_TYPE)
    assert value


def _files(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_v2_metrics_from_the_files(tmp_path: Path) -> None:
    _files(
        tmp_path,
        {
            "pids.current": "3\n",
            "pids.max": "max\n",
            "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
            "nr_periods 7\nnr_throttled 2\nthrottled_usec 30\ncore_sched.force_idle_usec 0\n",
            "memory.current": "1048576\n",
            "memory.max": "max\n",
            "memory.peak": "2097152\n",
            "memory.swap.current": "0\n",
            "memory.swap.max": "4096\n",
            "memory.stat": "anon 4096\nfile 8192\nshmem 12288\npgfault 99\n"
            "workingset_refault_anon 1\nworkingset_refault_file 2\nunknown_key 5\n",
            "memory.events": "low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\n",
            "io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n",
            "hugetlb.2MB.current": "0\n",
            "hugetlb.2MB.max": "max\n",
            "hugetlb.2MB.rsvd.current": "0\n",
            "rdma.current": "mlx4_0 hca_handle=2 hca_object=2000\n",
            "rdma.max": "mlx4_0 hca_handle=max hca_object=max\n",
        },
    )
    type_url, value = metrics.collect(Cgroup(v2=str(tmp_path)))
    assert type_url == "io.containerd.cgroups.v2.Metrics"
    m = v2pb.Metrics()
    m.ParseFromString(value)
    assert (m.pids.current, m.pids.limit) == (3, metrics.MAX_UINT64)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (1500, 1000, 500)
    assert (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec) == (7, 2, 30)
    mem = m.memory
    assert (mem.usage, mem.usage_limit, mem.max_usage) == (1048576, metrics.MAX_UINT64, 2097152)
    assert (mem.swap_usage, mem.swap_limit) == (0, 4096)
    assert (mem.anon, mem.file, mem.shmem, mem.pgfault) == (4096, 8192, 12288, 99)
    assert mem.workingset_refault == 3
    assert (m.memory_events.high, m.memory_events.oom, m.memory_events.oom_kill) == (1, 3, 4)
    (io,) = m.io.usage
    assert (io.major, io.minor, io.rbytes, io.wbytes, io.rios, io.wios) == (8, 0, 100, 200, 1, 2)
    (huge,) = m.hugetlb
    assert (huge.pagesize, huge.current, huge.max) == ("2MB", 0, metrics.MAX_UINT64)
    assert (m.rdma.current[0].device, m.rdma.current[0].hca_handles) == ("mlx4_0", 2)
    assert m.rdma.limit[0].hca_objects == metrics.MAX_UINT32


def test_v2_without_the_memory_controller(tmp_path: Path) -> None:
    _files(tmp_path, {"cpu.stat": "usage_usec 10\n"})
    m = v2pb.Metrics()
    m.ParseFromString(metrics.collect(Cgroup(v2=str(tmp_path)))[1])
    assert not m.HasField("memory") and not m.HasField("pids")
    assert m.cpu.usage_usec == 10


def test_v1_metrics_from_the_files(tmp_path: Path) -> None:
    mem, cpu, pids, blkio, huge = (tmp_path / n for n in ("mem", "cpu", "pids", "blkio", "huge"))
    _files(
        mem,
        {
            "memory.usage_in_bytes": "1048576\n",
            "memory.limit_in_bytes": "67108864\n",
            "memory.max_usage_in_bytes": "2097152\n",
            "memory.failcnt": "5\n",
            "memory.memsw.usage_in_bytes": "1048576\n",
            "memory.kmem.usage_in_bytes": "4096\n",
            "memory.stat": "cache 8192\nrss 4096\npgpgin 10\npgmajfault 1\n"
            "hierarchical_memsw_limit 9223372036854771712\ntotal_cache 8192\n"
            "total_pgpgout 11\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    _files(
        cpu,
        {
            "cpuacct.usage": "3000000000\n",
            "cpuacct.usage_percpu": "1000000000 2000000000 \n",
            "cpuacct.stat": "user 150\nsystem 50\n",
            "cpu.stat": "nr_periods 4\nnr_throttled 1\nthrottled_time 77\n",
        },
    )
    _files(pids, {"pids.current": "2\n", "pids.max": "max\n"})
    _files(
        blkio,
        {
            "blkio.throttle.io_serviced": "8:0 Read 3\n8:0 Write 4\n8:0 Total 7\nTotal 7\n",
            "blkio.throttle.io_service_bytes": "8:0 Read 4096\n8:0 Write 0\nTotal 4096\n",
        },
    )
    _files(
        huge,
        {
            "hugetlb.2MB.usage_in_bytes": "0\n",
            "hugetlb.2MB.max_usage_in_bytes": "2097152\n",
            "hugetlb.2MB.failcnt": "1\n",
            "hugetlb.2MB.rsvd.usage_in_bytes": "0\n",
        },
    )
    cg = Cgroup(
        v1={
            "memory": str(mem),
            "cpu": str(cpu),
            "cpuacct": str(cpu),
            "pids": str(pids),
            "blkio": str(blkio),
            "hugetlb": str(huge),
        }
    )
    type_url, value = metrics.collect(cg)
    assert type_url == "io.containerd.cgroups.v1.Metrics"
    m = v1pb.Metrics()
    m.ParseFromString(value)
    u = m.memory.usage
    assert (u.usage, u.limit, u.max, u.failcnt) == (1048576, 67108864, 2097152, 5)
    assert m.memory.swap.usage == 1048576 and m.memory.kernel.usage == 4096
    assert (m.memory.cache, m.memory.rss, m.memory.pg_pg_in, m.memory.pg_maj_fault) == (
        8192,
        4096,
        10,
        1,
    )
    assert m.memory.hierarchical_swap_limit == 9223372036854771712
    assert (m.memory.total_cache, m.memory.total_pg_pg_out) == (8192, 11)
    assert m.memory_oom_control.oom_kill == 2
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    cu = m.cpu.usage
    assert (cu.total, list(cu.per_cpu)) == (3000000000, [1000000000, 2000000000])
    assert (cu.user, cu.kernel) == (150 * tick, 50 * tick)
    t = m.cpu.throttling
    assert (t.periods, t.throttled_periods, t.throttled_time) == (4, 1, 77)
    assert (m.pids.current, m.pids.limit) == (2, 0)  # unlimited v1 pids: 0, as containerd
    ops = [(e.op, e.major, e.minor, e.value) for e in m.blkio.io_serviced_recursive]
    assert ops == [("Read", 8, 0, 3), ("Write", 8, 0, 4), ("Total", 8, 0, 7)]
    assert [e.value for e in m.blkio.io_service_bytes_recursive] == [4096, 0]
    (h,) = m.hugetlb
    assert (h.pagesize, h.usage, h.max, h.failcnt) == ("2MB", 0, 2097152, 1)


def test_v1_usage_entries_are_always_there(tmp_path: Path) -> None:
    """ctr dereferences memory.usage and cpu.usage: present even when the files are not."""
    (tmp_path / "m").mkdir()
    m = v1pb.Metrics()
    m.ParseFromString(
        metrics.collect(Cgroup(v1={"memory": str(tmp_path / "m"), "cpuacct": str(tmp_path / "m")}))[
            1
        ]
    )
    assert m.memory.HasField("usage") and m.cpu.HasField("usage")


def test_a_removed_cgroup_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CgroupError):
        metrics.collect(Cgroup(v1={"memory": str(tmp_path / "gone")}))
    with pytest.raises(CgroupError):
        metrics.collect(Cgroup(v2=str(tmp_path / "gone")))


def test_frozen(tmp_path: Path) -> None:
    _files(tmp_path / "f", {"freezer.state": "FROZEN\n"})
    assert Cgroup(v1={"freezer": str(tmp_path / "f")}).frozen() is True
    (tmp_path / "f" / "freezer.state").write_text("THAWED\n")
    assert Cgroup(v1={"freezer": str(tmp_path / "f")}).frozen() is False
    assert Cgroup(v1={"memory": str(tmp_path)}).frozen() is None
    _files(tmp_path / "u", {"cgroup.freeze": "1\n"})
    assert Cgroup(v2=str(tmp_path / "u")).frozen() is True
    assert Cgroup(v2=str(tmp_path / "nothing")).frozen() is None


def test_of_pid_reads_the_mounts_once_and_again_when_they_moved(tmp_path: Path) -> None:
    """mountinfo grows with every container: it is parsed once, and again only when the kept
    mounts no longer show a process's cgroup."""
    proc = tmp_path / "proc"
    _files(proc / "7", {"cgroup": "0::/pods/a\n"})
    v2_at = "30 1 0:26 / {} rw - cgroup2 cgroup2 rw\n"
    _files(proc / "self", {"mountinfo": v2_at.format("/sys/fs/cgroup")})
    assert Cgroup.of_pid(7, proc=str(proc)).v2 == "/sys/fs/cgroup/pods/a"
    (proc / "self" / "mountinfo").write_text("")  # not read again while the kept ones serve
    assert Cgroup.of_pid(7, proc=str(proc)).v2 == "/sys/fs/cgroup/pods/a"
    # A cgroup the kept mounts do not show: mountinfo is read again.
    _files(proc / "8", {"cgroup": "4:memory:/b\n"})
    v1_at = "31 1 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    (proc / "self" / "mountinfo").write_text(v1_at)
    assert Cgroup.of_pid(8, proc=str(proc)).v1 == {"memory": "/sys/fs/cgroup/memory/b"}


def test_watch_cgroup_id_uses_the_kept_mounts(tmp_path: Path) -> None:
    """The watch's cgroup id of a new container (shim.watch.watchprobe) does not parse
    mountinfo at every create either: only when the kept mounts do not show the cgroup."""
    from shim.watch.watchprobe import cgroup_id_of_pid

    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (cg / "pods" / "a").mkdir(parents=True)
    (cg / "pods" / "b").mkdir()
    _files(proc / "7", {"cgroup": "0::/pods/a\n"})
    _files(proc / "8", {"cgroup": "0::/pods/b\n"})
    _files(proc / "self", {"mountinfo": f"30 1 0:26 /pods/a {cg}/pods/a rw - cgroup2 cgroup2 rw\n"})
    assert cgroup_id_of_pid(7, proc=str(proc)) == os.stat(cg / "pods" / "a").st_ino
    (proc / "self" / "mountinfo").write_text("")  # not read again while the kept ones serve
    assert cgroup_id_of_pid(7, proc=str(proc)) == os.stat(cg / "pods" / "a").st_ino
    # One the kept mounts do not show: mountinfo is read again.
    (proc / "self" / "mountinfo").write_text(f"30 1 0:26 / {cg} rw - cgroup2 cgroup2 rw\n")
    assert cgroup_id_of_pid(8, proc=str(proc)) == os.stat(cg / "pods" / "b").st_ino
