"""Round-robin picker: a baseline that takes the candidates in turn."""

from __future__ import annotations

import bisect

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Picker, Pod, ScoredPod


class RoundRobinPicker(Picker):
    """The candidate whose name follows the last one picked for the pool, in name order.

    Turning on names rather than on a counter keeps the rotation fair while pods come and go or
    are excluded. No parameters. (Each scheduler replica keeps its own turn.)
    """

    type_name = "round-robin-picker"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._last: dict[str, str] = {}

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> RoundRobinPicker:
        """Factory for the registry."""
        params.done()
        return cls(name)

    def pick(self, request: ScheduleRequest, cycle: CycleState, scored: list[ScoredPod]) -> Pod:
        """The next pod after the last one picked."""
        by_name = sorted(scored, key=lambda s: s.pod.name)
        names = [s.pod.name for s in by_name]
        last = self._last.get(request.pool)
        i = 0 if last is None else bisect.bisect_right(names, last) % len(names)
        pod = by_name[i].pod
        self._last[request.pool] = pod.name
        return pod
