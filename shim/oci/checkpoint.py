"""Checkpoint and restore: the CRIU options, and whether CRIU can run here at all.

runc does the work (``runc checkpoint`` and ``runc restore`` drive CRIU).  Before either, the
daemon runs ``criu check``: CRIU probes the kernel when it starts, and where it cannot (a
kernel it does not know, a missing feature) runc only says "criu failed".  So a checkpoint
or a restore that cannot work fails at once with FailedPrecondition and CRIU's own reason,
and touches nothing: the container keeps running.

The rest follows containerd's runc shim: the image goes to the request's path (or the
options' ``image_path``), CRIU's work files to the options' ``work_path`` (kept) or to
``criu-work`` in the bundle (removed after), ``exit`` leaves the container stopped (no
``--leave-running``), and CRIU's dump log is copied to ``criu-dump.log`` in the bundle when
a checkpoint fails.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

from shim.api import runc_options_pb2
from shim.exits.reaper import Reaper
from shim.oci.runc import execute, find_executable
from shim.util import errors

CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"
CRIU_CHECK_TIMEOUT = 30.0
DEFAULT_CRIU = "criu"
WORK_DIR = "criu-work"
DUMP_LOG = "criu-dump.log"


@dataclass
class CheckpointOptions:
    """containerd.runc.v1.CheckpointOptions, as the Checkpoint request carries them."""

    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: list[str] = field(default_factory=list)
    cgroups_mode: str = ""
    image_path: str = ""
    work_path: str = ""


def decode_options(type_url: str, value: bytes) -> CheckpointOptions:
    """The request's options; none means the defaults, another type is refused."""
    if not type_url:
        return CheckpointOptions()
    if type_url.rsplit("/", 1)[-1] != CHECKPOINT_OPTIONS:
        raise errors.invalid(f"checkpoint options: unsupported type {type_url!r}")
    msg = runc_options_pb2.CheckpointOptions()
    try:
        msg.ParseFromString(value)
    except Exception as exc:
        raise errors.invalid(f"checkpoint options: bad {CHECKPOINT_OPTIONS}: {exc}") from None
    return CheckpointOptions(
        exit=msg.exit,
        open_tcp=msg.open_tcp,
        external_unix_sockets=msg.external_unix_sockets,
        terminal=msg.terminal,
        file_locks=msg.file_locks,
        empty_namespaces=list(msg.empty_namespaces),
        cgroups_mode=msg.cgroups_mode,
        image_path=msg.image_path,
        work_path=msg.work_path,
    )


def checkpoint_args(image: str, work: str, opts: CheckpointOptions) -> list[str]:
    """The arguments of ``runc checkpoint`` (before the container id)."""
    args = ["--image-path", image, "--work-path", work]
    if not opts.exit:
        args.append("--leave-running")
    if opts.open_tcp:
        args.append("--tcp-established")
    if opts.external_unix_sockets:
        args.append("--ext-unix-sk")
    if opts.terminal:
        args.append("--shell-job")
    if opts.file_locks:
        args.append("--file-locks")
    if opts.cgroups_mode:
        args += ["--manage-cgroups-mode", opts.cgroups_mode]
    for ns in opts.empty_namespaces:
        args += ["--empty-ns", ns]
    return args


@dataclass
class RestoreSpec:
    """What a task created from a checkpoint is restored from when it starts (persisted,
    so a restarted daemon can still start it)."""

    image: str
    work: str
    parent: str = ""
    no_pivot: bool = False

    def args(self, pid_file: str) -> list[str]:
        """The arguments of ``runc restore --detach`` (before --bundle and the id)."""
        args = ["--image-path", self.image, "--work-path", self.work]
        if self.parent:
            args += ["--parent-path", self.parent]
        args += ["--pid-file", pid_file, "--no-subreaper"]
        if self.no_pivot:
            args.append("--no-pivot")
        return args

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, text: str) -> RestoreSpec | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(
            str(data["image"]),
            str(data["work"]),
            str(data.get("parent", "")),
            bool(data.get("no_pivot", False)),
        )


_ERROR = re.compile(r"^\s*Error \([^)]*\):\s*")


def reason(output: str) -> str:
    """CRIU's own words from ``criu check``: its error lines, without the source location."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errs = [_ERROR.sub("", ln) for ln in lines if _ERROR.match(ln)]
    return "; ".join(errs or lines[-3:])


async def criu_problem(reaper: Reaper, criu: str = "", env: dict[str, str] | None = None) -> str:
    """Why CRIU cannot checkpoint or restore here ('' if ``criu check`` passes)."""
    binary = criu or DEFAULT_CRIU
    env = dict(os.environ) if env is None else env
    path = find_executable(binary, env.get("PATH", ""))
    if path is None:
        return f"{binary} is not installed (not found on PATH; Debian package: criu)"
    try:
        status, out = await execute(reaper, [path, "check"], env=env, timeout=CRIU_CHECK_TIMEOUT)
    except TimeoutError:
        return f"`{path} check` did not finish within {CRIU_CHECK_TIMEOUT:.0f}s"
    except OSError as exc:
        return f"cannot run {path}: {exc}"
    if status == 0:
        return ""
    text = out.decode(errors="replace")
    return f"`{path} check` failed (exit status {status}): {reason(text) or 'no output'}"


async def require_criu(reaper: Reaper, what: str, criu: str = "") -> None:
    """FailedPrecondition naming what is missing when CRIU cannot run here."""
    problem = await criu_problem(reaper, criu)
    if problem:
        raise errors.precondition(f"{what} needs CRIU, which cannot run on this system: {problem}")


def keep_dump_log(work: str, bundle: str) -> str:
    """Copy CRIU's dump log next to the bundle (the work dir may be removed); its path."""
    dest = os.path.join(bundle, DUMP_LOG)
    try:
        with open(os.path.join(work, "dump.log"), "rb") as src, open(dest, "wb") as out:
            out.write(src.read())
    except OSError:
        return ""
    return dest
