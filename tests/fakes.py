"""Stand-ins the unit tests share."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shim.exits.exitwatch import ExitWatch
from shim.exits.reaper import Reaper
from shim.store.statestore import StateStore
from shim.tasks.task import Deps, Tasks
from shim.util.paths import DaemonPaths


class RecordingEvents:
    """The daemon's event publisher as tasks use it: records (event type name, event) and
    reports each event as delivered at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def publish(self, namespace: str, event: object, on_sent: object = None) -> None:
        self.sent.append((type(event).__name__, event))
        if callable(on_sent):
            on_sent()


def bundle_dir(tmp_path: Path) -> Path:
    """A bundle a restore takes back: a directory with a config.json naming a rootfs."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}}')
    return bundle


def restored_tasks(tmp_path: Path, store: StateStore, events: object, **deps: Any) -> Tasks:
    """The tasks ``store`` records, taken back as a restarted daemon takes them (call in a
    running loop; :func:`close_tasks` after)."""
    loop = asyncio.get_running_loop()
    reaper = Reaper(loop)
    tasks = Tasks(Deps(DaemonPaths(str(tmp_path)), reaper, ExitWatch(loop, reaper), store,
                       events, **deps))  # type: ignore[arg-type]  # fmt: skip
    tasks.restore()
    return tasks


def close_tasks(tasks: Tasks) -> None:
    for t in tasks.all():
        t.close()
    tasks.deps.reaper.close()
