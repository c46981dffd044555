"""The SLO analyzer: a pool's time to first token and inter-token latency over a sliding window,
from the request events every ingress publishes, and how many replicas would bring them back
under their targets.

TTFT comes from ``first_token`` events (streams; a non-streamed answer has no first token
apart from its end). ITL comes from a stream's ``finished`` event: (end − routed − TTFT) over the
tokens after the first, the end and the routing time being the same ingress's clock. The window
is kept on this process's clock (when the events arrived), so engine and ingress clock skew does
not move it.

When the window misses a target the step is sized from the observed queueing, not +1: with
``λ`` the arrival rate, ``μ`` the completions per second per replica over the window (what a
replica was seen to serve) and ``q`` the requests waiting (in engine queues and held by the
ingress), the pool needs ``(λ + q / T) / μ`` replicas to keep up with arrivals and drain the
backlog within the TTFT target ``T``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

# Routed requests remembered for their ITL (a request never finished is forgotten).
_MAX_OPEN = 65536


def _p90(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


@dataclass(frozen=True)
class SLOTargets:
    """Per-pool targets; None: not a target."""

    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    min_samples: int = 10  # fewer samples in the window: no verdict

    @property
    def any(self) -> bool:
        return self.ttft_p90_s is not None or self.itl_p90_s is not None


@dataclass(frozen=True)
class SLOView:
    """What the window says (exported as inputs of the decision)."""

    ttft_p90_s: float | None
    itl_p90_s: float | None
    samples: int
    arrival_rps: float
    completion_rps: float
    missed: str  # which target the window misses ("" when none, or too few samples)
    slack: float  # the smallest target / observed ratio (>1: under every target)


class SLOWindow:
    """One pool's recent requests."""

    def __init__(self, window_s: float = 30.0) -> None:
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque()  # (arrived, ttft)
        self._itl: deque[tuple[float, float]] = deque()
        self._routed: deque[float] = deque()
        self._finished: deque[float] = deque()
        self._open: OrderedDict[str, tuple[float, float | None]] = OrderedDict()  # id → (ts, ttft)

    def routed(self, now: float, request_id: str, ts: float) -> None:
        if request_id in self._open:
            return  # a retry's second routed event, or the scheduler's and the ingress's both
        self._routed.append(now)
        self._open[request_id] = (ts, None)
        if len(self._open) > _MAX_OPEN:
            self._open.popitem(last=False)

    def first_token(self, now: float, request_id: str, ttft_s: float) -> None:
        if not math.isfinite(ttft_s) or ttft_s < 0:
            return
        self._ttft.append((now, ttft_s))
        got = self._open.get(request_id)
        if got is not None:
            self._open[request_id] = (got[0], ttft_s)

    def finished(self, now: float, request_id: str, ts: float, output_tokens: int,
                 ok: bool) -> None:
        got = self._open.pop(request_id, None)
        if ok:
            self._finished.append(now)
        if got is None or not ok:
            return
        routed_ts, ttft = got
        if ttft is not None and output_tokens > 1:
            itl = (ts - routed_ts - ttft) / (output_tokens - 1)
            if math.isfinite(itl) and itl >= 0:
                self._itl.append((now, itl))

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        for d in (self._ttft, self._itl):
            while d and d[0][0] < cut:
                d.popleft()
        for r in (self._routed, self._finished):
            while r and r[0] < cut:
                r.popleft()

    def busy(self, now: float) -> bool:
        """Whether any request arrived or was open within the window."""
        self._prune(now)
        return bool(self._routed)

    def view(self, now: float, targets: SLOTargets) -> SLOView:
        self._prune(now)
        ttft = _p90([x for _, x in self._ttft])
        itl = _p90([x for _, x in self._itl])
        samples = len(self._ttft)
        missed, slack = "", math.inf
        for name, seen, target in (("ttft_p90", ttft, targets.ttft_p90_s),
                                   ("itl_p90", itl, targets.itl_p90_s)):
            if target is None or seen is None:
                continue
            count = samples if name == "ttft_p90" else len(self._itl)
            if count < targets.min_samples:
                continue
            ratio = target / seen if seen > 0 else math.inf
            slack = min(slack, ratio)
            if seen > target and not missed:
                missed = f"{name} {seen:.3f}s > {target:g}s"
        span = self.window_s
        return SLOView(ttft_p90_s=ttft, itl_p90_s=itl, samples=samples,
                       arrival_rps=len(self._routed) / span,
                       completion_rps=len(self._finished) / span, missed=missed, slack=slack)


def replicas_for(view: SLOView, replicas: int, queued: int, ttft_target_s: float | None) -> int:
    """The replicas that keep up with arrivals and drain ``queued`` within the TTFT target
    (see the module's docstring); one more than now when a replica's rate is not known."""
    if replicas <= 0 or view.completion_rps <= 0:
        return replicas + 1
    per_replica = view.completion_rps / replicas
    drain = queued / ttft_target_s if ttft_target_s else 0.0
    return max(replicas + 1, math.ceil((view.arrival_rps + drain) / per_replica - 1e-9))
