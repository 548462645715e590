"""runc run from one sealed in-memory copy of its binary, kept by the daemon.

Before every ``runc init`` (each container create and each exec) runc protects its binary
against a container overwriting it (CVE-2019-5736): runc 1.1 bind-mounts ``/proc/self/exe``
read-only on a file in its state dir, remounts it, unmounts it and executes itself once
more; newer runc copies itself into a memfd or builds an overlay.  It skips all of that when
it already runs from a fully sealed memfd: the set-up runc's own ``contrib/cmd/memfd-bind``
makes for a node.  The daemon does the same for the runc it starts: one copy per runc binary,
sealed against writes, growth, shrinking and new seals, named as runc names its own copies
(``runc_cloned:/proc/self/exe``: what runtime-security rules already know as runc).  That
takes about 0.4 ms off every create and exec here, and leaves the node's mount table alone
(a change in it makes systemd and every other mountinfo watcher read it again).

The price is memory: one copy of the binary (8.3 MiB for Debian's runc 1.1.5) for as long as
the daemon runs, in shmem that no process maps (so no process's PSS shows it).

Only a binary with runc's clone code gets a copy (it contains ``runc_cloned:``; crun and
wrapper programs do not, and would gain nothing).  A binary replaced on disk (a new inode,
size or mtime) gets a new copy at its next command; until the copy exists, runc runs from
the disk as before.  Children reach the copy through ``/proc/<daemon pid>/fd/N``: the
descriptor stays close-on-exec, so neither runc nor a container inherits it.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from shim.util import log

MARKER = b"runc_cloned:"
NAME = "runc_cloned:/proc/self/exe"
#: runc's RUNC_MEMFD_SEALS: what it requires of a copy before it skips its own
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Copy:
    __slots__ = ("identity", "fd", "path")

    def __init__(self, identity: tuple[int, int, int, int, int], fd: int | None) -> None:
        self.identity = identity
        self.fd = fd  # None: this binary gets no copy (not runc, or no memfd here)
        self.path = f"/proc/{os.getpid()}/fd/{fd}" if fd is not None else None


class SealedCopies:
    """The copies, one per binary path."""

    def __init__(self) -> None:
        self._copies: dict[str, _Copy] = {}

    def executable(self, path: str) -> tuple[str, bool]:
        """What to execute for ``path`` now: its copy's ``/proc`` path, or ``path`` itself
        while it has none; and whether a copy should be made (see :meth:`make`)."""
        try:
            identity = _identity(os.stat(path))
        except OSError:
            return path, False
        known = self._copies.get(path)
        if known is not None and known.identity == identity:
            return known.path or path, False
        return path, True

    def make(self, path: str) -> None:
        """Copy ``path`` into a sealed memfd, if it is runc's binary; replaces an older copy.
        Never raises: without a copy, runc runs from the disk."""
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(src)
            try:
                fd = _sealed_copy(src, st.st_size) if _is_runc(src, st.st_size) else None
            except OSError as exc:  # no memfd here (seccomp, an old kernel): not every time
                log.event("runc runs from the disk: no sealed copy", path=path, error=exc)
                fd = None
            old = self._copies.pop(path, None)
            self._copies[path] = _Copy(_identity(st), fd)
            if old is not None and old.fd is not None:
                os.close(old.fd)
        except OSError:
            return
        finally:
            os.close(src)

    def fds(self) -> list[int]:
        return [c.fd for c in self._copies.values() if c.fd is not None]

    def close(self) -> None:
        for c in self._copies.values():
            if c.fd is not None:
                os.close(c.fd)
        self._copies.clear()


def _is_runc(fd: int, size: int) -> bool:
    if size == 0:
        return False
    with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
        return m.find(MARKER) >= 0


def _sealed_copy(src: int, size: int) -> int:
    fd = os.memfd_create(NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        done = 0
        while done < size:
            n = os.sendfile(fd, src, done, size - done)
            if n == 0:
                raise OSError("binary shrank while copied")
            done += n
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd
