"""embedshim's runc-exec wrapper: run ``runc exec --detach`` and record the exec'd process's exit.

``runc exec --detach`` forks the process and exits, so whoever registers the pid afterwards
races a fast exit.  This wrapper is a child subreaper, so the detached process is re-parented
to it: it stays a zombie until the wrapper has read its start time and written its status, and
no exit can be missed.  The protocol (command line, sync-fd lines, exit codes) is in README.md.

Started for every exec (Kubernetes probes exec often) as ``python3 -S -E runc_exec.py ...``,
so start-up is the cost that matters: it imports only built-in modules (``posix``, ``_signal``,
``time``) and ``_ctypes`` (for prctl; not ``ctypes``, whose import costs several ms), and
``json`` only on the error path.  Do not import ``os``, ``signal``, ``typing`` or
``__future__`` here.
"""

import _ctypes
import posix
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # the C module has no stubs; ``signal`` re-exports the same names
    import signal as _signal
else:
    import _signal

PR_SET_CHILD_SUBREAPER = 36
SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
RESERVED_SIGNALS = (32, 33)  # glibc's SIGCANCEL and SIGSETXID

EXIT_OK = 0  # "exit" sent and the status file written
EXIT_ERROR = 1  # "error" sent: no exec'd process to track
EXIT_USAGE = 2  # bad command line or sync fd: message on stderr only
EXIT_LOST = 3  # "pid" sent, but the status file (or the status) could not be recorded

USAGE = (
    "usage: runc_exec.py --sync-fd N --status-file PATH [--runc PATH] --root DIR"
    " [--log FILE] [--systemd-cgroup] [--timeout SECONDS] --pid-file FILE"
    " --process FILE [--console-socket PATH] [--nofile SOFT] CONTAINER_ID"
)
_VALUED = (
    "--sync-fd",
    "--status-file",
    "--runc",
    "--root",
    "--log",
    "--timeout",
    "--pid-file",
    "--process",
    "--console-socket",
    "--nofile",
)
_REQUIRED = ("--sync-fd", "--status-file", "--root", "--pid-file", "--process")
# Signals whose default action must stay: faults, and SIGCHLD (ignoring it auto-reaps children).
_KEEP_DEFAULT = {
    _signal.SIGKILL,
    _signal.SIGSTOP,
    _signal.SIGCHLD,
    _signal.SIGSEGV,
    _signal.SIGBUS,
    _signal.SIGFPE,
    _signal.SIGILL,
    _signal.SIGABRT,
    _signal.SIGTRAP,
    _signal.SIGSYS,
}


class UsageError(Exception):
    pass


class Timeout(Exception):
    pass


class Options:
    def __init__(self, values: dict[str, str], systemd_cgroup: bool, container_id: str) -> None:
        self.sync_fd = int(values["--sync-fd"])
        self.status_file = values["--status-file"]
        self.runc = values.get("--runc", "runc")
        self.root = values["--root"]
        self.log = values.get("--log")
        self.timeout = float(values.get("--timeout", "0"))
        self.pid_file = values["--pid-file"]
        self.process = values["--process"]
        self.console_socket = values.get("--console-socket")
        self.nofile = int(values["--nofile"]) if "--nofile" in values else None
        self.systemd_cgroup = systemd_cgroup
        self.container_id = container_id


def parse_args(args: list[str]) -> Options:
    """Parse by hand: argparse would cost more start-up time than the whole wrapper."""
    values: dict[str, str] = {}
    systemd_cgroup = False
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--systemd-cgroup":
            systemd_cgroup = True
        elif arg.startswith("--") and arg.partition("=")[0] in _VALUED:
            name, eq, value = arg.partition("=")
            if not eq:
                if i == len(args):
                    raise UsageError(f"{name} needs a value")
                value = args[i]
                i += 1
            values[name] = value
        elif arg == "--":
            positional.extend(args[i:])
            break
        elif arg.startswith("-"):
            raise UsageError(f"unknown option {arg}")
        else:
            positional.append(arg)
    missing = [name for name in _REQUIRED if name not in values]
    if missing:
        raise UsageError("missing " + ", ".join(missing))
    if len(positional) != 1:
        raise UsageError("exactly one container id is needed")
    try:
        opts = Options(values, systemd_cgroup, positional[0])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if opts.sync_fd < 3:
        raise UsageError("--sync-fd must be 3 or more: 0, 1 and 2 are the exec's stdio")
    return opts


