"""One pool's decision: the analyzers' recommendation, bounded and smoothed over time.

Each tick, the recommendation is the largest of:

* what the saturation analyzer needs (one more than now when a spare is under its trigger, or
  the computed ``needed`` when that is more); on the way down, ``needed``;
* in SLO mode, when the window misses a target, the replicas sized from the queueing;

then bounded by ``min_replicas``/``max_replicas``. A pool with requests waiting and no ready
replica gets one at once (scale from zero). A pool with ``min_replicas`` 0 goes to zero only after
``scale_to_zero_after_s`` without a request.

Over time (what keeps it from flapping):

* a scale-up waits ``scale_up_cooldown_s`` after the last one (the new replicas start meanwhile;
  until they are ready they carry no load, and counting them would hide the need);
* a scale-down takes the *highest* recommendation of the last ``scale_down_stabilization_s``
  (a short dip does not remove a replica), and waits ``scale_down_cooldown_s`` after any change
  (and the first ``scale_down_stabilization_s`` after start: a fresh autoscaler has seen no load);
* in SLO mode a scale-down also needs the window under every target by ``slo_margin``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from .saturation import SaturationView
from .slo import SLOTargets, SLOView, replicas_for


@dataclass(frozen=True)
class Bounds:
    """A pool's limits and timings."""

    min_replicas: int = 1
    max_replicas: int = 8
    scale_up_cooldown_s: float = 10.0
    scale_down_cooldown_s: float = 30.0
    scale_down_stabilization_s: float = 30.0
    scale_to_zero_after_s: float = 300.0
    slo_margin: float = 0.2  # scale down only with every target met by this fraction
    # From zero, one replica per this many requests held (the saturation model's queue
    # threshold: a replica handed more would start saturated).
    held_per_replica: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min_replicas <= max_replicas and max_replicas >= 1")
        if min(self.scale_up_cooldown_s, self.scale_down_cooldown_s,
               self.scale_down_stabilization_s, self.scale_to_zero_after_s) < 0:
            raise ValueError("cooldowns, stabilization and scale_to_zero_after_s must be >= 0")
        if not 0 <= self.slo_margin < 1:
            raise ValueError("slo_margin must be in [0, 1)")
        if self.held_per_replica <= 0:
            raise ValueError("held_per_replica must be positive")


@dataclass(frozen=True)
class Inputs:
    """Everything one tick looks at."""

    ready: int  # ready replicas
    saturation: SaturationView
    slo: SLOView | None  # None: saturation mode only
    queued: int  # requests held by ingresses for this pool (their demand)
    idle_s: float  # since the last request was seen (0 while any is in flight or held)


@dataclass(frozen=True)
class Decision:
    target: int
    recommended: int  # before smoothing
    reason: str
    changed: bool


@dataclass
class PoolDecider:
    """The decision loop's memory for one pool."""

    bounds: Bounds
    targets: SLOTargets = field(default_factory=SLOTargets)
    target: int | None = None  # the last decision (None: none yet)
    last_up: float = float("-inf")
    last_change: float = float("-inf")
    started: float | None = None  # the first tick
    _recs: deque[tuple[float, int]] = field(default_factory=deque)

    def recommend(self, x: Inputs) -> tuple[int, str]:
        """The bounded recommendation for this tick, and why."""
        b, sat, n = self.bounds, x.saturation, x.ready
        floor = b.min_replicas
        if floor == 0 and x.idle_s < b.scale_to_zero_after_s and (n or x.queued or self.target):
            floor = 1  # serving (or starting its first replica): zero only after idling
        if n == 0:
            if x.queued:
                # Sized from the queue, as Knative's activator counts its queue as concurrency:
                # one engine handed every held request would start saturated.
                want = max(1, b.min_replicas, math.ceil(x.queued / b.held_per_replica))
                return min(want, b.max_replicas), f"scale from zero: {x.queued} held"
            rec, why = floor, ("idle" if floor == 0 else "no ready replica")
        elif sat.scale_up:
            rec, why = max(n + 1, sat.needed), f"saturated: {sat.why}"
        else:
            rec, why = max(sat.needed, floor), f"load fits {max(sat.needed, floor)}: {sat.why}"
            if rec >= n:
                rec, why = n, f"steady: {sat.why}"
        if n and x.queued and rec <= n:
            # Requests wait in the ingresses for room (flow control): the engines' own queues
            # stay short, so the pool says it is saturated this way.
            rec, why = n + 1, f"saturated: {x.queued} waiting in the ingresses"
        if x.slo is not None and x.slo.missed and n:
            want = replicas_for(x.slo, n, x.queued + sat.total_waiting, self.targets.ttft_p90_s)
            if want > rec:
                rec, why = want, f"SLO missed: {x.slo.missed}"
        elif (x.slo is not None and self.targets.any and rec < n
              and x.slo.slack < 1 / (1 - b.slo_margin)):
            # The load would fit fewer replicas, but the window is not clearly under target.
            rec, why = n, f"steady: SLO slack {x.slo.slack:.2f} within the margin"
        if x.idle_s >= b.scale_to_zero_after_s and b.min_replicas == 0 and not x.queued:
            rec, why = 0, f"idle for {x.idle_s:.0f}s"
        return min(max(rec, b.min_replicas), b.max_replicas), why

    def follow(self, now: float, target: int) -> None:
        """Adopt another replica's decision (the leader's, heard on the bus), cooldowns
        included, so that a follower taking over goes on from where the leader was."""
        if self.target is not None and target != self.target:
            if target > self.target:
                self.last_up = now
            self.last_change = now
        if self.started is None:
            self.started = now
        self.target = target

    def tick(self, now: float, x: Inputs) -> Decision:
        """The pool's target after this tick."""
        b = self.bounds
        rec, why = self.recommend(x)
        if self.started is None:
            self.started = now
        recs = self._recs
        recs.append((now, rec))
        while recs and recs[0][0] < now - b.scale_down_stabilization_s:
            recs.popleft()
        current = self.target if self.target is not None else x.ready
        target = current
        if rec > current:
            from_zero = x.ready == 0 and x.queued > 0
            if from_zero or now - self.last_up >= b.scale_up_cooldown_s:
                target = rec
            else:
                why = f"{why} (scale-up cooldown)"
        elif rec < current:
            stable = max(r for _, r in recs)
            if now - self.started < b.scale_down_stabilization_s and x.ready:
                why = f"{why} (warming up: no scale-down in the first " \
                      f"{b.scale_down_stabilization_s:g}s)"
            elif now - self.last_change < b.scale_down_cooldown_s:
                why = f"{why} (scale-down cooldown)"
            elif stable < current:
                target = stable
                if stable > rec:
                    why = f"{why} (highest of the last {b.scale_down_stabilization_s:g}s: {stable})"
            else:
                why = f"{why} (stabilizing: {stable} within {b.scale_down_stabilization_s:g}s)"
        changed = target != self.target
        if target != current or self.target is None:
            if target > current:
                self.last_up = now
            if target != current:
                self.last_change = now
        self.target = target
        return Decision(target=target, recommended=rec, reason=why, changed=changed)
