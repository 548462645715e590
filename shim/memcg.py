"""A container's memory cgroup and the kernel's count of OOM kills in it.

Stdlib ``os`` only: the ``delete`` subcommand reads the count too (see shim/oom.py for the
design).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

V1 = "v1"
V2 = "v2"


@dataclass(frozen=True)
class MemoryCgroup:
    """A container's memory cgroup: ``version`` (v1 or v2) and its directory."""

    version: str
    path: str

    @property
    def counter_file(self) -> str:
        name = "memory.oom_control" if self.version == V1 else "memory.events"
        return os.path.join(self.path, name)

    def oom_kills(self) -> int | None:
        """The kernel's count of OOM kills in this cgroup; None if it cannot be read (the
        cgroup is gone, or the kernel is older than 4.13 and has no such line)."""
        try:
            with open(self.counter_file, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        return parse_oom_kills(text)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def encode(self) -> str:
        """The form kept in the state store: ``v1:/sys/fs/cgroup/memory/...``."""
        return f"{self.version}:{self.path}"

    @classmethod
    def decode(cls, text: str) -> MemoryCgroup | None:
        version, sep, path = text.partition(":")
        if not sep or version not in (V1, V2) or not path:
            return None
        return cls(version, path)


def parse_oom_kills(text: str) -> int | None:
    """The ``oom_kill N`` line of memory.oom_control or memory.events."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def _unescape(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def cgroup_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """(fstype, root within the hierarchy, mount point, super options) of each cgroup fs."""
    out: list[tuple[str, str, str, str]] = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(" "), right.split(" ")
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((rfields[0], _unescape(fields[3]), _unescape(fields[4]), rfields[2]))
    return out


def _join(mountpoint: str, mount_root: str, cgpath: str) -> str | None:
    """Where the cgroup ``cgpath`` (as /proc/<pid>/cgroup names it) is under a mount of the
    hierarchy whose own root is ``mount_root``."""
    root = mount_root.rstrip("/")
    if root and not (cgpath == root or cgpath.startswith(root + "/")):
        return None
    rel = cgpath[len(root) :].lstrip("/")
    return os.path.join(mountpoint, rel) if rel else mountpoint


def memory_cgroup_of(
    pid: int, mountinfo: str = "/proc/self/mountinfo", proc: str = "/proc"
) -> MemoryCgroup | None:
    """The memory cgroup ``pid`` is in: v1 where the memory controller is mounted as v1
    (also on hybrid hosts, whose v2 hierarchy has no memory controller), else v2 when the
    cgroup has ``memory.events``; None if neither (no memory controller, or pid gone)."""
    try:
        with open(os.path.join(proc, str(pid), "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    # The cgroup mounts hardly ever change: read once, again only when nothing matches.
    for fresh in (False, True):
        if fresh or mountinfo not in _MOUNTS:
            _MOUNTS[mountinfo] = cgroup_mounts(mountinfo)
        found = _find(_MOUNTS[mountinfo], v1_path, v2_path)
        if found is not None:
            return found
    return None


_MOUNTS: dict[str, list[tuple[str, str, str, str]]] = {}


def _find(
    mounts: list[tuple[str, str, str, str]], v1_path: str | None, v2_path: str | None
) -> MemoryCgroup | None:
    if v1_path is not None:
        for fstype, root, mp, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                path = _join(mp, root, v1_path)
                if path and os.path.exists(os.path.join(path, "memory.oom_control")):
                    return MemoryCgroup(V1, path)
    if v2_path is not None:
        for fstype, root, mp, _ in mounts:
            if fstype == "cgroup2":
                path = _join(mp, root, v2_path)
                if path and os.path.exists(os.path.join(path, "memory.events")):
                    return MemoryCgroup(V2, path)
    return None
