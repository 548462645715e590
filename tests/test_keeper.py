"""embedshim-keeper (keeper/keeper.c), the parent that holds containerd's connections across a
crash of the daemon, driven as a real binary with a fake daemon written in Python.

The fake daemon speaks the keeper's control protocol and serves each connection with a line
protocol (``ping`` answers ``pong <daemon pid> <connection id>``; others below); it appends
what it sees to a JSON-lines report the tests read.  Files in its flag directory change how
it starts (crash after attaching, die before, wait before attaching, ...), so each new daemon
the keeper starts reads them afresh.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEEPER = ROOT / "keeper" / "embedshim-keeper"
TIMEOUT = 10.0  # for anything that should happen "soon"

FAKE_DAEMON = r"""
import json, os, selectors, signal, socket, sys, time

REPORT = os.environ["FAKE_REPORT"]
FLAGS = os.environ["FAKE_FLAGS"]


def report(ev, **fields):
    fields.update(ev=ev, pid=os.getpid(), t=time.monotonic())
    fd = os.open(REPORT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (json.dumps(fields) + "\n").encode())
    os.close(fd)


def flag(name):
    try:
        with open(os.path.join(FLAGS, name)) as f:
            return f.read().strip() or "1"
    except FileNotFoundError:
        return None


def without_ready_fd(argv):
    if "-ready-fd" in argv:
        i = argv.index("-ready-fd")
        return argv[:i] + argv[i + 2 :]
    return argv


def on_term(sig, frame):
    report("signal", sig="TERM")
    os._exit(int(flag("term_exit_code") or 0))


def on_hup(sig, frame):
    report("signal", sig="HUP")
    if flag("reexec_on_hup"):  # like the real daemon's reload: same pid, same control fd
        os.execv(sys.executable, [sys.executable] + without_ready_fd(sys.argv))


if not flag("default_term"):
    signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGHUP, on_hup)
keeper_fd = os.environ.get("EMBEDSHIM_KEEPER_FD")
report("start", argv=sys.argv, keeper_fd=keeper_fd, ppid=os.getppid())
if flag("exit_before_attach"):
    os._exit(int(flag("exit_before_attach")))
if flag("attach_delay"):
    time.sleep(float(flag("attach_delay")))
ctl = socket.socket(fileno=int(keeper_fd))
os.set_inheritable(ctl.fileno(), True)
ctl.setblocking(True)
conns = {}  # id -> socket
stored = {}  # name -> fd
bufs = {}  # id -> bytes not yet a whole line
passed = {}  # id -> fds received on that connection, for "store"
listener = None


def add_conn(cid, fd):
    if cid in conns:  # again after a re-exec: keep one
        os.close(fd)
        return
    s = socket.socket(fileno=fd)
    s.setblocking(False)
    conns[cid], bufs[cid], passed[cid] = s, b"", []


def control_message():
    global listener
    data, fds, _, _ = socket.recv_fds(ctl, 4096, 4)
    if not data:
        return None
    kind, _, arg = data.decode().partition(" ")
    if kind == "L":
        listener = fds[0]
    elif kind == "F":
        if arg in stored:
            os.close(stored[arg])
        stored[arg] = fds[0]
    elif kind == "C":
        add_conn(int(arg), fds[0])
    elif kind == "Z":
        zpid, status = arg.split()
        report("Z", zpid=int(zpid), status=int(status))
    elif kind != "E":
        report("unexpected", message=data.decode(), fds=len(fds))
    return kind, arg


ctl.send(b"A")
if flag("batch_delay"):  # let the keeper's answer pile up before reading it
    time.sleep(float(flag("batch_delay")))
while True:
    kind, arg = control_message()
    if kind == "E":
        break
is_listener = False
if listener is not None:
    s = socket.socket(fileno=os.dup(listener))
    is_listener = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    s.close()
gen, crashes = (int(x) for x in arg.split())
report("attached", generation=gen, crashes=crashes, conns=sorted(conns),
       stored=sorted(stored), listener=is_listener)
if "-ready-fd" in sys.argv:
    ready = int(sys.argv[sys.argv.index("-ready-fd") + 1])
    try:
        os.write(ready, b"ready\n")
        os.close(ready)
    except OSError:
        pass  # a re-exec'd image: closed already
