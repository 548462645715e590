"""deploy/: the containerd snippets, the RuntimeClass and the installer agree with each other
and with the configuration this suite runs containerd with, on containerd 1.6 and 2.2.7.

The installer is run the two ways the README gives:

* on a node of its own making (``--host-root``, what installer-daemonset.yaml does): a root
  filesystem with this machine's ``/usr`` read-only (its python3, Debian's containerd 1.6,
  runc), its own empty ``/etc``, ``/opt`` and ``/usr/local``, and containerd 2.2.7 in
  ``/usr/local/bin`` when the test asks for it; the installer chroots into it as it does
  into the host's ``/`` from its pod.  The mounts live in a mount namespace of the
  installer's own (``unshare``), so nothing of them outlives it.
* on the machine itself (``/``, as ``sudo deploy/install.sh`` by hand), every path it writes
  moved to a temp dir (``--config``, ``--bin-dir``, ``--prefix``), then a real containerd
  with that config runs a pod through each handler the installer wrote.

On containerd 2.x the installer writes two handlers: ``embed`` and ``embed-shim`` (the
Sandbox API, ``sandboxer = "shim"``: pods without a pause container); on 1.x only ``embed``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.cri.node import HANDLERS, SHIM_SANDBOXER, CriNode
from integration.embed import CONTAINERD2_BIN, containerd_version_env, daemons
from integration.harness import _proc_info
from shim.pods.sandbox import HOLDER

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
INSTALL = DEPLOY / "install.sh"
CRI = "io.containerd.grpc.v1.cri"
V3_RUNTIME = "io.containerd.cri.v1.runtime"
EMBED = HANDLERS["embed"]
VENV_SHIM = os.path.join(sys.prefix, "bin", "containerd-shim-embed-v1")
#: the installer image's PATH (debian:12-slim), also the PATH it runs node commands with
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: the table header each config version needs, exactly as install.sh writes it
HEADERS = {
    1: "[plugins.cri.containerd.runtimes.embed]",
    2: '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed]',
    3: "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.embed]",
}
#: the same for the Sandbox API handler (containerd 2.x only: config versions 2 and 3), with
#: the line that makes its pods go without a pause container (version 2 names it sandbox_mode)
SHIM_TABLES = {
    2: '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed-shim]\n'
    '  runtime_type = "io.containerd.embed.v1"\n  sandbox_mode = "shim"\n',
    3: "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.embed-shim]\n"
    '  runtime_type = "io.containerd.embed.v1"\n  sandboxer = "shim"\n',
}
VERSIONS = ["1.6", "2.2.7"]


def containerd_bin(version: str) -> str:
    if version == "1.6":
        return "/usr/bin/containerd"
    path = CONTAINERD2_BIN / "containerd"
    if not path.exists():
        pytest.skip(f"containerd 2.2.7 not found in {CONTAINERD2_BIN}")
    return str(path)


def _runtimes(config: dict[str, Any], plugin: str = CRI) -> dict[str, dict[str, Any]]:
    return dict(config["plugins"][plugin]["containerd"]["runtimes"])


def dump(version: str, config: Path) -> dict[str, Any]:
    """``containerd config dump`` of ``config`` by containerd ``version`` (in the latest
    config version that containerd knows: 2 for 1.6, 3 for 2.2.7), parsed."""
    r = subprocess.run(
        [containerd_bin(version), "--config", str(config), "config", "dump"],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return tomllib.loads(r.stdout)


def dumped_handler(version: str, config: Path | str, name: str = "embed") -> dict[str, Any]:
    """The handler ``name`` as containerd ``version`` reads it from ``config`` ({} if none)."""
    d = dump(version, Path(config))
    return _runtimes(d, CRI if d["version"] == 2 else V3_RUNTIME).get(name, {})


def assert_handlers(version: str, config: Path | str) -> None:
    """What the node's containerd reads after install.sh: ``embed`` of our runtime type, and
    on 2.x ``embed-shim`` of our runtime type with ``sandboxer = "shim"`` (1.x: none)."""
    assert dumped_handler(version, config)["runtime_type"] == EMBED
    shim = dumped_handler(version, config, SHIM_SANDBOXER)
    if version == "1.6":
        assert shim == {}, shim
    else:
        assert (shim["runtime_type"], shim["sandboxer"]) == (EMBED, "shim"), shim


# -- the snippets -------------------------------------------------------------------------


def test_snippet_runtimeclass_and_suite_agree(cri_node: CriNode) -> None:
    snippet = _runtimes(tomllib.loads((DEPLOY / "containerd-cri-embed.toml").read_text()))
    handler = re.search(r"^handler:\s*(\S+)", (DEPLOY / "runtimeclass.yaml").read_text(), re.M)
    assert handler is not None
    assert list(snippet) == [handler[1]] == ["embed"]
    assert snippet["embed"]["runtime_type"] == EMBED
    # the suite's containerd serves the same handler with the same runtime type
    suite_config = tomllib.loads(cri_node.ctrd.config_toml())
    suite = _runtimes(suite_config, CRI if suite_config["version"] == 2 else V3_RUNTIME)
    assert suite["embed"]["runtime_type"] == snippet["embed"]["runtime_type"]


def test_shim_sandboxer_snippet_runtimeclass_and_suite_agree(tmp_path: Path) -> None:
    """The Sandbox API handler: its RuntimeClass names it, and containerd 2.2.7 reads it with
    ``sandboxer = "shim"`` (the suite runs a handler of that name, integration/harness.py)."""
    text = (DEPLOY / "containerd-cri-embed-shim.toml").read_text()
    snippet = _runtimes(tomllib.loads(text), V3_RUNTIME)
    runtimeclass = (DEPLOY / "runtimeclass-shim.yaml").read_text()
    handler = re.search(r"^handler:\s*(\S+)", runtimeclass, re.M)
    assert handler is not None
    assert list(snippet) == [handler[1]] == [SHIM_SANDBOXER]
    # only onto nodes said to run containerd 2.x: install.sh adds this handler there only
    selector = runtimeclass.split("nodeSelector:", 1)[1]
    assert re.findall(r'^\s+(\S+): "true"$', selector, re.M) == [
        "embedshim.io/install",
        "embedshim.io/sandbox-api",
    ]
    assert snippet[SHIM_SANDBOXER] == {"runtime_type": EMBED, "sandboxer": "shim"}
    containerd_version_env("2.2.7")  # skips where ../shared/containerd2 is missing
    config = tmp_path / "config.toml"
    config.write_text("version = 3\n" + text)
    read = _runtimes(dump("2.2.7", config), V3_RUNTIME)[SHIM_SANDBOXER]
    assert (read["runtime_type"], read["sandboxer"]) == (EMBED, "shim")


def test_installer_image_has_the_snippets_install_sh_reads() -> None:
    """deploy/Dockerfile copies install.sh with every file beside it that it reads."""
    read = set(re.findall(r"\$HERE/([\w.-]+)", INSTALL.read_text()))
    assert {"containerd-cri-embed.toml", "containerd-cri-embed-shim.toml"} <= read, read
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    (copy,) = [ln.split() for ln in lines if ln.startswith("COPY deploy/install.sh ")]
    assert copy[-1] == "/deploy/"
    assert read <= {os.path.basename(src) for src in copy[1:-1]}, copy


@pytest.mark.parametrize("version", VERSIONS)
def test_systemd_snippet_and_its_runc_settings(tmp_path: Path, version: str) -> None:
    """The handler with runc's settings spelt out (systemd-driver nodes): same handler and
    runtime type, a ConfigPath that containerd keeps, and a settings file the daemon reads
    as SystemdCgroup (the CRI suite's test_systemd_cgroup runs the same through CRI)."""
    from shim.api import runtimeoptions_pb2
    from shim.oci.runcoptions import RUNTIME_OPTIONS, decode_options

    text = (DEPLOY / "containerd-cri-embed-systemd.toml").read_text()
    snippet = _runtimes(tomllib.loads(text))
    assert list(snippet) == ["embed"]
    assert snippet["embed"]["runtime_type"] == EMBED
    options = snippet["embed"]["options"]
    assert isinstance(options, dict) and options == {"ConfigPath": "/etc/embedshim/runc.toml"}
    msg = runtimeoptions_pb2.Options(config_path=str(DEPLOY / "embedshim-runc.toml"))
    opts = decode_options(RUNTIME_OPTIONS, msg.SerializeToString())
    assert opts.systemd_cgroup and opts.binary == "runc" and opts.root == ""
    # as a version 2 config: what 1.x reads, and 2.x migrates
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n" + text)
    runtime = dumped_handler(version, cfg)
    assert runtime["runtime_type"] == EMBED
    assert runtime["options"] == {"ConfigPath": "/etc/embedshim/runc.toml"}, runtime


# -- the installer on a node of its own making (--host-root) ------------------------------

#: run in a mount namespace of its own: the node's mounts, then the installer
NODE_MOUNTS = r"""
set -eu
R=$1; LOCAL=$2; CTRD2=$3; shift 3
mount --bind -o ro /usr "$R/usr"
findmnt -no OPTIONS "$R/usr" | grep -q '^ro' || { echo "node: /usr is not read-only" >&2; exit 97; }
mount --bind "$LOCAL" "$R/usr/local"
[ -z "$CTRD2" ] || mount --bind -o ro "$CTRD2" "$R/usr/local/bin/containerd"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind -o ro /sys "$R/sys"
exec "$@"
"""


class Node:
    """A node's root filesystem for ``install.sh --host-root`` (see the module's doc):
    ``containerd`` is "1.6" (Debian's, /usr/bin) or "2.2.7" (in /usr/local/bin)."""

    def __init__(self, top: Path, containerd: str) -> None:
        self.top = top
        self.root = top / "node"
        self.local = top / "usr-local"  # the node's /usr/local
        self.containerd = containerd
        self.ctrd2 = containerd_bin(containerd) if containerd != "1.6" else ""
        for d in ("usr", "dev", "proc", "sys", "etc", "opt", "root", "run", "var"):
            (self.root / d).mkdir(parents=True)
        (self.root / "tmp").mkdir(mode=0o1777)
        for d in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as on Debian 12
            (self.root / d).symlink_to(f"usr/{d}")
        for f in ("ld.so.cache", "passwd", "group", "nsswitch.conf"):
            if os.path.exists(f"/etc/{f}"):
                shutil.copy(f"/etc/{f}", self.root / "etc" / f)
        (self.local / "bin").mkdir(parents=True)
        if self.ctrd2:
            (self.local / "bin" / "containerd").touch()  # where 2.2.7 is bound

    def path(self, p: str) -> Path:
        """A path on the node, as seen from here."""
        if p.startswith("/usr/local/"):
            return self.local / p.removeprefix("/usr/local/")
        return self.root / p.lstrip("/")

    @property
    def config(self) -> Path:
        return self.path("/etc/containerd/config.toml")

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        """install.sh --host-root <node> ``args`` (never restarting containerd: its
        restart of a --host-root node runs systemctl in pid 1's namespaces)."""
        argv = ["sh", str(INSTALL), "--host-root", str(self.root), *args, "--no-restart"]
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", NODE_MOUNTS, "sh",
             str(self.root), str(self.local), self.ctrd2, *argv],
            capture_output=True, text=True, timeout=600, cwd="/",
            env={"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8"},
        )  # fmt: skip
        assert not mounted_under(self.top)
        return r

    def shim(self, path: str = "/opt/embedshim/venv/bin/containerd-shim-embed-v1") -> str:
        """A stand-in for an installed shim (its check prints nothing)."""
        p = self.path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
        return path


