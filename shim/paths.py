"""Where one daemon keeps its files.

There is one daemon per containerd instance, keyed by the containerd gRPC address it was
started for, because its events must go back to that containerd.  Everything the daemon owns
lives in one 0700 directory, ``$EMBEDSHIM_ROOT/<key>/`` (default root ``/run/embedshim``).
This module is imported by the short-lived ``start`` and ``delete`` subcommands: stdlib only.
"""

from __future__ import annotations

import os

DEFAULT_ROOT = "/run/embedshim"
ROOT_ENV = "EMBEDSHIM_ROOT"
DEFAULT_BPF_ROOT = "/sys/fs/bpf/embedshim"
BPF_ROOT_ENV = "EMBEDSHIM_BPF_ROOT"


def instance_key(containerd_address: str) -> str:
    """A short, stable name for the containerd instance at ``containerd_address``."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # builtin: no OpenSSL
    except ImportError:  # pragma: no cover
        from hashlib import sha256
    digest: str = sha256(containerd_address.encode()).hexdigest()
    return digest[:16]


class DaemonPaths:
    """The files of the daemon that serves one containerd instance."""

    __slots__ = ("dir",)

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DaemonPaths) and other.dir == self.dir

    def __hash__(self) -> int:
        return hash(self.dir)

    def __repr__(self) -> str:
        return f"DaemonPaths({self.dir!r})"

    @classmethod
    def for_containerd(cls, containerd_address: str, root: str | None = None) -> DaemonPaths:
        base = root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT
        return cls(os.path.join(os.path.abspath(base), instance_key(containerd_address)))

    @property
    def socket(self) -> str:
        return os.path.join(self.dir, "daemon.sock")

    @property
    def address(self) -> str:
        """The address ``start`` prints; containerd dials it."""
        return "unix://" + self.socket

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, "start.lock")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.dir, "daemon.pid")

    @property
    def store(self) -> str:
        return os.path.join(self.dir, "state.db")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "daemon.log")

    @property
    def bpf_pin_root(self) -> str:
        """Where this daemon's BPF program and maps are pinned (bpffs), one set per daemon:
        trace ids come from this daemon's store, so maps are never shared between daemons."""
        base = os.environ.get(BPF_ROOT_ENV) or DEFAULT_BPF_ROOT
        return os.path.join(base, os.path.basename(self.dir))

    @property
    def runc_root(self) -> str:
        """runc's --root for our containers; one subdirectory per namespace."""
        return os.path.join(self.dir, "runc")

    def runc_root_for(self, namespace: str) -> str:
        return os.path.join(self.runc_root, namespace)

    def ensure(self) -> None:
        """Create the directory, private to root."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
