"""The stdio URIs containerd names for a process, and opening them.

containerd decides by stdout's URI (stderr follows it unless both are FIFOs):

* a path, or ``fifo://path``: FIFOs (or plain files).  Not copied: opened here and handed
  straight to the process as its fds, so output keeps flowing while the daemon restarts.
  stdout/stderr FIFOs are opened read-write, which never blocks and keeps a reader on them,
  so a process never dies of SIGPIPE while containerd (the real reader) restarts.
* ``file:///path``: stdout and stderr appended to that file, by the process itself.
* ``binary:///path?args``: a logging program reads both (shim/logbinary.py).
* nothing at all: /dev/null.

A terminal process's output goes through the daemon instead (shim/ptycopy.py).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from urllib.parse import urlparse

from shim import errors

SCHEMES = ("fifo", "file", "binary")


@dataclass
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False

    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


def scheme(field: str, uri: str) -> str:
    """``fifo`` (a plain path too), ``file`` or ``binary``; anything else is refused."""
    if "://" not in uri:
        return "fifo"
    name = urlparse(uri).scheme
    if name not in SCHEMES:
        raise errors.invalid(f"{field}: unknown stdio scheme {name!r} in {uri!r}")
    return name


def output_scheme(io: Stdio) -> str:
    """How output is delivered: '' (nowhere), 'fifo', 'file' or 'binary'."""
    out = scheme("stdout", io.stdout) if io.stdout else ""
    err = scheme("stderr", io.stderr) if io.stderr else ""
    if err not in ("", "fifo") and io.stderr != io.stdout:
        raise errors.invalid(f"stderr: {io.stderr!r} must be a FIFO or the same URI as stdout")
    return out or ("fifo" if err else "")


def path_of(field: str, uri: str) -> str:
    """A plain path or a file:// / fifo:// URI's path, which must be absolute."""
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme not in ("file", "fifo"):
            raise errors.invalid(f"{field}: {parsed.scheme}:// is not a path")
        uri = parsed.path
    if not os.path.isabs(uri) or "\0" in uri:
        raise errors.invalid(f"{field}: {uri!r} is not an absolute path")
    return uri


def open_output(field: str, uri: str) -> int:
    """A FIFO opened read-write (never blocks, never EPIPE), or a file opened to append."""
    path = path_of(field, uri)
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


def open_input(uri: str) -> int:
    """stdin for the process itself: EOF when the last client writer closes."""
    path = path_of("stdin", uri)
    try:
        # Non-blocking so the open does not wait for a writer, then blocking again for the
        # process that reads it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    os.set_blocking(fd, True)
    return fd


def open_console_input(uri: str) -> tuple[int, int]:
    """stdin for a terminal's copy: the FIFO's read end and a writer the daemon keeps, so a
    client that has not opened it yet, or went away, is not taken for EOF."""
    path = path_of("stdin", uri)
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise errors.invalid(f"stdin: {path} is not a FIFO (a terminal's stdin must be)")
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    try:
        hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        os.close(reader)
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    return reader, hold
