"""The CRI container log format, as the kubelet (``kubectl logs``) parses it.

One record per line: ``<RFC 3339 nano timestamp> <stdout|stderr> <F|P> <content>``, where
``P`` marks a partial line (continued by the next record of the same stream) and ``F`` the
last piece of a line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

_RECORD = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)) "
    r"(?P<stream>stdout|stderr) (?P<tag>[FP]) (?P<content>.*)$"
)


@dataclass
class Record:
    time_ns: int
    stream: str
    tag: str
    content: str


def _parse_time(ts: str) -> int:
    """RFC 3339 with up to nine fractional digits (datetime keeps only six)."""
    main, frac, zone = ts, "", "Z"
    if ts.endswith("Z"):
        main = ts[:-1]
    else:
        main, zone = ts[:-6], ts[-6:]
    if "." in main:
        main, frac = main.split(".")
    secs = datetime.fromisoformat(main + ("+00:00" if zone == "Z" else zone)).timestamp()
    return int(secs) * 1_000_000_000 + int(frac.ljust(9, "0") or 0)


def parse(text: str) -> list[Record]:
    """Every record of a log file; ValueError on a line that is not in the format."""
    out = []
    for line in text.splitlines():
        m = _RECORD.match(line)
        if m is None:
            raise ValueError(f"not a CRI log record: {line!r}")
        out.append(Record(_parse_time(m["ts"]), m["stream"], m["tag"], m["content"]))
    return out


def lines(records: list[Record], stream: str) -> list[str]:
    """The full lines of one stream (partial records joined)."""
    out, cur = [], ""
    for r in records:
        if r.stream != stream:
            continue
        cur += r.content
        if r.tag == "F":
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out
