"""The pinned ``watch`` BPF program (bpf/watch.bpf.c): load, pin, open, and its maps.

A separate object from the exit tracker (shim.exits.exittrack), pinned beside it under
``<pin_root>/watch-v<LAYOUT_VERSION>/``, so changing it never touches the exit tracker's
pinned layout.  Three programs (exec, exit, OOM victim), four maps:

    containers  cgroup id (u64) -> per-container counters (the daemon inserts zeroes)
    config      [0] = {watching: u32}: 1 while records should go to the ring
    events      ring buffer of struct event records
    wstats      [0] records written, [1] records dropped (ring full)

A container's key is the id of its cgroup on the unified (v2) hierarchy, which is the inode
number of its directory there (:func:`cgroup_id_of_pid`).  runc 1.1 puts each container
there on a pure v2 host and on a hybrid one (v2 at /sys/fs/cgroup/unified) alike.
"""

from __future__ import annotations

import errno
import os
import struct

from shim.exits import pins
from shim.exits.libbpf import BPFError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

LAYOUT_VERSION = 1  # keep equal to WATCH_LAYOUT_VERSION in bpf/watch.bpf.c
OBJECT_ENV = "EMBEDSHIM_WATCH_OBJ"
PROGRAMS = (f"watch_exec_v{LAYOUT_VERSION}", f"watch_exit_v{LAYOUT_VERSION}")
OOM_PROGRAM = f"watch_oom_v{LAYOUT_VERSION}"  # optional: a kernel without mark_victim lacks it
MAP_CONTAINERS, MAP_CONFIG, MAP_EVENTS, MAP_STATS = "containers", "config", "events", "wstats"
MAPS = (MAP_CONTAINERS, MAP_CONFIG, MAP_EVENTS, MAP_STATS)
CONTAINERS_MAX = 4096

_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
_CONFIG = struct.Struct("=II")
#: struct container: execs, exits, signaled, core_dumps, oom_kills, 3 reserved
_COUNTERS = struct.Struct("=8Q")
COUNTER_NAMES = ("execs", "exits", "signaled", "core_dumps", "oom_kills")
STAT_EVENTS, STAT_DROPS, STAT_SLOTS = 0, 1, 4


def default_object_path() -> str:
    """``$EMBEDSHIM_WATCH_OBJ``, else the packaged or checkout ``watch.bpf.o``."""
    env = os.environ.get(OBJECT_ENV)
    if env:
        return env
    from shim.util import packaged

    return packaged.watch_object()


def pin_dir(pin_root: str) -> str:
    return os.path.join(pin_root, f"watch-v{LAYOUT_VERSION}")


def link_names() -> tuple[str, ...]:
    return tuple(f"link_{p.split('_')[1]}" for p in (*PROGRAMS, OOM_PROGRAM))


