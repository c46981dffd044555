"""Role filter: keeps the engines of some P/D roles."""

from __future__ import annotations

from infermesh.libs.config import ConfigError
from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Filter, Handle, Parameters, Pod

ROLES = ("both", "prefill", "decode")


class RoleFilter(Filter):
    """Keeps pods whose ``PodState.role`` is one of ``roles``.

    Parameters: ``roles`` (a list of ``both``, ``prefill``, ``decode``; ``[both, decode]``: the
    engines that can serve a whole request or its decode).
    """

    type_name = "role-filter"

    def __init__(self, name: str, roles: list[str]) -> None:
        super().__init__(name)
        self.roles = frozenset(roles)

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> RoleFilter:
        """Factory for the registry."""
        roles = params.string_list("roles", ["both", "decode"], allowed=ROLES)
        params.done()
        if not roles:
            raise ConfigError(f"plugin {name!r}: parameter 'roles' must name a role")
        return cls(name, roles)

    def filter(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> list[Pod]:
        """Pods of an allowed role."""
        roles = self.roles
        return [p for p in pods if p.state.role in roles]
