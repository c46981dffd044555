"""KV-cache utilization scorer: prefers engines with free KV-cache space."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, Scorer


class KVUtilizationScorer(Scorer):
    """Score = 1 - the engine's KV-cache usage (``PodState.kv_usage``, 0..1). No parameters."""

    type_name = "kv-cache-utilization-scorer"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> KVUtilizationScorer:
        """Factory for the registry."""
        params.done()
        return cls(name)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Free KV-cache fraction, per pod."""
        return {p.name: 1.0 - p.state.kv_usage for p in pods}
