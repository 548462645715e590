"""Prerequisites of a test run: what is missing is a skip on a developer's machine, and a
failure when ``CI`` is set (the root ``conftest.py`` turns such a skip into a failure), so
that a CI machine without root, containerd, runc or BTF cannot pass by skipping."""

from __future__ import annotations

import os
import shutil

#: Every skip for a missing prerequisite starts with this (the root conftest looks for it).
PREFIX = "missing prerequisite: "


def in_ci() -> bool:
    """Whether ``CI`` is set (to anything but an empty, 0, false or no value)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> str:
    """A skip reason for a missing prerequisite (a failure in CI)."""
    return PREFIX + reason


def bpf_problem() -> str | None:
    """Why BPF exit tracking cannot be expected here (None: root, BTF and libbpf are here,
    and bpffs is mounted or root can mount it, so the daemon must run with it)."""
    if os.geteuid() != 0:
        return "not root (BPF exit tracking loads and pins a BPF program)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF: /sys/kernel/btf/vmlinux missing"
    from shim.exits import libbpf

    try:
        libbpf.lib()
    except libbpf.BPFError as exc:
        return f"libbpf unusable: {exc}"
    return None


def integration_problem(required: tuple[str, ...]) -> str | None:
    """Why the integration suite cannot run here (root, the ``required`` binaries on PATH,
    a static busybox)."""
    if os.geteuid() != 0:
        return "integration tests need root (containerd, runc, mounts, cgroups)"
    absent = [b for b in required if shutil.which(b) is None]
    if absent:
        return f"integration tests need {', '.join(absent)} on PATH"
    if not os.access("/bin/busybox", os.X_OK):
        return "integration tests need a static /bin/busybox (busybox-static)"
    return None
