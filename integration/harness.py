"""Integration-test harness: a private containerd per test, busybox rootfs/images, cleanup.

Everything a test creates lives in one short temp dir (``/tmp/esh-XXXXXXXX``): containerd
root/state/temp, the grpc + ttrpc sockets, ctr FIFOs, the runc root (for the stock runtime)
and ``EMBEDSHIM_ROOT``.  The few things containerd 1.6 puts elsewhere whatever the config
(shim sockets in ``/run/containerd/s``, cgroups, runc state when ``--runc-root`` is not given)
are derived from the task bundles and removed by :meth:`Containerd.cleanup`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from shim.util.paths import DEFAULT_ROOT as DEFAULT_DAEMON_ROOT

RUNC_RUNTIME = "io.containerd.runc.v2"
EMBED_RUNTIME = "io.containerd.embed.v1"
DEFAULT_NAMESPACE = "test"
#: ctr 1.6 sets no env at all for ``--rootfs`` containers (no image config), so runc
#: cannot resolve a bare ``sh``; :func:`ctr_run_args` passes this PATH explicitly.
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TMP_PREFIX = "esh-"
RUN_CONTAINERD = "/run/containerd"
#: containerd 1.6 shims put their sockets here, hard-coded (not under the state dir).
SHIM_SOCKET_DIR = RUN_CONTAINERD + "/s"
#: runc.v2 default runc root is ``/run/containerd/runc/<namespace>``.
DEFAULT_RUNC_ROOT = RUN_CONTAINERD + "/runc"
BUSYBOX = "/bin/busybox"
TASK_DIR = "io.containerd.runtime.v2.task"
#: containerd refuses to start (instead of running crippled) if one of these fails to load.
REQUIRED_PLUGINS = [
    "io.containerd.grpc.v1.tasks",
    "io.containerd.grpc.v1.containers",
    "io.containerd.grpc.v1.images",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.native",
    "io.containerd.runtime.v2.task",
]
START_TIMEOUT = 20.0
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
#: containerd 2.x (config version 3) splits CRI: its runtime and its images are plugins of
#: their own, configured there; the gRPC service (CRI_PLUGIN) keeps only the streaming server.
CRI_RUNTIME_PLUGIN = "io.containerd.cri.v1.runtime"
CRI_IMAGES_PLUGIN = "io.containerd.cri.v1.images"
#: Debian's containernetworking-plugins install the CNI plugins here.
CNI_BIN_DIR = "/usr/lib/cni"
_CLONE_NEWNET = 0x40000000

_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The harness itself failed (containerd did not start, a wait timed out, ...)."""


class CtrError(subprocess.CalledProcessError):
    """A ``ctr`` invocation failed; str() includes its stdout/stderr."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))!s} exited {self.returncode}\n"
            f"stdout: {self.stdout!s}\nstderr: {self.stderr!s}"
        )


# --------------------------------------------------------------------------------------
# small helpers


def containerd_version(path: str) -> tuple[int, ...]:
    """The version of the ``containerd`` found on ``path``: (1, 6, 20) for Debian's
    "containerd github.com/containerd/containerd 1.6.20~ds1 ...", (2, 2, 7) for "... v2.2.7 ..."."""
    binary = shutil.which("containerd", path=path)
    if binary is None:
        raise HarnessError(f"containerd not found on PATH={path}")
    return _binary_version(os.path.realpath(binary))


@functools.lru_cache(maxsize=8)
def _binary_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    if len(out) < 3:
        raise HarnessError(f"{binary} --version: {' '.join(out)!r}")
    numbers = out[2].lstrip("v").split("~")[0].split("-")[0].split("+")[0].split(".")
    return tuple(int(n) for n in numbers if n.isdigit())


def wait_for(
    cond: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``cond`` until it returns something truthy; return it.  Raise on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what or cond!r}")
        time.sleep(interval)


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _under(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip("/") + "/")


def _mentions(text: str, root: str) -> bool:
    """True if ``text`` contains ``root`` as a whole path (not as a prefix of another name)."""
    root = root.rstrip("/")
    start = 0
    while True:
        i = text.find(root, start)
        if i < 0:
            return False
        end = i + len(root)
        if end == len(text) or text[end] in "/\0 =:,\n\t\"'":
            return True
        start = i + 1


def mounts_under(path: str, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``path``, deepest first (a stacked mount appears twice)."""
    root = os.path.realpath(path)
    found: list[tuple[int, int, str]] = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for n, line in enumerate(lines):
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        mp = _unescape_mountinfo(fields[4])
        if _under(mp, root):
            found.append((mp.count("/"), n, mp))
    # deepest first; among equal depth the most recent mount first
    found.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [mp for _, _, mp in found]


def persistent_netns(path: str) -> str:
    """A new network namespace kept alive by a bind mount on ``path`` (its loopback up);
    ``umount_all_under`` of the parent dir ends it once no process is left in it."""
    with open(path, "a"):
        pass
    subprocess.run(["unshare", f"--net={path}", "true"], check=True, capture_output=True)
    subprocess.run(
        ["nsenter", f"--net={path}", "ip", "link", "set", "lo", "up"],
        check=True,
        capture_output=True,
    )
    return path


def _umount(path: str, flags: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), ctypes.c_int(flags)) == 0:
        return 0
    return ctypes.get_errno()


