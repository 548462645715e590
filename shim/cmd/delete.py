"""``delete``: clean up one task containerd has let go of, and report how it ended.

containerd 1.6 runs this after every task deletion (its own Close fires the same hook as a
dead shim) and for every task when the daemon's connection drops.  So it must be idempotent,
touch no other task, finish well inside containerd's 5 s, and report the real exit status
when one is known.  If the daemon answers, it does the work (it owns the task); otherwise
this process cleans up from the daemon's state store and runc's state.

The daemon answering NotFound is the usual case, so that path imports little (not even
``os``; see ``shim.util.fsutil``): what only the offline clean-up needs (os, subprocess, signal,
procinfo, the store, mount) is imported there.
"""

import posix
import sys
import time

from shim.cmd.flags import Flags, take_daemon_silent
from shim.ttrpc.blocking import BlockingClient
from shim.ttrpc.errors import Code, TTRPCError
from shim.util import identifiers, wire
from shim.util.fsutil import exists, is_mountpoint, join
from shim.util.paths import DaemonPaths

TYPE_CHECKING = False  # not typing's: importing typing costs more than delete itself
if TYPE_CHECKING:
    from collections.abc import Callable

DAEMON_SERVICE = "embedshim.v1.Daemon"
KILL_WAIT = 2.0
FORWARD_TIMEOUT = 2.0
OOM_RETRY_FOR = 30.0
RUNC_TIMEOUT = 2.0
UNKNOWN = 255


class AlreadyGone(Exception):
    """The live daemon does not know the task: containerd deleted it through the daemon."""


def via_daemon(paths: DaemonPaths, namespace: str, id: str) -> bytes | None:
    """Ask the running daemon to kill and delete the task; None if no daemon answers."""
    try:
        with BlockingClient(paths.address, timeout=4.0) as client:
            return client.call(DAEMON_SERVICE, "Cleanup", f"{namespace}\0{id}".encode())
    except TTRPCError as exc:
        if exc.code == Code.NOT_FOUND:
            raise AlreadyGone from None
        return None
    except OSError:
        return None


def _leftovers(paths: DaemonPaths, namespace: str, id: str, bundle: str) -> bool:
    """Anything of the task still on the host (runc state, a rootfs mount)?"""
    if exists(join(paths.runc_root_for(namespace), id)):
        return True
    return is_mountpoint(join(bundle, "rootfs"))


def _runc_binary(options: bytes | None) -> str:
    """binary_name (field 6) from a stored containerd.runc.v1.Options Any, else runc."""
    if not options:
        return "runc"
    try:
        any_fields = wire.read_fields(options)
        value = any_fields.get(2, [b""])[0]
        if isinstance(value, bytes):
            name = wire.read_fields(value).get(6, [b""])[0]
            if isinstance(name, bytes) and name:
                return name.decode()
    except ValueError:
        pass
    return "runc"


