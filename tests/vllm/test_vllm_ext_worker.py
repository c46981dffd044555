"""The CPU offload worker (``libs/vllm_ext/spec.py``) against vLLM's own types and a real
offload region, in ``.venv-vllm``'s interpreter (the project's venv has no torch)."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

SCRIPT = textwrap.dedent("""
    import os, torch
    from vllm.v1.kv_offload.base import (CanonicalKVCacheRef, CanonicalKVCaches,
        CanonicalKVCacheTensor, GPULoadStoreSpec)
    from vllm.v1.kv_offload.cpu.common import CPULoadStoreSpec
    from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
    from infermesh.libs.vllm_ext.spec import CpuCopyWorker

    PAGE, BLOCKS, CHUNKS, BPC = 256, 10, 6, 2
    engine_id = "infermesh-test-" + str(os.getpid())
    # Two tensors (think: two layers), the second shared by two refs of group 0.
    gen = torch.Generator().manual_seed(0)
    kv = [torch.randint(-128, 128, (BLOCKS, PAGE), dtype=torch.int8, generator=gen)
          for _ in range(2)]
    caches = CanonicalKVCaches(
        tensors=[CanonicalKVCacheTensor(t, PAGE) for t in kv],
        group_data_refs=[[CanonicalKVCacheRef(0, PAGE), CanonicalKVCacheRef(1, PAGE),
                          CanonicalKVCacheRef(1, PAGE)]])
    row = 2 * PAGE * BPC
    region = SharedOffloadRegion(engine_id=engine_id, num_chunks=CHUNKS, rank=0,
                                 kv_bytes_per_chunk=-(-row // 4096) * 4096,
                                 cpu_page_size=row)
    w = CpuCopyWorker(caches, BPC, region)
    try:
        # Store blocks 7, 2, 5 as the 2nd-4th blocks of a request: slot 1 of chunk 4, then
        # chunk 1 (slots 0, 1).
        assert w.submit_store(1, GPULoadStoreSpec([7, 2, 5], [3], [1]),
                              CPULoadStoreSpec([4, 1]))
        # Load them back into blocks 0, 1, 3 (wiped first).
        want = [t[[7, 2, 5]].clone() for t in kv]
        for t in kv:
            t[[0, 1, 3]] = 0
        assert w.submit_load(2, CPULoadStoreSpec([4, 1]), GPULoadStoreSpec([0, 1, 3], [3], [1]))
        for t, wt in zip(kv, want):
            assert torch.equal(t[[0, 1, 3]], wt)
        done = {r.job_id: r for r in w.get_finished()}
        assert done[1].success and done[2].success
        assert done[1].transfer_size == 3 * PAGE * 2
        assert w.get_finished() == []
        # A transfer that does not add up fails the job, does not raise.
        assert w.submit_store(3, GPULoadStoreSpec([1, 2], [2], [0]), CPULoadStoreSpec([0, 1]))
        [bad] = w.get_finished()
        assert bad.job_id == 3 and not bad.success and w.failed_jobs == 1
    finally:
        w.shutdown()
    assert not os.path.exists(f"/dev/shm/vllm_offload_{engine_id}.mmap")
    print("ok")
""")


def test_the_cpu_worker_moves_blocks_to_chunk_slots_and_back() -> None:
    if not PYTHON.exists():
        msg = f"{PYTHON} missing: `make vllm-env` builds it (make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    r = subprocess.run([str(PYTHON), "-c", SCRIPT], capture_output=True, text=True,
                       timeout=240, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]
