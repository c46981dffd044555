"""The scheduler service: ``im.schedule`` (queue group ``scheduler``) over the plugin pipeline.

The replica's state and decisions are :class:`~infermesh.libs.scheduling.core.SchedulerCore`
(an ingress that schedules itself runs the same core in its own process); this module answers
the bus with it and serves /health and /metrics.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client

from infermesh.libs.bus import BUS_REGISTRY, BusService, connect, release, reply_error
from infermesh.libs.scheduling.core import ScheduleError, SchedulerCore
from infermesh.libs.scheduling.framework import Pipeline
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto.messages import ScheduleDecision, ScheduleRequest
from infermesh.proto.subjects import QUEUE_SCHEDULER, Subjects

from .config import SchedulerConfig

log = get_logger("scheduler")


class SchedulerService:
    """One scheduler replica. ``await start()``, then ``await stop()``.

    The pipeline is built in the constructor, so a bad profiles file fails before anything
    connects. The core's state (``pods``, ``inflight``, ``metrics``, ``pipeline``, …) reads
    through this object.
    """

    def __init__(
        self, cfg: SchedulerConfig, nc: Client | None = None, pipeline: Pipeline | None = None
    ) -> None:
        self.cfg = cfg
        self.replica = cfg.replica_name()
        self.subjects = Subjects(cfg.subject_prefix)
        # Its local index starts with the first request: where the ingresses decide themselves
        # (schedule_here), this replica is a fallback and need not follow every KV stream.
        self.core = SchedulerCore(cfg, self.replica, self.subjects, pipeline, lazy_index=True)
        self.http_port: int | None = None
        self._nc = nc
        self._own_nc = nc is None
        self._service: BusService | None = None
        self._ops: OpsServer | None = None

    def __getattr__(self, name: str) -> Any:
        # The core's state and methods (pods, inflight, apply_event, prune, …).
        if name == "core":
            raise AttributeError(name)
        return getattr(self.core, name)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Follow the pool on the bus, then answer ``im.schedule``."""
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, f"scheduler-{self.replica}",
                                     security=self.cfg.bus_security())
        nc = self._nc
        await self.core.start(nc)
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.core.metrics.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        # A fresh replica knows no pod: hear a round of heartbeats before taking requests, so it
        # does not answer "no engine" while the other replicas would not.
        await asyncio.sleep(self.cfg.warmup_s)
        svc = BusService(
            nc,
            "infermesh-scheduler",
            description="Picks an engine for each request (plugin pipeline)",
            registry=self.core.metrics.registry,
            metadata={"replica": self.replica},
        )
        svc.endpoint(
            "schedule",
            self.subjects.schedule,
            ScheduleRequest,
            self._on_schedule,
            queue_group=QUEUE_SCHEDULER,
        )
        await svc.start()
        self._service = svc
        log.info(
            "scheduler_started",
            replica=self.replica,
            profiles=sorted(self.core.pipeline.profiles),
            default_profile=self.core.pipeline.default_profile,
            http_port=self.http_port,
        )

    async def stop(self) -> None:
        """Stop answering and following the bus (idempotent)."""
        # Stop answering first, so the queue group hands new requests to the other replicas.
        await release(service=self._service)
        self._service = None
        await self.core.stop()
        await release(ops=self._ops, nc=self._nc if self._own_nc else None)
        self._ops = None
        if self._own_nc:
            self._nc = None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected and self._service is not None
        return ok, self.core.health()

    # ------------------------------------------------------------------ im.schedule

    async def _on_schedule(self, req: ScheduleRequest) -> ScheduleDecision:
        try:
            return await self.core.decide(req)
        except ScheduleError as e:
            raise reply_error(e.status, e.message) from None
