"""``start`` and ``delete`` run once per container (and ``-info`` before a runtime's first
one): what keeps them cheap stays in place.

Their imports (checked in a ``python -S -E`` child, as the launcher runs them), the launcher
that ``make setup`` installs, and the light stand-ins they rely on (``shim.util.fsutil`` for os,
``_intenum`` for enum, ``__slots__`` records for dataclasses) behaving like what they replace.
"""

from __future__ import annotations

import copy
import enum
import os
import pickle
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest

from shim.cmd import launcher, setupcheck
from shim.ttrpc import Code
from shim.ttrpc.codec import Flags, FrameHeader, MessageType, Request, Response, Status
from shim.util import fsutil
from shim.util.paths import DaemonPaths

REPO = str(Path(__file__).resolve().parents[1])

#: Each costs a short-lived process several million instructions (dataclasses, typing and
#: enum tens of millions); none is needed to reserve the daemon or hear NotFound from it.
HEAVY = (
    "dataclasses",
    "typing",
    "asyncio",
    "google.protobuf",
    "enum",
    "re",
    "socket",
    "subprocess",
    "select",
    "signal",
    "ctypes",
    "os",
)


def _run_bare(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in ``python -S -E`` with the checkout on sys.path, as the launcher runs."""
    prelude = f"import sys; sys.path.insert(0, {REPO!r}); "
    return subprocess.run(
        [sys.executable, "-S", "-E", "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_start_and_delete_import_nothing_heavy() -> None:
    code = (
        "import shim.cmd.cli, shim.cmd.start, shim.cmd.delete, shim.cmd.info; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    r = _run_bare(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"imported by start/delete: {r.stdout.strip()}"


def test_start_and_delete_exit_at_once_with_output_flushed() -> None:
    """As the program, they skip the interpreter's finalisation, but not their output."""
    code = (
        "sys.argv = ['shim', 'start']; from shim.cmd.cli import main; main(); "
        "sys.stdout.write('returned')"
    )
    r = _run_bare(code)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "start: -address (containerd's address) is required\n"
    code = (
        "sys.argv = ['shim', 'version']; from shim.cmd.cli import main; main(); print('returned')"
    )
    r = _run_bare(code)
    assert r.returncode == 0 and "Version" in r.stdout and "returned" in r.stdout


def test_info_exits_at_once_with_output_flushed_and_nothing_heavy() -> None:
    """``-info`` as the program: its RuntimeInfo written whole, then out without the
    interpreter's finalisation; and having run (runc included, through posix_spawn) it has
    imported nothing on the HEAVY list."""
    prelude = f"import sys; sys.path.insert(0, {REPO!r}); "
    runs = {
        "program": "sys.argv = ['shim', '-info']; from shim.cmd.cli import main; main(); "
        "sys.stdout.write('returned')",
        "imports": "from shim.cmd.info import main; main(); sys.stdout.flush(); "
        f"sys.stderr.write(repr(sorted(m for m in {HEAVY!r} if m in sys.modules)))",
    }
    out = {}
    for name, code in runs.items():
        r = subprocess.run(
            [sys.executable, "-S", "-E", "-c", prelude + code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(b"\n\x16io.containerd.embed.v1"), r.stdout[:100]
        out[name] = r
    assert b"returned" not in out["program"].stdout and out["program"].stderr == b""
    assert out["imports"].stderr == b"[]", f"imported by -info: {out['imports'].stderr!r}"


def test_other_commands_get_site_packages() -> None:
    """The daemon needs protobuf, which lives in site-packages: cli turns site on for it."""
    assert _run_bare("import google.protobuf").returncode != 0
    r = _run_bare("from shim.cmd import cli; cli.enable_site(); import google.protobuf")
    assert r.returncode == 0, r.stderr


def _pip_script(tmp_path: Path) -> Path:
    path = tmp_path / launcher.NAME
    script = f"#!{sys.executable}\nimport sys\nfrom shim.cmd.cli import main\nsys.exit(main())\n"
    path.write_text(script)
    path.chmod(0o755)
    return path


def test_launcher_replaces_pip_script_once(tmp_path: Path) -> None:
    """Without the C entry point (tests/test_entry.py: with it), the script takes its place."""
    path = _pip_script(tmp_path)
    ok, text = launcher.install(str(path), python=sys.executable, entry="")
    assert ok and "written" in text
    content = path.read_text()
    assert content.startswith(f"#!{sys.executable} -SE\n")
    assert f"sys.path[0] = {REPO!r}\n" in content
    assert os.stat(path).st_mode & 0o777 == 0o755
    # /usr/local/bin's link to it is still recognised as ours by make setup
    assert setupcheck.is_ours(str(path))
    before = os.stat(path).st_mtime_ns
    ok, text = launcher.install(str(path), python=sys.executable, entry="")
    assert ok and "written" not in text and os.stat(path).st_mtime_ns == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".") or ".tmp-" in p]


def test_launcher_runs_the_cli(tmp_path: Path) -> None:
    path = _pip_script(tmp_path)
    assert launcher.install(str(path), python=sys.executable, entry="")[0]
    r = subprocess.run([str(path), "-v"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and launcher.NAME in r.stdout, r.stderr
    # through a symlink, as /usr/local/bin/containerd-shim-embed-v1
    link = tmp_path / "link"
    link.symlink_to(path)
    r = subprocess.run([str(link), "-v"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and launcher.NAME in r.stdout, r.stderr


def test_launcher_leaves_pip_script_for_an_unusable_interpreter(tmp_path: Path) -> None:
    path = _pip_script(tmp_path)
    before = path.read_text()
    assert launcher.render("/opt/my python/bin/python", REPO) is None
    ok, _ = launcher.install(str(path), python="/opt/my python/bin/python")
    assert not ok and path.read_text() == before
    assert not launcher.install(str(tmp_path / "missing"), python=sys.executable)[0]


# -- shim.util.fsutil and shim.util.paths: os.path's behaviour without os --------------------------


@pytest.mark.parametrize(
    ("head", "tail"), [("/a", "b"), ("/a/", "b"), ("", "b"), ("/a", "/b"), ("a", "b/c")]
)
def test_join_is_os_path_join(head: str, tail: str) -> None:
    assert fsutil.join(head, tail) == posixpath.join(head, tail)


def test_exists(tmp_path: Path) -> None:
    assert fsutil.exists(str(tmp_path)) and not fsutil.exists(str(tmp_path / "x"))
    assert not fsutil.exists("bad\0path")


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "address"
    fsutil.write_address(str(tmp_path), "unix:///x.sock")
    assert target.read_text() == "unix:///x.sock"
    assert os.stat(target).st_mode & 0o777 == 0o644
    fsutil.write_atomic(str(target), b"again", mode=0o600)
    assert target.read_bytes() == b"again" and os.stat(target).st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["address"]


def test_is_mountpoint(tmp_path: Path) -> None:
    assert fsutil.is_mountpoint("/proc")
    assert not fsutil.is_mountpoint(str(tmp_path))
    assert not fsutil.is_mountpoint(str(tmp_path / "missing"))
    (tmp_path / "file").write_text("")
    assert not fsutil.is_mountpoint(str(tmp_path / "file"))
    (tmp_path / "proc").symlink_to("/proc")
    assert fsutil.is_mountpoint(str(tmp_path / "proc"))  # followed, as realpath did


def test_paths_follow_os_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDSHIM_ROOT", str(tmp_path))
    monkeypatch.setenv("EMBEDSHIM_BPF_ROOT", "/sys/fs/bpf/x")
    paths = DaemonPaths.for_containerd("/run/c.sock")
    assert os.path.dirname(paths.dir) == str(tmp_path)
    assert paths.bpf_pin_root == "/sys/fs/bpf/x/" + os.path.basename(paths.dir)
    assert paths.socket == os.path.join(paths.dir, "daemon.sock")
    for root in ("/a//b/", "/a/./b", "/a/x/../b", "rel"):
        got = DaemonPaths.for_containerd("/run/c.sock", root=root).dir
        assert os.path.dirname(got) == os.path.abspath(root)


def test_paths_ensure(tmp_path: Path) -> None:
    paths = DaemonPaths(str(tmp_path / "a" / "b"))
    paths.ensure()
    paths.ensure()
    assert os.stat(paths.dir).st_mode & 0o777 == 0o700


# -- the light IntEnum and the records ---------------------------------------------------------


def test_code_behaves_like_an_intenum() -> None:
    real = enum.IntEnum("Code", [(c.name, c.value) for c in Code])
    assert [(c.name, c.value) for c in Code] == [(c.name, c.value) for c in real]
    assert list(Code) == list(range(17)) and len(Code) == 17
    for ours, theirs in zip(Code, real, strict=True):
        assert (repr(ours), str(ours), f"{ours}", f"{ours:>3}") == (
            repr(theirs),
            str(theirs),
            f"{theirs}",
            f"{theirs:>3}",
        )
    assert Code(5) is Code.NOT_FOUND and Code["NOT_FOUND"] is Code.NOT_FOUND
    assert Code.NOT_FOUND == 5 and isinstance(Code.NOT_FOUND, int) and 5 in Code
    with pytest.raises(ValueError, match="17 is not a valid Code"):
        Code(17)
    assert Code.from_wire(17) is Code.UNKNOWN
    assert pickle.loads(pickle.dumps(Code.INTERNAL)) is Code.INTERNAL
    assert copy.deepcopy(Code.OK) is Code.OK
    assert dict(Code.__members__)["OK"] is Code.OK
    assert MessageType(2) is MessageType.RESPONSE and Flags.NO_DATA == 4


def test_records_are_frozen_values() -> None:
    status = Status(Code.NOT_FOUND, "gone", (("t", b"v"),))
    assert status == Status(5, "gone", (("t", b"v"),)) and status != Status(5, "other")
    assert hash(status) == hash(Status(5, "gone", (("t", b"v"),)))
    assert status != ("not", "a", "status")
    assert repr(Response()) == (
        "Response(status=Status(code=<Code.OK: 0>, message='', details=()), payload=b'')"
    )
    with pytest.raises(AttributeError):
        status.code = 1
    with pytest.raises(AttributeError):
        del status.message
    request = Request("s", "m", b"p", 5, (("k", "v"),))
    assert pickle.loads(pickle.dumps(request)) == request
    assert copy.copy(request) == request and copy.deepcopy(request) == request
    assert FrameHeader(1, 2, 3) == FrameHeader(1, 2, 3, 0)
    with pytest.raises((OverflowError, ValueError)):
        FrameHeader(1, 2, 256).encode()
