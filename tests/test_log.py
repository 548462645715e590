"""daemon.log is bounded: rotated by size, a fixed number of files kept, whoever appends."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.util import log


@pytest.fixture(autouse=True)
def _root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """setup() replaces the root logger's handlers: put them back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.delenv(log.SIZE_ENV, raising=False)
    monkeypatch.delenv(log.FILES_ENV, raising=False)
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.parent.iterdir())}


def _lines(path: Path) -> list[str]:
    """Every line of daemon.log and its rotated files, oldest first."""
    names = sorted(
        (p for p in path.parent.iterdir() if p.name.startswith(path.name)),
        key=lambda p: -int(p.name.rpartition(".")[2]) if p.name != path.name else 0,
    )
    return [ln for p in names for ln in p.read_text().splitlines()]


def test_defaults() -> None:
    assert log.rotation() == (10 << 20, 3, [])
    assert (log.DEFAULT_SIZE, log.DEFAULT_FILES) == (10 * 1024 * 1024, 3)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64K", 65536), ("10M", 10 << 20), ("1g", 1 << 30), ("2MiB", 2 << 20)],
)
def test_sizes(text: str, size: int) -> None:
    assert log.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "0", "ten", "1.5M", "10T"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        log.parse_size(text)


def test_bad_settings_fall_back_to_the_defaults_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(log.SIZE_ENV, "lots")
    monkeypatch.setenv(log.FILES_ENV, "1")  # one file could not be rotated
    path = tmp_path / "daemon.log"
    log.setup(str(path))
    text = path.read_text()
    assert text.count("log rotation setting ignored") == 2
    assert "EMBEDSHIM_LOG_SIZE=" in text and "EMBEDSHIM_LOG_FILES=" in text
    handler = logging.getLogger().handlers[0]
    assert (getattr(handler, "max_bytes", None), getattr(handler, "files", None)) == (10 << 20, 3)
    # A size below 4 KiB is taken as 4 KiB (a line or two per file would be no log at all).
    monkeypatch.setenv(log.SIZE_ENV, "100")
    monkeypatch.delenv(log.FILES_ENV)
    assert log.rotation() == (4096, 3, [])


def test_writing_past_the_cap_keeps_the_files_within_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(log.SIZE_ENV, "8K")
    monkeypatch.setenv(log.FILES_ENV, "3")
    path = tmp_path / "daemon.log"
    log.setup(str(path))
    written = 0
    for i in range(2000):  # about 230 KB: 28 times the cap of one file
        log.event("container created", ns="k8s.io", id=f"c{i:05d}", pid=100000 + i)
        written += 1
    files = _files(path)
    assert set(files) == {"daemon.log", "daemon.log.1", "daemon.log.2"}
    assert all(size <= 8192 for size in files.values()), files
    assert sum(files.values()) <= 3 * 8192
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "daemon.log.1").stat().st_mode & 0o777) == "0o600"
    # The newest lines are kept, whole and in order, and the oldest are gone.
    lines = _lines(path)
    ids = [int(ln.split(" id=c")[1].split()[0]) for ln in lines]
    assert ids == list(range(ids[0], written)) and ids[0] > 0
    assert all(ln.startswith("time=") and ln.endswith(f"pid={100000 + i}") for ln, i in
               zip(lines, ids, strict=True))  # fmt: skip


def test_a_writer_that_opens_the_file_for_each_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper appends its own lines to daemon.log (open, O_APPEND, write, close): they
    go to whichever file is current, count towards its size, and none is lost."""
    monkeypatch.setenv(log.SIZE_ENV, "4K")
    monkeypatch.setenv(log.FILES_ENV, "50")  # room for every line: nothing rotated away
    path = tmp_path / "daemon.log"
    log.setup(str(path))
    keeper = 'time=2026-01-01T00:00:00.000Z level=info msg="keeper: line" n={}\n'
    for i in range(400):
        log.event("container started", id=f"c{i:04d}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, keeper.format(i).encode())
        finally:
            os.close(fd)
    files = _files(path)
    assert len(files) > 10
    longest = len(keeper.format(999))
    assert all(size <= 4096 + longest for size in files.values()), files
    lines = _lines(path)
    assert [ln for ln in lines if "keeper" in ln] == [keeper.format(i)[:-1] for i in range(400)]
    assert [ln.rpartition("id=")[2] for ln in lines if "keeper" not in ln] == [
        f"c{i:04d}" for i in range(400)
    ]


def test_event_lines_are_the_same_with_or_without_other_handlers(tmp_path: Path) -> None:
    """event() writes daemon.log itself while it is the only handler (the daemon's case) and
    goes through logging otherwise (another handler, e.g. a test's): the same line both ways."""
    path = tmp_path / "daemon.log"
    log.setup(str(path))
    fields = {"ns": "k8s.io", "id": "c 1", "exec_id": "e=1", "pid": 42, "status": 0}
    log.event("exec exited", logging.WARNING, **fields)
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    try:
        log.event("exec exited", logging.WARNING, **fields)
    finally:
        logging.getLogger().removeHandler(other)
    log.event("not shown", logging.DEBUG, **fields)  # below the level: nothing either way
    direct, through_logging = (ln.split(" ", 1) for ln in _lines(path))
    assert direct[0].startswith("time=") and direct[0].endswith("Z")
    assert (
        direct[1]
        == through_logging[1]
        == ('level=warning msg="exec exited" ns=k8s.io id="c 1" exec_id="e=1" pid=42 status=0')
    )


def test_event_lines_wait_for_the_loop_step_and_keep_their_order(tmp_path: Path) -> None:
    """Inside the event loop an event's line is written once the current step is over (the
    answer that step writes goes first), in order with lines that go through logging, and
    logging.shutdown() (before the daemon exits or re-executes) writes any still queued."""
    import asyncio

    path = tmp_path / "daemon.log"
    log.setup(str(path))

    async def step() -> list[str]:
        log.event("first", id="a")
        log.event("second", id="b")
        written_in_step = path.read_text().splitlines()
        logging.getLogger("embedshim.test").warning("through logging")
        log.event("third", id="c")
        await asyncio.sleep(0)
        return written_in_step

    assert asyncio.run(step()) == []
    msgs = [ln.split(" msg=")[1].split(" ")[0] for ln in _lines(path)]
    assert msgs == ["first", "second", '"through', "third"]

    async def before_exit() -> None:
        log.event("last words")
        logging.shutdown()  # what the daemon does before os._exit / os.execve

    asyncio.run(before_exit())
    assert _lines(path)[-1].endswith('msg="last words"')
