"""Stdio: containerd's FIFOs handed to the process (read-write, so that a containerd that
dies with their reader gives it no SIGPIPE), ``--log-uri file://`` (the container writes the
file itself), ``binary://`` logging programs (containerd's protocol), no stdio at all, and
stdin EOF for a piped, non-terminal ``ctr run`` and ``ctr task exec``."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.embed import RUNTIME, SHIM, daemons
from integration.harness import (
    Containerd,
    blocked_writing,
    processes_matching,
    task_list,
    wait_for,
)

# A logging program as containerd documents them.  It records what it was given, waits a
# little before it says it is ready (the process must not exist before that), then copies
# fd 3 and fd 4 into ``dest`` with a prefix.  With ``linger`` it stays after EOF until
# SIGTERM, like a program that does not watch its pipes.
LOGGER = r"""#!{python} -S
import json, os, select, signal, sys, time

fds = sorted(int(n) for n in os.listdir("/proc/self/fd"))
dest = sys.argv[sys.argv.index("dest") + 1]
linger = "linger" in sys.argv
log = open(dest, "ab", buffering=0)

def term(signum, frame):
    log.write(b"term\n")
    sys.exit(0)

signal.signal(signal.SIGTERM, term)
env = {{k: v for k, v in os.environ.items() if k != "LC_CTYPE"}}  # LC_CTYPE: Python's own
time.sleep(0.3)
ready = time.clock_gettime(time.CLOCK_BOOTTIME)
with open(dest + ".json", "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": env, "fds": fds, "ready": ready,
               "pipes": [os.readlink(f"/proc/self/fd/{{n}}") for n in (3, 4)]}}, f)
os.write(5, b"r")
os.close(5)
prefix = {{3: b"out: ", 4: b"err: "}}
while prefix:
    for fd in select.select(list(prefix), [], [])[0]:
        data = os.read(fd, 65536)
        if data:
            log.write(prefix[fd] + data)
        else:
            del prefix[fd]
log.write(b"eof\n")
while linger:
    time.sleep(1)