if flag("crash_after_attach"):
    os.kill(os.getpid(), signal.SIGKILL)

sel = selectors.DefaultSelector()
sel.register(ctl, selectors.EVENT_READ, None)
watched = set()
lingering = []


def command(cid, s, line):
    word, _, rest = line.partition(" ")
    if word == "ping":
        return f"pong {os.getpid()} {cid}"
    if word == "echo":
        return rest
    if word == "store":  # the fd sent with this line
        fd = passed[cid].pop(0)
        socket.send_fds(ctl, [f"K {rest}".encode()], [fd])
        if rest in stored:
            os.close(stored[rest])
        stored[rest] = fd
        return "stored"
    if word == "write":
        name, _, text = rest.partition(" ")
        os.write(stored[name], text.encode() + b"\n")
        return "written"
    if word == "drop":
        ctl.send(f"D {rest}".encode())
        os.close(stored.pop(rest))
        return "dropped"
    if word == "names":
        return " ".join(sorted(stored))
    if word == "spawn":
        import subprocess

        child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        report("spawned", child=child.pid)
        return f"spawned {child.pid}"
    if word == "exit":
        s.setblocking(True)
        s.sendall(b"bye\n")
        os._exit(int(rest))
    if word == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if word == "shutdown":  # how the real daemon lets a connection go
        s.shutdown(socket.SHUT_RDWR)
        return None
    return f"unknown {word}"


def serve(cid):
    s = conns[cid]
    try:
        data, fds, _, _ = socket.recv_fds(s, 65536, 4)
    except BlockingIOError:
        return
    except OSError:
        data, fds = b"", []
    passed[cid] += fds
    if not data:
        report("eof", id=cid)
        sel.unregister(s)
        watched.discard(cid)
        if flag("keep_on_eof"):  # a daemon slow to let go
            lingering.append(s)
        else:
            s.close()
        del conns[cid]
        return
    bufs[cid] += data
    while cid in conns and b"\n" in bufs[cid]:
        line, _, bufs[cid] = bufs[cid].partition(b"\n")
        reply = command(cid, s, line.decode())
        if reply is not None:
            s.setblocking(True)
            s.sendall(reply.encode() + b"\n")
            s.setblocking(False)


while True:
    for cid in set(conns) - watched:
        sel.register(conns[cid], selectors.EVENT_READ, cid)
        watched.add(cid)
    for key, _ in sel.select():
        if key.data is None:
            try:
                got = control_message()
            except OSError:
                got = None
            if got is None:
                report("keeper gone")
                sel.unregister(ctl)
            elif got[0] == "C":
                report("conn", id=int(got[1]))
        elif key.data in conns:
            serve(key.data)