def runc_argv(opts: Options, log: str) -> list[str]:
    argv = [opts.runc, "--root", opts.root, "--log", log, "--log-format", "json"]
    if opts.systemd_cgroup:
        argv.append("--systemd-cgroup")
    argv += ["exec", "--detach", "--pid-file", opts.pid_file, "--process", opts.process]
    if opts.console_socket:
        argv += ["--console-socket", opts.console_socket]
    argv.append(opts.container_id)
    return argv


class Sync:
    """The reporting channel; once the daemon is gone (EPIPE), lines are dropped, not fatal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.alive = True
        self.pid_sent = False

    def send(self, line: str) -> None:
        self.pid_sent = self.pid_sent or line.startswith("pid ")
        if not self.alive:
            return
        data = (line.replace("\n", " ") + "\n").encode(errors="replace")
        try:
            while data:
                data = data[posix.write(self.fd, data) :]
        except OSError:
            self.alive = False


def libc(name: str) -> int:
    """The address of a libc function, for ``_ctypes.call_function`` (int arguments/result)."""
    # dlopen(NULL): the program's global symbols, libc's among them (typeshed wants a path).
    return _ctypes.dlsym(_ctypes.dlopen(None), name)  # type: ignore[arg-type]


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER, 1) through ``_ctypes`` alone."""
    if _ctypes.call_function(libc("prctl"), (PR_SET_CHILD_SUBREAPER, 1)) != 0:
        raise OSError("prctl(PR_SET_CHILD_SUBREAPER) failed")


def default_reserved_signals(syscall: int) -> None:
    """Set glibc's reserved signals (32, 33) to SIG_DFL with a raw rt_sigaction.

    A spawner that used posix_spawn (glibc 2.36) leaves them ignored, and that survives every
    exec down to the exec'd process; glibc's sigaction() refuses to touch them.
    """
    nr = SYS_RT_SIGACTION.get(posix.uname().machine)
    if nr is None:
        return
    act = bytes(32)  # struct sigaction: SIG_DFL, no flags, no restorer, empty mask
    for sig in RESERVED_SIGNALS:
        _ctypes.call_function(syscall, (nr, sig, act, None, 8))


def ignore_signals() -> set[int]:
    """Survive the daemon's (or a terminal's) signals so the status still gets recorded.

    Returns the signals that runc must get back at their default: an ignored disposition
    survives execve and would reach the exec'd process.
    """
    reset = set()
    for sig in _signal.valid_signals():
        if sig in _KEEP_DEFAULT:
            continue
        try:
            _signal.signal(sig, _signal.SIG_IGN)
        except (OSError, ValueError):
            continue
        reset.add(int(sig))
    return reset


def close_stray_fds(keep: int) -> None:
    """Close every fd but stdio and ``keep``, so nothing else can reach runc or the container."""
    for name in posix.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != keep:
            try:
                posix.close(fd)
            except OSError:
                pass  # the listing's own directory fd


def stdio_to_devnull() -> None:
    """Drop our copies of the exec's stdio, so its readers see EOF when the process exits."""
    try:
        null = posix.open("/dev/null", posix.O_RDWR | posix.O_CLOEXEC)
    except OSError:
        for fd in (0, 1, 2):
            try:
                posix.close(fd)
            except OSError:
                pass
        return
    for fd in (0, 1, 2):
        posix.dup2(null, fd)
    posix.close(null)


