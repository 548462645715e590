"""The daemon's side of ``watch``: which cgroup is which container, the ring-buffer consumer,
and the stream to watchers on ``<daemon dir>/watch.sock``.

Protocol (newline-delimited JSON, one request then a stream): the client sends
``{"filter": {...}, "after": <ktime>}`` and then reads events, one JSON object a line, until
either side closes; or ``{"stats": true}`` and reads one JSON object back.  ``after`` (the
``ktime`` of the last event it printed) is how a watcher resumes across a daemon reload or
restart without loss: the ring buffer's consumer position is in the kernel, so what the old
image did not read waits there, and the new image, finding ``config.watching`` still set,
reads it into a backlog it keeps for :data:`RESUME_GRACE` seconds for watchers to come
back.  A fresh watcher starts from the moment it connects.

Cost: with no watcher the ring is not read and ``config.watching`` is 0, so the kernel side
does one map lookup per exec/exit on the node plus, in our containers, a counter increment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from shim.util import log
from shim.watch.watchevents import (
    RUNC_HELPER_PREFIX,
    Filter,
    boot_to_wall_offset,
    complete,
    decode,
    json_line,
    tags_from_annotations,
)

if TYPE_CHECKING:
    from shim.exits.libbpf import RingBuffer
    from shim.tasks.task import Task
    from shim.util.paths import DaemonPaths
    from shim.watch.watchprobe import WatchProbe

SOCKET = "watch.sock"
RESUME_GRACE = 15.0  # seconds a reloaded daemon keeps unread events for returning watchers
RETIRED_TTL = 30.0  # seconds a deleted container's tags still name its last events
BACKLOG_MAX = 200_000
CLIENT_BUFFER_MAX = 8 << 20  # bytes queued for one watcher before its events are dropped
DROP_CHECK = 1.0
#: after reading the ring, wait this long before listening again: the kernel wakes the reader
#: for each event it finds caught up, so at thousands of events a second this turns
#: thousands of wake-ups into a few dozen batches (events arrive at most this much later)
BATCH_DELAY = 0.02


def socket_path(paths: DaemonPaths) -> str:
    return os.path.join(paths.dir, SOCKET)


class _Watcher:
    def __init__(self, writer: asyncio.StreamWriter, flt: Filter, after: int) -> None:
        self.writer = writer
        self.filter = flt
        self.after = after
        self.dropped = 0  # events not queued because the watcher reads too slowly
        self._pending: list[bytes] = []

    def send(self, ev: dict[str, Any], line: bytes) -> None:
        """Queue ``ev`` if the watcher wants it (written by :meth:`flush`, once a batch)."""
        if ev["ktime"] > self.after and self.filter.match(ev):
            self._pending.append(line)

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > CLIENT_BUFFER_MAX:
            self.dropped += len(lines)
            return
        if self.dropped:
            where = "daemon: watcher too slow"
            self.notice({"event": "drops", "where": where, "dropped": self.dropped})
            self.dropped = 0
        self.writer.write(b"".join(lines))

    def notice(self, ev: dict[str, Any]) -> None:
        if not self.writer.transport.is_closing():
            self.writer.write(json_line(ev).encode())


class WatchHub:
    """Containers' cgroup ids in the kernel map, and the event stream to watchers."""

    def __init__(self, paths: DaemonPaths, probe: WatchProbe | None) -> None:
        self.paths = paths
        self.probe = probe
        self._tags: dict[int, dict[str, str]] = {}
        self._by_task: dict[tuple[str, str], int] = {}
        self._retired: dict[int, tuple[dict[str, str], float]] = {}
        self._watchers: set[_Watcher] = set()
        self._ring: RingBuffer | None = None
        self._ring_fd = -1
        self._samples: list[bytes] = []
        self._backlog: collections.deque[tuple[dict[str, Any], bytes]] | None = None
        self._grace: asyncio.TimerHandle | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        self._paused: asyncio.TimerHandle | None = None
        self._drops_seen = 0
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ containers

    def add(self, task: Task) -> None:
        """Attribute the events of ``task``'s cgroup to it (its init must be alive)."""
        if self.probe is None or (task.namespace, task.id) in self._by_task:
            return
        from shim.watch.watchprobe import cgroup_id_of_pid

        cgid = cgroup_id_of_pid(task.init.pid) if task.init.pid else None
        if cgid is None:
            log.event("watch: no cgroup v2 id for the container", ns=task.namespace, id=task.id)
            return
        try:
            self.probe.add_container(cgid)
        except OSError as exc:
            log.event("watch: cannot add the container", logging.WARNING, id=task.id, error=exc)
            return
        annotations = task.bundle.config.get("annotations")
        self._tags[cgid] = tags_from_annotations(task.namespace, task.id, annotations)
        self._by_task[(task.namespace, task.id)] = cgid
        self._retired.pop(cgid, None)

    def remove(self, task: Task) -> None:
        cgid = self._by_task.pop((task.namespace, task.id), None)
        if cgid is None or self.probe is None:
            return
        with contextlib.suppress(OSError):
            self.probe.remove_container(cgid)
        tags = self._tags.pop(cgid, None)
        if tags is not None:
            self._retired[cgid] = (tags, time.monotonic() + RETIRED_TTL)

    def prune(self) -> None:
        """Drop map entries of containers that are not ours any more (deleted while no
        daemon ran): after restore, every live container of ours has been added."""
        if self.probe is None:
            return
        try:
            for cgid, _ in list(self.probe.containers()):
                if cgid not in self._tags:
                    self.probe.remove_container(cgid)
        except OSError as exc:
            log.event("watch: pruning the container map failed", logging.WARNING, error=exc)

    def stats(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        drops = 0
        if self.probe is not None:
            for cgid, counters in self.probe.containers():
                tags = self._tags.get(cgid)
                if tags is not None:
                    rows.append({**tags, **counters})
            drops = self.probe.drops()
        return {"containers": rows, "drops": drops}

    # ------------------------------------------------------------ server

    async def start(self) -> None:
        path = socket_path(self.paths)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve, path)
        os.chmod(path, 0o600)
        self.prune()
        if self.probe is not None and self.probe.watching:
            # The previous image had watchers (reload, crash): keep what it left unread.
            self._backlog = collections.deque(maxlen=BACKLOG_MAX)
            self._start_ring()
            self._grace = asyncio.get_running_loop().call_later(RESUME_GRACE, self._end_grace)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve_one(reader, writer)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = json.loads(await asyncio.wait_for(reader.readline(), 10.0) or b"{}")
        if not isinstance(req, dict):
            return
        if req.get("stats"):
            writer.write(json.dumps(self.stats()).encode() + b"\n")
            await writer.drain()
            return
        if self.probe is None:
            writer.write(json_line({"event": "error", "message": "no BPF watch program"}).encode())
            await writer.drain()
            return
        after = req.get("after")
        if not isinstance(after, int) or after <= 0:
            after = 0
        start = after or time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        w = _Watcher(writer, Filter.from_json(req.get("filter")), start)
        w.notice({"event": "hello", "daemon_pid": os.getpid(), "drops": self.probe.drops()})
        if after and self._backlog:
            for ev, line in self._backlog:
                w.send(ev, line)
            w.flush()
        self._watchers.add(w)
        self._start_ring()
        try:
            while await reader.read(4096):
                pass  # nothing more is expected; EOF: the watcher went away
        finally:
            self._watchers.discard(w)
            if not self._watchers and self._grace is None:
                self._stop_ring()

    # ------------------------------------------------------------ ring

    def _start_ring(self) -> None:
        if self._ring is not None or self.probe is None:
            return
        from shim.exits.libbpf import RingBuffer

        self.probe.watching = True
        self._ring = RingBuffer(self.probe.events_fd(), self._on_sample)
        self._ring_fd = self._ring.epoll_fd()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._ring_fd, self._readable)
        self._drops_seen = self.probe.drops()
        self._drop_timer = loop.call_later(DROP_CHECK, self._check_drops)
        log.event("watch: streaming", watchers=len(self._watchers))

    def _stop_ring(self, keep_watching: bool = False) -> None:
        if self._ring is None:
            return
        asyncio.get_running_loop().remove_reader(self._ring_fd)
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
        if not keep_watching and self.probe is not None:
            self.probe.watching = False
            with contextlib.suppress(OSError):
                self._ring.consume()  # what came in meanwhile: nobody wants it
            self._samples.clear()
        self._ring.close()
        self._ring = None
        log.event("watch: stopped", keep_watching=keep_watching)

    def _on_sample(self, data: bytes) -> None:
        self._samples.append(data)

    def _end_grace(self) -> None:
        self._grace = None
        self._backlog = None
        if not self._watchers:
            self._stop_ring()

    def _readable(self) -> None:
        try:
            if self._ring is not None:
                self._ring.consume()
            self._dispatch()
        except Exception as exc:  # a watcher must never take the daemon down
            log.event("watch: consuming the ring failed", logging.ERROR, error=exc)
            self._samples.clear()
        if self._ring is not None and self._paused is None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._ring_fd)
            self._paused = loop.call_later(BATCH_DELAY, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._ring is not None:  # level-triggered: fires at once if events wait
            asyncio.get_running_loop().add_reader(self._ring_fd, self._readable)

    def _dispatch(self) -> None:
        samples, self._samples = self._samples, []
        if not samples:
            return
        offset = boot_to_wall_offset()
        now = time.monotonic()
        for data in samples:
            got = decode(data)
            if got is None:
                continue
            cgid, ev = got
            tags = self._tags.get(cgid)
            if tags is None:
                retired = self._retired.get(cgid)
                if retired is None:
                    continue
                tags = retired[0]
            if ev["comm"].startswith(RUNC_HELPER_PREFIX):
                continue
            out = complete(ev, tags, offset)
            line = json_line(out).encode()
            if self._backlog is not None:
                self._backlog.append((out, line))
            for w in self._watchers:
                w.send(out, line)
        for w in self._watchers:
            w.flush()
        if self._retired:
            for cgid in [c for c, (_, until) in self._retired.items() if until < now]:
                del self._retired[cgid]

    def _check_drops(self) -> None:
        self._drop_timer = asyncio.get_running_loop().call_later(DROP_CHECK, self._check_drops)
        if self.probe is None:
            return
        try:
            total = self.probe.drops()
        except OSError:
            return
        if total > self._drops_seen:
            notice: dict[str, Any] = {"event": "drops", "where": "kernel: ring buffer full"}
            notice.update(dropped=total - self._drops_seen, total=total)
            self._drops_seen = total
            log.event("watch: events dropped", logging.WARNING, dropped=notice["dropped"])
            for w in self._watchers:
                w.notice(notice)

    # ------------------------------------------------------------ end

    async def _drain(self, timeout: float) -> None:
        writers = [w.writer for w in self._watchers]
        if writers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*(wr.drain() for wr in writers), return_exceptions=True),
                    timeout,
                )

    async def handoff(self) -> None:
        """Before a re-exec: send what was read, leave the rest in the ring (and
        ``config.watching`` as it is) for the new image and the watchers' return."""
        if self._ring is not None:
            self._readable()
            self._stop_ring(keep_watching=bool(self._watchers) or self._grace is not None)
        await self._drain(2.0)
        await self._close_server()

    async def close(self) -> None:
        """The daemon stops for good: nothing is watched any more."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._ring is not None:
            self._readable()
        await self._drain(2.0)
        self._stop_ring()
        await self._close_server()
        if self.probe is not None:
            self.probe.close()

    async def _close_server(self) -> None:
        for w in list(self._watchers):
            w.writer.close()
        for t in list(self._handlers):
            t.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.paths))


def open_hub(paths: DaemonPaths) -> WatchHub:
    """The hub, with the pinned watch program if BPF allows (said once in the log if not)."""
    probe = None
    if os.environ.get("EMBEDSHIM_BPF", "").lower() not in ("off", "0", "no"):
        from shim.watch.watchprobe import WatchProbe

        try:
            probe = WatchProbe.open(paths.bpf_pin_root)
        except Exception as exc:
            log.event(
                "watch: BPF program unavailable; `watch` has nothing to show",
                logging.WARNING,
                error=exc,
            )
    return WatchHub(paths, probe)
