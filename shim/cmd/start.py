"""``start``: print the address of this containerd's daemon, starting it if needed.

containerd reads stdout and stderr together as the address and waits until every holder of
those pipes has closed them, so the daemon is spawned with /dev/null for its stdio, in its own
session, and signals readiness through a pipe of its own.  Concurrent starts (containerd
creating many containers at once) serialise on a lock file; each one reserves the daemon for
its task, so an idle daemon cannot exit between ``start`` and containerd's ``Create``.
containerd runs ``start`` in the task's bundle, so a daemon spawned here is told the state
directory of its containerd (``-containerd-state``), the one place it takes bundles from.

With a daemon up (the usual case) this connects, reserves, writes the bundle's address file
and prints; that path imports no ``os`` (see ``shim.util.fsutil``), subprocess or select, and does
not read stdin (containerd's TTRPC_ADDRESS is only needed to spawn a daemon).
"""

import fcntl
import posix
import sys

from shim.cmd.flags import NAME, Flags, take_daemon_silent
from shim.ttrpc.blocking import BlockingClient
from shim.ttrpc.errors import TTRPCError
from shim.util import identifiers
from shim.util.fsutil import write_address
from shim.util.paths import DaemonPaths

DAEMON_SERVICE = "embedshim.v1.Daemon"
READY_TIMEOUT = 10.0


def reserve(paths: DaemonPaths, namespace: str, id: str) -> int | None:
    """Reserve the running daemon for this task; its pid, or None if no daemon answers."""
    try:
        with BlockingClient(paths.address, timeout=3.0) as client:
            out = client.call(DAEMON_SERVICE, "Reserve", f"{namespace}\0{id}".encode())
    except (OSError, TTRPCError):
        return None
    return int(out or b"0")


def ttrpc_address() -> str:
    """containerd's ttrpc address, for a daemon about to be spawned: every containerd since 1.6
    sets TTRPC_ADDRESS, so stdin is read only without it (and only when spawning)."""
    import os

    address = os.environ.get("TTRPC_ADDRESS")
    if address:
        return address
    stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    return ttrpc_address_from(stdin)


def ttrpc_address_from(stdin: bytes) -> str:
    """containerd 2.3+ passes BootstrapParams on stdin; its field 5 is the ttrpc address.
    Older versions pass the task options Any (whose field 1 is a type URL) or nothing."""
    if not stdin:
        return ""
    from shim.util import wire

    try:
        fields = wire.read_fields(stdin)
    except ValueError:
        return ""
    value = fields.get(5, [b""])[0]
    return value.decode(errors="replace") if isinstance(value, bytes) else ""


def _executable() -> str:
    import os

    exe = sys.argv[0]
    if os.path.isabs(exe) and os.access(exe, os.X_OK):
        return exe
    import shutil

    found = shutil.which(NAME)
    if found is None:
        raise RuntimeError(f"cannot find {NAME} to start the daemon")
    return found


def keeper_binary() -> str | None:
    """The keeper shipped in the package, or built in the checkout (shim.util.packaged), if any."""
    from shim.util import packaged

    return packaged.keeper()


def containerd_state(flags: Flags) -> str:
    """The state directory of the containerd running us: it runs ``start`` in the task's
    bundle, ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>``.  "" if the working
    directory is not one (the daemon then falls back to containerd's default)."""
    from shim.oci.bundle import state_of

    return state_of(flags.bundle or posix.getcwd(), flags.namespace, flags.id) or ""


def spawn_daemon(paths: DaemonPaths, flags: Flags, ttrpc_address: str) -> None:
    """Start the keeper, which listens and starts the daemon (its child, restarted if it
    dies); without a keeper binary, the daemon alone."""
    # Only when no daemon answers: most starts never need these.
    import os
    import select
    import subprocess
    import time

    state = containerd_state(flags)

    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)
        exe = _executable()
        argv = [exe, "-address", flags.address, "-ttrpc-address", ttrpc_address]
        if flags.debug:
            argv.append("-debug")
        if state:
            argv += ["-containerd-state", state]
        argv += ["-ready-fd", str(w), "daemon"]
        keeper = keeper_binary()
        if keeper is not None:
            # The daemon's command line with "keeper" for "daemon": the keeper runs it with
            # "daemon" again, so `ps` tells the two apart.
            argv = [
                keeper,
                "-socket",
                paths.socket,
                "-log",
                paths.log,
                "-pidfile",
                paths.keeper_pidfile,
                "--",
                *argv[:-1],
                "keeper",
            ]
        # fork+exec (not posix_spawn, which leaves glibc's signals 32/33 ignored in the child
        # and so in every container); stdio to /dev/null so containerd, which reads start's
        # output to EOF, does not wait for the daemon.
        subprocess.Popen(
            argv,
            executable=argv[0],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(w,),
            start_new_session=True,
            restore_signals=True,
        ).returncode = 0  # never waited for: it outlives us
    finally:
        os.close(w)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"daemon not ready after {READY_TIMEOUT:.0f}s; see {paths.log}")
            ready, _, _ = select.select([r], [], [], left)
            if ready:
                data = os.read(r, 64)
                if data.startswith(b"ready"):
                    return
                raise RuntimeError(f"daemon failed to start; see {paths.log}")
    finally:
        os.close(r)


def main(flags: Flags) -> int:
    if not flags.address:
        sys.stderr.write("start: -address (containerd's address) is required\n")
        return 1
    problem = identifiers.task_problem(flags.namespace, flags.id)
    if problem is not None:
        sys.stdout.write(f"embedshim start: {problem}\n")
        return 1
    paths = DaemonPaths.for_containerd(flags.address)
    silent = take_daemon_silent()
    try:
        paths.ensure()
        lock_fd = posix.open(paths.lock, posix.O_RDWR | posix.O_CREAT | posix.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if silent or reserve(paths, flags.namespace, flags.id) is None:
                spawn_daemon(paths, flags, ttrpc_address())
                if reserve(paths, flags.namespace, flags.id) is None:
                    raise RuntimeError(f"daemon does not answer on {paths.socket}")
        finally:
            posix.close(lock_fd)
        write_address(flags.bundle or posix.getcwd(), paths.address)
    except (OSError, RuntimeError) as exc:
        sys.stdout.write(f"embedshim start: {exc}\n")
        return 1
    sys.stdout.write(paths.address)
    return 0
