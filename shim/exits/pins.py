"""A versioned directory of BPF pins: re-used when complete, else loaded and pinned once.

The exit tracker (shim.exits.exittrack) and the watch probe (shim.watch.watchprobe) each keep
their maps and links pinned on bpffs so they outlive the daemon.  Both open what is pinned,
and only when something is missing load the object under an flock of the directory, pinning
each link under a temporary name and renaming it, so concurrent daemons never see half a set.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from typing import TypeVar

from shim.exits import libbpf
from shim.exits.libbpf import BPFError, BPFLink

T = TypeVar("T")


def open_or_load(
    vdir: str,
    open_pins: Callable[[], T | None],
    load_and_pin: Callable[[], None],
    *,
    bpffs_mount: str | None = None,
) -> T:
    """``open_pins()`` if it finds the set, else ``load_and_pin()`` (at most one caller at a
    time) and ``open_pins()`` again.  ``bpffs_mount``: mount bpffs there first if needed."""
    found = open_pins()
    if found is not None:
        return found
    if bpffs_mount is not None:
        libbpf.ensure_bpffs(bpffs_mount)
    os.makedirs(vdir, mode=0o700, exist_ok=True)
    if not libbpf.is_bpffs(vdir):
        raise BPFError(errno.EINVAL, f"pin directory {vdir!r} is not on a bpf filesystem")
    dfd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        found = open_pins()
        if found is None:
            load_and_pin()
            found = open_pins()
        if found is None:
            raise BPFError(errno.EIO, f"pins under {vdir!r} missing right after loading")
        return found
    finally:
        os.close(dfd)  # releases the flock


def get_pinned(path: str) -> int | None:
    """A new fd for the object pinned at ``path``; None if nothing is pinned there."""
    try:
        return libbpf.obj_get(path)
    except BPFError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def pin_link(link: BPFLink, path: str) -> None:
    """Pin ``link`` at ``path``, replacing a stale pin there atomically."""
    tmp = path + "_new"  # bpffs names must not contain dots
    if os.path.lexists(tmp):
        os.unlink(tmp)
    link.pin(tmp)
    os.rename(tmp, path)


def remove(vdir: str, names: tuple[str, ...], pin_root: str) -> None:
    """Unlink ``names`` (and their leftover ``_new`` pins) under ``vdir``, then ``vdir`` and
    ``pin_root`` if empty; the programs detach once no process holds them any more."""
    for name in (*names, *(n + "_new" for n in names)):
        try:
            os.unlink(os.path.join(vdir, name))
        except FileNotFoundError:
            pass
    for d in (vdir, pin_root):
        try:
            os.rmdir(d)
        except OSError:
            pass  # missing, or still holds other versions
