"""Following pods' streams: seq gaps, new epochs and unknown pods ask for a snapshot, buffered
batches apply after it, heartbeats reveal lost tails, stale pods are dropped, backoff grows."""

from __future__ import annotations

from infermesh.libs import kvblock
from infermesh.libs.kvindex import KVIndex, StreamTracker
from infermesh.proto.messages import (
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    PodMatch,
    PodState,
    Snapshot,
    SnapshotBlock,
)

M = "infermesh/tiny-llama"
BS = 4
TOKS = list(range(100, 100 + 8 * BS))
KEYS = kvblock.prompt_keys(M, TOKS, BS)
HASHES = [500 + i for i in range(8)]


def block(i: int) -> BlockStored:
    """The i-th block of the test chain as a store event."""
    return BlockStored(block_hashes=[HASHES[i]], parent_hash=HASHES[i - 1] if i else None,
                       token_ids=TOKS[i * BS : (i + 1) * BS], block_size=BS)


def batch(seq: int, *events, epoch: str = "e1", pod: str = "p", model: str = M) -> KVEventBatch:
    return KVEventBatch(pod=pod, pool="default", epoch=epoch, seq=seq, ts=0.0,
                        events=list(events), model=model)


def beat(kv_seq: int, epoch: str = "e1", pod: str = "p") -> PodState:
    return PodState(pod=pod, pool="default", model=M, url="http://x", ts=0.0, epoch=epoch,
                    kv_seq=kv_seq)


