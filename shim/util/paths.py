"""Where one daemon keeps its files.

There is one daemon per containerd instance, keyed by the containerd gRPC address it was
started for, because its events must go back to that containerd.  Everything the daemon owns
lives in one 0700 directory, ``$EMBEDSHIM_ROOT/<key>/`` (default root ``/run/embedshim``).
This module is imported by the short-lived ``start`` and ``delete`` subcommands, which do
not import ``os`` (about 6M instructions, an eighth of ``start``): ``posix`` and string
operations do the same here.
"""

import posix
import sys

from shim.util.fsutil import join

DEFAULT_ROOT = "/run/embedshim"
ROOT_ENV = "EMBEDSHIM_ROOT"
DEFAULT_BPF_ROOT = "/sys/fs/bpf/embedshim"
BPF_ROOT_ENV = "EMBEDSHIM_BPF_ROOT"


def _getenv(name: str) -> str:
    """``os.environ.get(name, "")`` without importing os.  Once os is imported its environ is
    the one that changes (``posix.environ`` is the process's initial environment)."""
    os = sys.modules.get("os")
    if os is not None:
        return str(os.environ.get(name, ""))
    value = posix.environ.get(name.encode())
    return "" if value is None else value.decode("utf-8", "surrogateescape")


def _abspath(path: str) -> str:
    """``os.path.abspath``; an absolute path with nothing to normalise (the usual root) is
    returned as it is without importing os."""
    if path.startswith("/") and not ("//" in path or "/." in path or path.endswith("/")):
        return path
    import os.path

    return os.path.abspath(path)


def short_hash(text: str, length: int = 16) -> str:
    """The first ``length`` hex digits of the sha256 of ``text`` (no OpenSSL loaded)."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # builtin: no OpenSSL
    except ImportError:  # pragma: no cover
        from hashlib import sha256
    digest: str = sha256(text.encode()).hexdigest()
    return digest[:length]


def instance_key(containerd_address: str) -> str:
    """A short, stable name for the containerd instance at ``containerd_address``."""
    return short_hash(containerd_address)


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
    def for_containerd(cls, containerd_address: str, root: str | None = None) -> "DaemonPaths":
        base = root or _getenv(ROOT_ENV) or DEFAULT_ROOT
        return cls(join(_abspath(base), instance_key(containerd_address)))

    @property
    def socket(self) -> str:
        return join(self.dir, "daemon.sock")

    @property
    def address(self) -> str:
        """The address ``start`` prints; containerd dials it."""
        return "unix://" + self.socket

    @property
    def lock(self) -> str:
        return join(self.dir, "start.lock")

    @property
    def pidfile(self) -> str:
        return join(self.dir, "daemon.pid")

    @property
    def keeper_pidfile(self) -> str:
        return join(self.dir, "keeper.pid")

    @property
    def journal(self) -> str:
        """Requests read and not yet answered, in reused slots (see shim.ttrpc.journal)."""
        return join(self.dir, "inflight")

    @property
    def store(self) -> str:
        return join(self.dir, "state.db")

    @property
    def log(self) -> str:
        return join(self.dir, "daemon.log")

    @property
    def bpf_pin_root(self) -> str:
        """Where this daemon's BPF program and maps are pinned (bpffs), one set per daemon:
        trace ids come from this daemon's store, so maps are never shared between daemons."""
        base = _getenv(BPF_ROOT_ENV) or DEFAULT_BPF_ROOT
        return join(base, self.dir.rpartition("/")[2])

    @property
    def runc_root(self) -> str:
        """runc's --root for our containers; one subdirectory per namespace."""
        return join(self.dir, "runc")

    @property
    def console_dir(self) -> str:
        """runc's console sockets (terminal processes); short names, like daemon.sock's."""
        return join(self.dir, "c")

    def runc_root_for(self, namespace: str) -> str:
        return join(self.runc_root, namespace)

    def ensure(self) -> None:
        """Create the directory (and its parents), private to root."""
        try:
            posix.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        except OSError:
            import os

            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        posix.chmod(self.dir, 0o700)
