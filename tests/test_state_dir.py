"""The containerd state directory: learned by ``start`` from the bundle it runs in, handed to
the daemon on its command line, and used by the offline ``delete`` the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shim.cmd import delete, start
from shim.cmd.flags import Flags, parse
from shim.oci import bundle
from shim.util.paths import DaemonPaths


def _bundle(state: Path, ns: str = "k8s.io", id: str = "c1") -> Path:
    path = state / bundle.TASK_DIR / ns / id
    path.mkdir(parents=True)
    return path


def _flags(*argv: str) -> Flags:
    flags, rest = parse([*argv, "start"])
    assert rest == ["start"]
    return flags


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A containerd state directory somewhere other than /run/containerd (as k3s's)."""
    return Path(os.path.realpath(tmp_path)) / "run" / "k3s" / "containerd"


def test_start_learns_the_state_directory_from_its_working_directory(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_bundle(state))
    assert start.containerd_state(_flags("-namespace", "k8s.io", "-id", "c1")) == str(state)
    # Not the bundle of this namespace and id: nothing learned (the daemon falls back).
    assert start.containerd_state(_flags("-namespace", "k8s.io", "-id", "c2")) == ""
    assert start.containerd_state(_flags("-namespace", "other", "-id", "c1")) == ""
    monkeypatch.chdir(state)
    assert start.containerd_state(_flags("-namespace", "k8s.io", "-id", "c1")) == ""


def test_start_takes_the_bundle_flag_first(state: Path, tmp_path: Path) -> None:
    b = _bundle(state, "default", "x")
    flags = _flags("-namespace", "default", "-id", "x", "-bundle", str(b))
    assert start.containerd_state(flags) == str(state)


def test_spawned_daemon_is_told_the_state_directory(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_bundle(state))
    spawned: list[list[str]] = []

    class FakePopen:
        def __init__(self, argv: list[str], **kw: Any) -> None:
            spawned.append(argv)
            (fd,) = kw["pass_fds"]
            os.write(fd, b"ready\n")
            self.returncode: int | None = None

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    flags = _flags("-namespace", "k8s.io", "-id", "c1", "-address", "/run/k3s/c.sock")
    start.spawn_daemon(DaemonPaths(str(tmp_path / "d")), flags, "/run/k3s/c.sock.ttrpc")
    (argv,) = spawned
    assert argv[argv.index("-containerd-state") + 1] == str(state)
    # The keeper's command line ends with the daemon's, "keeper" for its last word.
    assert argv[-1] == "keeper" and argv[0] == start.keeper_binary()
    daemon_argv = argv[argv.index("--") + 1 : -1] + ["daemon"]
    # and the daemon's own parser takes it
    parsed, rest = parse(daemon_argv[1:])
    assert parsed.containerd_state == str(state) and rest == ["daemon"]


def test_daemon_refuses_a_state_directory_that_is_not_clean(tmp_path: Path) -> None:
    env = {**os.environ, "EMBEDSHIM_ROOT": str(tmp_path), "EMBEDSHIM_BPF": "off"}
    r = subprocess.run(
        [sys.executable, "-m", "shim", "-address", "/x.sock", "-containerd-state", "run/x"]
        + ["daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r
    log = (Path(DaemonPaths.for_containerd("/x.sock", root=str(tmp_path)).log)).read_text()
    assert "-containerd-state is not a clean absolute path" in log


def _offline(
    tmp_path: Path, b: Path, monkeypatch: pytest.MonkeyPatch, ns: str = "k8s.io", id: str = "c1"
) -> None:
    """``delete`` with no daemon and no record of the task, for the bundle ``b``."""
    monkeypatch.setattr(delete, "_runc", lambda *args: None)
    delete.offline(DaemonPaths(str(tmp_path / "daemon")), ns, id, str(b))


def test_offline_delete_cleans_a_bundle_of_any_state_directory(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(bundle.ROOTS_ENV, raising=False)
    b = _bundle(state)
    (b / "init.pid").write_text("1\n")
    _offline(tmp_path, b, monkeypatch)
    assert not (b / "init.pid").exists()


def test_offline_delete_leaves_refused_bundles_alone(
    state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(bundle.ROOTS_ENV, raising=False)
    # A link where the bundle should be.
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "init.pid").write_text("1\n")
    link = state / bundle.TASK_DIR / "k8s.io" / "c1"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    _offline(tmp_path, link, monkeypatch)
    assert (target / "init.pid").exists()
    assert "not cleaning up the bundle" in capsys.readouterr().err
    # Not a bundle path at all.
    _offline(tmp_path, target, monkeypatch)
    assert (target / "init.pid").exists()
    # The override is an override here too.
    b = _bundle(state, "k8s.io", "c2")
    (b / "init.pid").write_text("1\n")
    monkeypatch.setenv(bundle.ROOTS_ENV, "/run/containerd")
    _offline(tmp_path, b, monkeypatch, id="c2")
    assert (b / "init.pid").exists()
    monkeypatch.setenv(bundle.ROOTS_ENV, str(state))
    _offline(tmp_path, b, monkeypatch, id="c2")
    assert not (b / "init.pid").exists()
