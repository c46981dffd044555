"""Configuration of the indexer (CLI, env ``INFERMESH_INDEXER_*``, file)."""

from __future__ import annotations

from dataclasses import dataclass

from infermesh.libs import liveness
from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob


@dataclass
class IndexerConfig(BusKnobs):
    """Every knob of `infermesh indexer`."""

    max_blocks: int = knob(
        4_000_000,
        "Cap on (block key, pod) entries; past it the least recently stored or looked-up keys "
        "are evicted",
    )
    pod_timeout_s: float = knob(
        10.0, "A pod with no heartbeat for this long is dropped from the index (with its "
        "blocks), unless every pod is silent (then the indexer or the bus is behind)"
    )
    pod_late_s: float = knob(
        1.0, "Heard from within this long: a pod whose voice proves the bus works (see "
        "pod_timeout_s)"
    )
    kv_seq_grace_s: float = knob(
        0.5,
        "A heartbeat's kv_seq ahead of the batches applied for this long means batches were "
        "missed (heartbeats and batches travel on different subjects, so a short lag is normal)",
    )
    snapshot_timeout_s: float = knob(5.0, "Time for every part of one snapshot to arrive")
    snapshot_part_blocks: int = knob(4096, "Blocks per snapshot part asked of the agent")
    snapshot_backoff_s: float = knob(0.1, "Wait before retrying a failed snapshot (doubles)")
    snapshot_backoff_max_s: float = knob(5.0, "Longest wait between snapshot retries")
    max_buffered_batches: int = knob(
        10_000, "Batches of one pod kept while its snapshot is in flight (the oldest go first)"
    )
    retired_per_pod: int = knob(
        8192,
        "Engine hashes of removed blocks remembered per pod, so a later event naming one as "
        "parent (or offloading it without tokens) can still be keyed",
    )
    orphans_per_pod: int = knob(
        8192, "Blocks per pod kept while their parent is unknown, keyed once the parent arrives"
    )
    storage_ttl_s: float = knob(
        0.0,
        "Forget a pool's shared-storage block this long after it was stored (0: keep until an "
        "engine reports its removal). Set it for storage whose engines never report removals "
        "(vLLM's own fs tier); infermesh's tier reports its evictions",
    )
    storage_max_blocks: int = knob(
        0, "Shared-storage blocks kept per pool, oldest forgotten first (0: no cap)"
    )
    http_host: str = knob("127.0.0.1", "Address of the indexer's /health and /metrics")
    http_port: int = knob(0, "Port of /health and /metrics (0: a free port, -1: none)")

    def __post_init__(self) -> None:
        if self.max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        if self.pod_timeout_s <= 0 or self.snapshot_timeout_s <= 0:
            raise ValueError("pod_timeout_s and snapshot_timeout_s must be positive")
        liveness.check_times(self.pod_late_s, self.pod_timeout_s)
        if self.kv_seq_grace_s < 0:
            raise ValueError("kv_seq_grace_s must be >= 0")
        if self.snapshot_part_blocks < 1 or self.max_buffered_batches < 1:
            raise ValueError("snapshot_part_blocks and max_buffered_batches must be positive")
        if self.snapshot_backoff_s <= 0 or self.snapshot_backoff_max_s < self.snapshot_backoff_s:
            raise ValueError("need 0 < snapshot_backoff_s <= snapshot_backoff_max_s")
        if self.storage_ttl_s < 0 or self.storage_max_blocks < 0:
            raise ValueError("storage_ttl_s and storage_max_blocks must be >= 0")
        if self.retired_per_pod < 0 or self.orphans_per_pod < 0:
            raise ValueError("retired_per_pod and orphans_per_pod must be >= 0")
