"""The autoscaling decisions: WVA's saturation model with a computed count, the SLO window and its
step, and the per-pool policy (bounds, cooldowns, stabilization, scale from and to zero)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infermesh.libs.autoscaling import (
    Bounds,
    Inputs,
    PoolDecider,
    ReplicaLoad,
    SaturationModel,
    SLOTargets,
    SLOWindow,
    analyze,
    replicas_for,
)

WVA = SaturationModel()


def loads(*pairs: tuple[float, int]) -> list[ReplicaLoad]:
    return [ReplicaLoad(kv, w) for kv, w in pairs]


# ------------------------------------------------------------------------------ saturation


def test_spares_are_means_over_the_unsaturated_replicas() -> None:
    v = analyze(WVA, loads((0.75, 0), (0.5, 1), (0.9, 0), (0.2, 6)))
    assert v.saturated == 2  # KV at 0.9 ≥ 0.8; 6 waiting ≥ 5
    assert v.spare_kv == pytest.approx(((0.8 - 0.75) + (0.8 - 0.5)) / 2)
    assert v.spare_queue == pytest.approx(((5 - 0) + (5 - 1)) / 2)
    assert not v.scale_up  # 0.175 ≥ 0.10 and 4.5 ≥ 3
    # Sum of KV 2.35 over 0.7 per replica: 4 replicas; 7 waiting over 2 per replica: 4.
    assert (v.total_kv, v.total_waiting, v.needed) == (pytest.approx(2.35), 7, 4)


def test_scale_up_triggers() -> None:
    kv = analyze(WVA, loads((0.75, 0), (0.85, 0)))
    assert kv.scale_up and "spare KV" in kv.why and kv.spare_kv == pytest.approx(0.05)
    queue = analyze(WVA, loads((0.1, 3), (0.1, 4)))
    assert queue.scale_up and "spare queue" in queue.why  # mean spare 1.5 < 3
    every = analyze(WVA, loads((0.95, 0), (0.1, 9)))
    assert every.scale_up and every.spare_kv == every.spare_queue == 0.0
    assert not analyze(WVA, []).scale_up and analyze(WVA, []).needed == 0


def test_a_load_exactly_on_the_trigger_needs_no_extra_replica() -> None:
    assert analyze(WVA, loads((0.7, 2))).needed == 1
    assert analyze(WVA, loads((0.35, 1), (0.35, 1))).needed == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 30)), max_size=12))
def test_needed_is_the_fewest_replicas_that_keep_both_spares(pairs: list) -> None:
    """Spread evenly over ``needed`` replicas, the load leaves both spares at or above their
    triggers; over one fewer it does not (computed, not guessed)."""
    v = analyze(WVA, loads(*pairs))

    def spares_hold(m: int) -> bool:  # the load spread over m replicas keeps both spares
        if m == 0:
            return v.total_kv == 0 and v.total_waiting == 0
        return (WVA.kv_threshold - v.total_kv / m >= WVA.kv_spare_trigger - 1e-6
                and WVA.queue_threshold - v.total_waiting / m >= WVA.queue_spare_trigger - 1e-6)

    def fits(m: int) -> bool:  # the same, solved for m, with the module's rounding tolerance
        kv = v.total_kv / (WVA.kv_threshold - WVA.kv_spare_trigger)
        queue = v.total_waiting / (WVA.queue_threshold - WVA.queue_spare_trigger)
        return m >= kv - 1e-9 and m >= queue - 1e-9

    assert v.needed == 0 or spares_hold(v.needed)
    assert fits(v.needed)
    assert v.needed == 0 or not fits(v.needed - 1)


def test_model_validation() -> None:
    with pytest.raises(ValueError):
        SaturationModel(kv_threshold=0.1, kv_spare_trigger=0.2)
    with pytest.raises(ValueError):
        SaturationModel(queue_threshold=2, queue_spare_trigger=3)


# ------------------------------------------------------------------------------ SLO window


def test_window_ttft_itl_rates_and_pruning() -> None:
    w = SLOWindow(window_s=10)
    for i in range(20):
        w.routed(i * 0.1, f"r{i}", ts=1000.0 + i)
        w.first_token(i * 0.1, f"r{i}", ttft_s=0.1 * (i + 1))
        # 11 tokens, finished 2.1 s after routing: ITL (2.1 - ttft) / 10.
        w.finished(i * 0.1 + 0.5, f"r{i}", ts=1000.0 + i + 2.1, output_tokens=11, ok=True)
    v = w.view(2.5, SLOTargets(ttft_p90_s=1.0, itl_p90_s=0.5))
    assert v.samples == 20 and v.ttft_p90_s == pytest.approx(1.9)  # sorted 0.1..2.0, index 18
    assert v.itl_p90_s == pytest.approx((2.1 - 0.2) / 10)  # the ITLs fall as TTFT grows
    assert v.missed.startswith("ttft_p90") and v.slack == pytest.approx(1.0 / 1.9)
    assert v.arrival_rps == pytest.approx(20 / 10) and v.completion_rps == pytest.approx(2.0)
    # A failed request counts no completion; a second routed event of an open request (the
    # scheduler's and the ingress's, or a retry) no arrival.
    w.routed(3.0, "z", ts=0)
    w.routed(3.0, "z", ts=0)
    w.finished(3.0, "x", ts=0, output_tokens=5, ok=False)
    v = w.view(3.0, SLOTargets())
    assert v.arrival_rps == pytest.approx(2.1) and v.completion_rps == pytest.approx(2.0)
    # Too few samples: no verdict.
    assert not w.view(3.0, SLOTargets(ttft_p90_s=0.01, min_samples=50)).missed
    # Everything older than the window is gone.
    v = w.view(20.0, SLOTargets(ttft_p90_s=1.0))
    assert (v.samples, v.ttft_p90_s, v.arrival_rps, v.missed) == (0, None, 0.0, "")
    assert not w.busy(20.0)


def test_window_ignores_nonsense_timings() -> None:
    w = SLOWindow(window_s=10)
    w.routed(0, "a", ts=100.0)
    w.first_token(0, "a", ttft_s=math.nan)
    w.first_token(0, "a", ttft_s=-1.0)
    w.finished(0, "a", ts=50.0, output_tokens=10, ok=True)  # before it was routed
    v = w.view(1, SLOTargets())
    assert v.samples == 0 and v.itl_p90_s is None


def test_the_slo_step_comes_from_the_queueing() -> None:
    w = SLOWindow(window_s=10)
    for i in range(100):  # 10 arrivals per second
        w.routed(i * 0.1, f"r{i}", ts=0)
    for i in range(40):  # 4 completions per second, over 2 replicas: 2 each
        w.finished(i * 0.25, f"r{i}", ts=1, output_tokens=1, ok=True)
    v = w.view(10, SLOTargets())
    # Keep up with 10/s and drain 20 waiting within 2 s: (10 + 10) / 2 = 10 replicas.
    assert replicas_for(v, replicas=2, queued=20, ttft_target_s=2.0) == 10
    assert replicas_for(v, replicas=2, queued=0, ttft_target_s=2.0) == 5
    # Nothing finished yet (no rate known): one more.
    assert replicas_for(SLOWindow().view(0, SLOTargets()), 3, 50, 1.0) == 4


# ------------------------------------------------------------------------------ the policy


def sat(*pairs: tuple[float, int]):
    return analyze(WVA, loads(*pairs))


def inputs(*pairs: tuple[float, int], queued: int = 0, idle_s: float = 0.0, slo=None) -> Inputs:
    return Inputs(ready=len(pairs), saturation=sat(*pairs), slo=slo, queued=queued,
                  idle_s=idle_s)


FAST = Bounds(min_replicas=1, max_replicas=6, scale_up_cooldown_s=5,
              scale_down_cooldown_s=10, scale_down_stabilization_s=10,
              scale_to_zero_after_s=60)


def test_scale_up_to_the_computed_count_then_cooldown() -> None:
    d = PoolDecider(FAST)
    # The first decision keeps what is there (no scale-down before a window's worth of load).
    first = d.tick(0, inputs((0.3, 0), (0.3, 0)))
    assert first.target == 2 and first.recommended == 1 and "warming up" in first.reason
    hot = inputs((0.9, 6), (0.85, 7))  # KV 1.75 / 0.7 → 3; 13 waiting / 2 → 7
    first = d.tick(1, hot)
    assert first.target == 6 and first.changed and "saturated" in first.reason  # max 6
    d2 = PoolDecider(FAST)
    d2.tick(0, inputs((0.3, 0), (0.3, 0)))
    warm = inputs((0.75, 0), (0.78, 0))  # spare KV 0.035: up, needed ceil(1.53/0.7) = 3
    assert d2.tick(1, warm).target == 3
    # Still saturated on the two ready replicas (the third is starting): no new step during
    # the cooldown, and none after it either while the need is the same.
    assert d2.tick(2, warm).target == 3
    assert d2.tick(7, warm).target == 3
    hotter = inputs((0.79, 0), (0.79, 0), (0.79, 0))  # now 3 ready, still hot: needed 4
    assert d2.tick(8, hotter).target == 4
    assert d2.tick(9, inputs((0.79, 4), (0.79, 4), (0.79, 4), (0.79, 4))).target == 4  # cooldown
    assert d2.tick(13.5, inputs((0.79, 4), (0.79, 4), (0.79, 4), (0.79, 4))).target == 6


def test_scale_down_takes_the_highest_recommendation_of_the_window() -> None:
    d = PoolDecider(FAST)
    busy = inputs((0.6, 0), (0.6, 0), (0.6, 0), (0.6, 0))  # needed ceil(2.4/0.7) = 4
    assert d.tick(-20, busy).target == 4  # the first decision: what is there
    assert d.tick(1, busy).target == 4
    calm = inputs((0.2, 0), (0.2, 0), (0.2, 0), (0.2, 0))  # needed 2
    t = d.tick(2, calm)
    assert t.recommended == 2 and t.target == 4 and "stabilizing" in t.reason
    assert d.tick(11.5, calm).target == 2  # the 4 of t=1 left the 10 s window
    # Right after a change: cooldown.
    idle = inputs((0.01, 0), (0.01, 0))
    assert "cooldown" in d.tick(12, idle).reason and d.target == 2
    assert d.tick(40, idle).target == 1  # min_replicas


def test_oscillating_load_does_not_flap() -> None:
    """Load swinging every 2 s between needing 2 and 3 replicas (KV 1.0 and 1.8 in replica
    units, a little noise), for 10 minutes: the target goes up once and stays (the
    stabilization window always holds a 3)."""
    d = PoolDecider(FAST)
    changes = 0
    last = None
    rng = random.Random(1)
    for step in range(600):
        t = float(step)
        high = (step // 2) % 2 == 0
        total = (1.8 if high else 1.0) + rng.uniform(-0.02, 0.02)
        n = d.target or 2  # the replicas start at once here
        x = inputs(*[(total / n, 0)] * n)
        target = d.tick(t, x).target
        if last is not None and target != last:
            changes += 1
        last = target
    assert changes <= 1


def test_scale_from_zero_at_once_and_to_zero_after_idle() -> None:
    b = Bounds(min_replicas=0, max_replicas=4, scale_up_cooldown_s=30,
               scale_down_cooldown_s=5, scale_down_stabilization_s=5, scale_to_zero_after_s=60)
    d = PoolDecider(b)
    zero = Inputs(ready=0, saturation=sat(), slo=None, queued=0, idle_s=100)
    assert d.tick(0, zero).target == 0
    d.last_up = 0  # even inside a scale-up cooldown, requests held at zero start one at once
    held = Inputs(ready=0, saturation=sat(), slo=None, queued=3, idle_s=0)
    up = d.tick(1, held)
    assert up.target == 1 and up.reason.startswith("scale from zero")
    # More held than one replica takes before it is saturated (queue threshold 5): the first
    # step is sized from the queue (11 held: 3 replicas), still at once, within max_replicas.
    d2 = PoolDecider(b)
    d2.tick(0, zero)
    assert d2.tick(1, dataclasses.replace(held, queued=11)).target == 3
    assert PoolDecider(b).tick(1, dataclasses.replace(held, queued=99)).target == 4
    # Serving, then idle: one replica kept until scale_to_zero_after_s, then zero.
    assert d.tick(10, inputs((0.0, 0), idle_s=5)).target == 1
    assert d.tick(40, inputs((0.0, 0), idle_s=35)).target == 1
    down = d.tick(80, inputs((0.0, 0), idle_s=75))
    assert down.target == 0 and "idle" in down.reason
    # With min_replicas 1 a pool never goes to zero.
    d1 = PoolDecider(FAST)
    d1.tick(0, inputs((0.0, 0)))
    assert d1.tick(1000, inputs((0.0, 0), idle_s=1000)).target == 1


def test_slo_mode_steps_from_queueing_and_holds_scale_down_within_the_margin() -> None:
    b = Bounds(min_replicas=1, max_replicas=20, scale_up_cooldown_s=0,
               scale_down_cooldown_s=0, scale_down_stabilization_s=0)
    targets = SLOTargets(ttft_p90_s=1.0, min_samples=1)
    w = SLOWindow(window_s=10)
    for i in range(50):
        w.routed(i * 0.2, f"r{i}", ts=0)  # 5 per second
        w.first_token(i * 0.2, f"r{i}", ttft_s=3.0)  # TTFT 3 s: missed
    for i in range(20):
        w.finished(i * 0.5, f"r{i}", ts=1, output_tokens=1, ok=True)  # 2/s over 2 replicas
    d = PoolDecider(b, targets)
    d.tick(0, inputs((0.3, 0), (0.3, 0)))
    x = inputs((0.3, 4), (0.3, 4), slo=w.view(10, targets))
    got = d.tick(10, x)
    # Not saturated (spares 0.5 KV, 1 queue... < 3: saturated by queue); the SLO wants
    # (5 arrivals/s + 8 waiting / 1 s) / 1 per replica = 13 replicas.
    assert got.target == 13 and got.reason.startswith("SLO missed")
    # Under the target, but not by the margin: no scale-down though the load would fit fewer.
    w2 = SLOWindow(window_s=10)
    for i in range(20):
        w2.routed(0, f"q{i}", ts=0)
        w2.first_token(0, f"q{i}", ttft_s=0.9)
    calm = inputs(*[(0.05, 0)] * 13, slo=w2.view(1, targets))
    held = d.tick(11, calm)
    assert held.target == 13 and "margin" in held.reason
    w3 = SLOWindow(window_s=10)
    for i in range(20):
        w3.routed(0, f"q{i}", ts=0)
        w3.first_token(0, f"q{i}", ttft_s=0.2)
    assert d.tick(12, inputs(*[(0.05, 0)] * 13, slo=w3.view(1, targets))).target == 1


def test_bounds_clamp_and_validate() -> None:
    d = PoolDecider(Bounds(min_replicas=2, max_replicas=3))
    assert d.tick(0, inputs()).target == 2  # no replica yet: the floor
    with pytest.raises(ValueError):
        Bounds(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        Bounds(max_replicas=0)
    with pytest.raises(ValueError):
        Bounds(scale_up_cooldown_s=-1)


def test_a_follower_adopts_the_leaders_decisions_cooldowns_included() -> None:
    """A standby replica that adopted the leader's target goes on from it when it takes over:
    no jump back to the ready count, and the leader's last scale-up still cools down."""
    leader, follower = PoolDecider(FAST), PoolDecider(FAST)
    warm = inputs((0.75, 0), (0.78, 0))  # needs 3
    follower.tick(0, inputs((0.3, 0), (0.3, 0)))
    leader.tick(0, inputs((0.3, 0), (0.3, 0)))
    up = leader.tick(1, warm)
    assert up.target == 3
    follower.follow(1, up.target)
    # The leader dies; the follower decides from the same inputs: still 3 (it adopted it),
    # and the scale-up cooldown from the leader's step at t=1 still holds at t=3.
    hotter = inputs((0.79, 0), (0.79, 0), (0.79, 0))  # needs 4
    held = follower.tick(3, hotter)
    assert held.target == 3 and "cooldown" in held.reason
    assert follower.tick(6.5, hotter).target == 4
    # Without adopting, the same replica would have started from its own last target (2).
    alone = PoolDecider(FAST)
    alone.tick(0, inputs((0.3, 0), (0.3, 0)))
    assert alone.target == 2


def test_requests_waiting_in_the_ingresses_are_a_saturated_pool() -> None:
    """Flow control keeps the engines' own queues short: what waits in the ingresses says the
    pool is saturated (one more replica), where the heartbeats alone would say steady."""
    d = PoolDecider(FAST)
    d.tick(0, inputs((0.5, 0), (0.5, 0)))
    steady = d.tick(1, inputs((0.5, 0), (0.5, 0)))
    assert steady.target == 2 and "steady" in steady.reason
    queued = d.tick(2, inputs((0.5, 0), (0.5, 0), queued=7))
    assert queued.target == 3 and "7 waiting in the ingresses" in queued.reason
