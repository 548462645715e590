"""Exit-status tracking with a pinned BPF program (bpf/exitsnoop.bpf.c).

The daemon registers the host pid of each process it starts (before the
process can exit) together with a never-reused trace id.  The BPF program,
attached to ``sched_process_exit`` through a *pinned* link, records the thread
group's wait(2) status in the pinned ``exits`` map when the last thread exits,
whether or not any user-space process is running at that moment.  The map is
the source of truth; a ring buffer carries the trace id to wake the daemon.

Pin layout (one directory per map layout version, so a changed layout is never
reused by mistake)::

    <pin_root>/v<LAYOUT_VERSION>/   tracked exits exit_ring stats link

Start-time unit (``start_boottime`` everywhere): boot-clock nanoseconds
truncated to USER_HZ ticks, i.e. ``/proc/<pid>/stat`` field 22 times
10_000_000.  The BPF side stores ``(leader->start_boottime / 10ms) * 10ms``,
which is exactly that value (``/proc`` truncates the same way), so a value from
:func:`process_start_boottime` compares equal with the one in the maps.  It is
only a pid-reuse guard: two processes started in the same 10 ms tick with the
same pid cannot exist.  The daemon must run in the host pid and time namespaces.

Import cost is kept small (no ctypes, typing or dataclasses at import time):
the short-lived ``delete`` subcommand imports this module.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time

from shim.exits import pins
from shim.exits.libbpf import BPFError
from shim.util import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime
    from collections.abc import Iterator

    from shim.exits.libbpf import RingBuffer

__all__ = [
    "LAYOUT_VERSION",
    "DEFAULT_PIN_ROOT",
    "BPFError",
    "TrackedMapFull",
    "ExitRecord",
    "ExitTracker",
    "process_start_boottime",
    "default_object_path",
]

LAYOUT_VERSION = 1  # keep equal to EXITSNOOP_LAYOUT_VERSION in bpf/exitsnoop.bpf.c
DEFAULT_PIN_ROOT = "/sys/fs/bpf/embedshim"
BPFFS_MOUNT = "/sys/fs/bpf"
PROG_NAME = f"exitsnoop_v{LAYOUT_VERSION}"
LINK_PIN = "link"
MAP_TRACKED, MAP_EXITS, MAP_RING, MAP_STATS = "tracked", "exits", "exit_ring", "stats"
MAPS = (MAP_TRACKED, MAP_EXITS, MAP_RING, MAP_STATS)
TRACKED_MAX = 16384
EXITS_MAX = 16384
STAT_NAMES = ("recorded", "exits_full", "ring_drop", "stale", "duplicate")
STAT_SLOTS = 8
TICK_NS = 10_000_000  # 1 / USER_HZ; the BPF program hard-codes USER_HZ = 100
OBJECT_ENV = "EMBEDSHIM_EXITSNOOP_OBJ"

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_TRACKED_VAL = struct.Struct("=QQ")  # trace_id, start_boottime
_EXIT_REC = struct.Struct("=IiQQ")  # pid, exit_code, start_boottime, exited_at

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


class TrackedMapFull(BPFError):
    """``register`` failed because the ``tracked`` map is full."""


def default_object_path() -> str:
    """``$EMBEDSHIM_EXITSNOOP_OBJ``, else the object shipped in the package
    (``shim/data/exitsnoop.bpf.o``), else the committed ``<checkout>/bpf/exitsnoop.bpf.o``
    (see shim.util.packaged)."""
    env = os.environ.get(OBJECT_ENV)
    if env:
        return env
    from shim.util import packaged

    return packaged.bpf_object()


def process_start_boottime(pid: int) -> int:
    """Start time of ``pid`` in the unit the BPF program stores (see module doc).

    Raises ProcessLookupError if the process does not exist.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    ticks = int(fields[22 - 3])
    hz = os.sysconf("SC_CLK_TCK")
    return ticks * (1_000_000_000 // hz)


def _wall_from_boot_ns(boot_ns: int) -> int:
    now_boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return time.time_ns() - (now_boot - boot_ns)


class ExitRecord:
    """One record of the ``exits`` map (immutable value object).

    A plain ``__slots__`` class rather than ``@dataclass``: importing
    dataclasses costs ~25 ms here, and this module is on a latency-sensitive path.
    """

    __slots__ = ("trace_id", "pid", "wait_status", "start_boottime", "exited_at_ns")

    trace_id: int
    pid: int
    wait_status: int  # raw wait(2) status as the kernel keeps it
    start_boottime: int  # see module doc
    exited_at_ns: int  # CLOCK_BOOTTIME ns

    def __init__(
        self, trace_id: int, pid: int, wait_status: int, start_boottime: int, exited_at_ns: int
    ) -> None:
        object.__setattr__(self, "trace_id", trace_id)
        object.__setattr__(self, "pid", pid)
        object.__setattr__(self, "wait_status", wait_status)
        object.__setattr__(self, "start_boottime", start_boottime)
        object.__setattr__(self, "exited_at_ns", exited_at_ns)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ExitRecord is immutable ({name})")

    def _key(self) -> tuple[int, int, int, int, int]:
        return (self.trace_id, self.pid, self.wait_status, self.start_boottime, self.exited_at_ns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExitRecord) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"ExitRecord(trace_id={self.trace_id}, pid={self.pid}, "
            f"wait_status={self.wait_status:#06x}, start_boottime={self.start_boottime}, "
            f"exited_at_ns={self.exited_at_ns})"
        )

    @property
    def signal(self) -> int:
        """Terminating signal number, 0 if the process exited normally."""
        return self.wait_status & 0x7F

    @property
    def core_dumped(self) -> bool:
        return bool(self.wait_status & 0x80)

    @property
    def exit_status(self) -> int:
        """containerd's convention: the exit code, or 128 + signal (SIGKILL -> 137)."""
        sig = self.signal
        return 128 + sig if sig else (self.wait_status >> 8) & 0xFF

    def exited_at_wall_ns(self) -> int:
        """Exit time as CLOCK_REALTIME ns (converted through the current boot offset)."""
        return _wall_from_boot_ns(self.exited_at_ns)

    def exited_at(self) -> datetime.datetime:
        """Exit time as an aware UTC datetime."""
        import datetime as dt

        ns = self.exited_at_wall_ns()
        return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC).replace(
            microsecond=(ns % 1_000_000_000) // 1000
        )


