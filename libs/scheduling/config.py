"""Configuration of scheduling: the knobs of a process that decides (the scheduler service, or
an ingress that schedules itself), and the YAML plugin pipeline.

The knobs (CLI, env, ``--config`` file) name a ``profiles_file``; that YAML instantiates plugins
and wires them into profiles::

    plugins:                       # plugin instances
      - name: precise-prefix       # optional, defaults to the type
        type: precise-prefix-cache-scorer
        parameters: {timeout_s: 0.05}
    profiles:                      # named pipelines, chosen per request
      - name: default
        plugins:
          - {ref: precise-prefix, weight: 3}   # weight: scorers only, >= 0, default 1
          - ref: max-score
    default_profile: default       # optional: "default" if defined, else the first profile

Every mistake (unknown key, type or reference, bad parameter, negative weight) is a
:class:`ConfigError` that names the file and the entry, raised at start-up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infermesh.libs import liveness
from infermesh.libs.config import ConfigError, knob

from .framework import (
    Filter,
    Handle,
    Parameters,
    Picker,
    Pipeline,
    Plugin,
    Preparer,
    Profile,
    ProfileHandler,
    Scorer,
)
from .plugins import PLUGIN_TYPES, MaxScorePicker, SingleProfileHandler


@dataclass
class SchedulingKnobs:
    """The knobs of a scheduler replica; a service's config inherits them with its own."""

    profiles_file: str = knob(
        "", "YAML file of plugins and profiles (empty: the built-in default, which is "
        "deploy/local/scheduler.yaml)"
    )
    pod_timeout_s: float = knob(
        10.0, "A pod silent for this long is dropped, unless every pod of its pool is silent "
        "(then this replica or the bus is behind, not the pods); a ready=False heartbeat drops "
        "it at once"
    )
    pod_late_s: float = knob(
        1.0, "A pod silent for this long is late: still routed on its last known state, "
        "counted in infermesh_scheduler_pods_late"
    )
    inflight_timeout_s: float = knob(
        300.0, "A request in flight with no finished event for this long is forgotten"
    )
    warmup_s: float = knob(
        0.3, "Listen to heartbeats this long before answering (a fresh replica knows no pod)"
    )
    local_index_max_pods: int = knob(
        64, "Keep a replica of the KV index here (it follows every pod's KV events and asks "
        "agents for snapshots, as an indexer does) and score prefixes from it, with no bus "
        "round trip, while the fleet has at most this many pods; larger fleets, and pods not "
        "synced yet, are looked up in the indexer service. 0: always the indexer service"
    )
    local_index_max_blocks: int = knob(
        4_000_000, "Cap on (block key, pod) entries of the local index (as the indexer's "
        "max_blocks)"
    )
    local_index_storage_ttl_s: float = knob(
        0.0, "The local index forgets a pool's shared-storage block this long after it was "
        "stored (0: when an engine reports its removal); set it as the indexer's storage_ttl_s"
    )
    local_index_storage_max_blocks: int = knob(
        0, "Shared-storage blocks the local index keeps per pool (0: no cap); set it as the "
        "indexer's storage_max_blocks"
    )
    seed: int = knob(0, "Seed of random picks and tie-breaks (0: unseeded)")

    def check_scheduling(self) -> None:
        """Validate these knobs (a config's ``__post_init__`` calls it)."""
        if self.pod_timeout_s <= 0 or self.inflight_timeout_s <= 0:
            raise ValueError("pod_timeout_s and inflight_timeout_s must be positive")
        liveness.check_times(self.pod_late_s, self.pod_timeout_s)
        if self.warmup_s < 0:
            raise ValueError("warmup_s must be >= 0")
        if self.local_index_max_pods < 0 or self.local_index_max_blocks < 1:
            raise ValueError("local_index_max_pods must be >= 0 and local_index_max_blocks >= 1")
        if self.local_index_storage_ttl_s < 0 or self.local_index_storage_max_blocks < 0:
            raise ValueError("local_index_storage_ttl_s and local_index_storage_max_blocks "
                             "must be >= 0")


# --------------------------------------------------------------------------- pipeline YAML

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# The decision's ``scores`` carries the weighted sums under this name, next to each scorer's.
TOTAL_SCORES = "total"


@dataclass(frozen=True)
class PluginSpec:
    """One entry of ``plugins``."""

    name: str
    type: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class PluginRef:
    """One entry of a profile's ``plugins``: a plugin instance and its weight (scorers)."""

    ref: str
    weight: float | None = None


@dataclass(frozen=True)
class ProfileSpec:
    """One entry of ``profiles``."""

    name: str
    plugins: tuple[PluginRef, ...]


