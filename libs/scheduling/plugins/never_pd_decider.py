"""Never-disaggregate decider: every request is served whole by one engine."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, PDDecider, ProfileResult


class NeverPDDecider(PDDecider):
    """Serves every request on the primary profile's pod alone. No parameters."""

    type_name = "never-pd-decider"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> NeverPDDecider:
        """Factory for the registry."""
        params.done()
        return cls(name)

    def disaggregate(self, request: ScheduleRequest, cycle: CycleState,
                     decode: ProfileResult) -> bool:
        """No."""
        return False
