"""Shared storage in the index: held by the pool, not the writing pod; placeholders keyed
through the engine-hash map; every pod of the pool credited; removals, TTL and the per-pool
cap; snapshots add to the pool's blocks."""

from __future__ import annotations

from infermesh.libs import kvblock
from infermesh.libs.kvindex import KVIndex, StreamTracker
from infermesh.libs.kvindex.index import storage_holder
from infermesh.proto.messages import (
    TIER_SHARED,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    PodState,
    Snapshot,
    SnapshotBlock,
)

M = "infermesh/tiny-llama"
BS = 4
S = TIER_SHARED


def chain(n: int, base: int = 1000) -> tuple[list[int], list[int]]:
    return [base + i for i in range(n)], [base * 10 + i for i in range(n * BS)]


def gpu(hashes: list[int], toks: list[int], parent: int | None = None) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_hash=parent, token_ids=toks, block_size=BS)


def placeholder(hashes: list[int], tier: str = S) -> BlockStored:
    """What vLLM's offloading connector sends by default: no tokens, block size 0."""
    return BlockStored(block_hashes=hashes, token_ids=[], block_size=0, tier=tier)


def match(idx: KVIndex, keys: list[int], pods: list[str]) -> dict[str, tuple[int, list[str]]]:
    return {m.pod: (m.blocks, m.tiers) for m in idx.lookup(keys, pods)}


def test_placeholder_storage_blocks_are_the_pools_and_outlive_the_writer() -> None:
    hashes, toks = chain(6)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.set_pool("b", "p1")
    idx.set_pool("c", "p2")
    # Pod a computes the prompt on GPU, then its engine offloads the first 4 blocks to storage.
    idx.apply("a", M, [gpu(hashes, toks)], pool="p1")
    idx.apply("a", M, [placeholder(hashes[:4])], pool="p1")
    assert idx.stats.unkeyable == 0 and idx.storage_blocks("p1") == 4
    # a itself: its own 6 GPU blocks; b (same pool, holds nothing): 4 from storage; c (another
    # pool): nothing.
    got = match(idx, keys, ["a", "b", "c"])
    assert got["a"] == (6, [])
    assert got["b"] == (4, [S] * 4)
    assert got["c"] == (0, [])
    # The storage holder is never answered as a pod.
    assert storage_holder("p1") not in {m.pod for m in idx.lookup(keys)}
    assert {m.pod for m in idx.lookup(keys)} == {"a", "b"}
    # GPU evicts the blocks, then the pod goes away: storage still holds the prefix.
    idx.apply("a", M, [BlockRemoved(block_hashes=hashes)], pool="p1")
    idx.drop_pod("a")
    idx.set_pool("d", "p1")  # a fresh pod of the pool (its heartbeat came, no blocks yet)
    idx.pod("d")
    got = match(idx, keys, ["b", "d"])
    assert got == {"b": (4, [S] * 4), "d": (4, [S] * 4)}


def test_own_blocks_then_storage_past_them() -> None:
    hashes, toks = chain(6)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("w", M, [gpu(hashes, toks), placeholder(hashes)], pool="p")
    idx.apply("w", M, [BlockRemoved(block_hashes=hashes)], pool="p")
    # b holds the first two blocks on GPU: they stay GPU, the other four come from storage.
    idx.apply("b", M, [gpu(hashes[:2], toks[: 2 * BS])], pool="p")
    assert match(idx, keys, ["b"]) == {"b": (6, ["GPU", "GPU"] + [S] * 4)}


def test_self_describing_storage_events_need_no_gpu_history() -> None:
    hashes, toks = chain(3)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    ev = BlockStored(block_hashes=hashes, token_ids=toks, block_size=BS, tier=S)
    assert idx.apply("a", M, [ev], pool="p") == 0
    idx.set_pool("b", "p")
    idx.pod("b")
    assert match(idx, keys, ["b"]) == {"b": (3, [S] * 3)}


def test_unknown_placeholder_is_unkeyable() -> None:
    idx = KVIndex()
    assert idx.apply("a", M, [placeholder([77, 78])], pool="p") == 2
    assert idx.storage_blocks("p") == 0


def test_removal_from_any_pod_and_clear_leaves_storage() -> None:
    hashes, toks = chain(4)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    idx.apply("a", M, [gpu(hashes, toks), placeholder(hashes)], pool="p")
    # Clearing a pod (a restarted engine) keeps what the pool's storage holds.
    idx.apply("a", M, [AllBlocksCleared()], pool="p")
    idx.clear_pod("a")
    assert idx.storage_blocks("p") == 4
    # Another engine of the pool evicted the last two blocks' files: its removal counts.
    idx.apply("b", M, [BlockRemoved(block_hashes=hashes[2:], tier=S)], pool="p")
    assert idx.storage_blocks("p") == 2 and idx.stats.storage_removed == 2
    assert match(idx, keys, ["a", "b"]) == {"a": (2, [S, S]), "b": (2, [S, S])}