"""


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^PPid:\s+(\d+)", f.read(), re.M).group(1))  # type: ignore[union-attr]


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_if(pid: int, marker: str) -> None:
    """SIGKILL pid if it still runs a command line containing marker."""
    try:
        if marker in " ".join(cmdline(pid)):
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


class Client:
    """One connection to the keeper's socket, speaking the fake daemon's line protocol."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:  # the backlog is full (a unix socket does not wait)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.buf = b""

    def send(self, line: str, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [line.encode() + b"\n"], fds)
        else:
            self.sock.sendall(line.encode() + b"\n")

    def line(self) -> str:
        while b"\n" not in self.buf:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def ask(self, line: str, fds: list[int] | None = None) -> str:
        self.send(line, fds)
        return self.line()

    def pong(self) -> tuple[int, int]:
        """(daemon pid, connection id) of whoever serves this connection."""
        word, pid, cid = self.ask("ping").split()
        assert word == "pong"
        return int(pid), int(cid)

    def eof(self, timeout: float = TIMEOUT) -> bool:
        """True once the connection reads end of file (bytes before it are skipped)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(4096):
                pass
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


class Keeper:
    """One keeper with the fake daemon under it, in a short directory of its own."""

    def __init__(self, directory: Path, fake: Path) -> None:
        self.dir = directory
        self.fake = fake
        self.sock = str(directory / "k.sock")
        self.log = directory / "keeper.log"
        self.pidfile = directory / "keeper.pid"
        self.report = directory / "report.jsonl"
        self.flags = directory / "flags"
        self.flags.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_r = -1
        self.ready_w = -1  # its number in the keeper and the first daemon
        self.clients: list[Client] = []

    def flag(self, name: str, value: str = "1") -> None:
        (self.flags / name).write_text(value)

    def unflag(self, name: str) -> None:
        (self.flags / name).unlink()

    def argv(self, ready_w: int) -> list[str]:
        return [
            str(KEEPER), "-socket", self.sock, "-log", str(self.log), "-pidfile", str(self.pidfile),
            "--", sys.executable, str(self.fake), "-address", "/x y", "-ready-fd", str(ready_w),
            "keeper",
        ]  # fmt: skip

    def start(self, wait_ready: bool = True, cwd: str | None = None) -> Keeper:
        r, w = os.pipe()
        env = dict(os.environ, FAKE_REPORT=str(self.report), FAKE_FLAGS=str(self.flags))
        env.pop("EMBEDSHIM_KEEPER_FD", None)
        with (self.dir / "stderr").open("wb") as stderr:  # the keeper's and the daemons'
            self.proc = subprocess.Popen(
                self.argv(w),
                pass_fds=(w,),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                cwd=cwd,
            )
        os.close(w)
        self.ready_r, self.ready_w = r, w
        if wait_ready:
            assert self.read_ready(until_eof=False) == b"ready\n"
        return self

    def read_ready(self, until_eof: bool = True, timeout: float = TIMEOUT) -> bytes:
        """What the ready pipe reads: until EOF (the keeper and every daemon let go of it),
        or until a line."""
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"ready pipe still open after {timeout}s; read {data!r}"
            if select.select([self.ready_r], [], [], left)[0]:
                chunk = os.read(self.ready_r, 64)
                if not chunk:
                    return data
                data += chunk
                if not until_eof and data.endswith(b"\n"):
                    return data

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self, ev: str | None = None, pid: int | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.report.read_text().splitlines()
        except FileNotFoundError:
            return []
        found = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in found if (ev is None or e["ev"] == ev) and pid in (None, e["pid"])]

    def wait_event(self, ev: str, timeout: float = TIMEOUT, **match: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for e in self.events(ev):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        return wait_for(find, timeout, f"{ev} {match}")  # type: ignore[no-any-return]

    def daemons(self) -> list[int]:
        return [e["pid"] for e in self.events("start")]

    def log_lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_log(self, text: str, timeout: float = TIMEOUT) -> str:
        return wait_for(  # type: ignore[no-any-return]
            lambda: next((line for line in self.log_lines() if text in line), None),
            timeout,
            f"{text!r} in the keeper's log",
        )

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def connect(self) -> Client:
        client = Client(self.sock)
        self.clients.append(client)
        return client

    def cleanup(self) -> None:
        """Kill everything this keeper started (pids are checked: they may be reused)."""
        for client in self.clients:
            client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        for e in self.events():
            kill_if(e["pid"], str(self.fake))
            if e["ev"] == "spawned":
                kill_if(e["child"], "sleep")
        if self.ready_r >= 0:
            os.close(self.ready_r)


@pytest.fixture(scope="session")
def keeper_binary() -> Path:
    # Not a skip: without the binary, issue 11's promise is simply not kept.
    build = subprocess.run(
        ["make", "-C", str(ROOT / "keeper")], capture_output=True, text=True, timeout=120
    )
    if build.returncode != 0 or not KEEPER.exists():
        pytest.fail(f"cannot build the keeper:\n{build.stdout}{build.stderr}")
    return KEEPER


@pytest.fixture
def keeper(keeper_binary: Path) -> Iterator[Keeper]:
    # A short directory: sun_path holds 108 bytes, pytest's tmp_path may be longer.
    directory = Path(tempfile.mkdtemp(prefix="keeper", dir="/tmp"))
    fake = directory / "fake_daemon.py"
    fake.write_text(FAKE_DAEMON)
    k = Keeper(directory, fake)
    try:
        yield k
    finally:
        k.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


LOG_LINE = re.compile(
    r'^time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(info|warning|error) msg=("[^"]*"|\S+)'
    r" component=keeper pid=\d+( [a-z_]+=(\S+|\"([^\"\\]|\\.)*\"))*$"
)


def test_serves_clients_through_the_daemon(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    daemon, cid = client.pong()
    assert cid == 1
    assert client.ask("echo hello there") == "hello there"
    assert keeper.connect().pong() == (daemon, 2)
    # ps: the keeper's command line ends in "keeper", the daemon's in "daemon"
    assert cmdline(keeper.pid)[-1] == "keeper"
    assert cmdline(daemon)[-1] == "daemon"
    argv = keeper.argv(keeper.ready_w)
    assert cmdline(keeper.pid) == argv
    assert cmdline(daemon) == argv[argv.index("--") + 1 : -1] + ["daemon"]
    assert ppid_of(daemon) == keeper.pid
    assert stat.S_IMODE(os.stat(keeper.sock).st_mode) == 0o600
    assert keeper.pidfile.read_text() == f"{keeper.pid}\n"
    (attached,) = keeper.events("attached")
    assert attached["generation"] == 1 and attached["crashes"] == 0
    assert attached["listener"] is True
    (start,) = keeper.events("start")
    assert "-ready-fd" in start["argv"]  # the first daemon gets it...
    # ...and once it has written to it and closed it, nobody holds it: the keeper closed its own
    assert keeper.read_ready() == b""
    started = keeper.wait_log('msg="keeper started"')
    assert f"socket={keeper.sock}" in started and f"daemon_pid={daemon}" in started
    assert all(LOG_LINE.match(line) for line in keeper.log_lines()), keeper.log_lines()
    # idle, it sleeps
    cpu = cpu_seconds(keeper.pid)
    time.sleep(0.5)
    assert cpu_seconds(keeper.pid) - cpu < 0.05


def test_relative_paths_and_working_directory(keeper: Keeper) -> None:
    # containerd runs `start` in a bundle directory: the keeper must not hold on to it
    keeper.sock = "k.sock"
    keeper.start(cwd=str(keeper.dir))
    assert os.readlink(f"/proc/{keeper.pid}/cwd") == "/"
    keeper.sock = str(keeper.dir / "k.sock")
    client = keeper.connect()
    client.pong()
    client.send("exit 0")
    assert keeper.exit_code() == 0
    assert not os.path.exists(keeper.sock)


def test_kill_9_of_the_daemon_keeps_the_connection(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    first, cid = client.pong()
    keeper.flag("attach_delay", "0.5")  # the next daemon attaches late: a window with none
    cpu = cpu_seconds(keeper.pid)
    killed = time.monotonic()
    kill(first)
    wait_for(lambda: not exists(first), what="the dead daemon reaped")
    client.send("ping")  # while no daemon is attached: waits in the socket
    assert [e["pid"] for e in keeper.events("attached")] == [first]
    restarted = keeper.wait_log('msg="daemon restarted"', timeout=1.0)
    assert time.monotonic() - killed < 1.0
    second = int(re.search(r"daemon_pid=(\d+)", restarted).group(1))  # type: ignore[union-attr]
    assert second != first and alive(second)
    # the same connection, same id, and the bytes sent meanwhile reach the new daemon
    assert client.line() == f"pong {second} {cid}"
    # it did not spin while the connection had bytes and no daemon read them
    assert cpu_seconds(keeper.pid) - cpu < 0.1
    attached = keeper.wait_event("attached", pid=second)
    assert (attached["generation"], attached["crashes"]) == (2, 1)
    assert attached["conns"] == [cid]
    assert cmdline(second)[-1] == "daemon"
    assert "-ready-fd" not in keeper.wait_event("start", pid=second)["argv"]
    died = keeper.wait_log('msg="daemon died"')
    assert re.match(
        rf'time=\S+ level=error msg="daemon died" component=keeper pid={keeper.pid} '
        rf"daemon_pid={first} signal=9 crashes=1$",
        died,
    ), died
    assert all(LOG_LINE.match(line) for line in keeper.log_lines()), keeper.log_lines()
    # and it keeps working: a new connection, the old one, the next crash
    assert keeper.connect().pong() == (second, cid + 1)
    keeper.unflag("attach_delay")
    kill(second)
    third = keeper.wait_event("attached", generation=3)
    assert third["crashes"] == 2 and third["conns"] == [cid, cid + 1]
    assert client.pong() == (third["pid"], cid)


def test_stored_fds_reach_the_next_daemon(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    first, _ = client.pong()
    pipes = {name: os.pipe() for name in ("one", "two")}
    for name, (_, w) in pipes.items():
        assert client.ask(f"store {name}", [w]) == "stored"
        os.close(w)
    kill(first)
    second = keeper.wait_event("attached", generation=2)
    assert second["stored"] == ["one", "two"]
    assert client.ask("write one hello") == "written"
    assert os.read(pipes["one"][0], 100) == b"hello\n"
    # D: the keeper lets go of it too, so with the daemon's copy closed the pipe is at EOF
    assert client.ask("drop two") == "dropped"
    r2 = pipes["two"][0]
    assert select.select([r2], [], [], TIMEOUT)[0] and os.read(r2, 100) == b""
    # K of a name again: the keeper closes what it held under that name
    r3, w3 = os.pipe()
    assert client.ask("store one", [w3]) == "stored"
    os.close(w3)
    r1 = pipes["one"][0]
    assert select.select([r1], [], [], TIMEOUT)[0] and os.read(r1, 100) == b""
    kill(second["pid"])
    third = keeper.wait_event("attached", generation=3)
    assert third["stored"] == ["one"]
    assert client.ask("write one again") == "written"
    assert os.read(r3, 100) == b"again\n"
    for fd in (r1, r2, r3):
        os.close(fd)


def test_orphans_are_reaped_and_reported(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    first, _ = client.pong()
    word, child_str = client.ask("spawn").split()
    child = int(child_str)
    assert word == "spawned" and ppid_of(child) == first
    kill(first)
    second = keeper.wait_event("attached", generation=2)["pid"]
    # the daemon's child outlived it and is the keeper's now (subreaper)
    assert alive(child) and ppid_of(child) == keeper.pid
    kill(child, signal.SIGTERM)
    z = keeper.wait_event("Z", zpid=child)
    assert z["pid"] == second and z["status"] == signal.SIGTERM  # a raw wait status
    wait_for(lambda: not exists(child), what="no zombie left")


def test_daemon_exit_0_stops_the_keeper(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    other = keeper.connect()
    other.pong()
    assert client.ask("exit 0") == "bye"
    assert keeper.exit_code() == 0
    assert not os.path.exists(keeper.sock)
    assert not keeper.pidfile.exists()
    assert client.eof() and other.eof()
    keeper.wait_log('msg="daemon exited"')
    assert len(keeper.daemons()) == 1


def test_exit_0_leaves_a_newer_keepers_socket_alone(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    client.pong()
    # a newer keeper took the paths over (the caller holds a lock; ours is stale)
    os.unlink(keeper.sock)
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(keeper.sock)
    keeper.pidfile.write_text("1\n")
    try:
        client.send("exit 0")
        assert keeper.exit_code() == 0
        assert os.path.exists(keeper.sock)
        assert keeper.pidfile.read_text() == "1\n"
    finally:
        newer.close()


def test_exit_1_is_a_crash(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    first, cid = client.pong()
    client.send("exit 3")
    assert client.line() == "bye"
    attached = keeper.wait_event("attached", generation=2)
    assert attached["crashes"] == 1 and attached["pid"] != first
    assert client.pong() == (attached["pid"], cid)
    assert "exit_code=3 crashes=1" in keeper.wait_log('msg="daemon died"')


def test_crash_loop_gives_up(keeper: Keeper) -> None:
    keeper.flag("crash_after_attach")
    began = time.monotonic()
    keeper.start()
    client = keeper.connect()
    assert keeper.exit_code(timeout=20) == 1
    took = time.monotonic() - began
    starts = [e["t"] for e in keeper.events("start")]
    assert len(starts) == 5
    # restarted at once, then after 100, 200, 400 ms
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[1] >= 0.1 and gaps[2] >= 0.2 and gaps[3] >= 0.4, gaps
    assert took < 10, took
    gens = [(e["generation"], e["crashes"]) for e in keeper.events("attached")]
    assert gens == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    line = keeper.wait_log("crash loop")
    assert 'msg="daemon crash loop; giving up"' in line and "crashes=5" in line
    assert client.eof()
    assert not os.path.exists(keeper.sock)


def test_four_crashes_are_not_a_loop(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    for generation in range(2, 6):
        kill(client.pong()[0])
        keeper.wait_event("attached", generation=generation)
    assert keeper.proc is not None and keeper.proc.poll() is None
    assert client.pong() == (keeper.events("attached")[-1]["pid"], 1)
    assert not [line for line in keeper.log_lines() if "crash loop" in line]


def test_daemon_dying_before_it_attaches_fails_fast(keeper: Keeper) -> None:
    keeper.flag("exit_before_attach", "1")
    began = time.monotonic()
    keeper.start(wait_ready=False)
    assert keeper.exit_code(timeout=5) == 1
    assert time.monotonic() - began < 5
    assert keeper.read_ready() == b""  # EOF, never "ready": `start` learns at once
    assert len(keeper.daemons()) == 1
    keeper.wait_log('msg="daemon failed to start"')
    assert not os.path.exists(keeper.sock)
    assert not keeper.pidfile.exists()


def test_kill_9_of_the_keeper_leaves_the_daemon_serving(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    daemon, cid = client.pong()
    kill(keeper.pid)
    assert keeper.exit_code() == -signal.SIGKILL
    keeper.wait_event("keeper gone", pid=daemon)
    assert alive(daemon)
    assert client.pong() == (daemon, cid)
    assert client.ask("echo still here") == "still here"


def test_sigterm_reaches_the_daemon(keeper: Keeper) -> None:
    keeper.start()
    client = keeper.connect()
    daemon, _ = client.pong()
    kill(keeper.pid, signal.SIGTERM)
    keeper.wait_event("signal", pid=daemon, sig="TERM")
    assert keeper.exit_code() == 0
    assert client.eof()
    assert not os.path.exists(keeper.sock)
    assert len(keeper.daemons()) == 1  # not restarted


def test_death_by_the_forwarded_sigterm_is_not_a_crash(keeper: Keeper) -> None:
    keeper.flag("default_term")  # no handler: SIGTERM kills it
    keeper.start()
    client = keeper.connect()
    client.pong()
    kill(keeper.pid, signal.SIGTERM)
    assert keeper.exit_code() == 0
    assert client.eof()
    assert len(keeper.daemons()) == 1
    assert "signal=15" in keeper.wait_log('msg="daemon stopped"')


def test_sigterm_while_waiting_to_restart_stops_the_keeper(keeper: Keeper) -> None:
    keeper.flag("crash_after_attach")
    keeper.start()
    client = keeper.connect()
    # after the 4th crash the keeper waits 400 ms before the next start: no daemon runs
    keeper.wait_log("crashes=4", timeout=TIMEOUT)
    kill(keeper.pid, signal.SIGTERM)
    assert keeper.exit_code() == 0
    assert len(keeper.daemons()) == 4
    assert 'reason="stopped while no daemon ran"' in keeper.wait_log('msg="keeper exiting"')
    assert client.eof()
    assert not os.path.exists(keeper.sock)


def test_a_failed_stop_after_sigterm_is_still_a_crash(keeper: Keeper) -> None:
    keeper.flag("term_exit_code", "2")
    keeper.start()
    client = keeper.connect()
    daemon, cid = client.pong()
    kill(keeper.pid, signal.SIGTERM)
    keeper.wait_event("signal", pid=daemon, sig="TERM")
    attached = keeper.wait_event("attached", generation=2)
    assert client.pong() == (attached["pid"], cid)


def test_sighup_reaches_the_daemon_which_reattaches(keeper: Keeper) -> None:
    keeper.flag("reexec_on_hup")
    keeper.start()
    client = keeper.connect()
    daemon, cid = client.pong()
    kill(keeper.pid, signal.SIGHUP)
    keeper.wait_event("signal", pid=daemon, sig="HUP")
    # the re-executed daemon (same pid, same control fd) attaches again and gets everything
    again = wait_for(lambda: len(keeper.events("attached")) == 2 and keeper.events("attached")[1])
    assert again["pid"] == daemon
    assert (again["generation"], again["crashes"]) == (1, 0)
    assert again["conns"] == [cid]
    assert client.pong() == (daemon, cid)
    assert keeper.connect().pong() == (daemon, cid + 1)  # new ones still reach it
    assert keeper.proc is not None and keeper.proc.poll() is None


def test_closed_connections_are_let_go(keeper: Keeper) -> None:
    keeper.flag("keep_on_eof")  # the daemon holds its copies: the keeper must stop watching
    keeper.start()
    base = fd_count(keeper.pid)
    clients = [keeper.connect() for _ in range(3)]
    for c in clients:
        c.pong()
    assert fd_count(keeper.pid) == base + 3
    clients[0].close()
    clients[1].close()
    wait_for(lambda: fd_count(keeper.pid) == base + 1, what="the keeper's duplicates closed")
    # the daemon lets one go with shutdown(): the keeper closes its duplicate, the peer sees EOF
    clients[2].send("shutdown")
    assert clients[2].eof()
    wait_for(lambda: fd_count(keeper.pid) == base, what="the keeper's duplicate closed")
    cpu = cpu_seconds(keeper.pid)
    time.sleep(0.5)
    assert cpu_seconds(keeper.pid) - cpu < 0.05  # no events left for what it closed
    # ... and the next daemon is not handed them
    kill(keeper.events("attached")[0]["pid"])
    assert keeper.wait_event("attached", generation=2)["conns"] == []


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, Pss) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]
    with open(f"/proc/{pid}/smaps_rollup") as f:
        pss = int(re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]
    return rss, pss


def test_memory_with_200_connections(keeper: Keeper) -> None:
    keeper.start()
    clients = [keeper.connect() for _ in range(200)]
    for c in clients:
        c.pong()
    rss, pss = _memory(keeper.pid)
    print(f"keeper with 200 connections: VmRSS {rss} KiB, PSS {pss} KiB")
    assert rss < 2048, rss


def test_a_large_handover_while_the_daemon_is_slow(keeper: Keeper) -> None:
    # Far more messages than the control socket holds: the keeper must queue what does not
    # fit, keep serving, and deliver all of it in order.
    keeper.start()
    clients = [keeper.connect() for _ in range(1500)]
    ids = [c.pong()[1] for c in clients[::100]]
    base = fd_count(keeper.pid)
    keeper.flag("batch_delay", "1.5")
    cpu = cpu_seconds(keeper.pid)
    kill(keeper.events("attached")[0]["pid"])
    wait_for(lambda: len(keeper.daemons()) == 2, what="a second daemon")
    late = keeper.connect()  # arrives while the answer is still queued
    # the keeper is not stuck in a send while the daemon does not read
    time.sleep(0.5)
    with open(f"/proc/{keeper.pid}/wchan") as f:
        assert f.read() in ("do_epoll_wait", "ep_poll")
    attached = keeper.wait_event("attached", generation=2, timeout=20)
    assert cpu_seconds(keeper.pid) - cpu < 0.3  # waited for room, did not spin
    assert attached["conns"] in (list(range(1, 1501)), list(range(1, 1502)))
    assert late.pong()[1] == 1501
    assert [c.pong()[1] for c in clients[::100]] == ids
    # the queued duplicates are gone once delivered
    wait_for(lambda: fd_count(keeper.pid) <= base + 2, what="queued duplicates closed")
    rss, pss = _memory(keeper.pid)
    print(f"keeper with 1501 connections: VmRSS {rss} KiB, PSS {pss} KiB")


@pytest.mark.parametrize(
    "args",
    [
        ["-bogus", "x", "--", "/bin/true", "keeper"],
        ["-socket"],
        ["-socket", "S", "-log", "L", "--", "/bin/true", "keeper"],  # no -pidfile
        ["-socket", "S", "-log", "L", "-pidfile", "P", "--", "/bin/true", "daemon"],
        ["-socket", "S", "-log", "L", "-pidfile", "P", "--", "true", "keeper"],
        ["-socket", "S", "-log", "L", "-pidfile", "P", "--", "/bin/true", "-ready-fd", "keeper"],
        ["-socket", "S", "-log", "L", "-pidfile", "P", "/bin/true", "keeper"],  # no --
    ],
)
def test_usage_errors(keeper_binary: Path, tmp_path: Path, args: list[str]) -> None:
    paths = {"S": tmp_path / "s", "L": tmp_path / "l", "P": tmp_path / "p"}
    argv = [str(paths.get(a, a)) for a in args]
    result = subprocess.run([str(keeper_binary), *argv], capture_output=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert b"usage:" in result.stderr
    assert not any(p.exists() for p in paths.values())
