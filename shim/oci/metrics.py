"""A container's cgroup statistics, in the messages containerd decodes from Stats.

containerd (``ctr task metrics``, CRI's container stats) unmarshals the Stats Any by its bare
type URL: ``io.containerd.cgroups.v1.Metrics`` where the controllers live on v1 hierarchies,
``io.containerd.cgroups.v2.Metrics`` on a unified host.  The figures come from the same files,
with the same conventions, as containerd/cgroups reads them.  A controller whose files are
missing is left out, except that v1 memory and cpu always carry their ``usage`` entry: ctr
prints ``memory.Usage.Usage`` and ``cpu.Usage.Total`` without a nil check.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from google.protobuf.message import Message

from shim.api import cgroups_v1_metrics_pb2 as v1pb
from shim.api import cgroups_v2_metrics_pb2 as v2pb
from shim.oci.cgroups import Cgroup, CgroupError

V1_TYPE = v1pb.Metrics.DESCRIPTOR.full_name
V2_TYPE = v2pb.Metrics.DESCRIPTOR.full_name
MAX_UINT64 = (1 << 64) - 1
MAX_UINT32 = (1 << 32) - 1
_NS_PER_TICK = 1_000_000_000 // os.sysconf("SC_CLK_TCK")

# memory.stat keys whose field names differ from the key (v1)
_V1_MEMORY_RENAMED = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault",
    "total_pgmajfault": "total_pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}


def _scalars(cls: type[Message]) -> frozenset[str]:
    return frozenset(f.name for f in cls.DESCRIPTOR.fields if f.message_type is None)


_V1_MEMORY_FIELDS = _scalars(v1pb.MemoryStat)
_V2_MEMORY_FIELDS = _scalars(v2pb.MemoryStat)


def collect(cg: Cgroup) -> tuple[str, bytes]:
    """(type URL, serialized Metrics) for the container's cgroup."""
    if not cg.exists():
        raise CgroupError("the container's cgroup no longer exists")
    if cg.unified:
        return V2_TYPE, v2_metrics(cg.v2 or "").SerializeToString()
    return V1_TYPE, v1_metrics(cg).SerializeToString()


# --- reading cgroup files -----------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _uint(text: str, max_value: int = MAX_UINT64) -> int:
    """A cgroup number; "max" is ``max_value``; out of range values are clamped."""
    text = text.strip()
    if text == "max":
        return max_value
    return min(max(int(text), 0), MAX_UINT64)


def _read_uint(path: str, max_value: int = MAX_UINT64) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return _uint(text, max_value)
    except ValueError:
        return None


def _read_kv(path: str) -> dict[str, int] | None:
    """A flat keyed file (``key value`` per line)."""
    text = _read(path)
    if text is None:
        return None
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = _uint(parts[1])
            except ValueError:
                continue
    return out


def _set_from(msg: Message, values: dict[str, int], names: dict[str, str]) -> None:
    """msg.<names[key]> = values[key] for the keys present."""
    for key, name in names.items():
        if key in values:
            setattr(msg, name, values[key])


def _sizes(d: str, prefix: str, suffix: str) -> list[str]:
    """The hugepage sizes with a ``<prefix><size><suffix>`` file in ``d`` ("2MB", "1GB")."""
    try:
        names = os.listdir(d)
    except OSError:
        return []
    sizes = []
    for n in sorted(names):
        if n.startswith(prefix) and n.endswith(suffix):
            size = n[len(prefix) : len(n) - len(suffix)]
            if size and "." not in size:
                sizes.append(size)
    return sizes


def _rdma(d: str, add_current: Callable[[], Message], add_limit: Callable[[], Message]) -> None:
    """rdma.current / rdma.max: ``<device> hca_handle=N hca_object=N`` (``max`` allowed)."""
    for name, add in (("rdma.current", add_current), ("rdma.max", add_limit)):
        text = _read(os.path.join(d, name))
        for line in (text or "").splitlines():
            parts = line.split()
            if not parts:
                continue
            entry = add()
            entry.device = parts[0]  # type: ignore[attr-defined]
            for kv in parts[1:]:
                k, _, v = kv.partition("=")
                try:
                    value = _uint(v, MAX_UINT32) if v else 0
                except ValueError:
                    continue
                if k == "hca_handle":
                    entry.hca_handles = min(value, MAX_UINT32)  # type: ignore[attr-defined]
                elif k == "hca_object":
                    entry.hca_objects = min(value, MAX_UINT32)  # type: ignore[attr-defined]


# --- cgroup v1 ------------------------------------------------------------------------------


