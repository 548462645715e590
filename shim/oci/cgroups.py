"""Where a container's cgroup lives, found from its init process.

runc puts the container in a cgroup named by the bundle's ``cgroupsPath`` (cgroupfs or
systemd form, relative or absolute); rather than redo runc's arithmetic, we read the init's
``/proc/<pid>/cgroup`` and map each hierarchy to where it is mounted (``mountinfo``).  On a
cgroup v1 or hybrid host (controllers on v1 hierarchies, maybe an empty v2 one beside them)
every controller has a directory of its own; on a unified host there is one v2 directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

PROC = "/proc"

_mounts: dict[str, list[Mount]] = {}  # proc dir -> its cgroup mounts, as last read (of_pid)


class CgroupError(Exception):
    """The cgroup cannot be found (the process is gone) or is gone itself."""


@dataclass(frozen=True)
class Mount:
    root: str  # the path inside the hierarchy that is mounted (usually "/")
    point: str  # where it is mounted
    controllers: frozenset[str]  # v1: the controllers (super options); v2: empty
    v2: bool

    def dir_for(self, path: str) -> str | None:
        """The directory of cgroup ``path`` under this mount, if the mount shows it."""
        root = self.root.rstrip("/")
        if path != root and not path.startswith(root + "/"):
            return None
        return os.path.normpath(self.point + path[len(root) :])


def _unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def cgroup_mounts(mountinfo: str) -> list[Mount]:
    """The cgroup (v1) and cgroup2 mounts in a ``mountinfo`` text."""
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(" "), right.split(" ")
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        v2 = rfields[0] == "cgroup2"
        options = frozenset() if v2 else frozenset(rfields[2].split(","))
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), options, v2))
    return mounts


def kept_mounts(proc: str = PROC, fresh: bool = False) -> list[Mount]:
    """The cgroup mounts of this process, read once and kept (``fresh``: read again).
    ``mountinfo`` grows with every container's rootfs mount: parsing it at every create made
    creates slower the more containers ran.  OSError if it cannot be read."""
    kept = _mounts.get(proc)
    if kept is None or fresh:
        with open(os.path.join(proc, "self", "mountinfo")) as f:
            kept = _mounts[proc] = cgroup_mounts(f.read())
    return kept


def parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """``/proc/<pid>/cgroup`` as ({v1 controller: path}, v2 path or None).

    Named hierarchies (``name=systemd``) hold no controller and are left out."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2 = path
            continue
        for c in controllers.split(","):
            if c and not c.startswith("name="):
                v1[c] = path
    return v1, v2


@dataclass(frozen=True)
class Cgroup:
    """One container's cgroup: a directory per v1 controller, or one v2 directory."""

    v1: dict[str, str] = field(default_factory=dict)  # controller -> directory
    v2: str | None = None  # the unified directory, when the controllers live on v2

    @property
    def unified(self) -> bool:
        return not self.v1

    @classmethod
    def of_pid(cls, pid: int, proc: str = PROC) -> Cgroup:
        """The cgroup of a live process, as this process's mounts show it.

        The cgroup mounts are read once and kept (read again only when they do not show a
        process's cgroup): ``mountinfo`` grows with every container's mounts, and parsing
        it at every create made creates slower the more containers ran."""
        try:
            with open(os.path.join(proc, str(pid), "cgroup")) as f:
                text = f.read()
        except OSError as exc:
            raise CgroupError(f"cgroup of pid {pid}: {exc.strerror or exc}") from None
        kept = _mounts.get(proc)
        if kept is not None:
            try:
                return cls.resolve(text, kept)
            except CgroupError:
                pass  # mounted elsewhere since: look again
        try:
            mounts = kept_mounts(proc, fresh=True)
        except OSError as exc:
            raise CgroupError(f"cgroup of pid {pid}: {exc.strerror or exc}") from None
        return cls.resolve(text, mounts)

    @classmethod
    def resolve(cls, proc_cgroup: str, mounts: list[Mount]) -> Cgroup:
        paths, v2_path = parse_proc_cgroup(proc_cgroup)
        v1: dict[str, str] = {}
        for controller, path in paths.items():
            for m in mounts:
                if not m.v2 and controller in m.controllers:
                    d = m.dir_for(path)
                    if d is not None:
                        v1[controller] = d
                        break
        if v1:
            return cls(v1=v1)
        if v2_path is not None:
            for m in mounts:
                if m.v2:
                    d = m.dir_for(v2_path)
                    if d is not None:
                        return cls(v2=d)
        raise CgroupError("no mounted cgroup hierarchy shows this process's cgroup")

    def dir(self, controller: str) -> str | None:
        """The directory holding ``controller``'s files (v2: the one directory)."""
        if self.unified:
            return self.v2
        return self.v1.get(controller)

    def exists(self) -> bool:
        dirs = list(self.v1.values()) if self.v1 else [self.v2 or ""]
        return any(d and os.path.isdir(d) for d in dirs)

    def frozen(self) -> bool | None:
        """Whether the freezer holds the cgroup frozen; None if there is no freezer."""
        try:
            if self.unified:
                with open(os.path.join(self.v2 or "", "cgroup.freeze")) as f:
                    return f.read().strip() == "1"
            d = self.v1.get("freezer")
            if d is None:
                return None
            with open(os.path.join(d, "freezer.state")) as f:
                return f.read().strip() != "THAWED"
        except OSError:
            return None