@dataclass(frozen=True)
class PipelineSpec:
    """A parsed pipeline file, before any plugin is built."""

    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...]
    default_profile: str
    source: str = "<pipeline>"


def _keys(entry: Any, allowed: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping, not {entry!r}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")
    return entry


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid name (letters, digits, '_', '-', '.')"
        )
    return value


def parse_pipeline(data: Any, source: str = "<pipeline>") -> PipelineSpec:
    """Check the shape of a pipeline document (already YAML-decoded) and return its spec."""
    top = _keys(data, {"plugins", "profiles", "default_profile"}, source)
    raw_plugins = top.get("plugins") or []
    if not isinstance(raw_plugins, list):
        raise ConfigError(f"{source}: 'plugins' must be a list")
    plugins: list[PluginSpec] = []
    names: set[str] = set()
    for i, entry in enumerate(raw_plugins):
        where = f"{source}: plugins[{i}]"
        e = _keys(entry, {"name", "type", "parameters"}, where)
        if not isinstance(e.get("type"), str) or not e["type"]:
            raise ConfigError(f"{where}: 'type' is required")
        name = _name(e.get("name", e["type"]), where)
        if name == TOTAL_SCORES:
            raise ConfigError(f"{where}: the name {TOTAL_SCORES!r} is reserved for the totals")
        if name in names:
            raise ConfigError(f"{where}: plugin name {name!r} is used twice")
        names.add(name)
        params = e.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}: 'parameters' must be a mapping, not {params!r}")
        plugins.append(PluginSpec(name, e["type"], dict(params)))
    raw_profiles = top.get("profiles")
    if not isinstance(raw_profiles, list) or not raw_profiles:
        raise ConfigError(f"{source}: 'profiles' must be a non-empty list")
    profiles: list[ProfileSpec] = []
    pnames: set[str] = set()
    for i, entry in enumerate(raw_profiles):
        where = f"{source}: profiles[{i}]"
        e = _keys(entry, {"name", "plugins"}, where)
        pname = _name(e.get("name"), where)
        if pname in pnames:
            raise ConfigError(f"{where}: profile name {pname!r} is used twice")
        pnames.add(pname)
        refs = e.get("plugins")
        if not isinstance(refs, list) or not refs:
            raise ConfigError(f"{source}: profile {pname!r}: 'plugins' must be a non-empty list")
        out: list[PluginRef] = []
        for j, r in enumerate(refs):
            rwhere = f"{source}: profile {pname!r} plugins[{j}]"
            re_ = _keys(r, {"ref", "weight"}, rwhere)
            if not isinstance(re_.get("ref"), str):
                raise ConfigError(f"{rwhere}: 'ref' (a plugin name) is required")
            weight = re_.get("weight")
            if weight is not None and (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ConfigError(f"{rwhere}: weight must be a number >= 0, not {weight!r}")
            out.append(PluginRef(re_["ref"], None if weight is None else float(weight)))
        profiles.append(ProfileSpec(pname, tuple(out)))
    default = top.get("default_profile")
    if default is None:
        default = "default" if "default" in pnames else profiles[0].name
    elif default not in pnames:
        raise ConfigError(
            f"{source}: default_profile {default!r} is not a profile ({sorted(pnames)})"
        )
    return PipelineSpec(tuple(plugins), tuple(profiles), default, source)


def read_pipeline_spec(path: str | Path | None = None) -> PipelineSpec:
    """Read and check a pipeline file (``None`` or empty: the built-in default)."""
    if not path:
        return parse_pipeline(yaml.safe_load(DEFAULT_PIPELINE_YAML), "<built-in default>")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read scheduler profiles file {path}: {e}") from None
    return parse_pipeline(data, str(path))


def build_pipeline(spec: PipelineSpec, handle: Handle) -> Pipeline:
    """Instantiate every plugin through the registry and wire the profiles."""
    src = spec.source
    plugins: dict[str, Plugin] = {}
    for ps in spec.plugins:
        factory = PLUGIN_TYPES.get(ps.type)
        if factory is None:
            raise ConfigError(
                f"{src}: plugin {ps.name!r} has unknown type {ps.type!r} "
                f"(known: {', '.join(sorted(PLUGIN_TYPES))})"
            )
        try:
            plugins[ps.name] = factory(ps.name, Parameters(ps.parameters, ps.name), handle)
        except ConfigError as e:
            raise ConfigError(f"{src}: {e}") from None
    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(
            f"{src}: at most one profile handler, got {[h.name for h in handlers]}"
        )
    handler = handlers[0] if handlers else SingleProfileHandler("single-profile-handler")
    profiles: dict[str, Profile] = {}
    for prof in spec.profiles:
        where = f"{src}: profile {prof.name!r}"
        filters: list[Filter] = []
        scorers: list[tuple[Scorer, float]] = []
        pickers: list[Picker] = []
        used: set[str] = set()
        for r in prof.plugins:
            plugin = plugins.get(r.ref)
            if plugin is None:
                raise ConfigError(
                    f"{where} refers to unknown plugin {r.ref!r} (defined: {sorted(plugins)})"
                )
            if r.ref in used:
                raise ConfigError(f"{where} refers to plugin {r.ref!r} twice")
            used.add(r.ref)
            if r.weight is not None and not isinstance(plugin, Scorer):
                raise ConfigError(f"{where}: {r.ref!r} is not a scorer; only scorers take a weight")
            if isinstance(plugin, Filter):
                filters.append(plugin)
            elif isinstance(plugin, Scorer):
                scorers.append((plugin, 1.0 if r.weight is None else r.weight))
            elif isinstance(plugin, Picker):
                pickers.append(plugin)
            else:
                raise ConfigError(
                    f"{where}: {r.ref!r} ({type(plugin).__name__}) cannot run in a profile"
                )
        if len(pickers) > 1:
            raise ConfigError(f"{where} has {len(pickers)} pickers; a profile takes one")
        picker = pickers[0] if pickers else MaxScorePicker(f"{prof.name}.max-score", handle.rng)
        needy = [f.name for f in filters if f.needs_prepared]
        if needy and not any(isinstance(s, Preparer) for s, _ in scorers):
            raise ConfigError(
                f"{where}: filter {needy[0]!r} reads the blocks each pod holds, which a "
                "precise-prefix-cache-scorer in the same profile looks up (weight 0 will do)"
            )
        profiles[prof.name] = Profile(prof.name, filters, scorers, picker)
    try:
        handler.bind(plugins, profiles)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    return Pipeline(plugins, profiles, handler, spec.default_profile)


def load_pipeline(path: str | Path | None, handle: Handle) -> Pipeline:
    """Read, check and build a pipeline file (``None`` or empty: the built-in default)."""
    return build_pipeline(read_pipeline_spec(path), handle)


# The built-in pipeline; deploy/local/scheduler.yaml holds the same text (a test keeps them equal).
DEFAULT_PIPELINE_YAML = """\
# infermesh scheduler: plugin instances, and the profiles that wire them with weights.
#
# plugins:  [{name, type, parameters}]   name defaults to the type
# profiles: [{name, plugins: [{ref, weight}]}]
#           filters run in the order listed, scorers add up weight × score (each in [0, 1]),
#           one picker takes the pod (max-score when a profile names none)
# default_profile: the profile of a request that names none
#
# A ScheduleRequest picks a profile by name (`profile`), so benchmarks compare them side by side.
# This file is also the scheduler's built-in default (libs/scheduling/config.py).

plugins:
  - name: precise-prefix
    type: precise-prefix-cache-scorer
    parameters:
      tier_weights: {GPU: 1.0, CPU: 0.8, SHARED_STORAGE: 0.5}
      timeout_s: 0.05
  - name: approx-prefix
    type: approx-prefix-cache-scorer
    parameters:
      lru_capacity_per_pod: 31250
      max_prefix_blocks: 1024
  - name: queue
    type: queue-scorer
  - name: kv-utilization
    type: kv-cache-utilization-scorer
  - name: load
    type: load-aware-scorer
    parameters:
      threshold: 16
  - name: token-load
    type: token-load-scorer
  - name: prefix-affinity
    type: prefix-affinity-filter
    parameters:
      affinity_threshold: 0.5  # llm-d's
      margin_tokens: 8192      # llm-d's (docs/scheduler.md: 4,096 and 6,144 on saturation)
  - name: serving-roles
    type: role-filter
    parameters:
      roles: [both, decode]
  - name: max-score
    type: max-score-picker
  - name: random
    type: random-picker
  - name: round-robin
    type: round-robin-picker
  - name: prefill-roles
    type: role-filter
    parameters:
      roles: [prefill]
  # Prefill/decode disaggregation (docs/disaggregation.md): the pd handler runs a request's
  # profile for the pod that decodes it, then asks its decider whether a prefill engine
  # prefills it first (chosen by the prefill profile). A fleet with no prefill engine is
  # served as without it.
  - name: prefix-aware
    type: prefix-based-pd-decider
    parameters:
      threshold: 512
  - name: always
    type: always-pd-decider
  - name: never
    type: never-pd-decider
  - name: pd
    type: pd-profile-handler
    parameters:
      decider: prefix-aware
      prefill_profile: prefill
      profile_deciders: {pd-always: always, pd-never: never}
  # LoRA (docs/scheduler.md, "LoRA"): keep a request for an adapter on the engines that serve
  # it (loaded, or loadable on demand from their LoRA directory), and prefer those that hold it.
  - name: lora
    type: lora-filter
  - name: lora-affinity
    type: lora-affinity-scorer
  # A conversation's turns on the engine of its last turn (x-session-id or the
  # infermesh-session cookie at the ingress); neutral for requests without one.
  - name: session
    type: session-affinity-scorer

default_profile: default

profiles:
  # Prefix-cache hits, weighed against the prefill work in front of the request: precise
  # prefix 1, token load 1 (uncached tokens in flight on the pod + this prompt's uncached tokens
  # there, from request events, the same on every replica). A hot prefix's pod keeps its
  # requests until its queue runs well past the cost of computing the prefix elsewhere, then
  # sheds them to a cold pod. Chosen by measurement on the saturation preset against llm-d's
  # blend and its "sticky until saturated", and checked on quick and llmd-kvcache-wins
  # (docs/scheduler.md; token load 2 shed too eagerly there).
  - name: default
    plugins:
      - ref: serving-roles
      - ref: lora
      - {ref: precise-prefix, weight: 1}
      - {ref: token-load, weight: 1}
      # Neutral for requests without an adapter or a session (every pod scores the same);
      # weights not measured.
      - {ref: lora-affinity, weight: 1}
      - {ref: session, weight: 1}
      - ref: max-score

  # Baselines and variants, for benchmarks.
  # llm-d's precise prefix-cache profile (prefix 3, queue 2, KV utilization 2): the default
  # before infermesh measured its own.
  - name: llm-d
    plugins:
      - ref: serving-roles
      - {ref: precise-prefix, weight: 3}
      - {ref: queue, weight: 2}
      - {ref: kv-utilization, weight: 2}
      - ref: max-score
  # llm-d's 2026 default, "sticky until saturated" (the inference scheduler's
  # prefix-cache-affinity filter and token-load scorer, as issue 17 describes it): stay on the
  # pods holding most of the prompt until their uncached tokens in flight run margin_tokens
  # ahead of the coldest pod's; the token load (in flight + this prompt's uncached tokens)
  # decides the rest. The precise prefix scorer only does the lookup here (weight 0).
  - name: llm-d-sticky
    plugins:
      - ref: serving-roles
      - ref: prefix-affinity
      - {ref: precise-prefix, weight: 0}
      - {ref: token-load, weight: 1}
      - ref: max-score
  # The default until issue 17 measured the token load (docs/bench.md, docs/scheduler.md):
  # precise prefix-cache routing, kept off engines with many requests in flight (the in-flight
  # count from request events; the engines' own queue and KV usage, up to a scrape period
  # late, pulled requests off the engine holding their prefix). Sticky: a hot prefix's pod is
  # never left while it holds the prefix.
  - name: precise-prefix
    plugins:
      - ref: serving-roles
      - {ref: precise-prefix, weight: 3}
      - {ref: load, weight: 1}
      - ref: max-score
  - name: approx-prefix
    plugins:
      - ref: serving-roles
      - {ref: approx-prefix, weight: 3}
      - {ref: load, weight: 1}
      - ref: max-score
  - name: load
    plugins:
      - ref: serving-roles
      - {ref: load, weight: 1}
      - ref: max-score
  - name: random
    plugins:
      - ref: serving-roles
      - ref: random
  - name: round-robin
    plugins:
      - ref: serving-roles
      - ref: round-robin
  # The default profile with the other deciders (for benchmarks: bench --preset pd).
  - name: pd-always
    plugins:
      - ref: serving-roles
      - ref: lora
      - {ref: precise-prefix, weight: 1}
      - {ref: token-load, weight: 1}
      - {ref: lora-affinity, weight: 1}
      - {ref: session, weight: 1}
      - ref: max-score
  - name: pd-never
    plugins:
      - ref: serving-roles
      - ref: lora
      - {ref: precise-prefix, weight: 1}
      - {ref: token-load, weight: 1}
      - {ref: lora-affinity, weight: 1}
      - {ref: session, weight: 1}
      - ref: max-score
  # The engine that prefills a disaggregated request: prefix hits first, then load.
  - name: prefill
    plugins:
      - ref: prefill-roles
      - {ref: precise-prefix, weight: 2}
      - {ref: load, weight: 1}
      - ref: max-score
"""
