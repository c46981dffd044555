"""The scheduler's Prometheus metrics (served on its /metrics next to the bus endpoint's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Plugin calls take microseconds; an indexer round trip takes a fraction of a millisecond.
_FAST_BUCKETS = (
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)


class SchedulerMetrics:
    """Every metric of one scheduler replica, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.plugin_seconds = Histogram(
            "infermesh_scheduler_plugin_seconds",
            "Time of one plugin call per plugin instance",
            ["plugin", "type"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "infermesh_scheduler_decision_seconds",
            "Time of one whole scheduling cycle per profile",
            ["profile"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "infermesh_scheduler_decisions",
            "Requests scheduled per profile and chosen pod",
            ["profile", "pod"],
            registry=r,
        )
        self.pd_decisions = Counter(
            "infermesh_scheduler_pd_decisions",
            "Prefill/decode verdicts of the P/D profile handler: disaggregated, aggregated (the "
            "decider said no), no_prefill_engine (it said yes, no prefill engine was there)",
            ["decision"],
            registry=r,
        )
        self.rejections = Counter(
            "infermesh_scheduler_rejections",
            "Schedule requests answered with an error, per reason",
            ["reason"],
            registry=r,
        )
        self.index_where = Counter(
            "infermesh_scheduler_index_answers",
            "Prefix lookups answered by this replica's local index or by the indexer service",
            ["where"],
            registry=r,
        )
        self.index_lookups = Counter(
            "infermesh_scheduler_index_lookups",
            "Indexer lookups by precise prefix scorers, per outcome",
            ["plugin", "outcome"],
            registry=r,
        )
        self.speculative = Counter(
            "infermesh_scheduler_speculative_matches",
            "Pods a precise prefix scorer credited with a recently routed prompt's blocks "
            "beyond what the index held yet (its KV events still on their way)",
            ["plugin"],
            registry=r,
        )
        self.affinity = Counter(
            "infermesh_scheduler_prefix_affinity",
            "Prefix-affinity filter outcomes: sticky (kept the warm pods), released (the warm "
            "pods were too loaded), none (no pod held enough of the prompt)",
            ["plugin", "outcome"],
            registry=r,
        )
        self.bus_messages = Counter(
            "infermesh_scheduler_bus_messages",
            "Pod states and request events received, per kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.pods = Gauge("infermesh_scheduler_pods", "Live pods known to this replica", registry=r)
        self.pods_late = Gauge(
            "infermesh_scheduler_pods_late",
            "Live pods whose heartbeat is late (still routed on their last known state)",
            registry=r,
        )
        self.inflight = Gauge(
            "infermesh_scheduler_inflight", "Requests in flight, as this replica counts them",
            registry=r,
        )
        self.inflight_expired = Counter(
            "infermesh_scheduler_inflight_expired",
            "In-flight requests dropped without a finished event",
            registry=r,
        )
