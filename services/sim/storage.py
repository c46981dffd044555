"""The simulator's shared-storage KV tier: blocks written to a directory every engine mounts.

It plays vLLM's ``TieringOffloadingSpec`` with one secondary tier on a shared filesystem
(``vllm/v1/kv_offload/tiering/``): a block the engine computed is stored to the tier once its
prefill is done (vLLM stores each newly computed block to its CPU primary tier and cascades
every completed primary store to all secondary tiers), and a prompt's prefix found neither on
the GPU nor on the CPU tier is looked up in the directory and loaded (promoted) from it.

The files are real and verified (:class:`infermesh.libs.kvstore.BlockStore`): a few bytes per
block derived from the block's hash and tokens, so a read checks end to end that the bytes
belong to that block, while the modelled times use the modelled block size (tokens × KV bytes
per token). A file that fails verification is a miss: the block is recomputed, never served.

Events go out as vLLM's offloading connector sends them: ``BlockStored`` with medium
``STORAGE`` and the tier's ``locality`` when a store this engine made completes (a file that
was already there is not stored again, so it gets no event), placeholders (one hash, no
tokens, ``block_size`` 0) unless ``self_describing`` (the block's tokens, parent and size);
``BlockRemoved`` with medium ``STORAGE`` for files this engine's store evicted (vLLM's own
``fs`` tier never evicts; ours is bounded by ``capacity_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from infermesh.libs.kvstore import BlockStore, namespace_for
from infermesh.libs.telemetry import get_logger
from infermesh.proto.vllm_kv import EngineEvent

from .metrics import EngineMetrics

log = get_logger("sim.storage")

MEDIUM_STORAGE = "STORAGE"
#: vLLM labels a secondary tier ``"<index + 1>:<tier type>"``; the shared directory is tier 1,
#: of vLLM's type ``fs``.
STORAGE_TIER_LABEL = "1:fs"
#: vLLM's label for lookups in the CPU primary tier.
PRIMARY_TIER_LABEL = "0:primary"
_PAYLOAD_DOMAIN = b"infermesh-sim-kv/1"


def block_payload(block_hash: bytes, token_ids: Sequence[int], size: int) -> bytes:
    """The bytes a block's file holds: a function of its hash and tokens alone, so any engine
    can tell whether a file it reads is the block it asked for."""
    toks = array("Q", token_ids).tobytes()
    return hashlib.shake_256(_PAYLOAD_DOMAIN + block_hash + toks).digest(size)


@dataclass(slots=True)
class BlockToStore:
    """One computed block waiting to be written to the shared directory."""

    block_hash: bytes
    parent: bytes | None
    token_ids: list[int]
    lora_id: int | None = None
    lora_name: str | None = None
    extra: tuple[Any, ...] | None = None


@dataclass(slots=True)
class _StoreJob:
    not_before: float  # monotonic time the blocks' KV is computed
    blocks: list[BlockToStore]


class StorageTier:
    """One engine's view of the shared directory: a write queue, lookups, and its events.

    ``wire`` turns an internal block hash into what events carry; ``wake`` tells the engine
    loop that events are waiting. Reads and writes run in threads of their own (one each), so
    the engine's loop never waits on the filesystem.
    """

    def __init__(
        self,
        *,
        root: str,
        namespace: str,
        capacity_bytes: int,
        block_bytes: int,
        file_bytes: int,
        read_bytes_per_s: float,
        write_bytes_per_s: float,
        max_write_backlog_s: float,
        time_scale: float,
        locality: str | None,
        self_describing: bool,
        block_size: int,
        metrics: EngineMetrics,
        wire: Callable[[bytes], Any],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.files = BlockStore(root, namespace, capacity_bytes)
        self.block_bytes = block_bytes  # modelled KV bytes of one block
        self.file_bytes = file_bytes
        self.read_bytes_per_s = read_bytes_per_s
        self.write_bytes_per_s = write_bytes_per_s
        self.max_write_backlog_s = max_write_backlog_s
        self.scale = time_scale
        self.locality = locality
        self.self_describing = self_describing
        self.block_size = block_size
        self.metrics = metrics
        self._wire = wire
        self._wake = wake
        self.events: list[EngineEvent] = []
        self._jobs: deque[_StoreJob] = deque()
        self._queued_blocks = 0
        self._job_ready = asyncio.Event()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sim-storage-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sim-storage-write")
        self._task: asyncio.Task[None] | None = None
        self.mismatched = 0  # files that verified but held another block's bytes

    @classmethod
    def namespace(cls, *, model: str, block_size: int, none_hash: bytes,
                  kv_bytes_per_token: int, file_bytes: int) -> str:
        """The directory every engine with the same model, block size, hash seed and algorithm
        (``none_hash`` captures both) and block layout shares."""
        return namespace_for(engine="infermesh-sim", layout=1, model=model,
                             block_size=block_size, none_hash=none_hash.hex(),
                             kv_bytes_per_token=kv_bytes_per_token, file_bytes=file_bytes)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the write loop."""
        self._task = asyncio.create_task(self._write_loop(), name="sim-storage-writer")

    async def stop(self) -> None:
        """Stop writing (queued stores are dropped, as a stopped engine's are) and the threads."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._writer.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ writes

    @property
    def write_backlog_s(self) -> float:
        """Modelled seconds of writes queued."""
        return self._queued_blocks * self.block_bytes / self.write_bytes_per_s

    def store(self, blocks: list[BlockToStore], not_before: float) -> bool:
        """Queue one store job (a request's newly computed blocks), written after
        ``not_before``; False when it was dropped because the queue is too far behind (vLLM's
        back-pressure drops whole stores to a slow tier)."""
        if not blocks:
            return True
        backlog = (self._queued_blocks + len(blocks)) * self.block_bytes / self.write_bytes_per_s
        if self._queued_blocks and backlog > self.max_write_backlog_s:
            self.metrics.on_storage_store_dropped(STORAGE_TIER_LABEL, len(blocks))
            return False
        self._jobs.append(_StoreJob(not_before, blocks))
        self._queued_blocks += len(blocks)
        self._job_ready.set()
        return True

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        free_at = 0.0  # when the modelled link to the storage is free
        while True:
            if not self._jobs:
                self._job_ready.clear()
                await self._job_ready.wait()
                continue
            job = self._jobs[0]
            write_s = len(job.blocks) * self.block_bytes / self.write_bytes_per_s
            now = time.monotonic()
            done = max(now, job.not_before, free_at) + write_s * self.scale
            free_at = done
            if done > now:
                await asyncio.sleep(done - now)
            self._jobs.popleft()
            self._queued_blocks -= len(job.blocks)
            errors = self.files.stats.write_errors
            try:
                wrote, evicted = await loop.run_in_executor(self._writer, self._put_all,
                                                            job.blocks)
            except Exception:  # a failed store never takes the engine down
                log.exception("storage_store_failed")
                self.metrics.on_storage_cascade_failed(STORAGE_TIER_LABEL)
                continue
            if self.files.stats.write_errors > errors:  # a full disk, a vanished mount, ...
                log.warning("storage_write_failed", errors=self.files.stats.errors[-1:])
                self.metrics.on_storage_cascade_failed(STORAGE_TIER_LABEL)
            self.metrics.on_storage_write(STORAGE_TIER_LABEL, len(job.blocks) * self.block_bytes,
                                          write_s)
            self._report(wrote, evicted)

    def _put_all(self, blocks: list[BlockToStore]) -> tuple[list[BlockToStore], list[bytes]]:
        """Write each block's file (in the writer thread); the blocks this call wrote and the
        keys its evictions removed."""
        wrote = [b for b in blocks
                 if self.files.put(b.block_hash,
                                   block_payload(b.block_hash, b.token_ids, self.file_bytes))]
        return wrote, self.files.take_evicted()

    def _report(self, wrote: list[BlockToStore], evicted: list[bytes]) -> None:
        for b in wrote:
            self.events.append(self._stored_event(b))
        if evicted:
            self.events.append(EngineEvent(
                "removed", [self._wire(k) for k in evicted], medium=MEDIUM_STORAGE,
                locality=self.locality))
        if wrote or evicted:
            self._wake()

    def _stored_event(self, b: BlockToStore) -> EngineEvent:
        if not self.self_describing:
            # What vLLM's connector sends for an offloaded block it has no request
            # metadata for: the hash alone.
            return EngineEvent("stored", [self._wire(b.block_hash)], None, [], 0,
                               medium=MEDIUM_STORAGE, locality=self.locality)
        return EngineEvent(
            "stored", [self._wire(b.block_hash)],
            None if b.parent is None else self._wire(b.parent), list(b.token_ids),
            self.block_size, medium=MEDIUM_STORAGE, lora_id=b.lora_id, lora_name=b.lora_name,
            locality=self.locality)

    # ------------------------------------------------------------------ reads

    def may_hold(self, block_hash: bytes) -> bool:
        """Whether the directory has a file for the block (one ``stat``; not verified)."""
        return self.files.contains(block_hash)

    async def probe(self, hashes: Sequence[bytes], tokens: Sequence[Sequence[int]]) -> int:
        """Read and verify the blocks ``hashes`` (with their ``tokens``) in order, stopping at
        the first that is missing or bad; the number of blocks that verified."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._read_run, list(hashes),
                                          [list(t) for t in tokens])

    def _read_run(self, hashes: list[bytes], tokens: list[list[int]]) -> int:
        for i, (h, toks) in enumerate(zip(hashes, tokens, strict=True)):
            corrupt_before = self.files.stats.corrupt
            data = self.files.get(h)
            if data is None:
                if self.files.stats.corrupt > corrupt_before:
                    log.warning("storage_block_corrupt", block=h.hex()[:16])
                return i
            if data != block_payload(h, toks, self.file_bytes):
                # A whole file of the right key that holds other bytes: not this block.
                self.mismatched += 1
                log.warning("storage_block_mismatch", block=h.hex()[:16])
                return i
        return len(hashes)

    def load_seconds(self, blocks: int) -> float:
        """Modelled seconds to read ``blocks`` from the directory."""
        return blocks * self.block_bytes / self.read_bytes_per_s

    # ------------------------------------------------------------------ introspection

    def drain_events(self) -> list[EngineEvent]:
        """Take the events reported since the last call."""
        ev, self.events = self.events, []
        return ev

    def describe(self) -> dict[str, Any]:
        """The store's counters and queue, for ``GET /sim/cache``."""
        st = self.files.stats
        return {
            "dir": str(self.files.dir), "writes": st.writes, "reads": st.reads,
            "misses": st.misses, "corrupt": st.corrupt, "mismatched": self.mismatched,
            "evicted": st.evicted, "write_errors": st.write_errors,
            "read_errors": st.read_errors, "queued_blocks": self._queued_blocks,
            # The real file I/O (not the modelled time): what the bench reads against dd.
            "write_bytes": st.write_bytes, "write_s": st.write_s,
            "read_bytes": st.read_bytes, "read_s": st.read_s,
        }

    def keys(self) -> list[bytes]:
        """Every block with a file in the namespace (a directory listing)."""
        return list(self.files.keys())
