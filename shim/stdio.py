"""Opening the stdio containerd names for a process, to hand straight to it.

The daemon copies no bytes: the FIFOs (or files) are opened here and become the process's
fds 0, 1 and 2 through runc, and the daemon closes its copies once runc has them.  So output
keeps flowing when the daemon restarts.  stdout/stderr FIFOs are opened read-write, which
never blocks and keeps a reader on them, so a container never dies of SIGPIPE while
containerd (the real reader) restarts.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from urllib.parse import urlparse

from shim import errors


@dataclass
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


def _path_of(field: str, uri: str) -> str:
    """A plain path or a file:// / fifo:// URI; anything else is refused."""
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme not in ("file", "fifo"):
            raise errors.unimplemented(f"{field}: {parsed.scheme}:// stdio is not supported yet")
        uri = parsed.path
    if not os.path.isabs(uri) or "\0" in uri:
        raise errors.invalid(f"{field}: {uri!r} is not an absolute path")
    return uri


def _open_output(field: str, uri: str) -> int:
    path = _path_of(field, uri)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    try:
        if st is not None and stat.S_ISFIFO(st.st_mode):
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise errors.invalid(f"{field}: cannot open {path}: {exc.strerror}") from exc


def _open_input(uri: str) -> int:
    path = _path_of("stdin", uri)
    try:
        # Non-blocking so the open does not wait for a writer, then blocking again for the
        # process that reads it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    os.set_blocking(fd, True)
    return fd


class OpenedStdio:
    """The three fds for a process; close() once the process holds them."""

    def __init__(self, io: Stdio) -> None:
        self.fds: list[int] = []
        try:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            self.fds.append(null)
            stdin = _open_input(io.stdin) if io.stdin else null
            if stdin != null:
                self.fds.append(stdin)
            stdout = _open_output("stdout", io.stdout) if io.stdout else null
            if stdout != null:
                self.fds.append(stdout)
            if io.stderr and io.stderr == io.stdout:
                stderr = stdout
            else:
                stderr = _open_output("stderr", io.stderr) if io.stderr else null
                if stderr != null:
                    self.fds.append(stderr)
        except BaseException:
            self.close()
            raise
        self.triple = (stdin, stdout, stderr)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
