"""A paged prefix cache that behaves like vLLM's block pool, and reports KV events as it does.

Blocks are fixed-size. A full block is cached under its chained hash; a request that starts with
the same tokens reuses those blocks (a prefix hit). Blocks no request references stay cached and
are evicted least-recently-used first when space is needed. With a CPU tier, an evicted GPU block
is offloaded there (its own LRU), and a prefix found on CPU is loaded back.

Every change a consumer must know about is appended to ``events`` as an ``EngineEvent`` in
vLLM's terms; the engine drains them once per step, as vLLM does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infermesh.proto.vllm_kv import EngineEvent


@dataclass(slots=True)
class CachedBlock:
    """One full block held in the GPU tier."""

    block_hash: bytes
    parent: bytes | None
    token_ids: list[int]
    ref_cnt: int = 0
    lora_name: str | None = None
    extra: tuple[Any, ...] | None = None  # the block's extra keys as events publish them


@dataclass(slots=True)
class Allocation:
    """The blocks one running request holds."""

    held: list[bytes] = field(default_factory=list)  # cached blocks it references
    chain: list[bytes] = field(default_factory=list)  # every full block's hash, in order
    uncached: int = 0  # blocks held that are not cached: partial, duplicate or reserved
    released: bool = False


ExtraKeys = Callable[[int], "tuple[Any, ...] | None"]


def _no_extra(_: int) -> None:
    return None


class NoSpace(Exception):
    """Not enough free blocks right now; the request must wait."""


class PrefixCache:
    """GPU block pool with prefix caching and an optional CPU tier.

    ``wire`` turns an internal hash (bytes) into what events carry (an int or the bytes).
    """

    def __init__(
        self,
        num_gpu_blocks: int,
        block_size: int,
        *,
        num_cpu_blocks: int = 0,
        wire: object = None,
    ) -> None:
        if num_gpu_blocks <= 0 or block_size <= 0:
            raise ValueError("num_gpu_blocks and block_size must be positive")
        self.capacity = num_gpu_blocks
        self.block_size = block_size
        self.cpu_capacity = num_cpu_blocks
        self._wire = wire if callable(wire) else (lambda h: h)
        self.blocks: dict[bytes, CachedBlock] = {}
        # Cached blocks with no reference, least recently used first.
        self._evictable: OrderedDict[bytes, None] = OrderedDict()
        self.cpu: OrderedDict[bytes, tuple[bytes | None, list[int]]] = OrderedDict()
        self._uncached_in_use = 0
        self.events: list[EngineEvent] = []

    # ------------------------------------------------------------------ accounting

    @property
    def used(self) -> int:
        """Blocks referenced by running requests (vLLM's KV usage numerator)."""
        return self.num_allocated - len(self._evictable)

    @property
    def num_allocated(self) -> int:
        """Blocks not free: referenced or cached."""
        return len(self.blocks) + self._uncached_in_use

    @property
    def free(self) -> int:
        """Blocks that can be handed out now, evicting cached ones if needed."""
        return self.capacity - self.used

    def usage(self) -> float:
        """Fraction of blocks referenced by running requests."""
        return self.used / self.capacity

    # ------------------------------------------------------------------ lookups

    def match(self, hashes: list[bytes], num_tokens: int) -> tuple[int, int]:
        """(GPU hit blocks, CPU hit blocks after them) for a prompt's block hashes.

        As in vLLM, the last prompt token is always computed, so at most
        ``(num_tokens - 1) // block_size`` blocks can hit.
        """
        limit = min(len(hashes), max(0, (num_tokens - 1) // self.block_size))
        gpu = 0
        while gpu < limit and hashes[gpu] in self.blocks:
            gpu += 1
        cpu = 0
        while gpu + cpu < limit and hashes[gpu + cpu] in self.cpu:
            cpu += 1
        return gpu, cpu

    # ------------------------------------------------------------------ allocation

    def _take_free(self, n: int) -> None:
        """Make ``n`` blocks free by evicting LRU cached blocks; raise NoSpace if impossible."""
        if n > self.capacity - self.num_allocated + len(self._evictable):
            raise NoSpace
        removed: list[bytes] = []
        while self.capacity - self.num_allocated < n:
            h, _ = self._evictable.popitem(last=False)
            blk = self.blocks.pop(h)
            removed.append(h)
            if self.cpu_capacity:
                self._offload(blk)
        if removed:
            self.events.append(
                EngineEvent("removed", [self._wire(h) for h in removed], medium="GPU")
            )

    def _offload(self, blk: CachedBlock) -> None:
        if blk.block_hash in self.cpu:
            self.cpu.move_to_end(blk.block_hash)
            return
        if len(self.cpu) >= self.cpu_capacity:
            old, _ = self.cpu.popitem(last=False)
            self.events.append(EngineEvent("removed", [self._wire(old)], medium="CPU"))
        self.cpu[blk.block_hash] = (blk.parent, blk.token_ids)
        self.events.append(
            EngineEvent(
                "stored",
                [self._wire(blk.block_hash)],
                None if blk.parent is None else self._wire(blk.parent),
                blk.token_ids,
                self.block_size,
                medium="CPU",
                lora_name=blk.lora_name,
                extra_keys=[blk.extra],
            )
        )

    def allocate(
        self,
        hashes: list[bytes],
        token_ids: list[int],
        num_tokens: int,
        reserve_tokens: int,
        lora_name: str | None = None,
        lora_id: int | None = None,
        extra: ExtraKeys | None = None,
        delay_cache: bool = False,
    ) -> tuple[Allocation, int, int]:
        """Admit a request: reuse its cached prefix, cache its other full prompt blocks.

        ``reserve_tokens`` more tokens (the output) get room reserved now, so a running request
        never runs out of blocks. ``extra(i)`` gives block i's extra keys as events carry
        them. With ``delay_cache`` the blocks past the hit are only held, not cached, until
        :meth:`cache_loaded` (vLLM's ``delay_cache_blocks`` while a remote KV load runs).
        Returns (allocation, GPU hit blocks, CPU-loaded blocks); raises
        :class:`NoSpace` (changing nothing) when it does not fit.
        """
        extra = extra or _no_extra
        bs = self.block_size
        gpu_hit, cpu_hit = self.match(hashes, num_tokens)
        total_blocks = -(-(num_tokens + reserve_tokens) // bs)
        need_new = total_blocks - gpu_hit
        # Hit blocks that sit unreferenced in the cache get pinned, so they cannot also be freed.
        pinned = sum(1 for h in hashes[:gpu_hit] if h in self._evictable)
        if need_new > self.capacity - self.used - pinned:
            raise NoSpace
        alloc = Allocation()
        for h in hashes[:gpu_hit]:
            self._ref(h)
            alloc.held.append(h)
            alloc.chain.append(h)
        self._take_free(need_new)
        if delay_cache:
            alloc.uncached = total_blocks - gpu_hit  # held, cached once loaded
            self._uncached_in_use += alloc.uncached
            return alloc, gpu_hit, cpu_hit
        alloc.uncached = total_blocks - gpu_hit
        self._uncached_in_use += alloc.uncached
        # The other full prompt blocks (loaded from CPU or computed) are cached now.
        self._cache_prompt(alloc, hashes, token_ids, lora_name, lora_id, extra)
        return alloc, gpu_hit, cpu_hit

    def cache_loaded(
        self,
        alloc: Allocation,
        hashes: list[bytes],
        token_ids: list[int],
        lora_name: str | None = None,
        lora_id: int | None = None,
        extra: ExtraKeys | None = None,
    ) -> None:
        """The remote KV of a ``delay_cache`` allocation arrived: cache its full prompt
        blocks now, reported as BlockStored as vLLM reports blocks it loaded."""
        if not alloc.released:
            self._cache_prompt(alloc, hashes, token_ids, lora_name, lora_id,
                               extra or _no_extra)

    def _cache_prompt(self, alloc: Allocation, hashes: list[bytes], token_ids: list[int],
                      lora_name: str | None, lora_id: int | None, extra: ExtraKeys) -> None:
        """Cache the prompt's full blocks past ``alloc.chain`` (each was an uncached slot)."""
        bs = self.block_size
        run: list[CachedBlock] = []
        for i in range(len(alloc.chain), len(hashes)):
            h = hashes[i]
            if h in self.blocks:
                # Already cached (past the hit limit, as vLLM recomputes the last block, or
                # by another request meanwhile): this copy keeps its slot, uncached.
                self._flush_run(run, lora_id)
                run = []
            else:
                parent = hashes[i - 1] if i else None
                toks = token_ids[i * bs : (i + 1) * bs]
                blk = self.blocks[h] = CachedBlock(h, parent, toks, 1, lora_name, extra(i))
                alloc.held.append(h)
                alloc.uncached -= 1
                self._uncached_in_use -= 1
                run.append(blk)
            alloc.chain.append(h)
        self._flush_run(run, lora_id)

    def _ref(self, h: bytes) -> None:
        blk = self.blocks[h]
        if blk.ref_cnt == 0:
            self._evictable.pop(h, None)
        blk.ref_cnt += 1

    def _flush_run(self, run: list[CachedBlock], lora_id: int | None) -> None:
        """Report one BlockStored for a run of consecutive newly cached blocks."""
        if not run:
            return
        first = run[0]
        self.events.append(
            EngineEvent(
                "stored",
                [self._wire(b.block_hash) for b in run],
                None if first.parent is None else self._wire(first.parent),
                [t for b in run for t in b.token_ids],
                self.block_size,
                medium="GPU",
                lora_id=lora_id,
                lora_name=first.lora_name,
                extra_keys=[b.extra for b in run],
            )
        )

    def cache_generated(
        self,
        alloc: Allocation,
        block_hash: bytes,
        token_ids: list[int],
        lora_name: str | None = None,
        lora_id: int | None = None,
        extra: tuple[Any, ...] | None = None,
    ) -> None:
        """A reserved block was filled by generated tokens: cache it (it joins the chain)."""
        parent = alloc.chain[-1] if alloc.chain else None
        alloc.chain.append(block_hash)
        if block_hash in self.blocks:
            return  # an identical block is cached already; ours stays an uncached slot
        alloc.uncached -= 1
        self._uncached_in_use -= 1
        blk = CachedBlock(block_hash, parent, list(token_ids), 1, lora_name, extra)
        self.blocks[block_hash] = blk
        alloc.held.append(block_hash)
        self._flush_run([blk], lora_id)

    def release(self, alloc: Allocation) -> None:
        """A request finished: its blocks stay cached but become evictable (MRU)."""
        if alloc.released:
            return
        for h in reversed(alloc.held):  # the tail is least useful: evict it first
            blk = self.blocks.get(h)
            if blk is None:
                continue
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._evictable[h] = None
        self._uncached_in_use -= alloc.uncached
        alloc.held = []
        alloc.uncached = 0
        alloc.released = True

    def reset(self) -> bool:
        """Drop every unreferenced cached block (``POST /reset_prefix_cache``).

        Like vLLM, refuse (return False) while any request holds blocks; on success one
        AllBlocksCleared is reported and no BlockRemoved.
        """
        if self.used > 0:
            return False
        self.blocks.clear()
        self._evictable.clear()
        self.cpu.clear()
        self.events.append(EngineEvent("cleared"))
        return True

    def contents(self) -> dict[str, list[bytes]]:
        """Every cached block hash per tier (for tests and the debug endpoint)."""
        return {"GPU": list(self.blocks), "CPU": list(self.cpu)}

    def drain_events(self) -> list[EngineEvent]:
        """Take the events reported since the last call."""
        ev, self.events = self.events, []
        return ev
