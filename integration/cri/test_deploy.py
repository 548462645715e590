"""deploy/: the containerd snippet, the RuntimeClass and the installer agree with each other
and with the configuration this suite runs containerd with."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from integration.cri.node import HANDLERS, CriNode

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CRI = "io.containerd.grpc.v1.cri"


def _runtimes(config: dict[str, object]) -> dict[str, dict[str, object]]:
    plugins = config["plugins"]
    assert isinstance(plugins, dict)
    return dict(plugins[CRI]["containerd"]["runtimes"])


def test_snippet_runtimeclass_and_suite_agree(cri_node: CriNode) -> None:
    snippet = _runtimes(tomllib.loads((DEPLOY / "containerd-cri-embed.toml").read_text()))
    handler = re.search(r"^handler:\s*(\S+)", (DEPLOY / "runtimeclass.yaml").read_text(), re.M)
    assert handler is not None
    assert list(snippet) == [handler[1]] == ["embed"]
    assert snippet["embed"]["runtime_type"] == HANDLERS["embed"]
    # the suite's containerd serves the same handler with the same runtime type
    suite = _runtimes(tomllib.loads(cri_node.ctrd.config_toml()))
    assert suite["embed"]["runtime_type"] == snippet["embed"]["runtime_type"]


def test_systemd_snippet_and_its_runc_settings(tmp_path: Path) -> None:
    """The handler with runc's settings spelt out (systemd-driver nodes): same handler and
    runtime type, a ConfigPath that containerd keeps, and a settings file the daemon reads
    as SystemdCgroup (the CRI suite's test_systemd_cgroup runs the same through CRI)."""
    from shim.api import runtimeoptions_pb2
    from shim.runcoptions import RUNTIME_OPTIONS, decode_options

    text = (DEPLOY / "containerd-cri-embed-systemd.toml").read_text()
    snippet = _runtimes(tomllib.loads(text))
    assert list(snippet) == ["embed"]
    assert snippet["embed"]["runtime_type"] == HANDLERS["embed"]
    options = snippet["embed"]["options"]
    assert isinstance(options, dict) and options == {"ConfigPath": "/etc/embedshim/runc.toml"}
    msg = runtimeoptions_pb2.Options(config_path=str(DEPLOY / "embedshim-runc.toml"))
    opts = decode_options(RUNTIME_OPTIONS, msg.SerializeToString())
    assert opts.systemd_cgroup and opts.binary == "runc" and opts.root == ""
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n" + text)
    dump = subprocess.run(
        ["containerd", "--config", str(cfg), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dump.returncode == 0, dump.stderr
    runtime = _runtimes(tomllib.loads(dump.stdout))["embed"]
    assert runtime["options"] == {"ConfigPath": "/etc/embedshim/runc.toml"}, runtime


def _install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(DEPLOY / "install.sh"), "--host-root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_installer_links_the_shim_and_registers_the_runtime_once(tmp_path: Path) -> None:
    shim = tmp_path / "opt/embedshim/venv/bin/containerd-shim-embed-v1"
    shim.parent.mkdir(parents=True)
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    cfg = tmp_path / "etc/containerd/config.toml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "p"\n')
    shim_arg = ("--shim", "/opt/embedshim/venv/bin/containerd-shim-embed-v1", "--no-restart")
    for _ in range(2):  # idempotent
        r = _install(tmp_path, *shim_arg)
        assert r.returncode == 0, r.stderr
    link = tmp_path / "usr/local/bin/containerd-shim-embed-v1"
    assert os.readlink(link) == "/opt/embedshim/venv/bin/containerd-shim-embed-v1"
    text = cfg.read_text()
    assert text.count("runtimes.embed]") == 1
    parsed = tomllib.loads(text)
    assert parsed["plugins"][CRI]["sandbox_image"] == "p"  # what was there stays
    assert _runtimes(parsed)["embed"]["runtime_type"] == HANDLERS["embed"]
    assert (cfg.parent / "config.toml.embedshim.bak").exists()
    # containerd itself reads the result
    dump = subprocess.run(
        ["containerd", "--config", str(cfg), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dump.returncode == 0, dump.stderr
    assert 'runtime_type = "io.containerd.embed.v1"' in dump.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --dist"),
        (("--shim", "/nowhere/shim", "--no-restart"), "not an executable"),
    ],
)
def test_installer_refuses_what_it_cannot_do(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    r = _install(tmp_path, *args)
    assert r.returncode != 0
    assert message in r.stderr
