"""What ``watch`` shows: ring-buffer records decoded into events, their JSON and table forms,
the filters, and the per-container counters in the Prometheus text format.

Pure functions of bytes and dicts (no I/O), shared by the daemon (decoding, tagging,
filtering) and the ``watch`` client (formatting).
"""

from __future__ import annotations

import json
import signal
import struct
import time
from collections.abc import Iterable, Mapping
from typing import Any

#: struct event in bpf/watch.bpf.c: ktime, cgid, type, pid, ppid, status, comm[16]
HEAD = struct.Struct("=QQIIIi16s")
FILENAME_LEN = 256
EVENT_NAMES = {1: "exec", 2: "exit", 3: "oom"}
EVENTS = ("exec", "exit", "oom")
#: comms of runc's own short-lived helpers while it sets up an exec (runc:[0:PARENT], ...):
#: they run in the container's cgroup but are not the container's processes
RUNC_HELPER_PREFIX = "runc:["
#: CRI's OCI annotations -> our field names
CRI_ANNOTATIONS = {
    "io.kubernetes.cri.sandbox-name": "pod",
    "io.kubernetes.cri.sandbox-namespace": "pod_namespace",
    "io.kubernetes.cri.container-name": "container",
}


def tags_from_annotations(namespace: str, container_id: str, annotations: object) -> dict[str, str]:
    """The tags every event of a container carries (CRI's pod names when it has them)."""
    tags = {"namespace": namespace, "container_id": container_id}
    if isinstance(annotations, dict):
        for key, name in CRI_ANNOTATIONS.items():
            value = annotations.get(key)
            if isinstance(value, str) and value:
                tags[name] = value
    return tags


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """(cgroup id, event without tags or time) of one ring record; None if malformed.
    The event keeps ``ktime`` (CLOCK_BOOTTIME ns): the time, and the resume point."""
    if len(data) < HEAD.size:
        return None
    ktime, cgid, etype, pid, ppid, status, comm = HEAD.unpack_from(data)
    name = EVENT_NAMES.get(etype)
    if name is None:
        return None
    ev: dict[str, Any] = {"event": name, "ktime": ktime, "pid": pid, "comm": _cstr(comm)}
    if name == "exec":
        ev["ppid"] = ppid
        ev["filename"] = _cstr(data[HEAD.size : HEAD.size + FILENAME_LEN])
    elif name == "exit":
        ev["ppid"] = ppid
        sig = status & 0x7F
        if sig:
            ev["signal"] = sig
            ev["core_dumped"] = bool(status & 0x80)
        else:
            ev["exit_code"] = (status >> 8) & 0xFF
    else:  # oom: pid and comm name the victim
        ev["victim"] = f"{ev['comm']} (pid {pid})"
    return cgid, ev


def boot_to_wall_offset() -> int:
    """Add to a CLOCK_BOOTTIME ns value to get CLOCK_REALTIME ns (now)."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


_second: list[Any] = [-1, ""]  # the last second formatted, and its text (events come in runs)


def rfc3339(wall_ns: int) -> str:
    """UTC, nanoseconds: ``2026-12-05T22:35:01.123456789Z``."""
    secs, ns = divmod(wall_ns, 1_000_000_000)
    if _second[0] != secs:
        _second[0], _second[1] = secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    return f"{_second[1]}.{ns:09d}Z"


def complete(ev: dict[str, Any], tags: Mapping[str, str], offset: int) -> dict[str, Any]:
    """The event as a watcher gets it: time first, then the container's tags."""
    out: dict[str, Any] = {"time": rfc3339(ev["ktime"] + offset), "event": ev["event"]}
    out.update(tags)
    out.update(ev)  # "event" keeps its place (second)
    return out


