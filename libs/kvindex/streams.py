"""Following every pod's KV stream: seq and epoch checks, snapshots, stale pods.

A pod's batches apply in seq order within the agent's epoch. Anything else — a gap, a new epoch
that does not start at seq 1, a pod never seen, a heartbeat whose ``kv_seq`` stays ahead of what
arrived, a block that cannot be keyed — puts the pod in *sync*: its live batches are buffered,
a snapshot is asked of its agent (by the service, one at a time per pod, with backoff), and once
the snapshot is applied the buffered batches newer than it follow.

This module decides; it does no I/O, and takes the time as an argument, so it is tested alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from infermesh.libs import liveness
from infermesh.proto.messages import KVEventBatch, PodState, Snapshot

from .index import IndexStats, KVIndex


@dataclass
class PodStream:
    """Where one pod's stream stands."""

    pod: str
    last_heartbeat: float
    heard_since: float = 0.0  # start of its unbroken run of heartbeats (liveness.since)
    pool: str = ""
    model: str = ""  # from batches, snapshots or heartbeats (keys are seeded by it)
    epoch: str | None = None  # of the last batch or snapshot applied
    seq: int = 0  # last seq applied in ``epoch``
    syncing: bool = False  # a snapshot is wanted; live batches wait in ``buffer``
    buffer: deque[KVEventBatch] = field(default_factory=deque)
    next_try: float = 0.0  # earliest time of the next snapshot request
    backoff: float = 0.0
    # (epoch, kv_seq, since): a heartbeat ahead of the applied batches, first seen at ``since``
    ahead: tuple[str, int, float] | None = None