def umount_all_under(path: str) -> list[str]:
    """Unmount everything at/below ``path`` (deepest first, lazy as last resort).

    Returns the mount points that are still there (should be empty).
    """
    for _ in range(50):
        mps = mounts_under(path)
        if not mps:
            return []
        progress = False
        for mp in mps:
            err = _umount(mp)
            if err in (0, errno.EINVAL, errno.ENOENT):
                progress = progress or err == 0
                continue
            if _umount(mp, _MNT_DETACH) == 0:
                progress = True
        if not progress:
            time.sleep(0.05)
    return mounts_under(path)


def _read(path: str, binary: bool = False) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return b"" if binary else ""
    return data if binary else data.decode(errors="replace")


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


@dataclass
class ProcInfo:
    """A snapshot of one /proc/PID entry (fields empty when unreadable)."""

    pid: int
    ppid: int
    state: str
    comm: str
    starttime: int
    cmdline: list[str]
    cwd: str
    root: str
    exe: str
    _environ: list[str] | None = field(default=None, repr=False)
    _extra: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def environ(self) -> list[str]:
        if self._environ is None:
            raw: bytes = _read(f"/proc/{self.pid}/environ", binary=True)
            self._environ = [e.decode(errors="replace") for e in raw.split(b"\0") if e]
        return self._environ

    def _lazy(self, key: str) -> str:
        if key not in self._extra:
            self._extra[key] = _read(f"/proc/{self.pid}/{key}")
        return self._extra[key]

    @property
    def cgroup(self) -> str:
        """Raw /proc/PID/cgroup."""
        return self._lazy("cgroup")

    @property
    def mnt_ns(self) -> str:
        return _readlink(f"/proc/{self.pid}/ns/mnt")

    @property
    def root_mount(self) -> str:
        """The mountinfo line of ``/`` in the process's mount namespace.

        A pivoted container's /proc/PID/root reads as just ``/``, but this line names the
        rootfs (bind source path, or overlay upper/lower dirs).
        """
        for line in self._lazy("mountinfo").splitlines():
            fields = line.split(" ")
            if len(fields) > 4 and fields[4] == "/":
                return _unescape_mountinfo(line)
        return ""

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def _proc_info(pid: int) -> ProcInfo | None:
    stat_ = _read(f"/proc/{pid}/stat")
    if not stat_:
        return None
    # comm may contain spaces/parens: split at the last ')'
    lpar, rpar = stat_.find("("), stat_.rfind(")")
    rest = stat_[rpar + 2 :].split()
    if len(rest) < 20:
        return None
    raw: bytes = _read(f"/proc/{pid}/cmdline", binary=True)
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        state=rest[0],
        comm=stat_[lpar + 1 : rpar],
        starttime=int(rest[19]),
        cmdline=[a.decode(errors="replace") for a in raw.split(b"\0") if a],
        cwd=_readlink(f"/proc/{pid}/cwd"),
        root=_readlink(f"/proc/{pid}/root"),
        exe=_readlink(f"/proc/{pid}/exe"),
    )


def all_processes() -> list[ProcInfo]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = _proc_info(int(name))
            if p is not None:
                procs.append(p)
    return procs


def processes_matching(pred: Callable[[ProcInfo], bool]) -> list[ProcInfo]:
    """All live processes for which ``pred`` is true (zombies included; check ``.zombie``)."""
    out = []
    for p in all_processes():
        try:
            if pred(p):
                out.append(p)
        except OSError:
            continue
    return out


def process_refers_to(p: ProcInfo, paths: Iterable[str], cgroup_names: Iterable[str] = ()) -> bool:
    """Whether a process belongs to a harness dir: by cmdline, cwd, root, exe, environ,
    rootfs (root mount of its mount namespace) or cgroup."""
    paths = [os.path.realpath(x) for x in paths]
    texts = [*p.cmdline, p.cwd, p.root, p.exe]
    if any(_mentions(t, r) for t in texts for r in paths):
        return True
    if any(_mentions(e, r) for e in p.environ for r in paths):
        return True
    if p.mnt_ns and p.mnt_ns != _readlink("/proc/self/ns/mnt"):
        rm = p.root_mount
        if any(_mentions(rm, r) for r in paths):
            return True
    cg = p.cgroup
    return any(f":/{n}/" in cg or cg.endswith(f":/{n}") or f":/{n}\n" in cg for n in cgroup_names)


_WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}


