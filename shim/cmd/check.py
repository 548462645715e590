"""``check``: which kernel features are here, and which mode the daemon would run in."""

from __future__ import annotations

import os
import shutil
import sys

from shim.cmd.flags import Flags
from shim.util.paths import DEFAULT_BPF_ROOT, DaemonPaths


def _pidfd() -> tuple[bool, str]:
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError) as exc:
        return False, f"pidfd_open: {exc}"
    return True, "pidfd_open works"


def _pidfd_info() -> tuple[bool, str]:
    from shim.util import procinfo

    fd = os.pidfd_open(os.getpid())
    try:
        import fcntl
        import struct

        buf = bytearray(72)
        struct.pack_into("=Q", buf, 0, 0)
        fcntl.ioctl(fd, procinfo.PIDFD_GET_INFO, buf)
    except OSError as exc:
        return False, f"PIDFD_GET_INFO: {exc.strerror} (Linux 6.15+)"
    finally:
        os.close(fd)
    return True, "PIDFD_GET_INFO works (exit status of reaped non-children)"


def _cgroups() -> str:
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v2 (unified)"
    if os.path.isdir("/sys/fs/cgroup/unified"):
        return "v1 (hybrid: v2 at /sys/fs/cgroup/unified)"
    return "v1"


def _oom() -> tuple[bool, str]:
    from shim.oci.cgroups import cgroup_mounts

    mounts = cgroup_mounts(_read("/proc/self/mountinfo"))
    for m in mounts:
        if not m.v2 and "memory" in m.controllers:
            return True, f"cgroup v1 memory.oom_control oom_kill count, eventfd ({m.point})"
    for m in mounts:
        if m.v2 and "memory" in _read(os.path.join(m.point, "cgroup.controllers")).split():
            return True, f"cgroup v2 memory.events oom_kill count, inotify ({m.point})"
    return False, "no memory cgroup controller mounted"


def _watch(pin_root: str) -> tuple[bool, str]:
    """The `watch` program of this daemon, and how many events the kernel dropped."""
    from shim.watch.watchprobe import WatchProbe, default_object_path

    probe = WatchProbe.open_existing(pin_root)
    if probe is None:
        obj = default_object_path()
        if not os.path.isfile(obj):
            return False, f"BPF object {obj} missing"
        return True, f"not loaded yet (the daemon loads {obj})"
    with probe:
        state = "streaming" if probe.watching else "no watcher"
        return True, f"loaded, {state}; events dropped: {probe.drops()}"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _criu() -> tuple[bool, str]:
    """`criu check`, as the daemon runs it before a checkpoint or restore."""
    import subprocess

    from shim.oci.checkpoint import DEFAULT_CRIU, reason

    path = shutil.which(DEFAULT_CRIU)
    if path is None:
        return False, "criu not on PATH (Debian package: criu)"
    try:
        r = subprocess.run([path, "check"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{path} check: {exc}"
    if r.returncode == 0:
        return True, f"{path} check passes"
    return False, f"{path} check: {reason(r.stdout + r.stderr)}"


def main(flags: Flags) -> int:
    from shim.exits.exittrack import ExitTracker

    paths = DaemonPaths.for_containerd(flags.address) if flags.address else None
    pin_root = paths.bpf_pin_root if paths else DEFAULT_BPF_ROOT
    rows: list[tuple[str, bool, str]] = []
    ok, why = _pidfd()
    rows.append(("pidfd", ok, why))
    ok, why = _pidfd_info()
    rows.append(("pidfd exit info", ok, why))
    rows.append(("BTF", os.path.exists("/sys/kernel/btf/vmlinux"), "/sys/kernel/btf/vmlinux"))
    from shim.exits import libbpf

    rows.append(("bpffs", libbpf.is_bpffs("/sys/fs/bpf"), "/sys/fs/bpf"))
    from shim.exits.exittrack import default_object_path

    obj = default_object_path()
    rows.append(
        ("BPF object", os.path.isfile(obj), obj if os.path.isfile(obj) else f"{obj} missing")
    )
    bpf_ok, bpf_why = ExitTracker.available(pin_root)
    rows.append(("BPF exit tracking", bpf_ok, bpf_why))
    rows.append(("watch", *_watch(pin_root)))
    for tool in ("runc", "containerd"):
        found = shutil.which(tool)
        rows.append((tool, found is not None, found or "not on PATH"))
    rows.append(("root", os.geteuid() == 0, f"euid {os.geteuid()}"))
    rows.append(("OOM events", *_oom()))
    rows.append(("checkpoint (CRIU)", *_criu()))
    from shim.util import packaged

    keeper = packaged.keeper()
    rows.append(("crash survival", keeper is not None, keeper or packaged.keeper_missing()))
    holder = packaged.holder()
    rows.append(
        (
            "pod sandboxes (sandboxer = shim)",
            holder is not None,
            holder or "embedshim-holder not built (make setup): podsandbox mode only",
        )
    )
    width = max(len(r[0]) for r in rows)
    for name, good, detail in rows:
        sys.stdout.write(f"{name:<{width}}  {'yes' if good else 'no ':<3}  {detail}\n")
    sys.stdout.write(f"cgroups{' ' * (width - 7)}  {_cgroups()}\n")
    mode = "bpf+pidfd" if bpf_ok else "pidfd+waitid only (exits while no daemon runs are lost)"
    sys.stdout.write(f"\nmode: {mode}\n")
    if not bpf_ok:
        sys.stdout.write(f"WARNING: no BPF exit tracking: {bpf_why}\n")
    if keeper is None:
        sys.stdout.write(f"WARNING: no crash survival: {packaged.keeper_missing()}\n")
    if paths is not None:
        from shim.cmd.reload import info

        running = info(paths)
        if running is not None:
            sys.stdout.write(
                "daemon: pid {pid}, keeper {keeper}, generation {generation}, "
                "crashes {crashes}, tasks {tasks}\n".format(**running)
            )
    return 0 if rows[0][1] else 1
