"""Kubernetes nodes with the systemd cgroup driver, through CRI (issue 12, item 2).

The kubelet's systemd driver makes pods' cgroup parents systemd slices, and CRI then writes
each container's ``linux.cgroupsPath`` as ``<slice>:cri-containerd:<id>``; runc must run with
``--systemd-cgroup`` to understand it.  CRI sends runc's settings (containerd.runc.v1.Options)
only to io.containerd.runc.* runtime types; ours gets runtimeoptions.v1.Options, whose
``config_path`` (the handler's ``ConfigPath``) or ``config_body`` (the whole ``options``
table, containerd 1.7+) we read.

There is no systemd here, so runc's systemd driver cannot run.  Every handler below runs a
recording runc wrapper (``BinaryName``): it writes down each command's arguments and the
spec's cgroupsPath, then runs the real runc without ``--systemd-cgroup``, with a
slice:prefix:name cgroupsPath rewritten to a cgroupfs path under the test's own cgroup.  So
what is proven is what runc is asked to do (its flags, the spec it is given, which binary),
for each source of the setting, on containerd 1.6 and 2.2.7; not that runc's systemd driver
then works (that is runc's and systemd's part, the same as for io.containerd.runc.v2, which
the last test compares with).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from integration.cri.node import CriNode, Pod
from integration.embed import containerd_version_env, crash_daemon, daemon_paths, daemons
from integration.harness import wait_for

#: CRI's handlers, in the node's config version (the harness fills in {cri_runtimes})
CRI_RUNTIMES = "[{cri_runtimes}"
FLAG = "--systemd-cgroup"


def handler(name: str, runtime_type: str, **options: object) -> str:
    lines = [f"{CRI_RUNTIMES}.{name}]", f'  runtime_type = "{runtime_type}"']
    if options:
        lines.append(f"{CRI_RUNTIMES}.{name}.options]")
        lines += [f"  {k} = {json.dumps(v)}" for k, v in options.items()]
    return "\n".join(lines) + "\n"


EMBED = "io.containerd.embed.v1"
RECORDER = "{tmp}/rec/runc"
EXTRA_CONFIG = "".join(
    [
        # BinaryName alone (in a ConfigPath file, which every containerd sends)
        handler("embed-rec", EMBED, ConfigPath="{tmp}/rec/rec.toml"),
        # SystemdCgroup in a ConfigPath file
        handler("embed-sd-path", EMBED, ConfigPath="{tmp}/rec/sd.toml"),
        # SystemdCgroup in the options table itself (config_body: containerd 1.7 and 2.x)
        handler("embed-sd-body", EMBED, BinaryName=RECORDER, SystemdCgroup=True),
        # the runc shim with the same settings, to compare with
        handler(
            "runc-sd",
            "io.containerd.runc.v2",
            BinaryName=RECORDER,
            SystemdCgroup=True,
            Root="{tmp}/runc",
        ),
    ]
)

RECORDER_SCRIPT = """#!{python} -SE
# A runc that records what it is asked to do, then runs the real one (see the test's doc).
import json, os, sys
args = sys.argv[1:]
record = {{"argv": args}}
if "--bundle" in args:
    config = os.path.join(args[args.index("--bundle") + 1], "config.json")
    with open(config) as f:
        spec = json.load(f)
    path = spec.get("linux", {{}}).get("cgroupsPath", "")
    record["cgroupsPath"] = path
    parts = path.split(":")
    if len(parts) == 3:  # slice:prefix:name, for runc's cgroupfs driver
        spec["linux"]["cgroupsPath"] = "/{parent}/%s/%s-%s" % tuple(parts)
        with open(config + ".rec", "w") as f:
            json.dump(spec, f)
        os.rename(config + ".rec", config)
fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
os.execv({runc!r}, [{runc!r}] + [a for a in args if a != "--systemd-cgroup"])
"""


class Node:
    """A CRI node whose handlers run the recording runc."""

    def __init__(self, node: CriNode, version: str) -> None:
        self.cri = node
        self.version = version
        tmp = node.ctrd.tmp
        self.dir = os.path.join(tmp, "rec")
        self.recorder = RECORDER.replace("{tmp}", tmp)
        self.log = os.path.join(self.dir, "calls.jsonl")
        self.sd_toml = os.path.join(self.dir, "sd.toml")
        self.runc_root = os.path.join(self.dir, "runc-root")
        os.makedirs(self.dir)
        real = shutil.which("runc", path="/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")
        assert real is not None
        with open(self.recorder, "w") as f:
            f.write(
                RECORDER_SCRIPT.format(
                    python=sys.executable, log=self.log, runc=real, parent=node.ctrd.cgroup_parent
                )
            )
        os.chmod(self.recorder, 0o755)
        with open(os.path.join(self.dir, "rec.toml"), "w") as f:
            f.write(f'BinaryName = "{self.recorder}"\nRoot = "{self.runc_root}"\n')
        self.write_sd_toml()

    def write_sd_toml(self) -> None:
        with open(self.sd_toml, "w") as f:
            f.write(f'# runc settings for embedshim\nBinaryName = "{self.recorder}"\n')
            f.write("SystemdCgroup = true\n")

    def slice_parent(self) -> str:
        """A cgroup parent as the kubelet's systemd driver makes it (a slice per pod)."""
        p = self.cri.ctrd.cgroup_parent
        return f"/{p}.slice/{p}-pod{{uid}}.slice"

    def calls(self, id: str) -> list[dict[str, Any]]:
        """Every recorded runc command about container (or sandbox) ``id``."""
        try:
            with open(self.log) as f:
                records = [json.loads(line) for line in f]
        except FileNotFoundError:
            return []
        return [r for r in records if id in r["argv"]]

    def command(self, id: str, name: str) -> list[dict[str, Any]]:
        return [r for r in self.calls(id) if name in r["argv"]]

    def daemon_log(self) -> str:
        with open(daemon_paths(self.cri.ctrd).log) as f:
            return f.read()


@pytest.fixture(scope="module", params=["1.6", "2.2.7"])
def sd_node(request: pytest.FixtureRequest, busybox: str) -> Iterator[Node]:
    env = containerd_version_env(request.param)  # skips 2.2.7 without ../shared/containerd2
    cri_node = CriNode(busybox, env=env, extra_config=EXTRA_CONFIG)
    try:
        yield Node(cri_node, request.param)
    finally:
        cri_node.close()
    left = cri_node.ctrd.leftovers()  # the rewritten cgroups included
    assert not any(left.values()), left


@pytest.fixture
def node(sd_node: Node) -> Iterator[Node]:
    yield sd_node
    sd_node.cri.remove_all_pods()
    assert not sd_node.cri.containers()


def run_through(node: Node, handler: str, cgroup_parent: str | None) -> tuple[Pod, str]:
    """A pod and a container that exits 3 (the real runc ran it), an ExecSync and a stop of
    a second container (runc exec and kill); the pod is then removed (runc delete)."""
    cri = node.cri
    pod = cri.run_pod(handler, cgroup_parent=cgroup_parent)
    cid = cri.run_container(pod, ["sh", "-c", "exit 3"])
    assert cri.wait_exited(cid).exit_code == 3
    long = cri.run_container(pod, ["sleep", "1000"])
    assert cri.exec_sync(long, ["sh", "-c", "exit 4"]).exit_code == 4
    cri.stop(long, timeout=0)
    assert cri.wait_exited(long).exit_code == 137
    cri.stop_pod(pod)
    cri.remove_pod(pod)
    return pod, cid


def assert_asked(node: Node, ids: list[str], systemd: bool) -> None:
    """runc ran for each of ``ids`` (create, start, delete at least), every command with
    ``--systemd-cgroup`` or every one without."""
    for id in ids:
        calls = node.calls(id)
        names = {a for r in calls for a in r["argv"]}
        assert {"create", "start", "delete"} <= names, (id, calls)
        assert all((FLAG in r["argv"]) == systemd for r in calls), (id, calls)


