"""The daemon's open-file limit, and the one every program it starts gets back.

The daemon holds a few descriptors per container (containerd's connection, a pidfd, the
bundle's log FIFO, stdio while a process is created), so under a soft RLIMIT_NOFILE of 1024
(systemd's default, and what containerd 2.x, built with Go 1.21 or later, gives its shims) it
runs out at about 300 containers.  At start it raises its soft limit to the hard limit, as Go
programs do; runc, and so every container without an RLIMIT_NOFILE of its own in its OCI
spec, and the logging programs it starts get the original soft limit back.

A child inherits the soft limit its parent has when it is spawned, so a raised daemon lowers
its own soft limit to the original for the moment of the spawn (:func:`lowered`: the daemon is
one thread; nothing else opens a descriptor meanwhile).  That fails only when the daemon has
more descriptors open than the original limit allows (the spawn's own pipe gets none); then the
program is started through ``/bin/sh -c 'ulimit -Sn <original> && exec "$@"'`` (:func:`wrap`,
about 0.3 ms more per command).  A daemon whose soft limit already is its hard limit
(containerd 1.6's unit sets LimitNOFILE=infinity, and Go before 1.21 passed its raised limit
on) raises nothing and starts its programs directly.

A re-exec (reload) keeps the original through :data:`ENV`, which only the daemon's own
execve carries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: the original soft limit, from a daemon image to the next (re-exec only)
ENV = "EMBEDSHIM_NOFILE_SOFT"
SH = "/bin/sh"
_SCRIPT = 'ulimit -Sn "$0" && exec "$@"'

_original: int | None = None  # the soft limit to give back to children; None: not raised


def raise_nofile() -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; remember the original for children.

    Returns what the log says: ``soft`` and ``hard`` now, and ``children`` (the original
    soft limit) if they get another limit than ours."""
    global _original
    inherited = os.environ.pop(ENV, "")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    original = int(inherited) if inherited.isdigit() else soft
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep what we have; children get the same
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    _original = original if original < soft else None
    out = {"soft": soft, "hard": hard}
    if _original is not None:
        out["children"] = _original
    return out


def child_soft() -> int | None:
    """The soft limit children must get, if not ours (None: they inherit ours as it is)."""
    return _original


def set_child_soft(value: int | None) -> None:
    """For tests: pretend the daemon raised its limit from ``value``."""
    global _original
    _original = value


def reexec_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for the daemon's own re-exec, carrying the original soft limit."""
    if _original is not None:
        env[ENV] = str(_original)
    return env


@contextlib.contextmanager
def lowered() -> Iterator[None]:
    """The original soft limit for what is spawned inside (nothing changes if the daemon
    raised nothing); the raised one again after.  Raises OSError (EMFILE) inside when the
    daemon holds too many descriptors to open one under the original limit."""
    if _original is None:
        yield
        return
    raised = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_original, raised[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, raised)


def spawn(start: Callable[[str, list[str]], T], path: str, argv: list[str]) -> T:
    """``start(path, argv)`` so that the program gets the original soft limit: spawned under
    :func:`lowered`, or through the shell (:func:`wrap`) when the daemon holds too many
    descriptors for that: no new one can be opened under the original limit (EMFILE), or
    posix_spawn refuses to hand on one numbered above it (EBADF)."""
    if _original is None:
        return start(path, argv)
    try:
        with lowered():
            return start(path, argv)
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.EBADF):
            raise  # the program's own failure (not found, not executable)
    return start(*wrap(path, argv))


def wrap(path: str, argv: list[str]) -> tuple[str, list[str]]:
    """(executable, argv) that run ``path`` with ``argv[1:]`` under the original soft limit:
    ``path`` and ``argv`` as they are when the daemon did not raise its own."""
    if _original is None:
        return path, argv
    return SH, [SH, "-c", _SCRIPT, str(_original), path, *argv[1:]]
