"""mount(2)/umount2(2) for a task's rootfs, as containerd describes it in CreateTaskRequest.

containerd hands the shim the snapshotter's mounts (overlay, or a bind of a native snapshot);
the shim mounts them on ``<bundle>/rootfs`` and must unmount them on delete and on a failed
create.  The short-lived ``delete`` imports this only to clean up without the daemon; the
mount-point test it needs every time is ``shim.util.fsutil.is_mountpoint`` (re-exported here).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass

from shim.util.fsutil import is_mountpoint

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID),
    "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV),
    "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC),
    "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS),
    "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC),
    "mand": (False, MS_MANDLOCK),
    "nomand": (True, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "atime": (True, MS_NOATIME),
    "nodiratime": (False, MS_NODIRATIME),
    "diratime": (True, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME),
    "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "bind": (False, MS_BIND),
    "rbind": (False, MS_BIND | MS_REC),
    "remount": (False, MS_REMOUNT),
}
_PROPAGATION = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
}

_FSTYPE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_MOUNTS = 128  # rootfs mounts per task (containerd sends one or two)

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...] = ()

    def problem(self) -> str | None:
        """What makes this description unusable for mount(2), or None."""
        if not _FSTYPE.fullmatch(self.type):
            return f"type {self.type[:40]!r} is not a filesystem type"
        if not self.source or "\0" in self.source or len(self.source) > 4096:
            return f"source {self.source[:100]!r} is not usable"
        if any("\0" in o for o in self.options) or sum(map(len, self.options)) > 65536:
            return "options are not usable"
        return None


def parse_options(options: tuple[str, ...] | list[str]) -> tuple[int, int, str]:
    """Split mount options into (flags, propagation flags, data string)."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION:
            propagation |= _PROPAGATION[opt]
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


def _mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    rc = _c().mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or 'bind'} {source} on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    """Mount ``m`` on ``target`` the way containerd's mount package does."""
    flags, propagation, data = parse_options(m.options)
    fstype = m.type
    if fstype == "bind":
        fstype = ""
        flags |= MS_BIND
    _mount(m.source, target, fstype, flags, data or None)
    # A bind mount ignores flags like ro on first mount: remount to apply them.
    if flags & MS_BIND and flags & ~(MS_BIND | MS_REC | MS_REMOUNT):
        _mount("", target, "", flags | MS_REMOUNT, None)
    if propagation:
        _mount("", target, "", propagation, None)


def unmount(target: str) -> None:
    """Unmount ``target`` once; a lazy detach if it is busy; nothing if it is not mounted."""
    if _c().umount2(target.encode(), 0) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err == errno.EBUSY and _c().umount2(target.encode(), MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    raise OSError(err, f"umount {target}: {os.strerror(err)}")


def unmount_all(target: str) -> None:
    """Unmount every mount stacked on ``target``."""
    for _ in range(32):
        if not os.path.exists(target) or not is_mountpoint(target):
            return
        unmount(target)
