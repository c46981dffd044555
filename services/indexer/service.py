"""The indexer service: the bus around a :class:`KVIndex` and its :class:`StreamTracker`.

Every replica subscribes to every pod's KV stream (``im.kv.*.*``, no queue group) and heartbeats
(``im.pod.*.*``), and answers ``im.index.lookup`` in the ``indexer`` queue group. Snapshots are
asked of a pod's agent on ``im.snapshot.<pod>``, one at a time per pod, with backoff.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from infermesh.libs.bus import (
    BUS_REGISTRY,
    BusError,
    BusService,
    cancel_tasks,
    connect,
    release,
    request_parts,
    settle,
)
from infermesh.libs.telemetry import get_logger
from infermesh.libs.telemetry.ops import OpsServer
from infermesh.proto import codec
from infermesh.proto.messages import (
    KVEventBatch,
    LookupReply,
    LookupRequest,
    PodState,
    Snapshot,
    SnapshotRequest,
)
from infermesh.proto.subjects import QUEUE_INDEXER, Subjects

from .config import IndexerConfig
from .index import KVIndex
from .metrics import IndexerMetrics
from .streams import StreamTracker

log = get_logger("indexer")

# A KV stream can burst (an agent's rebuild, a snapshot-sized batch): let nats-py queue a lot
# rather than drop messages as a slow consumer, which would only cost a snapshot later.
_PENDING_MSGS = 1_000_000
_PENDING_BYTES = 1 << 30


class IndexerService:
    """One indexer replica. ``await start()``, then ``await stop()``."""

    def __init__(self, cfg: IndexerConfig, nc: Client | None = None) -> None:
        self.cfg = cfg
        self.subjects = Subjects(cfg.subject_prefix)
        self.index = KVIndex(
            cfg.max_blocks,
            retired_per_pod=cfg.retired_per_pod,
            orphans_per_pod=cfg.orphans_per_pod,
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
        self._subs: list[Any] = []
        self._snapshots: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
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
        self._subs = [
            await nc.subscribe(s.kv_all, cb=self._on_kv,
                               pending_msgs_limit=_PENDING_MSGS,
                               pending_bytes_limit=_PENDING_BYTES),
            await nc.subscribe(s.pod_state_all, cb=self._on_pod,
                               pending_msgs_limit=_PENDING_MSGS,
                               pending_bytes_limit=_PENDING_BYTES),
        ]
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
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="indexer-sweep")]
        log.info("indexer_started", subject=s.index_lookup, http_port=self.http_port,
                 max_blocks=self.cfg.max_blocks)

    async def stop(self) -> None:
        """Stop everything this indexer started."""
        await cancel_tasks(self._tasks + list(self._snapshots.values()))
        self._tasks, self._snapshots = [], {}
        await release(service=self._service, subs=self._subs, ops=self._ops,
                      nc=self._nc if self._own_nc else None)
        self._service, self._subs, self._ops = None, [], None

    def _health(self) -> tuple[bool, dict[str, Any]]:
        ok = self._nc is not None and self._nc.is_connected
        return ok, {
            "pods": len(self.tracker.streams),
            "syncing": self.tracker.syncing(),
            "keys": len(self.index),
            "entries": self.index.entries,
        }

    # ------------------------------------------------------------------ bus input

    async def _on_kv(self, msg: Msg) -> None:
        where = self.subjects.parse_kv(msg.subject)
        if where is None:
            return  # not <prefix>.kv.<pool>.<pod> (the subscription only delivers those)
        try:
            b = codec.decode(msg.data, KVEventBatch)
        except codec.DecodeError as e:
            self._bad("kv", msg.subject, e)
            return
        if b.pod != where[1]:
            self._bad("kv", msg.subject, f"batch names pod {b.pod!r}")
            return
        try:
            need = self.tracker.on_batch(b, time.monotonic())
        except Exception:  # a bug must not stop the stream; the pod resyncs from a snapshot
            log.exception("batch_failed", pod=b.pod, seq=b.seq)
            need = True
            s = self.tracker.streams.get(b.pod)
            if s is not None:
                s.syncing = True
        if need:
            self._want_snapshot(b.pod)

    async def _on_pod(self, msg: Msg) -> None:
        where = self.subjects.parse_pod_state(msg.subject)
        try:
            st = codec.decode(msg.data, PodState)
        except codec.DecodeError as e:
            self._bad("pod", msg.subject, e)
            return
        if where is None or st.pod != where[1]:
            self._bad("pod", msg.subject, f"heartbeat names pod {st.pod!r}")
            return
        if self.tracker.on_heartbeat(st, time.monotonic()):
            self._want_snapshot(st.pod)

    def _bad(self, stream: str, subject: str, why: object) -> None:
        self.index.stats.bad_messages[stream] += 1
        log.debug("bad_message", subject=subject, error=str(why)[:200])

    # ------------------------------------------------------------------ snapshots

    def _want_snapshot(self, pod: str) -> None:
        t = self._snapshots.get(pod)
        if t is None or t.done():
            self._snapshots[pod] = asyncio.create_task(self._snapshot_loop(pod),
                                                       name=f"indexer-snapshot-{pod}")

    async def _snapshot_loop(self, pod: str) -> None:
        """Ask the pod's agent for snapshots until one applies (or the pod is gone)."""
        assert self._nc is not None
        tracker = self.tracker
        ask = SnapshotRequest(pod=pod, max_blocks_per_part=self.cfg.snapshot_part_blocks)
        subject = self.subjects.kv_snapshot(pod)
        try:
            while True:
                wait = tracker.snapshot_due(pod, time.monotonic())
                if wait is None:
                    return
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                tracker.stats.snapshots_requested += 1
                try:
                    parts = await request_parts(
                        self._nc, subject, ask, Snapshot,
                        parts_of=lambda s: (s.part, s.parts),
                        timeout=self.cfg.snapshot_timeout_s,
                    )
                except (BusError, codec.DecodeError, IndexError, KeyError) as e:
                    log.info("snapshot_failed", pod=pod, error=str(e)[:200])
                    tracker.snapshot_failed(pod, time.monotonic())
                    continue
                t0 = time.perf_counter()
                again = tracker.apply_snapshot(pod, parts, time.monotonic())
                log.info("snapshot_applied", pod=pod, seq=parts[0].seq if parts else None,
                         blocks=sum(len(p.blocks) for p in parts), again=again,
                         ms=round((time.perf_counter() - t0) * 1000, 1))
        finally:
            if self._snapshots.get(pod) is asyncio.current_task():
                del self._snapshots[pod]

    # ------------------------------------------------------------------ liveness

    async def _sweep_loop(self) -> None:
        period = min(0.1, self.cfg.pod_late_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                for pod in self.tracker.expire(time.monotonic()):
                    t = self._snapshots.pop(pod, None)
                    if t is not None:
                        t.cancel()
                    log.warning("pod_dropped", pod=pod, reason="heartbeat timeout",
                                silent_s=self.cfg.pod_timeout_s)
            except Exception:  # a bug must not stop liveness checks
                log.exception("sweep_failed")

    # ------------------------------------------------------------------ lookups

    async def _on_lookup(self, req: LookupRequest) -> LookupReply:
        t0 = time.perf_counter()
        matches = self.index.lookup(req.block_keys, req.pods)
        self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
        return LookupReply(matches=matches)
