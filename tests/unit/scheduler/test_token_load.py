"""Token-load routing: the uncached in-flight tokens per pod, the token-load scorer and the
prefix-affinity filter ("sticky until saturated")."""

from __future__ import annotations

import random

import pytest
from prometheus_client import generate_latest

from infermesh.libs.config import ConfigError
from infermesh.libs.scheduling.config import build_pipeline, load_pipeline, parse_pipeline
from infermesh.libs.scheduling.framework import CycleState, Handle, Parameters, Pod
from infermesh.libs.scheduling.plugins import PrefixAffinityFilter, TokenLoadScorer
from infermesh.libs.scheduling.state import InFlight
from infermesh.proto.messages import LookupReply, LookupRequest, PodMatch, RequestEvent
from infermesh.services.scheduler.config import SchedulerConfig
from infermesh.services.scheduler.service import SchedulerService

from .conftest import pod, pod_state, req

BLOCK = 16


def loaded(name: str, uncached: int) -> Pod:
    """A candidate with ``uncached`` tokens still to prefill."""
    p = pod(name, block_size=BLOCK)
    p.uncached_inflight = uncached
    return p


def affinity(handle: Handle, **params: object) -> PrefixAffinityFilter:
    return PrefixAffinityFilter.create("affinity", Parameters(params, "affinity"), handle)


def names(pods: list[Pod]) -> list[str]:
    return [p.name for p in pods]


# --------------------------------------------------------------------------- the filter


@pytest.mark.parametrize(("ahead", "kept"), [
    (-1, ["a"]), (0, ["a"]), (1, ["a", "b", "c"]),
])
def test_affinity_filter_releases_exactly_past_the_margin(handle, ahead, kept):
    margin = 8192
    f = affinity(handle, margin_tokens=margin)
    cycle = CycleState(cached_blocks={"a": 8, "c": 2})  # a holds the whole 8-block prompt
    coldest = 1000
    pods = [loaded("a", coldest + margin + ahead), loaded("b", coldest), loaded("c", 5000)]
    assert names(f.filter(req(keys=list(range(8))), cycle, pods)) == kept


def test_affinity_filter_threshold_ties_and_missing_lookup(handle):
    f = affinity(handle, affinity_threshold=0.5, margin_tokens=100)
    keys = list(range(8))
    pods = [loaded("a", 0), loaded("b", 50), loaded("c", 500)]
    # Under half the prompt cached anywhere: no affinity.
    assert names(f.filter(req(keys=keys), CycleState(cached_blocks={"a": 3}), pods)) == \
        ["a", "b", "c"]
    # Exactly half: sticky.
    assert names(f.filter(req(keys=keys), CycleState(cached_blocks={"a": 4}), pods)) == ["a"]
    # Two warm pods: the saturated one (c, 500 ahead of a) is dropped, the other kept.
    assert names(f.filter(req(keys=keys), CycleState(cached_blocks={"b": 6, "c": 6}), pods)) \
        == ["b"]
    # No lookup (no precise scorer answer, no block keys): every candidate stays.
    assert names(f.filter(req(keys=keys), CycleState(), pods)) == ["a", "b", "c"]
    assert names(f.filter(req(), CycleState(cached_blocks={"a": 4}), pods)) == ["a", "b", "c"]
    text = generate_latest(handle.metrics.registry).decode()
    assert 'infermesh_scheduler_prefix_affinity_total{outcome="sticky",plugin="affinity"} 2.0' \
        in text
    assert 'infermesh_scheduler_prefix_affinity_total{outcome="none",plugin="affinity"} 3.0' \
        in text


@pytest.mark.parametrize(("params", "message"), [
    ({"affinity_threshold": 0}, "'affinity_threshold' must be > 0.0"),
    ({"affinity_threshold": 1.5}, "'affinity_threshold' must be <= 1.0"),
    ({"affinity_threshold": "half"}, "'affinity_threshold' must be a number"),
    ({"margin_tokens": -1}, "'margin_tokens' must be >= 0"),
    ({"margin_tokens": 1.5}, "'margin_tokens' must be an integer"),
    ({"margin_tokens": True}, "'margin_tokens' must be an integer"),
    ({"margin_seconds": 2}, "unknown parameters ['margin_seconds']"),
])
def test_affinity_filter_refuses_bad_parameters(handle, params, message):
    with pytest.raises(ConfigError) as e:
        affinity(handle, **params)
    assert "plugin 'affinity'" in str(e.value) and message in str(e.value)


