"""An exec an older image started through its exec wrapper (removed since): reloaded into this
image while the exec runs, the record is taken back and the exit comes from the status file
the wrapper, already running, writes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from shim.exits.exitwatch import ExitWatch
from shim.exits.reaper import Reaper
from shim.store.statestore import ProcessRecord, StateStore
from shim.tasks.execprocess import ExecProcess
from shim.tasks.task import Deps, Tasks
from shim.ttrpc import Code, TTRPCError
from shim.util import procinfo
from shim.util.paths import DaemonPaths


class _Events:
    def publish(self, namespace: str, event: object, on_sent: object = None) -> None:
        pass


def test_an_older_images_wrapper_record_is_taken_back(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    paths = DaemonPaths(str(tmp_path))
    exec_dir = Path(paths.dir, "exec", "ns", "c1", "e1")
    exec_dir.mkdir(parents=True)
    go = tmp_path / "go"
    store = StateStore(str(tmp_path / "state.db"))

    async def main() -> tuple[int, int | None]:
        loop = asyncio.get_running_loop()
        reaper = Reaper(loop)
        # The wrapper the older image left running (our child, as after a re-exec): it
        # writes "<status> <exited_at ns>" once its process is done.
        script = (
            f"while [ ! -e {go} ]; do sleep 0.01; done; "
            f"echo '7 123' > {exec_dir}/status.tmp && mv {exec_dir}/status.tmp {exec_dir}/status"
        )
        wrapper = os.posix_spawn("/bin/sh", ["sh", "-c", script], dict(os.environ))
        store.put(
            ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), pid=os.getpid(),
                          start_time=procinfo.start_time(os.getpid()), status="running")
        )  # fmt: skip
        store.put(
            ProcessRecord(namespace="ns", id="c1", exec_id="e1", pid=2**22 - 7, start_time=1,
                          status="running", helper_pid=wrapper,
                          helper_start=procinfo.start_time(wrapper))
        )  # fmt: skip
        deps = Deps(paths, reaper, ExitWatch(loop, reaper), store, _Events())  # type: ignore[arg-type]
        tasks = Tasks(deps)
        tasks.restore()
        p = tasks.get("ns", "c1").process("e1")
        await asyncio.sleep(0.05)
        assert not p.exited  # the wrapper runs: so does its exec
        go.touch()
        result = await asyncio.wait_for(p.wait(), 10)
        await tasks.delete("ns", "c1", "e1")  # the older image's files go with it
        assert not Path(paths.dir, "exec", "ns").exists()
        for t in tasks.all():
            t.close()
        reaper.close()
        return result

    assert asyncio.run(main()) == (7, 123)
    assert store.deleted("ns", "c1", "e1") == (2**22 - 7, 7, 123)
    store.close()


def test_an_older_images_exec_without_start_time_is_not_signalled_through_its_pid(
    tmp_path: Path,
) -> None:
    """A record an older image wrote for an exec gone before its pid was read has no start
    time; its pid may be another process's by now (here: this test's own): a Kill after the
    restore finds the exec finished and reaches no process."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    paths = DaemonPaths(str(tmp_path))
    store = StateStore(str(tmp_path / "state.db"))

    async def main() -> int:
        loop = asyncio.get_running_loop()
        reaper = Reaper(loop)
        me = os.getpid()
        store.put(
            ProcessRecord(namespace="ns", id="c1", bundle=str(bundle), pid=me,
                          start_time=procinfo.start_time(me), status="running")
        )  # fmt: skip
        store.put(
            ProcessRecord(namespace="ns", id="c1", exec_id="e1", pid=me, start_time=0,
                          status="running")
        )  # fmt: skip
        deps = Deps(paths, reaper, ExitWatch(loop, reaper), store, _Events())  # type: ignore[arg-type]
        tasks = Tasks(deps)
        tasks.restore()
        p = tasks.get("ns", "c1").process("e1")
        assert isinstance(p, ExecProcess)
        with pytest.raises(TTRPCError) as exc:
            await p.kill(signal.SIGTERM)  # would end this test, were it sent
        assert exc.value.code == Code.NOT_FOUND
        status, _ = await asyncio.wait_for(p.wait(), 10)
        for t in tasks.all():
            t.close()
        reaper.close()
        return status

    assert asyncio.run(main()) == 255  # unknown: no status file, no BPF record
    store.close()