"""


@pytest.fixture
def logger(tmp_path: Path) -> str:
    path = tmp_path / "logger.py"
    path.write_text(LOGGER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def _loggers(path: str) -> list[int]:
    return [p.pid for p in processes_matching(lambda p: not p.zombie and path in p.cmdline)]


def _init_pid(c: Containerd, cid: str) -> int:
    return task_list(c)[cid][0]


def _fd_link(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _kill_and_delete(c: Containerd, cid: str) -> None:
    c.ctr("task", "kill", "-s", "KILL", cid)
    wait_for(lambda: task_list(c)[cid][1] == "STOPPED", what=f"{cid} stopped")
    c.ctr("task", "delete", cid)


def _daemon_fd_links(c: Containerd) -> set[str]:
    (daemon,) = daemons(c)
    d = f"/proc/{daemon.pid}/fd"
    links = set()
    for n in os.listdir(d):
        try:
            links.add(os.readlink(f"{d}/{n}"))
        except OSError:
            pass
    return links


def test_binary_log_uri(containerd: Containerd, busybox: str, logger: str, tmp_path: Path) -> None:
    dest = str(tmp_path / "b1.log")
    uri = f"binary://{logger}?dest={dest}&flag"
    containerd.run(
        RUNTIME, busybox, "b1", "sh", "-c", "echo hello; echo oops >&2; exec sleep 100000",
        detach=True, extra=("--log-uri", uri),
    )  # fmt: skip
    wait_for(lambda: b"out: hello" in Path(dest).read_bytes(), what="stdout in the log")
    wait_for(lambda: b"err: oops" in Path(dest).read_bytes(), what="stderr in the log")
    meta = json.loads(Path(dest + ".json").read_text())
    assert meta["argv"] == ["dest", dest, "flag", ""]
    assert meta["env"] == {"CONTAINER_ID": "b1", "CONTAINER_NAMESPACE": containerd.namespace}
    assert meta["fds"][:6] == [0, 1, 2, 3, 4, 5] and len(meta["fds"]) <= 7  # 7th: the listing
    # The process was created (runc create) only once the program said it was ready.
    pid = _init_pid(containerd, "b1")
    assert _start_ticks(pid) / os.sysconf("SC_CLK_TCK") >= meta["ready"] - 0.011
    # The process writes straight into the program's pipes; the daemon holds no end.
    assert [_fd_link(pid, 1), _fd_link(pid, 2)] == meta["pipes"]
    assert not set(meta["pipes"]) & _daemon_fd_links(containerd)
    assert len(_loggers(logger)) == 1
    _kill_and_delete(containerd, "b1")
    wait_for(lambda: not _loggers(logger), what="the logging program gone")
    assert Path(dest).read_bytes().endswith(b"eof\n")  # it saw EOF, it was not killed


def test_binary_log_uri_for_an_exec(
    containerd: Containerd, busybox: str, logger: str, tmp_path: Path
) -> None:
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    dest = str(tmp_path / "exec.log")
    r = containerd.ctr(
        "task", "exec", "--exec-id", "e1", "--log-uri", f"binary://{logger}?dest={dest}",
        "box", "sh", "-c", "echo from-exec; exit 3", check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert b"out: from-exec" in Path(dest).read_bytes()
    # containerd's runc shim names an exec's program by the exec's id.
    meta = json.loads(Path(dest + ".json").read_text())
    assert meta["env"]["CONTAINER_ID"] == "e1"
    wait_for(lambda: not _loggers(logger), what="the logging program gone")


@pytest.mark.parametrize("change", ["reload", "crash"])
def test_binary_logger_kept_across_the_daemon_and_stopped_at_delete(
    containerd: Containerd, busybox: str, logger: str, tmp_path: Path, change: str
) -> None:
    """The logging program keeps logging across a reload (still our child) and across a
    kill -9 of the daemon (the keeper's child then, found again through the pidfd the keeper
    held), and the daemon after it still stops it at Delete."""
    dest = str(tmp_path / "keep.log")
    containerd.run(
        RUNTIME, busybox, "talk", "sh", "-c",
        "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done",
        detach=True, extra=("--log-uri", f"binary://{logger}?dest={dest}&linger"),
    )  # fmt: skip
    wait_for(lambda: b"line 3\n" in Path(dest).read_bytes(), what="output before")
    (before,) = _loggers(logger)
    if change == "reload":
        env = {**os.environ, "EMBEDSHIM_ROOT": containerd.embedshim_root}
        r = subprocess.run(
            [os.path.join(sys.prefix, "bin", SHIM), "-address", containerd.address, "reload"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    else:
        (daemon,) = daemons(containerd)
        os.kill(daemon.pid, signal.SIGKILL)
        wait_for(lambda: [d.pid for d in daemons(containerd)] not in ([], [daemon.pid]),
                 what="a new daemon")  # fmt: skip
    size = os.path.getsize(dest)
    wait_for(lambda: os.path.getsize(dest) > size, what=f"output after the {change}")
    assert _loggers(logger) == [before]
    t0 = time.monotonic()
    _kill_and_delete(containerd, "talk")
    # The program saw EOF but lingers: the daemon after the change still knew it, stopped it.
    assert _loggers(logger) == []
    assert Path(dest).read_bytes().endswith(b"eof\nterm\n")
    assert time.monotonic() - t0 < 10


def test_bad_log_uris_are_refused_and_leave_nothing(
    containerd: Containerd, busybox: str, tmp_path: Path
) -> None:
    for uri, words in (
        (f"binary://{tmp_path}/no-such-logger", "logging binary"),
        ("foo:///x", "unknown stdio scheme"),
    ):
        r = containerd.run(
            RUNTIME, busybox, "bad", "true", rm=True, check=False, extra=("--log-uri", uri)
        )
        assert r.returncode != 0 and words in r.stderr, r.stderr
        assert "bad" not in task_list(containerd)
        containerd.ctr("container", "rm", "bad", check=False)
    # The daemon serves on.
    r = containerd.run(RUNTIME, busybox, "good", "sh", "-c", "echo ok", rm=True)
    assert r.stdout == "ok\n"


def test_file_log_uri_written_by_the_container_itself(
    containerd: Containerd, busybox: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "logs" / "f1.log")  # the directory is created too
    containerd.run(
        RUNTIME, busybox, "f1", "sh", "-c", "echo out; echo err >&2; exec sleep 100000",
        detach=True, extra=("--log-uri", f"file://{path}"),
    )  # fmt: skip
    wait_for(lambda: os.path.exists(path) and Path(path).read_text() == "out\nerr\n")
    pid = _init_pid(containerd, "f1")
    assert _fd_link(pid, 1) == _fd_link(pid, 2) == path  # no copy: the file is its stdout
    _kill_and_delete(containerd, "f1")
    r = containerd.run(
        RUNTIME, busybox, "f2", "sh", "-c", "echo again; exit 2", rm=True, check=False,
        extra=("--log-uri", f"file://{path}"),
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert Path(path).read_text() == "out\nerr\nagain\n"  # appended


def test_null_io(containerd: Containerd, busybox: str) -> None:
    r = containerd.run(
        RUNTIME, busybox, "n1", "sh", "-c", "echo hi; echo err >&2; exit 4",
        rm=True, check=False, extra=("--null-io",),
    )  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (4, "", "")
    containerd.run(RUNTIME, busybox, "n2", "sleep", "100000", detach=True, extra=("--null-io",))
    pid = _init_pid(containerd, "n2")
    assert [_fd_link(pid, fd) for fd in (0, 1, 2)] == ["/dev/null"] * 3
    containerd.ctr("task", "kill", "-s", "KILL", "n2")


def test_piped_stdin_reaches_eof(containerd: Containerd, busybox: str) -> None:
    data = "".join(f"line {i}\n" for i in range(40000))  # ~340 KB, more than a pipe holds
    argv = containerd.run_args(RUNTIME, busybox, "cat1", "cat", rm=True)
    r = containerd.ctr(*argv, input=data, timeout=30)
    assert r.stdout == data
    r = containerd.ctr(*containerd.run_args(RUNTIME, busybox, "cat2", "cat", rm=True), input="")
    assert r.stdout == ""
    containerd.run(RUNTIME, busybox, "box", "sleep", "100000", detach=True)
    r = containerd.ctr(
        "task", "exec", "--exec-id", "c1", "box", "sh", "-c", "wc -l; echo done",
        input=data, timeout=30,
    )  # fmt: skip
    assert r.stdout.split() == ["40000", "done"]
    containerd.ctr("task", "kill", "-s", "KILL", "box")


def _read_available(fd: int) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def _numbers(data: bytes) -> list[int]:
    """The counter's numbers in ``data``, from its first whole line to its last."""
    lines = data.split(b"\n")[1:-1]  # the first and last may be cut
    return [int(ln.split()[1]) for ln in lines]