def v1_metrics(cg: Cgroup) -> v1pb.Metrics:
    m = v1pb.Metrics()
    if "memory" in cg.v1:
        _v1_memory(cg.v1["memory"], m)
    if "cpuacct" in cg.v1 or "cpu" in cg.v1:
        _v1_cpu(cg.v1.get("cpuacct"), cg.v1.get("cpu"), m)
    if "pids" in cg.v1:
        _v1_pids(cg.v1["pids"], m)
    if "blkio" in cg.v1:
        _v1_blkio(cg.v1["blkio"], m)
    if "hugetlb" in cg.v1:
        _v1_hugetlb(cg.v1["hugetlb"], m)
    if "rdma" in cg.v1:
        _rdma(cg.v1["rdma"], m.rdma.current.add, m.rdma.limit.add)
    return m


def _v1_memory(d: str, m: v1pb.Metrics) -> None:
    mem = m.memory
    for key, value in (_read_kv(os.path.join(d, "memory.stat")) or {}).items():
        name = _V1_MEMORY_RENAMED.get(key, key)
        if name in _V1_MEMORY_FIELDS:
            setattr(mem, name, value)
    for entry, prefix in (
        (mem.usage, "memory"),
        (mem.swap, "memory.memsw"),
        (mem.kernel, "memory.kmem"),
        (mem.kernel_tcp, "memory.kmem.tcp"),
    ):
        for name, suffix in (
            ("usage", "usage_in_bytes"),
            ("limit", "limit_in_bytes"),
            ("max", "max_usage_in_bytes"),
            ("failcnt", "failcnt"),
        ):
            number = _read_uint(os.path.join(d, f"{prefix}.{suffix}"))
            if number is not None:
                setattr(entry, name, number)
    mem.usage.SetInParent()
    oom = _read_kv(os.path.join(d, "memory.oom_control"))
    if oom is not None:
        names = [f.name for f in v1pb.MemoryOomControl.DESCRIPTOR.fields]
        _set_from(m.memory_oom_control, oom, {n: n for n in names})
        m.memory_oom_control.SetInParent()


def _v1_cpu(cpuacct: str | None, cpu: str | None, m: v1pb.Metrics) -> None:
    usage = m.cpu.usage
    usage.SetInParent()
    if cpuacct is not None:
        total = _read_uint(os.path.join(cpuacct, "cpuacct.usage"))
        if total is not None:
            usage.total = total
        per_cpu = _read(os.path.join(cpuacct, "cpuacct.usage_percpu"))
        if per_cpu is not None:
            usage.per_cpu.extend(_uint(v) for v in per_cpu.split())
        ticks = _read_kv(os.path.join(cpuacct, "cpuacct.stat")) or {}
        if "user" in ticks:
            usage.user = min(ticks["user"] * _NS_PER_TICK, MAX_UINT64)
        if "system" in ticks:
            usage.kernel = min(ticks["system"] * _NS_PER_TICK, MAX_UINT64)
    if cpu is not None:
        stat = _read_kv(os.path.join(cpu, "cpu.stat"))
        if stat is not None:
            _set_from(
                m.cpu.throttling,
                stat,
                {
                    "nr_periods": "periods",
                    "nr_throttled": "throttled_periods",
                    "throttled_time": "throttled_time",
                },
            )
            m.cpu.throttling.SetInParent()


def _v1_pids(d: str, m: v1pb.Metrics) -> None:
    current = _read_uint(os.path.join(d, "pids.current"))
    if current is None:
        return
    m.pids.current = current
    # containerd/cgroups reports an unlimited v1 pids.max as 0
    m.pids.limit = _read_uint(os.path.join(d, "pids.max"), max_value=0) or 0
    m.pids.SetInParent()


_CFQ_FILES = (
    ("sectors_recursive", "blkio.sectors_recursive"),
    ("io_service_bytes_recursive", "blkio.io_service_bytes_recursive"),
    ("io_serviced_recursive", "blkio.io_serviced_recursive"),
    ("io_queued_recursive", "blkio.io_queued_recursive"),
    ("io_service_time_recursive", "blkio.io_service_time_recursive"),
    ("io_wait_time_recursive", "blkio.io_wait_time_recursive"),
    ("io_merged_recursive", "blkio.io_merged_recursive"),
    ("io_time_recursive", "blkio.time_recursive"),
)
# Without CFQ (every kernel since 5.0) only the throttle files count I/O.
_THROTTLE_FILES = (
    ("io_serviced_recursive", "blkio.throttle.io_serviced"),
    ("io_service_bytes_recursive", "blkio.throttle.io_service_bytes"),
)


def block_devices(partitions: str = "/proc/partitions") -> dict[tuple[int, int], str]:
    """(major, minor) -> /dev path, from /proc/partitions (as containerd names them)."""
    out: dict[tuple[int, int], str] = {}
    for line in (_read(partitions) or "").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            out[(int(parts[0]), int(parts[1]))] = "/dev/" + parts[3]
    return out