def test_cgroupfs_parent_and_no_setting_no_systemd_driver(node: Node) -> None:
    pod, cid = run_through(node, "embed-rec", None)
    assert_asked(node, [pod.id, cid], systemd=False)
    (create,) = node.command(cid, "create")
    uid = pod.config.metadata.uid
    assert create["cgroupsPath"] == f"/{node.cri.ctrd.cgroup_parent}/pod{uid}/{cid}"
    # Root is the parent of a runc root per namespace, as for the runc shim
    assert create["argv"][:2] == ["--root", os.path.join(node.runc_root, "k8s.io")], create


def test_systemd_slice_parent_turns_the_driver_on_without_a_setting(node: Node) -> None:
    """The kubelet's systemd driver alone: no SystemdCgroup anywhere, the slice:prefix:name
    cgroupsPath CRI writes is enough (sandbox, containers, exec, kill, delete)."""
    pod, cid = run_through(node, "embed-rec", node.slice_parent())
    assert_asked(node, [pod.id, cid], systemd=True)
    slice_ = f"{node.cri.ctrd.cgroup_parent}-pod{pod.config.metadata.uid}.slice"
    for id in (pod.id, cid):
        (create,) = node.command(id, "create")
        assert create["cgroupsPath"] == f"{slice_}:cri-containerd:{id}", create
    long = pod.containers[1]
    assert_asked(node, [long], systemd=True)
    for command in ("exec", "kill"):
        assert node.command(long, command), node.calls(long)


def test_setting_from_a_config_path_file_survives_a_crash(node: Node) -> None:
    """SystemdCgroup = true in the handler's ConfigPath file (every containerd version sends
    it): every runc command of the pod runs with the flag, even with a cgroupfs parent; and a
    daemon restarted after kill -9 keeps the settings the task was created with, without the
    file (they are stored with the task)."""
    cri = node.cri
    pod = cri.run_pod("embed-sd-path")
    cid = cri.run_container(pod, ["sleep", "1000"])
    os.unlink(node.sd_toml)
    try:
        (daemon,) = daemons(cri.ctrd)
        crash_daemon(daemon)
        wait_for(lambda: [d for d in daemons(cri.ctrd) if d.pid != daemon.pid], what="new daemon")
        assert cri.exec_sync(cid, ["true"]).exit_code == 0
        cri.stop(cid, timeout=0)
        assert cri.wait_exited(cid).exit_code == 137
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    finally:
        node.write_sd_toml()
    assert_asked(node, [pod.id, cid], systemd=True)
    assert node.command(cid, "kill") and node.command(cid, "exec")
    assert "daemon restarted after a crash" in node.daemon_log()


def test_setting_in_the_options_table(node: Node) -> None:
    """SystemdCgroup and BinaryName in the handler's options table itself: containerd 2.x
    sends the table as config_body.  containerd 1.6 sends no body (only ConfigPath), so
    there the settings never reach us: runc runs as found on PATH, with its defaults, and
    the daemon's log says so."""
    pod, cid = run_through(node, "embed-sd-body", None)
    if node.version == "1.6":
        assert node.calls(pod.id) == [] and node.calls(cid) == []
        assert "runtime options without settings" in node.daemon_log()
    else:
        assert_asked(node, [pod.id, cid], systemd=True)


def test_same_as_the_runc_shim_with_systemd_cgroup(node: Node) -> None:
    """io.containerd.runc.v2 with SystemdCgroup = true on a slice parent: runc is given the
    same cgroupsPath and the flag at create, as with ours."""
    parent = node.slice_parent()
    ours, _ = run_through(node, "embed-rec", parent)
    theirs, _ = run_through(node, "runc-sd", parent)
    for pod in (ours, theirs):
        slice_ = f"{node.cri.ctrd.cgroup_parent}-pod{pod.config.metadata.uid}.slice"
        for id in (pod.id, *pod.containers):
            (create,) = node.command(id, "create")
            assert FLAG in create["argv"], create
            assert create["cgroupsPath"] == f"{slice_}:cri-containerd:{id}", create
