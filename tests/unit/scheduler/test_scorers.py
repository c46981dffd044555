"""Every scorer's scores, on hand-made pods."""

from __future__ import annotations

import pytest

from infermesh.libs.bus import BusTimeout, NoResponders, RemoteError
from infermesh.libs.scheduling.framework import CycleState, Handle, Parameters
from infermesh.libs.scheduling.plugins import (
    ApproxPrefixCacheScorer,
    KVUtilizationScorer,
    LoadAwareScorer,
    LoraAffinityScorer,
    PrecisePrefixCacheScorer,
    QueueScorer,
)
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    LoraInfo,
    PodMatch,
    RequestEvent,
)

from .conftest import pod, req


def precise(handle: Handle, matches: list[PodMatch] | Exception, **params: object):
    asked: list[tuple[LookupRequest, float]] = []

    async def lookup(msg: LookupRequest, timeout: float) -> LookupReply:
        asked.append((msg, timeout))
        if isinstance(matches, Exception):
            raise matches
        return LookupReply(matches=matches)

    handle.index_lookup = lookup
    scorer = PrecisePrefixCacheScorer.create("precise", Parameters(params, "precise"), handle)
    return scorer, asked


async def test_precise_prefix_weights_blocks_by_tier(handle):
    scorer, asked = precise(handle, [
        PodMatch(pod="a", blocks=4, tiers=["GPU"] * 4),
        PodMatch(pod="b", blocks=4, tiers=["GPU", "GPU", "CPU", "SHARED_STORAGE"]),
        PodMatch(pod="c", blocks=2),  # no tiers: GPU
        PodMatch(pod="d", blocks=0),
    ])
    cycle = CycleState()
    pods = [pod("a"), pod("b"), pod("c"), pod("d"), pod("e")]
    scores = await scorer.score(req(keys=[1, 2, 3, 4, 5, 6, 7, 8]), cycle, pods)
    assert scores == pytest.approx({"a": 4 / 8, "b": (2 + 0.8 + 0.5) / 8, "c": 2 / 8})
    assert cycle.cached_blocks == {"a": 4, "b": 4, "c": 2}
    msg, timeout = asked[0]
    assert msg.model == "m" and msg.block_keys == [1, 2, 3, 4, 5, 6, 7, 8]
    assert msg.pods == ["a", "b", "c", "d", "e"] and timeout == 0.05


async def test_precise_prefix_tier_weights_and_timeout_are_parameters(handle):
    scorer, asked = precise(
        handle, [PodMatch(pod="a", blocks=2, tiers=["CPU", "CPU"])],
        tier_weights={"CPU": 0.25}, timeout_s=0.2,
    )
    scores = await scorer.score(req(keys=[1, 2]), CycleState(), [pod("a")])
    assert scores == {"a": 0.25} and asked[0][1] == 0.2


async def test_precise_prefix_full_match_scores_one_and_caps_at_prompt_length(handle):
    scorer, _ = precise(handle, [PodMatch(pod="a", blocks=9, tiers=["GPU"] * 9)])
    cycle = CycleState()
    assert await scorer.score(req(keys=[1, 2, 3]), cycle, [pod("a")]) == {"a": 1.0}
    assert cycle.cached_blocks == {"a": 3}


@pytest.mark.parametrize("error,outcome", [
    (BusTimeout("slow"), "timeout"),
    (NoResponders("none"), "no_responders"),
    (RemoteError("500", "boom"), "error"),
    (ValueError("anything"), "error"),
])
async def test_precise_prefix_scores_zero_when_the_indexer_fails(handle, error, outcome):
    scorer, _ = precise(handle, error)
    scores = await scorer.score(req(keys=[1, 2]), CycleState(), [pod("a"), pod("b")])
    assert scores == {} and scorer.failures == 1
    counter = handle.metrics.index_lookups.labels("precise", outcome)
    assert counter._value.get() == 1


async def test_precise_prefix_retries_a_timed_out_lookup_once(handle):
    # A dead indexer replica times out; the retry reaches another member of the queue group.
    calls: list[float] = []

    async def lookup(msg: LookupRequest, timeout: float) -> LookupReply:
        calls.append(timeout)
        if len(calls) == 1:
            raise BusTimeout("replica died")
        return LookupReply(matches=[PodMatch(pod="a", blocks=2)])

    handle.index_lookup = lookup
    scorer = PrecisePrefixCacheScorer.create("precise", Parameters({}, "precise"), handle)
    assert await scorer.score(req(keys=[1, 2]), CycleState(), [pod("a")]) == {"a": 1.0}
    assert len(calls) == 2 and scorer.failures == 0
    assert handle.metrics.index_lookups.labels("precise", "retried")._value.get() == 1