def _v1_blkio(d: str, m: v1pb.Metrics) -> None:
    blkio = m.blkio
    blkio.SetInParent()
    devices = block_devices()

    def read(files: tuple[tuple[str, str], ...]) -> int:
        n = 0
        for field, name in files:
            for line in (_read(os.path.join(d, name)) or "").splitlines():
                parts = line.split()
                if len(parts) < 2 or ":" not in parts[0]:
                    continue  # the "Total N" line
                major_s, _, minor_s = parts[0].partition(":")
                try:
                    major, minor, value = int(major_s), int(minor_s), _uint(parts[-1])
                except ValueError:
                    continue
                op = parts[1] if len(parts) >= 3 else ""
                getattr(blkio, field).add(
                    op=op,
                    device=devices.get((major, minor), ""),
                    major=major,
                    minor=minor,
                    value=value,
                )
                n += 1
        return n

    if os.path.exists(os.path.join(d, "blkio.io_serviced_recursive")) and read(_CFQ_FILES):
        return
    read(_THROTTLE_FILES)  # nothing was added above


def _v1_hugetlb(d: str, m: v1pb.Metrics) -> None:
    for size in _sizes(d, "hugetlb.", ".usage_in_bytes"):
        entry = m.hugetlb.add(pagesize=size)
        for name, suffix in (
            ("usage", "usage_in_bytes"),
            ("max", "max_usage_in_bytes"),
            ("failcnt", "failcnt"),
        ):
            value = _read_uint(os.path.join(d, f"hugetlb.{size}.{suffix}"))
            if value is not None:
                setattr(entry, name, value)


# --- cgroup v2 ------------------------------------------------------------------------------


def v2_metrics(d: str) -> v2pb.Metrics:
    m = v2pb.Metrics()
    current = _read_uint(os.path.join(d, "pids.current"))
    if current is not None:
        m.pids.current = current
        m.pids.limit = _read_uint(os.path.join(d, "pids.max")) or 0
        m.pids.SetInParent()
    cpu = _read_kv(os.path.join(d, "cpu.stat"))
    if cpu is not None:
        _set_from(m.cpu, cpu, {f.name: f.name for f in v2pb.CPUStat.DESCRIPTOR.fields})
        m.cpu.SetInParent()
    _v2_memory(d, m)
    _v2_io(d, m)
    for size in _sizes(d, "hugetlb.", ".current"):
        entry = m.hugetlb.add(pagesize=size)
        entry.current = _read_uint(os.path.join(d, f"hugetlb.{size}.current")) or 0
        entry.max = _read_uint(os.path.join(d, f"hugetlb.{size}.max")) or 0
    _rdma(d, m.rdma.current.add, m.rdma.limit.add)
    return m


def _v2_memory(d: str, m: v2pb.Metrics) -> None:
    usage = _read_uint(os.path.join(d, "memory.current"))
    if usage is None:
        return  # the memory controller is not enabled for this cgroup
    mem = m.memory
    stat = _read_kv(os.path.join(d, "memory.stat")) or {}
    # Linux 5.9 split these in two (_anon, _file); report the sum under the old name.
    for key in ("workingset_refault", "workingset_activate"):
        if key not in stat and f"{key}_anon" in stat:
            stat[key] = stat[f"{key}_anon"] + stat.get(f"{key}_file", 0)
    for key, value in stat.items():
        if key in _V2_MEMORY_FIELDS:
            setattr(mem, key, value)
    mem.usage = usage
    for name, file in (
        ("usage_limit", "memory.max"),
        ("swap_usage", "memory.swap.current"),
        ("swap_limit", "memory.swap.max"),
        ("max_usage", "memory.peak"),
        ("swap_max_usage", "memory.swap.peak"),
    ):
        number = _read_uint(os.path.join(d, file))
        if number is not None:
            setattr(mem, name, number)
    events = _read_kv(os.path.join(d, "memory.events"))
    if events is not None:
        _set_from(
            m.memory_events, events, {f.name: f.name for f in v2pb.MemoryEvents.DESCRIPTOR.fields}
        )
        m.memory_events.SetInParent()


def _v2_io(d: str, m: v2pb.Metrics) -> None:
    text = _read(os.path.join(d, "io.stat"))
    if text is None:
        return
    m.io.SetInParent()
    names = {"rbytes", "wbytes", "rios", "wios"}
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        major_s, _, minor_s = parts[0].partition(":")
        try:
            entry = m.io.usage.add(major=int(major_s), minor=int(minor_s))
        except ValueError:
            continue
        for kv in parts[1:]:
            k, _, v = kv.partition("=")
            if k in names:
                try:
                    setattr(entry, k, _uint(v))
                except ValueError:
                    continue
