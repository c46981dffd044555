"""Configuration of the autoscaler (CLI, env ``INFERMESH_AUTOSCALER_*``, file)."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from infermesh.libs import liveness
from infermesh.libs.autoscaling import Bounds, SaturationModel, SLOTargets
from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import ConfigError, convert, knob
from infermesh.proto.subjects import check_token

# The knobs a pool may set for itself (`pool_overrides`); the others are the replica's.
POOL_KNOBS = (
    "min_replicas", "max_replicas", "scale_up_cooldown_s", "scale_down_cooldown_s",
    "scale_down_stabilization_s", "scale_to_zero_after_s", "kv_threshold", "queue_threshold",
    "kv_spare_trigger", "queue_spare_trigger", "ttft_p90_target_s", "itl_p90_target_s",
    "slo_margin",
)

MODES = ("saturation", "slo")


@dataclass
class AutoscalerConfig(BusKnobs):
    """Every knob of `infermesh autoscaler` (the same for every pool)."""

    mode: str = knob(
        "saturation",
        "saturation: scale on the engines' KV usage and queues (llm-d WVA's model); slo: that, "
        "and also on the TTFT/ITL targets below, missed over the SLO window",
    )
    interval_s: float = knob(1.0, "Seconds between decisions (each published on im.scale.<pool>)")
    warmup_s: float = knob(
        2.0, "Seconds after start before the first decision (the running pods' heartbeats "
        "arrive meanwhile: a fresh replica must not take a pool for empty)"
    )
    pools: list[str] = knob(
        None, "Pools to decide from the start, heartbeats or not (a pool at zero replicas has "
        "none); pools heard on the bus are added", factory=list,
    )
    min_replicas: int = knob(1, "Fewest replicas per pool (0: the pool may scale to zero)")
    max_replicas: int = knob(8, "Most replicas per pool")
    scale_up_cooldown_s: float = knob(
        10.0, "After a scale-up, no further one for this long (the new replicas start meanwhile)"
    )
    scale_down_cooldown_s: float = knob(30.0, "After any change, no scale-down for this long")
    scale_down_stabilization_s: float = knob(
        30.0, "A scale-down goes to the highest recommendation of this many last seconds"
    )
    scale_to_zero_after_s: float = knob(
        300.0, "With min_replicas 0: a pool without a request for this long goes to zero"
    )
    kv_threshold: float = knob(0.80, "A replica is saturated at this KV cache usage or more")
    queue_threshold: float = knob(5.0, "A replica is saturated with this many waiting or more")
    kv_spare_trigger: float = knob(
        0.10, "Scale up when the mean spare KV of the unsaturated replicas falls under this"
    )
    queue_spare_trigger: float = knob(
        3.0, "Scale up when their mean spare queue (queue_threshold - waiting) falls under this"
    )
    ttft_p90_target_s: float | None = knob(
        None, "slo mode: the TTFT p90 each pool should stay under (streamed requests)"
    )
    itl_p90_target_s: float | None = knob(
        None, "slo mode: the inter-token latency p90 each pool should stay under"
    )
    slo_window_s: float = knob(30.0, "The sliding window TTFT and ITL are observed over")
    slo_min_samples: int = knob(10, "Fewer samples than this in the window: no SLO verdict")
    slo_margin: float = knob(
        0.2, "slo mode: scale down only with the window under every target by this fraction"
    )
    demand_timeout_s: float = knob(
        5.0, "An ingress's demand (requests it holds for a pool) counts for this long"
    )
    pod_timeout_s: float = knob(
        10.0, "A pod silent this long (while others speak) is no longer counted"
    )
    pod_late_s: float = knob(1.0, "Heard from within this long: a pod on time")
    lease: bool = knob(
        True, "Publish decisions only while holding the leader lease (NATS JetStream key-value "
        "bucket <prefix>_autoscaler, key leader): of several replicas exactly one acts, the "
        "others follow its decisions and take over when it is gone. False: this replica always "
        "publishes (one replica only; no JetStream needed)"
    )
    lease_ttl_s: float = knob(
        3.0, "A leader that has not renewed the lease for this long is replaced (it renews "
        "every third of it); a leader that cannot renew stops publishing after it"
    )
    lease_replicas: int = knob(
        1, "Copies of the lease bucket in a JetStream cluster (3 in a cluster of 3 or more "
        "nodes, so the lease outlives a node)"
    )
    pool_overrides: dict[str, str] = knob(
        None, "Knobs of one pool, as POOL.KNOB=VALUE pairs (YAML: a mapping of them), over the "
        "ones above: " + ", ".join(POOL_KNOBS) + " (e.g. chat.ttft_p90_target_s=0.5,"
        "chat.min_replicas=0)", factory=dict,
    )
    keda_host: str = knob("127.0.0.1", "Address of the KEDA external scaler (gRPC)")
    keda_port: int = knob(
        -1, "Port of KEDA's external-scaler gRPC service (ExternalScaler: IsActive, "
        "StreamIsActive, GetMetricSpec, GetMetrics; docs/autoscaler.md); 0: a free port, -1: none"
    )
    http_host: str = knob("127.0.0.1", "Address of the autoscaler's /health and /metrics")
    http_port: int = knob(0, "Port of /health and /metrics (0: a free port, -1: none)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.interval_s <= 0 or self.warmup_s < 0:
            raise ValueError("interval_s must be positive and warmup_s not negative")
        self._pools: dict[str, dict[str, typing.Any]] = self._parse_overrides()
        views = [self.knobs(pool) for pool in ("", *self._pools)]
        if self.mode == "slo" and all(k["ttft_p90_target_s"] is None and
                                      k["itl_p90_target_s"] is None for k in views):
            raise ValueError("slo mode needs ttft_p90_target_s or itl_p90_target_s (for every "
                             "pool, or in pool_overrides for some)")
        for k in views:
            for name in ("ttft_p90_target_s", "itl_p90_target_s"):
                if k[name] is not None and k[name] <= 0:
                    raise ValueError(f"{name} must be positive")
        if self.slo_window_s <= 0 or self.slo_min_samples < 1 or self.demand_timeout_s <= 0:
            raise ValueError("slo_window_s, slo_min_samples and demand_timeout_s must be "
                             "positive")
        liveness.check_times(self.pod_late_s, self.pod_timeout_s)
        if self.lease_ttl_s <= 0 or not 1 <= self.lease_replicas <= 5:
            raise ValueError("lease_ttl_s must be positive and lease_replicas within 1..5")
        for pool in ("", *self._pools):
            self.bounds(pool)
            self.saturation_model(pool)

    def _parse_overrides(self) -> dict[str, dict[str, typing.Any]]:
        """pool → its knobs from ``pool_overrides``, each converted as its field is."""
        hints = typing.get_type_hints(AutoscalerConfig)
        per: dict[str, dict[str, typing.Any]] = {}
        for key, raw in self.pool_overrides.items():
            pool, _, name = key.partition(".")
            if not pool or name not in POOL_KNOBS:
                raise ValueError(f"pool_overrides: {key!r} is not POOL.KNOB with KNOB one of "
                                 f"{', '.join(POOL_KNOBS)}")
            check_token(pool, "pool")
            try:
                per.setdefault(pool, {})[name] = convert(raw, hints[name], key)
            except ConfigError as e:
                raise ValueError(f"pool_overrides: {e}") from None
        return per

    def knobs(self, pool: str = "") -> dict[str, typing.Any]:
        """The per-pool knobs ``pool`` runs with: its overrides over the common ones."""
        return {**{name: getattr(self, name) for name in POOL_KNOBS},
                **self._pools.get(pool, {})}

    def bounds(self, pool: str = "") -> Bounds:
        """A pool's limits and timings."""
        k = self.knobs(pool)
        return Bounds(
            min_replicas=k["min_replicas"], max_replicas=k["max_replicas"],
            scale_up_cooldown_s=k["scale_up_cooldown_s"],
            scale_down_cooldown_s=k["scale_down_cooldown_s"],
            scale_down_stabilization_s=k["scale_down_stabilization_s"],
            scale_to_zero_after_s=k["scale_to_zero_after_s"], slo_margin=k["slo_margin"],
            held_per_replica=k["queue_threshold"],
        )

    def saturation_model(self, pool: str = "") -> SaturationModel:
        """A pool's saturation thresholds and triggers."""
        k = self.knobs(pool)
        return SaturationModel(
            kv_threshold=k["kv_threshold"], queue_threshold=k["queue_threshold"],
            kv_spare_trigger=k["kv_spare_trigger"], queue_spare_trigger=k["queue_spare_trigger"],
        )

    def slo_targets(self, pool: str = "") -> SLOTargets:
        """A pool's SLO targets (none: the SLO analyzer has no verdict for it)."""
        k = self.knobs(pool)
        return SLOTargets(ttft_p90_s=k["ttft_p90_target_s"], itl_p90_s=k["itl_p90_target_s"],
                          min_samples=self.slo_min_samples)
