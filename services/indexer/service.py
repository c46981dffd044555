"""The indexer service: the bus around a :class:`KVIndex` kept by an :class:`IndexFollower`.

Every replica subscribes to every pod's KV stream (``im.kv.*.*``, no queue group) and heartbeats
(``im.pod.*.*``), and answers ``im.index.lookup`` in the ``indexer`` queue group. Snapshots are
asked of a pod's agent on ``im.snapshot.<pod>``, one at a time per pod, with backoff
(``libs/kvindex``, shared with the schedulers' local index).
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.client import Client

from infermesh.libs.bus import BUS_REGISTRY, BusService, connect, release, settle
from infermesh.libs.kvindex import IndexFollower, KVIndex, StreamTracker
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto.messages import LookupReply, LookupRequest
from infermesh.proto.subjects import QUEUE_INDEXER, Subjects

from .config import IndexerConfig
from .metrics import IndexerMetrics

log = get_logger("indexer")


class IndexerService:
    """One indexer replica. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: IndexerConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.index = KVIndex(
            cfg.max_blocks,
            retired_per_pod=cfg.retired_per_pod,
            orphans_per_pod=cfg.orphans_per_pod,
            storage_ttl_s=cfg.storage_ttl_s,
            storage_max_blocks=cfg.storage_max_blocks,
        )
        self.tracker = StreamTracker(
            self.index,
            pod_timeout_s=cfg.pod_timeout_s,
            pod_late_s=cfg.pod_late_s,
            kv_seq_grace_s=cfg.kv_seq_grace_s,
            backoff_s=cfg.snapshot_backoff_s,
            backoff_max_s=cfg.snapshot_backoff_max_s,
            max_buffered=cfg.max_buffered_batches,
        )
        self.metrics = IndexerMetrics(self.tracker)
        self._nc = nc
        self._own_nc = nc is None
        self.follower: IndexFollower | None = None
        self._service: BusService | None = None
        self._ops: OpsServer | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, subscribe, and start answering lookups."""
        if self._nc is None:
            self._nc = await connect(self.cfg.nats_url, "indexer",
                                     security=self.cfg.bus_security())
        nc = self._nc
        s = self.subjects
        self.follower = IndexFollower(
            nc, s, self.tracker, snapshot_timeout_s=self.cfg.snapshot_timeout_s,
            snapshot_part_blocks=self.cfg.snapshot_part_blocks, log_name="indexer")
        await self.follower.start()
        svc = BusService(nc, "infermesh-indexer", description="KV block index",
                         registry=self.metrics.registry)
        svc.endpoint("lookup", s.index_lookup, LookupRequest, self._on_lookup,
                     queue_group=QUEUE_INDEXER)
        await svc.start()
        self._service = svc
        await settle(nc)
        if self.cfg.http_port >= 0:
            self._ops = OpsServer([self.metrics.registry, BUS_REGISTRY], self._health)
            self.http_port = await self._ops.start(self.cfg.http_host, self.cfg.http_port)
        log.info("indexer_started", subject=s.index_lookup, http_port=self.http_port,
                 max_blocks=self.cfg.max_blocks)

    async def stop(self) -> None:
        """Stop everything this indexer started."""
        if self.follower is not None:
            await self.follower.stop()
            self.follower = None
        await release(service=self._service, ops=self._ops,
                      nc=self._nc if self._own_nc else None)
        self._service, self._ops = None, None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        return ok, {
            "pods": len(self.tracker.streams),
            "syncing": self.tracker.syncing(),
            "keys": len(self.index),
            "entries": self.index.entries,
        }

    # ------------------------------------------------------------------ lookups

    async def _on_lookup(self, req: LookupRequest) -> LookupReply:
        t0 = time.perf_counter()
        matches = self.index.lookup(req.block_keys, req.pods)
        self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return LookupReply(matches=matches)
