"""Terminals: ``ctr run -t`` and ``ctr task exec -t`` driven through a pty as a user would
(typed commands, window resizes, exit codes), CloseIO on a terminal exec, a reader that stops
reading, and a terminal session kept across the daemon's in-place reload."""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import time
from collections.abc import Iterator

import grpc
import pytest

from integration.embed import RUNTIME, daemon_paths, daemons
from integration.harness import Containerd, blocked_writing, processes_matching, wait_for
from integration.tasks_grpc import Tasks, tasks_client
from integration.tty import PtySession

PROMPT = rb"[#$] "


@pytest.fixture
def box(containerd: Containerd, busybox: str) -> str:
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    return "box"


@pytest.fixture
def tasks(containerd: Containerd) -> Iterator[Tasks]:
    with tasks_client(containerd) as t:
        yield t


def _run_tty(c: Containerd, busybox: str, cid: str, *cmd: str) -> PtySession:
    argv = c.ctr_argv(*c.run_args(RUNTIME, busybox, cid, *cmd, rm=True, extra=("-t",)))
    return PtySession(argv, c._ctr_env())


def _exec_tty(c: Containerd, cid: str, exec_id: str, *cmd: str) -> PtySession:
    argv = c.ctr_argv("task", "exec", "-t", "--exec-id", exec_id, cid, *cmd)
    return PtySession(argv, c._ctr_env())


def _answer(s: PtySession, command: bytes, want: bytes) -> float:
    """Type ``command`` and Enter; seconds until ``want`` is on the screen (as a line)."""
    t0 = time.monotonic()
    s.write(command + b"\r")
    s.expect(rb"\n" + want + rb"\r+\n")
    return time.monotonic() - t0


def _size_seen(s: PtySession, rows: int, cols: int, live: bool = False) -> None:
    """A resize goes ctr -> ResizePty asynchronously (SIGWINCH): ask until it shows.

    ``live``: a resize made now, not the size ctr sends when it starts.  ctr 1.6 reads the
    terminal's size, sends it (Resize), and only then starts listening for SIGWINCH
    (cmd/ctr/commands/tasks HandleConsoleResize, called after Start returns); a resize in
    between is dropped by ctr and never reaches the shim.  No user can tell when ctr
    listens, so one who sees no change resizes again: so does this, once, halfway."""
    want = f"{rows} {cols}".encode()
    for i in range(20):
        if live and i == 10:
            s.proc.send_signal(signal.SIGWINCH)
        s.write(b"stty size\r")
        # busybox stty fails on a 0x0 terminal: no size has arrived yet
        m = s.expect(rb"\n(\d+ \d+|stty: [^\r\n]*)\r+\n")
        if m.group(1) == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"stty size never said {want!r}; last {m.group(1)!r}")


def _keystroke_latency(s: PtySession, n: int = 30) -> list[float]:
    """Seconds from a typed character to its echo (through ctr, the daemon's copy, the
    container's pty and its shell's line editor, and back), ``n`` times."""
    times = []
    s.drain()  # nothing typed may match what is already on the screen
    s.write(b"#")
    s.expect(b"#")
    for i in range(n):
        ch = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
        t0 = time.monotonic()
        s.write(ch)
        s.expect(ch)
        times.append(time.monotonic() - t0)
    s.write(b"\r")
    s.expect(PROMPT)
    return times


def test_run_tty_shell_answers_resizes_and_exits(containerd: Containerd, busybox: str) -> None:
    s = _run_tty(containerd, busybox, "tty1", "sh")
    try:
        s.expect(PROMPT, 20)
        rtt = _answer(s, b"echo $((6*7))", b"42")
        s.expect(PROMPT)
        # The initial size ctr sent at start, then a live resize.
        _size_seen(s, 24, 80)
        s.resize(33, 101)
        _size_seen(s, 33, 101, live=True)
        keys = _keystroke_latency(s)
        print(
            f"\ntty command round trip {rtt * 1000:.1f} ms; keystroke echo median "
            f"{statistics.median(keys) * 1000:.1f} ms, max {max(keys) * 1000:.1f} ms"
        )
        assert statistics.median(keys) < 0.25
        s.write(b"tty; exit 3\r")
        s.expect(rb"/dev/pts/\d+")
        assert s.wait() == 3
    finally:
        s.close()
    assert containerd.ctr("task", "ls", "-q").stdout.split() == []


