"""The OCI bundle containerd prepares for a task, and the files we keep in it.

containerd owns the bundle directory (``<state>/io.containerd.runtime.v2.task/<ns>/<id>``);
we read its ``config.json``, mount the rootfs on ``rootfs/``, and write ``address`` (how
containerd 1.6 finds the daemon again after its own restart) and ``init.pid``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from shim import errors


@dataclass
class Bundle:
    path: str
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
            with open(cfg_path, "rb") as f:
                config = json.loads(f.read())
        except FileNotFoundError:
            raise errors.invalid(f"bundle: {cfg_path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise errors.invalid(f"bundle: {cfg_path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise errors.invalid(f"bundle: {cfg_path} is not a JSON object")
        process = config.get("process")
        if process is not None and not isinstance(process, dict):
            raise errors.invalid(f"bundle: {cfg_path}: process is not an object")
        root = config.get("root")
        if root is not None and not (isinstance(root, dict) and isinstance(root.get("path"), str)):
            raise errors.invalid(f"bundle: {cfg_path}: root.path is missing")
        return cls(path, config)

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    @property
    def pid_file(self) -> str:
        return os.path.join(self.path, "init.pid")

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

    def read_pid(self) -> int:
        with open(self.pid_file) as f:
            return int(f.read().strip())
