"""The installed package is the whole product (issue 12, item 6).

What every Kubernetes node gets (deploy/Dockerfile builds the wheel with ``pip wheel``,
deploy/install.sh installs it into a venv and writes the fast launcher) is done here the same
way, outside the checkout: the source copied to a temp dir, ``pip wheel`` there, a fresh
venv made by the base interpreter, ``pip install`` of the wheel (protobuf from the
configured index, as a user gets it), ``python -m shim.cmd.launcher``.  Then, with that venv
alone on containerd's PATH (no checkout anywhere on any path): ``check`` reports
``bpf+pidfd`` and crash survival from the files inside the package, the daemon and its keeper
run from site-packages, a kill -9 of the daemon is survived, and an exit while no daemon runs
is reported with its code.  Last, the same install without those two files says so: in
``check`` and as warnings in the daemon's log.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.embed import (
    RUNTIME,
    SHIM,
    SYSTEM_PATH,
    daemon_paths,
    daemons,
    embed_containerd,
    embedshim_env,
    keeper_of,
)
from integration.harness import Containerd, task_list, wait_for
from integration.prereq import bpf_problem, missing

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Installed:
    venv: str
    wheel: str
    site: str  # the venv's site-packages

    @property
    def shim(self) -> str:
        return os.path.join(self.venv, "bin", SHIM)

    @property
    def script(self) -> str:
        """The Python entry point the C one runs for all but the usual start/delete."""
        return os.path.join(self.venv, "libexec", "embedshim", SHIM)

    @property
    def data(self) -> str:
        return os.path.join(self.site, "shim", "data")

    def env(self) -> dict[str, str]:
        """containerd's environment: the installed venv's bin first, no other venv."""
        return {**embedshim_env(), "PATH": f"{self.venv}/bin:{SYSTEM_PATH}"}

    def check(self) -> str:
        r = subprocess.run(
            [self.shim, "check"], capture_output=True, text=True, timeout=60, cwd="/",
            env=clean_env(),
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout


def clean_env() -> dict[str, str]:
    """The environment without anything that points Python at this checkout or venv."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = SYSTEM_PATH
    return env


