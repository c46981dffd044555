"""Always-disaggregate decider: every request is prefilled on a prefill engine."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, PDDecider, ProfileResult


class AlwaysPDDecider(PDDecider):
    """Disaggregates every request (when a prefill engine is there). No parameters."""

    type_name = "always-pd-decider"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> AlwaysPDDecider:
        """Factory for the registry."""
        params.done()
        return cls(name)

    def disaggregate(self, request: ScheduleRequest, cycle: CycleState,
                     decode: ProfileResult) -> bool:
        """Yes."""
        return True
