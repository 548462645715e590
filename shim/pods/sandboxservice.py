"""The containerd.runtime.sandbox.v1.Sandbox service: decode, call shim.pods.sandbox, encode.

containerd 2.x's ``shim`` sandbox controller calls it on the address ``start`` printed for
the sandbox's id, for pods of a CRI handler with ``sandboxer = "shim"``.  Every call may be
sent again by a restarted daemon (shim.ttrpc.journal) and converges on the same end:
Create and Start of a sandbox that exists answer as done (a Start the dead daemon had not
finished first removes the holder it left, see shim.pods.sandbox.stale_holders), Stop and
Shutdown of one that is gone succeed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, MutableMapping

from shim.api import sandbox_pb2 as pb
from shim.pods.sandbox import HOLDER, NOTREADY, READY, Sandboxes, goarch, pod_config
from shim.tasks.handlers import guard, unless_gone
from shim.tasks.handlers import parse as _parse
from shim.tasks.service import NAMESPACE_KEY
from shim.ttrpc import Context, Handler
from shim.util import errors, identifiers

SANDBOX_SERVICE = "containerd.runtime.sandbox.v1.Sandbox"
RUNTIME_TYPE = "io.containerd.embed.v1"
EMPTY = b""


class SandboxService:
    def __init__(
        self,
        sandboxes: Sandboxes,
        reservations: MutableMapping[tuple[str, str], float],
    ) -> None:
        self.sandboxes = sandboxes
        #: `start`'s reservations (TaskService's): CreateSandbox claims the one for its id
        self.reservations = reservations

    def methods(self) -> dict[str, Handler]:
        table: dict[str, Callable[[Context, bytes], object]] = {
            "CreateSandbox": self.create,
            "StartSandbox": self.start,
            "Platform": self.platform,
            "StopSandbox": self.stop,
            "WaitSandbox": self.wait,
            "SandboxStatus": self.status,
            "PingSandbox": self.ping,
            "ShutdownSandbox": self.shutdown,
            "SandboxMetrics": self.metrics,
        }
        return {name: guard(name, fn) for name, fn in table.items()}  # type: ignore[arg-type]

    @staticmethod
    def _key(ctx: Context, id: str) -> tuple[str, str]:
        ns = ctx.get(NAMESPACE_KEY) or ctx.connection.get("namespace")
        if not isinstance(ns, str) or not ns:
            raise errors.invalid(f"no namespace on this request ({NAMESPACE_KEY})")
        return identifiers.validate("namespace", ns), identifiers.validate("id", id)

    async def create(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.CreateSandboxRequest, payload)
        ns, id = self._key(ctx, req.sandbox_id)
        config = pod_config(req.options.type_url, req.options.value)
        self.reservations.pop((ns, id), None)
        self.sandboxes.create(ns, id, req.bundle_path, req.netns_path, config.SerializeToString())
        return EMPTY

    async def start(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.StartSandboxRequest, payload)
        sb = await self.sandboxes.start(*self._key(ctx, req.sandbox_id))
        resp = pb.StartSandboxResponse(pid=sb.rec.pid)
        resp.created_at.FromNanoseconds(sb.rec.created_at)
        return resp.SerializeToString()

    async def platform(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.PlatformRequest, payload)
        self.sandboxes.get(*self._key(ctx, req.sandbox_id))
        return pb.PlatformResponse(
            platform=pb.Platform(os="linux", architecture=goarch())
        ).SerializeToString()

    async def stop(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.StopSandboxRequest, payload)
        ns, id = self._key(ctx, req.sandbox_id)
        if self.sandboxes.find(ns, id) is not None:
            await self.sandboxes.stop(ns, id, float(req.timeout_secs))
        return EMPTY

    async def wait(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.WaitSandboxRequest, payload)
        rec = await unless_gone(ctx, self.sandboxes.wait(*self._key(ctx, req.sandbox_id)))
        resp = pb.WaitSandboxResponse(exit_status=rec.exit_status or 0)
        resp.exited_at.FromNanoseconds(rec.exited_at or 0)
        return resp.SerializeToString()

    async def status(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.SandboxStatusRequest, payload)
        sb = self.sandboxes.get(*self._key(ctx, req.sandbox_id))
        resp = pb.SandboxStatusResponse(
            sandbox_id=req.sandbox_id,
            pid=sb.rec.pid,
            state=READY if sb.running else NOTREADY,
        )
        resp.created_at.FromNanoseconds(sb.rec.created_at)
        if sb.rec.exited_at is not None:
            resp.exited_at.FromNanoseconds(sb.rec.exited_at)
        if req.verbose:  # CRI's verbose PodSandboxStatus shows "info" as it is
            resp.info["info"] = json.dumps(
                {
                    "pid": sb.rec.pid,
                    "processStatus": "running" if sb.running else "stopped",
                    "runtimeType": RUNTIME_TYPE,
                    "sandboxer": "shim",
                    "holder": HOLDER,
                    "netns": sb.rec.netns,
                    "cgroups": sb.rec.cgroups,
                }
            )
        return resp.SerializeToString()

    async def ping(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.PingRequest, payload)
        self.sandboxes.get(*self._key(ctx, req.sandbox_id))
        return EMPTY

    async def shutdown(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.ShutdownSandboxRequest, payload)
        await self.sandboxes.shutdown(*self._key(ctx, req.sandbox_id))
        return EMPTY

    async def metrics(self, ctx: Context, payload: bytes) -> bytes:
        req = _parse(pb.SandboxMetricsRequest, payload)
        self.sandboxes.get(*self._key(ctx, req.sandbox_id))
        resp = pb.SandboxMetricsResponse(metrics=pb.Metric(id=req.sandbox_id))
        resp.metrics.timestamp.FromNanoseconds(time.time_ns())
        return resp.SerializeToString()