def test_token_load_scorer_takes_no_parameters(handle):
    with pytest.raises(ConfigError, match=r"unknown parameters \['threshold'\]"):
        TokenLoadScorer.create("tl", Parameters({"threshold": 3}, "tl"), handle)


def test_a_profile_with_the_affinity_filter_needs_a_precise_prefix_scorer(handle):
    spec = parse_pipeline({
        "plugins": [{"name": "affinity", "type": "prefix-affinity-filter"},
                    {"name": "tl", "type": "token-load-scorer"}],
        "profiles": [{"name": "p", "plugins": [{"ref": "affinity"}, {"ref": "tl"}]}],
    }, "test.yaml")
    with pytest.raises(ConfigError, match="test.yaml: profile 'p': filter 'affinity' reads the "
                       "blocks each pod holds, which a precise-prefix-cache-scorer"):
        build_pipeline(spec, handle)


# --------------------------------------------------------------------------- the scorer


async def test_token_load_scorer_ranks_pods_by_uncached_tokens_in_flight(handle):
    s = TokenLoadScorer("tl")
    pods = [loaded("a", 0), loaded("b", 500), loaded("c", 1000)]
    r = req(keys=list(range(4)))  # 64 tokens, the same on every pod without a lookup
    assert await s.score(r, CycleState(), pods) == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert await s.score(r, CycleState(), [loaded("a", 7), loaded("b", 7)]) == \
        {"a": 1.0, "b": 1.0}


async def test_token_load_scorer_counts_this_prompt_less_its_hits(handle):
    s = TokenLoadScorer("tl")
    r = req(keys=list(range(64)))  # 1024 tokens
    pods = [loaded("a", 0), loaded("b", 100)]
    # b holds the whole prompt: 100 + 0 beats a's 0 + 1024.
    scores = await s.score(r, CycleState(cached_blocks={"b": 64}), pods)
    assert scores == {"a": 0.0, "b": 1.0}
    # b holds half: 100 + 512 beats 1024 still, a tie at b = 512 + 512.
    assert await s.score(r, CycleState(cached_blocks={"b": 32}), pods) == {"a": 0.0, "b": 1.0}
    pods[1].uncached_inflight = 512
    assert await s.score(r, CycleState(cached_blocks={"b": 32}), pods) == {"a": 1.0, "b": 1.0}


# --------------------------------------------------------------------------- the view


def ev(kind: str, rid: str, pod_name: str, **kw: object) -> RequestEvent:
    return RequestEvent(kind=kind, request_id=rid, pod=pod_name,  # type: ignore[arg-type]
                        pool="default", model="m", ts=0.0, **kw)  # type: ignore[arg-type]


def test_inflight_uncached_tokens_routed_first_token_finished():
    fl = InFlight(10.0)
    fl.routed("r1", "a", num_tokens=1000, cached_blocks=10)  # 160 of them cached
    fl.routed("r1", "a", num_tokens=1000, cached_blocks=10)  # the ingress's event: no double
    fl.routed("r2", "a", num_tokens=300)
    assert fl.uncached_tokens("a", BLOCK) == 1000 - 160 + 300
    fl.touch("r1", "a")  # first token: prefill over, still in flight
    assert fl.uncached_tokens("a", BLOCK) == 300 and fl.count("a") == 2
    fl.routed("r1", "a", num_tokens=1000)  # a late duplicate does not reopen the prefill
    assert fl.uncached_tokens("a", BLOCK) == 300
    fl.finished("r2", "a")
    assert fl.uncached_tokens("a", BLOCK) == 0 and fl.counts() == {"a": 1}
    # A retry on b is a new prefill there; the failed attempt's finished leaves it counted.
    fl.routed("r3", "a", num_tokens=50)
    fl.routed("r3", "b", num_tokens=50)
    fl.finished("r3", "a")
    assert fl.counts() == {"a": 1, "b": 1} and fl.uncached_tokens("b", BLOCK) == 50
    assert fl.uncached_tokens("a", BLOCK) == 0


