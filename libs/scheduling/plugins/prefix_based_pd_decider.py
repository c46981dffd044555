"""Prefix-aware decider: disaggregate only a prompt whose uncached part is long."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, PDDecider, ProfileResult, uncached_tokens


class PrefixBasedPDDecider(PDDecider):
    """Disaggregates when the prompt tokens the chosen decode pod does not hold reach
    ``threshold``: a short prompt, or one mostly cached where it will be decoded, costs the
    decode engine less than a KV transfer and a second hop.

    The cached part comes from the precise prefix scorer of the primary profile (the blocks the
    index says that pod holds); without one the whole prompt counts as uncached.

    Parameters: ``threshold`` (tokens, default 512).
    """

    type_name = "prefix-based-pd-decider"

    def __init__(self, name: str, threshold: int) -> None:
        super().__init__(name)
        self.threshold = threshold

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> PrefixBasedPDDecider:
        """Factory for the registry."""
        threshold = params.integer("threshold", 512, min=0)
        params.done()
        return cls(name, threshold)

    def disaggregate(self, request: ScheduleRequest, cycle: CycleState,
                     decode: ProfileResult) -> bool:
        """Uncached prompt tokens on the decode pod ≥ threshold."""
        return uncached_tokens(request, cycle, decode.pod) >= self.threshold
