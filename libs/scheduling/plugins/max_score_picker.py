"""Max-score picker: the pod with the highest weighted score, ties broken at random."""

from __future__ import annotations

import random

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Picker, Pod, ScoredPod

# Totals closer than this are equal: float sums of the same scores in another order differ.
_EPS = 1e-9


class MaxScorePicker(Picker):
    """Takes the highest total; among equal totals, one at random (so ties spread load rather
    than always landing on the first pod). No parameters."""

    type_name = "max-score-picker"

    def __init__(self, name: str, rng: random.Random | None = None) -> None:
        super().__init__(name)
        self.rng = rng or random.Random()

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> MaxScorePicker:
        """Factory for the registry."""
        params.done()
        return cls(name, handle.rng)

    def pick(self, request: ScheduleRequest, cycle: CycleState, scored: list[ScoredPod]) -> Pod:
        """The best pod."""
        best = max(s.score for s in scored)
        top = [s.pod for s in scored if s.score >= best - _EPS]
        return top[0] if len(top) == 1 else self.rng.choice(top)
