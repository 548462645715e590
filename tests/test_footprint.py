"""The daemon's memory (issue 14: its PSS at 100 containers within a tenth of runc-v2's
shims'): what keeps it small stays in place.

The bench measures the figure itself (``make bench``, memory phase); these catch the two
regressions that cost most and are cheap to see: a module made lazy coming back into the
daemon's import set, and a task keeping its whole parsed OCI spec.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shim.oci.bundle import Bundle
from shim.oci.runcoptions import RuncOptions, for_bundle
from shim.watch.watchevents import tags_from_annotations

REPO = str(Path(__file__).resolve().parents[1])

#: Imported only on the rare paths that use them (each line says where), not by the daemon
#: at start nor for a container with plain-path stdio.
LAZY = (
    "urllib.parse",  # shim.io.stdio._urlparse, shim.io.logbinary: scheme:// stdio
    "ipaddress",  # by urllib.parse
    "shutil",  # shim.pods.podfiles: pod sandboxes
    "bz2",  # by shutil
    "lzma",  # by shutil
    "platform",  # nowhere: os.uname().machine
    "base64",  # reload (shim.cmd.daemon, shim.ttrpc.handoff, shim.io.ptycopy)
    "shim.oci.metrics",  # Stats
    "shim.api.cgroups_v1_metrics_pb2",
    "shim.api.cgroups_v2_metrics_pb2",
    "ssl",  # never: shim.cmd.cli keeps asyncio from loading it
)

_DAEMON_IMPORTS = """
import sys
sys.path.insert(0, {repo!r})
from shim.cmd.flags import enable_site
enable_site()
sys.modules.setdefault("ssl", None)  # as shim.cmd.cli does for the daemon
import shim.cmd.daemon
from shim.exits import libbpf
from shim.io import stdio
from shim.util import packaged
try:
    libbpf.lib()  # the daemon loads it (and installs its log callback) at start
except libbpf.BPFError:
    pass
stdio.Stdio(stdin="/run/x/in", stdout="/run/x/out", stderr="/run/x/err").check()
print([m for m in {lazy!r} if sys.modules.get(m) is not None])
"""


def test_daemon_leaves_rare_path_modules_unimported() -> None:
    """As ``shim.cmd.cli`` starts the daemon (``python -S -E``, then site, no ssl)."""
    code = _DAEMON_IMPORTS.format(repo=REPO, lazy=LAZY)
    r = subprocess.run(
        [sys.executable, "-S", "-E", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"imported by the daemon: {r.stdout.strip()}"


def _spec(namespaces: list[dict[str, str]], cgroups_path: str) -> dict[str, object]:
    """A config.json as containerd writes it, trimmed to a few entries of each kind."""
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sleep", "100000"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]},
        },
        "root": {"path": "rootfs"},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "annotations": {
            "io.kubernetes.cri.sandbox-name": "web-0",
            "io.kubernetes.cri.sandbox-namespace": "shop",
            "io.kubernetes.cri.container-name": "nginx",
        },
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": cgroups_path,
            "namespaces": namespaces,
            "maskedPaths": ["/proc/kcore"],
        },
    }


def _load(tmp_path: Path, spec: dict[str, object]) -> Bundle:
    (tmp_path / "config.json").write_text(json.dumps(spec))
    return Bundle.load(str(tmp_path))


def test_bundle_keeps_what_is_read_after_create_and_nothing_else(tmp_path: Path) -> None:
    """Each reader of a loaded bundle's config gets what the whole spec would give it."""
    private = [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}, {"type": "ipc"}]
    spec = _spec(private, "kubepods-besteffort.slice:cri-containerd:abc")
    b = _load(tmp_path, spec)
    assert b.config == {
        "linux": {"cgroupsPath": spec["linux"]["cgroupsPath"], "namespaces": [{"type": "pid"}]},  # type: ignore[index]
        "annotations": spec["annotations"],
    }
    assert b.has_private_pid_namespace()
    assert for_bundle(RuncOptions(), b.config) == for_bundle(RuncOptions(), spec)
    assert for_bundle(RuncOptions(), b.config)[1]  # systemd's slice:prefix:name form
    assert tags_from_annotations("k8s.io", "c1", b.config.get("annotations")) == {
        "namespace": "k8s.io",
        "container_id": "c1",
        "pod": "web-0",
        "pod_namespace": "shop",
        "container": "nginx",
    }
    # A pid namespace joined by path (a pod's), or none at all: not private.
    joined = _load(tmp_path, _spec([{"type": "pid", "path": "/proc/1/ns/pid"}], "/c1"))
    assert not joined.has_private_pid_namespace()
    assert for_bundle(RuncOptions(), joined.config) == (RuncOptions(), False)
    assert not _load(tmp_path, _spec([{"type": "mount"}], "/c1")).has_private_pid_namespace()
    # No linux section, no annotations (a minimal spec): nothing to keep, nothing breaks.
    bare = _load(tmp_path, {"root": {"path": "rootfs"}})
    assert bare.config == {} and not bare.has_private_pid_namespace()
    assert tags_from_annotations("default", "c1", bare.config.get("annotations")) == {
        "namespace": "default",
        "container_id": "c1",
    }
