"""The agent's block set: idempotent stores, tiers, removal, clear, parent-first snapshots."""

from infermesh.proto.messages import AllBlocksCleared, BlockRemoved, BlockStored
from infermesh.services.agent.blockset import BlockSet


def stored(hashes: list[int], parent: int | None, tier: str = "GPU", bs: int = 2) -> BlockStored:
    toks = [h % 1000 for h in hashes for _ in range(bs)]
    return BlockStored(block_hashes=hashes, parent_hash=parent, token_ids=toks, block_size=bs,
                       tier=tier)


def test_store_is_idempotent_and_tiers_are_tracked() -> None:
    s = BlockSet()
    s.apply(stored([1, 2], None))
    s.apply(stored([1, 2], None))
    assert len(s) == 2 and s.tokens(2) == [2, 2] and s.snapshot_blocks()[1].parent_hash == 1
    s.apply(stored([2], 1, tier="CPU"))
    assert s.tiers(2) == ["GPU", "CPU"]
    s.apply(BlockRemoved(block_hashes=[2], tier="GPU"))
    assert s.tiers(2) == ["CPU"] and s.count("GPU") == 1
    s.apply(BlockRemoved(block_hashes=[2, 99], tier="CPU"))  # unknown hash ignored
    assert 2 not in s.blocks


def test_clear_per_tier_and_all() -> None:
    s = BlockSet()
    s.apply(stored([1], None))
    s.apply(stored([1], None, tier="CPU"))
    s.apply(stored([5], None, tier="CPU"))
    s.apply(AllBlocksCleared(tier="CPU"))
    assert set(s.blocks) == {1} and s.tiers(1) == ["GPU"]
    s.apply(AllBlocksCleared())
    assert len(s) == 0


def test_snapshot_orders_parents_first_even_after_reinsertion() -> None:
    s = BlockSet()
    s.apply(stored([1, 2, 3], None))
    s.apply(BlockRemoved(block_hashes=[1], tier="GPU"))
    s.apply(stored([1], None))  # the root comes back after its children
    order = [b.block_hash for b in s.snapshot_blocks()]
    assert order.index(1) < order.index(2) < order.index(3)


def test_short_token_list_is_an_anomaly_not_a_crash() -> None:
    s = BlockSet()
    s.apply(BlockStored(block_hashes=[1, 2], token_ids=[1], block_size=4))
    assert s.anomalies == 1 and s.tokens(1) == []


def test_unknown_medium_gets_its_own_tier() -> None:
    s = BlockSet()
    s.apply(stored([1], None, tier="LMCACHE_DISK"))
    s.apply(stored([1], None))
    assert s.tiers(1) == ["GPU", "LMCACHE_DISK"]
    s.apply(AllBlocksCleared(tier="LMCACHE_DISK"))
    assert s.tiers(1) == ["GPU"]
