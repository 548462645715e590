"""runc_exec/runc_exec.py against real runc and a busybox container made here.

Needs root, runc and a static /bin/busybox.  The container (its runc root, bundle and rootfs)
lives in one temp dir with a cgroup of its own; the fixture deletes the container, its
cgroup in every hierarchy and the temp dir, even when a test fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import runc_exec
from integration.prereq import missing
from runc_exec import runc_exec as wrapper

BUSYBOX = "/bin/busybox"
# The wrapper under test (argv before its options); test_runc_exec_c.py runs these tests again
# with the C wrapper in its place.
WRAPPER = [sys.executable, "-S", "-E", runc_exec.SCRIPT]
RUNC = shutil.which("runc")
LINE_TIMEOUT = 20.0


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "runc is Linux-only"
    if os.geteuid() != 0:
        return missing("needs root (runc creates a container)")
    if RUNC is None:
        return missing("runc not found on PATH")
    if not os.access(BUSYBOX, os.X_OK):
        return missing(f"needs a static {BUSYBOX} (busybox-static)")
    return None


_REASON = _skip_reason()
needs_runc = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


# ----------------------------------------------------------------- container


def _cgroup_mountpoints() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split(" ")[:1] in (["cgroup"], ["cgroup2"]):
                out.append(left.split(" ")[4])
    return out


def _build_rootfs(dest: str) -> None:
    for d in ("bin", "proc", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(dest, d))
    shutil.copy2(BUSYBOX, os.path.join(dest, "bin/busybox"))
    applets = subprocess.run(
        [BUSYBOX, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            os.symlink("busybox", os.path.join(dest, "bin", applet))


@dataclass
class Container:
    tmp: str
    root: str
    cid: str
    cgroup: str
    init_pid: int = 0
    _seq: list[int] = field(default_factory=lambda: [0])

    def runc(self, *args: str, check: bool = True) -> str:
        """Run runc, return its stdout.

        Output goes through files, not pipes: ``create`` hands its stdio to the container,
        which would hold a pipe open for as long as it runs.
        """
        assert RUNC is not None
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.run(
                [RUNC, "--root", self.root, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                timeout=60,
            )
            out.seek(0)
            err.seek(0)
            if check and proc.returncode != 0:
                raise AssertionError(f"runc {args[0]}: {err.read().decode(errors='replace')}")
            return out.read().decode(errors="replace")

    def path(self, name: str) -> str:
        """A fresh path in the temp dir."""
        self._seq[0] += 1
        return os.path.join(self.tmp, f"{name}-{self._seq[0]}")

    def process_json(self, args: list[str]) -> str:
        path = self.path("process") + ".json"
        process = {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
        }
        with open(path, "w") as f:
            json.dump(process, f)
        return path

    def pids(self) -> set[int]:
        """Every process in the container's cgroup."""
        for mp in _cgroup_mountpoints():
            procs = os.path.join(mp, self.cgroup.lstrip("/"), "cgroup.procs")
            if os.path.exists(procs):
                with open(procs) as f:
                    return {int(p) for p in f.read().split()}
        raise AssertionError(f"no cgroup.procs for {self.cgroup}")


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    if _REASON is not None:
        pytest.skip(_REASON)
    tmp = tempfile.mkdtemp(prefix="embedshim-runc-exec-")
    name = f"embedshim-rx-{uuid.uuid4().hex[:12]}"
    c = Container(tmp=tmp, root=os.path.join(tmp, "runc"), cid=name, cgroup=f"/{name}")
    try:
        bundle = os.path.join(tmp, "bundle")
        _build_rootfs(os.path.join(bundle, "rootfs"))
        config = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": ["sleep", "1000"],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "noNewPrivileges": True,
            },
            "root": {"path": "rootfs", "readonly": True},
            "hostname": "rx",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {
                    "destination": "/dev",
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "mode=755", "size=1m"],
                },
            ],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                "cgroupsPath": c.cgroup,
            },
        }
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(config, f)
        c.runc("create", "--bundle", bundle, name)
        c.runc("start", name)
        c.init_pid = int(json.loads(c.runc("state", name))["pid"])
        yield c
    finally:
        c.runc("delete", "--force", name, check=False)
        for mp in _cgroup_mountpoints():
            d = os.path.join(mp, name)
            if os.path.isdir(d):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------- running the wrapper


