"""Flow control's queue (bands, tenants, ordering, bounds) and saturation detector."""

from __future__ import annotations

import pytest

from infermesh.libs.flowcontrol import (
    FlowQueue,
    PodLoad,
    QueueFull,
    Thresholds,
    Ticket,
    pod_saturated,
    pool_saturated,
)


def drain(q: FlowQueue) -> list[Ticket]:
    out = []
    while (t := q.pop()) is not None:
        out.append(t)
    return out


def names(ts: list[Ticket], tags: dict[int, str]) -> list[str]:
    return [tags[id(t)] for t in ts]


class Tagged:
    """Tickets with names, for readable assertions."""

    def __init__(self) -> None:
        self.tags: dict[int, str] = {}

    def __call__(self, name: str, band: int = 0, tenant: str = "a", cost: int = 1,
                 deadline: float = float("inf")) -> Ticket:
        t = Ticket(band=band, tenant=tenant, cost=cost, deadline=deadline)
        self.tags[id(t)] = name
        return t


def test_bands_are_served_strictly_by_priority() -> None:
    q, t = FlowQueue(max_queued=10, fairness="requests"), Tagged()
    for tk in (t("low", -1), t("mid1", 0), t("high", 7), t("mid2", 0)):
        q.push(tk)
    assert q.band_sizes() == {7: 1, 0: 2, -1: 1}
    assert names(drain(q), t.tags) == ["high", "mid1", "mid2", "low"]
    assert len(q) == 0 and q.band_sizes() == {}


def test_round_robin_between_tenants_within_a_band() -> None:
    """A tenant that queued many requests first does not go ahead of the others: turns; a
    tenant that had nothing waiting joins at the front of the turns (new flows first)."""
    q, t = FlowQueue(max_queued=20, fairness="requests"), Tagged()
    for i in range(4):
        q.push(t(f"h{i}", tenant="heavy"))
    q.push(t("l0", tenant="light"))
    q.push(t("m0", tenant="medium"))
    q.push(t("l1", tenant="light"))
    assert names(drain(q), t.tags) == ["m0", "l0", "h0", "l1", "h1", "h2", "h3"]


def test_deficit_round_robin_shares_prompt_tokens() -> None:
    """fairness=tokens: per turn a tenant sends what its credit covers, so a tenant of
    4,000-token prompts gets as many tokens through as one of 1,000-token prompts."""
    q, t = FlowQueue(max_queued=50, fairness="tokens", quantum=1000), Tagged()
    for i in range(4):
        q.push(t(f"big{i}", tenant="big", cost=4000))
    for i in range(12):
        q.push(t(f"s{i}", tenant="small", cost=1000))
    order = names(drain(q), t.tags)
    # While both wait, 4 small ones go for each big one.
    assert order[:10] == ["s0", "s1", "s2", "s3", "big0", "s4", "s5", "s6", "s7", "big1"]
    tokens = {"big": 0, "small": 0}
    for name in order[:10]:
        tokens["big" if name.startswith("big") else "small"] += 4000 if "big" in name else 1000
    assert tokens == {"big": 8000, "small": 8000}


def test_a_prompt_far_larger_than_the_quantum_is_served_without_spinning() -> None:
    q, t = FlowQueue(max_queued=5, fairness="tokens", quantum=1), Tagged()
    q.push(t("huge", tenant="x", cost=10**9))
    q.push(t("huge2", tenant="y", cost=10**9 + 5))
    assert names(drain(q), t.tags) == ["huge", "huge2"]


def test_fcfs_and_edf_within_a_tenant() -> None:
    for ordering, expect in (("fcfs", ["none", "late", "soon"]),
                             ("edf", ["soon", "late", "none"])):
        q, t = FlowQueue(max_queued=5, ordering=ordering), Tagged()  # type: ignore[arg-type]
        q.push(t("none"))
        q.push(t("late", deadline=20.0))
        q.push(t("soon", deadline=10.0))
        assert names(drain(q), t.tags) == expect, ordering


def test_fairness_off_is_one_queue_per_band() -> None:
    q, t = FlowQueue(max_queued=5, fairness="off"), Tagged()
    for name, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        q.push(t(name, tenant=tenant))
    assert q.tenant_sizes() == {(0, ""): 3}
    assert names(drain(q), t.tags) == ["a1", "a2", "b1"]


def test_a_full_queue_displaces_lower_bands_then_the_heaviest_tenant_else_refuses() -> None:
    q, t = FlowQueue(max_queued=4, fairness="requests"), Tagged()
    low1, low2 = t("low1", -1), t("low2", -1)
    q.push(low1)
    q.push(low2)
    q.push(t("x1", tenant="x"))
    q.push(t("x2", tenant="x"))
    # Full: a band-0 newcomer displaces the newest of the lowest band below it.
    assert q.push(t("y1", tenant="y")) is low2 and not low2.queued
    assert q.push(t("x3", tenant="x")) is low1
    # Full of band 0: x (3 waiting) vs a newcomer of y (1 waiting): x has 2 more: x's newest.
    displaced = q.push(t("y2", tenant="y"))
    assert t.tags[id(displaced)] == "x3"
    # Now x 2, y 2: neither a y nor an x newcomer displaces anyone; a band -1 one neither.
    for newcomer in (t("y3", tenant="y"), t("x4", tenant="x"), t("low3", -1)):
        with pytest.raises(QueueFull):
            q.push(newcomer)
    # A higher band always finds room while lower bands wait.
    assert t.tags[id(q.push(t("hi", 3)))] == "y2"
    assert names(drain(q), t.tags) == ["hi", "y1", "x1", "x2"]