def set_soft_nofile(soft: int) -> None:
    """Our soft RLIMIT_NOFILE, and so runc's and the exec'd process's: the daemon's own is
    raised, and what it started with is what they must get (``resource`` only here)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _on_alarm(signum: int, frame: object) -> None:
    raise Timeout


def spawn(argv: list[str], reset: set[int]) -> int:
    """fork + exec runc with every signal at its default and none blocked; return its pid.

    Not posix_spawn: glibc 2.36's sets the two signals it reserves (32, 33) to SIG_IGN in the
    child, runc keeps that, and the exec'd process would inherit it.  An exec error comes
    back through a close-on-exec pipe.
    """
    syscall = libc("syscall")
    err_r, err_w = posix.pipe()  # close-on-exec: EOF means the exec worked
    pid = posix.fork()
    if pid == 0:
        try:
            posix.close(err_r)
            default_reserved_signals(syscall)
            for sig in reset:
                _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, ())
            error: OSError = FileNotFoundError(f"{argv[0]} not found")
            for path in _candidates(argv[0]):
                try:
                    posix.execve(path, argv, posix.environ)
                except OSError as e:
                    error = e
            posix.write(err_w, str(error).encode(errors="replace"))
        finally:
            posix._exit(127)
    posix.close(err_w)
    try:
        failure = posix.read(err_r, 4096)
    finally:
        posix.close(err_r)
    if failure:
        posix.waitpid(pid, 0)
        raise OSError(failure.decode(errors="replace"))
    return pid


def _candidates(name: str) -> list[str]:
    """Where execvp would look for ``name``."""
    if "/" in name:
        return [name]
    path = posix.environ.get(b"PATH", b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin")
    return [f"{d.decode() or '.'}/{name}" for d in path.split(b":")]


def run_runc(argv: list[str], reset: set[int], timeout: float) -> int:
    """Run runc to completion and return its wait status; Timeout after ``timeout`` seconds."""
    pid = spawn(argv, reset)
    if timeout <= 0:
        return posix.waitpid(pid, 0)[1]
    _signal.signal(_signal.SIGALRM, _on_alarm)
    _signal.setitimer(_signal.ITIMER_REAL, timeout)
    try:
        status = posix.waitpid(pid, 0)[1]
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        return status
    except Timeout:
        try:
            posix.kill(pid, _signal.SIGKILL)
            posix.waitpid(pid, 0)
        except OSError:
            pass
        raise
    finally:
        _signal.signal(_signal.SIGALRM, _signal.SIG_IGN)


def log_size(path: str) -> int:
    try:
        return posix.stat(path).st_size
    except OSError:
        return 0


def read_from(fd: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = posix.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def last_error(data: bytes) -> str:
    """The last error runc wrote to its JSON log (json is imported only on this path)."""
    import json

    for raw in reversed(data.decode(errors="replace").splitlines()):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", "")).strip()
    return ""


def runc_error(log: str, log_fd: int, offset: int) -> str:
    """The error runc logged during our run: from ``offset`` of ``log``, or all of our memfd."""
    try:
        if log_fd >= 0:
            return last_error(read_from(log_fd, 0))
        fd = posix.open(log, posix.O_RDONLY | posix.O_CLOEXEC)
        try:
            return last_error(read_from(fd, offset))
        finally:
            posix.close(fd)
    except OSError:
        return ""


def fail(sync: Sync, message: str) -> int:
    stdio_to_devnull()
    sync.send(f"error {message}")
    return EXIT_ERROR


def describe(status: int) -> str:
    if posix.WIFSIGNALED(status):
        return f"runc exec killed by signal {posix.WTERMSIG(status)}"
    return f"runc exec exited with status {posix.waitstatus_to_exitcode(status)}"


def proc_stat(pid: int) -> tuple[int, int]:
    """(ppid, start time in clock ticks) from /proc/<pid>/stat fields 4 and 22."""
    fd = posix.open(f"/proc/{pid}/stat", posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        data = posix.read(fd, 4096)
    finally:
        posix.close(fd)
    # The command name may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2 :].split()
    return int(rest[1]), int(rest[19])


def read_pid(path: str) -> int:
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        return int(posix.read(fd, 64).strip())
    finally:
        posix.close(fd)


def wait_exit(pid: int) -> tuple[int, int]:
    """Block until ``pid`` exits, reaping stray orphans meanwhile; leave ``pid`` a zombie.

    Returns containerd's exit status (the code, or 128 + signal) and the wall-clock time in ns.
    Keeping the zombie until the status is on disk means the pid cannot be reused before then.
    """
    while True:
        info = posix.waitid(posix.P_ALL, 0, posix.WEXITED | posix.WNOWAIT)
        exited_at = time.time_ns()
        if info is None:
            continue
        if info.si_pid != pid:
            posix.waitpid(info.si_pid, 0)
            continue
        if info.si_code == posix.CLD_EXITED:
            return info.si_status, exited_at
        return 128 + info.si_status, exited_at


def write_status_file(path: str, status: int, exited_at: int) -> None:
    """Write ``<status> <exited_at_ns>`` atomically: readers see the whole file or none."""
    tmp = f"{path}.{posix.getpid()}.tmp"
    data = f"{status} {exited_at}\n".encode()
    try:
        fd = posix.open(
            tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o644
        )
        try:
            while data:
                data = data[posix.write(fd, data) :]
        finally:
            posix.close(fd)
        posix.rename(tmp, path)
    except OSError:
        try:
            posix.unlink(tmp)
        except OSError:
            pass
        raise


def main(args: list[str]) -> int:
    try:
        opts = parse_args(args)
        posix.set_inheritable(opts.sync_fd, False)  # also checks that the fd is open
    except (UsageError, OSError) as e:
        posix.write(2, f"runc_exec: {e}\n{USAGE}\n".encode())
        return EXIT_USAGE
    sync = Sync(opts.sync_fd)
    try:
        return run(opts, sync)
    except Exception as e:  # a bug: still tell the daemon which half of the protocol it got
        if sync.pid_sent:
            return EXIT_LOST
        return fail(sync, f"internal error: {e!r}")


def run(opts: Options, sync: Sync) -> int:
    reset = ignore_signals()
    close_stray_fds(opts.sync_fd)
    try:
        become_subreaper()
    except (OSError, AttributeError) as e:
        return fail(sync, str(e))
    if opts.nofile is not None:
        try:
            set_soft_nofile(opts.nofile)
        except (OSError, ValueError) as e:
            return fail(sync, f"cannot set the open-file limit to {opts.nofile}: {e}")

    if opts.log:
        log, log_fd, offset = opts.log, -1, log_size(opts.log)
    else:
        # A private log: runc reopens our memfd by path, so nothing is left on disk.
        log_fd, offset = posix.memfd_create("runc-log", posix.MFD_CLOEXEC), 0
        log = f"/proc/{posix.getpid()}/fd/{log_fd}"
    try:
        status = run_runc(runc_argv(opts, log), reset, opts.timeout)
    except OSError as e:
        return fail(sync, f"cannot run {opts.runc}: {e}")
    except Timeout:
        return fail(sync, f"runc exec timed out after {opts.timeout:g}s")
    if status != 0:
        return fail(sync, runc_error(log, log_fd, offset) or describe(status))
    stdio_to_devnull()

    try:
        pid = read_pid(opts.pid_file)
        ppid, start_time = proc_stat(pid)
    except (OSError, ValueError) as e:
        return fail(sync, f"cannot read the exec'd process from {opts.pid_file}: {e}")
    if ppid != posix.getpid():
        return fail(sync, f"exec'd process {pid} is not the wrapper's child (ppid {ppid})")
    sync.send(f"pid {pid} {start_time}")

    try:
        exit_status, exited_at = wait_exit(pid)
    except OSError:
        return EXIT_LOST
    code = EXIT_OK
    try:
        write_status_file(opts.status_file, exit_status, exited_at)
    except OSError:
        code = EXIT_LOST
    try:
        posix.waitpid(pid, 0)
    except OSError:
        pass
    sync.send(f"exit {exit_status} {exited_at}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
