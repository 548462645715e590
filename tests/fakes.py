"""Stand-ins the unit tests share."""

from __future__ import annotations

from typing import Any


class RecordingEvents:
    """The daemon's event publisher as tasks use it: records (event type name, event) and
    reports each event as delivered at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []

    def publish(self, namespace: str, event: object, on_sent: object = None) -> None:
        self.sent.append((type(event).__name__, event))
        if callable(on_sent):
            on_sent()
