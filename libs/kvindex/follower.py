"""An index that follows the bus: every pod's KV stream and heartbeats into a :class:`KVIndex`.

The indexer service is one of these plus the ``im.index.lookup`` endpoint; a scheduler replica
can hold one too (its *local index*), so a routing decision costs no bus round trip to an
indexer. Snapshots are asked of a pod's agent on ``im.snapshot.<pod>``, one at a time per pod,
with backoff; pods whose heartbeats stop for good (``libs/liveness``) are swept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from infermesh.libs.bus import BusError, cancel_tasks, request_parts
from infermesh.libs.telemetry import get_logger
from infermesh.proto import codec
from infermesh.proto.messages import (
    KVEventBatch,
    PodMatch,
    PodState,
    Snapshot,
    SnapshotRequest,
)
from infermesh.proto.subjects import Subjects

from .streams import StreamTracker

# A KV stream can burst (an agent's rebuild, a snapshot-sized batch): let nats-py queue a lot
# rather than drop messages as a slow consumer, which would only cost a snapshot later.
_PENDING_MSGS = 1_000_000
_PENDING_BYTES = 1 << 30


class IndexFollower:
    """Keeps ``tracker`` (and its index) in line with the bus. ``await start()``, ``stop()``."""

    def __init__(self, nc: Client, subjects: Subjects, tracker: StreamTracker, *,
                 snapshot_timeout_s: float, snapshot_part_blocks: int, log_name: str,
                 on_pod_dropped: Callable[[str], None] | None = None) -> None:
        self.nc = nc
        self.subjects = subjects
        self.tracker = tracker
        self.index = tracker.index
        self.snapshot_timeout_s = snapshot_timeout_s
        self.snapshot_part_blocks = snapshot_part_blocks
        self.log = get_logger(log_name)
        self.on_pod_dropped = on_pod_dropped
        self._subs: list[Any] = []
        self._snapshots: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Subscribe to every KV stream and heartbeat; start sweeping silent pods."""
        s = self.subjects
        self._subs = [
            await self.nc.subscribe(s.kv_all, cb=self._on_kv, pending_msgs_limit=_PENDING_MSGS,
                                    pending_bytes_limit=_PENDING_BYTES),
            await self.nc.subscribe(s.pod_state_all, cb=self._on_pod,
                                    pending_msgs_limit=_PENDING_MSGS,
                                    pending_bytes_limit=_PENDING_BYTES),
        ]
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="index-sweep")]

    async def stop(self) -> None:
        """Unsubscribe and cancel every task (the connection is the caller's)."""
        await cancel_tasks(self._tasks + list(self._snapshots.values()))
        self._tasks, self._snapshots = [], {}
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - a closed connection has nothing to unsubscribe
                self.log.debug("unsubscribe_failed")
        self._subs = []

    def lookup(self, block_keys: list[int], pods: list[str] | None) -> list[PodMatch]:
        """Each pod's longest run of held blocks from the prompt start."""
        return self.index.lookup(block_keys, pods)

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
            self.log.exception("batch_failed", pod=b.pod, seq=b.seq)
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
        self.log.debug("bad_message", subject=subject, error=str(why)[:200])

    # ------------------------------------------------------------------ snapshots

    def _want_snapshot(self, pod: str) -> None:
        t = self._snapshots.get(pod)
        if t is None or t.done():
            self._snapshots[pod] = asyncio.create_task(self._snapshot_loop(pod),
                                                       name=f"index-snapshot-{pod}")

    async def _snapshot_loop(self, pod: str) -> None:
        """Ask the pod's agent for snapshots until one applies (or the pod is gone)."""
        tracker = self.tracker
        ask = SnapshotRequest(pod=pod, max_blocks_per_part=self.snapshot_part_blocks)
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
                        self.nc, subject, ask, Snapshot,
                        parts_of=lambda s: (s.part, s.parts),
                        timeout=self.snapshot_timeout_s,
                    )
                except (BusError, codec.DecodeError, IndexError, KeyError) as e:
                    self.log.info("snapshot_failed", pod=pod, error=str(e)[:200])
                    tracker.snapshot_failed(pod, time.monotonic())
                    continue
                t0 = time.perf_counter()
                again = tracker.apply_snapshot(pod, parts, time.monotonic())
                self.log.info("snapshot_applied", pod=pod, seq=parts[0].seq if parts else None,
                              blocks=sum(len(p.blocks) for p in parts), again=again,
                              ms=round((time.perf_counter() - t0) * 1000, 1))
        finally:
            if self._snapshots.get(pod) is asyncio.current_task():
                del self._snapshots[pod]

    # ------------------------------------------------------------------ liveness

    async def _sweep_loop(self) -> None:
        period = min(0.1, self.tracker.pod_late_s / 4)
        while True:
            await asyncio.sleep(period)
            try:
                for pod in self.tracker.expire(time.monotonic()):
                    t = self._snapshots.pop(pod, None)
                    if t is not None:
                        t.cancel()
                    self.log.warning("pod_dropped", pod=pod, reason="heartbeat timeout",
                                     silent_s=self.tracker.pod_timeout_s)
                    if self.on_pod_dropped is not None:
                        self.on_pod_dropped(pod)
            except Exception:  # a bug must not stop liveness checks
                self.log.exception("sweep_failed")
