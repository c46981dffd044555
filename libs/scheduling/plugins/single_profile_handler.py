"""Single-profile handler: runs the one profile a request names (or the default)."""

from __future__ import annotations

from collections.abc import Mapping

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Profile, ProfileHandler, ProfileResult


class SingleProfileHandler(ProfileHandler):
    """One profile per request: ``ScheduleRequest.profile``, or the default profile when it is
    empty. The scheduler has already answered 400 for a profile that does not exist. The
    handler used when the YAML names none. No parameters."""

    type_name = "single-profile-handler"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> SingleProfileHandler:
        """Factory for the registry."""
        params.done()
        return cls(name)

    def pick_profiles(
        self,
        request: ScheduleRequest,
        profiles: Mapping[str, Profile],
        default: str,
        results: Mapping[str, ProfileResult],
        cycle: CycleState | None = None,
    ) -> list[Profile]:
        """The requested profile, once."""
        if results:
            return []
        return [profiles[request.profile or default]]

    def primary(
        self, request: ScheduleRequest, results: Mapping[str, ProfileResult]
    ) -> ProfileResult:
        """The only result."""
        return next(iter(results.values()))