@dataclass
class Run:
    proc: subprocess.Popen[bytes] | None  # None: started by the test itself
    sync: int  # read end of the sync pipe, or -1 once closed
    status_file: str
    pid_file: str
    started: float
    buf: bytes = b""

    def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """The next sync line, or "" at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sync], [], [], left)[0]:
                raise AssertionError(f"no sync line within {timeout}s (got {self.buf!r})")
            chunk = os.read(self.sync, 4096)
            if not chunk:
                rest, self.buf = self.buf, b""
                return rest.decode()
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        return raw.decode()

    def lines(self) -> list[str]:
        out = []
        while line := self.line():
            out.append(line)
        return out

    def close_sync(self) -> None:
        if self.sync >= 0:
            os.close(self.sync)
            self.sync = -1

    def wait(self, timeout: float = LINE_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self.close_sync()

    def status(self) -> str:
        with open(self.status_file) as f:
            return f.read()


def start(
    c: Container,
    args: list[str] | None = None,
    *,
    process: str | None = None,
    container_id: str | None = None,
    stdin: int = subprocess.DEVNULL,
    stdout: int | None = None,
    extra: list[str] | None = None,
    script: str | None = None,
) -> Run:
    """Start the wrapper as the daemon will: stdio = the exec's, the sync pipe as fd N."""
    assert RUNC is not None
    r, w = os.pipe()
    status_file = c.path("status")
    pid_file = c.path("pid")
    prefix = WRAPPER if script is None else [sys.executable, "-S", "-E", script]
    cmd = [*prefix, "--sync-fd", str(w)]
    cmd += ["--status-file", status_file, "--runc", RUNC, "--root", c.root]
    cmd += ["--pid-file", pid_file, "--process", process or c.process_json(args or ["true"])]
    cmd += [*(extra or []), container_id or c.cid]
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=stdout, stderr=subprocess.DEVNULL, pass_fds=(w,)
        )
    finally:
        os.close(w)
    return Run(proc, r, status_file, pid_file, started)


def _pid_line(line: str) -> tuple[int, int]:
    kind, pid, start_time = line.split(" ")
    assert kind == "pid", line
    return int(pid), int(start_time)


def _exit_line(line: str) -> tuple[int, int]:
    kind, status, exited_at = line.split(" ")
    assert kind == "exit", line
    return int(status), int(exited_at)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("SigIgn:")).split()[1], 16)


def _no_leftovers(c: Container, run: Run) -> None:
    assert c.pids() == {c.init_pid}
    assert not os.path.exists(run.status_file)
    assert not [n for n in os.listdir(c.tmp) if n.endswith(".tmp")]


# ----------------------------------------------------------------- tests without runc


def test_parse_args_and_runc_argv() -> None:
    opts = wrapper.parse_args(
        "--sync-fd 5 --status-file /s --root /r --pid-file /p --process=/j.json"
        " --systemd-cgroup --console-socket /c --timeout 2.5 ctr".split()
    )
    assert (opts.sync_fd, opts.timeout, opts.container_id) == (5, 2.5, "ctr")
    assert wrapper.runc_argv(opts, "/l") == [
        "runc", "--root", "/r", "--log", "/l", "--log-format", "json", "--systemd-cgroup",
        "exec", "--detach", "--pid-file", "/p", "--process", "/j.json",
        "--console-socket", "/c", "ctr",
    ]  # fmt: skip
    for bad in (
        "--sync-fd 5 --root /r --pid-file /p --process /j ctr",  # no --status-file
        "--sync-fd x --status-file /s --root /r --pid-file /p --process /j ctr",
        "--sync-fd 2 --status-file /s --root /r --pid-file /p --process /j ctr",
        "--sync-fd 5 --status-file /s --root /r --pid-file /p --process /j --bogus ctr",
        "--sync-fd 5 --status-file /s --root /r --pid-file /p --process /j a b",
        "--sync-fd 5 --status-file /s --root /r --pid-file /p --process",
    ):
        with pytest.raises(wrapper.UsageError):
            wrapper.parse_args(bad.split())