def copy_source(dest: str) -> None:
    """The files of the checkout that git would commit (tracked, and new ones not ignored):
    what ``docker build`` copies from a clean checkout, without .venv, build/ or binaries."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, name))


def _run(argv: list[str], **kw: object) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(argv)}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    top = tempfile.mkdtemp(prefix="embedshim-wheel-")
    try:
        src, dist, venv = (os.path.join(top, d) for d in ("src", "dist", "venv"))
        copy_source(src)
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], cwd=top)
        (wheel,) = glob.glob(os.path.join(dist, "embedshim-*.whl"))
        shutil.rmtree(src)  # nothing of the source is left to find
        base = getattr(sys, "_base_executable", "") or shutil.which("python3") or "python3"
        _run([base, "-m", "venv", venv], cwd=top, env=clean_env())
        _run([f"{venv}/bin/pip", "install", "-q", wheel], cwd=top, env=clean_env())
        _run([f"{venv}/bin/python", "-m", "shim.cmd.launcher"], cwd="/", env=clean_env())
        (site,) = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
        yield Installed(venv, wheel, site)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_wheel_carries_the_bpf_object_and_the_keeper(installed: Installed) -> None:
    # py3-none-<platform>: any Python 3, the machine type the keeper was compiled for
    assert os.path.basename(installed.wheel).startswith("embedshim-0.1.0-py3-none-linux_")
    for name in ("exitsnoop.bpf.o", "watch.bpf.o"):  # the exit tracker; the `watch` stream
        obj = os.path.join(installed.data, name)
        assert Path(obj).read_bytes() == (REPO / "bpf" / name).read_bytes()
    keeper = os.path.join(installed.data, "embedshim-keeper")
    assert os.access(keeper, os.X_OK)
    ldd = subprocess.run(["ldd", keeper], capture_output=True, text=True, timeout=30)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd  # static: any libc
    assert not os.path.exists(os.path.join(installed.data, "embedshim-runc-exec"))  # gone
    # the pod sandbox holder (sandboxer = "shim"), static, the one the installed daemon runs
    holder = os.path.join(installed.data, "embedshim-holder")
    ldd = subprocess.run(["ldd", holder], capture_output=True, text=True, timeout=30)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd
    out = subprocess.run(
        [f"{installed.venv}/bin/python", "-c",
         "from shim.util import packaged; print(packaged.holder())"],
        capture_output=True, text=True, timeout=30, cwd="/", env=clean_env(), check=True,
    ).stdout  # fmt: skip
    assert out.strip() == holder, out
    # the program containerd runs is the C entry point from the wheel (static too), and the
    # Python one beside it runs the installed package, from site-packages
    entry = os.path.join(installed.data, "embedshim-entry")
    assert Path(installed.shim).read_bytes() == Path(entry).read_bytes()
    ldd = subprocess.run(["ldd", entry], capture_output=True, text=True, timeout=30)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd
    with open(installed.script) as f:
        launcher = f.read()
    assert f"sys.path[0] = {installed.site!r}" in launcher, launcher
    out = subprocess.run(
        [f"{installed.venv}/bin/python", "-c", "import shim, sys; print(shim.__file__, sys.path)"],
        capture_output=True, text=True, timeout=30, cwd="/", env=clean_env(), check=True,
    ).stdout  # fmt: skip
    assert out.startswith(os.path.join(installed.site, "shim", "__init__.py")), out
    assert str(REPO) not in out, out


def test_check_reports_bpf_and_crash_survival(installed: Installed) -> None:
    out = installed.check()
    print(out)
    lines = out.splitlines()
    (keeper,) = [ln for ln in lines if ln.startswith("crash survival")]
    assert keeper.split()[2:] == ["yes", os.path.join(installed.data, "embedshim-keeper")], out
    (obj,) = [ln for ln in lines if ln.startswith("BPF object")]
    assert obj.split()[2:] == ["yes", os.path.join(installed.data, "exitsnoop.bpf.o")], out
    problem = bpf_problem()
    if problem is not None:
        pytest.skip(missing(f"cannot demand mode bpf+pidfd: {problem}"))
    assert "\nmode: bpf+pidfd\n" in out and "WARNING" not in out, out


def test_installed_shim_survives_a_crash_and_reports_exits(
    installed: Installed, busybox: str
) -> None:
    if bpf_problem() is not None:
        pytest.skip(missing(f"exits while no daemon runs need BPF: {bpf_problem()}"))
    with embed_containerd(busybox, installed.env()) as c:
        r = c.run(RUNTIME, busybox, "seven", "sh", "-c", "exit 7", rm=True, check=False)
        assert r.returncode == 7, r.stderr
        ctl = os.path.join(c.tmp, "ctl")
        os.makedirs(ctl)
        c.run(RUNTIME, busybox, "lone", "sh", "-c",
              "while [ ! -e /ctl/go ]; do sleep 0.02; done; exit 42", detach=True,
              extra=("--mount", f"type=bind,src={ctl},dst=/ctl,options=rbind:rw"))  # fmt: skip
        c.run(RUNTIME, busybox, "survivor", "sleep", "1000", detach=True)
        tasks = task_list(c)
        (daemon,) = daemons(c)
        # the daemon and its keeper are the installed ones
        assert daemon.cmdline[:3] == [f"{installed.venv}/bin/python", "-SE", installed.script]
        keeper = keeper_of(daemon)
        exe = os.readlink(f"/proc/{keeper}/exe")
        assert exe == os.path.join(installed.data, "embedshim-keeper"), exe

        # 1. kill -9: the keeper starts a new daemon; containerd notices nothing
        os.kill(daemon.pid, signal.SIGKILL)
        wait_for(lambda: [d for d in daemons(c) if d.pid != daemon.pid], what="a new daemon")
        assert task_list(c)["survivor"] == tasks["survivor"]
        r = c.ctr("task", "exec", "--exec-id", "e1", "survivor", "sh", "-c", "exit 5", check=False)
        assert r.returncode == 5, r.stderr

        # 2. an exit while no daemon runs (the keeper held stopped, so none comes back yet)
        (daemon,) = daemons(c)
        os.kill(keeper, signal.SIGSTOP)
        try:
            os.kill(daemon.pid, signal.SIGKILL)
            wait_for(lambda: not daemons(c), what="daemon gone")
            pid = tasks["lone"][0]
            open(os.path.join(ctl, "go"), "w").close()
            wait_for(lambda: _gone_or_zombie(pid), what="lone exited")
        finally:
            os.kill(keeper, signal.SIGCONT)
        wait_for(lambda: task_list(c)["lone"] == (pid, "STOPPED"), timeout=20, what="STOPPED")
        r = c.ctr("task", "delete", "lone")
        assert "exit code 42" in r.stderr, r.stderr

        c.ctr("task", "kill", "-s", "KILL", "survivor")
        wait_for(lambda: task_list(c)["survivor"][1] == "STOPPED", what="survivor killed")
        assert "exit code 137" in c.ctr("task", "delete", "survivor").stderr
        with open(daemon_paths(c).log) as f:
            log = f.read()
        assert log.count("daemon restarted after a crash") == 2, log
        assert "BPF exit tracking on" in log and "level=warning" not in log, log


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_without_its_files_the_install_says_so(installed: Installed, busybox: str) -> None:
    """The same install with shim/data removed (what every install was before): ``check``
    and the daemon's log say, as warnings, that there is no BPF exit tracking and no crash
    survival, and the daemon still runs containers."""
    moved = installed.data + ".removed"
    os.rename(installed.data, moved)
    try:
        out = installed.check()
        assert "mode: pidfd+waitid only" in out, out
        assert "\nWARNING: no BPF exit tracking: " in out, out
        assert "\nWARNING: no crash survival: embedshim-keeper not found" in out, out
        (keeper,) = [ln for ln in out.splitlines() if ln.startswith("crash survival")]
        assert keeper.split()[2] == "no", out
        c: Containerd
        with embed_containerd(busybox, installed.env()) as c:
            r = c.run(RUNTIME, busybox, "three", "sh", "-c", "exit 3", rm=True, check=False)
            assert r.returncode == 3, r.stderr
            with open(daemon_paths(c).log) as f:
                log = f.read()
        warnings = [ln for ln in log.splitlines() if "level=warning" in ln]
        assert any("running without a keeper" in ln and "not found" in ln for ln in warnings), log
        assert any("BPF exit tracking unavailable" in ln and "missing" in ln for ln in warnings)
    finally:
        os.rename(moved, installed.data)
