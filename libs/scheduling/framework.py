"""The scheduler's plugin framework: narrow interfaces, in the spirit of llm-d's endpoint picker.

One scheduling cycle (one request) runs the profiles a :class:`ProfileHandler` chooses. A profile
is a chain of :class:`Filter` s that narrow the candidate pods, weighted :class:`Scorer` s that
give every remaining pod a score in [0, 1], and one :class:`Picker` that takes the pod with the
weighted sum it prefers. A :class:`CycleState` travels through the whole cycle so plugins can leave
results for one another (the precise prefix scorer leaves the cached blocks per pod).

Plugins are built by a factory ``(name, Parameters, Handle)``; the :class:`Handle` gives them what
the process owns (the indexer client, a random source, metrics). A plugin that must follow the
pool's traffic (routing history) also implements :class:`RequestObserver`.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from infermesh.libs.config import ConfigError
from infermesh.proto.messages import (
    LookupReply,
    LookupRequest,
    PodState,
    RequestEvent,
    ScheduleRequest,
)

from .metrics import SchedulerMetrics

# Ask the indexer: (request, timeout in seconds) → reply; raises a libs.bus BusError on failure.
IndexLookup = Callable[[LookupRequest, float], Awaitable[LookupReply]]


class NoCandidates(Exception):
    """No pod is left for a request (after the filters of ``profile``, when given)."""

    def __init__(self, message: str, profile: str | None = None) -> None:
        super().__init__(message)
        self.profile = profile


# --------------------------------------------------------------------------- what plugins see


@dataclass(slots=True)
class Pod:
    """A candidate engine as one cycle sees it: its last heartbeat, in-flight request count and
    uncached in-flight tokens (prompt tokens routed to it still to prefill, state.InFlight)."""

    name: str
    state: PodState
    inflight: int = 0
    uncached_inflight: int = 0

    @property
    def url(self) -> str:
        """The engine's HTTP base URL."""
        return self.state.url


@dataclass(slots=True)
class CycleState:
    """Scratch space of one scheduling cycle, shared by every plugin that runs in it."""

    data: dict[str, Any] = field(default_factory=dict)
    cached_blocks: dict[str, int] | None = None
    """Blocks of the prompt each pod holds, when a precise prefix scorer asked the indexer."""


@dataclass(slots=True)
class Handle:
    """What the process lends to plugins: the indexer, a random source, metrics, a clock."""

    metrics: SchedulerMetrics
    index_lookup: IndexLookup | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic


# --------------------------------------------------------------------------- plugin interfaces


