"""Structured logging: one line per event, ``key=value`` pairs, namespace/id/pid first.

The daemon's log goes to ``<daemon dir>/daemon.log`` (see README); each task's own lines also
go to that task's ``log`` FIFO in its bundle, which containerd copies into its own log.

``daemon.log`` lives in /run (tmpfs: memory) and gets a few lines per container, so it is
rotated by size: when a line would take it to ``EMBEDSHIM_LOG_SIZE`` (default 10 MiB) it is
renamed ``daemon.log.1`` (``.1`` to ``.2``, and so on) and a new one begun, keeping
``EMBEDSHIM_LOG_FILES`` files in all (default 3, at least 2), so at most about size × files.
Rotation is by rename, so a process that opens the file for each line it appends (with
O_APPEND) writes to whichever ``daemon.log`` is current; the size is checked at the file's
end, so such lines count too.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from typing import Any

LOGGER = logging.getLogger("embedshim")
_ROOT = logging.getLogger()
_FIRST = ("ns", "id", "exec_id", "pid")
SIZE_ENV = "EMBEDSHIM_LOG_SIZE"
FILES_ENV = "EMBEDSHIM_LOG_FILES"
DEFAULT_SIZE = 10 << 20
DEFAULT_FILES = 3
MIN_SIZE = 4096
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


_SPECIAL = re.compile('[ ="\n]').search


def _quote(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if text == "" or _SPECIAL(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_fields(fields: dict[str, Any]) -> str:
    keys = [k for k in _FIRST if k in fields] + sorted(k for k in fields if k not in _FIRST)
    return " ".join(f"{k}={_quote(fields[k])}" for k in keys if fields[k] is not None)


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def _timestamp(now: float) -> str:
    """``2026-12-06T03:55:08.183Z``; the part up to the second is formatted once a second."""
    second = int(now)
    if second != _second[0]:
        _second[:] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


def _line(now: float, level: str, msg: str, fields: dict[str, Any]) -> str:
    line = f"time={_timestamp(now)} level={level} msg={_quote(msg)}"
    rest = format_fields(fields)
    return f"{line} {rest}" if rest else line


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        line = _line(record.created, record.levelname.lower(), record.getMessage(), fields)
        if record.exc_info:
            line += " error=" + _quote(self.formatException(record.exc_info))
        return line


class _RotatingLog(logging.FileHandler):
    """What logging.handlers.RotatingFileHandler does, for a file created 0600 and opened
    O_APPEND | O_CLOEXEC: when a line would take it past ``max_bytes`` (measured at the
    file's end, so other writers' lines count) it becomes ``.1`` (``.1`` becomes ``.2``,
    ...; ``files`` kept in all) and a new one is begun.  logging.handlers itself would bring
    pickle, queue and more into the daemon: 0.7 MB of its memory."""

    def __init__(self, path: str, max_bytes: int, files: int) -> None:
        self.max_bytes, self.files = max_bytes, files
        self._later: list[tuple[float, int, str, dict[str, Any]]] = []
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def later(self, now: float, level: int, msg: str, fields: dict[str, Any]) -> None:
        """An event's line, formatted and written once the event loop's current step is over
        (after the answer that step writes); at once where no loop runs.  logging.shutdown()
        (before the daemon exits or re-executes) writes what is still queued."""
        self._later.append((now, level, msg, fields))
        if len(self._later) > 1:
            return
        asyncio = sys.modules.get("asyncio")  # not imported: no loop (and none imported here)
        try:
            loop = asyncio.get_running_loop() if asyncio is not None else None
        except RuntimeError:
            loop = None
        if loop is None:
            self.flush()
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            events, self._later = self._later, []
            for now, level, msg, fields in events:
                try:
                    self.write(_line(now, _LEVELS[level], msg, fields))
                except Exception:
                    record = LOGGER.makeRecord(LOGGER.name, level, "", 0, msg, (), None)
                    self.handleError(record)
        super().flush()

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(
            self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        stream = os.fdopen(fd, "a", buffering=1, encoding=self.encoding, errors=self.errors)
        assert isinstance(stream, io.TextIOWrapper)
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._later:
                self.flush()  # the lines queued before this one go first
            self.write(self.format(record))
        except Exception:
            self.handleError(record)

    def write(self, line: str) -> None:
        """Append one line: a single write(2) of the whole line (O_APPEND), the stream's
        buffer never used, so lines of every writer stay whole."""
        data = (line + "\n").encode("utf-8", "backslashreplace")
        if self.stream is None:
            self.stream = self._open()
        fd = self.stream.fileno()
        end = os.lseek(fd, 0, os.SEEK_END)
        if end and end + len(data) > self.max_bytes:
            self._rotate()
            assert self.stream is not None
            fd = self.stream.fileno()
        os.write(fd, data)

    def _rotate(self) -> None:
        if self.stream is not None:
            self.stream.close()
        base = self.baseFilename
        for i in range(self.files - 1, 0, -1):
            src = f"{base}.{i - 1}" if i > 1 else base
            if os.path.exists(src):
                os.replace(src, f"{base}.{i}")
        self.stream = self._open()


def parse_size(text: str) -> int:
    """``10485760``, ``10M``, ``512K``, ``1G`` (KiB, MiB, GiB) to bytes; ValueError if not."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    number = int(value[: len(value) - len(unit)])
    if number <= 0:
        raise ValueError(text)
    return number * _UNITS[unit]


