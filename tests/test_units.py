"""Unit tests of the daemon's pure pieces: flags, wire encoding, ids, store, options, log."""

from __future__ import annotations

import os
import pathlib
import signal
import sqlite3

import pytest

from shim.api import shim_pb2
from shim.cmd import cli
from shim.cmd.start import ttrpc_address_from
from shim.exits.reaper import exit_status
from shim.oci import mount, runc
from shim.store.statestore import SCHEMA_VERSION, ProcessRecord, StateStore, StoreError
from shim.tasks.task import decode_options
from shim.ttrpc import Code, TTRPCError
from shim.util import identifiers, log, wire
from shim.util.paths import DaemonPaths, instance_key


def test_go_style_flags_as_containerd_passes_them() -> None:
    argv = [
        "-namespace",
        "k8s.io",
        "-address",
        "/run/c.sock",
        "-publish-binary",
        "/bin/c",
        "-id",
        "abc",
        "-debug",
        "start",
    ]
    flags, rest = cli.parse(argv)
    assert (flags.namespace, flags.address, flags.id, flags.debug) == (
        "k8s.io",
        "/run/c.sock",
        "abc",
        True,
    )
    assert rest == ["start"]
    flags, rest = cli.parse(["--id=x", "-bundle=/b", "delete"])
    assert (flags.id, flags.bundle, rest) == ("x", "/b", ["delete"])
    with pytest.raises(cli.UsageError):
        cli.parse(["-bogus", "start"])
    with pytest.raises(cli.UsageError):
        cli.parse(["-id"])


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-v"]) == 0
    assert "containerd-shim-embed-v1" in capsys.readouterr().out


def test_delete_response_encoding_matches_protobuf() -> None:
    data = wire.delete_response(1234, 137, 1_700_000_000_123_456_789)
    msg = shim_pb2.DeleteResponse.FromString(data)
    assert msg.pid == 1234 and msg.exit_status == 137
    assert msg.exited_at.ToNanoseconds() == 1_700_000_000_123_456_789


def test_bootstrap_params_sniffing() -> None:
    # containerd 2.3+ BootstrapParams: instance_id=1, namespace=2, ..., ttrpc address=5.
    params = (
        wire.bytes_field(1, b"id")
        + wire.bytes_field(2, b"ns")
        + wire.bytes_field(5, b"/run/containerd/containerd.sock.ttrpc")
    )
    assert ttrpc_address_from(params) == "/run/containerd/containerd.sock.ttrpc"
    any_options = wire.bytes_field(1, b"containerd.runc.v1.Options") + wire.bytes_field(2, b"")
    assert ttrpc_address_from(any_options) == ""
    assert ttrpc_address_from(b"") == ""
    assert ttrpc_address_from(b"\xff\xff") == ""


@pytest.mark.parametrize("good", ["a", "abc-1", "a.b_c-d", "A" * 76])
def test_identifiers_accepted(good: str) -> None:
    assert identifiers.validate("id", good) == good


@pytest.mark.parametrize(
    "bad", ["", "../x", "/abs", "a/b", "a\0b", "-a", "a-", "a..b", "A" * 77, "x" * 10_000, "sp ace"]
)
def test_identifiers_refused(bad: str) -> None:
    with pytest.raises(TTRPCError) as info:
        identifiers.validate("id", bad)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "id" in info.value.message


def test_exit_status_convention() -> None:
    assert exit_status(0) == 0
    assert exit_status(42 << 8) == 42
    assert exit_status(signal.SIGKILL) == 137
    assert exit_status(signal.SIGTERM) == 143


def test_paths_are_keyed_by_containerd_and_short() -> None:
    a = DaemonPaths.for_containerd("/run/containerd/containerd.sock", root="/run/embedshim")
    b = DaemonPaths.for_containerd("/tmp/other.sock", root="/run/embedshim")
    assert a.dir != b.dir and a.dir.endswith(instance_key("/run/containerd/containerd.sock"))
    assert a.address == "unix://" + a.socket and len(a.socket) < 108


