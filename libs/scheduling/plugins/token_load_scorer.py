"""Token-load scorer: prefers engines with the least prefill queued, this request's included."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, Scorer, uncached_tokens


class TokenLoadScorer(Scorer):
    """Score = (max load − load) / (max load − min load) over the candidates, where a pod's load
    is its uncached in-flight tokens (prompt tokens routed to it whose first token has not come,
    less the blocks it held of them; from request events, the same on every replica) plus the
    tokens of this prompt it would compute (the prompt less the blocks a precise prefix scorer
    found there, earlier in the cycle; the whole prompt when none did). Every pod scores 1 when
    all loads are equal.

    A request's count is the prefill work in front of it, in tokens: a pod with many short
    requests in flight may be less busy than one with a single long uncached prompt, which the
    request-count load scorer cannot see. List the precise prefix scorer before this one in a
    profile (or use the prefix-affinity filter, which makes it look up first), or this request's
    own term counts its whole prompt everywhere. No parameters.
    """

    type_name = "token-load-scorer"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> TokenLoadScorer:
        """Factory for the registry."""
        params.done()
        return cls(name)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Min-max normalised inverse token load."""
        loads = [p.uncached_inflight + uncached_tokens(request, cycle, p) for p in pods]
        lo, hi = min(loads), max(loads)
        if hi == lo:
            return dict.fromkeys((p.name for p in pods), 1.0)
        span = hi - lo
        return {p.name: (hi - x) / span for p, x in zip(pods, loads, strict=True)}
