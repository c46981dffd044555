"""Random picker: a baseline that ignores every score."""

from __future__ import annotations

import random

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Picker, Pod, ScoredPod


class RandomPicker(Picker):
    """Any candidate, uniformly at random. No parameters."""

    type_name = "random-picker"

    def __init__(self, name: str, rng: random.Random | None = None) -> None:
        super().__init__(name)
        self.rng = rng or random.Random()

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> RandomPicker:
        """Factory for the registry."""
        params.done()
        return cls(name, handle.rng)

    def pick(self, request: ScheduleRequest, cycle: CycleState, scored: list[ScoredPod]) -> Pod:
        """A random pod."""
        return self.rng.choice(scored).pod