def mounted_under(top: Path) -> list[str]:
    """Mount points under ``top`` in this mount namespace (none: the node's were private)."""
    prefix = os.path.realpath(top) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


@pytest.fixture
def node_top() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="esh-node-"))
    try:
        yield top
    finally:
        left = mounted_under(top)
        assert not left, left  # never remove a tree with something mounted in it
        shutil.rmtree(top)


def default_config(version: str) -> str:
    """What ``containerd config default`` writes (the usual start of a node's config)."""
    r = subprocess.run(
        [containerd_bin(version), "config", "default"], capture_output=True, text=True,
        timeout=30, cwd="/",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


#: Debian's containerd package config (version 2, CNI where Debian puts it)
DEBIAN_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
"""


@pytest.mark.parametrize(
    ("containerd", "config", "version"),
    [
        ("1.6", None, 2),  # no config: written as version 2
        ("1.6", "", 2),  # an empty one: likewise
        ("1.6", DEBIAN_CONFIG, 2),
        ("1.6", "default", 2),
        # no version: containerd 1.x reads it as version 1
        ("1.6", '[plugins.cri]\n  sandbox_image = "k8s/pause:1"\n', 1),
        ("2.2.7", None, 3),
        ("2.2.7", "default", 3),
        # a version 2 config on containerd 2.x (an upgraded node): migrated by containerd
        ("2.2.7", DEBIAN_CONFIG, 2),
        # no version: containerd 2.x reads it as version 3
        ("2.2.7", "[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'native'\n", 3),
    ],
    ids=[
        "1.6-none",
        "1.6-empty",
        "1.6-debian",
        "1.6-default",
        "1.6-v1",
        "2.2.7-none",
        "2.2.7-default",
        "2.2.7-v2",
        "2.2.7-noversion",
    ],
)
def test_installer_writes_the_table_its_config_version_needs(
    node_top: Path, containerd: str, config: str | None, version: int
) -> None:
    node = Node(node_top, containerd)
    if config == "default":
        config = default_config(containerd)
    if config is not None:
        node.config.parent.mkdir(parents=True)
        node.config.write_text(config)
    shim = node.shim()
    r = node.install("--shim", shim)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "install.sh: containerd: containerd github.com/containerd/containerd" in r.stdout
    text = node.config.read_text()
    assert text.count("runtimes.embed]") == 1 and HEADERS[version] in text, text
    if containerd == "1.6":
        assert SHIM_SANDBOXER not in text, text
    else:
        assert text.count("runtimes.embed-shim]") == 1 and SHIM_TABLES[version] in text, text
    if config:
        assert text.startswith(config)  # what was there stays
        assert node.path("/etc/containerd/config.toml.embedshim.bak").read_text() == config
    else:
        assert text.startswith(f"version = {version}\n"), text
    # the node's containerd reads the handlers
    assert_handlers(containerd, node.config)
    assert os.readlink(node.path("/usr/local/bin/containerd-shim-embed-v1")) == shim
    assert "restart containerd to load the handler" in r.stdout
    # idempotent
    r = node.install("--shim", shim)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "already has the embed runtime" in r.stdout
    assert ("already has the embed-shim runtime" in r.stdout) == (containerd != "1.6"), r.stdout
    assert "added" not in r.stdout and "wrote" not in r.stdout, r.stdout
    assert node.config.read_text() == text


@pytest.mark.parametrize(("containerd", "version"), [("1.6", 2), ("2.2.7", 3)])
def test_installer_with_runc_settings(node_top: Path, containerd: str, version: int) -> None:
    """--runc-config (systemd-driver nodes): the settings file at the handler's ConfigPath
    and containerd-cri-embed-systemd.toml's table, in the form the config version needs."""
    node = Node(node_top, containerd)
    node.config.parent.mkdir(parents=True)
    node.config.write_text(default_config(containerd))
    settings = DEPLOY / "embedshim-runc.toml"
    r = node.install("--shim", node.shim(), "--runc-config", str(settings))
    assert r.returncode == 0, r.stdout + r.stderr
    assert node.path("/etc/embedshim/runc.toml").read_text() == settings.read_text()
    text = node.config.read_text()
    assert HEADERS[version][:-1] + ".options]" in text, text
    assert_handlers(containerd, node.config)
    # runc's settings hold for the pods of either handler
    for name in ["embed"] if containerd == "1.6" else ["embed", SHIM_SANDBOXER]:
        runtime = dumped_handler(containerd, node.config, name)
        assert runtime["options"] == {"ConfigPath": "/etc/embedshim/runc.toml"}, runtime


CRI_RUNTIMES = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
V1_CONFIG = 'version = 1\n[plugins.cri]\n  sandbox_image = "p"\n'
RUNC_EMBED = f'version = 2\n[{CRI_RUNTIMES}.embed]\n  runtime_type = "io.containerd.runc.v2"\n'
#: a handler "embed" without a runtime type: a second table of that name is invalid TOML
HALF_EMBED = f"version = 2\n[{CRI_RUNTIMES}.embed]\n  privileged_without_host_devices = true\n"
#: containerd.io's packaged /etc/containerd/config.toml (CRI off), and a version 3 one
CRI_OFF = 'disabled_plugins = ["cri"]\n'
CRI_OFF_V3 = "version = 3\ndisabled_plugins = ['io.containerd.cri.v1.runtime']\n"
CONFIG = "/etc/containerd/config.toml"
V3_RUNTIMES = "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes"
#: a good "embed" beside an "embed-shim" that is not ours
RUNC_EMBED_SHIM = (
    f"version = 3\n[{V3_RUNTIMES}.embed]\n  runtime_type = 'io.containerd.embed.v1'\n"
    f"[{V3_RUNTIMES}.embed-shim]\n  runtime_type = 'io.containerd.runc.v2'\n  sandboxer = 'shim'\n"
)
#: ours without the Sandbox API (its pods would get pause containers), in a version 2 config
PAUSE_EMBED_SHIM = f'version = 2\n[{CRI_RUNTIMES}.embed-shim]\n  runtime_type = "{EMBED}"\n'
HALF_EMBED_SHIM = (
    f"version = 3\n[{V3_RUNTIMES}.embed-shim]\n  privileged_without_host_devices = true\n"
)


@pytest.mark.parametrize(
    ("containerd", "config", "args", "message"),
    [
        pytest.param(
            "2.2.7", V1_CONFIG, (), "a version 1 config, which containerd 2.x does not read",
            id="v1-on-2.x",
        ),
        pytest.param(
            "1.6", "version = 3\n", (), "says version 3, which containerd 1.x does not read",
            id="v3-on-1.x",
        ),
        pytest.param(
            "1.6", RUNC_EMBED, (), 'handler "embed" of runtime type io.containerd.runc.v2',
            id="other-embed",
        ),
        pytest.param(
            "1.6", HALF_EMBED, (), f"embed runtime from {CONFIG} (version 2): left as it was",
            id="half-embed",
        ),
        pytest.param(
            "2.2.7", RUNC_EMBED_SHIM, (),
            'handler "embed-shim" of runtime type io.containerd.runc.v2', id="other-embed-shim",
        ),
        pytest.param(
            "2.2.7", PAUSE_EMBED_SHIM, (), 'handler "embed-shim" without sandboxer = "shim"',
            id="pause-embed-shim",
        ),
        pytest.param(
            "2.2.7", HALF_EMBED_SHIM, (),
            f"embed and embed-shim runtimes from {CONFIG} (version 3): left as it was",
            id="half-embed-shim",
        ),
        pytest.param(
            "1.6", "version = 2\n[plugins\n", (), f"containerd cannot read {CONFIG}",
            id="broken",
        ),
        pytest.param(
            "1.6", CRI_OFF, (), "disables containerd's CRI plugin", id="cri-off"
        ),
        pytest.param(
            "2.2.7", CRI_OFF_V3, (), "disables containerd's CRI plugin", id="cri-off-2.x"
        ),
        pytest.param(
            "1.6", None, ("--shim", "/nowhere/shim"), "/nowhere/shim is not an executable",
            id="no-shim",
        ),
        pytest.param(
            "1.6", None, ("--shim", "rel/shim"), "rel/shim: a path on the node must be absolute",
            id="relative",
        ),
        pytest.param(
            "1.6", None, ("--dist", "/nowhere"), "no embedshim wheel in /nowhere", id="no-wheels"
        ),
    ],
)  # fmt: skip
def test_installer_refuses_what_it_cannot_do(
    node_top: Path, containerd: str, config: str | None, args: tuple[str, ...], message: str
) -> None:
    node = Node(node_top, containerd)
    if config is not None:
        node.config.parent.mkdir(parents=True)
        node.config.write_text(config)
    r = node.install(*(args or ("--shim", node.shim())))
    assert r.returncode != 0, r.stdout
    assert message in r.stderr, r.stderr
    if config is not None:  # left as it was
        assert node.config.read_text() == config
        assert not node.path("/etc/containerd/config.toml.embedshim.bak").exists()
    if "left as it was" not in message:  # refused before anything was changed
        assert not os.path.lexists(node.path("/usr/local/bin/containerd-shim-embed-v1"))


def test_installer_needs_containerd_and_a_shim(tmp_path: Path) -> None:
    """A bare root (no containerd, nothing to chroot into) and no --dist or --shim."""

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", str(INSTALL), "--host-root", str(tmp_path), *args, "--no-restart"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    r = install()
    assert r.returncode != 0 and "give --dist (wheels) or --shim" in r.stderr, r.stderr
    r = install("--shim", "/opt/embedshim/venv/bin/containerd-shim-embed-v1")
    assert r.returncode != 0 and "containerd is not on the node's PATH" in r.stderr, r.stderr
    assert not (tmp_path / "etc").exists()


@pytest.fixture(scope="module")
def wheels() -> Iterator[str]:
    """The wheels an operator makes from a checkout for --dist, as the README says:
    ``pip wheel -w <dir> .`` (embedshim's, from a copy of the source, and protobuf's)."""
    from integration.test_wheel import copy_source

    top = tempfile.mkdtemp(prefix="embedshim-dist-")
    try:
        src, dist = os.path.join(top, "src"), os.path.join(top, "dist")
        copy_source(src)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "-w", dist, src],
            capture_output=True, text=True, timeout=600, cwd=top,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        names = sorted(os.path.basename(w) for w in glob.glob(os.path.join(dist, "*.whl")))
        assert [n.split("-")[0] for n in names] == ["embedshim", "protobuf"], names
        yield dist
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_installer_from_wheels_on_a_node(node_top: Path, wheels: str) -> None:
    """--dist, as the DaemonSet runs it: a venv made by the node's python3 at
    /opt/embedshim/venv, the fast launcher, the link, and check's mode from the installed
    package (its BPF object and keeper inside)."""
    node = Node(node_top, "1.6")
    r = node.install("--dist", wheels)
    assert r.returncode == 0, r.stdout + r.stderr
    shim = "/opt/embedshim/venv/bin/containerd-shim-embed-v1"
    assert os.readlink(node.path("/usr/local/bin/containerd-shim-embed-v1")) == shim
    assert node.path(shim).read_bytes().startswith(b"\x7fELF")  # the C entry point
    script = "/opt/embedshim/venv/libexec/embedshim/containerd-shim-embed-v1"
    assert "python -m shim.cmd.launcher" in node.path(script).read_text()
    assert "install.sh: check: mode: bpf+pidfd" in r.stdout, r.stdout
    assert "WARNING" not in r.stdout, r.stdout
    # again (a DaemonSet pod that runs anew): nothing changes, the venv included
    (init,) = node.root.glob("opt/embedshim/venv/lib/python3*/site-packages/shim/__init__.py")
    init.write_text(init.read_text() + "# changed on the node\n")
    text = node.config.read_text()
    r = node.install("--dist", wheels)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/opt/embedshim/venv has these wheels installed already" in r.stdout, r.stdout
    assert node.config.read_text() == text
    assert init.read_text().endswith("# changed on the node\n")
    # a rebuilt wheel (other bytes, same version) is installed over the old one
    rebuilt = node_top / "rebuilt"
    rebuilt.mkdir()
    for w in glob.glob(os.path.join(wheels, "*.whl")):
        with zipfile.ZipFile(w) as old, zipfile.ZipFile(rebuilt / os.path.basename(w), "w") as new:
            for info in reversed(old.infolist()):  # modes kept (the keeper's x bit)
                data = old.read(info)
                info.compress_type = zipfile.ZIP_STORED
                new.writestr(info, data)
    r = node.install("--dist", str(rebuilt))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installed embedshim-" in r.stdout, r.stdout
    assert not init.read_text().endswith("# changed on the node\n")
    assert "install.sh: check: mode: bpf+pidfd" in r.stdout, r.stdout


