"""infermesh's extension of vLLM's KV offloading: a CPU tier, then a shared-storage tier.

vLLM 0.32 offloads KV blocks through its ``OffloadingConnector``: a *spec* (chosen by
``spec_module_path``/``spec_name`` in ``--kv-transfer-config``) gives the scheduler-side manager
and the worker-side copier. ``TieringOffloadingSpec`` runs a CPU primary tier (a shared-memory
region, ``/dev/shm/vllm_offload_<engine id>.mmap``) and below it any number of *secondary
tiers*, each a ``SecondaryTierManager`` that moves whole chunks between that region and its own
medium. This package provides:

- :mod:`.spec` — ``InfermeshTieringSpec``, vLLM's tiering spec with a worker that runs on the CPU
  platform. vLLM's own worker refuses to start there ("CPU Offloading is currently only
  supported on CUDA-alike and XPU GPUs"): it drives CUDA streams and events. Ours copies between
  the engine's KV tensors and the offload region with ``index_select``/``index_copy_``, in the
  worker's thread, and reports each job done at once.
- :mod:`.tier` — ``SharedStorageTier``, our secondary tier over
  :class:`infermesh.libs.kvstore.BlockStore`: a directory every engine of a pool mounts.
- :mod:`.storage` — the tier's work apart from vLLM's types (jobs on I/O threads, verified reads,
  eviction, events, counters), so it is tested without vLLM.
- :mod:`.copyplan` — which engine block goes to which (chunk, slot) of the offload region.
- :func:`kv_transfer_config` — the ``--kv-transfer-config`` that wires both in; the agent uses it.

Why our own tier rather than vLLM's ``fs`` tier plus a separate evictor: the ``fs`` tier never
announces a removal (its BlockStored events go out, nothing ever takes them back, so an index
fed by them only grows), it has no capacity bound (a shared volume fills until writes fail), and
it reads a file into the KV cache without checking it (a truncated or corrupted file, or one
another writer is replacing, is served as KV). An evictor beside it could bound the directory but
could not tell the index what it removed on the engine's own event stream, and nothing could make
the reads safe. ``SharedStorageTier`` writes a header with the key, the length and a CRC
(temporary file + rename, so readers never see a partial file), verifies every read (a bad file
is a miss: removed, counted, recomputed by the engine, never served), evicts least recently used
files down to a low watermark when the directory passes its capacity, and sends ``BlockRemoved``
(medium ``STORAGE``, the tier's locality) for every file it removed, on the engine's own KV-event
stream, so the index drops exactly what is gone.

Only this module and :mod:`.storage`/:mod:`.copyplan` import without vLLM; :mod:`.spec` and
:mod:`.tier` run inside vLLM's interpreter (``.venv-vllm``, where the project is installed
editable).
"""

from __future__ import annotations

from typing import Any

# Where vLLM finds our classes (kv_connector_extra_config / secondary_tiers[].module_path).
SPEC_MODULE = "infermesh.libs.vllm_ext.spec"
SPEC_NAME = "InfermeshTieringSpec"
TIER_MODULE = "infermesh.libs.vllm_ext.tier"
TIER_TYPE = "SharedStorageTier"

# vLLM's offload region for the CPU tier: one file per engine id (and data-parallel rank).
SHM_DIR = "/dev/shm"


def shm_region_names(engine_id: str) -> list[str]:
    """Glob patterns (in :data:`SHM_DIR`) of the offload regions an engine with ``engine_id``
    creates: ``vllm_offload_<id>.mmap``, and ``vllm_offload_<id>_dp<rank>.mmap`` with data
    parallelism (vLLM suffixes the id per rank)."""
    return [f"vllm_offload_{engine_id}.mmap", f"vllm_offload_{engine_id}_dp*.mmap"]


def kv_transfer_config(
    storage_dir: str,
    *,
    cpu_bytes: int,
    capacity_bytes: int = 0,
    locality: str = "REMOTE",
    engine_id: str = "",
    namespace_parts: dict[str, Any] | None = None,
    io_threads: int = 4,
    self_describing_events: bool = False,
) -> dict[str, Any]:
    """vLLM's ``--kv-transfer-config`` for a CPU tier of ``cpu_bytes`` over a shared-storage
    tier in ``storage_dir`` (bounded to ``capacity_bytes``, 0: unbounded).

    ``locality`` is what the tier's events say: ``REMOTE`` for a directory every engine of the
    pool mounts (the index credits the pool), ``LOCAL`` for a disk of this engine alone.
    ``engine_id`` names the engine's offload region (empty: vLLM picks a random one, which a
    supervisor cannot clean up after a crash). ``namespace_parts`` are added to what names the
    blocks' directory (the tier adds model, dtype, block size, layout itself)."""
    if cpu_bytes <= 0:
        raise ValueError("cpu_bytes must be positive: the storage tier sits below a CPU tier")
    if locality not in ("LOCAL", "REMOTE"):
        raise ValueError("locality must be LOCAL or REMOTE")
    tier: dict[str, Any] = {
        "type": TIER_TYPE,
        "module_path": TIER_MODULE,
        "root_dir": storage_dir,
        "capacity_bytes": int(capacity_bytes),
        "locality": locality,
        "enable_kv_events": True,
        "io_threads": int(io_threads),
    }
    if namespace_parts:
        tier["namespace_parts"] = dict(namespace_parts)
    extra: dict[str, Any] = {
        "spec_module_path": SPEC_MODULE,
        "spec_name": SPEC_NAME,
        "cpu_bytes_to_use": int(cpu_bytes),
        "secondary_tiers": [tier],
    }
    if self_describing_events:
        extra["self_describing_kv_events"] = True
    cfg: dict[str, Any] = {
        "kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }
    if engine_id:
        cfg["engine_id"] = engine_id
    return cfg