def snapshot(seq: int, n: int, epoch: str = "e1", parts: int = 1) -> list[Snapshot]:
    blocks = [SnapshotBlock(HASHES[i], HASHES[i - 1] if i else None,
                            TOKS[i * BS : (i + 1) * BS], ["GPU"]) for i in range(n)]
    size = -(-n // parts)
    return [Snapshot(pod="p", pool="default", epoch=epoch, seq=seq, block_size=BS, part=i,
                     parts=parts, blocks=blocks[i * size : (i + 1) * size], model=M)
            for i in range(parts)]


def held(t: StreamTracker, pod: str = "p") -> int:
    (m,) = t.index.lookup(KEYS, [pod])
    return m.blocks


def tracker(**kw) -> StreamTracker:
    return StreamTracker(KVIndex(), **kw)


def test_in_order_batches_apply_and_seq_1_of_a_new_pod_needs_no_snapshot() -> None:
    t = tracker()
    assert not t.on_batch(batch(1, AllBlocksCleared(), block(0)), 0.0)
    assert not t.on_batch(batch(2, block(1)), 0.0)
    assert held(t) == 2 and t.syncing() == []
    assert not t.on_batch(batch(2, block(2)), 0.0)  # a duplicate is ignored
    assert held(t) == 2 and t.stats.stale_batches == 1


def test_gap_asks_for_a_snapshot_and_buffered_batches_follow_it() -> None:
    t = tracker()
    t.on_batch(batch(1, block(0)), 0.0)
    assert t.on_batch(batch(3, block(2)), 0.0)  # seq 2 is missing
    assert t.syncing() == ["p"] and t.stats.gaps["seq"] == 1
    assert not t.on_batch(batch(4, block(3)), 0.0)  # buffered, no second request
    assert t.snapshot_due("p", 0.0) == 0.0
    # The snapshot is as of seq 3 (it has blocks 0-2); only batch 4 is newer.
    assert not t.apply_snapshot("p", snapshot(3, 3, parts=2), 0.0)
    assert held(t) == 4 and t.syncing() == [] and t.streams["p"].seq == 4
    assert t.snapshot_due("p", 0.0) is None


def test_a_gap_among_buffered_batches_asks_again() -> None:
    t = tracker()
    t.on_batch(batch(1, block(0)), 0.0)
    t.on_batch(batch(3, block(2)), 0.0)
    t.on_batch(batch(6, block(5)), 0.0)
    assert t.apply_snapshot("p", snapshot(4, 4), 0.0)  # seq 5 never came
    assert held(t) == 4 and t.syncing() == ["p"]
    t.on_batch(batch(7, block(6)), 0.0)
    assert not t.apply_snapshot("p", snapshot(6, 6), 0.0)
    assert held(t) == 7


def test_new_epoch_and_unknown_pod() -> None:
    t = tracker()
    assert t.on_batch(batch(5, block(0), pod="q"), 0.0)  # a pod met mid-stream
    assert t.stats.gaps["unknown_pod"] == 1
    t.on_batch(batch(1, block(0)), 0.0)
    t.on_batch(batch(2, block(1)), 0.0)
    # The agent restarted: its new stream starts at 1 and rebuilds the pod's blocks.
    assert not t.on_batch(batch(1, AllBlocksCleared(), block(0), epoch="e2"), 0.0)
    assert held(t) == 1
    # An epoch we join late needs a snapshot.
    assert t.on_batch(batch(3, block(2), epoch="e3"), 0.0)
    assert t.stats.gaps["epoch"] == 1
    assert not t.apply_snapshot("p", snapshot(3, 3, epoch="e3"), 0.0)
    assert held(t) == 3 and t.streams["p"].epoch == "e3"


def test_snapshot_replaces_what_the_pod_held() -> None:
    t = tracker()
    t.on_batch(batch(1, *(block(i) for i in range(6))), 0.0)
    t.on_batch(batch(3, block(2)), 0.0)
    # The engine holds less now (blocks 0-1 as of seq 2); batch 3 follows on top.
    assert not t.apply_snapshot("p", snapshot(2, 2), 0.0)
    assert held(t) == 3 and set(t.index.pod_blocks("p")) == set(HASHES[:3])


def test_heartbeat_ahead_of_the_batches_means_a_lost_tail() -> None:
    t = tracker(kv_seq_grace_s=0.5)
    t.on_batch(batch(1, block(0)), 0.0)
    assert not t.on_heartbeat(beat(1), 0.1)
    # The heartbeat overtook batch 2 (another subject); batch 2 arrives: all is well.
    assert not t.on_heartbeat(beat(2), 0.2)
    t.on_batch(batch(2, block(1)), 0.25)
    assert not t.on_heartbeat(beat(2), 0.4) and not t.on_heartbeat(beat(2), 1.0)
    # Batch 3 never comes: once the grace is over, ask for a snapshot.
    assert not t.on_heartbeat(beat(3), 1.2)
    assert not t.on_heartbeat(beat(3), 1.4)
    assert t.on_heartbeat(beat(3), 1.8)
    assert t.stats.gaps["heartbeat"] == 1 and t.syncing() == ["p"]
    assert not t.on_heartbeat(beat(3), 2.0)  # already syncing: no second request


def test_a_late_indexer_learns_pods_from_heartbeats() -> None:
    t = tracker(kv_seq_grace_s=0.3)
    assert not t.on_heartbeat(beat(0, pod="idle"), 0.0)  # nothing published yet: nothing to do
    assert not t.on_heartbeat(beat(0, pod="idle"), 1.0)
    assert not t.on_heartbeat(beat(7), 0.0)
    assert t.on_heartbeat(beat(7), 0.4)
    assert t.syncing() == ["p"] and t.stats.gaps["unknown_pod"] == 1


def test_failed_snapshots_back_off() -> None:
    t = tracker(backoff_s=0.1, backoff_max_s=0.35)
    t.on_batch(batch(2, block(1)), 0.0)
    waits = []
    for now in (1.0, 2.0, 3.0, 4.0):
        t.snapshot_failed("p", now)
        waits.append(round(t.snapshot_due("p", now) or 0.0, 3))
    assert waits == [0.1, 0.2, 0.35, 0.35] and t.stats.snapshots_failed == 4
    # Parts that disagree (another epoch in the middle of one snapshot) count as a failure.
    bad = snapshot(2, 2, parts=2)
    bad[1].epoch = "other"
    assert t.apply_snapshot("p", bad, 5.0) and t.stats.snapshots_failed == 5
    assert not t.apply_snapshot("p", snapshot(2, 2), 6.0)
    assert t.streams["p"].backoff == 0.0


def test_unkeyable_block_asks_for_a_snapshot() -> None:
    t = tracker()
    t.on_batch(batch(1, block(0)), 0.0)
    # Block 3's parent (block 2) was never announced.
    assert t.on_batch(batch(2, block(3)), 0.0)
    assert t.stats.gaps["unkeyable"] == 1 and t.stats.unkeyable == 1
    assert not t.apply_snapshot("p", snapshot(2, 4), 0.0)
    assert held(t) == 4


def test_garbage_token_ids_are_counted_and_resynced() -> None:
    t = tracker()
    bad = BlockStored(block_hashes=[1], token_ids=[-5] * BS, block_size=BS)
    assert t.on_batch(batch(1, bad), 0.0)
    assert t.stats.bad_messages["kv"] == 1 and t.syncing() == ["p"]


def test_model_comes_from_the_heartbeat_when_batches_lack_it() -> None:
    t = tracker()
    assert t.on_batch(batch(1, block(0), model=""), 0.0)  # cannot seed keys yet
    assert t.stats.gaps["model"] == 1
    t.on_heartbeat(beat(1), 0.1)
    assert not t.apply_snapshot("p", [*snapshot(1, 1)], 0.2)
    assert held(t) == 1
    assert not t.on_batch(batch(2, block(1), model=""), 0.3)
    assert held(t) == 2


def test_stale_pods_are_dropped() -> None:
    t = tracker(pod_timeout_s=1.0)
    t.on_heartbeat(beat(0, pod="a"), 0.0)
    t.on_batch(batch(1, block(0)), 0.0)
    t.on_heartbeat(beat(1), 0.0)
    assert t.expire(0.9) == []
    t.on_heartbeat(beat(1), 0.9)
    assert t.expire(1.5) == ["a"]
    assert held(t) == 1
    # p is now the only pod and silent: the indexer may be the one cut off, p stays.
    assert t.expire(5.0) == [] and held(t) == 1
    t.on_heartbeat(beat(0, pod="q"), 5.0)  # another pod speaks again: proves nothing yet
    assert t.expire(5.0) == []
    t.on_heartbeat(beat(0, pod="q"), 5.5)
    t.on_heartbeat(beat(0, pod="q"), 6.0)  # q has spoken steadily for pod_timeout_s
    assert t.expire(6.0) == ["p"]
    assert t.index.lookup(KEYS) == [] and t.stats.pods_dropped == 2
    # It comes back with a new agent: indexed again from its stream.
    t.on_batch(batch(1, AllBlocksCleared(), block(0), block(1), epoch="e9"), 7.0)
    assert t.index.lookup(KEYS) == [PodMatch(pod="p", blocks=2, tiers=[])]


def test_batches_buffered_out_of_order_apply_in_seq_order_after_the_snapshot() -> None:
    """A hop that reorders (or repeats) batches while a snapshot is in flight costs no second
    snapshot: the buffered batches of the snapshot's epoch apply by seq, copies are skipped."""
    t = tracker()
    t.on_batch(batch(1, block(0)), 0.0)
    assert t.on_batch(batch(3, block(2)), 0.0)  # seq 2 lost: a snapshot is asked for
    for seq in (5, 4, 5, 6):  # 4 overtaken by 5, 5 sent twice
        assert not t.on_batch(batch(seq, block(seq - 1)), 0.0)
    assert not t.apply_snapshot("p", snapshot(3, 3), 0.0)
    assert t.syncing() == [] and t.streams["p"].seq == 6 and held(t) == 6
    # Stale: batch 3 (in the snapshot) and the copy of 5.
    assert t.stats.gaps["seq"] == 1 and t.stats.stale_batches == 2


def test_buffered_batches_of_a_newer_epoch_follow_the_snapshot_epoch() -> None:
    t = tracker()
    t.on_batch(batch(1, block(0)), 0.0)
    assert t.on_batch(batch(3, block(2)), 0.0)
    # The agent restarted while the snapshot was in flight: its new epoch rebuilds from seq 1.
    t.on_batch(batch(2, AllBlocksCleared(), block(0), block(1), epoch="e2"), 0.0)
    t.on_batch(batch(1, AllBlocksCleared(), block(0), epoch="e2"), 0.0)
    t.on_batch(batch(4, block(3)), 0.0)
    assert not t.apply_snapshot("p", snapshot(3, 3), 0.0)
    assert t.syncing() == [] and t.streams["p"].epoch == "e2" and t.streams["p"].seq == 2
    assert held(t) == 2 and set(t.index.pod_blocks("p")) == set(HASHES[:2])