class Plugin(ABC):  # noqa: B024 - a common base; the kinds below carry the abstract methods
    """Base of every plugin: an instance name (from the YAML) and a registered type name."""

    type_name: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> Plugin:
        """Build an instance from the YAML's parameters (raise ``ConfigError`` on bad ones)."""
        raise NotImplementedError(f"{cls.__name__} has no factory")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Filter(Plugin):
    """Narrows the candidate pods; returns the pods that remain (possibly none)."""

    needs_prepared: ClassVar[bool] = False
    """True: the filter reads what a :class:`Preparer` of its profile leaves in the cycle (the
    cached blocks per pod), so the profile runs its preparers before the filters."""

    @abstractmethod
    def filter(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> list[Pod]:
        """The subset of ``pods`` that may serve ``request``."""


class Scorer(Plugin):
    """Scores the candidates: ``{pod name: score in [0, 1]}``; a pod left out scores 0."""

    @abstractmethod
    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """One score per pod, higher is better."""


@dataclass(slots=True)
class ScoredPod:
    """A candidate and the weighted sum of its scores."""

    pod: Pod
    score: float


class Picker(Plugin):
    """Takes one pod from the scored candidates (never an empty list)."""

    @abstractmethod
    def pick(self, request: ScheduleRequest, cycle: CycleState, scored: list[ScoredPod]) -> Pod:
        """The chosen pod."""


class Preparer(ABC):
    """Mixin of scorers whose work a filter may need before the filters run (the precise prefix
    scorer's index lookup). Filters are synchronous and run first; a profile with a filter that
    ``needs_prepared`` awaits ``prepare`` on its preparers, over the unfiltered candidates, and
    the scorer's ``score`` later reuses what ``prepare`` found instead of asking again."""

    @abstractmethod
    async def prepare(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> None:
        """Do the work early and leave its result in ``cycle``."""


class RequestObserver(ABC):  # noqa: B024 - both hooks are optional
    """Mixin of plugins that follow the pool's requests (every replica's, from the bus)."""

    def on_request_event(self, event: RequestEvent) -> None:  # noqa: B027 - optional hook
        """A request was routed (by any replica, or just now by this one), or it finished."""

    def on_pod_removed(self, pod: str) -> None:  # noqa: B027 - optional hook
        """A pod left the pool (heartbeat stopped or not ready): forget what is kept about it."""


@dataclass(slots=True)
class ProfileResult:
    """What one profile decided: the pod, each scorer's scores and the weighted totals."""

    profile: str
    pod: Pod
    scores: dict[str, dict[str, float]]
    totals: dict[str, float]


class ProfileHandler(Plugin):
    """Decides which profiles run for a request, and which result answers it."""

    @abstractmethod
    def pick_profiles(
        self,
        request: ScheduleRequest,
        profiles: Mapping[str, Profile],
        default: str,
        results: Mapping[str, ProfileResult],
        cycle: CycleState | None = None,
    ) -> list[Profile]:
        """The profiles to run next, given the results so far (none: the cycle is over); the
        cycle's scratch space holds what earlier profiles found (cached blocks per pod)."""

    @abstractmethod
    def primary(
        self, request: ScheduleRequest, results: Mapping[str, ProfileResult]
    ) -> ProfileResult:
        """The result whose pod serves the request."""

    def prefill(
        self, request: ScheduleRequest, results: Mapping[str, ProfileResult]
    ) -> ProfileResult | None:
        """The result whose pod prefills the request for the primary's (P/D disaggregation);
        None: the primary's pod serves it whole."""
        return None

    def optional(self, profile: str) -> bool:
        """Whether a profile may find no candidate without failing the request (the prefill
        profile of a fleet with no prefill engine)."""
        return False

    def bind(self, plugins: Mapping[str, Plugin], profiles: Mapping[str, Profile]) -> None:  # noqa: B027
        """Resolve references to other plugins and profiles, once the pipeline is built (raise
        ``ConfigError`` for a missing one)."""


class PDDecider(Plugin):
    """Decides whether a request is disaggregated: prefilled on a prefill engine, then decoded on
    the pod the primary profile chose, with the KV it pulls (docs/disaggregation.md)."""

    @abstractmethod
    def disaggregate(self, request: ScheduleRequest, cycle: CycleState,
                     decode: ProfileResult) -> bool:
        """True: prefill elsewhere; False: the decode pod prefills too."""


# Called after every plugin call with the plugin and the seconds it took.
PluginTimer = Callable[[Plugin, float], None]


def _clamp(x: float) -> float:
    if x != x or x <= 0.0:  # NaN or negative
        return 0.0
    return 1.0 if x >= 1.0 else x


class Profile:
    """A named pipeline: filters, then weighted scorers, then one picker."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
    ) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        wanted = any(f.needs_prepared for f in self.filters)
        self.preparers = [s for s, _ in self.scorers if wanted and isinstance(s, Preparer)]

    def plugins(self) -> list[Plugin]:
        """Every plugin of the profile, in the order they run."""
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]

    async def run(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod], timer: PluginTimer
    ) -> ProfileResult:
        """Filter, score and pick; raise :class:`NoCandidates` when the filters leave nobody."""
        perf = time.perf_counter
        for p in self.preparers:
            t0 = perf()
            await p.prepare(request, cycle, pods)
            timer(p, perf() - t0)
        for f in self.filters:
            t0 = perf()
            pods = f.filter(request, cycle, pods)
            timer(f, perf() - t0)
            if not pods:
                raise NoCandidates(
                    f"no engine passes filter {f.name!r} of profile {self.name!r}", self.name
                )
        scores: dict[str, dict[str, float]] = {}
        names = [p.name for p in pods]
        totals = dict.fromkeys(names, 0.0)
        for scorer, weight in self.scorers:
            t0 = perf()
            raw = await scorer.score(request, cycle, pods)
            timer(scorer, perf() - t0)
            # Every pod gets a score in [0, 1], whatever the scorer returned (NaN counts 0).
            clean = dict.fromkeys(names, 0.0)
            for name, s in raw.items():
                if name in clean:
                    clean[name] = s if 0.0 <= s <= 1.0 else _clamp(s)
            scores[scorer.name] = clean
            if weight:
                for name, s in clean.items():
                    totals[name] += weight * s
        scored = [ScoredPod(p, totals[p.name]) for p in pods]
        t0 = perf()
        pod = self.picker.pick(request, cycle, scored)
        timer(self.picker, perf() - t0)
        return ProfileResult(self.name, pod, scores, totals)


# --------------------------------------------------------------------------- parameters


def uncached_tokens(request: ScheduleRequest, cycle: CycleState, pod: Pod) -> int:
    """Prompt tokens ``pod`` would have to compute: all of them, less the blocks a precise prefix
    scorer found on it (none known: the whole prompt)."""
    cached = cycle.cached_blocks.get(pod.name, 0) if cycle.cached_blocks else 0
    return max(0, request.num_tokens - cached * max(pod.state.block_size, 0))


class Parameters:
    """A plugin's ``parameters`` mapping, read with typed getters that explain what is wrong.

    A factory reads every parameter it knows, then calls :meth:`done`, which rejects the keys
    nobody read (a typo in the YAML must not be silently ignored).
    """

    def __init__(self, raw: Mapping[str, Any] | None, plugin: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"plugin {plugin!r}: parameters must be a mapping, not {raw!r}")
        self._raw = dict(raw)
        self._plugin = plugin
        self._read: set[str] = set()

    def error(self, key: str, why: str) -> ConfigError:
        """A :class:`ConfigError` about parameter ``key``."""
        return ConfigError(f"plugin {self._plugin!r}: parameter {key!r} {why}")

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self._raw.get(key)

    def number(
        self,
        key: str,
        default: float,
        *,
        min: float | None = None,  # noqa: A002 - reads naturally at the call site
        max: float | None = None,  # noqa: A002
        min_exclusive: bool = False,
    ) -> float:
        """A finite number within the bounds."""
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, f"must be a number, not {v!r}")
        if min is not None and (v < min or (min_exclusive and v == min)):
            raise self.error(key, f"must be {'>' if min_exclusive else '>='} {min}, not {v!r}")
        if max is not None and v > max:
            raise self.error(key, f"must be <= {max}, not {v!r}")
        return float(v)

    def integer(self, key: str, default: int, *, min: int | None = None) -> int:  # noqa: A002
        """An integer, at least ``min``."""
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"must be an integer, not {v!r}")
        if min is not None and v < min:
            raise self.error(key, f"must be >= {min}, not {v!r}")
        return v

    def string(self, key: str, default: str) -> str:
        """A non-empty string."""
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, str) or not v:
            raise self.error(key, f"must be a non-empty string, not {v!r}")
        return v

    def string_list(
        self, key: str, default: Sequence[str], *, allowed: Sequence[str] = ()
    ) -> list[str]:
        """A list of strings (each one of ``allowed`` when given)."""
        v = self._get(key)
        if v is None:
            return list(default)
        if isinstance(v, str) or not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(key, f"must be a list of strings, not {v!r}")
        bad = [x for x in v if allowed and x not in allowed]
        if bad:
            raise self.error(key, f"has {bad!r}; allowed: {list(allowed)!r}")
        return list(v)

    def string_map(self, key: str) -> dict[str, str]:
        """A mapping of strings to strings (scalars are turned into strings)."""
        v = self._get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping) or not all(
            isinstance(x, (str, int, float, bool)) for x in v.values()
        ):
            raise self.error(key, f"must be a mapping of names to values, not {v!r}")
        return {str(k): str(x).lower() if isinstance(x, bool) else str(x) for k, x in v.items()}

    def number_map(self, key: str, default: Mapping[str, float]) -> dict[str, float]:
        """A mapping of names to numbers ≥ 0; given keys override ``default``'s."""
        v = self._get(key)
        out = dict(default)
        if v is None:
            return out
        if not isinstance(v, Mapping):
            raise self.error(key, f"must be a mapping of names to numbers, not {v!r}")
        for k, x in v.items():
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise self.error(key, f"has a non-number for {k!r}: {x!r}")
            if x < 0:
                raise self.error(key, f"has a negative value for {k!r}: {x!r}")
            out[str(k)] = float(x)
        return out

    def done(self) -> None:
        """Reject every parameter that was not read."""
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            raise ConfigError(f"plugin {self._plugin!r}: unknown parameters {unknown}")


# A plugin type's factory: (instance name, parameters, handle) → plugin.
PluginFactory = Callable[[str, Parameters, Handle], Plugin]


# --------------------------------------------------------------------------- the pipeline


@dataclass(slots=True)
class Pipeline:
    """Every plugin instance of a config, its profiles, the profile handler and the default."""

    plugins: dict[str, Plugin]
    profiles: dict[str, Profile]
    handler: ProfileHandler
    default_profile: str

    def observers(self) -> list[RequestObserver]:
        """The plugins of some profile that follow the pool's requests (each once)."""
        seen: dict[int, RequestObserver] = {}
        for profile in self.profiles.values():
            for plugin in profile.plugins():
                if isinstance(plugin, RequestObserver):
                    seen.setdefault(id(plugin), plugin)
        return list(seen.values())