def test_exec_tty_shell(containerd: Containerd, box: str) -> None:
    s = _exec_tty(containerd, box, "sh1", "sh")
    try:
        s.expect(PROMPT, 20)
        _answer(s, b"echo $((6*7))", b"42")
        _size_seen(s, 24, 80)  # the terminal's size, sent by ctr once the exec started
        s.resize(40, 120)
        _size_seen(s, 40, 120, live=True)
        # Its own terminal, not the container's (which has none).
        _answer(s, b"[ -t 0 ] && [ -t 1 ] && echo both-tty", b"both-tty")
        s.write(b"exit 5\r")
        assert s.wait() == 5
    finally:
        s.close()
    # The container is untouched and the exec is gone.
    r = containerd.ctr("task", "exec", "--exec-id", "after", box, "echo", "ok")
    assert r.stdout == "ok\n"


def _process_spec(c: Containerd, cid: str, args: list[str], terminal: bool) -> dict[str, object]:
    info = json.loads(c.ctr("container", "info", cid).stdout)
    process: dict[str, object] = info["Spec"]["process"]
    process.update(args=args, terminal=terminal)
    return process


class _Fifo:
    """A FIFO the test reads (stdout) or writes (stdin) itself, never blocking."""

    def __init__(self, path: str, write: bool) -> None:
        os.mkfifo(path)
        self.path = path
        # Read-write for the writer: opening never blocks, and nothing here ever reads it.
        self.fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK)
        self.data = bytearray()

    def read_until(self, want: bytes, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while want not in self.data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{want!r} not read; got {bytes(self.data[-400:])!r}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                self.data += os.read(self.fd, 65536)

    def close(self) -> None:
        os.close(self.fd)


def test_close_io_ends_stdin_of_a_tty_exec(
    containerd: Containerd, box: str, tasks: Tasks, tmp_path: object
) -> None:
    d = str(tmp_path)
    stdin, stdout = _Fifo(f"{d}/in", write=True), _Fifo(f"{d}/out", write=False)
    try:
        spec = _process_spec(containerd, box, ["sh", "-c", "cat; echo after-eof"], True)
        tasks.exec(box, "cat1", spec, stdin=stdin.path, stdout=stdout.path, terminal=True)
        tasks.start(box, "cat1")
        os.write(stdin.fd, b"hello\r")
        stdout.read_until(b"hello\r\nhello\r\n")  # the terminal's echo, then cat's copy
        # The test keeps its stdin writer open: nothing but CloseIO can end cat's input.
        with pytest.raises(grpc.RpcError) as err:
            tasks.wait(box, "cat1", timeout=0.7)
        # Our deadline, or containerd's answer when the deadline it passed on hit first.
        assert "deadline exceeded" in str(err.value).lower(), err.value
        # A partial line: the first VEOF hands "partial" to cat, the second is its EOF.
        os.write(stdin.fd, b"partial")
        stdout.read_until(b"partial")
        tasks.close_stdin(box, "cat1")
        assert tasks.wait(box, "cat1", timeout=15) == 0
        stdout.read_until(b"after-eof")
        assert stdout.data.count(b"partial") == 2, bytes(stdout.data)
        tasks.delete_process(box, "cat1")
    finally:
        stdin.close()
        stdout.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_reader_that_stops_reading_stalls_only_its_own_terminal(
    containerd: Containerd, busybox: str, box: str, tasks: Tasks, tmp_path: object
) -> None:
    d = str(tmp_path)
    stdout = _Fifo(f"{d}/flood", write=False)  # opened, never read until the end
    s = _run_tty(containerd, busybox, "calm", "sh")
    try:
        spec = _process_spec(containerd, box, ["sh", "-c", "yes flood | cat"], True)
        tasks.exec(box, "flood", spec, stdout=stdout.path, terminal=True)
        tasks.start(box, "flood")
        s.expect(PROMPT, 20)
        # The FIFO, then the daemon's buffer, then the pty fill up: `cat` waits to write.
        cgroup = containerd.cgroup_path(box)

        def stalled() -> bool:
            cats = processes_matching(lambda p: p.cmdline == ["cat"] and cgroup in p.cgroup)
            return len(cats) == 1 and blocked_writing(cats[0].pid, 1)

        wait_for(stalled, timeout=20, what="the flood stalled on its terminal")
        (daemon,) = daemons(containerd)
        cpu0, t0 = _cpu_seconds(daemon.pid), time.monotonic()
        for i in range(10):
            assert _answer(s, f"echo $(({i}*{i}+1000))".encode(), str(i * i + 1000).encode()) < 1
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
        busy = (_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
        print(f"\ndaemon CPU with a stalled terminal and a live session: {busy:.1%}")
        assert busy < 0.3  # not spinning on the stalled copy
        # The reader comes back: the flood flows again, in order.
        got = bytearray()
        t1 = time.monotonic()
        deadline = t1 + 20
        while len(got) < 8 << 20 and time.monotonic() < deadline:
            if select.select([stdout.fd], [], [], 0.5)[0]:
                got += os.read(stdout.fd, 65536)
        rate = len(got) / (time.monotonic() - t1) / 1e6
        print(f"terminal output through the daemon: {rate:.1f} MB/s")
        assert len(got) >= 8 << 20
        lines = bytes(got).split(b"\r\n")[1:-1]
        assert set(lines) == {b"flood"}
        containerd.ctr("task", "kill", "--exec-id", "flood", "-s", "KILL", box)
        assert tasks.wait(box, "flood") == 137
        tasks.delete_process(box, "flood")
        s.write(b"exit\r")
        assert s.wait() == 0
    finally:
        s.close()
        stdout.close()


def _two_sessions(c: Containerd, busybox: str) -> tuple[PtySession, PtySession]:
    """`ctr run -t ... sh` (container "keep") and a `ctr task exec -t` shell in it, both at
    their prompt."""
    s = _run_tty(c, busybox, "keep", "sh")
    try:
        s.expect(PROMPT, 20)
        _answer(s, b"echo $((6*7))", b"42")
        e = _exec_tty(c, "keep", "sh2", "sh")
        e.expect(PROMPT, 20)
    except BaseException:
        s.close()
        raise
    return s, e


def _exit_both(s: PtySession, e: PtySession) -> None:
    """Each shell exits with its own code, and ctr returns it."""
    e.write(b"exit 6\r")
    assert e.wait() == 6
    s.write(b"exit 4\r")
    assert s.wait() == 4


def test_tty_sessions_survive_daemon_reload(containerd: Containerd, busybox: str) -> None:
    s, e = _two_sessions(containerd, busybox)
    try:
        e.write(b"printf 'half '")  # a command line half typed across the reload
        e.expect(b"half '")
        (daemon,) = daemons(containerd)
        log_path = daemon_paths(containerd).log
        reloads = open(log_path).read().count("daemon reloaded")
        os.kill(daemon.pid, signal.SIGHUP)
        # Typed while the daemon re-executes: the bytes wait in the FIFO (or in the handed
        # over buffer) and the new image delivers them.
        s.write(b"echo $((8*8))\r")
        wait_for(lambda: open(log_path).read().count("daemon reloaded") > reloads, what="reload")
        s.expect(rb"\n64\r+\n")
        assert [p.pid for p in daemons(containerd)] == [daemon.pid]
        _answer(s, b"echo $((9*9))", b"81")
        s.resize(30, 90)
        _size_seen(s, 30, 90)
        e.write(b"; echo done\r")
        e.expect(rb"half done\r+\n")
        e.resize(50, 150)
        _size_seen(e, 50, 150)
        _exit_both(s, e)
    finally:
        s.close()
        e.close()


def test_tty_sessions_survive_daemon_crash(containerd: Containerd, busybox: str) -> None:
    """kill -9 of the daemon: the keeper held the pty masters and FIFOs, the next daemon
    copies again; only bytes the dead daemon had read and not yet written could be lost, so
    the test types after the new daemon is up."""
    s, e = _two_sessions(containerd, busybox)
    try:
        (daemon,) = daemons(containerd)
        log_path = daemon_paths(containerd).log
        os.kill(daemon.pid, signal.SIGKILL)
        wait_for(lambda: "daemon restarted after a crash" in open(log_path).read(), what="restart")
        assert "stdio taken back from the keeper" in open(log_path).read()
        _answer(s, b"echo $((8*8))", b"64")
        _answer(s, b"echo $((9*9))", b"81")
        s.resize(30, 90)
        _size_seen(s, 30, 90)
        _answer(e, b"echo $((5*5))", b"25")
        _exit_both(s, e)
    finally:
        s.close()
        e.close()
