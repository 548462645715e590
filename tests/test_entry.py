"""The C entry point (entry/entry.c), installed as ``containerd-shim-embed-v1``.

It answers the usual ``start`` and ``delete`` itself and must then say exactly what
shim/cmd/start.py and shim/cmd/delete.py say; for everything else it must run the Python entry point
beside it with the same arguments.  Each test compiles it into a private prefix
(``<prefix>/bin``) with, in ``<prefix>/libexec/embedshim``, either a stand-in that records
how it was run, or the real script from ``shim.cmd.launcher``; a fake daemon answers on the
socket ``shim.util.paths`` names for the address, so the fast path is only taken when the C
program found the same directory (its sha256 and its reading of ``$EMBEDSHIM_ROOT``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.cmd import delete, flags, launcher, start
from shim.ttrpc import Code
from shim.ttrpc.codec import (
    Frame,
    FrameDecoder,
    MessageType,
    Request,
    Response,
    Status,
    encode_frame,
)
from shim.util import wire
from shim.util.paths import DaemonPaths

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "entry"
ADDRESS = "/run/containerd-test/containerd.sock"
STAND_IN = """#!/bin/sh
: > "$0.argv"
for a in "$@"; do printf '%s\\n' "$a" >> "$0.argv"; done
printf '%s' "${EMBEDSHIM_DAEMON_SILENT-unset}" > "$0.silent"
echo python
exit 7
"""

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="missing prerequisite: gcc")


def _compile(out: Path, *sources: str) -> None:
    argv = ["gcc", "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE"]
    subprocess.run(
        [*argv, "-o", str(out), *(str(ENTRY / s) for s in sources)], check=True, timeout=120
    )


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("entry") / "embedshim-entry"
    _compile(out, "entry.c", "sha256.c")
    return out


class Prefix:
    """``<root>/bin/containerd-shim-embed-v1`` (the C program) and the Python side."""

    def __init__(self, root: Path, program: Path) -> None:
        self.root = root
        self.bin = root / "bin" / launcher.NAME
        self.python = Path(launcher.python_entry(str(self.bin)))
        self.bin.parent.mkdir(parents=True)
        self.python.parent.mkdir(parents=True)
        shutil.copy(program, self.bin)
        self.state = root / "state"
        self.state.mkdir()
        self.bundle = root / "bundle"
        self.bundle.mkdir()
        self.paths = DaemonPaths.for_containerd(ADDRESS, root=str(self.state))
        self.stand_in()

    def stand_in(self) -> None:
        self.python.write_text(STAND_IN)
        self.python.chmod(0o755)

    def real_python(self) -> None:
        text = launcher.render(sys.executable, str(REPO))
        assert text is not None
        self.python.write_text(text)
        self.python.chmod(0o755)

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        environ = {"PATH": os.environ["PATH"], "EMBEDSHIM_ROOT": str(self.state), **(env or {})}
        return subprocess.run(
            [str(self.bin), *args],
            capture_output=True,
            cwd=self.bundle,
            env=environ,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )

    def ran_python(self) -> tuple[list[str], str] | None:
        """(argv, EMBEDSHIM_DAEMON_SILENT) the stand-in was run with, or None."""
        argv = Path(f"{self.python}.argv")
        if not argv.exists():
            return None
        silent = Path(f"{self.python}.silent").read_text()
        result = argv.read_text().splitlines(), silent
        argv.unlink()
        return result


@pytest.fixture
def prefix(tmp_path: Path, program: Path) -> Prefix:
    return Prefix(tmp_path, program)


Handler = Callable[[Request], "Response | None"]


class FakeDaemon:
    """A ttrpc server on the daemon's socket: ``handler`` answers each request (None: close
    the connection without answering)."""

    def __init__(self, paths: DaemonPaths, handler: Handler) -> None:
        paths.ensure()
        self.handler = handler
        self.requests: list[Request] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(paths.socket)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                decoder = FrameDecoder()
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    frames = [e for e in decoder.feed(data) if isinstance(e, Frame)]
                    for frame in frames:
                        request = Request.decode(frame.payload)
                        self.requests.append(request)
                        answer = self.handler(request)
                        if answer is None:
                            break
                        # a frame for another stream first: the client must skip it
                        conn.sendall(encode_frame(9, MessageType.RESPONSE, Response().encode()))
                        conn.sendall(
                            encode_frame(frame.stream_id, MessageType.RESPONSE, answer.encode())
                        )
                    else:
                        continue
                    break

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def daemon(prefix: Prefix) -> Iterator[Callable[[Handler], FakeDaemon]]:
    started: list[FakeDaemon] = []

    def make(handler: Handler) -> FakeDaemon:
        started.append(FakeDaemon(prefix.paths, handler))
        return started[-1]

    yield make
    for d in started:
        d.close()


def ok(payload: bytes) -> Handler:
    return lambda request: Response(payload=payload)


def status(code: int, message: str = "") -> Handler:
    return lambda request: Response(Status(code, message))


FLAGS = ["-namespace", "k8s.io", "-address", ADDRESS, "-publish-binary", "/usr/bin/containerd"]
START = [*FLAGS, "-id", "c1", "start"]
DELETE = [*FLAGS, "-id", "c1", "delete"]


# -- sha256 ------------------------------------------------------------------------------------


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    """Every length across the one- and two-block padding cases, and the FIPS 180-4 vectors."""
    tester = tmp_path / "sha256_test"
    _compile(tester, "sha256.c", "sha256_test.c")
    inputs = [bytes((i * 7 + n) & 0xFF for i in range(n)) for n in range(0, 300)]
    inputs += [b"abc", b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", b"a" * 10000]
    r = subprocess.run(
        [str(tester)],
        input="".join(d.hex() + "\n" for d in inputs),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert r.stdout.splitlines() == [hashlib.sha256(d).hexdigest() for d in inputs]
    assert r.stdout.splitlines()[300] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


# -- start -------------------------------------------------------------------------------------


def test_start_with_a_daemon_reserves_and_prints_like_python(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon]
) -> None:
    fake = daemon(ok(b"4242"))
    r = prefix.run(*START)
    assert prefix.ran_python() is None, r
    assert (r.returncode, r.stdout, r.stderr) == (0, prefix.paths.address.encode(), b"")
    (request,) = fake.requests
    assert (request.service, request.method, request.payload) == (
        "embedshim.v1.Daemon",
        "Reserve",
        b"k8s.io\0c1",
    )
    assert request.timeout_nano == 0 and request.metadata == ()
    address = prefix.bundle / "address"
    assert address.read_text() == prefix.paths.address
    assert os.stat(address).st_mode & 0o777 == 0o644
    assert os.listdir(prefix.bundle) == ["address"]  # no temporary file left
    assert os.stat(prefix.paths.lock).st_mode & 0o777 == 0o600
    assert os.stat(prefix.paths.dir).st_mode & 0o777 == 0o700
    # Python, on the same daemon: the same request, output and file
    address.unlink()
    prefix.real_python()
    python = subprocess.run(
        [str(prefix.python), *START],
        capture_output=True,
        cwd=prefix.bundle,
        env={"EMBEDSHIM_ROOT": str(prefix.state)},
        timeout=60,
    )
    assert (python.returncode, python.stdout, python.stderr) == (r.returncode, r.stdout, r.stderr)
    assert fake.requests[1] == request
    assert address.read_text() == prefix.paths.address


@pytest.mark.parametrize(
    "args",
    [
        ["-debug", *START],
        ["--namespace=k8s.io", "-address", ADDRESS, "-id=c1", "--", "start"],
        ["-namespace", "k8s.io", "-address", ADDRESS, "-id", "c1", "-bundle", "BUNDLE", "start"],
        [*START, "ignored"],
    ],
)
def test_start_flag_spellings(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon], args: list[str]
) -> None:
    daemon(ok(b"1"))
    args = [str(prefix.bundle) if a == "BUNDLE" else a for a in args]
    r = prefix.run(*args)
    assert prefix.ran_python() is None
    assert (r.returncode, r.stdout) == (0, prefix.paths.address.encode())
    assert (prefix.bundle / "address").read_text() == prefix.paths.address


@pytest.mark.parametrize(
    "args",
    [
        ["-v"],
        ["-info"],
        ["-namespace", "k8s.io", "-address", ADDRESS, "-id", "c1", "-v", "start"],
        ["-debug=true", *START],
        ["-unknown", *START],
        [*FLAGS, "-id", "c1", "daemon"],
        [*FLAGS, "-id", "c1", "check"],
        [*FLAGS, "-id", "c1", "reload"],
        [*FLAGS, "-id", "c1"],
        [*FLAGS, "-id", "c1", "-bundle"],
        [*FLAGS, "-id", "bad..id", "start"],
        [*FLAGS, "-id", "", "delete"],
        ["-namespace", "", "-address", ADDRESS, "-id", "c1", "start"],
        ["-namespace", "k8s.io", "-id", "c1", "start"],
        ["-namespace", "k8s.io", "-address", "/r\u00e9/c.sock", "-id", "c1", "start"],
        [],
    ],
)
def test_everything_else_goes_to_python_unchanged(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon], args: list[str]
) -> None:
    fake = daemon(ok(b"1"))
    r = prefix.run(*args)
    assert (r.returncode, r.stdout) == (7, b"python\n")
    assert prefix.ran_python() == (args, "unset")
    assert fake.requests == []


@pytest.mark.parametrize("root", ["relative/root", "/a//b", "/a/./b", "/a/b/"])
def test_a_root_python_would_normalise_goes_to_python(prefix: Prefix, root: str) -> None:
    r = prefix.run(*START, env={"EMBEDSHIM_ROOT": root})
    assert r.returncode == 7 and prefix.ran_python() == (START, "unset")


def test_start_without_a_daemon_goes_to_python_which_gets_the_lock(prefix: Prefix) -> None:
    r = prefix.run(*START)
    assert r.returncode == 7 and prefix.ran_python() == (START, "unset")
    assert not (prefix.bundle / "address").exists()
    # the C program's lock is gone with it (close-on-exec): Python can take it at once
    import fcntl

    fd = os.open(prefix.paths.lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("handler", "silent"),
    [(status(Code.UNAVAILABLE, "busy"), "1"), (lambda request: None, "1"), (ok(b"x1"), "unset")],
    ids=["error", "closed", "not-a-pid"],
)
def test_start_with_a_daemon_that_does_not_answer_properly(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon], handler: Handler, silent: str
) -> None:
    """No answer: Python is told not to ask again, so a hung daemon costs one timeout.  An
    answer Python could not read: it asks again itself, and fails as it always did."""
    daemon(handler)
    r = prefix.run(*START)
    assert r.returncode == 7 and prefix.ran_python() == (START, silent)
    assert not (prefix.bundle / "address").exists()


def test_start_that_cannot_write_the_address_lets_python_report_it(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon]
) -> None:
    daemon(ok(b"1"))
    args = [*FLAGS, "-id", "c1", "-bundle", str(prefix.root / "missing"), "start"]
    r = prefix.run(*args)
    assert r.returncode == 7 and prefix.ran_python() == (args, "unset")


# -- delete ------------------------------------------------------------------------------------


def _exited_at(out: bytes) -> int:
    fields = wire.read_fields(out)
    assert set(fields) == {3}, fields
    ts = fields[3][0]
    assert isinstance(ts, bytes)
    t = wire.read_fields(ts)
    seconds, nanos = t.get(1, [0])[0], t.get(2, [0])[0]
    assert isinstance(seconds, int) and isinstance(nanos, int)
    return seconds * 1_000_000_000 + nanos


def test_delete_of_a_task_the_daemon_deleted_answers_like_python(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon]
) -> None:
    fake = daemon(status(Code.NOT_FOUND, "task c1 not found"))
    before = time.time_ns()
    r = prefix.run(*DELETE)
    after = time.time_ns()
    assert prefix.ran_python() is None
    assert (r.returncode, r.stderr) == (0, b"")
    assert before <= _exited_at(r.stdout) <= after
    (request,) = fake.requests
    assert (request.method, request.payload) == ("Cleanup", b"k8s.io\0c1")
    prefix.real_python()
    python = subprocess.run(
        [str(prefix.python), *DELETE],
        capture_output=True,
        cwd=prefix.bundle,
        env={"EMBEDSHIM_ROOT": str(prefix.state)},
        timeout=60,
    )
    assert (python.returncode, python.stderr) == (0, b"")
    assert list(wire.read_fields(python.stdout)) == [3]
    assert fake.requests[1] == request


def test_delete_prints_the_daemons_answer(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon]
) -> None:
    answer = wire.delete_response(1234, 137, 1_700_000_000_123_456_789)
    daemon(ok(answer))
    r = prefix.run(*DELETE)
    assert prefix.ran_python() is None and (r.returncode, r.stdout) == (0, answer)


def test_delete_with_leftovers_goes_to_python(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon]
) -> None:
    daemon(status(Code.NOT_FOUND))
    runc_state = Path(prefix.paths.runc_root_for("k8s.io")) / "c1"
    runc_state.mkdir(parents=True)
    r = prefix.run(*DELETE)
    assert r.returncode == 7 and prefix.ran_python() == (DELETE, "unset")
    runc_state.rmdir()
    # a rootfs that is a mount point: a symlink to /proc stands in for one (followed)
    (prefix.bundle / "rootfs").symlink_to("/proc")
    r = prefix.run(*DELETE)
    assert r.returncode == 7 and prefix.ran_python() == (DELETE, "unset")
    # an unmounted rootfs directory is nothing left
    (prefix.bundle / "rootfs").unlink()
    (prefix.bundle / "rootfs").mkdir()
    r = prefix.run(*DELETE)
    assert prefix.ran_python() is None and r.returncode == 0


@pytest.mark.parametrize(
    "handler", [status(Code.INTERNAL, "boom"), lambda request: None], ids=["error", "closed"]
)
def test_delete_with_a_daemon_that_does_not_answer_properly(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon], handler: Handler
) -> None:
    daemon(handler)
    r = prefix.run(*DELETE)
    assert r.returncode == 7 and prefix.ran_python() == (DELETE, "1")


def test_delete_without_a_daemon_goes_to_python(prefix: Prefix) -> None:
    r = prefix.run(*DELETE)
    assert r.returncode == 7 and prefix.ran_python() == (DELETE, "unset")


def test_missing_python_entry_point_is_an_error(prefix: Prefix) -> None:
    prefix.python.unlink()
    r = prefix.run("-v")
    assert r.returncode == 1 and str(prefix.python).encode() in r.stderr


# -- the Python side of the hint ------------------------------------------------------------


def test_python_told_the_daemon_is_silent_does_not_ask_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EMBEDSHIM_ROOT", str(tmp_path))
    parsed, _ = flags.parse(["-namespace", "ns", "-address", ADDRESS, "-id", "c1", "-bundle",
                          str(tmp_path), "delete"])  # fmt: skip
    calls: list[str] = []

    def no_daemon(*args: object) -> bytes:
        calls.append("daemon")
        return b""

    monkeypatch.setattr(delete, "via_daemon", no_daemon)
    monkeypatch.setattr(delete, "offline", lambda *a: calls.append("offline") or b"")
    monkeypatch.setenv(flags.SILENT_ENV, "1")
    monkeypatch.setattr("posix.environ", {**os.environb, flags.SILENT_ENV.encode(): b"1"})
    assert delete.main(parsed) == 0
    assert calls == ["offline"]
    assert flags.SILENT_ENV not in os.environ  # nothing spawned from here inherits it
    calls.clear()
    monkeypatch.setattr(start, "reserve", lambda *a: calls.append("reserve") or 1)
    monkeypatch.setattr(start, "spawn_daemon", lambda *a: calls.append("spawn"))
    monkeypatch.setattr(start, "ttrpc_address", lambda: "")
    monkeypatch.setenv(flags.SILENT_ENV, "1")
    monkeypatch.setattr("posix.environ", {**os.environb, flags.SILENT_ENV.encode(): b"1"})
    parsed.bundle = str(tmp_path)
    assert start.main(parsed) == 0
    assert calls == ["spawn", "reserve"]
    calls.clear()
    assert start.main(parsed) == 0  # without the hint: asked first, nothing spawned
    assert calls == ["reserve"]


def test_launcher_installs_the_program_with_the_script_beside_it(
    tmp_path: Path, program: Path
) -> None:
    from shim.cmd import setupcheck

    bin_path = tmp_path / "bin" / launcher.NAME
    bin_path.parent.mkdir()
    bin_path.write_text("#!/usr/bin/python3\nfrom shim.cmd.cli import main\n")  # pip's script
    ok, text = launcher.install(str(bin_path), python=sys.executable, entry=str(program))
    assert ok and "written" in text, text
    assert bin_path.read_bytes() == program.read_bytes()
    script = Path(launcher.python_entry(str(bin_path)))
    assert script == tmp_path / "libexec" / "embedshim" / launcher.NAME
    assert script.read_text() == launcher.render(sys.executable, launcher.package_dir())
    assert setupcheck.is_ours(str(bin_path))
    link = tmp_path / "link"
    link.symlink_to(bin_path)
    assert setupcheck.is_ours(str(link))
    ok, text = launcher.install(str(bin_path), python=sys.executable, entry=str(program))
    assert ok and "written" not in text
    # through a symlink (/usr/local/bin's), -v runs the script, which runs the package
    r = subprocess.run([str(link), "-v"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and launcher.NAME in r.stdout, r.stderr
    # the daemon is spawned through the script, so it keeps its name in ps
    r = subprocess.run(
        [str(link), "-info"], capture_output=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert r.returncode == 0 and r.stdout.startswith(b"\n\x16io.containerd.embed.v1")


@pytest.mark.parametrize("args", [START, DELETE], ids=["start", "delete"])
def test_a_closed_stdout_is_exit_120_as_in_python(
    prefix: Prefix, daemon: Callable[[Handler], FakeDaemon], args: list[str]
) -> None:
    """Python ignores SIGPIPE and exits 120 when it cannot flush stdout: so does the C path."""
    daemon(status(Code.NOT_FOUND) if "delete" in args else ok(b"1"))
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [str(prefix.bin), *args],
            stdout=w,
            stderr=subprocess.PIPE,
            cwd=prefix.bundle,
            env={"EMBEDSHIM_ROOT": str(prefix.state)},
            timeout=60,
        )
    finally:
        os.close(w)
    assert prefix.ran_python() is None
    assert proc.returncode == 120, proc
