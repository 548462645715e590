"""A container's memory cgroup and the kernel's count of OOM kills in it.

The directory comes from the container's cgroup (shim/oci/cgroups.py); the ``delete``
subcommand reads the count too, so this stays light.  See shim/exits/oom.py for the design.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shim.oci.cgroups import Cgroup

V1 = "v1"
V2 = "v2"


@dataclass(frozen=True)
class MemoryCgroup:
    """A container's memory cgroup: ``version`` (v1 or v2) and its directory."""

    version: str
    path: str

    @classmethod
    def of(cls, cgroup: Cgroup) -> MemoryCgroup | None:
        """The memory controller's directory of ``cgroup``, if it has one with a kill
        counter (v1 ``memory.oom_control``; v2 ``memory.events``, only where the memory
        controller is enabled)."""
        path = cgroup.dir("memory")
        if path is None:
            return None
        found = cls(V2 if cgroup.unified else V1, path)
        return found if os.path.exists(found.counter_file) else None

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
