"""`watch` without a kernel: ring records decoded, events completed, filtered, formatted, and
the counters in the Prometheus text format."""

from __future__ import annotations

import json
import struct

import pytest

from shim.watch.watchevents import (
    FILENAME_LEN,
    HEAD,
    Filter,
    complete,
    decode,
    json_line,
    prometheus,
    rfc3339,
    table_row,
    tags_from_annotations,
)


def record(etype: int, status: int = 0, filename: bytes = b"", comm: bytes = b"sh") -> bytes:
    head = HEAD.pack(5_000_000_123, 77, etype, 42, 7, status, comm)
    return head + (filename + b"\0" if etype == 1 else b"")


def test_exec_carries_filename_and_ppid() -> None:
    got = decode(record(1, filename=b"/bin/true", comm=b"true"))
    assert got == (
        77,
        {"event": "exec", "ktime": 5_000_000_123, "pid": 42, "comm": "true", "ppid": 7,
         "filename": "/bin/true"},
    )  # fmt: skip


def test_a_long_filename_is_cut_at_the_record_end() -> None:
    got = decode(record(1, filename=b"/x" * 200))
    assert got is not None and len(got[1]["filename"]) <= FILENAME_LEN


@pytest.mark.parametrize(
    ("status", "fields"),
    [
        (4 << 8, {"exit_code": 4}),
        (0, {"exit_code": 0}),
        (11, {"signal": 11, "core_dumped": False}),
        (11 | 0x80, {"signal": 11, "core_dumped": True}),
        (9, {"signal": 9, "core_dumped": False}),
    ],
)
def test_exit_status_is_a_code_or_a_signal(status: int, fields: dict[str, object]) -> None:
    got = decode(record(2, status=status))
    assert got is not None
    ev = got[1]
    assert {k: ev[k] for k in ("exit_code", "signal", "core_dumped") if k in ev} == fields


def test_oom_names_the_victim() -> None:
    got = decode(record(3, comm=b"hog"))
    assert got is not None and got[1]["victim"] == "hog (pid 42)" and got[1]["pid"] == 42


@pytest.mark.parametrize("data", [b"", b"\0" * (HEAD.size - 1), HEAD.pack(0, 0, 9, 0, 0, 0, b"")])
def test_malformed_records_are_skipped(data: bytes) -> None:
    assert decode(data) is None


def test_rfc3339_is_utc_with_nanoseconds() -> None:
    assert rfc3339(1_700_000_000_000_000_007) == "2023-11-14T22:13:20.000000007Z"


def test_complete_adds_time_and_tags_in_order() -> None:
    got = decode(record(2, status=4 << 8))
    assert got is not None
    tags = tags_from_annotations("k8s.io", "abc", {
        "io.kubernetes.cri.sandbox-name": "web",
        "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.container-name": "nginx",
        "other": "x",
    })  # fmt: skip
    ev = complete(got[1], tags, offset=1_700_000_000_000_000_000)
    assert list(ev)[:7] == [
        "time", "event", "namespace", "container_id", "pod", "pod_namespace", "container"
    ]  # fmt: skip
    assert ev["time"] == "2023-11-14T22:13:25.000000123Z"
    assert json.loads(json_line(ev)) == ev


def test_tags_without_cri_are_namespace_and_id() -> None:
    assert tags_from_annotations("default", "c1", None) == {
        "namespace": "default",
        "container_id": "c1",
    }
    assert tags_from_annotations("default", "c1", {"io.kubernetes.cri.sandbox-name": 3}) == {
        "namespace": "default",
        "container_id": "c1",
    }


def test_filters() -> None:
    ev = {"event": "exit", "namespace": "a", "container_id": "x"}
    assert Filter().match(ev)
    assert Filter(ns=["a", "b"]).match(ev) and not Filter(ns=["b"]).match(ev)
    assert Filter(ids=["x"]).match(ev) and not Filter(ids=["y"]).match(ev)
    assert Filter(events=["exit", "oom"]).match(ev) and not Filter(events=["exec"]).match(ev)
    assert Filter(ns=["b"]).match({"event": "drops", "dropped": 3})  # notices: everyone
    flt = Filter(ns=["a"], ids=["x"], events=["oom"])
    assert Filter.from_json(json.loads(json.dumps(flt.to_json()))).to_json() == flt.to_json()
    assert Filter.from_json("junk").to_json() == Filter().to_json()
    with pytest.raises(ValueError, match="unknown event 'fork'"):
        Filter(events=["fork"])


def test_table_rows() -> None:
    base = {"time": "2026-12-05T22:35:01.123456789Z", "namespace": "k8s.io", "pid": 42,
            "container_id": "0123456789abcdef0123", "comm": "sh"}  # fmt: skip
    row = table_row({**base, "event": "exit", "signal": 11, "core_dumped": True})
    assert row.startswith("22:35:01.123 exit  k8s.io     0123456789abcdef ")
    assert row.rstrip().endswith("signal 11 (SIGSEGV), core dumped")
    assert table_row({**base, "event": "exit", "exit_code": 4}).rstrip().endswith("exit code 4")
    row = table_row({**base, "event": "exec", "filename": "/bin/true", "ppid": 1, "pod": "web",
                     "pod_namespace": "prod", "container": "nginx"})  # fmt: skip
    assert " prod/web/nginx " in row and row.rstrip().endswith("/bin/true (ppid 1)")
    assert "OOM" in table_row({**base, "event": "oom"})
    drops = table_row({"event": "drops", "dropped": 3, "total": 5, "where": "kernel"})
    assert drops == "-- 3 events dropped (kernel; total 5)\n"


def test_prometheus_text() -> None:
    text = prometheus(
        [
            {"namespace": "k8s.io", "container_id": "b", "pod": 'we"b', "execs": 3, "oom_kills": 1},
            {"namespace": "default", "container_id": "a", "signaled": 2},
        ],
        drops=7,
    )
    lines = text.splitlines()
    assert "# TYPE embedshim_container_execs_total counter" in lines
    assert 'embedshim_container_execs_total{namespace="default",container_id="a"} 0' in lines
    assert (
        'embedshim_container_execs_total{namespace="k8s.io",container_id="b",pod="we\\"b"} 3'
        in lines
    )
    assert (
        'embedshim_container_process_signal_exits_total{namespace="default",container_id="a"} 2'
        in lines
    )
    assert lines[-1] == "embedshim_watch_events_dropped_total 7"
    # every sample line is "name{labels} value" and every metric has HELP and TYPE
    names = {ln.split("{")[0].split()[0] for ln in lines if not ln.startswith("#")}
    for name in names:
        assert f"# TYPE {name} counter" in lines and any(
            ln.startswith(f"# HELP {name} ") for ln in lines
        )
    assert struct.calcsize("=QQIIIi16s") == HEAD.size == 48
