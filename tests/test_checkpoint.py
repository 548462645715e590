"""Checkpoint and restore: CRIU options to runc arguments, and `criu check` as the gate."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shim.api import runc_options_pb2
from shim.exits.reaper import Reaper
from shim.oci.checkpoint import (
    CHECKPOINT_OPTIONS,
    CheckpointOptions,
    RestoreSpec,
    checkpoint_args,
    criu_problem,
    decode_options,
    require_criu,
)
from shim.ttrpc import Code, TTRPCError


def test_options_as_containerd_sends_them() -> None:
    msg = runc_options_pb2.CheckpointOptions(
        exit=True, file_locks=True, empty_namespaces=["network"], image_path="/img"
    )
    got = decode_options("containerd.runc.v1.CheckpointOptions", msg.SerializeToString())
    assert got.exit and got.file_locks and got.empty_namespaces == ["network"]
    assert got.image_path == "/img" and not got.open_tcp
    assert decode_options("", b"") == CheckpointOptions()
    with pytest.raises(TTRPCError) as info:
        decode_options("containerd.runc.v1.Options", b"")
    assert info.value.code == Code.INVALID_ARGUMENT


def test_checkpoint_arguments() -> None:
    assert checkpoint_args("/img", "/work", CheckpointOptions()) == [
        "--image-path", "/img", "--work-path", "/work", "--leave-running",
    ]  # fmt: skip
    opts = CheckpointOptions(
        exit=True, open_tcp=True, external_unix_sockets=True, terminal=True,
        file_locks=True, empty_namespaces=["network", "ipc"], cgroups_mode="soft",
    )  # fmt: skip
    assert checkpoint_args("/img", "/work", opts) == [
        "--image-path", "/img", "--work-path", "/work",  # exit: no --leave-running
        "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
        "--manage-cgroups-mode", "soft", "--empty-ns", "network", "--empty-ns", "ipc",
    ]  # fmt: skip


def test_restore_spec_arguments_and_persisted_form() -> None:
    spec = RestoreSpec(image="/ck", work="/b/criu-work", parent="/parent", no_pivot=True)
    assert spec.args("/b/init.pid") == [
        "--image-path", "/ck", "--work-path", "/b/criu-work", "--parent-path", "/parent",
        "--pid-file", "/b/init.pid", "--no-subreaper", "--no-pivot",
    ]  # fmt: skip
    assert RestoreSpec.decode(spec.encode()) == spec
    assert RestoreSpec.decode("") is None


def _script(dir: Path, name: str, body: str) -> str:
    path = dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def _problem(tmp: Path, criu: str) -> str:
    async def main() -> str:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            env = {"PATH": f"{tmp}:{os.environ.get('PATH', '')}"}
            return await criu_problem(reaper, criu, env)
        finally:
            reaper.close()

    return asyncio.run(main())


def test_criu_check_passing_failing_missing(tmp_path: Path) -> None:
    good = _script(tmp_path, "criu-good", 'test "$1" = check && echo "Looks good."\n')
    assert _problem(tmp_path, good) == ""
    bad = _script(tmp_path, "criu-bad", (
        'echo "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds" >&2\n'
        'echo "Error (criu/crtools.c:260): Could not initialize kernel features detection." >&2\n'
        "exit 1\n"
    ))  # fmt: skip
    assert _problem(tmp_path, bad) == (
        f"`{bad} check` failed (exit status 1): vdso: Unexpected rt vDSO area bounds; "
        "Could not initialize kernel features detection."
    )
    assert "not installed" in _problem(tmp_path, "no-such-criu")


def test_require_criu_is_a_failed_precondition(tmp_path: Path) -> None:
    bad = _script(tmp_path, "criu-bad", "echo 'Error (x.c:1): no luck' >&2; exit 1\n")

    async def main() -> None:
        reaper = Reaper(asyncio.get_running_loop())
        try:
            await require_criu(reaper, "checkpoint of c1", bad)
        finally:
            reaper.close()

    with pytest.raises(TTRPCError) as info:
        asyncio.run(main())
    assert info.value.code == Code.FAILED_PRECONDITION
    assert info.value.message.startswith(
        "checkpoint of c1 needs CRIU, which cannot run on this system: "
    )
    assert info.value.message.endswith("failed (exit status 1): no luck")


def test_options_type_name() -> None:
    assert CHECKPOINT_OPTIONS == runc_options_pb2.CheckpointOptions.DESCRIPTOR.full_name


def test_a_task_created_from_a_checkpoint_is_still_to_restore_after_a_daemon_restart(
    tmp_path: Path,
) -> None:
    from shim.store.statestore import ProcessRecord, StateStore
    from shim.tasks.lifecycle import Status
    from shim.tasks.task import Deps, Tasks
    from shim.util.paths import DaemonPaths

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    store = StateStore(str(tmp_path / "state.db"))
    spec = RestoreSpec(image="/ck", work=str(bundle / "criu-work"))
    store.put(ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), trace_id=3,
                            checkpoint=spec.encode()))  # fmt: skip

    class Events:
        sent: list[object] = []

        def publish(self, ns: str, event: object, on_sent: object = None) -> None:
            self.sent.append(event)

    async def main() -> None:
        reaper = Reaper(asyncio.get_running_loop())
        deps = Deps(DaemonPaths(str(tmp_path)), reaper, None, store, Events())  # type: ignore[arg-type]
        tasks = Tasks(deps)
        tasks.restore()
        init = tasks.get("ns", "c1").init
        assert init.restore_from == spec and init.status == Status.CREATED
        assert not init.exited and init.pid == 0
        assert init.record().checkpoint == spec.encode()
        for t in tasks.all():
            t.close()
        reaper.close()

    asyncio.run(main())
    assert Events.sent == []  # no exit made up for it
    store.close()
