"""Load-aware scorer: prefers engines with fewer requests in flight."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, Scorer


class LoadAwareScorer(Scorer):
    """Score = 1 - in-flight / ``threshold``, 0 at or above the threshold.

    In-flight requests are counted from the pool's request events (routed → finished) and this
    replica's own decisions, so it sees a burst before any engine's queue shows it.

    Parameters: ``threshold`` (in-flight requests at which a pod counts as overloaded, 16).
    """

    type_name = "load-aware-scorer"

    def __init__(self, name: str, *, threshold: int = 16) -> None:
        super().__init__(name)
        self.threshold = threshold

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> LoadAwareScorer:
        """Factory for the registry."""
        threshold = params.integer("threshold", 16, min=1)
        params.done()
        return cls(name, threshold=threshold)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Linear in the in-flight count, per pod."""
        t = self.threshold
        return {p.name: max(0.0, 1.0 - p.inflight / t) for p in pods}
