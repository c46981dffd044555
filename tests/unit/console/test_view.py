"""The console's view of the fleet, fed message by message on fake clocks (no bus)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand
from infermesh.services.console.config import ConsoleConfig
from infermesh.services.console.service import BadQuery, _Follower, parse_query
from infermesh.services.console.view import PREFIXES_SHOWN, FleetView, natural_key, prefix_id


class Clocks:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_000_000.0

    def tick(self, s: float) -> None:
        self.mono += s
        self.wall += s


def make(clocks: Clocks, **kw: Any) -> FleetView:
    return FleetView(clock=lambda: clocks.mono, wall=lambda: clocks.wall, **kw)


def beat(pod: str, pool: str = "default", **kw: Any) -> PodState:
    return PodState(pod=pod, pool=pool, model="m", url=f"http://{pod}", ts=0.0, epoch="e",
                    kv_seq=0, **{"num_gpu_blocks": 1000, **kw})


def event(kind: str, rid: str, pod: str, **kw: Any) -> RequestEvent:
    return RequestEvent(kind=kind, request_id=rid, pod=pod, pool=kw.pop("pool", "default"),
                        model="m", ts=5.0, **kw)  # type: ignore[arg-type]


def test_pods_show_role_load_blocks_and_hit_rate_in_natural_order() -> None:
    c = Clocks()
    v = make(c)
    for name in ("sim-10", "sim-2", "sim-1"):
        v.on_pod_state(beat(name, role="decode" if name == "sim-2" else "both"))
    v.on_pod_state(beat("sim-2", role="decode", running=3, waiting=1, kv_usage=0.25,
                        prefix_cache_queries=200, prefix_cache_hits=150))
    s = v.snapshot()
    assert [p["pod"] for p in s["pods"]] == ["sim-1", "sim-2", "sim-10"]
    p = s["pods"][1]
    assert p["role"] == "decode" and p["running"] == 3 and p["waiting"] == 1
    assert p["blocks_used"] == 250 and p["num_gpu_blocks"] == 1000
    assert p["hit_rate"] == 0.75 and p["ready"] and not p["late"]
    assert s["totals"]["pods"] == 3 and s["totals"]["ready"] == 3
    assert s["totals"]["running"] == 3 and s["totals"]["waiting"] == 1
    assert natural_key("a-2") < natural_key("a-10")


def test_hit_rate_over_time_from_the_engines_counter_deltas() -> None:
    c = Clocks()
    v = make(c, history_s=30)
    v.on_pod_state(beat("a", prefix_cache_queries=10_000, prefix_cache_hits=9_000))
    v.on_pod_state(beat("b"))
    c.tick(1)
    # The first heartbeat is a baseline: what the engine counted before is not this second's.
    assert all(p["hit_rate"] is None for p in v.snapshot()["series"])
    v.on_pod_state(beat("a", prefix_cache_queries=10_100, prefix_cache_hits=9_060))
    v.on_pod_state(beat("b", prefix_cache_queries=100, prefix_cache_hits=20))
    s = v.snapshot()
    assert len(s["series"]) == 30 and s["series"][-1]["t"] == int(c.wall)
    last = s["series"][-1]
    assert (last["queries"], last["hits"], last["hit_rate"]) == (200, 80, 0.4)
    assert s["totals"]["hit_rate"] == 0.4
    c.tick(1)
    # An engine restart starts its counters over: its new counts are the delta.
    v.on_pod_state(beat("a", prefix_cache_queries=50, prefix_cache_hits=50))
    assert v.snapshot()["series"][-1]["hit_rate"] == 1.0
    # Only the pool asked for.
    v.on_pod_state(beat("z", pool="other"))
    c.tick(1)
    v.on_pod_state(beat("z", pool="other", prefix_cache_queries=10))
    assert v.snapshot(pool="other")["series"][-1]["hit_rate"] == 0.0
    assert v.snapshot(pool="default")["series"][-1]["queries"] == 0
    # History is bounded.
    c.tick(100)
    v.on_pod_state(beat("a", prefix_cache_queries=60, prefix_cache_hits=50))
    v.prune()
    assert all(len(h) <= 30 for h in v.history.values())


def test_routing_decisions_with_scores_then_their_outcome() -> None:
    c = Clocks()
    v = make(c, decisions=3)
    v.on_pod_state(beat("a"))
    v.on_pod_state(beat("b"))
    v.on_request_event(event("routed", "r1", "b", num_tokens=64, block_keys=[0xABCDEF1234, 7],
                             profile="default", scores={"a": 1.0, "b": 3.5}, cached_blocks=2))
    (d,) = v.snapshot()["decisions"]
    assert d["pod"] == "b" and d["profile"] == "default" and d["cached_blocks"] == 2
    assert d["scores"] == [["b", 3.5], ["a", 1.0]]  # the best first
    assert d["status"] == "" and d["ttft_s"] is None and d["prefix"] == prefix_id(0xABCDEF1234)
    v.on_request_event(event("first_token", "r1", "b", ttft_s=0.12))
    v.on_request_event(event("finished", "r1", "b", output_tokens=5, cached_tokens=32))
    (d,) = v.snapshot()["decisions"]
    assert d["ttft_s"] == 0.12 and d["status"] == "ok" and d["cached_tokens"] == 32
    pod_b = v.snapshot()["pods"][1]
    assert pod_b["routed"] == 1
    assert pod_b["prefixes"] == [{"id": prefix_id(0xABCDEF1234), "requests": 1,
                                  "cached_blocks": 2}]
    # A retry: the failed attempt keeps its row, the new pod gets one of its own.
    v.on_request_event(event("routed", "r2", "a"))
    v.on_request_event(event("finished", "r2", "a", status="failed"))
    v.on_request_event(event("routed", "r2", "b"))
    v.on_request_event(event("finished", "r2", "b"))
    rows = v.snapshot()["decisions"]
    assert [(r["request_id"], r["pod"], r["status"]) for r in rows] == [
        ("r2", "b", "ok"), ("r2", "a", "failed"), ("r1", "b", "ok")]
    assert v.snapshot(decisions=1)["decisions"] == rows[:1]
    assert v.snapshot(decisions=0)["decisions"] == []
    # The ring is bounded, and so is the index of its rows.
    for i in range(10):
        v.on_request_event(event("routed", f"x{i}", "a", pool="other"))
    assert len(v.decisions) == 3 and set(v._by_request) == {"x7", "x8", "x9"}
    assert v.snapshot(pool="default")["decisions"] == []
    t = v.snapshot()["totals"]
    assert (t["routed"], t["finished"], t["failed"]) == (13, 3, 1)


def test_prefixes_per_pod_are_few_and_latest_first() -> None:
    c = Clocks()
    v = make(c)
    v.on_pod_state(beat("a"))
    for i in range(12):
        v.on_request_event(event("routed", f"r{i}", "a", block_keys=[i + 1], cached_blocks=i))
    v.on_request_event(event("routed", "again", "a", block_keys=[12, 99], cached_blocks=3))
    shown = v.snapshot()["pods"][0]["prefixes"]
    assert len(shown) == PREFIXES_SHOWN
    assert shown[0] == {"id": prefix_id(12), "requests": 2, "cached_blocks": 11}
    assert len(v.pods["a"].prefixes) <= 8


def test_pods_leave_by_the_liveness_rule_or_after_saying_not_ready() -> None:
    c = Clocks()
    v = make(c, pod_timeout_s=10, pod_late_s=1)
    for name in ("a", "b", "c"):
        v.on_pod_state(beat(name))
    v.on_pod_state(beat("c", ready=False))  # drained: shown, not ready
    for _ in range(12):
        c.tick(1)
        v.on_pod_state(beat("a"))
        if c.mono < 105:
            v.on_pod_state(beat("b"))
    s = v.snapshot()
    assert {p["pod"]: p["late"] for p in s["pods"]} == {"a": False, "b": True, "c": True}
    assert not s["pods"][2]["ready"]
    assert sorted(v.prune()) == ["c"]  # b: silent 7 s only
    for _ in range(4):
        c.tick(1)
        v.on_pod_state(beat("a"))
    assert v.prune() == ["b"]
    # When everyone falls silent, nobody is dropped: the console is the one behind.
    c.tick(60)
    assert v.prune() == [] and list(v.pods) == ["a"]


def test_autoscaler_decisions_and_demand_per_pool() -> None:
    c = Clocks()
    v = make(c, demand_timeout_s=5)
    v.on_scale_decision(ScaleDecision(pool="default", model="m", ts=c.wall - 2,
                                      target_replicas=3, ready_replicas=2, recommended=3,
                                      reason="saturated: spare KV 0.05", mode="saturation",
                                      replica="as-1", inputs={"spare_kv": 0.05}))
    v.on_scale_demand(ScaleDemand(pool="cold", model="m", ts=c.wall, queued=4, replica="i-1"))
    v.on_scale_demand(ScaleDemand(pool="cold", model="m", ts=c.wall, queued=1, replica="i-2"))
    a = v.snapshot()["autoscaler"]
    assert a["default"]["decision"]["target_replicas"] == 3
    assert a["default"]["decision"]["reason"].startswith("saturated")
    assert a["cold"] == {"held": 5, "in_flight": 0, "decision": None}
    assert v.snapshot(pool="cold")["autoscaler"].keys() == {"cold"}
    c.tick(6)
    v.prune()
    assert "cold" not in v.snapshot()["autoscaler"]


def test_version_moves_with_every_change() -> None:
    c = Clocks()
    v = make(c)
    v0 = v.version
    v.on_pod_state(beat("a"))
    v.on_request_event(event("routed", "r", "a"))
    assert v.version == v0 + 2
    assert v.prune() == [] and v.version == v0 + 2


def test_query_parameters_are_checked() -> None:
    assert parse_query({}, 50) == (None, None)
    assert parse_query({"pool": "chat", "decisions": "7"}, 50) == ("chat", 7)
    for query, param in (({"pool": "a.b"}, "pool"), ({"pool": ">"}, "pool"),
                         ({"decisions": "x"}, "decisions"), ({"decisions": "-1"}, "decisions"),
                         ({"decisions": "51"}, "decisions"), ({"since": "1"}, "since")):
        with pytest.raises(BadQuery) as e:
            parse_query(query, 50)
        assert e.value.param == param


def test_config_bounds() -> None:
    ConsoleConfig()
    for bad in ({"decisions": 0}, {"history_s": 5}, {"updates_per_s": 0}, {"max_clients": 0},
                {"pod_late_s": 20}, {"http_port": -1}):
        with pytest.raises(ValueError):
            ConsoleConfig(**bad)  # type: ignore[arg-type]


def test_absurd_numbers_never_reach_the_page() -> None:
    """A message may carry NaN or infinities: the snapshot stays finite JSON (the page's
    arithmetic and msgspec's encoder both want numbers)."""
    c = Clocks()
    v = make(c)
    nan, inf = float("nan"), float("inf")
    v.on_pod_state(beat("a", kv_usage=nan))
    v.on_pod_state(beat("b", kv_usage=inf))
    v.on_request_event(event("routed", "r", "a", scores={"a": nan, "b": inf, "c": 1.0},
                             held_s=nan))
    v.on_request_event(event("finished", "r", "a", ttft_s=inf))
    v.on_scale_decision(ScaleDecision(pool="default", model="m", ts=nan, target_replicas=1,
                                      inputs={"spare_kv": inf}))
    s = v.snapshot()
    assert [(p["kv_usage"], p["blocks_used"]) for p in s["pods"]] == [(0.0, 0), (0.0, 0)]
    (d,) = s["decisions"]
    assert d["scores"] == [["c", 1.0]] and d["ttft_s"] is None and d["held_s"] is None
    assert s["autoscaler"]["default"]["decision"]["inputs"] == {"spare_kv": None}
    assert "NaN" not in msgspec.json.encode(s).decode()


async def test_a_slow_browser_gets_the_newest_snapshot_only() -> None:
    f = _Follower((None, None))
    assert f.offer(b"one") and not f.offer(b"two") and not f.offer(b"three")
    assert f.queue.get_nowait() == b"three" and f.queue.empty()