class StreamTracker:
    """Every pod's stream state on top of a :class:`KVIndex`."""

    def __init__(
        self,
        index: KVIndex,
        *,
        pod_timeout_s: float = liveness.DEFAULT_DEAD_S,
        pod_late_s: float = liveness.DEFAULT_LATE_S,
        kv_seq_grace_s: float = 0.5,
        backoff_s: float = 0.1,
        backoff_max_s: float = 5.0,
        max_buffered: int = 10_000,
    ) -> None:
        self.index = index
        self.stats: IndexStats = index.stats
        self.pod_timeout_s = pod_timeout_s
        self.pod_late_s = min(pod_late_s, pod_timeout_s)
        self.kv_seq_grace_s = kv_seq_grace_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_buffered = max_buffered
        self.streams: dict[str, PodStream] = {}

    def _stream(self, pod: str, now: float) -> tuple[PodStream, bool]:
        s = self.streams.get(pod)
        if s is not None:
            return s, False
        s = self.streams[pod] = PodStream(pod=pod, last_heartbeat=now, heard_since=now)
        self.index.pod(pod)
        return s, True

    def syncing(self) -> list[str]:
        """Pods waiting for a snapshot."""
        return [p for p, s in self.streams.items() if s.syncing]

    # ------------------------------------------------------------------ batches

    def on_batch(self, b: KVEventBatch, now: float) -> bool:
        """Take one live batch; True when the pod now needs a snapshot."""
        self.stats.batches += 1
        s, _ = self._stream(b.pod, now)
        s.pool = b.pool
        if s.syncing:
            self._buffer(s, b)
            return False
        return self._take(s, b)

    def _buffer(self, s: PodStream, b: KVEventBatch) -> None:
        if len(s.buffer) >= self.max_buffered:
            s.buffer.popleft()  # its seq will show as a gap after the snapshot: another one
            self.stats.buffer_overflows += 1
        s.buffer.append(b)

    def _sync(self, s: PodStream, reason: str, b: KVEventBatch | None = None) -> bool:
        self.stats.gaps[reason] += 1
        s.syncing = True
        s.ahead = None
        if b is not None:
            self._buffer(s, b)
        return True

    def _take(self, s: PodStream, b: KVEventBatch) -> bool:
        if s.epoch == b.epoch:
            if b.seq <= s.seq:
                self.stats.stale_batches += 1
                return False
            if b.seq != s.seq + 1:
                return self._sync(s, "seq", b)
        elif b.seq != 1:
            return self._sync(s, "epoch" if s.epoch is not None else "unknown_pod", b)
        model = b.model or s.model
        if not model:
            return self._sync(s, "model", b)  # keys are seeded by the model: wait to learn it
        if s.epoch != b.epoch:
            # Seq 1 of a new epoch: the whole stream of a new agent is ahead of us, and it
            # rebuilds the pod's blocks from nothing.
            self.index.clear_pod(s.pod)
        elif s.model and model != s.model:
            return self._sync(s, "model", b)  # every key of the pod changes: start over
        s.model = model
        try:
            missing = self.index.apply(s.pod, model, b.events, pool=s.pool or None)
        except (OverflowError, ValueError, TypeError):
            self.stats.bad_messages["kv"] += 1
            s.epoch, s.seq = b.epoch, b.seq
            return self._sync(s, "unkeyable")
        s.epoch, s.seq = b.epoch, b.seq
        if missing:
            # A parent or offloaded block we never saw: our view of this pod is incomplete.
            return self._sync(s, "unkeyable")
        return False

    # ------------------------------------------------------------------ heartbeats

    def on_heartbeat(self, st: PodState, now: float) -> bool:
        """Take one heartbeat; True when the pod now needs a snapshot.

        Heartbeats and batches come on different subjects, so a heartbeat may overtake the batch
        it counts; only a ``kv_seq`` still unmatched ``kv_seq_grace_s`` later means batches were
        lost.
        """
        s, _ = self._stream(st.pod, now)
        s.heard_since = liveness.since(s.last_heartbeat, s.heard_since, now, self.pod_late_s)
        s.last_heartbeat = now
        s.pool = st.pool
        self.index.set_pool(st.pod, st.pool)
        if st.model and not s.model:
            s.model = st.model
        if s.syncing:
            return False
        if st.epoch == s.epoch and st.kv_seq <= s.seq:
            s.ahead = None
            return False
        if st.kv_seq == 0:
            s.ahead = None
            return False  # a new agent that has published nothing yet: its seq 1 will come
        a = s.ahead
        if a is not None and (a[0] != s.epoch or a[1] > s.seq):
            if now - a[2] >= self.kv_seq_grace_s:
                return self._sync(s, "heartbeat" if s.epoch is not None else "unknown_pod")
            return False
        s.ahead = (st.epoch, st.kv_seq, now)
        return False

    # ------------------------------------------------------------------ snapshots

    def snapshot_due(self, pod: str, now: float) -> float | None:
        """Seconds to wait before asking for the pod's snapshot (None: no longer wanted)."""
        s = self.streams.get(pod)
        if s is None or not s.syncing:
            return None
        return max(0.0, s.next_try - now)

    def snapshot_failed(self, pod: str, now: float) -> None:
        """A snapshot request failed: back off before the next one."""
        self.stats.snapshots_failed += 1
        s = self.streams.get(pod)
        if s is None:
            return
        s.backoff = min(self.backoff_max_s, s.backoff * 2 if s.backoff else self.backoff_s)
        s.next_try = now + s.backoff

    def apply_snapshot(self, pod: str, parts: list[Snapshot], now: float) -> bool:
        """Replace the pod's blocks by a snapshot, then apply the newer buffered batches.

        Returns True if the pod still (or again) needs a snapshot.
        """
        s = self.streams.get(pod)
        if s is None:
            return False
        head = parts[0] if parts else None
        model = (head.model if head else "") or s.model
        if (
            head is None
            or not model
            or any(p.pod != pod or p.epoch != head.epoch or p.seq != head.seq for p in parts)
        ):
            self.snapshot_failed(pod, now)
            return True
        self.stats.snapshots_applied += 1
        s.model = model
        missing = self.index.replace(pod, model, (b for p in parts for b in p.blocks),
                                     pool=head.pool or s.pool or None)
        # Blocks of a snapshot that cannot be keyed have lost their parent in the engine too:
        # asking again would not help. They are kept aside until their parent is stored.
        del missing
        s.epoch, s.seq = head.epoch, head.seq
        s.syncing = False
        s.ahead = None
        s.backoff = 0.0
        s.next_try = 0.0
        buffered, s.buffer = s.buffer, deque()
        # What arrived meanwhile may be out of order (a lossy hop reorders and repeats): apply
        # by seq within each epoch, the snapshot's epoch first, then the others as they came.
        rank: dict[str, int] = {s.epoch: -1}
        for b in buffered:
            rank.setdefault(b.epoch, len(rank))
        for b in sorted(buffered, key=lambda b: (rank[b.epoch], b.seq)):
            if s.syncing:
                self._buffer(s, b)
            elif b.epoch == s.epoch and b.seq <= s.seq:
                self.stats.stale_batches += 1  # already in the snapshot, or a copy
            else:
                self._take(s, b)
        return s.syncing

    # ------------------------------------------------------------------ liveness

    def expire(self, now: float) -> list[str]:
        """Drop every pod whose heartbeat stopped for good (:func:`liveness.dead`: silent for
        ``pod_timeout_s`` while another pod kept speaking); return their
        names. A late pod keeps its blocks: dropping them would cost a snapshot on its next
        heartbeat and route its prefixes elsewhere meanwhile."""
        gone = liveness.dead({p: (s.last_heartbeat, s.heard_since)
                              for p, s in self.streams.items()}, now,
                             self.pod_late_s, self.pod_timeout_s)
        for p in gone:
            del self.streams[p]
            self.index.drop_pod(p)
            self.stats.pods_dropped += 1
        self.index.expire_storage(now)
        return gone