def blocked_writing(pid: int, fd: int) -> bool:
    """Whether ``pid`` sleeps in write(2) on ``fd``: for a pipe or a pty, that it is full
    and nobody drains it (/proc/PID/syscall says "running" for a write that goes on)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    nr = _WRITE_SYSCALL[platform.machine()]
    return len(fields) > 1 and fields[0] == str(nr) and int(fields[1], 16) == fd


def _self_and_ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        info = _proc_info(pid)
        pid = info.ppid if info else 0
    return out


def _descendants(roots: set[int], procs: Sequence[ProcInfo]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = set(roots), list(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def kill_processes_referring_to(
    paths: Sequence[str], cgroup_names: Sequence[str] = (), timeout: float = 10.0
) -> list[ProcInfo]:
    """SIGKILL every process (and its descendants) belonging to ``paths``/``cgroup_names``
    until none is left.  Returns what was killed."""
    protect = _self_and_ancestors()
    killed: dict[int, ProcInfo] = {}
    deadline = time.monotonic() + timeout
    while True:
        procs = all_processes()
        by_pid = {p.pid: p for p in procs}
        owned = {p.pid for p in procs if process_refers_to(p, paths, cgroup_names)}
        victims = [
            by_pid[pid]
            for pid in _descendants(owned, procs)
            if pid in by_pid and pid not in protect and not by_pid[pid].zombie
        ]
        if not victims:
            return list(killed.values())
        if time.monotonic() > deadline:
            raise HarnessError(f"could not kill: {[(v.pid, v.cmdline) for v in victims]}")
        for v in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(v.pid, signal.SIGKILL)
            killed[v.pid] = v
        time.sleep(0.05)


def _rmtree_one_fs(path: str) -> None:
    """rm -rf that never crosses into another mount (a leftover mount is not ours to empty)."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(path)
        return

    def walk(d: str) -> None:
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev != top.st_dev:
                    raise HarnessError(f"refusing to remove across a mount: {e.path}")
                walk(e.path)
                os.rmdir(e.path)
            else:
                os.unlink(e.path)

    walk(path)
    os.rmdir(path)


def _proc_starttime(pid: int) -> int | None:
    info = _proc_info(pid)
    return info.starttime if info else None


# --------------------------------------------------------------------------------------
# ctr argument builders / parsers


#: ctr subcommands that make IO FIFOs: in /run/containerd/fifo unless told otherwise, where
#: ctr leaves a directory behind for every detached or failed process
_FIFO_COMMANDS = {("run",), ("task", "start"), ("task", "exec"), ("t", "start"), ("t", "exec"),
                  ("tasks", "start"), ("tasks", "exec")}  # fmt: skip


def with_fifo_dir(args: Sequence[str], fifo_dir: str) -> list[str]:
    """``args`` of a ctr command, with ``--fifo-dir fifo_dir`` after the subcommand if it
    makes FIFOs and names no directory (nor a ``--log-uri``) itself: a test's FIFOs stay in
    its temp dir."""
    out = list(args)
    if "--fifo-dir" in out or any(a == "--log-uri" or a.startswith("--log-uri=") for a in out):
        return out  # a directory of its own, or no FIFOs (ctr takes only one of the two)
    for words in _FIFO_COMMANDS:
        if tuple(out[: len(words)]) == words:
            return [*words, "--fifo-dir", fifo_dir, *out[len(words) :]]
    return out


def ctr_run_args(
    runtime: str,
    rootfs: str,
    cid: str,
    *cmd: str,
    detach: bool = False,
    extra: Sequence[str] = (),
    rm: bool = False,
    image: bool = False,
    fifo_dir: str | None = None,
    runc_root: str | None = None,
    cgroup: str | None = None,
) -> list[str]:
    """``run --runtime <runtime> [-d|--rm] [...] --rootfs <rootfs> <cid> <cmd...>``.

    ``--rootfs`` is a boolean flag in ctr: the rootfs dir is the first positional.  With
    ``image=True`` ``rootfs`` is an image ref instead (and the image supplies PATH).
    ``runc_root`` only applies to io.containerd.runc.v2 (ctr ignores it otherwise).
    """
    if detach and rm:
        raise ValueError("ctr run: --rm cannot be used with --detach")
    args = ["run", "--runtime", runtime]
    if detach:
        args.append("-d")
    if rm:
        args.append("--rm")
    if fifo_dir:
        args += ["--fifo-dir", fifo_dir]
    if runc_root and runtime == RUNC_RUNTIME:
        args += ["--runc-root", runc_root]
    if cgroup is not None:
        args += ["--cgroup", cgroup]
    if not image:
        args += ["--env", f"PATH={CONTAINER_PATH}"]
    args += list(extra)
    if not image:
        args.append("--rootfs")
    args += [rootfs, cid, *cmd]
    return args


def parse_table(out: str) -> list[list[str]]:
    """Rows (header dropped) of a whitespace-separated ctr table."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return [ln.split() for ln in lines[1:]]


def parse_event(line: str) -> tuple[str, str, str] | None:
    """A ``ctr events`` line (``<date> <time> +0000 UTC <ns> <topic> <payload>``) as
    ``(namespace, topic, payload)``; None for anything else."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 6 or not parts[5].startswith("/"):
        return None
    return parts[4], parts[5], parts[6] if len(parts) > 6 else ""


def task_list(ctrd: Containerd, namespace: str | None = None) -> dict[str, tuple[int, str]]:
    """``ctr task ls`` as ``{id: (pid, status)}``."""
    out = ctrd.ctr("task", "ls", namespace=namespace).stdout
    return {row[0]: (int(row[1]), row[2]) for row in parse_table(out) if len(row) >= 3}


def shim_socket_path(address: str, namespace: str, shim_id: str) -> str:
    """Where containerd 1.6 shims listen: /run/containerd/s/sha256(<address>/<ns>/<id>)."""
    digest = hashlib.sha256(os.path.join(address, namespace, shim_id).encode()).hexdigest()
    return os.path.join(SHIM_SOCKET_DIR, digest)


