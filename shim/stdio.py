"""Opening the stdio containerd names for a process, to hand straight to it.

The daemon copies no bytes: the FIFOs (or files) are opened here and become the process's
fds 0, 1 and 2 through runc, and the daemon closes its copies once runc has them.  So output
keeps flowing when the daemon restarts.  stdout/stderr FIFOs are opened read-write, which
never blocks and keeps a reader on them, so a container never dies of SIGPIPE while
containerd (the real reader) restarts.

What containerd may name: a plain absolute path (its FIFO, which must exist), ``fifo://``
the same, or ``file://`` (a log file, created, never through a symbolic link) for stdout
and stderr.  Paths must be clean; anything else is refused before any file is touched.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from urllib.parse import urlparse

from shim import errors

PATH_MAX = 4096


@dataclass
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)

    def check(self) -> None:
        """Refuse (InvalidArgument, naming the field) what could never be opened safely."""
        if self.stdin:
            parse("stdin", self.stdin)
        if self.stdout:
            parse("stdout", self.stdout)
        if self.stderr:
            parse("stderr", self.stderr)


def parse(field: str, uri: str) -> tuple[str, str]:
    """(kind, path) of a stdio name: kind "fifo" (a plain path or fifo://) or "file"
    (file://, stdout and stderr only)."""
    if "\0" in uri or len(uri) > PATH_MAX:
        raise errors.invalid(f"{field}: {uri[:100]!r} is not a usable path")
    kind, path = "fifo", uri
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme == "binary":
            raise errors.unimplemented(f"{field}: binary:// logging is not supported")
        if parsed.scheme not in ("file", "fifo"):
            raise errors.invalid(f"{field}: unknown stdio scheme {parsed.scheme[:20]!r}")
        if parsed.netloc or parsed.query or parsed.fragment or parsed.params:
            raise errors.invalid(f"{field}: {uri[:100]!r} must be {parsed.scheme}:///<path>")
        kind, path = parsed.scheme, parsed.path
        if kind == "file" and field == "stdin":
            raise errors.invalid("stdin: must be a FIFO, not a file:// URI")
    if not os.path.isabs(path):
        raise errors.invalid(f"{field}: {path[:100]!r} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise errors.invalid(f"{field}: {path[:100]!r} is not a clean path")
    return kind, path


def _open_fifo(field: str, path: str, flags: int) -> int:
    """containerd's FIFO (never a symbolic link; a device such as /dev/null will do too)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"{field}: cannot open {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise errors.invalid(f"{field}: {path} is not a FIFO")
    # Non-blocking only for the open (no writer needed yet); the process gets it blocking.
    os.set_blocking(fd, True)
    return fd


def _open_output(field: str, uri: str) -> int:
    kind, path = parse(field, uri)
    if kind == "fifo":
        return _open_fifo(field, path, os.O_RDWR)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o640,
        )
    except OSError as exc:
        raise errors.invalid(f"{field}: cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.invalid(f"{field}: {path} is not a regular file")
    return fd


def _open_input(uri: str) -> int:
    _, path = parse("stdin", uri)
    return _open_fifo("stdin", path, os.O_RDONLY)


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
