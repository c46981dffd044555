"""P/D profile handler: the request's profile picks the decode pod, a decider says whether a
prefill engine prefills it first, and the prefill profile picks that engine."""

from __future__ import annotations

from collections.abc import Mapping

from infermesh.libs.config import ConfigError
from infermesh.proto.messages import ScheduleRequest

from ..framework import (
    CycleState,
    Handle,
    Parameters,
    PDDecider,
    Plugin,
    Profile,
    ProfileHandler,
    ProfileResult,
)

# cycle.data keys: the decider's verdict, and the optional profile that found no engine.
PD_VERDICT = "pd"
SKIPPED = "skipped_profiles"


class PDProfileHandler(ProfileHandler):
    """Runs the request's profile (or the default) first: its pod decodes, and serves the
    request whole unless the decider disaggregates it. Then, when the decider says so, the
    prefill profile picks the engine that prefills it. A fleet with no prefill engine (the
    prefill profile's filters leave nobody) is served whole, as without this handler.

    Parameters: ``decider`` (the name of a decider plugin instance, default
    ``prefix-aware``), ``prefill_profile`` (default ``prefill``), ``profile_deciders``
    (profile name → decider name, for requests of that profile: benchmarks compare deciders
    side by side).
    """

    type_name = "pd-profile-handler"

    def __init__(self, name: str, decider: str, prefill_profile: str,
                 profile_deciders: Mapping[str, str] | None = None) -> None:
        super().__init__(name)
        self.decider_name = decider
        self.prefill_profile = prefill_profile
        self.profile_decider_names = dict(profile_deciders or {})
        self.decider: PDDecider | None = None
        self.profile_deciders: dict[str, PDDecider] = {}

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> PDProfileHandler:
        """Factory for the registry."""
        decider = params.string("decider", "prefix-aware")
        prefill = params.string("prefill_profile", "prefill")
        per_profile = params.string_map("profile_deciders")
        params.done()
        return cls(name, decider, prefill, per_profile)

    def bind(self, plugins: Mapping[str, Plugin], profiles: Mapping[str, Profile]) -> None:
        """Find the decider plugins and the prefill profile."""
        def decider(name: str, param: str) -> PDDecider:
            found = plugins.get(name)
            if not isinstance(found, PDDecider):
                raise ConfigError(f"plugin {self.name!r}: parameter {param!r} names {name!r}, "
                                  "which is not a decider plugin")
            return found

        if self.prefill_profile not in profiles:
            raise ConfigError(f"plugin {self.name!r}: parameter 'prefill_profile' names "
                              f"{self.prefill_profile!r}, which is not a profile")
        self.decider = decider(self.decider_name, "decider")
        for profile, name in self.profile_decider_names.items():
            if profile not in profiles:
                raise ConfigError(f"plugin {self.name!r}: parameter 'profile_deciders' names "
                                  f"profile {profile!r}, which does not exist")
            self.profile_deciders[profile] = decider(name, "profile_deciders")

    def optional(self, profile: str) -> bool:
        """The prefill profile may find no engine: the request is then served whole."""
        return profile == self.prefill_profile

    def pick_profiles(
        self,
        request: ScheduleRequest,
        profiles: Mapping[str, Profile],
        default: str,
        results: Mapping[str, ProfileResult],
        cycle: CycleState | None = None,
    ) -> list[Profile]:
        """The primary first; then the prefill profile when the decider disaggregates."""
        primary = request.profile or default
        if not results:
            return [profiles[primary]]
        if primary == self.prefill_profile or len(results) > 1 or cycle is None:
            return []
        if SKIPPED in cycle.data or PD_VERDICT in cycle.data:
            return []
        decider = self.profile_deciders.get(primary, self.decider)
        assert decider is not None, "bind() runs when the pipeline is built"
        yes = decider.disaggregate(request, cycle, results[primary])
        cycle.data[PD_VERDICT] = "disaggregated" if yes else "aggregated"
        return [profiles[self.prefill_profile]] if yes else []

    def primary(
        self, request: ScheduleRequest, results: Mapping[str, ProfileResult]
    ) -> ProfileResult:
        """The decode (or whole-request) pod's result."""
        for name, result in results.items():
            if name != self.prefill_profile or len(results) == 1:
                return result
        raise AssertionError("no primary result")  # pragma: no cover - the first round ran

    def prefill(
        self, request: ScheduleRequest, results: Mapping[str, ProfileResult]
    ) -> ProfileResult | None:
        """The prefill profile's result, when it ran after the primary."""
        if len(results) < 2:
            return None
        return results.get(self.prefill_profile)