def test_ttl_and_cap_age_storage_out() -> None:
    h1, t1 = chain(3, 1000)
    h2, t2 = chain(3, 2000)
    idx = KVIndex(storage_ttl_s=10.0, storage_max_blocks=4)
    idx.apply("a", M, [gpu(h1, t1), placeholder(h1)], pool="p")
    idx.apply("a", M, [gpu(h2, t2), placeholder(h2)], pool="p")
    # The cap: 6 stored, the oldest 2 forgotten (chain 1's tail first: children go first).
    assert idx.storage_blocks("p") == 4 and idx.stats.storage_expired == 2
    import time

    idx.expire_storage(time.monotonic() + 5)
    assert idx.storage_blocks("p") == 4
    idx.expire_storage(time.monotonic() + 11)
    assert idx.storage_blocks("p") == 0 and idx.stats.storage_expired == 6


def test_snapshot_adds_to_the_pools_storage() -> None:
    hashes, toks = chain(3)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex()
    # The pool already holds another chain written by pod z.
    oh, ot = chain(2, 5000)
    idx.apply("z", M, [gpu(oh, ot), placeholder(oh)], pool="p")
    blocks = [
        SnapshotBlock(hashes[0], None, toks[:BS], ["GPU", S]),
        SnapshotBlock(hashes[1], hashes[0], toks[BS : 2 * BS], [S]),
        SnapshotBlock(hashes[2], hashes[1], [], [S]),  # a placeholder the pod never saw whole
    ]
    idx.apply("a", M, [gpu(hashes, toks)], pool="p")  # so the placeholder resolves (retired)
    idx.apply("a", M, [BlockRemoved(block_hashes=hashes)], pool="p")
    assert idx.replace("a", M, blocks, pool="p") == 0
    assert idx.storage_blocks("p") == 5  # z's two kept, a's three added
    got = match(idx, keys, ["a"])
    assert got == {"a": (3, ["GPU", S, S])}


def test_stream_tracker_routes_by_pool_and_sweeps() -> None:
    hashes, toks = chain(4)
    keys = kvblock.prompt_keys(M, toks, BS)
    idx = KVIndex(storage_ttl_s=30.0)
    tr = StreamTracker(idx, pod_timeout_s=2.0, pod_late_s=1.0)

    def batch(pod: str, seq: int, events: list) -> KVEventBatch:
        return KVEventBatch(pod=pod, pool="p", model=M, epoch="e-" + pod, seq=seq, ts=0.0,
                            events=events)

    def beat(pod: str, now: float) -> None:
        tr.on_heartbeat(PodState(pod=pod, pool="p", model=M, url="http://x", ts=now,
                                 epoch="e-" + pod, kv_seq=0), now)

    assert not tr.on_batch(batch("a", 1, [gpu(hashes, toks)]), 0.0)
    assert not tr.on_batch(batch("a", 2, [placeholder(hashes)]), 0.0)
    beat("b", 0.0)
    assert match(idx, keys, ["b"]) == {"b": (4, [S] * 4)}
    # a falls silent while b keeps speaking: a is dropped, the storage stays.
    for t in (1.0, 2.0, 3.0):
        beat("b", t)
    assert tr.expire(3.0) == ["a"]
    assert match(idx, keys, ["b"]) == {"b": (4, [S] * 4)}
    snap = Snapshot(pod="b", pool="p", model=M, epoch="e-b", seq=0, block_size=BS, part=0,
                    parts=1, blocks=[])
    tr.streams["b"].syncing = True
    tr.apply_snapshot("b", [snap], 3.0)  # an empty snapshot of b removes nothing of the pool's
    assert match(idx, keys, ["b"]) == {"b": (4, [S] * 4)}


async def test_a_schedulers_local_index_ages_pool_storage_as_configured(monkeypatch) -> None:
    """The scheduler's (and the ingress's) local index takes the storage knobs the indexer
    has, so both answer alike for storage that reports no removals."""
    from infermesh.libs.kvindex import follower
    from infermesh.libs.scheduling.core import SchedulerCore
    from infermesh.proto.subjects import Subjects
    from infermesh.services.scheduler.config import SchedulerConfig

    async def no_bus(self) -> None:  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(follower.IndexFollower, "start", no_bus)
    cfg = SchedulerConfig(local_index_storage_ttl_s=30.0, local_index_storage_max_blocks=7)
    core = SchedulerCore(cfg, "r", Subjects("im"))
    core._nc = object()  # type: ignore[assignment]
    await core._start_index()
    assert core.local_index is not None
    idx = core.local_index.index
    assert idx.storage_ttl_s == 30.0 and idx.storage_max_blocks == 7