# One pool's events as one replica receives them: r1 routed by replica x (its own decision,
# then the echo of its publish), r2 by another replica y, r3 retried from a to b, r4
# disaggregated (its prefill leg on p, its decode leg on b), r5 still prefilling at the end.
ROUTED = [
    ev("routed", "r1", "a", num_tokens=4096, cached_blocks=64, replica="x"),
    ev("routed", "r1", "a", num_tokens=4096, cached_blocks=64, replica="x"),
    ev("routed", "r2", "b", num_tokens=2000, replica="y"),
    ev("routed", "r3", "a", num_tokens=900, cached_blocks=8, replica="y"),
    ev("routed", "r4-prefill", "p", num_tokens=8000, leg="prefill", replica="x"),
    ev("routed", "r4", "b", num_tokens=8000, leg="decode", replica="x"),
    ev("routed", "r3", "b", num_tokens=900, replica="y"),
    ev("routed", "r5", "a", num_tokens=3000, cached_blocks=100, replica="y"),
    ev("routed", "r6", "b", num_tokens=700, replica="x"),
]
ENDS = [
    ev("first_token", "r1", "a"),
    ev("finished", "r2", "b"),
    ev("finished", "r3", "a", status="failed"),
    ev("first_token", "r3", "b"),
    ev("finished", "r4-prefill", "p", leg="prefill"),
    ev("first_token", "r4", "b"),
    ev("finished", "r6", "b"),
]


def view(events: list[RequestEvent]) -> tuple[dict[str, int], dict[str, tuple[int, int]],
                                              dict[str, int]]:
    svc = SchedulerService(SchedulerConfig(seed=7))
    for e in events:
        svc.apply_event(e)
    fl = svc.inflight
    return fl.counts(), fl.prefill_view(), {p: fl.uncached_tokens(p, BLOCK) for p in "abp"}


def test_the_token_load_view_is_the_same_on_replicas_fed_the_same_events_in_any_order():
    expected = view(ROUTED + ENDS)
    counts, prefill, uncached = expected
    assert counts == {"a": 2, "b": 2}  # r1, r5 on a; r3, r4 (decoding) on b
    assert uncached == {"a": 3000 - 100 * BLOCK, "b": 0, "p": 0}
    assert prefill == {"a": (3000, 100)}
    rng = random.Random(17)
    for _ in range(200):
        # Routed events keep their order (a retry's routed follows its failed attempt); each
        # end event lands anywhere, before or after the routed event it ends.
        merged = list(ROUTED)
        for end in ENDS:
            merged.insert(rng.randint(0, len(merged)), end)
        assert view(merged) == expected, merged


# --------------------------------------------------------------------------- end to end


async def test_llm_d_sticky_stays_on_the_warm_pod_until_the_margin_is_crossed():
    asked: list[LookupRequest] = []

    async def index(msg: LookupRequest, timeout: float) -> LookupReply:
        asked.append(msg)  # pod a holds every prompt whole
        return LookupReply(matches=[PodMatch(pod="a", blocks=len(msg.block_keys))])

    svc = SchedulerService(SchedulerConfig(seed=7))
    svc.handle.index_lookup = index
    margin = svc.pipeline.plugins["prefix-affinity"].margin_tokens  # type: ignore[attr-defined]
    for name in ("a", "b"):
        svc.pods.update(pod_state(name, block_size=BLOCK))
    svc.apply_event(ev("routed", "hot", "a", num_tokens=margin))  # a: margin ahead of b
    d = await svc._on_schedule(req("r1", keys=list(range(4)), profile="llm-d-sticky"))
    assert d.pod == "a" and d.cached_blocks == 4
    assert len(asked) == 1 and sorted(asked[0].pods) == ["a", "b"]  # one lookup, before filters
    svc.apply_event(ev("routed", "hotter", "a", num_tokens=1))  # margin + 1 ahead: released
    d = await svc._on_schedule(req("r2", keys=list(range(4)), profile="llm-d-sticky"))
    assert d.pod == "b" and len(asked) == 2  # b: 64 uncached tokens beats a's margin + 1
    svc.apply_event(ev("first_token", "hot", "a"))  # a's backlog prefilled: sticky again
    d = await svc._on_schedule(req("r3", keys=list(range(4)), profile="llm-d-sticky"))
    assert d.pod == "a"


def test_the_shipped_file_has_the_llm_d_sticky_profile(handle):
    p = load_pipeline(None, handle)
    sticky = p.profiles["llm-d-sticky"]
    assert [f.type_name for f in sticky.filters] == ["role-filter", "prefix-affinity-filter"]
    assert [(s.type_name, w) for s, w in sticky.scorers] == [
        ("precise-prefix-cache-scorer", 0.0), ("token-load-scorer", 1.0)]
    assert [s.type_name for s in sticky.preparers] == ["precise-prefix-cache-scorer"]
    assert p.profiles["default"].preparers == []  # the default profile is unchanged
