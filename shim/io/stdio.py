"""The stdio URIs containerd names for a process, and opening them.

containerd decides by stdout's URI (stderr follows it unless both are FIFOs):

* a path, or ``fifo://path``: FIFOs containerd made.  Not copied: opened here and handed
  straight to the process as its fds, so output keeps flowing while the daemon restarts.
  stdout/stderr FIFOs are opened read-write, which never blocks and keeps a reader on them,
  so a process never dies of SIGPIPE while containerd (the real reader) restarts.
* ``file:///path``: stdout and stderr appended to that file, by the process itself.
* ``binary:///path?args``: a logging program reads both (shim/io/logbinary.py).
* nothing at all: /dev/null.

A terminal process's output goes through the daemon instead (shim/io/ptycopy.py).

Everything is checked before any file is touched or program started (``Stdio.check``):
paths must be absolute and clean, URIs ``scheme:///path`` with nothing else, stdin a FIFO.
A plain path or ``fifo://`` must name an existing FIFO (or a device such as /dev/null), and
is opened, like a ``file://`` log, without following a symbolic link.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.util import errors

if TYPE_CHECKING:
    from urllib.parse import ParseResult

SCHEMES = ("fifo", "file", "binary")
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
            kind = scheme("stdin", self.stdin)
            if kind != "fifo":
                raise errors.invalid(f"stdin: must be a FIFO, not a {kind}:// URI")
            path_of("stdin", self.stdin)
        for field, uri in (("stdout", self.stdout), ("stderr", self.stderr)):
            if uri and scheme(field, uri) == "binary":
                _check_binary(field, uri)
            elif uri:
                path_of(field, uri)
        output_scheme(self)


def _urlparse(uri: str) -> ParseResult:
    """urllib.parse, imported on first use: only ``scheme://`` URIs need it, and it brings
    ipaddress along (about 0.4 MB of the daemon's memory; ctr and CRI name plain paths)."""
    from urllib.parse import urlparse

    return urlparse(uri)


def scheme(field: str, uri: str) -> str:
    """``fifo`` (a plain path too), ``file`` or ``binary``; anything else is refused."""
    if "\0" in uri or len(uri) > PATH_MAX:
        raise errors.invalid(f"{field}: {uri[:100]!r} is not a usable path")
    if "://" not in uri:
        return "fifo"
    name = _urlparse(uri).scheme
    if name not in SCHEMES:
        raise errors.invalid(f"{field}: unknown stdio scheme {name[:20]!r} in {uri[:100]!r}")
    return name


def _clean(field: str, path: str) -> str:
    if not os.path.isabs(path):
        raise errors.invalid(f"{field}: {path[:100]!r} is not an absolute path")
    if os.path.normpath(path) != path or path.startswith("//"):
        raise errors.invalid(f"{field}: {path[:100]!r} is not a clean path")
    return path


def _check_binary(field: str, uri: str) -> None:
    """``binary:///<clean absolute path>[?args]``: the program the daemon will run."""
    parsed = _urlparse(uri)
    if parsed.netloc or parsed.fragment or parsed.params:
        raise errors.invalid(f"{field}: {uri[:100]!r} must be binary:///<path>[?args]")
    _clean(field, parsed.path)


def output_scheme(io: Stdio) -> str:
    """How output is delivered: '' (nowhere), 'fifo', 'file' or 'binary'."""
    out = scheme("stdout", io.stdout) if io.stdout else ""
    err = scheme("stderr", io.stderr) if io.stderr else ""
    if err not in ("", "fifo") and io.stderr != io.stdout:
        raise errors.invalid(f"stderr: {io.stderr!r} must be a FIFO or the same URI as stdout")
    return out or ("fifo" if err else "")


def path_of(field: str, uri: str) -> str:
    """A plain path or a file:// / fifo:// URI's path, which must be absolute and clean."""
    if "\0" in uri or len(uri) > PATH_MAX:
        raise errors.invalid(f"{field}: {uri[:100]!r} is not a usable path")
    if "://" in uri:
        parsed = _urlparse(uri)
        if parsed.scheme not in ("file", "fifo"):
            raise errors.invalid(f"{field}: {parsed.scheme[:20]}:// is not a path")
        if parsed.netloc or parsed.query or parsed.fragment or parsed.params:
            raise errors.invalid(f"{field}: {uri[:100]!r} must be {parsed.scheme}:///<path>")
        uri = parsed.path
    return _clean(field, uri)


def _open_fifo(field: str, path: str, flags: int) -> int:
    """containerd's FIFO (never through a symbolic link; a device like /dev/null will do)."""
    try:
        # Non-blocking so the open does not wait for a peer; blocking again for the process.
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"{field}: cannot open {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        os.close(fd)
        raise errors.invalid(f"{field}: {path} is not a FIFO")
    os.set_blocking(fd, True)
    return fd


def open_output(field: str, uri: str) -> int:
    """A FIFO opened read-write (never blocks, never EPIPE), or a file opened to append."""
    path = path_of(field, uri)
    if scheme(field, uri) == "fifo":
        return _open_fifo(field, path, os.O_RDWR)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        raise errors.invalid(f"{field}: cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.invalid(f"{field}: {path} is not a regular file")
    return fd


def open_input(uri: str) -> int:
    """stdin for the process itself: EOF when the last client writer closes."""
    return _open_fifo("stdin", path_of("stdin", uri), os.O_RDONLY)


def open_console_input(uri: str) -> tuple[int, int]:
    """stdin for a terminal's copy: the FIFO's read end and a writer the daemon keeps, so a
    client that has not opened it yet, or went away, is not taken for EOF."""
    path = path_of("stdin", uri)
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise errors.invalid(f"stdin: {path} is not a FIFO (a terminal's stdin must be)")
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    try:
        hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        os.close(reader)
        raise errors.invalid(f"stdin: cannot open {path}: {exc.strerror}") from exc
    return reader, hold
