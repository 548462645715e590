"""Where runc writes the pid files of our processes: a private directory on ``/dev/shm``.

runc writes the pid of every process it creates or execs to ``--pid-file``, opened with
O_SYNC.  In the bundle, that is containerd's state dir, which is not on tmpfs everywhere
(a state dir on disk, or a ``/run`` that is not tmpfs, as on our test VM): there each
create and exec waits for a synchronous journal commit, 0.9 ms at the median of a ``runc
exec`` on this VM's ext4 and 8-13 ms one time in ten.  On tmpfs it costs nothing.  So the
daemon has runc write them in a directory of its own on ``/dev/shm`` (tmpfs on every
Linux machine), ``embedshim-<instance key>``, named ``<namespace>+<id>+init.pid`` and
``<namespace>+<id>+exec-<exec id>.pid`` ('+' is in no containerd identifier).  On a node
whose state dir is on tmpfs this changes nothing but the place.

``/dev/shm`` is writable by everyone, so the directory is used only if it is ours: a real
directory (not a link), owned by the daemon's user, closed to everyone else, in a sticky
``/dev/shm`` owned by root (nobody else can rename or remove it).  Otherwise pid files stay
in the bundle, as before.
"""

from __future__ import annotations

import os
import stat

from shim.util.fsutil import unlink_entries

SHM = "/dev/shm"


def path_for(instance: str) -> str:
    """The directory of the daemon whose files are in ``instance`` (its DaemonPaths.dir)."""
    return os.path.join(SHM, "embedshim-" + os.path.basename(instance.rstrip("/")))


def base_name(exec_id: str = "") -> str:
    """A process's pid file among its task's: the init's ("") or an exec's (in the bundle,
    where there is no directory of ours, it is the whole name)."""
    return f"exec-{exec_id}.pid" if exec_id else "init.pid"


def file_name(namespace: str, id: str, exec_id: str = "") -> str:
    """A process's pid file in the directory: its task's prefix, then :func:`base_name`."""
    return f"{namespace}+{id}+" + base_name(exec_id)


def prepare(path: str) -> str | None:
    """Make ``path`` (see :func:`path_for`) if needed; return it if it is safe to use."""
    parent = os.path.dirname(path)
    try:
        pst = os.stat(parent)
        if pst.st_uid != 0 or (pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX):
            return None  # anyone could swap our directory under us
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None  # made by somebody else, or not private
    return path


def remove_files(path: str, namespace: str, id: str) -> None:
    """Every pid file of one task left in the directory (its daemon died before reading
    them): for ``delete`` without a daemon."""
    unlink_entries(path, f"{namespace}+{id}+")


def remove(path: str) -> None:
    """The directory, when the daemon leaves for good (only if empty: a pid file left
    there belongs to a process being created, for a successor)."""
    try:
        os.rmdir(path)
    except OSError:
        pass
