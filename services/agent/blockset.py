"""The block set of one engine, per tier, as the agent learns it from the engine's events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from infermesh.proto.messages import (
    AllBlocksCleared,
    AnyKVEvent,
    BlockRemoved,
    BlockStored,
    SnapshotBlock,
)


@dataclass(slots=True)
class BlockRecord:
    """One block the engine holds in at least one tier."""

    parent: int | None
    token_ids: list[int]
    lora_name: str | None
    tiers: set[str] = field(default_factory=set)


class BlockSet:
    """engine hash → block, with the tiers holding it. Applying events is idempotent."""

    def __init__(self) -> None:
        self.blocks: dict[int, BlockRecord] = {}
        self.block_size = 0
        self.anomalies = 0  # events that did not fit (counted, not fatal)

    def __len__(self) -> int:
        return len(self.blocks)

    def count(self, tier: str) -> int:
        """Blocks held in ``tier``."""
        return sum(1 for b in self.blocks.values() if tier in b.tiers)

    def clear(self) -> None:
        """Forget everything."""
        self.blocks.clear()

    def apply(self, ev: AnyKVEvent) -> None:
        """Apply one event in the project's schema."""
        if isinstance(ev, BlockStored):
            self._stored(ev)
        elif isinstance(ev, BlockRemoved):
            for h in ev.block_hashes:
                rec = self.blocks.get(h)
                if rec is None:
                    continue
                rec.tiers.discard(ev.tier)
                if not rec.tiers:
                    del self.blocks[h]
        elif isinstance(ev, AllBlocksCleared):
            if ev.tier is None:
                self.blocks.clear()
            else:
                for h in [h for h, r in self.blocks.items() if ev.tier in r.tiers]:
                    rec = self.blocks[h]
                    rec.tiers.discard(ev.tier)
                    if not rec.tiers:
                        del self.blocks[h]

    def _stored(self, ev: BlockStored) -> None:
        bs = ev.block_size
        if bs > 0:
            self.block_size = bs
        parent = ev.parent_hash
        have_tokens = bs > 0 and len(ev.token_ids) >= len(ev.block_hashes) * bs
        if ev.token_ids and not have_tokens:
            self.anomalies += 1
        for i, h in enumerate(ev.block_hashes):
            rec = self.blocks.get(h)
            if rec is None:
                toks = ev.token_ids[i * bs : (i + 1) * bs] if have_tokens else []
                rec = self.blocks[h] = BlockRecord(parent, toks, ev.lora_name)
            elif not rec.token_ids and have_tokens:
                rec.token_ids = ev.token_ids[i * bs : (i + 1) * bs]
            rec.tiers.add(ev.tier)
            parent = h

    def ordered(self) -> Iterator[tuple[int, BlockRecord]]:
        """Every block, each parent before its children (for snapshots)."""
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
                cur = blocks[cur].parent
            for c in reversed(chain):
                yield c, blocks[c]

    def snapshot_blocks(self) -> list[SnapshotBlock]:
        """The whole set as snapshot entries, parents first."""
        return [
            SnapshotBlock(h, r.parent, r.token_ids, sorted(r.tiers), r.lora_name)
            for h, r in self.ordered()
        ]
