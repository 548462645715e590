"""The C wrapper (runc_exec/runc_exec.c, ``embedshim-runc-exec``) against the same tests as
the Python one: the same command line, sync lines, status file and exit codes.

Each test below is test_runc_exec.py's, run with the binary as the wrapper.  Needs the binary
built (``make -C runc_exec``; ``make setup`` builds it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import test_runc_exec as base
from test_runc_exec import (  # noqa: F401  (collected here again, with the C wrapper)
    container,
    test_bad_command_line_exits_2_with_usage,
    test_bad_process_json_reports_runc_error,
    test_exit_code_pid_and_status_file,
    test_hung_runc_is_killed_after_the_timeout,
    test_killed_from_outside,
    test_missing_executable_with_a_shared_log,
    test_missing_runc_binary,
    test_nofile_sets_the_soft_limit_runc_gets,
    test_posix_spawned_wrapper_still_leaves_no_signal_ignored,
    test_status_file_is_written_when_the_sync_reader_is_gone,
    test_stdin_and_stdout_pass_through,
    test_stdout_reaches_the_pipe_and_eof_follows_the_exit,
    test_unknown_container_reports_runc_error,
    test_wrapper_drops_its_copy_of_the_exec_stdio,
)

import runc_exec

BINARY = runc_exec.binary()


@pytest.fixture(autouse=True)
def _c_wrapper(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if BINARY is None:
        pytest.fail("embedshim-runc-exec is not built: make -C runc_exec")
    monkeypatch.setattr(base, "WRAPPER", [BINARY])
    yield


def test_command_prefers_the_binary() -> None:
    assert runc_exec.command() == [BINARY]


@base.needs_runc
def test_exit_codes_and_signals(container: base.Container) -> None:  # noqa: F811
    """The exit matrix: codes 0-255 boundaries and deaths by signal, as containerd counts."""
    for script, expected in (
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 126", 126),
        ("exit 255", 255),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
        ("kill -SEGV $$", 139),
    ):
        run = base.start(container, ["sh", "-c", script])
        lines = run.lines()
        assert run.wait() == 0
        assert [ln.split()[0] for ln in lines] == ["pid", "exit"], lines
        assert int(lines[1].split()[1]) == expected, (script, lines)
        assert run.status().split()[0] == str(expected)
    assert container.pids() == {container.init_pid}


@base.needs_runc
def test_start_up_is_quicker_than_the_script(container: base.Container) -> None:  # noqa: F811
    """What the binary is for: `true` from start to the wrapper's exit, median of 15 each,
    interleaved; the binary must beat the compiled script."""
    process = container.process_json(["true"])
    pyc = runc_exec.fast_script()
    times: dict[str, list[float]] = {"c": [], "pyc": []}
    for _ in range(15):
        for key in times:
            t = time.monotonic()
            run = base.start(container, process=process, script=None if key == "c" else pyc)
            run.lines()
            assert run.wait() == 0
            times[key].append(time.monotonic() - t)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"\nwrapper until exit (median of 15): C {med['c']:.1f} ms, pyc {med['pyc']:.1f} ms")
    assert med["c"] < med["pyc"], med