async def test_precise_prefix_without_block_keys_does_not_ask(handle):
    scorer, asked = precise(handle, [])
    cycle = CycleState()
    assert await scorer.score(req(keys=[]), cycle, [pod("a")]) == {}
    assert asked == [] and cycle.cached_blocks == {}


def routed(rid: str, pod_name: str, keys: list[int]) -> RequestEvent:
    return RequestEvent(kind="routed", request_id=rid, pod=pod_name, pool="default", model="m",
                        ts=0.0, block_keys=keys)


async def test_precise_prefix_credits_recently_routed_prompts_until_their_events_come(
        handle, monkeypatch):
    """A new prefix routed to ``b`` a moment ago is not in the index yet (its KV events are on
    their way): ``b`` is credited with the blocks that prompt shares, as GPU blocks, for
    ``speculative_s``; a failed request is taken back; the index wins when it knows more."""
    from infermesh.libs.scheduling.plugins import precise_prefix_scorer as mod

    now = [100.0]
    monkeypatch.setattr(mod.time, "monotonic", lambda: now[0])
    scorer, _ = precise(handle, [PodMatch(pod="a", blocks=2)], speculative_s=2.0)
    keys = [1, 2, 3, 4, 5, 6, 7, 8]
    scorer.on_request_event(routed("r1", "b", [1, 2, 3, 4, 5, 6, 70, 80]))
    scorer.on_request_event(routed("r2", "c", [9, 9, 9]))  # another prefix: nothing shared
    scorer.on_request_event(routed("r3", "z", keys))  # not a candidate
    cycle = CycleState()
    pods = [pod("a"), pod("b"), pod("c")]
    scores = await scorer.score(req(keys=keys), cycle, pods)
    assert scores == pytest.approx({"a": 2 / 8, "b": 6 / 8})
    assert cycle.cached_blocks == {"a": 2, "b": 6}
    assert handle.metrics.speculative.labels("precise")._value.get() == 1
    # Past speculative_s the credit is gone (the events had time to come).
    now[0] += 2.5
    assert await scorer.score(req(keys=keys), CycleState(), pods) == pytest.approx(
        {"a": 2 / 8})
    # A routed request that failed is taken back at once; so is a pod that left.
    scorer.on_request_event(routed("r4", "b", keys))
    scorer.on_request_event(routed("r5", "c", keys))
    scorer.on_request_event(RequestEvent(kind="finished", request_id="r4", pod="b",
                                         pool="default", model="m", ts=0.0, status="failed"))
    scorer.on_pod_removed("c")
    assert await scorer.score(req(keys=keys), CycleState(), pods) == pytest.approx(
        {"a": 2 / 8})
    # The index already knows more than the routed prompt shares: the index's count stands.
    scorer2, _ = precise(handle, [PodMatch(pod="b", blocks=7)], speculative_s=2.0)
    scorer2.on_request_event(routed("r1", "b", [1, 2, 3, 70]))
    assert await scorer2.score(req(keys=keys), CycleState(), pods) == pytest.approx(
        {"b": 7 / 8})
    # Off with 0.
    off, _ = precise(handle, [], speculative_s=0)
    off.on_request_event(routed("r1", "b", keys))
    assert await off.score(req(keys=keys), CycleState(), pods) == {}


async def test_approx_prefix_scores_the_longest_routed_prefix():
    s = ApproxPrefixCacheScorer("approx")
    s.on_request_event(routed("r1", "a", [1, 2, 3, 4]))
    s.on_request_event(routed("r2", "b", [1, 2, 9]))
    s.on_request_event(routed("r3", "c", [7, 8]))
    pods = [pod("a"), pod("b"), pod("c")]
    scores = await s.score(req(keys=[1, 2, 3, 5]), CycleState(), pods)
    assert scores == {"a": 3 / 4, "b": 2 / 4}
    # Only candidates are scored.
    assert await s.score(req(keys=[1, 2, 3, 5]), CycleState(), [pod("b")]) == {"b": 0.5}
    assert await s.score(req(keys=[6, 5]), CycleState(), pods) == {}