def test_fifos_are_handed_over_read_write_and_survive_a_containerd_kill(
    containerd: Containerd, busybox: str
) -> None:
    """A container writing all the time to containerd's stdout FIFO: the FIFO itself is its
    fd 1 (and 2), opened read-write, and the daemon keeps no end of it.  Its reader dies
    with containerd (kill -9): the writer blocks once the pipe is full, with no SIGPIPE;
    containerd comes back, a reader again, and the count goes on with nothing lost."""
    c = containerd
    pad = "x" * 100  # 64 KiB of pipe is under 640 lines
    script = f'i=0; while :; do echo "line $i {pad}"; i=$((i+1)); usleep 1000; done'
    c.run(RUNTIME, busybox, "talker", "sh", "-c", script, detach=True)
    pid = _init_pid(c, "talker")
    ticks = _start_ticks(pid)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        link = _fd_link(pid, fd)
        assert link.startswith(c.fifo_dir + "/") and link.endswith(f"talker-{name}"), link
        assert stat.S_ISFIFO(os.stat(f"/proc/{pid}/fd/{fd}").st_mode)
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        assert flags & os.O_ACCMODE == os.O_RDWR, oct(flags)
        assert link not in _daemon_fd_links(c)  # handed over, not copied
    stdout_path = _fd_link(pid, 1)

    # containerd's reader (ctr's exited with `run -d`): the test reads for it.
    got = bytearray()

    def read_until(reader: int, last: int) -> bool:
        got.extend(_read_available(reader))
        numbers = _numbers(bytes(got))
        return bool(numbers) and numbers[-1] > last

    reader = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        wait_for(lambda: read_until(reader, 50), what="output")
    finally:
        os.close(reader)
    c.kill9()

    # No reader left but the container's own: it fills the pipe and waits, not killed.
    def blocked() -> bool:
        assert os.path.exists(f"/proc/{pid}/stat"), "the writer died (SIGPIPE?)"
        return blocked_writing(pid, 1)

    wait_for(blocked, what="writer blocked on a full pipe")
    assert _start_ticks(pid) == ticks
    c.start()
    assert task_list(c)["talker"] == (pid, "RUNNING")
    before = _numbers(bytes(got))[-1]
    reader = os.open(stdout_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        # past what the pipe held: it writes again
        wait_for(lambda: read_until(reader, before + 1000), timeout=30, what="output again")
    finally:
        os.close(reader)
    numbers = _numbers(bytes(got))
    assert numbers == list(range(numbers[0], numbers[-1] + 1))  # nothing lost or repeated
    assert _start_ticks(pid) == ticks
    _kill_and_delete(c, "talker")