def test_last_error_takes_the_last_error_line() -> None:
    log = b'{"level":"error","msg":"old"}\nnot json\n{"level":"error","msg":" new\\n"}\n'
    log += b'{"level":"info","msg":"later info"}\n'
    assert wrapper.last_error(log) == "new"
    assert wrapper.last_error(b"") == ""


def test_bad_command_line_exits_2_with_usage() -> None:
    proc = subprocess.run(
        [*WRAPPER, "--sync-fd", "999"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == wrapper.EXIT_USAGE
    assert "usage:" in proc.stderr


def _with_fake_runc(tmp_path: str, soft: int | None) -> tuple[str, str]:
    """Run the wrapper (under a raised soft limit) with a runc that writes down its own soft
    open-file limit and fails; returns (what it wrote, the wrapper's sync line)."""
    record = os.path.join(tmp_path, "nofile")
    if os.path.exists(record):
        os.unlink(record)
    fake = os.path.join(tmp_path, "runc")
    with open(fake, "w") as f:
        f.write(f"#!/bin/sh\nulimit -Sn > {record}\nexit 1\n")
    os.chmod(fake, 0o755)
    r, w = os.pipe()
    cmd = [*WRAPPER, "--sync-fd", str(w), "--runc", fake]
    cmd += ["--status-file", f"{tmp_path}/s", "--root", f"{tmp_path}/r"]
    cmd += ["--pid-file", f"{tmp_path}/p", "--process", f"{tmp_path}/j.json"]
    cmd += [*(["--nofile", str(soft)] if soft is not None else []), "ctr"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        subprocess.run(
            ["/bin/sh", "-c", f'ulimit -Sn {hard} && exec "$@"', "sh", *cmd],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        line = f.readline()
    try:
        with open(record) as f:
            return f.read().strip(), line
    except FileNotFoundError:
        return "", line


def test_nofile_sets_the_soft_limit_runc_gets(tmp_path: object) -> None:
    """--nofile: the daemon raised its own limit; runc (and what it starts) gets this one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert _with_fake_runc(str(tmp_path), 300)[0] == "300"
    assert _with_fake_runc(str(tmp_path), None)[0] == str(hard)  # inherited as it is
    got, line = _with_fake_runc(str(tmp_path), hard + 1)  # more than the hard limit
    assert got == "" and line.startswith("error cannot set the open-file limit to "), line
    opts = wrapper.parse_args(
        "--sync-fd 5 --status-file /s --root /r --pid-file /p --process /j --nofile 64 c".split()
    )
    assert opts.nofile == 64


def test_wait_exit_reaps_orphans_and_keeps_the_target_a_zombie() -> None:
    """An orphan re-parented to the subreaper is reaped; the target is left for the caller."""
    code = textwrap.dedent(
        """
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import runc_exec
        runc_exec.become_subreaper()
        # The subshell exits at once, so `sleep 0.1` is orphaned to us and exits first.
        argv = ["sh", "-c", "(sleep 0.1 &); sleep 0.4; exit 7"]
        pid = os.posix_spawn("/bin/sh", argv, {"PATH": "/bin:/usr/bin"})
        status, _ = runc_exec.wait_exit(pid)
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        os.waitpid(pid, 0)
        try:
            os.waitpid(-1, os.WNOHANG)
            left = "children left"
        except ChildProcessError:
            left = "none left"
        print(status, state, left)
        """
    )
    out = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code, os.path.dirname(runc_exec.SCRIPT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.split() == ["7", "Z", "none", "left"], out.stderr


# ----------------------------------------------------------------- tests against runc


@needs_runc
def test_exit_code_pid_and_status_file(container: Container) -> None:
    before = time.time_ns()
    run = start(container, ["sh", "-c", "exit 3"])
    pid, start_time = _pid_line(run.line())
    status, exited_at = _exit_line(run.line())
    assert run.line() == ""
    assert run.wait() == wrapper.EXIT_OK
    assert status == 3
    assert before < exited_at < time.time_ns()
    assert run.status() == f"3 {exited_at}\n"
    with open(run.pid_file) as f:
        assert int(f.read()) == pid
    assert start_time > 0
    assert container.pids() == {container.init_pid}


@needs_runc
def test_true_200_times_and_timing(
    container: Container, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 execs of `true`, all right; timed against bare `runc exec -d`, runs interleaved."""
    n = 200
    process = container.process_json(["true"])
    pyc = runc_exec.compile_script(container.path("runc_exec") + ".pyc")
    times: dict[str, list[float]] = {k: [] for k in ("bare", "pid", "exit", "pyc pid", "pyc exit")}
    with BareRunc(container, process) as bare:
        for i in range(n):
            times["bare"].append(bare.exec())
            for script, key in ((runc_exec.SCRIPT, ""), (pyc, "pyc "))[: 1 + i % 2]:
                run = start(container, process=process, script=script)
                pid_line = run.line()
                times[key + "pid"].append(time.monotonic() - run.started)
                lines = [pid_line, *run.lines()]
                assert run.wait() == wrapper.EXIT_OK, lines
                times[key + "exit"].append(time.monotonic() - run.started)
                assert len(lines) == 2
                _pid_line(lines[0])
                status, exited_at = _exit_line(lines[1])
                assert status == 0
                assert run.status() == f"0 {exited_at}\n"
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    with capsys.disabled():
        print(
            f"\nrunc_exec: {n} execs of `true`, median wall time: bare `runc exec -d`"
            f" {ms['bare']:.1f} ms; wrapper (.py) to `pid` {ms['pid']:.1f} ms, to its exit"
            f" {ms['exit']:.1f} ms; wrapper (.pyc, {n // 2} runs) to `pid` {ms['pyc pid']:.1f} ms,"
            f" to its exit {ms['pyc exit']:.1f} ms"
        )
    assert container.pids() == {container.init_pid}


class BareRunc:
    """Times bare ``runc exec -d`` in a helper that is a subreaper and reaps the orphans.

    (Orphans left to pid 1 might never be reaped here.)  One exec per line on its stdin.
    """

    CODE = textwrap.dedent(
        """
        import os, subprocess, sys, time
        sys.path.insert(0, sys.argv[1])
        import runc_exec
        runc_exec.become_subreaper()
        runc, root, process, cid, pid_file = sys.argv[2:]
        for _ in sys.stdin:
            t = time.monotonic()
            subprocess.run([runc, "--root", root, "exec", "-d", "--pid-file", pid_file,
                            "--process", process, cid], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL)
            print(time.monotonic() - t, flush=True)
            with open(pid_file) as f:
                os.waitpid(int(f.read()), 0)
        """
    )

    def __init__(self, c: Container, process: str) -> None:
        assert RUNC is not None
        args = [os.path.dirname(runc_exec.SCRIPT), RUNC, c.root, process, c.cid, c.path("pid")]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def exec(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def __enter__(self) -> BareRunc:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        finally:
            self.proc.kill()
            self.proc.wait()


@needs_runc
@pytest.mark.parametrize("sig,expected", [(signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_killed_from_outside(container: Container, sig: signal.Signals, expected: int) -> None:
    run = start(container, ["sleep", "1000"])
    assert run.proc is not None
    pid, _ = _pid_line(run.line())
    try:
        # The daemon's signals are not for the wrapper: it ignores them and keeps waiting.
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            run.proc.send_signal(s)
        time.sleep(0.1)
        assert run.proc.poll() is None
        # The exec'd process itself got every signal back at its default.
        assert _ignored_signals(pid) == 0
        os.kill(pid, sig)
        status, exited_at = _exit_line(run.line())
        assert run.wait() == wrapper.EXIT_OK
        assert status == expected
        assert run.status() == f"{expected} {exited_at}\n"
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        run.proc.kill()
        run.wait()


@needs_runc
def test_posix_spawned_wrapper_still_leaves_no_signal_ignored(container: Container) -> None:
    """glibc's posix_spawn ignores signals 32 and 33 in its child; that must not reach the exec."""
    assert RUNC is not None
    r, w = os.pipe()
    status_file, sync_fd = container.path("status"), 5
    argv = [*WRAPPER, "--sync-fd", str(sync_fd)]
    argv += ["--status-file", status_file, "--runc", RUNC, "--root", container.root]
    argv += ["--pid-file", container.path("pid")]
    argv += ["--process", container.process_json(["sleep", "1000"]), container.cid]
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]]
    actions = [(os.POSIX_SPAWN_OPEN, fd, "/dev/null", os.O_RDWR, 0) for fd in (0, 1, 2)]
    actions.append((os.POSIX_SPAWN_DUP2, w, sync_fd))
    try:
        wrapper_pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    finally:
        os.close(w)
    run = Run(None, r, status_file, "", time.monotonic())
    pid, _ = _pid_line(run.line())
    try:
        assert _ignored_signals(wrapper_pid) & (3 << 31) == 3 << 31  # inherited, as feared
        assert _ignored_signals(pid) == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        assert _exit_line(run.line())[0] == 137
        assert os.waitpid(wrapper_pid, 0)[1] == 0
        run.close_sync()


@needs_runc
def test_stdout_reaches_the_pipe_and_eof_follows_the_exit(container: Container) -> None:
    r, w = os.pipe()
    try:
        run = start(container, ["sh", "-c", "echo hello; sleep 0.3; echo bye"], stdout=w)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as out:
        data = out.read()  # returns at EOF: when the last writer is gone
    assert data == b"hello\nbye\n"
    assert run.lines()[1] == "exit 0 " + run.status().split()[1]
    assert run.wait() == wrapper.EXIT_OK


@needs_runc
def test_stdin_and_stdout_pass_through(container: Container) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        run = start(container, ["sh", "-c", "tr a-z A-Z; exit 4"], stdin=in_r, stdout=out_w)
    finally:
        os.close(in_r)
        os.close(out_w)
    os.write(in_w, b"probe\n")
    os.close(in_w)  # the process sees EOF on its stdin: nobody else holds the write end
    with os.fdopen(out_r, "rb") as out:
        assert out.read() == b"PROBE\n"
    assert _exit_line(run.lines()[1])[0] == 4
    assert run.wait() == wrapper.EXIT_OK


@needs_runc
def test_wrapper_drops_its_copy_of_the_exec_stdio(container: Container) -> None:
    """The reader sees EOF once the process lets go of the pipe, though the wrapper waits on."""
    r, w = os.pipe()
    try:
        run = start(container, ["sh", "-c", "echo hi; exec sleep 1000 >/dev/null 2>&1"], stdout=w)
    finally:
        os.close(w)
    pid, _ = _pid_line(run.line())
    try:
        with os.fdopen(r, "rb") as out:
            assert select.select([out], [], [], LINE_TIMEOUT)[0]
            assert out.read() == b"hi\n"
        assert run.proc is not None and run.proc.poll() is None
    finally:
        os.kill(pid, signal.SIGKILL)
    assert _exit_line(run.line())[0] == 137
    assert run.wait() == wrapper.EXIT_OK


@needs_runc
def test_bad_process_json_reports_runc_error(container: Container) -> None:
    process = container.path("garbage") + ".json"
    with open(process, "w") as f:
        f.write("not json")
    run = start(container, process=process)
    lines = run.lines()
    assert run.wait() == wrapper.EXIT_ERROR
    assert len(lines) == 1 and lines[0].startswith("error exec failed: invalid character"), lines
    _no_leftovers(container, run)


@needs_runc
def test_unknown_container_reports_runc_error(container: Container) -> None:
    run = start(container, ["true"], container_id="no-such-container")
    assert run.lines() == ["error exec failed: container does not exist"]
    assert run.wait() == wrapper.EXIT_ERROR
    _no_leftovers(container, run)


@needs_runc
def test_missing_executable_with_a_shared_log(container: Container) -> None:
    """With --log, only what runc wrote during this run counts, not an older error."""
    log = container.path("runc-log")
    with open(log, "w") as f:
        f.write('{"level":"error","msg":"an older failure"}\n')
    run = start(container, ["no-such-binary"], extra=["--log", log])
    [line] = run.lines()
    assert run.wait() == wrapper.EXIT_ERROR
    assert line.startswith("error exec failed: unable to start container process: exec: ")
    assert "no-such-binary" in line
    _no_leftovers(container, run)


@needs_runc
def test_missing_runc_binary(container: Container) -> None:
    run = start(container, ["true"], extra=["--runc", "/nonexistent/runc"])
    [line] = run.lines()
    assert run.wait() == wrapper.EXIT_ERROR
    assert line.startswith("error cannot run /nonexistent/runc: "), line
    _no_leftovers(container, run)


@needs_runc
def test_hung_runc_is_killed_after_the_timeout(container: Container) -> None:
    fake = container.path("fake-runc")
    with open(fake, "w") as f:
        f.write("#!/bin/sh\nexec sleep 60\n")
    os.chmod(fake, 0o755)
    run = start(container, ["true"], extra=["--runc", fake, "--timeout", "0.5"])
    assert run.lines() == ["error runc exec timed out after 0.5s"]
    assert run.wait() == wrapper.EXIT_ERROR
    assert time.monotonic() - run.started < 10


@needs_runc
def test_status_file_is_written_when_the_sync_reader_is_gone(container: Container) -> None:
    run = start(container, ["sh", "-c", "sleep 0.3; exit 42"])
    run.close_sync()  # the daemon died: the wrapper gets EPIPE and carries on
    assert run.wait() == wrapper.EXIT_OK
    status, exited_at = run.status().split()
    assert status == "42" and int(exited_at) > 0
    assert container.pids() == {container.init_pid}


def test_fast_script_is_a_fresh_pyc() -> None:
    """fast_script() falls back to the .py only where it cannot write the cache: a compile
    error of the wrapper fails here (it would fail every exec too)."""
    with tempfile.TemporaryDirectory() as tmp:
        runc_exec.compile_script(os.path.join(tmp, "x.pyc"))  # raises on a compile error
    cache_dir = os.path.dirname(importlib.util.cache_from_source(runc_exec.SCRIPT))
    existing = cache_dir if os.path.isdir(cache_dir) else os.path.dirname(cache_dir)
    writable = os.access(existing, os.W_OK)
    path = runc_exec.fast_script()
    if path == runc_exec.SCRIPT:
        assert not writable, f"fast_script() fell back to the .py, but {existing} is writable"
        pytest.skip("the package directory is read-only: no cached bytecode")
    assert path.endswith(".pyc") and runc_exec._is_fresh(path)
    with open(path, "rb") as f:
        assert f.read(4) == importlib.util.MAGIC_NUMBER


@needs_runc
def test_compiled_script_runs_the_same(container: Container) -> None:
    pyc = runc_exec.compile_script(container.path("runc_exec") + ".pyc")
    run = start(container, ["sh", "-c", "exit 9"], script=pyc)
    lines = run.lines()
    assert run.wait() == wrapper.EXIT_OK
    assert [ln.split()[0] for ln in lines] == ["pid", "exit"]
    assert _exit_line(lines[1])[0] == 9


def test_start_up_time(capsys: pytest.CaptureFixture[str]) -> None:
    """What the .pyc is for: the wrapper runs without compiling itself, so it adds less than
    half of what running the .py adds to a bare interpreter (measured interleaved, so load
    from elsewhere hits all three alike)."""
    with tempfile.TemporaryDirectory() as tmp:
        medians = _start_up_medians(runc_exec.compile_script(os.path.join(tmp, "runc_exec.pyc")))
    with capsys.disabled():
        print("\nrunc_exec start-up (median of 40, to the usage error): ", end="")
        print(", ".join(f"{name} {ms:.1f} ms" for name, ms in medians.items()))
    bare = medians["python -S -E -c pass"]
    added_py = medians["runc_exec.py"] - bare
    added_pyc = medians["runc_exec.pyc"] - bare
    assert added_pyc < added_py / 2, medians


def _start_up_medians(pyc: str) -> dict[str, float]:
    base = [sys.executable, "-S", "-E"]
    cases = {"python -S -E -c pass": ["-c", "pass"], "runc_exec.py": [runc_exec.SCRIPT]}
    cases["runc_exec.pyc"] = [pyc]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(40):
        for name, args in cases.items():
            t = time.monotonic()
            subprocess.run(base + args, stderr=subprocess.DEVNULL, check=False)
            times[name].append(time.monotonic() - t)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}