async def test_approx_prefix_lru_evicts_per_pod_and_forgets_removed_pods():
    s = ApproxPrefixCacheScorer("approx", lru_capacity_per_pod=4)
    s.on_request_event(routed("r1", "a", [1, 2, 3]))
    s.on_request_event(routed("r2", "a", [1, 5]))  # 1 is used again
    assert s.blocks_of("a") == 4
    s.on_request_event(routed("r3", "a", [10, 11]))  # over capacity: the oldest prompt goes
    assert s.blocks_of("a") == 4  # 1 and 5 (used later), 10 and 11
    assert await s.score(req(keys=[1, 2, 3]), CycleState(), [pod("a")]) == {"a": 1 / 3}
    assert await s.score(req(keys=[1, 5]), CycleState(), [pod("a")]) == {"a": 1.0}
    assert await s.score(req(keys=[10, 11]), CycleState(), [pod("a")]) == {"a": 1.0}
    s.on_request_event(routed("r4", "a", [20, 21, 22]))  # r2's and r3's prompts go
    assert s.blocks_of("a") == 3
    s.on_pod_removed("a")
    assert s.blocks_of("a") == 0
    assert await s.score(req(keys=[10, 11]), CycleState(), [pod("a")]) == {}


async def test_approx_prefix_caps_matching_and_ignores_other_events():
    s = ApproxPrefixCacheScorer("approx", max_prefix_blocks=2)
    s.on_request_event(routed("r1", "a", [1, 2, 3, 4]))
    assert s.blocks_of("a") == 2
    assert await s.score(req(keys=[1, 2, 3, 4]), CycleState(), [pod("a")]) == {"a": 1.0}
    fin = RequestEvent(kind="finished", request_id="r1", pod="b", pool="default", model="m",
                       ts=0.0, block_keys=[1, 2])
    s.on_request_event(fin)
    assert s.blocks_of("b") == 0


async def test_approx_prefix_records_a_request_once_per_pod():
    s = ApproxPrefixCacheScorer("approx", lru_capacity_per_pod=2)
    s.on_request_event(routed("r1", "a", [1, 2]))
    s.on_request_event(routed("r2", "a", [3, 4]))
    # The ingress's routed event for r2 after this replica's own record: no LRU touch.
    s.on_request_event(routed("r2", "a", [3, 4]))
    assert await s.score(req(keys=[3, 4]), CycleState(), [pod("a")]) == {"a": 1.0}
    # A retry elsewhere is recorded for the new pod.
    s.on_request_event(routed("r2", "b", [3, 4]))
    assert s.blocks_of("b") == 2


async def test_queue_scorer_is_min_max_normalised():
    s = QueueScorer("queue")
    pods = [pod("a", waiting=0), pod("b", waiting=5), pod("c", waiting=10)]
    assert await s.score(req(), CycleState(), pods) == {"a": 1.0, "b": 0.5, "c": 0.0}
    same = [pod("a", waiting=3), pod("b", waiting=3)]
    assert await s.score(req(), CycleState(), same) == {"a": 1.0, "b": 1.0}


async def test_kv_utilization_scorer():
    s = KVUtilizationScorer("kv")
    pods = [pod("a", kv_usage=0.0), pod("b", kv_usage=0.75)]
    assert await s.score(req(), CycleState(), pods) == {"a": 1.0, "b": 0.25}


async def test_load_aware_scorer_is_linear_up_to_the_threshold():
    s = LoadAwareScorer.create("load", Parameters({"threshold": 4}, "load"), None)  # type: ignore[arg-type]
    pods = [pod("a", inflight=0), pod("b", inflight=1), pod("c", inflight=4), pod("d", inflight=9)]
    assert await s.score(req(), CycleState(), pods) == {"a": 1.0, "b": 0.75, "c": 0.0, "d": 0.0}


async def test_lora_affinity_scorer():
    s = LoraAffinityScorer("lora")
    pods = [
        pod("run", lora=LoraInfo(running=["x"], max_lora=2)),
        pod("wait", lora=LoraInfo(waiting=["x"], max_lora=2)),
        pod("room", lora=LoraInfo(running=["y"], max_lora=2)),
        pod("full", lora=LoraInfo(running=["y", "z"], max_lora=2)),
    ]
    scores = await s.score(req(lora_name="x"), CycleState(), pods)
    assert scores == {"run": 1.0, "wait": 0.8, "room": 0.5, "full": 0.0}
    assert set((await s.score(req(), CycleState(), pods)).values()) == {1.0}