def shared_dirs() -> list[str]:
    """Dirs outside our temp dirs that stock shims/runc/ctr create and never remove:
    /run/containerd/{s,fifo,runc/<ns>} and the ``/<namespace>`` parent cgroups of plain
    ``ctr run`` (cgroupsPath /<ns>/<id>); and our daemons' default root, for the tests that
    run one as installed (its own directory in there it removes itself).  Deepest first."""
    dirs = [f"{RUN_CONTAINERD}/fifo", SHIM_SOCKET_DIR]
    with contextlib.suppress(OSError):
        dirs += [os.path.join(DEFAULT_RUNC_ROOT, n) for n in os.listdir(DEFAULT_RUNC_ROOT)]
    dirs += [DEFAULT_RUNC_ROOT, RUN_CONTAINERD, DEFAULT_DAEMON_ROOT]
    for mp in cgroup_mountpoints():
        dirs.append(os.path.join(mp, DEFAULT_NAMESPACE))
    return [d for d in dirs if os.path.isdir(d)]


def remove_shared_dirs(preexisting: set[str]) -> None:
    """Remove the :func:`shared_dirs` not in ``preexisting`` (what a run found), if empty:
    rmdir fails harmlessly when another run is using one."""
    for d in shared_dirs():
        if d not in preexisting:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def cgroup_mountpoints() -> list[str]:
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[:1] in (["cgroup"], ["cgroup2"]):
            out.append(_unescape_mountinfo(left.split(" ")[4]))
    return out


# --------------------------------------------------------------------------------------
# containerd


@dataclass
class _Bundle:
    namespace: str
    cid: str
    path: str
    cgroups_path: str | None