def test_options_decoding() -> None:
    from shim.api import runc_options_pb2

    opts = runc_options_pb2.Options(root="/r", binary_name="crun", systemd_cgroup=True)
    got = decode_options("containerd.runc.v1.Options", opts.SerializeToString())
    assert (got.root, got.binary, got.systemd_cgroup) == ("/r", "crun", True)
    assert decode_options("", b"").binary == "runc"
    assert decode_options("runtimeoptions.v1.Options", b"").binary == "runc"
    with pytest.raises(TTRPCError) as info:
        decode_options("example.com/Evil", b"")
    assert info.value.code == Code.INVALID_ARGUMENT and "options" in info.value.message


def test_store_round_trip_and_trace_ids(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "state.db")
    store = StateStore(path)
    rec = ProcessRecord(namespace="ns", id="c1", bundle="/b", pid=10, start_time=99, trace_id=1)
    store.put(rec)
    store.update("ns", "c1", status="stopped", exit_status=143, exited_at=5)
    got = store.get("ns", "c1")
    assert got is not None and (got.exit_status, got.status, got.pid) == (143, "stopped", 10)
    ids = [store.next_trace_id() for _ in range(3)]
    assert ids[0] >= 1 and ids == [ids[0], ids[0] + 1, ids[0] + 2]
    other = StateStore(path)  # a second store on the same file takes ids of its own
    assert other.next_trace_id() > max(ids)
    assert store.next_trace_id() == ids[2] + 1
    other.close()
    store.close()
    store = StateStore(path)  # reopened: counter persists, never reused
    assert store.next_trace_id() > max(ids) + 1
    assert store.count() == 1
    store.delete("ns", "c1")
    assert store.get("ns", "c1") is None
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_store_refuses_newer_schema(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "state.db")
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        StateStore(path)


def test_mount_option_parsing() -> None:
    flags, prop, data = mount.parse_options(["ro", "rbind", "nosuid", "lowerdir=/a", "rprivate"])
    assert flags == mount.MS_RDONLY | mount.MS_BIND | mount.MS_REC | mount.MS_NOSUID
    assert prop == mount.MS_PRIVATE | mount.MS_REC
    assert data == "lowerdir=/a"
    flags, _, _ = mount.parse_options(["ro", "rw"])
    assert flags == 0


def test_log_lines_are_key_value_with_ids_first() -> None:
    line = log.format_fields({"pid": 3, "id": "c1", "ns": "k8s.io", "error": "a b"})
    assert line == 'ns=k8s.io id=c1 pid=3 error="a b"'


def test_a_wait_whose_caller_went_away_is_cancelled_not_failed() -> None:
    """unless_gone: the caller's connection closes while its Wait waits; the handler ends
    with CANCELLED (an InvalidStateError, logged as a failed request, before)."""
    import asyncio

    from shim.tasks.handlers import unless_gone
    from shim.ttrpc import Context

    async def scenario() -> TTRPCError:
        ctx = Context(service="s", method="Wait")
        asyncio.get_running_loop().call_soon(ctx.gone.set)
        with pytest.raises(TTRPCError) as err:
            await unless_gone(ctx, asyncio.Event().wait())  # a coroutine: run as a task
        return err.value

    assert asyncio.run(scenario()).code == Code.CANCELLED


def test_resolve_remembers_runc_until_it_is_gone(tmp_path: pathlib.Path) -> None:
    """runc's path is looked up once, not walked through PATH per command (one found earlier
    on PATH later is not seen); a binary that is gone is looked up afresh."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    for d in (first, second):
        (d / "fake-runc").write_text("#!/bin/sh\n")
        (d / "fake-runc").chmod(0o755)
    path = f"{tmp_path / 'none'}:{first}:{second}"
    assert runc.resolve("fake-runc", path) == str(first / "fake-runc")
    earlier = tmp_path / "none"
    earlier.mkdir()
    (earlier / "fake-runc").write_text("#!/bin/sh\n")
    (earlier / "fake-runc").chmod(0o755)
    assert runc.resolve("fake-runc", path) == str(first / "fake-runc")  # remembered
    (earlier / "fake-runc").unlink()
    (first / "fake-runc").unlink()
    assert runc.resolve("fake-runc", path) == str(second / "fake-runc")
    (second / "fake-runc").unlink()
    assert runc.resolve("fake-runc", path) is None