def rotation() -> tuple[int, int, list[str]]:
    """(size, files) from the environment, and what was wrong with it (defaults used)."""
    problems = []
    size, files = DEFAULT_SIZE, DEFAULT_FILES
    raw = os.environ.get(SIZE_ENV, "")
    if raw:
        try:
            size = max(parse_size(raw), MIN_SIZE)
        except ValueError:
            problems.append(f"{SIZE_ENV}={raw!r} is not a size (bytes, or with K, M, G)")
    raw = os.environ.get(FILES_ENV, "")
    if raw:
        if raw.isdigit() and int(raw) >= 2:
            files = int(raw)
        else:
            problems.append(f"{FILES_ENV}={raw!r} is not a number of files of 2 or more")
    return size, files, problems


def setup(path: str | None, debug: bool = False) -> None:
    """Send the daemon's log to ``path`` (appended to, rotated by size), or stderr when
    None."""
    handler: logging.Handler
    problems: list[str] = []
    if path:
        size, files, problems = rotation()
        handler = _RotatingLog(path, size, files)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _direct[:] = [handler] if isinstance(handler, _RotatingLog) else []
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for problem in problems:
        event("log rotation setting ignored; using the default", logging.WARNING, error=problem)


_direct: list[_RotatingLog] = []  # the daemon's file, while it is the only place lines go
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
           logging.ERROR: "error", logging.CRITICAL: "critical"}  # fmt: skip


def event(msg: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event with its fields.  Straight to daemon.log when that file is all the
    logging configuration there is, once the loop's current step is over (a few events per
    request: logging's record, handler and formatter machinery cost 40 µs an event in the
    daemon, and the answer need not wait for the line); otherwise through logging."""
    handlers = _ROOT.handlers
    sink = _direct[0] if _direct else None
    if (
        sink is not None
        and len(handlers) == 1
        and handlers[0] is sink
        and not sink.filters
        and not LOGGER.handlers
        and level in _LEVELS
        and LOGGER.isEnabledFor(level)
    ):
        with sink.lock:  # type: ignore[union-attr]
            sink.later(time.time(), level, msg, fields)
        return
    LOGGER.log(level, msg, extra={"fields": fields})


def line(msg: str, **fields: Any) -> str:
    """The same line format, for the per-task log FIFO."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rest = format_fields(fields)
    return f"time={ts} level=info msg={_quote(msg)}{' ' + rest if rest else ''}\n"
