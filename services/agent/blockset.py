"""The block set of one engine, per tier, as the agent learns it from the engine's events.

This is the agent's hot path (every block of every event passes through ``apply``), so a block is
a small list rather than an object, its tiers a bit mask, and its tokens a reference into the
event's token list (sliced only when a snapshot needs them).
"""

from __future__ import annotations

from collections.abc import Iterator

from infermesh.proto.messages import (
    TIERS,
    AllBlocksCleared,
    AnyKVEvent,
    BlockRemoved,
    BlockStored,
    SnapshotBlock,
)

# Fields of a block record:
# [parent hash, token list, offset in it, block size, lora, tier mask, extra keys]
PARENT, TOKENS, OFFSET, SIZE, LORA, MASK, EXTRA = range(7)

_NO_TOKENS: list[int] = []


class BlockSet:
    """engine hash → block, with the tiers holding it. Applying events is idempotent."""

    def __init__(self) -> None:
        self.blocks: dict[int, list] = {}  # type: ignore[type-arg]
        self.block_size = 0
        self.anomalies = 0  # events that did not fit (counted, not fatal)
        self._bits: dict[str, int] = {t: 1 << i for i, t in enumerate(TIERS)}

    def __len__(self) -> int:
        return len(self.blocks)

    def _bit(self, tier: str) -> int:
        bit = self._bits.get(tier)
        if bit is None:  # a medium we have not seen: give it the next bit
            bit = self._bits[tier] = 1 << len(self._bits)
        return bit

    def tiers(self, h: int) -> list[str]:
        """Tiers holding block ``h`` (best first)."""
        mask = self.blocks[h][MASK]
        return [t for t, b in self._bits.items() if mask & b]

    def tokens(self, h: int) -> list[int]:
        """Token ids of block ``h`` (empty when the engine did not send them)."""
        rec = self.blocks[h]
        return rec[TOKENS][rec[OFFSET] : rec[OFFSET] + rec[SIZE]]

    def count(self, tier: str) -> int:
        """Blocks held in ``tier``."""
        bit = self._bit(tier)
        return sum(1 for r in self.blocks.values() if r[MASK] & bit)

    def clear(self) -> None:
        """Forget everything."""
        self.blocks.clear()

    def apply(self, ev: AnyKVEvent) -> None:
        """Apply one event in the project's schema."""
        if isinstance(ev, BlockStored):
            self._stored(ev)
        elif isinstance(ev, BlockRemoved):
            self._drop(ev.block_hashes, self._bit(ev.tier))
        elif isinstance(ev, AllBlocksCleared):
            if ev.tier is None:
                self.blocks.clear()
            else:
                bit = self._bit(ev.tier)
                self._drop([h for h, r in self.blocks.items() if r[MASK] & bit], bit)

    def _drop(self, hashes: list[int], bit: int) -> None:
        blocks = self.blocks
        for h in hashes:
            rec = blocks.get(h)
            if rec is not None:
                rec[MASK] &= ~bit
                if not rec[MASK]:
                    del blocks[h]

    def _stored(self, ev: BlockStored) -> None:
        bs = ev.block_size
        if bs > 0:
            self.block_size = bs
        toks = ev.token_ids
        have = bs > 0 and len(toks) >= len(ev.block_hashes) * bs
        if toks and not have:
            self.anomalies += 1
            toks = _NO_TOKENS
        size = bs if have else 0
        bit = self._bit(ev.tier)
        lora = ev.lora_name
        parent = ev.parent_hash
        blocks = self.blocks
        extras = ev.extra_keys
        if extras is not None and len(extras) != len(ev.block_hashes):
            self.anomalies += 1
            extras = None
        off = 0
        for i, h in enumerate(ev.block_hashes):
            rec = blocks.get(h)
            if rec is None:
                blocks[h] = [parent, toks, off, size, lora, bit, extras[i] if extras else None]
            else:
                rec[MASK] |= bit
                if not rec[SIZE] and size:
                    rec[TOKENS], rec[OFFSET], rec[SIZE] = toks, off, size
            parent = h
            off += size

    def ordered(self) -> Iterator[int]:
        """Every block hash, each parent before its children (for snapshots)."""
        done: set[int] = set()
        blocks = self.blocks
        for h in blocks:
            if h in done:
                continue
            # Walk up to the first ancestor not yet emitted, then emit downwards.
            chain = []
            cur: int | None = h
            while cur is not None and cur in blocks and cur not in done:
                chain.append(cur)
                done.add(cur)
                cur = blocks[cur][PARENT]
            yield from reversed(chain)

    def snapshot_blocks(self) -> list[SnapshotBlock]:
        """The whole set as snapshot entries, parents first."""
        b = self.blocks
        return [
            SnapshotBlock(
                h, b[h][PARENT], self.tokens(h), self.tiers(h), b[h][LORA],
                None if b[h][EXTRA] is None else list(b[h][EXTRA]),
            )
            for h in self.ordered()
        ]