# -- the installer on the machine itself (paths moved), then a pod through the handler -----


def install_here(tmp: str, config: str, *args: str, path: str = NODE_PATH) -> str:
    """install.sh at host root / with every path it writes under ``tmp``; its output."""
    r = subprocess.run(
        ["sh", str(INSTALL), "--config", config, "--bin-dir", f"{tmp}/bin",
         "--prefix", f"{tmp}/opt", *args],
        capture_output=True, text=True, timeout=600, cwd="/", env={"PATH": path, "HOME": "/root"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def fake_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    """A systemctl that logs its arguments to the returned file and fails while
    ``tmp_path/fail`` exists; and the directory it is in, for the PATH."""
    fake = tmp_path / "fake"
    fake.mkdir()
    calls = tmp_path / "calls"
    systemctl = fake / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >>{calls}\nexec test ! -e {tmp_path}/fail\n')
    systemctl.chmod(0o755)
    return fake, calls


def node_path(version: str) -> str:
    """The PATH with containerd ``version`` first (2.2.7: CONTAINERD2_BIN)."""
    return NODE_PATH if version == "1.6" else f"{Path(containerd_bin(version)).parent}:{NODE_PATH}"


@pytest.mark.parametrize("version", VERSIONS)
def test_installer_restarts_containerd_only_when_its_config_changed(
    tmp_path: Path, version: str
) -> None:
    """systemctl restart containerd once the handlers are added; not again for an unchanged
    config; a restart that failed is tried again by the next run."""
    fake, calls = fake_systemctl(tmp_path)
    path = f"{fake}:{node_path(version)}"
    cfg = str(tmp_path / "config.toml")
    (tmp_path / "fail").touch()
    r = subprocess.run(
        ["sh", str(INSTALL), "--config", cfg, "--bin-dir", f"{tmp_path}/bin",
         "--prefix", f"{tmp_path}/opt", "--shim", VENV_SHIM],
        capture_output=True, text=True, timeout=60, env={"PATH": path},
    )  # fmt: skip
    assert r.returncode != 0 and "could not restart containerd" in r.stderr, r.stderr
    assert_handlers(version, cfg)
    (tmp_path / "fail").unlink()
    out = install_here(str(tmp_path), cfg, "--shim", VENV_SHIM, path=path)
    assert "already has the embed runtime" in out and "restarted containerd" in out, out
    text = open(cfg).read()
    out = install_here(str(tmp_path), cfg, "--shim", VENV_SHIM, path=path)
    assert "unchanged: no restart needed" in out, out
    assert ("already has the embed-shim runtime" in out) == (version != "1.6"), out
    assert open(cfg).read() == text
    assert calls.read_text() == "restart containerd\n" * 2


def test_installer_adds_embed_shim_to_a_node_that_has_embed(tmp_path: Path) -> None:
    """A containerd 2.x node installed before install.sh wrote "embed-shim" (its config has
    "embed" only): the run adds "embed-shim" alone, keeps "embed" as it was, restarts
    containerd once; the next run changes nothing."""
    fake, calls = fake_systemctl(tmp_path)
    path = f"{fake}:{node_path('2.2.7')}"
    cfg = tmp_path / "config.toml"
    before = f'version = 3\n\n{HEADERS[3]}\n  runtime_type = "{EMBED}"\n'
    cfg.write_text(before)
    out = install_here(str(tmp_path), str(cfg), "--shim", VENV_SHIM, path=path)
    assert "already has the embed runtime" in out, out
    assert "added the embed-shim runtime" in out, out
    text = cfg.read_text()
    assert text.startswith(before) and text.count("runtimes.embed]") == 1, text
    assert text.count("runtimes.embed-shim]") == 1 and SHIM_TABLES[3] in text, text
    assert (tmp_path / "config.toml.embedshim.bak").read_text() == before
    assert_handlers("2.2.7", cfg)
    out = install_here(str(tmp_path), str(cfg), "--shim", VENV_SHIM, path=path)
    assert "unchanged: no restart needed" in out, out
    assert cfg.read_text() == text
    assert calls.read_text() == "restart containerd\n"


def without_ours(config_path: str) -> str:
    """The suite's config without its own handlers of our runtime type (``embed``, and on
    containerd 2.x ``embed-shim``): the installer adds them."""
    with open(config_path) as f:
        lines = f.read().splitlines(keepends=True)
    v3 = lines[0] == "version = 3\n"  # the suite's config for containerd 2.x
    runtimes = f'[plugins."{V3_RUNTIME if v3 else CRI}".containerd.runtimes'
    ours = [f"{runtimes}.embed]\n", *([f"{runtimes}.{SHIM_SANDBOXER}]\n"] if v3 else [])]
    kept: list[str] = []
    dropped: list[str] = []
    into = kept
    for line in lines:
        if line.startswith("["):
            into = dropped if line in ours else kept
        into.append(line)
    assert [ln for ln in dropped if ln.startswith("[")] == ours, dropped
    settings = {ln.strip() for ln in dropped if not ln.startswith("[")} - {""}
    assert settings <= {f'runtime_type = "{EMBED}"', 'sandboxer = "shim"'}, dropped
    return "".join(kept)


@pytest.mark.parametrize("how", ["shim", "dist"])
@pytest.mark.parametrize("version", VERSIONS)
def test_installed_handler_runs_a_pod(
    busybox: str, version: str, how: str, request: pytest.FixtureRequest
) -> None:
    """The README's path on a fresh node: install.sh with --shim (a checkout's shim) or
    --dist (wheels), on containerd 1.6 with a version 2 config and 2.2.7 with a version 3 one
    (``containerd config migrate`` of the suite's), then containerd with that config and
    only the installer's link on its PATH runs a pod and a container through handler
    ``embed`` and, on 2.2.7, through ``embed-shim`` a pod without a pause container."""
    env = containerd_version_env(version)  # skips 2.2.7 without ../shared/containerd2
    args = ("--shim", VENV_SHIM) if how == "shim" else ("--dist", request.getfixturevalue("wheels"))
    ctrd2 = [str(CONTAINERD2_BIN)] if version != "1.6" else []
    # the installer's link first; no venv, no /usr/local (make setup's link is there)
    env["PATH"] = ":".join(["{tmp}/bin", *ctrd2, "/usr/sbin:/usr/bin:/sbin:/bin"])
    outputs: list[str] = []

    def install(config: str) -> None:
        tmp = os.path.dirname(config)
        text = without_ours(config)
        if version != "1.6":
            with open(config, "w") as f:
                f.write(text)
            r = subprocess.run(
                [containerd_bin(version), "--config", config, "config", "migrate"],
                capture_output=True, text=True, timeout=30, cwd="/",
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            text = r.stdout
            assert text.startswith("version = 3\n")
        with open(config, "w") as f:
            f.write(text)
        outputs.append(
            install_here(tmp, config, *args, "--no-restart", path=":".join([*ctrd2, NODE_PATH]))
        )

    cri = CriNode(busybox, env=env, edit_config=install)
    try:
        config = cri.ctrd.config_path
        text = open(config).read()
        assert HEADERS[2 if version == "1.6" else 3] in text, text
        assert (SHIM_TABLES[3] in text) == (version != "1.6"), text
        assert_handlers(version, config)
        assert "check: mode: bpf+pidfd" in outputs[0], outputs
        pods = [cri.run_pod("embed")]
        if version != "1.6":
            pods.append(cri.run_pod(SHIM_SANDBOXER))
        for pod in pods:
            cid = cri.run_container(pod, ["sh", "-c", "echo hi; exit 3"])
            assert cri.wait_exited(cid).exit_code == 3
            assert cri.sandbox_info(pod)["runtimeType"] == EMBED
        (daemon,) = daemons(cri.ctrd)
        if how == "dist":  # the installed package's daemon
            venv = os.path.join(cri.ctrd.tmp, "opt", "venv")
            assert any(a.startswith(venv) for a in daemon.cmdline), daemon.cmdline
        # "embed": the pod's sandbox is a pause container (a task); "embed-shim": no task
        # for it, the sandbox is our holder, a child of the daemon
        tasks = os.listdir(os.path.join(cri.ctrd.state, "io.containerd.runtime.v2.task", "k8s.io"))
        assert pods[0].id in tasks, tasks
        for pod in pods[1:]:
            assert pod.id not in tasks, tasks
            holder = _proc_info(int(cri.sandbox_info(pod)["pid"]))
            assert holder is not None and holder.ppid == daemon.pid, holder
            assert os.path.basename(os.readlink(f"/proc/{holder.pid}/exe")) == HOLDER
        for pod in pods:
            cri.stop_pod(pod)
            cri.remove_pod(pod)
        log = open(cri.ctrd.log_path).read()
        assert "Ignoring unknown key" not in log, log[-3000:]
    finally:
        cri.close()
    left = cri.ctrd.leftovers()
    assert not any(left.values()), left