class WatchProbe:
    """Handle on the pinned maps of the watch program."""

    def __init__(self, pin_dir: str, fds: dict[str, int]) -> None:
        self.pin_dir = pin_dir
        self._fds = fds

    # ---------------------------------------------------------------- setup

    @classmethod
    def open(cls, pin_root: str, *, obj_path: str | None = None) -> WatchProbe:
        """Re-use the pins under ``<pin_root>/watch-v<N>`` or load, attach and pin the object
        (serialised on an flock of that directory, like ExitTracker.open)."""
        vdir = pin_dir(pin_root)
        return pins.open_or_load(
            vdir,
            lambda: cls._open_pins(vdir),
            lambda: cls._load_and_pin(vdir, obj_path or default_object_path()),
        )

    @classmethod
    def open_existing(cls, pin_root: str) -> WatchProbe | None:
        """The pinned maps if the program was ever loaded there; never loads it."""
        try:
            return cls._open_pins(pin_dir(pin_root))
        except BPFError:
            return None

    @staticmethod
    def _load_and_pin(vdir: str, obj_path: str) -> None:
        from shim.exits import libbpf

        with libbpf.BPFObject.open(obj_path, pin_root_path=vdir) as obj:
            obj.load()
            for prog, name in zip((*PROGRAMS, OOM_PROGRAM), link_names(), strict=True):
                path = os.path.join(vdir, name)
                try:
                    link = obj.program(prog).attach()
                except BPFError:
                    if prog == OOM_PROGRAM:
                        continue  # no oom:mark_victim here: exec and exit still work
                    raise
                with link:
                    pins.pin_link(link, path)

    @classmethod
    def _open_pins(cls, vdir: str) -> WatchProbe | None:
        from shim.exits import libbpf

        fds: dict[str, int] = {}
        ok = False
        try:
            for name in (*MAPS, *link_names()[: len(PROGRAMS)]):
                fd = pins.get_pinned(os.path.join(vdir, name))
                if fd is None:
                    return None
                fds[name] = fd
            for name in link_names()[: len(PROGRAMS)]:
                if libbpf.link_info(fds.pop(name))[2] == 0:
                    return None
            ok = True
            return cls(vdir, fds)
        finally:
            if not ok:
                for fd in fds.values():
                    os.close(fd)

    @staticmethod
    def uninstall(pin_root: str) -> None:
        pins.remove(pin_dir(pin_root), (*MAPS, *link_names()), pin_root)

    # ---------------------------------------------------------------- maps

    def fd(self, name: str) -> int:
        try:
            return self._fds[name]
        except KeyError:
            raise BPFError(errno.EBADF, "watch probe is closed") from None

    def add_container(self, cgid: int) -> None:
        """Start attributing events of cgroup ``cgid``; counters already there are kept."""
        from shim.exits import libbpf

        try:
            libbpf.map_update(
                self.fd(MAP_CONTAINERS),
                _U64.pack(cgid),
                _COUNTERS.pack(*[0] * 8),
                libbpf.BPF_NOEXIST,
            )
        except BPFError as e:
            if e.errno != errno.EEXIST:
                raise

    def remove_container(self, cgid: int) -> bool:
        from shim.exits import libbpf

        return libbpf.map_delete(self.fd(MAP_CONTAINERS), _U64.pack(cgid))

    def containers(self) -> Iterator[tuple[int, dict[str, int]]]:
        """(cgroup id, counters) of every container in the map."""
        from shim.exits import libbpf

        fd = self.fd(MAP_CONTAINERS)
        for key in list(libbpf.map_keys(fd, _U64.size)):
            raw = libbpf.map_lookup(fd, key, _COUNTERS.size)
            if raw is not None:
                values = _COUNTERS.unpack(raw)
                yield _U64.unpack(key)[0], dict(zip(COUNTER_NAMES, values, strict=False))

    def counters(self, cgid: int) -> dict[str, int] | None:
        from shim.exits import libbpf

        raw = libbpf.map_lookup(self.fd(MAP_CONTAINERS), _U64.pack(cgid), _COUNTERS.size)
        if raw is None:
            return None
        return dict(zip(COUNTER_NAMES, _COUNTERS.unpack(raw), strict=False))

    @property
    def watching(self) -> bool:
        from shim.exits import libbpf

        raw = libbpf.map_lookup(self.fd(MAP_CONFIG), _U32.pack(0), _CONFIG.size)
        return raw is not None and _CONFIG.unpack(raw)[0] != 0

    @watching.setter
    def watching(self, on: bool) -> None:
        from shim.exits import libbpf

        libbpf.map_update(self.fd(MAP_CONFIG), _U32.pack(0), _CONFIG.pack(int(on), 0))

    def _stat(self, idx: int) -> int:
        from shim.exits import libbpf

        raw = libbpf.map_lookup(self.fd(MAP_STATS), _U32.pack(idx), 8)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def drops(self) -> int:
        """Records the kernel could not put in the ring (it was full), since loading."""
        return self._stat(STAT_DROPS)

    def written(self) -> int:
        return self._stat(STAT_EVENTS)

    def events_fd(self) -> int:
        return self.fd(MAP_EVENTS)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> WatchProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cgroup_id_of_pid(pid: int, proc: str = "/proc") -> int | None:
    """The id of ``pid``'s cgroup on the unified hierarchy (what bpf_get_current_cgroup_id
    returns in that process), or None if no cgroup2 mount shows it.  The cgroup mounts are
    the ones shim.oci.cgroups keeps (read again only if they do not show the cgroup)."""
    from shim.oci.cgroups import kept_mounts, parse_proc_cgroup

    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            _, v2 = parse_proc_cgroup(f.read())
    except OSError:
        return None
    if v2 is None or v2 == "/":
        return None  # not in a cgroup of its own there: nothing to tell it apart by
    for fresh in (False, True):
        try:
            dirs = [d for m in kept_mounts(proc, fresh) if m.v2 and (d := m.dir_for(v2))]
        except OSError:
            return None
        if dirs:
            break
    for d in dirs:
        try:
            return os.stat(d).st_ino
        except OSError:
            continue
    return None