class Filter:
    """``--ns``, ``--id``, ``--event``: each a set of accepted values (empty: any)."""

    def __init__(
        self, ns: Iterable[str] = (), ids: Iterable[str] = (), events: Iterable[str] = ()
    ) -> None:
        self.ns = frozenset(ns)
        self.ids = frozenset(ids)
        self.events = frozenset(events)
        bad = self.events - set(EVENTS)
        if bad:
            raise ValueError(f"unknown event {sorted(bad)[0]!r} (one of {', '.join(EVENTS)})")

    def to_json(self) -> dict[str, list[str]]:
        return {"ns": sorted(self.ns), "id": sorted(self.ids), "event": sorted(self.events)}

    @classmethod
    def from_json(cls, data: object) -> Filter:
        if not isinstance(data, dict):
            return cls()

        def strings(key: str) -> list[str]:
            v = data.get(key, [])
            return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

        return cls(strings("ns"), strings("id"), strings("event"))

    def match(self, ev: Mapping[str, Any]) -> bool:
        if ev.get("event") not in EVENTS:
            return True  # notices (drops, ...) go to every watcher
        return (
            (not self.ns or ev.get("namespace") in self.ns)
            and (not self.ids or ev.get("container_id") in self.ids)
            and (not self.events or ev.get("event") in self.events)
        )


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps would make one a call


def json_line(ev: Mapping[str, Any]) -> str:
    return _ENCODER.encode(ev) + "\n"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


TABLE_HEADER = (
    f"{'TIME':<12} {'EVENT':<5} {'NAMESPACE':<10} {'CONTAINER':<16} {'POD':<20} {'PID':>7} "
    f"{'COMM':<16} DETAIL\n"
)


def table_row(ev: Mapping[str, Any]) -> str:
    """One line of the readable table (``watch`` without ``--json``)."""
    kind = ev.get("event", "")
    if kind not in EVENTS:
        return f"-- {notice_text(ev)}\n"
    t = str(ev.get("time", ""))[11:23]
    if kind == "exec":
        detail = f"{ev.get('filename', '')} (ppid {ev.get('ppid', '?')})"
    elif kind == "exit":
        if "signal" in ev:
            detail = f"signal {ev['signal']} ({_signame(int(ev['signal']))})"
            if ev.get("core_dumped"):
                detail += ", core dumped"
        else:
            detail = f"exit code {ev.get('exit_code', '?')}"
    else:
        detail = "killed by the OOM killer"
    pod = ev.get("pod", "")
    if pod:
        pod = f"{ev.get('pod_namespace', '')}/{pod}"
        if ev.get("container"):
            pod += f"/{ev['container']}"
    cid = str(ev.get("container_id", ""))
    return (
        f"{t:<12} {kind:<5} {str(ev.get('namespace', ''))[:10]:<10} {cid[:16]:<16} "
        f"{pod[:20]:<20} {ev.get('pid', 0):>7} {str(ev.get('comm', ''))[:16]:<16} {detail}\n"
    )


def notice_text(ev: Mapping[str, Any]) -> str:
    kind = ev.get("event")
    if kind == "drops":
        return (
            f"{ev.get('dropped', 0)} events dropped ({ev.get('where', 'kernel')}; "
            f"total {ev.get('total', 0)})"
        )
    if kind == "hello":
        pid, drops = ev.get("daemon_pid"), ev.get("drops", 0)
        return f"watching the daemon pid {pid}; events dropped so far: {drops}"
    return json.dumps(ev)


# ---------------------------------------------------------------- Prometheus

_METRICS = (
    ("execs", "embedshim_container_execs_total", "Programs executed inside the container."),
    ("exits", "embedshim_container_process_exits_total", "Processes ended inside the container."),
    (
        "signaled",
        "embedshim_container_process_signal_exits_total",
        "Processes inside the container ended by a signal.",
    ),
    ("core_dumps", "embedshim_container_core_dumps_total", "Processes that dumped core."),
    ("oom_kills", "embedshim_container_oom_kills_total", "Processes killed by the OOM killer."),
)
_LABELS = ("namespace", "container_id", "pod", "pod_namespace", "container")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus(containers: Iterable[Mapping[str, Any]], drops: int) -> str:
    """The text exposition format (for node_exporter's textfile collector)."""
    rows = sorted(containers, key=lambda c: (str(c.get("namespace")), str(c.get("container_id"))))
    out: list[str] = []
    for key, name, help_text in _METRICS:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} counter")
        for c in rows:
            labels = ",".join(
                f'{label}="{_escape(str(c[label]))}"' for label in _LABELS if c.get(label)
            )
            out.append(f"{name}{{{labels}}} {int(c.get(key, 0))}")
    out.append("# HELP embedshim_watch_events_dropped_total Events lost: the ring buffer was full.")
    out.append("# TYPE embedshim_watch_events_dropped_total counter")
    out.append(f"embedshim_watch_events_dropped_total {int(drops)}")
    return "\n".join(out) + "\n"
