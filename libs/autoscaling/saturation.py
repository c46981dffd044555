"""The saturation analyzer: how many replicas a pool's load needs, from its engines' heartbeats.

The model is llm-d's Workload Variant Autoscaler's: a replica is *saturated* when its KV cache
is at least ``kv_threshold`` full (0.80) or at least ``queue_threshold`` requests wait (5). Over
the replicas that are not, the *spare* KV is the mean of ``kv_threshold - kv_usage`` and the
spare queue the mean of ``queue_threshold - waiting``. The pool needs more replicas when either
spare falls under its trigger (0.10 and 3).

Where WVA adds one replica and guesses nothing on the way down, the count here is computed: the
pool's total load (sum of KV usage, sum of waiting requests, both in replica units) spread evenly
over M replicas leaves both spares at their triggers when

    M >= sum(kv) / (kv_threshold - kv_spare_trigger)   and
    M >= sum(waiting) / (queue_threshold - queue_spare_trigger),

so ``needed`` is the smallest such M. A scale-up goes to at least one more than now, or to
``needed`` when that is more; a scale-down is allowed only to ``needed`` (the load spread over
fewer replicas still keeps both spares at or above the triggers).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Tolerance when dividing loads that sit exactly on a trigger (0.7 / 0.7 must be 1, not 1.0000001).
_EPS = 1e-9


@dataclass(frozen=True)
class SaturationModel:
    """The thresholds and triggers (WVA's defaults)."""

    kv_threshold: float = 0.80
    queue_threshold: float = 5.0
    kv_spare_trigger: float = 0.10
    queue_spare_trigger: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.kv_spare_trigger < self.kv_threshold <= 1:
            raise ValueError("need 0 < kv_spare_trigger < kv_threshold <= 1")
        if not 0 < self.queue_spare_trigger < self.queue_threshold:
            raise ValueError("need 0 < queue_spare_trigger < queue_threshold")


@dataclass(frozen=True)
class ReplicaLoad:
    """One ready replica's load, from its last heartbeat."""

    kv_usage: float
    waiting: int
    running: int = 0


@dataclass(frozen=True)
class SaturationView:
    """What the analyzer saw of a pool (every field is exported as an input of the decision)."""

    replicas: int
    saturated: int
    spare_kv: float  # mean over the unsaturated replicas (0 when every one is saturated)
    spare_queue: float
    total_kv: float
    total_waiting: int
    total_running: int
    needed: int  # the fewest replicas that hold the load with both spares at the triggers
    scale_up: bool  # a spare under its trigger
    why: str  # which trigger, or why not


def analyze(model: SaturationModel, loads: Iterable[ReplicaLoad]) -> SaturationView:
    """The saturation view of one pool's ready replicas."""
    loads = list(loads)
    n = len(loads)
    free = [r for r in loads if r.kv_usage < model.kv_threshold
            and r.waiting < model.queue_threshold]
    if free:
        spare_kv = sum(model.kv_threshold - r.kv_usage for r in free) / len(free)
        spare_queue = sum(model.queue_threshold - r.waiting for r in free) / len(free)
    else:
        spare_kv = spare_queue = 0.0
    total_kv = sum(max(0.0, r.kv_usage) for r in loads)
    total_waiting = sum(max(0, r.waiting) for r in loads)
    needed = max(
        math.ceil(total_kv / (model.kv_threshold - model.kv_spare_trigger) - _EPS),
        math.ceil(total_waiting / (model.queue_threshold - model.queue_spare_trigger) - _EPS),
        0,
    )
    if not n:
        why, up = "no ready replica", False
    elif spare_kv < model.kv_spare_trigger:
        why, up = f"spare KV {spare_kv:.2f} < {model.kv_spare_trigger:g}", True
    elif spare_queue < model.queue_spare_trigger:
        why, up = f"spare queue {spare_queue:.1f} < {model.queue_spare_trigger:g}", True
    else:
        why, up = f"spare KV {spare_kv:.2f}, spare queue {spare_queue:.1f}", False
    return SaturationView(
        replicas=n, saturated=n - len(free), spare_kv=spare_kv, spare_queue=spare_queue,
        total_kv=total_kv, total_waiting=total_waiting,
        total_running=sum(r.running for r in loads), needed=needed, scale_up=up, why=why,
    )