def test_remove_takes_a_ticket_out_wherever_it_waits() -> None:
    q, t = FlowQueue(max_queued=5, fairness="requests"), Tagged()
    a, b, c = t("a"), t("b", tenant="other"), t("c", 2)
    for tk in (a, b, c):
        q.push(tk)
    assert q.remove(c) and not q.remove(c)
    assert q.band_sizes() == {0: 2}
    assert q.remove(a)
    assert names(drain(q), t.tags) == ["b"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        FlowQueue(max_queued=0)
    with pytest.raises(ValueError):
        FlowQueue(max_queued=1, fairness="lottery")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Thresholds(kv_usage=1.5)
    with pytest.raises(ValueError):
        Thresholds(uncached_tokens=-1)


def test_each_signal_saturates_a_pod_at_its_threshold_and_zero_turns_it_off() -> None:
    t = Thresholds(waiting=5, kv_usage=0.8, uncached_tokens=8192, requests=10)
    assert pod_saturated(PodLoad("p"), t) is None
    assert pod_saturated(PodLoad("p", waiting=4), t) is None
    assert pod_saturated(PodLoad("p", waiting=5), t) == "waiting"
    assert pod_saturated(PodLoad("p", kv_usage=0.79), t) is None
    assert pod_saturated(PodLoad("p", kv_usage=0.8), t) == "kv_usage"
    assert pod_saturated(PodLoad("p", uncached_tokens=8191), t) is None
    assert pod_saturated(PodLoad("p", uncached_tokens=8192), t) == "uncached_tokens"
    assert pod_saturated(PodLoad("p", requests=10), t) == "requests"
    off = Thresholds(waiting=0, kv_usage=0.0, uncached_tokens=0, requests=0)
    assert pod_saturated(PodLoad("p", 99, 1.0, 10**6, 10**6), off) is None


def test_a_pool_is_saturated_when_every_pod_is_and_when_it_has_none() -> None:
    t = Thresholds(uncached_tokens=8192)
    full = PodLoad("a", uncached_tokens=10_000)
    assert pool_saturated([], t) == "no_engine"
    assert pool_saturated([full, PodLoad("b", waiting=1)], t) is None
    assert pool_saturated([full, PodLoad("b", uncached_tokens=9000),
                           PodLoad("c", waiting=6)], t) == "uncached_tokens"


def test_a_flooding_tenant_never_starves_a_trickle() -> None:
    """The queue stays full of the heavy tenant's requests (each bigger than the quantum in
    tokens); the light tenant's requests, one at a time, each go within two pops, in every
    fairness mode but off."""
    for fairness in ("requests", "tokens"):
        q = FlowQueue(max_queued=50, fairness=fairness, quantum=512)  # type: ignore[arg-type]
        for _ in range(50):
            q.push(Ticket(band=0, tenant="heavy", cost=1001))
        for _ in range(30):
            light = Ticket(band=0, tenant="light", cost=1001)
            q.push(light)  # displaces the heavy tenant's newest
            waited = 0
            while light.queued:
                for _ in range(3):
                    try:
                        q.push(Ticket(band=0, tenant="heavy", cost=1001))
                    except QueueFull:
                        pass
                assert q.pop() is not None
                waited += 1
            assert waited == 1, fairness  # the next one: it had nothing waiting
            for _ in range(4):  # the heavy tenant's turns meanwhile
                q.pop()


def test_would_refuse_says_what_push_would_do() -> None:
    q = FlowQueue(max_queued=2, fairness="requests")
    q.push(Ticket(band=0, tenant="x"))
    assert not q.would_refuse(Ticket(band=0, tenant="x"))  # room
    q.push(Ticket(band=0, tenant="x"))
    assert q.would_refuse(Ticket(band=0, tenant="x"))
    assert not q.would_refuse(Ticket(band=0, tenant="y"))  # displaces x's newest
    assert not q.would_refuse(Ticket(band=1, tenant="x"))  # a higher band
    assert q.would_refuse(Ticket(band=-1, tenant="y"))


def test_the_uncached_token_signal_is_off_by_default() -> None:
    # With it on (8,192), llmd-kvcache-wins' 7,200-token prompts saturated every pod under load,
    # the requests let go for room missed their prefixes on the pods that had it, and the pool
    # spiralled: TTFT p90 0.61 s -> 11 s, 729 of 2,165 refused (docs/flow-control.md).
    from infermesh.services.ingress.config import IngressConfig

    assert Thresholds().uncached_tokens == 0
    t = IngressConfig().thresholds()
    assert t.uncached_tokens == 0 and t.waiting == 5 and t.kv_usage == 0.8
    assert pod_saturated(PodLoad("p", uncached_tokens=10**9), t) is None
