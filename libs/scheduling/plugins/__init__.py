"""Every plugin type the scheduler knows, registered in one place: type name → factory.

One plugin per file, named after its type. A new plugin gets a file here and a line in
:data:`PLUGIN_TYPES`; the YAML then instantiates it by its type name.
"""

from __future__ import annotations

from ..framework import PluginFactory
from .always_pd_decider import AlwaysPDDecider
from .approx_prefix_scorer import ApproxPrefixCacheScorer
from .kv_utilization_scorer import KVUtilizationScorer
from .label_filter import LabelFilter
from .load_aware_scorer import LoadAwareScorer
from .lora_affinity_scorer import LoraAffinityScorer
from .lora_filter import LoraFilter
from .max_score_picker import MaxScorePicker
from .never_pd_decider import NeverPDDecider
from .pd_profile_handler import PDProfileHandler
from .precise_prefix_scorer import PrecisePrefixCacheScorer
from .prefix_affinity_filter import PrefixAffinityFilter
from .prefix_based_pd_decider import PrefixBasedPDDecider
from .queue_scorer import QueueScorer
from .random_picker import RandomPicker
from .role_filter import RoleFilter
from .round_robin_picker import RoundRobinPicker
from .session_affinity_scorer import SessionAffinityScorer
from .single_profile_handler import SingleProfileHandler
from .token_load_scorer import TokenLoadScorer

PLUGIN_TYPES: dict[str, PluginFactory] = {
    cls.type_name: cls.create
    for cls in (
        # scorers
        PrecisePrefixCacheScorer,
        ApproxPrefixCacheScorer,
        QueueScorer,
        KVUtilizationScorer,
        LoadAwareScorer,
        LoraAffinityScorer,
        TokenLoadScorer,
        SessionAffinityScorer,
        # filters
        LabelFilter,
        RoleFilter,
        PrefixAffinityFilter,
        LoraFilter,
        # pickers
        MaxScorePicker,
        RandomPicker,
        RoundRobinPicker,
        # profile handlers
        SingleProfileHandler,
        PDProfileHandler,
        # prefill/decode deciders (PDProfileHandler's `decider`)
        AlwaysPDDecider,
        NeverPDDecider,
        PrefixBasedPDDecider,
    )
}


def register(type_name: str, factory: PluginFactory) -> None:
    """Add a plugin type (for plugins that live outside this package)."""
    if type_name in PLUGIN_TYPES:
        raise ValueError(f"plugin type {type_name!r} is already registered")
    PLUGIN_TYPES[type_name] = factory


__all__ = [
    "PLUGIN_TYPES",
    "AlwaysPDDecider",
    "NeverPDDecider",
    "PDProfileHandler",
    "PrefixAffinityFilter",
    "PrefixBasedPDDecider",
    "ApproxPrefixCacheScorer",
    "KVUtilizationScorer",
    "LabelFilter",
    "LoadAwareScorer",
    "LoraAffinityScorer",
    "LoraFilter",
    "MaxScorePicker",
    "PrecisePrefixCacheScorer",
    "QueueScorer",
    "RandomPicker",
    "RoleFilter",
    "RoundRobinPicker",
    "SessionAffinityScorer",
    "SingleProfileHandler",
    "TokenLoadScorer",
    "register",
]
