"""Small filesystem helpers with no heavy imports (used by the short-lived subcommands)."""

from __future__ import annotations

import os


def write_atomic(path: str, data: str | bytes, mode: int = 0o644) -> None:
    """Write ``path`` through a temporary file and a rename, so a reader never sees half."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_address(bundle: str, address: str) -> None:
    """The bundle's ``address`` file: how containerd 1.6 finds the daemon after it restarts."""
    write_atomic(os.path.join(bundle, "address"), address)


def remove_tree(path: str) -> None:
    """``rm -rf path`` without importing shutil into the daemon; errors are ignored."""
    try:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                full = os.path.join(root, name)
                if os.path.islink(full):
                    os.unlink(full)
                else:
                    os.rmdir(full)
        os.rmdir(path)
    except OSError:
        pass
