"""``python -m shim.cmd.setupcheck``: the last step of ``make setup``.  Idempotent.

0. Puts the fast launcher (``shim.cmd.launcher``: Python without ``site``) in place of pip's
   console script, which ``pip install`` may have just written again.
1. As root, links ``/usr/local/bin/containerd-shim-embed-v1`` to this environment's console
   script, so a containerd with the usual PATH finds the binary for io.containerd.embed.v1.
   A symlink that points elsewhere (stale, or another checkout) is replaced; a file that is
   not ours is left alone, with a warning.
2. As root, mounts bpffs at /sys/fs/bpf if nothing is mounted there (the exit tracker pins
   its BPF program and maps under it).
3. Prints what is present: runc, containerd, ctr, BTF, bpffs, libbpf.so.1.

Exits non-zero only if runc or containerd is missing: everything else is optional or can be
fixed later, and must not fail the build.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass

from shim.cmd import launcher

NAME = "containerd-shim-embed-v1"
LINK = "/usr/local/bin/" + NAME
BPFFS = "/sys/fs/bpf"
BTF = "/sys/kernel/btf/vmlinux"
LIBBPF = "libbpf.so.1"
#: make may run with a user's PATH without the sbin dirs (runc lives in /usr/sbin).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: What every console script of this package contains (see pyproject.toml [project.scripts]).
_OUR_MARK = b"from shim.cmd.cli import main"
MIN_KERNEL = (5, 8)


@dataclass
class Result:
    ok: bool  # False: a warning to print
    text: str


def console_script() -> str:
    """This environment's ``containerd-shim-embed-v1`` (the venv's bin dir)."""
    return os.path.join(sysconfig.get_path("scripts"), NAME)


def is_ours(path: str) -> bool:
    """Whether ``path`` (followed) is a console script of this package, or the C entry point
    the launcher installs with such a script beside it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x7fELF"):
        return is_ours(launcher.python_entry(os.path.realpath(path)))
    return head.startswith(b"#!") and _OUR_MARK in head


def _symlink_atomically(target: str, link: str) -> None:
    tmp = f"{link}.tmp-{os.getpid()}"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        os.unlink(tmp)
        raise


def ensure_link(link: str, target: str, *, root: bool) -> Result:
    """Make ``link`` a symlink to ``target`` unless something that is not ours is there."""
    if not os.access(target, os.X_OK):
        return Result(False, f"{target} is missing: is the package installed in this venv?")
    if not root:
        return Result(False, f"not root: {link} not linked (containerd needs {NAME} on PATH)")
    try:
        if os.path.islink(link):
            current = os.readlink(link)
            if current == target:
                return Result(True, f"{link} -> {target}")
            # Dangling, or another checkout's script: ours to replace.  A link to anything
            # else was made by someone else.
            if os.path.exists(link) and not is_ours(link):
                return Result(False, f"{link} -> {current} is not embedshim's; left alone")
            _symlink_atomically(target, link)
            return Result(True, f"{link} -> {target} (was -> {current})")
        if os.path.lexists(link):
            if os.path.isfile(link) and is_ours(link):
                _symlink_atomically(target, link)
                return Result(True, f"{link} -> {target} (replaced an installed copy)")
            return Result(False, f"{link} exists and is not embedshim's; left alone")
        os.makedirs(os.path.dirname(link), exist_ok=True)
        _symlink_atomically(target, link)
        return Result(True, f"{link} -> {target} (created)")
    except OSError as exc:
        return Result(False, f"cannot link {link}: {exc}")


def ensure_bpffs(mountpoint: str = BPFFS, *, root: bool) -> Result:
    from shim.exits import libbpf

    try:
        if libbpf.is_bpffs(mountpoint):
            return Result(True, f"bpffs mounted at {mountpoint}")
        if not root:
            return Result(False, f"bpffs not mounted at {mountpoint} (not root: left alone)")
        libbpf.ensure_bpffs(mountpoint)
    except OSError as exc:
        return Result(False, f"bpffs not mounted at {mountpoint}: {exc}")
    return Result(True, f"bpffs mounted at {mountpoint} (mounted now)")


def which(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    for d in SYSTEM_PATH.split(":"):
        if d not in path.split(":"):
            path += ":" + d
    return shutil.which(name, path=path)


def _version(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def have_libbpf() -> bool:
    import ctypes

    try:
        ctypes.CDLL(LIBBPF)
    except OSError:
        return False
    return True


def kernel_version() -> tuple[int, ...]:
    parts = []
    for p in platform.release().split("-")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m shim.cmd.setupcheck", description="The last step of make setup."
    )
    ap.add_argument("--link", default=LINK, help=f"where to link {NAME} (default {LINK})")
    ap.add_argument("--bpffs", default=BPFFS, help=f"bpffs mount point (default {BPFFS})")
    args = ap.parse_args(argv)
    root = os.geteuid() == 0
    rows: list[tuple[str, Result]] = [
        ("launcher", Result(*launcher.install(console_script()))),
        ("shim", ensure_link(args.link, console_script(), root=root)),
    ]
    fatal = []
    for tool, version_argv in (
        ("runc", ["--version"]),
        ("containerd", ["--version"]),
        ("ctr", None),
    ):
        path = which(tool)
        if path is None:
            rows.append((tool, Result(False, "missing")))
            if tool != "ctr":
                fatal.append(tool)
            continue
        version = _version([path, *version_argv]) if version_argv else ""
        rows.append((tool, Result(True, f"{path}{'  (' + version + ')' if version else ''}")))
    kernel = kernel_version()
    rows.append(
        (
            "kernel",
            Result(
                kernel >= MIN_KERNEL,
                platform.release()
                + ("" if kernel >= MIN_KERNEL else f" (needs >= {'.'.join(map(str, MIN_KERNEL))})"),
            ),
        )
    )
    has_btf = os.path.exists(BTF)
    rows.append(("BTF", Result(has_btf, BTF if has_btf else f"{BTF} missing (no CO-RE)")))
    rows.append(("bpffs", ensure_bpffs(args.bpffs, root=root)))
    rows.append((LIBBPF, Result(True, "present") if have_libbpf() else Result(False, "missing")))
    from shim.cmd.start import keeper_binary

    keeper = keeper_binary()
    missing = Result(False, "not built (make keeper): no crash survival")
    rows.append(("keeper", Result(True, keeper) if keeper else missing))
    width = max(len(k) for k, _ in rows)
    print("embedshim setup check:")
    for key, res in rows:
        print(f"  {'ok  ' if res.ok else 'WARN'} {key:<{width}}  {res.text}")
    if fatal:
        print(f"embedshim needs {' and '.join(fatal)}: apt-get install {' '.join(fatal)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
