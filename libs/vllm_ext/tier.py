"""``SharedStorageTier``: vLLM's secondary-tier interface over infermesh's shared block directory.

Runs inside vLLM (``.venv-vllm``), in the scheduler process; ``TieringOffloadingSpec`` builds
it from a ``secondary_tiers`` entry ``{"type": "SharedStorageTier", "module_path":
"infermesh.libs.vllm_ext.tier", "root_dir": …, "capacity_bytes": …, "locality": "REMOTE",
"enable_kv_events": true}`` (see :func:`infermesh.libs.vllm_ext.kv_transfer_config`). The work
itself is :class:`~infermesh.libs.vllm_ext.storage.StorageTierCore`'s; this class translates:
vLLM's keys and jobs in, ``JobResult``s, ``OffloadingEvent``s and metrics out. Lookups use
vLLM's ``AsyncLookupManager`` (a ``stat`` per key on its thread, batched per step), as the
``fs`` tier does: the scheduler never waits on the filesystem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, ClassVar

from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import (
    OffloadingConnectorStats,
)
from vllm.logger import init_logger
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingMetricMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import (
    JobResult,
    ScheduleEndContext,
    SecondaryTierManager,
    TransferJob,
)

from infermesh.libs.kvstore import BlockStore, namespace_for

from .storage import StorageTierCore

log = init_logger(__name__)

# TierCounters field → vLLM metric (a counter; Prometheus shows it with ``_total``).
METRICS: dict[str, tuple[str, str]] = {
    "blocks_written": ("vllm:kv_offload_shared_storage_blocks_written",
                       "Blocks this engine wrote to the shared storage tier"),
    "blocks_present": ("vllm:kv_offload_shared_storage_blocks_present",
                       "Blocks a store found already in shared storage (another engine wrote "
                       "them)"),
    "blocks_loaded": ("vllm:kv_offload_shared_storage_blocks_loaded",
                      "Verified blocks loaded from shared storage into the CPU tier"),
    "load_misses": ("vllm:kv_offload_shared_storage_load_misses",
                    "Blocks a load did not get: gone, unreadable or corrupt (recomputed)"),
    "corrupt_blocks": ("vllm:kv_offload_shared_storage_corrupt_blocks",
                       "Block files that failed verification (removed, never served)"),
    "write_errors": ("vllm:kv_offload_shared_storage_write_errors",
                     "Block writes that failed (full disk, permissions, a lost mount)"),
    "read_errors": ("vllm:kv_offload_shared_storage_read_errors",
                    "Block reads that failed with an I/O error"),
    "evicted_blocks": ("vllm:kv_offload_shared_storage_evicted_blocks",
                       "Block files this engine removed to keep the directory under capacity"),
    "failed_store_jobs": ("vllm:kv_offload_shared_storage_failed_store_jobs",
                          "Store jobs with at least one block not written"),
    "failed_load_jobs": ("vllm:kv_offload_shared_storage_failed_load_jobs",
                         "Load jobs with at least one block not loaded"),
}


class _Lookups(AsyncLookupManager):
    """Existence checks for one step's keys, on vLLM's lookup thread."""

    def __init__(self, core: StorageTierCore, tier_type: str) -> None:
        super().__init__(tier_type=tier_type)
        self._core = core

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        return [self._core.contains(bytes(k)) for k in keys]


def storage_namespace(spec: Any, chunk_bytes: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What makes two engines' blocks interchangeable: same model path string, KV dtype, block
    and chunk sizes, KV groups, parallel layout, chunk bytes and hash seed."""
    cfg = spec.config
    par = cfg.parallel
    parts: dict[str, Any] = {
        "engine": "vllm",
        "model": cfg.model.name,
        "dtype": str(cfg.model.dtype),
        "groups": tuple((g.tokens_per_block, tuple(g.layer_names)) for g in cfg.groups),
        "tokens_per_hash": cfg.cache.tokens_per_hash,
        "blocks_per_chunk": cfg.cache.blocks_per_chunk,
        "chunk_bytes": chunk_bytes,
        "parallel": (par.tp_size, par.pp_size, par.pcp_size, par.dcp_size),
        "layout": ("canonical:" + str(cfg.kv_cache_layout)) if cfg.canonical_layout else "direct",
        "replicated": bool(cfg.replicated_layout),
        # Block hashes depend on it; engines with different seeds share nothing anyway.
        "hash_seed": os.environ.get("PYTHONHASHSEED", ""),
    }
    parts.update(extra or {})
    return parts