class ExitTracker:
    """Handle on the pinned exit-tracking maps (see module doc)."""

    def __init__(self, pin_dir: str, map_fds: dict[str, int], link_fd: int) -> None:
        self.pin_dir = pin_dir
        self._fds = map_fds
        self._link_fd = link_fd
        self._ring: RingBuffer | None = None
        self._pending: list[int] = []

    # ---------------------------------------------------------------- setup

    @staticmethod
    def versioned_dir(pin_root: str = DEFAULT_PIN_ROOT) -> str:
        return os.path.join(pin_root, f"v{LAYOUT_VERSION}")

    @classmethod
    def open(cls, pin_root: str = DEFAULT_PIN_ROOT, *, obj_path: str | None = None) -> ExitTracker:
        """Re-use the pinned maps and link under ``<pin_root>/v<N>`` or load,
        attach and pin the committed object.  Idempotent; concurrent callers
        serialise on an flock of the versioned pin directory, and the link is
        pinned under a temporary name then renamed, so nobody sees half a set.
        """
        vdir = cls.versioned_dir(pin_root)
        return pins.open_or_load(
            vdir,
            lambda: cls._open_pins(vdir),
            lambda: cls._load_and_pin(vdir, obj_path or default_object_path()),
            bpffs_mount=BPFFS_MOUNT if _under(pin_root, BPFFS_MOUNT) else None,
        )

    @classmethod
    def open_existing(cls, pin_root: str = DEFAULT_PIN_ROOT) -> ExitTracker | None:
        """The pinned tracker if one is attached under ``pin_root``; never loads one.

        For readers such as the ``delete`` subcommand, which must not install a program
        but want the exits recorded while no daemon ran."""
        try:
            return cls._open_pins(cls.versioned_dir(pin_root))
        except BPFError:
            return None

    @staticmethod
    def _load_and_pin(vdir: str, obj_path: str) -> None:
        from shim.exits import libbpf

        with libbpf.BPFObject.open(obj_path, pin_root_path=vdir) as obj:
            obj.load()  # pins the maps, or re-uses compatible pinned ones
            with obj.program(PROG_NAME).attach() as link:
                pins.pin_link(link, os.path.join(vdir, LINK_PIN))
            # destroying the link object only closes its fd: the pin keeps it attached

    @classmethod
    def _open_pins(cls, vdir: str) -> ExitTracker | None:
        """Open the pinned link and maps; None if anything is missing or the
        pinned link runs another program (the caller then (re)loads)."""
        from shim.exits import libbpf

        fds: dict[str, int] = {}
        link_fd = -1
        ok = False
        try:
            fd = pins.get_pinned(os.path.join(vdir, LINK_PIN))
            if fd is None:
                return None
            link_fd = fd
            prog_id = libbpf.link_info(link_fd)[2]
            if prog_id == 0:
                return None
            prog_fd = libbpf.prog_get_fd_by_id(prog_id)
            try:
                if libbpf.prog_name(prog_fd) != PROG_NAME:
                    return None
            finally:
                os.close(prog_fd)
            for name in MAPS:
                fd = pins.get_pinned(os.path.join(vdir, name))
                if fd is None:
                    return None
                fds[name] = fd
            ok = True
            return cls(vdir, fds, link_fd)
        finally:
            if not ok:
                for fd in fds.values():
                    os.close(fd)
                if link_fd >= 0:
                    os.close(link_fd)

    @staticmethod
    def uninstall(pin_root: str = DEFAULT_PIN_ROOT) -> None:
        """Remove the pins of this layout version; the program detaches once
        no process holds a tracker on them any more."""
        pins.remove(ExitTracker.versioned_dir(pin_root), (LINK_PIN, *MAPS), pin_root)

    @staticmethod
    def available(
        pin_root: str = DEFAULT_PIN_ROOT, *, check_load: bool = True, obj_path: str | None = None
    ) -> tuple[bool, str]:
        """Whether BPF exit tracking can work here, and if not, why.

        With ``check_load`` (default) and no valid pins yet, the object is
        loaded once into the kernel (unpinned, not attached) to catch
        verifier/CO-RE failures; that takes ~20 ms and ~11 MB of peak RSS.
        """
        import sys

        if not sys.platform.startswith("linux"):
            return False, f"not Linux ({sys.platform})"
        caps = _effective_caps()
        if not (caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1) and not caps >> CAP_SYS_ADMIN & 1:
            return False, "missing privileges: need root, or CAP_BPF and CAP_PERFMON"
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            return False, "kernel has no BTF (/sys/kernel/btf/vmlinux missing)"
        if os.sysconf("SC_CLK_TCK") != 100:
            return False, "USER_HZ is not 100 (the BPF program's start-time unit)"
        from shim.exits import libbpf

        try:
            libbpf.lib()
        except BPFError as e:
            return False, str(e)
        if not libbpf.is_bpffs(BPFFS_MOUNT) and not caps >> CAP_SYS_ADMIN & 1:
            return False, f"bpffs not mounted at {BPFFS_MOUNT} and no CAP_SYS_ADMIN to mount it"
        obj_path = obj_path or default_object_path()
        if not os.path.exists(obj_path):
            return False, f"BPF object {obj_path!r} missing"
        if not check_load:
            return True, "ok (load not checked)"
        try:
            t = ExitTracker._open_pins(ExitTracker.versioned_dir(pin_root))
        except BPFError:
            t = None
        if t is not None:
            t.close()
            return True, "ok (pinned program attached)"
        try:
            with libbpf.BPFObject.open(obj_path) as obj:
                for name in MAPS:
                    obj.map(name).set_pin_path(None)  # probe only: never pin
                obj.load()
        except BPFError as e:
            return False, f"loading {obj_path!r} failed: {e}"
        return True, "ok"

    # ---------------------------------------------------------------- maps

    def _fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise BPFError(errno.EBADF, "exit tracker is closed") from None

    def register(self, pid: int, trace_id: int, start_boottime: int) -> None:
        """Watch ``pid`` (host tgid).  Register *before* the process can exit
        (e.g. between ``runc create`` and ``start``): a pid registered after
        it exited is never recorded.  ``start_boottime`` is truncated to the
        tick unit (see module doc); re-registering a pid replaces its entry."""
        if not 0 < pid < 1 << 32:
            raise ValueError(f"bad pid {pid}")
        if not 0 < trace_id < 1 << 64:
            raise ValueError(f"bad trace id {trace_id}")
        if start_boottime < 0:
            raise ValueError(f"bad start_boottime {start_boottime}")
        from shim.exits import libbpf

        start = start_boottime - start_boottime % TICK_NS
        try:
            libbpf.map_update(
                self._fd(MAP_TRACKED), _U32.pack(pid), _TRACKED_VAL.pack(trace_id, start)
            )
        except BPFError as e:
            if e.errno in (errno.E2BIG, errno.ENOSPC, errno.ENOMEM):
                raise TrackedMapFull(
                    e.errno, f"tracked map full ({TRACKED_MAX} entries): cannot register pid {pid}"
                ) from None
            raise

    def unregister(self, pid: int) -> bool:
        """Stop watching ``pid``; False if it was not registered."""
        from shim.exits import libbpf

        return libbpf.map_delete(self._fd(MAP_TRACKED), _U32.pack(pid))

    def lookup_exit(self, trace_id: int) -> ExitRecord | None:
        from shim.exits import libbpf

        raw = libbpf.map_lookup(self._fd(MAP_EXITS), _U64.pack(trace_id), _EXIT_REC.size)
        return None if raw is None else ExitRecord(trace_id, *_EXIT_REC.unpack(raw))

    def delete_exit(self, trace_id: int) -> bool:
        """Drop a record (once its exit is published durably); False if absent."""
        from shim.exits import libbpf

        return libbpf.map_delete(self._fd(MAP_EXITS), _U64.pack(trace_id))

    def exits(self) -> Iterator[ExitRecord]:
        """All records currently in ``exits`` (each trace id at most once)."""
        from shim.exits import libbpf

        seen: set[int] = set()
        for key in list(libbpf.map_keys(self._fd(MAP_EXITS), _U64.size)):
            (tid,) = _U64.unpack(key)
            if tid in seen:
                continue
            seen.add(tid)
            rec = self.lookup_exit(tid)
            if rec is not None:  # may have been deleted meanwhile
                yield rec

    def tracked(self) -> dict[int, tuple[int, int]]:
        """``{pid: (trace_id, start_boottime)}`` of registered, not yet recorded pids."""
        from shim.exits import libbpf

        fd = self._fd(MAP_TRACKED)
        out: dict[int, tuple[int, int]] = {}
        for key in list(libbpf.map_keys(fd, _U32.size)):
            raw = libbpf.map_lookup(fd, key, _TRACKED_VAL.size)
            if raw is not None:
                tid, start = _TRACKED_VAL.unpack(raw)
                out[_U32.unpack(key)[0]] = (tid, start)
        return out

    def stats(self) -> dict[str, int]:
        """Counters kept by the program: recorded, exits_full (record lost for
        lack of room: its ``tracked`` entry is kept), ring_drop, stale (pid
        reused, entry dropped), duplicate."""
        from shim.exits import libbpf

        fd = self._fd(MAP_STATS)
        out: dict[str, int] = {}
        for i, name in enumerate(STAT_NAMES):
            raw = libbpf.map_lookup(fd, _U32.pack(i), 8)
            out[name] = _U64.unpack(raw)[0] if raw is not None else 0
        return out

    def attached(self) -> bool:
        """True while the link this tracker holds still has a program."""
        from shim.exits import libbpf

        if self._link_fd < 0:
            return False
        return libbpf.link_info(self._link_fd)[2] != 0

    @property
    def link_id(self) -> int:
        from shim.exits import libbpf

        if self._link_fd < 0:
            raise BPFError(errno.EBADF, "exit tracker is closed")
        return libbpf.link_info(self._link_fd)[1]

    # ---------------------------------------------------------------- ring

    def _ring_buffer(self) -> RingBuffer:
        if self._ring is None:
            from shim.exits import libbpf

            def on_sample(data: bytes) -> None:
                if len(data) >= 8:
                    self._pending.append(_U64.unpack_from(data)[0])

            self._ring = libbpf.RingBuffer(self._fd(MAP_RING), on_sample)
        return self._ring

    def ring_fd(self) -> int:
        """An fd that polls readable when exit notifications are pending, for
        ``loop.add_reader(fd, ...)`` followed by :meth:`poll_ring`.

        The ring has one consumer position shared by all processes: only the
        daemon should consume it.  Notifications are a wake-up hint; the
        ``exits`` map stays the source of truth.
        """
        return self._ring_buffer().epoll_fd()

    def poll_ring(self) -> list[int]:
        """Trace ids notified since the last call (never blocks)."""
        self._ring_buffer().consume()
        out, self._pending = self._pending, []
        return out

    # ---------------------------------------------------------------- close

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        if self._link_fd >= 0:
            os.close(self._link_fd)
            self._link_fd = -1

    def __enter__(self) -> ExitTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def track(
    tracker: ExitTracker | None, pid: int, trace_id: int, start_ticks: int, /, **fields: object
) -> bool:
    """Register a process (its start time in /proc ticks) with the pinned BPF exit map, when
    BPF is on; whether it was.  A failure is logged, not raised: the reaper and the pidfd
    still see the exit while the daemon runs; only a restart's backup is missing.
    ``fields`` (which may name the pid again) go into that log line."""
    if tracker is None:
        return False
    try:
        tracker.register(pid, trace_id, start_ticks * TICK_NS)
    except OSError as exc:
        log.event("BPF registration failed", logging.ERROR, **fields, error=exc)
        return False
    return True


def untrack(tracker: ExitTracker | None, pid: int, trace_id: int, /, **fields: object) -> None:
    """Drop a process's BPF entries, once its exit is persisted (a failure is logged)."""
    if tracker is None or not trace_id:
        return
    try:
        tracker.delete_exit(trace_id)
        tracker.unregister(pid)
    except OSError as exc:
        log.event("BPF cleanup failed", logging.ERROR, **fields, error=exc)


def _under(path: str, root: str) -> bool:
    path = os.path.abspath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return (1 << 64) - 1 if os.geteuid() == 0 else 0