def _wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    from shim.util import procinfo

    deadline = time.monotonic() + timeout
    while procinfo.is_running(pid, start_time):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _runc(binary: str, runc_root: str, *args: str) -> None:
    """One runc command, bounded by RUNC_TIMEOUT; a failure is only a warning to containerd."""
    import subprocess

    try:
        subprocess.run(
            [binary, "--root", runc_root, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=RUNC_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.stderr.write(f"runc {args[0]} {args[-1]}: {exc}\n")


def _thaw(binary: str, runc_root: str, id: str) -> None:
    """Resume a paused container: on cgroup v1 a frozen process does not die of SIGKILL."""
    _runc(binary, runc_root, "resume", id)


def _kill(pid: int, start_time: int) -> None:
    import os
    import signal

    from shim.util import procinfo

    fd = procinfo.open_pidfd(pid, start_time)
    if fd is None:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exit_from_bpf(paths: DaemonPaths, pid: int, trace_id: int) -> tuple[int, int] | None:
    """(exit status, exited_at ns) from the pinned exit map, consuming the record."""
    if not trace_id:
        return None
    from shim.exits.exittrack import ExitTracker

    tracker = ExitTracker.open_existing(paths.bpf_pin_root)
    if tracker is None:
        return None
    try:
        record = tracker.lookup_exit(trace_id)
        if record is None:
            return None
        tracker.delete_exit(trace_id)
        tracker.unregister(pid)
        return record.exit_status, record.exited_at_wall_ns()
    except OSError as exc:
        sys.stderr.write(f"BPF exit map: {exc}\n")
        return None
    finally:
        tracker.close()


def _forward(address: str, namespace: str, payload: bytes) -> None:
    from shim.events.events import NAMESPACE_METADATA, SERVICE

    with BlockingClient(address, timeout=FORWARD_TIMEOUT) as client:
        client.call(
            SERVICE,
            "Forward",
            payload,
            metadata={NAMESPACE_METADATA: namespace},
            timeout=FORWARD_TIMEOUT,
        )


def _in_background(fn: "Callable[[], None]") -> None:
    """Run ``fn`` in a detached grandchild with stdio on /dev/null (containerd reads our
    stdout to its end, so nothing may keep it open), and return at once."""
    import os

    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        fn()
    finally:
        os._exit(0)


def _report_oom(namespace: str, id: str, memcg: str, published: int) -> None:
    """An OOM kill the kernel counted in the container's memory cgroup that containerd
    never heard of (the daemon died first): /tasks/oom, before ``runc delete`` removes the
    cgroup and its count.  containerd runs ``delete`` both while it serves (the daemon's
    connection dropped: the event goes out now, before the exit) and while it starts up,
    before it listens on its ttrpc socket: then a detached child keeps trying for
    ``OOM_RETRY_FOR`` seconds, and the event arrives after the exit containerd publishes
    itself (CRI marks the container OOMKilled either way)."""
    import os

    from shim.exits.memcg import MemoryCgroup

    cg = MemoryCgroup.decode(memcg)
    count = cg.oom_kills() if cg is not None else None
    address = os.environ.get("TTRPC_ADDRESS", "")
    if count is None or count <= published or not address:
        return
    from shim.cmd.flags import enable_site

    enable_site()  # the rare OOM path needs protobuf from site-packages (the launcher's -S)
    from shim.api import events_pb2
    from shim.events.events import envelope

    payload = envelope(namespace, events_pb2.TaskOOM(container_id=id))
    try:
        _forward(address, namespace, payload)
        return
    except (OSError, TTRPCError) as exc:
        sys.stderr.write(f"publish /tasks/oom for {id}: {exc}; retrying in the background\n")

    def retry() -> None:
        deadline = time.monotonic() + OOM_RETRY_FOR
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                _forward(address, namespace, payload)
                return
            except (OSError, TTRPCError):
                continue

    sys.stderr.flush()
    _in_background(retry)


def offline(paths: DaemonPaths, namespace: str, id: str, bundle: str) -> bytes:
    """Clean up without the daemon, from what it persisted."""
    import os
    import signal

    from shim.store.statestore import StateStore, StoreError
    from shim.util import procinfo

    pid = 0
    status = UNKNOWN
    checked = False
    exited_at = time.time_ns()
    runc_root = paths.runc_root_for(namespace)
    binary = "runc"
    store: StateStore | None = None
    if os.path.exists(paths.store):
        try:
            store = StateStore(paths.store)
            rec = store.get(namespace, id)
        except StoreError as exc:
            sys.stderr.write(f"state store unreadable: {exc}\n")
            rec = None
        if rec is not None:
            pid = rec.pid
            runc_root = rec.runc_root or runc_root
            binary = _runc_binary(rec.options)
            bundle = rec.bundle or bundle  # checked when the task was created
            checked = bool(rec.bundle)
            if rec.memcg:
                _report_oom(namespace, id, rec.memcg, rec.oom_published)
            if rec.exit_status is not None:
                status = rec.exit_status
                exited_at = rec.exited_at or exited_at
            else:
                if procinfo.is_running(rec.pid, rec.start_time):
                    # Still running and nobody will manage it any more: end it.
                    if rec.status == "paused":
                        _thaw(binary, runc_root, id)
                    _kill(rec.pid, rec.start_time)
                    if _wait_gone(rec.pid, rec.start_time, KILL_WAIT):
                        status = 128 + signal.SIGKILL
                    exited_at = time.time_ns()
                # The pinned BPF map saw the exit even if no daemon did: the real status.
                found = _exit_from_bpf(paths, rec.pid, rec.trace_id)
                if found is not None:
                    status, exited_at = found
    _runc(binary, runc_root, "delete", "--force", id)
    if bundle and not checked:
        from shim.oci.bundle import allowed_roots, check_path, state_of

        # containerd runs us in (and passes -bundle) the task's bundle, as it runs `start`:
        # that is its state directory, as the daemon learned it from `start`.
        try:
            check_path(bundle, namespace, id, allowed_roots(state_of(bundle, namespace, id)))
        except TTRPCError as exc:
            sys.stderr.write(f"not cleaning up the bundle: {exc.message}\n")
            bundle = ""
    from shim.oci import piddir

    if bundle:
        from shim.oci.mount import unmount_all

        try:
            unmount_all(os.path.join(bundle, "rootfs"))
        except OSError as exc:
            sys.stderr.write(f"{exc}\n")
        try:  # a daemon without its pid directory had runc write it in the bundle
            os.unlink(os.path.join(bundle, piddir.base_name()))
        except OSError:
            pass
    piddir.remove_files(piddir.path_for(paths.dir), namespace, id)
    if store is not None:
        try:
            store.delete(namespace, id)
        except StoreError as exc:
            sys.stderr.write(f"{exc}\n")
        store.close()
    return wire.delete_response(pid, status, exited_at)


def main(flags: Flags) -> int:
    if not flags.address or not flags.id:
        sys.stderr.write("delete: -address and -id are required\n")
        return 1
    problem = identifiers.task_problem(flags.namespace, flags.id)
    if problem is not None:
        sys.stderr.write(f"delete: {problem}\n")
        return 1
    paths = DaemonPaths.for_containerd(flags.address)
    bundle = flags.bundle or posix.getcwd()
    try:
        # the C entry point asked already and got no answer: clean up offline at once
        out = None if take_daemon_silent() else via_daemon(paths, flags.namespace, flags.id)
    except AlreadyGone:
        # The normal case: containerd runs `delete` after every task deletion, which the
        # daemon has already done in full.  Only clean up if something is somehow left.
        if _leftovers(paths, flags.namespace, flags.id, bundle):
            out = offline(paths, flags.namespace, flags.id, bundle)
        else:
            out = wire.delete_response(0, 0, time.time_ns())
    if out is None:
        out = offline(paths, flags.namespace, flags.id, bundle)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return 0
