"""Label filter: keeps the engines whose labels match a selector."""

from __future__ import annotations

from infermesh.libs.config import ConfigError
from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Filter, Handle, Parameters, Pod


class LabelFilter(Filter):
    """Keeps pods whose ``PodState.labels`` hold every ``match_labels`` pair.

    (A request's own ``labels`` are always required of every pod, with or without this filter.)

    Parameters: ``match_labels`` (label → value, required).
    """

    type_name = "label-filter"

    def __init__(self, name: str, match_labels: dict[str, str]) -> None:
        super().__init__(name)
        self.match_labels = dict(match_labels)
        self._items = tuple(self.match_labels.items())

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> LabelFilter:
        """Factory for the registry."""
        labels = params.string_map("match_labels")
        params.done()
        if not labels:
            raise ConfigError(f"plugin {name!r}: parameter 'match_labels' must name a label")
        return cls(name, labels)

    def filter(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> list[Pod]:
        """Pods carrying every selected label."""
        items = self._items
        return [p for p in pods if all(p.state.labels.get(k) == v for k, v in items)]
