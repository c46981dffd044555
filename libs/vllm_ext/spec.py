"""``InfermeshTieringSpec``: vLLM's tiering spec (CPU tier + secondary tiers) on the CPU platform.

vLLM's ``TieringOffloadingSpec`` is platform-neutral on the scheduler side, but its worker
(``CPUOffloadingWorker``) copies with CUDA streams and events and refuses to start elsewhere.
This spec keeps everything of vLLM's and replaces only the worker: :class:`CpuCopyWorker`
copies between the engine's KV tensors (host memory here) and the offload region with indexed
tensor operations, synchronously, in the worker's own thread.

Why synchronous is right here: vLLM submits a store at the start of the step after the one that
computed the KV, and a request waiting on a load resumes only once the load is reported
finished; on the CPU both copies run in the thread that also runs the model, so they are
ordered with it, and a chunk is a memcpy of a few KiB to MiB.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.kv_offload.base import (
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec

from .copyplan import GroupCopy, plan_copy

log = init_logger(__name__)


class CpuCopyWorker(OffloadingWorker):
    """Moves blocks between the engine's KV tensors and the CPU tier's offload region.

    A failed copy is reported as a failed ``TransferResult`` (vLLM's contract); vLLM 0.32's
    ``OffloadingConnectorWorker`` does not support failed jobs yet and stops on one, which is
    the safe outcome for a copy that should never fail (a wrong index or shape: a bug). The
    tier's real failures — files — are the secondary tier's, which vLLM survives."""

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int,
                 region: SharedOffloadRegion) -> None:
        self.blocks_per_chunk = blocks_per_chunk
        self._region: SharedOffloadRegion | None = region
        self._engine: list[torch.Tensor] = []  # per tensor: (engine blocks, page bytes)
        self._offload: list[torch.Tensor] = []  # per tensor: (chunks, blocks_per_chunk, page)
        for t in kv_caches.tensors:
            page = t.page_size_bytes
            self._engine.append(t.tensor.view(torch.int8).view(-1, page))
            view = region.create_next_worker_view(page * blocks_per_chunk)
            self._offload.append(view.unflatten(1, (blocks_per_chunk, page)))
        # Per KV-cache group: the tensors its layers live in (several layers may share one).
        self._group_tensors = [sorted({ref.tensor_idx for ref in refs})
                               for refs in kv_caches.group_data_refs]
        self._done: list[TransferResult] = []
        self.failed_jobs = 0

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec,
                     dst_spec: LoadStoreSpec) -> bool:
        """Engine blocks → offload chunks."""
        return self._run(job_id, src_spec, dst_spec, store=True)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec,
                    dst_spec: GPULoadStoreSpec) -> bool:
        """Offload chunks → engine blocks."""
        return self._run(job_id, dst_spec, src_spec, store=False)

    def _run(self, job_id: int, engine_spec: GPULoadStoreSpec, chunk_spec: Any,
             *, store: bool) -> bool:
        t0 = time.perf_counter()
        nbytes = 0
        ok = True
        try:
            plans = plan_copy(engine_spec.block_ids.tolist(), chunk_spec.block_ids.tolist(),
                              list(engine_spec.group_sizes), list(engine_spec.block_indices),
                              self.blocks_per_chunk)
            for plan in plans:
                nbytes += self._copy(plan, store=store)
        except Exception:
            ok = False
            self.failed_jobs += 1
            log.exception("CpuCopyWorker: %s job %d failed", "store" if store else "load",
                          job_id)
        self._done.append(TransferResult(job_id=job_id, success=ok, transfer_size=nbytes,
                                         transfer_time=time.perf_counter() - t0))
        return True

    def _copy(self, plan: GroupCopy, *, store: bool) -> int:
        blocks = torch.tensor(plan.blocks, dtype=torch.long)
        chunks = torch.tensor(plan.chunks, dtype=torch.long)
        slots = torch.tensor(plan.slots, dtype=torch.long)
        nbytes = 0
        for ti in self._group_tensors[plan.group]:
            engine, offload = self._engine[ti], self._offload[ti]
            if store:
                rows = engine.index_select(0, blocks)
                offload.index_put_((chunks, slots), rows)
            else:
                rows = offload[chunks, slots]
                engine.index_copy_(0, blocks, rows)
            nbytes += rows.numel()
        return nbytes

    def get_finished(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # every job completed in its submit call

    def shutdown(self) -> None:
        self._engine.clear()
        self._offload.clear()
        if self._region is not None:
            self._region.cleanup()
            self._region = None


class InfermeshTieringSpec(TieringOffloadingSpec):
    """vLLM's tiering spec with :class:`CpuCopyWorker` as its worker."""

    _worker: Any  # set to None by vLLM's CPUOffloadingSpec.__init__

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            if self.config.canonical_layout:
                raise ValueError("infermesh's CPU offload worker copies the direct layout "
                                 "only: remove canonical_layout from kv_connector_extra_config")
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            region = SharedOffloadRegion(
                engine_id=self._engine_id,
                num_chunks=self.num_chunks,
                rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker,
            )
            try:
                self._worker = CpuCopyWorker(kv_caches, self.blocks_per_chunk, region)
            except Exception:
                region.cleanup()
                raise
            log.info("InfermeshTieringSpec: CPU copy worker over %d chunks of %d bytes "
                     "(%d blocks each)", self.num_chunks, self.kv_bytes_per_chunk,
                     self.blocks_per_chunk)
        return self._worker
