"""The OCI bundle containerd prepares for a task, and the files we keep in it.

containerd owns the bundle directory (``<state>/io.containerd.runtime.v2.task/<ns>/<id>``);
we read its ``config.json``, mount the rootfs on ``rootfs/``, and write ``address`` (how
containerd 1.6 finds the daemon again after its own restart) and ``init.pid``.

The daemon mounts onto and writes into that directory as root, so a Create is accepted only
for a bundle exactly where containerd puts one: ``<state>/io.containerd.runtime.v2.task/
<namespace>/<id>``, with ``<state>`` the state directory of the containerd the daemon serves,
and no symbolic link below ``<state>``.

That state directory is learned, not configured: containerd runs ``start`` with the bundle
as its working directory, so ``start`` takes ``<state>`` from there (:func:`state_of`) and
gives it to the daemon it spawns (``-containerd-state``, kept across a re-exec).
``EMBEDSHIM_BUNDLE_ROOTS`` (colon-separated), when set, overrides it; a daemon that was not
told (started by an older ``start``, or by hand) falls back to ``/run/containerd``,
containerd's default ``state``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from shim.util import errors

TASK_DIR = "io.containerd.runtime.v2.task"
#: where containerd 2.x's shim sandbox controller puts a pod sandbox's bundle
SANDBOX_DIR = "io.containerd.sandbox.controller.v1.shim"
ROOTS_ENV = "EMBEDSHIM_BUNDLE_ROOTS"
DEFAULT_ROOTS = ("/run/containerd",)
PATH_MAX = 4096
MAX_CONFIG = 16 << 20  # a config.json beyond this is cut short, so it fails to parse


def state_of(path: str, namespace: str, id: str) -> str | None:
    """``<state>`` of a bundle path ``<state>/io.containerd.runtime.v2.task/<namespace>/<id>``
    (or a pod sandbox's, under SANDBOX_DIR) (absolute and clean, ``<state>`` not ``/``), or
    None if ``path`` is not one."""
    if not is_clean_absolute(path):
        return None
    for parent in (TASK_DIR, SANDBOX_DIR):
        state, _, rest = path.rpartition(f"/{parent}/")
        if rest == f"{namespace}/{id}" and state:
            return state
    return None


def namespace_of(path: str, id: str) -> str:
    """The ``<namespace>`` of a bundle path ``.../<namespace>/<id>``, or "" if ``path`` does
    not end in ``id`` (only a guess: check_path is what checks a bundle)."""
    parent, _, last = path.rstrip("/").rpartition("/")
    return parent.rpartition("/")[2] if last == id else ""


def is_clean_absolute(path: str) -> bool:
    """An absolute path with nothing to normalise (no ``.``, ``..``, ``//``, trailing ``/``)."""
    return (
        0 < len(path) <= PATH_MAX
        and "\0" not in path
        and path.startswith("/")
        and os.path.normpath(path) == path
        and not path.startswith("//")
    )


def allowed_roots(learned: str | None = None) -> tuple[str, ...]:
    """The containerd state directories bundles may live in (absolute, normalised):
    ``EMBEDSHIM_BUNDLE_ROOTS`` if set, else the ``learned`` state directory of the daemon's
    containerd, else containerd's default."""
    raw = os.environ.get(ROOTS_ENV, "")
    if raw:
        roots = [r for r in raw.split(":") if r]
    else:
        roots = [learned] if learned else list(DEFAULT_ROOTS)
    return tuple(os.path.normpath(r) for r in roots if os.path.isabs(r))


def roots_source(learned: str | None = None) -> str:
    """Where :func:`allowed_roots` took its answer from, for the log and error messages."""
    if os.environ.get(ROOTS_ENV, ""):
        return ROOTS_ENV
    return "containerd's state directory" if learned else "default"


def check_path(path: str, namespace: str, id: str, roots: tuple[str, ...] | None = None) -> str:
    """``path`` if it is the bundle containerd would pass for (namespace, id), else
    InvalidArgument naming the field."""
    if not path:
        raise errors.invalid("bundle: must not be empty")
    if "\0" in path or len(path) > PATH_MAX:
        raise errors.invalid(f"bundle: {path[:100]!r} is not a usable path")
    if not os.path.isabs(path):
        raise errors.invalid(f"bundle: {path!r} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise errors.invalid(f"bundle: {path!r} is not a clean path")
    ns_dir = os.path.dirname(path)
    task_dir = os.path.dirname(ns_dir)
    if (
        os.path.basename(path) != id
        or os.path.basename(ns_dir) != namespace
        or os.path.basename(task_dir) != TASK_DIR
    ):
        raise errors.invalid(f"bundle: {path!r} is not <state>/{TASK_DIR}/{namespace}/{id}")
    state = os.path.dirname(task_dir)
    roots = allowed_roots() if roots is None else roots
    if state not in roots:
        alias = ""
        if len(roots) == 1 and os.path.realpath(state) == roots[0] != state:
            alias = f"; {state} leads to it through a symbolic link"
        raise errors.invalid(
            f"bundle: {path!r} is not in the state directory of the containerd this daemon "
            f"serves ({':'.join(roots) or 'none'}{alias}; {ROOTS_ENV} overrides it)"
        )
    if os.path.realpath(path) != os.path.join(os.path.realpath(state), TASK_DIR, namespace, id):
        raise errors.invalid(f"bundle: {path!r} goes through a symbolic link")
    return path


def kept_config(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a (checked) config.json that anything reads once the bundle is loaded:
    ``linux.cgroupsPath`` (runc's options at Create), the ``pid`` entry of
    ``linux.namespaces`` (:meth:`Bundle.has_private_pid_namespace`) and ``annotations``
    (``watch``'s pod names).  A task keeps its Bundle for as long as it lives, and the whole
    parsed spec (capabilities, mounts, masked paths, environment...) costs about 17 KiB per
    container (issue 14's memory bound); a new reader of the spec adds its key here."""
    kept: dict[str, Any] = {}
    linux = config.get("linux")
    if isinstance(linux, dict):
        kept_linux: dict[str, Any] = {}
        if "cgroupsPath" in linux:
            kept_linux["cgroupsPath"] = linux["cgroupsPath"]
        namespaces = linux.get("namespaces")
        if isinstance(namespaces, list):
            kept_linux["namespaces"] = [
                ns for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "pid"
            ]
        kept["linux"] = kept_linux
    if "annotations" in config:
        kept["annotations"] = config["annotations"]
    return kept


@dataclass
class Bundle:
    path: str
    #: config.json, cut down by :func:`kept_config` to what is read after Create
    config: dict[str, Any]

    @classmethod
    def load(cls, path: str) -> Bundle:
        """Read and sanity-check the bundle's config.json."""
        if not path or not os.path.isabs(path):
            raise errors.invalid(f"bundle: {path!r} is not an absolute path")
        if not os.path.isdir(path):
            raise errors.invalid(f"bundle: {path} is not a directory")
        cfg_path = os.path.join(path, "config.json")
        try:
            fd = os.open(cfg_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                config = json.loads(f.read(MAX_CONFIG + 1))
        except FileNotFoundError:
            raise errors.invalid(f"bundle: {cfg_path} does not exist") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise errors.invalid(f"bundle: {cfg_path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise errors.invalid(f"bundle: {cfg_path} is not a JSON object")
        process = config.get("process")
        if process is not None and not isinstance(process, dict):
            raise errors.invalid(f"bundle: {cfg_path}: process is not an object")
        root = config.get("root")
        if root is not None and not (isinstance(root, dict) and isinstance(root.get("path"), str)):
            raise errors.invalid(f"bundle: {cfg_path}: root.path is missing")
        return cls(path, kept_config(config))

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    def check_rootfs(self) -> None:
        """The mount target must be a real directory of the bundle: mount(2) follows a
        symbolic link, which would put the container's rootfs anywhere on the host."""
        if os.path.islink(self.rootfs):
            raise errors.invalid(f"bundle: {self.rootfs} is a symbolic link")

    @property
    def runc_log(self) -> str:
        return os.path.join(self.path, "log.json")

    @property
    def shim_log(self) -> str:
        """The FIFO containerd reads and copies into its own log."""
        return os.path.join(self.path, "log")

    def has_private_pid_namespace(self) -> bool:
        """Without one, the init's exit does not end the container's other processes."""
        linux = self.config.get("linux") or {}
        for ns in linux.get("namespaces") or []:
            if isinstance(ns, dict) and ns.get("type") == "pid":
                return not ns.get("path")
        return False


def read_pid(path: str) -> int:
    """The pid runc wrote to ``path``."""
    with open(path) as f:
        return int(f.read().strip())
