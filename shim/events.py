"""Publishing task events to containerd, in order, without ever blocking a request.

Events go to ``containerd.services.events.ttrpc.v1.Events/Forward`` on the containerd ttrpc
socket (TTRPC_ADDRESS), wrapped in an Envelope with a bare type URL
(``containerd.events.TaskExit``: containerd 1.6 rejects the ``type.googleapis.com/`` form).
One sender drains one queue, so events leave in the order they were made; a failed send is
retried with back-off on a fresh connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from google.protobuf.message import Message

from shim import log
from shim.api import events_service_pb2
from shim.ttrpc import Client, TTRPCError

SERVICE = "containerd.services.events.ttrpc.v1.Events"
QUEUE_MAX = 4096
ATTEMPTS = 5
SEND_TIMEOUT = 5.0

TOPICS: dict[str, str] = {
    "TaskCreate": "/tasks/create",
    "TaskStart": "/tasks/start",
    "TaskExit": "/tasks/exit",
    "TaskDelete": "/tasks/delete",
    "TaskOOM": "/tasks/oom",
    "TaskExecAdded": "/tasks/exec-added",
    "TaskExecStarted": "/tasks/exec-started",
    "TaskPaused": "/tasks/paused",
    "TaskResumed": "/tasks/resumed",
    "TaskCheckpointed": "/tasks/checkpointed",
}


def envelope(namespace: str, event: Message, now_ns: int | None = None) -> bytes:
    """The ForwardRequest bytes for one event."""
    name = event.DESCRIPTOR.name
    req = events_service_pb2.ForwardRequest()
    env = req.envelope
    env.timestamp.FromNanoseconds(now_ns if now_ns is not None else time.time_ns())
    env.namespace = namespace
    env.topic = TOPICS[name]
    env.event.type_url = event.DESCRIPTOR.full_name
    env.event.value = event.SerializeToString()
    return req.SerializeToString()


class Publisher:
    def __init__(self, address: str) -> None:
        self.address = address
        self._queue: deque[tuple[str, str, bytes]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="publisher")

    def publish(self, namespace: str, event: Message) -> None:
        """Queue one event; never blocks."""
        if not self.address:
            return
        if len(self._queue) >= QUEUE_MAX:
            self.dropped += 1
            _, topic, _ = self._queue.popleft()
            log.event("event queue full, dropped oldest", logging.ERROR, topic=topic)
        self._queue.append((namespace, TOPICS[event.DESCRIPTOR.name], envelope(namespace, event)))
        self._idle.clear()
        self._wakeup.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued event has been sent (or given up on)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._client is not None:
            await self._client.close()

    async def _send(self, namespace: str, payload: bytes) -> None:
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self.address)
        await self._client.call(
            SERVICE,
            "Forward",
            payload,
            timeout=SEND_TIMEOUT,
            metadata={"containerd-namespace-ttrpc": namespace},
        )

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            namespace, topic, payload = self._queue[0]
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await self._send(namespace, payload)
                    self.sent += 1
                    break
                except (OSError, TTRPCError, TimeoutError) as exc:
                    if self._client is not None:
                        await self._client.close()
                        self._client = None
                    log.event(
                        "event not sent",
                        logging.WARNING,
                        ns=namespace,
                        topic=topic,
                        attempt=attempt,
                        error=exc,
                    )
                    if attempt < ATTEMPTS:
                        await asyncio.sleep(0.2 * attempt)
            else:
                self.dropped += 1
                log.event("event dropped", logging.ERROR, ns=namespace, topic=topic)
            self._queue.popleft()
