"""OOM kills of a container, as counted by the kernel in the container's memory cgroup.

Design.  The truth is the cgroup's own kill counter: ``oom_kill N`` in ``memory.oom_control``
(cgroup v1, Linux 4.13+) or in ``memory.events`` (cgroup v2).  The kernel increments it for
the memory cgroup of each process the OOM killer kills, keeps it for as long as the cgroup
exists (until ``runc delete``, which only we run), and needs nothing of ours to be running
to do so.  The daemon persists the last count it saw (state store), so an OOM kill that
happened while no daemon ran (a SIGHUP re-exec, a crash and restore, the offline ``delete``)
is found by comparing the two when it looks again.  Live, the kernel tells us when to look:
cgroup v1 signals an eventfd registered through ``cgroup.event_control`` for
``memory.oom_control``; cgroup v2 modifies ``memory.events``, watched with inotify.  Those
wake-ups only say "read the counter again".  v1 gets one eventfd per container, as
containerd's runc shim does: the kernel also signals it when the cgroup is removed (every
``runc delete``), so one eventfd shared by all would have every delete read every
container's counter five times over (RECHECK): 1,500 reads per delete at 300 containers,
which was a third of the daemon's time there.  Closing a container's eventfd at its exit
(before ``runc delete``) withdraws its registration.  One inotify fd serves all v2
containers (its events name the watch).

Why not BPF (the ``oom:mark_victim`` tracepoint into a pinned map): the tracepoint names the
victim's pid, not its container; matching a victim that is not the init (any process of
the container) to a task needs its cgroup id, read in the program, and another pinned map
kept in step with every task.  The cgroup counter already is that record, kept by the
kernel per container, surviving us, and it is what containerd's own shims read.

One wrinkle: cgroup v1 signals the eventfd when the cgroup *enters* OOM, before the victim
is chosen and counted, so after a v1 wake-up the counter is read again a few times over
the next seconds (``RECHECK``).  And the counter is always read once more just before a
process's exit is published, so /tasks/oom goes out before the /tasks/exit it caused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from shim.exits.memcg import V1, MemoryCgroup
from shim.util import log

if TYPE_CHECKING:
    import asyncio

# Seconds after a cgroup v1 OOM notification at which the counter is read again.
RECHECK = (0.05, 0.25, 1.0, 3.0)

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")


class _Inotify:
    """The one inotify fd that watches every v2 ``memory.events`` (ctypes over libc)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add(self, path: str) -> int:
        wd: int = self._libc.inotify_add_watch(self.fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    def remove(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> list[tuple[int, int]]:
        """(wd, mask) of every pending event."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        out, off = [], 0
        while off + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, off)
            out.append((wd, mask))
            off += _EVENT.size + length
        return out

    def close(self) -> None:
        os.close(self.fd)


Key = tuple[str, str]


class OOMWatcher:
    """Wakes a callback when a watched cgroup may have had an OOM kill.

    The callback only has to read the counter again (``MemoryCgroup.oom_kills``) and compare
    it with the last count it saw; it may be called when nothing changed.  A v1 cgroup has
    an eventfd of its own (closed by ``unwatch``, which withdraws the registration); v2
    cgroups share one inotify fd.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._v1: dict[Key, _V1Watch] = {}
        self._inotify: _Inotify | None = None
        self._v2: dict[Key, tuple[int, Callable[[], None]]] = {}  # wd, callback
        self._by_wd: dict[int, set[Key]] = {}  # the v2 keys of each inotify watch

    def watch(self, key: Key, cg: MemoryCgroup, callback: Callable[[], None]) -> None:
        """Start watching ``cg`` for the task ``key``; errors are logged, not raised (the
        exit-time check still finds a kill)."""
        self.unwatch(key)
        try:
            if cg.version == V1:
                self._v1[key] = _V1Watch(self._loop, cg, callback)
            else:
                if self._inotify is None:
                    self._inotify = _Inotify()
                    self._loop.add_reader(self._inotify.fd, self._on_inotify)
                wd = self._inotify.add(cg.counter_file)
                self._v2[key] = (wd, callback)
                self._by_wd.setdefault(wd, set()).add(key)
        except OSError as exc:
            log.event(
                "cannot watch for OOM kills", logging.WARNING, ns=key[0], id=key[1], error=exc
            )

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for wd, mask in self._inotify.read():
            keys = self._by_wd.get(wd, ())
            if mask & IN_IGNORED:  # the cgroup was removed
                for key in keys:
                    self._v2.pop(key, None)
                self._by_wd.pop(wd, None)
                continue
            for key in list(keys):
                if key in self._v2:
                    self._v2[key][1]()

    def unwatch(self, key: Key) -> None:
        v1 = self._v1.pop(key, None)
        if v1 is not None:
            v1.close()
        v2 = self._v2.pop(key, None)
        if v2 is not None:
            keys = self._by_wd.get(v2[0], set())
            keys.discard(key)
            if not keys:
                self._by_wd.pop(v2[0], None)
                if self._inotify is not None:
                    self._inotify.remove(v2[0])

    def __len__(self) -> int:
        return len(self._v1) + len(self._v2)

    def close(self) -> None:
        """Stop watching; closing the eventfds withdraws the v1 registrations."""
        for key in list(self._v1):
            self.unwatch(key)
        for key in list(self._v2):
            self.unwatch(key)
        if self._inotify is not None:
            self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None


class _V1Watch:
    """One v1 cgroup's eventfd, registered for ``memory.oom_control``, and its rechecks."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, cg: MemoryCgroup, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._rechecks: list[asyncio.TimerHandle] = []
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            cfd = os.open(cg.counter_file, os.O_RDONLY | os.O_CLOEXEC)
            try:
                ctl = os.open(os.path.join(cg.path, "cgroup.event_control"), os.O_WRONLY)
                try:
                    os.write(ctl, f"{self.fd} {cfd}".encode())
                finally:
                    os.close(ctl)
            finally:
                os.close(cfd)
            loop.add_reader(self.fd, self._on_signal)
        except BaseException:
            os.close(self.fd)
            raise

    def _on_signal(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        self._callback()
        # Signalled on entering OOM (and on rmdir): the victim is counted just after.
        for t in self._rechecks:
            t.cancel()
        self._rechecks = [self._loop.call_later(d, self._callback) for d in RECHECK]

    def close(self) -> None:
        for t in self._rechecks:
            t.cancel()
        self._rechecks = []
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
