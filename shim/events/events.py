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
from collections.abc import Callable

from google.protobuf.message import Message

from shim.api import events_service_pb2
from shim.ttrpc import Client, TTRPCError
from shim.util import log

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_METADATA = "containerd-namespace-ttrpc"
QUEUE_MAX = 4096
SEND_TIMEOUT = 5.0
# containerd may be down for a restart: keep an event (and those behind it, in order) for
# this long, retrying with back-off, before giving up on it.
RETRY_FOR = 120.0
BACKOFF_MAX = 2.0

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
        self._queue: deque[tuple[str, str, bytes, Callable[[], None] | None]] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="publisher")

    def publish(
        self, namespace: str, event: Message, on_sent: Callable[[], None] | None = None
    ) -> None:
        """Queue one event; never blocks.  ``on_sent`` runs once containerd has it."""
        if not self.address:
            return
        if len(self._queue) >= QUEUE_MAX:
            self.dropped += 1
            _, topic, _, _ = self._queue.popleft()
            log.event("event queue full, dropped oldest", logging.ERROR, topic=topic)
        payload = envelope(namespace, event)
        self._queue.append((namespace, TOPICS[event.DESCRIPTOR.name], payload, on_sent))
        self._idle.clear()
        self._wakeup.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued event has been sent (or given up on)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            pass

    async def detach(self) -> list[tuple[str, str, bytes, bool]]:
        """Stop sending and return what was not sent yet, as (namespace, topic, payload,
        has_on_sent), for a daemon that re-execs itself to send after it."""
        await self.close()
        items = [(ns, topic, payload, cb is not None) for ns, topic, payload, cb in self._queue]
        self._queue.clear()
        return items

    def requeue(
        self, namespace: str, topic: str, payload: bytes, on_sent: Callable[[], None] | None = None
    ) -> None:
        """Queue an already encoded event (handed over by the previous daemon image)."""
        self._queue.append((namespace, topic, payload, on_sent))
        self._idle.clear()
        self._wakeup.set()

    async def close(self) -> None:
        """Stop the sender and its connection; what is still queued stays queued."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _send(self, namespace: str, payload: bytes) -> None:
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self.address)
        await self._client.call(
            SERVICE,
            "Forward",
            payload,
            timeout=SEND_TIMEOUT,
            metadata={NAMESPACE_METADATA: namespace},
        )

    @staticmethod
    def _call(on_sent: Callable[[], None], namespace: str, topic: str) -> None:
        """A failing callback must not end the one sender every container's events use."""
        try:
            on_sent()
        except Exception as exc:
            log.event("after-send hook failed", logging.ERROR, ns=namespace, topic=topic, error=exc)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            namespace, topic, payload, on_sent = self._queue[0]
            give_up = time.monotonic() + RETRY_FOR
            attempt = 0
            while True:
                attempt += 1
                try:
                    await self._send(namespace, payload)
                    self.sent += 1
                    if on_sent is not None:
                        self._call(on_sent, namespace, topic)
                    break
                except (OSError, TTRPCError, TimeoutError) as exc:
                    if self._client is not None:
                        await self._client.close()
                        self._client = None
                    if attempt == 1 or attempt % 10 == 0:
                        log.event(
                            "event not sent, retrying",
                            logging.WARNING,
                            ns=namespace,
                            topic=topic,
                            attempt=attempt,
                            error=exc,
                        )
                    if time.monotonic() > give_up:
                        self.dropped += 1
                        log.event("event dropped", logging.ERROR, ns=namespace, topic=topic)
                        break
                    await asyncio.sleep(min(BACKOFF_MAX, 0.05 * 2**attempt))
            self._queue.popleft()
