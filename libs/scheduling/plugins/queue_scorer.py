"""Queue scorer: prefers engines with fewer requests waiting."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, Scorer


class QueueScorer(Scorer):
    """Score = (max waiting - waiting) / (max waiting - min waiting) over the candidates, from
    each engine's heartbeat; every pod scores 1 when all queues are equal. No parameters."""

    type_name = "queue-scorer"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> QueueScorer:
        """Factory for the registry."""
        params.done()
        return cls(name)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Min-max normalised inverse queue length."""
        waiting = [p.state.waiting for p in pods]
        lo, hi = min(waiting), max(waiting)
        if hi == lo:
            return dict.fromkeys((p.name for p in pods), 1.0)
        span = hi - lo
        return {p.name: (hi - w) / span for p, w in zip(pods, waiting, strict=True)}