class Containerd:
    """A private containerd (root, state, sockets, config, log all in one temp dir).

    ``extra_env`` values may use ``{tmp}`` for the temp dir, e.g.
    ``{"EMBEDSHIM_ROOT": "{tmp}/embedshim"}``.
    """

    def __init__(
        self,
        *,
        cri: bool = False,
        log_level: str = "info",
        extra_env: Mapping[str, str] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        watch_paths: Sequence[str] = (),
        start: bool = True,
        tmp_dir: str | None = None,
        start_timeout: float = START_TIMEOUT,
        sandbox_image: str = "",
        netns: str | None = None,
        extra_config: str = "",
        edit_config: Callable[[str], None] | None = None,
    ) -> None:
        self.cri = cri
        #: TOML appended to the generated config (``{tmp}`` is the temp dir), e.g. more CRI
        #: runtime handlers (``[{cri_runtimes}.name]``: see :attr:`cri_runtimes`)
        self.extra_config = extra_config
        #: called with the config file's path once it is written, before containerd starts
        #: (a test of deploy/install.sh lets the installer edit it)
        self.edit_config = edit_config
        #: CRI's pause image (``sandbox_image``); must be imported before the first pod.
        self.sandbox_image = sandbox_image
        #: a persistent network namespace (bind-mounted file) containerd runs in, so CNI
        #: bridges, veths and the streaming server stay off the host's network.
        self.netns = netns
        self.log_level = log_level
        self.namespace = namespace
        self.start_timeout = start_timeout
        #: ctr's dial timeout (its default is to wait ~10 s for a dead/missing socket)
        self.connect_timeout = "3s"
        self.proc: subprocess.Popen[bytes] | None = None
        self._async: list[subprocess.Popen[str]] = []
        self._log_file: Any = None
        self._cleaned = False
        #: extra dirs whose processes (by root/cwd/cmdline) belong to this instance, e.g.
        #: the shared busybox rootfs of ``--rootfs`` containers.
        self.watch_paths: list[str] = [os.path.realpath(p) for p in watch_paths]
        if tmp_dir is None:
            tmp_dir = tempfile.mkdtemp(prefix=TMP_PREFIX, dir="/tmp")
            self._write_owner(tmp_dir)
        self.tmp = os.path.realpath(tmp_dir)
        self.root = f"{self.tmp}/root"
        self.state = f"{self.tmp}/state"
        self.temp = f"{self.tmp}/t"
        self.address = f"{self.tmp}/c.sock"
        self.ttrpc_address = self.address + ".ttrpc"
        self.config_path = f"{self.tmp}/config.toml"
        self.log_path = f"{self.tmp}/containerd.log"
        self.fifo_dir = f"{self.tmp}/fifo"
        self.runc_root = f"{self.tmp}/runc"
        self.embedshim_root = f"{self.tmp}/embedshim"
        #: CRI's CNI configuration dir (the CRI suite writes its network config there)
        self.cni_conf_dir = f"{self.tmp}/cni/net.d"
        #: cgroup parent used by :meth:`run_args` (unique, so concurrent instances using
        #: the same namespace/container ids never share a cgroup).
        self.cgroup_parent = os.path.basename(self.tmp)
        if len(self.ttrpc_address) >= 100:
            raise HarnessError(f"socket path too long: {self.ttrpc_address}")
        self.env = self._make_env(extra_env or {})
        #: of the containerd on the PATH of ``extra_env`` (Debian's 1.6, or a 2.x first there)
        self.version = containerd_version(self.env["PATH"])
        if start:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise

    # -- setup ----------------------------------------------------------------------

    @staticmethod
    def _write_owner(tmp: str) -> None:
        with open(os.path.join(tmp, "owner"), "w") as f:
            f.write(f"{os.getpid()} {_proc_starttime(os.getpid())}\n")

    def _make_env(self, extra: Mapping[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CONTAINERD_", "NOTIFY_SOCKET")) and k != "TTRPC_ADDRESS"
        }
        venv_bin = os.path.join(sys.prefix, "bin")
        rest = [p for p in env.get("PATH", _SYSTEM_PATH).split(":") if p and p != venv_bin]
        for p in _SYSTEM_PATH.split(":"):
            if p not in rest:
                rest.append(p)
        env["PATH"] = ":".join([venv_bin, *rest])
        env["TMPDIR"] = self.temp
        env.pop("XDG_RUNTIME_DIR", None)
        for k, v in extra.items():
            env[k] = v.replace("{tmp}", self.tmp)
        return env

    def config_toml(self) -> str:
        disabled = [
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            # NB: "io.containerd.runtime.v1.linux" must stay: the 1.6 tasks service
            # requires a v1 runtime plugin and silently does not load without it.
            # would create /opt/containerd
            "io.containerd.internal.v1.opt",
        ]
        v3 = self.version >= (2,)  # containerd 2.x: config version 3, its plugin names
        if v3:
            disabled.append("io.containerd.nri.v1.nri")  # would listen on /var/run/nri/nri.sock
        cri_plugins = [CRI_PLUGIN, CRI_RUNTIME_PLUGIN, CRI_IMAGES_PLUGIN] if v3 else [CRI_PLUGIN]
        required = list(REQUIRED_PLUGINS)
        if self.cri:
            required += cri_plugins
        else:
            disabled += cri_plugins
        monitor = (
            "io.containerd.monitor.task.v1.cgroups" if v3 else "io.containerd.monitor.v1.cgroups"
        )
        lines = [
            f"version = {3 if v3 else 2}",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            f'temp = "{self.temp}"',
            "oom_score = 0",
            f"disabled_plugins = {json.dumps(disabled)}",
            f"required_plugins = {json.dumps(required)}",
            "",
            "[grpc]",
            f'  address = "{self.address}"',
            "",
            "[ttrpc]",
            '  address = ""',
            "",
            "[debug]",
            '  address = ""',
            f'  level = "{self.log_level}"',
            "",
            f'[plugins."{monitor}"]',
            "  no_prometheus = false",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{self.tmp}/opt"',
            "",
        ]
        if self.cri:
            lines += self._cri_toml_v3() if v3 else self._cri_toml_v2()
        if self.extra_config:
            extra = self.extra_config.replace("{tmp}", self.tmp)
            lines.append(extra.replace("{cri_runtimes}", self.cri_runtimes))
        return "\n".join(lines)

    @property
    def cri_runtimes(self) -> str:
        """The TOML table of CRI's runtime handlers in this containerd's config version
        (``{cri_runtimes}`` in ``extra_config``)."""
        plugin = CRI_RUNTIME_PLUGIN if self.version >= (2,) else CRI_PLUGIN
        return f'plugins."{plugin}".containerd.runtimes'

    def _cri_toml_v2(self) -> list[str]:
        """CRI's configuration for containerd 1.6/1.7 (config version 2): all in one plugin."""
        return [
            '[plugins."io.containerd.grpc.v1.cri"]',
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            # no CAP_SYS_RESOURCE here: containers may not lower their oom_score_adj
            "  restrict_oom_score_adj = true",
            # pod netns under the state dir (not /var/run/netns): cleanup finds them
            "  netns_mounts_under_state_dir = true",
            "  enable_selinux = false",
            *([f'  sandbox_image = "{self.sandbox_image}"'] if self.sandbox_image else []),
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f'  bin_dir = "{CNI_BIN_DIR}"',
            f'  conf_dir = "{self.cni_conf_dir}"',
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            '  snapshotter = "overlayfs"',
            '  default_runtime_name = "runc"',
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
            f'  runtime_type = "{RUNC_RUNTIME}"',
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
            f'  Root = "{self.runc_root}"',
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.embed]',
            f'  runtime_type = "{EMBED_RUNTIME}"',
            "",
        ]

    def _cri_toml_v3(self) -> list[str]:
        """The same for containerd 2.x (config version 3): the streaming server stays with the
        gRPC plugin, images (the pause image among them) and runtimes have plugins of their
        own."""
        runtime = f'[plugins."{CRI_RUNTIME_PLUGIN}"'
        return [
            f'[plugins."{CRI_PLUGIN}"]',
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f'[plugins."{CRI_IMAGES_PLUGIN}"]',
            '  snapshotter = "overlayfs"',
            *(
                [
                    f'[plugins."{CRI_IMAGES_PLUGIN}".pinned_images]',
                    f'  sandbox = "{self.sandbox_image}"',
                ]
                if self.sandbox_image
                else []
            ),
            f"{runtime}]",
            "  restrict_oom_score_adj = true",
            "  netns_mounts_under_state_dir = true",
            "  enable_selinux = false",
            f"{runtime}.cni]",
            f'  bin_dirs = ["{CNI_BIN_DIR}"]',
            f'  conf_dir = "{self.cni_conf_dir}"',
            f"{runtime}.containerd]",
            '  default_runtime_name = "runc"',
            f"{runtime}.containerd.runtimes.runc]",
            f'  runtime_type = "{RUNC_RUNTIME}"',
            f"{runtime}.containerd.runtimes.runc.options]",
            f'  Root = "{self.runc_root}"',
            f"{runtime}.containerd.runtimes.embed]",
            f'  runtime_type = "{EMBED_RUNTIME}"',
            # ours again, with the Sandbox API (no pause container): containerd 2.x only
            f"{runtime}.containerd.runtimes.embed-shim]",
            f'  runtime_type = "{EMBED_RUNTIME}"',
            '  sandboxer = "shim"',
            "",
        ]

    def _preexec(self) -> None:  # pragma: no cover - runs in the child
        # containerd dies with the test runner (shims outlive it by design; cleanup/reap)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if self.netns is not None:
            fd = os.open(self.netns, os.O_RDONLY)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                os._exit(121)
            os.close(fd)

    def start(self) -> None:
        """Start containerd (again) on this instance's dirs and wait until it answers."""
        if self.running:
            return
        for d in (self.root, self.state, self.temp, self.fifo_dir):
            os.makedirs(d, exist_ok=True)
        if self.cri:
            os.makedirs(self.cni_conf_dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(self.config_toml())
        if self.edit_config is not None:
            self.edit_config(self.config_path)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["containerd", "--config", self.config_path],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.tmp,
            start_new_session=True,
            preexec_fn=self._preexec,
        )
        deadline = t0 + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"containerd exited with {self.proc.returncode} during startup\n"
                    + self.log_tail()
                )
            # ctr blocks ~10 s dialing a socket that does not exist yet: wait for it first
            if os.path.exists(self.address):
                try:
                    r = self.ctr("version", check=False, timeout=5)
                    if r.returncode == 0 and "Server:" in r.stdout:
                        break
                except subprocess.TimeoutExpired:
                    pass
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"containerd did not answer within {self.start_timeout}s\n" + self.log_tail()
                )
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc else None

    def log_tail(self, lines: int = 40) -> str:
        text: str = _read(self.log_path)
        return "--- containerd log tail ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- ctr ------------------------------------------------------------------------

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return [
            "ctr",
            "--address",
            self.address,
            "--connect-timeout",
            self.connect_timeout,
            "--namespace",
            namespace or self.namespace,
            *with_fifo_dir(args, self.fifo_dir),
        ]

    def _ctr_env(self) -> dict[str, str]:
        return {k: v for k, v in self.env.items() if not k.startswith("CONTAINERD_")}

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <sock> --namespace <ns> <args>`` and capture its output."""
        argv = self.ctr_argv(*args, namespace=namespace)
        r = subprocess.run(
            argv,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._ctr_env(),
        )
        if check and r.returncode != 0:
            raise CtrError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def ctr_async(
        self, *args: str, namespace: str | None = None, **popen_kw: Any
    ) -> subprocess.Popen[str]:
        """Start ``ctr <args>`` in the background (stdout/stderr piped, text mode).

        The process is killed and reaped by :meth:`cleanup` if still running.
        """
        kw: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "stdout": subprocess.PIPE,
            "stderr": subprocess.PIPE,
            "text": True,
            "env": self._ctr_env(),
        }
        kw.update(popen_kw)
        p: subprocess.Popen[str] = subprocess.Popen(self.ctr_argv(*args, namespace=namespace), **kw)
        self._async.append(p)
        return p

    def run_args(
        self,
        runtime: str,
        rootfs: str,
        cid: str,
        *cmd: str,
        detach: bool = False,
        extra: Sequence[str] = (),
        rm: bool = False,
        image: bool = False,
    ) -> list[str]:
        """:func:`ctr_run_args` confined to this instance: FIFOs and (runc.v2) runc state in
        the temp dir, cgroup ``/<cgroup_parent>/<cid>``."""
        return ctr_run_args(
            runtime,
            rootfs,
            cid,
            *cmd,
            detach=detach,
            extra=extra,
            rm=rm,
            image=image,
            fifo_dir=self.fifo_dir,
            runc_root=self.runc_root,
            cgroup=self.cgroup_path(cid),
        )

    def cgroup_path(self, cid: str) -> str:
        return f"/{self.cgroup_parent}/{cid}"

    def run(
        self,
        runtime: str,
        rootfs: str,
        cid: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 60,
        **kw: Any,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run`` via :meth:`run_args`."""
        return self.ctr(
            *self.run_args(runtime, rootfs, cid, *cmd, **kw), check=check, timeout=timeout
        )

    # -- lifecycle ------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM containerd, wait, SIGKILL.  Shims keep running (as with the real daemon)."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.proc = None

    def kill9(self) -> None:
        """SIGKILL containerd (no chance to clean up), reap it."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        p.wait()
        self.proc = None

    def restart(self) -> None:
        """Stop containerd if running, start it again on the same dirs."""
        self.stop()
        self.start()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- cleanup --------------------------------------------------------------------

    def _bundles(self) -> list[_Bundle]:
        out = []
        base = os.path.join(self.state, TASK_DIR)
        with contextlib.suppress(OSError):
            for ns in os.listdir(base):
                with contextlib.suppress(OSError):
                    for cid in os.listdir(os.path.join(base, ns)):
                        path = os.path.join(base, ns, cid)
                        cg = None
                        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                            with open(os.path.join(path, "config.json")) as f:
                                cg = json.load(f)["linux"].get("cgroupsPath")
                        out.append(_Bundle(ns, cid, path, cg))
        return out

    def _ctr_teardown(self) -> None:
        """Kill/delete every task, container, image and snapshot in every namespace."""

        def ctr(*args: str, ns: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
            try:
                return self.ctr(*args, check=False, timeout=timeout, namespace=ns)
            except subprocess.TimeoutExpired:
                return subprocess.CompletedProcess(list(args), 1, "", "timeout")

        def ids(*args: str, ns: str) -> list[str]:
            return ctr(*args, ns=ns).stdout.split()

        for ns in ids("namespaces", "ls", "-q", ns=self.namespace):
            tasks = ids("tasks", "ls", "-q", ns=ns)
            for t in tasks:
                if ctr("tasks", "kill", "-a", "-s", "KILL", t, ns=ns).returncode:
                    ctr("tasks", "kill", "-s", "KILL", t, ns=ns)
            if tasks:

                def stopped(ns: str = ns) -> bool:
                    return all(st != "RUNNING" for _, st in task_list(self, ns).values())

                with contextlib.suppress(HarnessError, CtrError, subprocess.TimeoutExpired):
                    wait_for(stopped, timeout=5, what="tasks to stop")
                ctr("tasks", "delete", "-f", *tasks, ns=ns)
            containers = ids("containers", "ls", "-q", ns=ns)
            if containers:
                ctr("containers", "delete", *containers, ns=ns)
            images = ids("images", "ls", "-q", ns=ns)
            if images:
                ctr("images", "rm", "--sync", *images, ns=ns)
            for sn in ("overlayfs", "native"):
                for _ in range(5):
                    rows = parse_table(ctr("snapshots", "--snapshotter", sn, "ls", ns=ns).stdout)
                    keys = [r[0] for r in rows]
                    if not keys:
                        break
                    parents = {r[1] for r in rows if len(r) > 2}
                    leaves = [k for k in keys if k not in parents] or keys
                    ctr("snapshots", "--snapshotter", sn, "rm", *leaves, ns=ns)

    def _remove_outside_state(self, bundles: list[_Bundle]) -> None:
        """What lives outside the temp dir: shim sockets, runc state (default root),
        cgroups."""
        cg_mps = cgroup_mountpoints()
        cg_paths: set[str] = set()
        for b in bundles:
            for suffix in ("", ".debug"):
                sock = shim_socket_path(self.address, b.namespace, b.cid) + suffix
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(sock).st_mode):
                        os.unlink(sock)
            sdir = os.path.join(DEFAULT_RUNC_ROOT, b.namespace, b.cid)
            with contextlib.suppress(OSError, ValueError, TypeError):
                with open(os.path.join(sdir, "state.json")) as f:
                    labels = json.load(f).get("config", {}).get("labels", []) or []
                if any(
                    _mentions(label, self.tmp) for label in labels if label.startswith("bundle=")
                ):
                    shutil.rmtree(sdir, ignore_errors=True)
            if b.cgroups_path and ":" not in b.cgroups_path:
                cg_paths.add("/" + b.cgroups_path.strip("/"))
        # children before parents; rmdir only succeeds on empty, process-free cgroups
        cg_paths.add("/" + self.cgroup_parent)
        for path in sorted(cg_paths, key=lambda p: p.count("/"), reverse=True):
            for mp in cg_mps:
                with contextlib.suppress(OSError):
                    os.rmdir(mp + path)
        for mp in cg_mps:
            d = os.path.join(mp, self.cgroup_parent)
            if os.path.isdir(d):
                for sub, _dirs, _files in sorted(os.walk(d), key=lambda t: -len(t[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(sub)

    def leftovers(self) -> dict[str, list[str]]:
        """Processes, mounts, files of this instance still present (empty after cleanup)."""
        mine = _self_and_ancestors()
        procs = processes_matching(
            lambda p: (
                not p.zombie
                and p.pid not in mine
                and process_refers_to(p, [self.tmp], [self.cgroup_parent])
            )
        )
        return {
            "processes": [f"{p.pid} {' '.join(p.cmdline) or p.comm}" for p in procs],
            "mounts": mounts_under(self.tmp),
            "files": [self.tmp] if os.path.lexists(self.tmp) else [],
            "cgroups": [
                os.path.join(mp, self.cgroup_parent)
                for mp in cgroup_mountpoints()
                if os.path.isdir(os.path.join(mp, self.cgroup_parent))
            ],
        }

    def cleanup(self) -> None:
        """Leave nothing behind: tasks, containerd, shims, container processes, mounts, runc
        state, shim sockets, cgroups, the temp dir.  Idempotent; safe after a partial start."""
        if self._cleaned:
            return
        errors: list[str] = []
        bundles = self._bundles()
        if self.running:
            try:
                self._ctr_teardown()
            except Exception as e:  # keep going: the rest does not need containerd
                errors.append(f"ctr teardown: {e!r}")
        self.stop()
        for p in self._async:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.communicate(timeout=5)
        self._async.clear()
        try:
            kill_processes_referring_to([self.tmp, *self.watch_paths], [self.cgroup_parent])
        except HarnessError as e:
            errors.append(str(e))
        left = umount_all_under(self.tmp)
        if left:
            errors.append(f"still mounted: {left}")
        try:
            self._remove_outside_state(bundles)
        except Exception as e:
            errors.append(f"outside state: {e!r}")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if not left:
            try:
                _rmtree_one_fs(self.tmp)
            except OSError as e:
                errors.append(f"rm -rf {self.tmp}: {e!r}")
        self._cleaned = True
        if errors:
            raise HarnessError("cleanup incomplete:\n" + "\n".join(errors))


def reap_stale(prefix: str = "/tmp/" + TMP_PREFIX) -> list[str]:
    """Clean up temp dirs of harness instances whose owning process is gone (a test run
    that was SIGKILLed).  Dirs of live runs (other engineers' sessions) are left alone."""
    reaped = []
    parent, base = os.path.split(prefix)
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(base) or not os.path.isdir(path):
            continue
        owner: str = _read(os.path.join(path, "owner"))
        try:
            pid_s, start_s = owner.split()
            alive = _proc_starttime(int(pid_s)) == int(start_s)
        except ValueError:
            continue  # no owner file: not provably ours
        if not alive:
            with contextlib.suppress(HarnessError):
                Containerd(tmp_dir=path, start=False).cleanup()
            reaped.append(path)
    return reaped


# --------------------------------------------------------------------------------------
# rootfs and images


_ROOTFS_MARKER = ".esh-busybox-rootfs"


def busybox_rootfs(dest: str, busybox: str = BUSYBOX) -> str:
    """Build (once; idempotent) a minimal rootfs at ``dest`` from a static busybox."""
    dest = os.path.realpath(dest)
    if os.path.exists(os.path.join(dest, _ROOTFS_MARKER)):
        return dest
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "run"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    for d in ("tmp", "var/tmp"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
        os.chmod(os.path.join(dest, d), 0o1777)
    shutil.copy2(busybox, os.path.join(dest, "bin/busybox"))
    os.chmod(os.path.join(dest, "bin/busybox"), 0o755)
    for a in applets:
        if a in ("busybox", "") or "/" in a:
            continue
        link = os.path.join(dest, "bin", a)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
        "etc/hostname": "busybox\n",
        "etc/hosts": "127.0.0.1 localhost\n",
        "etc/resolv.conf": "",
    }
    for rel, content in files.items():
        with open(os.path.join(dest, rel), "w") as f:
            f.write(content)
    with open(os.path.join(dest, _ROOTFS_MARKER), "w") as f:
        f.write("ok\n")
    return dest


def _oci_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def _tar_filter(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


_LAYERS: dict[str, tuple[bytes, bytes]] = {}


def _layer(rootfs: str) -> tuple[bytes, bytes]:
    """(uncompressed tar, tar.gz) of ``rootfs``; cached per path for the process."""
    if rootfs not in _LAYERS:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(os.listdir(rootfs)):
                if name != _ROOTFS_MARKER:
                    tar.add(os.path.join(rootfs, name), arcname=name, filter=_tar_filter)
        raw = buf.getvalue()
        gz = io.BytesIO()
        with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=1) as g:
            g.write(raw)
        _LAYERS[rootfs] = (raw, gz.getvalue())
    return _LAYERS[rootfs]


def build_busybox_oci_archive(
    rootfs: str,
    ref: str,
    out: str,
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = ("sh",),
) -> str:
    """Write an OCI image-layout tarball (one gzip layer) of ``rootfs`` to ``out``; the image
    config runs ``entrypoint + cmd`` (what CRI runs when a container names no command)."""
    raw, layer = _layer(os.path.realpath(rootfs))
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    arch = _oci_arch()
    config = json.dumps(
        {
            "created": "1970-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": [f"PATH={CONTAINER_PATH}"],
                **({"Entrypoint": list(entrypoint)} if entrypoint else {}),
                "Cmd": list(cmd),
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "embedshim harness"}],
        },
        sort_keys=True,
    ).encode()
    cfg_d, _ = blob(config)
    layer_d, _ = blob(layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cfg_d,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_d,
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    man_d, _ = blob(manifest)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man_d,
                    "size": len(manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref,
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    members = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", index),
        (f"blobs/sha256/{cfg_d[7:]}", config),
        (f"blobs/sha256/{layer_d[7:]}", layer),
        (f"blobs/sha256/{man_d[7:]}", manifest),
    ]
    with tarfile.open(out, "w") as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
    return out


DEFAULT_IMAGE = "docker.io/library/esh-busybox:latest"


def import_busybox_image(
    ctrd: Containerd,
    ref: str = DEFAULT_IMAGE,
    rootfs: str | None = None,
    *,
    namespace: str | None = None,
    entrypoint: Sequence[str] = (),
    cmd: Sequence[str] = ("sh",),
) -> str:
    """Import a busybox image (built offline) into ``ctrd`` as ``ref``; return ``ref``."""
    if rootfs is None:
        rootfs = busybox_rootfs(os.path.join(ctrd.tmp, "bb"))
    archive = build_busybox_oci_archive(
        rootfs,
        ref,
        os.path.join(ctrd.tmp, f"image-{hashlib.sha256(ref.encode()).hexdigest()[:12]}.tar"),
        entrypoint=entrypoint,
        cmd=cmd,
    )
    try:
        ctrd.ctr("images", "import", archive, timeout=120, namespace=namespace)
    finally:
        os.unlink(archive)
    names = ctrd.ctr("images", "ls", "-q", namespace=namespace).stdout.split()
    if ref not in names:
        raise HarnessError(f"import of {ref} produced images {names}")
    return ref