class SharedStorageTier(SecondaryTierManager):
    """KV chunks in a directory every engine of the pool mounts (verified, LRU-bounded)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    @classmethod
    def build_metric_definitions(
        cls, extra_config: dict[str, Any]
    ) -> dict[str, OffloadingMetricMetadata]:
        return {name: OffloadingCounterMetadata(documentation=doc)
                for name, doc in METRICS.values()}

    def __init__(
        self,
        offloading_spec: Any,
        primary_kv_view: memoryview,
        tier_type: str,
        root_dir: str,
        capacity_bytes: int = 0,
        locality: str | None = None,
        enable_kv_events: bool = False,
        io_threads: int = 4,
        low_watermark: float = 0.9,
        evict_every_s: float = 5.0,
        namespace_parts: dict[str, Any] | None = None,
        backpressure_detector: Any = None,
    ) -> None:
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self.locality = Locality(locality) if locality else None
        emit = bool(enable_kv_events and offloading_spec.kv_events_config.enable_kv_cache_events)
        if enable_kv_events and not emit:
            log.warning("SharedStorageTier: enable_kv_events is set but KV cache events are "
                        "off for this engine; the tier sends no events")
        parts = storage_namespace(offloading_spec, self.block_size_bytes, namespace_parts)
        self.store = BlockStore(root_dir, namespace_for(**parts), int(capacity_bytes),
                                low_watermark=low_watermark, rescan_s=evict_every_s)
        _describe(self.store.dir, parts)
        self._core = StorageTierCore(self.store, primary_kv_view, self.block_size_bytes,
                                     io_threads=io_threads, evict_every_s=evict_every_s,
                                     emit_events=emit)
        self._lookups = _Lookups(self._core, tier_type)
        self._load_keys: dict[int, list[OffloadKey]] = {}
        log.info("SharedStorageTier: %s (capacity %s bytes, chunk %d bytes, locality %s, "
                 "events %s)", self.store.dir, capacity_bytes or "unbounded",
                 self.block_size_bytes, locality, emit)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._core.submit_store(job_metadata.job_id, [bytes(k) for k in job_metadata.keys],
                                job_metadata.chunk_ids.tolist())

    def submit_load(self, job_metadata: TransferJob) -> None:
        keys = list(job_metadata.keys)
        self._load_keys[job_metadata.job_id] = keys
        self._core.submit_load(job_metadata.job_id, [bytes(k) for k in keys],
                               job_metadata.chunk_ids.tolist())

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results: list[JobResult] = []
        for job in self._core.finished():
            keys = self._load_keys.pop(job.job_id, None)
            if job.loaded is not None and keys is not None:
                # A partial load keeps what was verified; the rest become misses for this
                # step's lookups, so vLLM recomputes them instead of asking again.
                loaded = set(job.loaded)
                ok = [k for k in keys if bytes(k) in loaded]
                self._lookups.mark_miss([k for k in keys if bytes(k) not in loaded])
                results.append(JobResult(job_id=job.job_id, success=False,
                                         successful_keys=tuple(ok) or None,
                                         transfer_time=job.seconds, transfer_bytes=job.nbytes))
                continue
            results.append(JobResult(job_id=job.job_id, success=job.success,
                                     transfer_time=job.seconds,
                                     transfer_bytes=job.nbytes or None))
        return results

    def has_pending_work(self) -> bool:
        return self._core.has_pending_work()

    def take_events(self) -> Iterable[OffloadingEvent]:
        for ev in self._core.take_events():
            yield OffloadingEvent(keys=[OffloadKey(k) for k in ev.keys], medium=self.medium,
                                  removed=ev.removed, locality=self.locality,
                                  removal_expected=True)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        self._core.touch([bytes(k) for k in keys])

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()
        self._core.tick()

    def drain_jobs(self) -> None:
        self._core.drain()

    def get_stats(self) -> OffloadingConnectorStats | None:
        delta = self._core.take_counters().as_dict()
        if not any(delta.values()):
            return None
        stats = OffloadingConnectorStats()
        for field, value in delta.items():
            if value:
                stats.increase_counter(METRICS[field][0], value)
        return stats

    def shutdown(self) -> None:
        self._lookups.shutdown()
        self._core.shutdown()


def _describe(directory: Path, parts: dict[str, Any]) -> None:
    """``namespace.json`` beside the blocks: what the directory's name stands for (for people;
    nothing reads it)."""
    path = directory / "namespace.json"
    if path.exists():
        return
    try:
        tmp = directory / f".namespace-{os.getpid()}.json"
        tmp.write_text(json.dumps(parts, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("SharedStorageTier: could not write %s: %s", path, e)
