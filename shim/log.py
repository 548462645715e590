"""Structured logging: one line per event, ``key=value`` pairs, namespace/id/pid first.

The daemon's log goes to ``<daemon dir>/daemon.log`` (see README); each task's own lines also
go to that task's ``log`` FIFO in its bundle, which containerd copies into its own log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

LOGGER = logging.getLogger("embedshim")
_FIRST = ("ns", "id", "exec_id", "pid")


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_fields(fields: dict[str, Any]) -> str:
    keys = [k for k in _FIRST if k in fields] + sorted(k for k in fields if k not in _FIRST)
    return " ".join(f"{k}={_quote(fields[k])}" for k in keys if fields[k] is not None)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = getattr(record, "fields", {})
        line = f"time={ts} level={record.levelname.lower()} msg={_quote(record.getMessage())}"
        rest = format_fields(fields)
        if rest:
            line += " " + rest
        if record.exc_info:
            line += " error=" + _quote(self.formatException(record.exc_info))
        return line


def setup(path: str | None, debug: bool = False) -> None:
    """Send the daemon's log to ``path`` (append), or stderr when None."""
    handler: logging.Handler
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def event(msg: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event with its fields."""
    LOGGER.log(level, msg, extra={"fields": fields})


def line(msg: str, **fields: Any) -> str:
    """The same line format, for the per-task log FIFO."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rest = format_fields(fields)
    return f"time={ts} level=info msg={_quote(msg)}{' ' + rest if rest else ''}\n"
