"""The autoscaler's Prometheus metrics: each pool's decision and the analyzers' inputs, as
gauges an HPA or a KEDA Prometheus trigger can read as well."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# ScaleDecision.inputs key → (gauge name, help).
INPUT_GAUGES = {
    "spare_kv": ("infermesh_autoscaler_spare_kv",
                 "Mean spare KV (kv_threshold - usage) of the unsaturated replicas"),
    "spare_queue": ("infermesh_autoscaler_spare_queue",
                    "Mean spare queue (queue_threshold - waiting) of the unsaturated replicas"),
    "saturated": ("infermesh_autoscaler_saturated_replicas", "Ready replicas saturated"),
    "needed": ("infermesh_autoscaler_needed_replicas",
               "Fewest replicas that hold the pool's load with both spares at their triggers"),
    "kv_usage_sum": ("infermesh_autoscaler_kv_usage_sum", "Sum of the replicas' KV usage"),
    "waiting": ("infermesh_autoscaler_waiting", "Requests waiting in the pool's engines"),
    "queued": ("infermesh_autoscaler_held", "Requests the ingresses hold for the pool"),
    "idle_s": ("infermesh_autoscaler_idle_seconds", "Seconds since the pool's last request"),
    "ttft_p90_s": ("infermesh_autoscaler_ttft_p90_seconds", "TTFT p90 over the SLO window"),
    "itl_p90_s": ("infermesh_autoscaler_itl_p90_seconds", "ITL p90 over the SLO window"),
    "arrival_rps": ("infermesh_autoscaler_arrival_rps", "Requests routed per second (window)"),
    "completion_rps": ("infermesh_autoscaler_completion_rps",
                       "Requests finished per second (window)"),
}


class AutoscalerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.desired = Gauge("infermesh_autoscaler_desired_replicas",
                             "Replicas the autoscaler wants for the pool", ["pool"], registry=r)
        self.recommended = Gauge(
            "infermesh_autoscaler_recommended_replicas",
            "The analyzers' count before cooldowns and stabilization", ["pool"], registry=r)
        self.ready = Gauge("infermesh_autoscaler_ready_replicas",
                           "Ready replicas of the pool (heartbeats)", ["pool"], registry=r)
        self.inputs = {k: Gauge(name, doc, ["pool"], registry=r)
                       for k, (name, doc) in INPUT_GAUGES.items()}
        self.decisions = Counter(
            "infermesh_autoscaler_changes", "Changes of the desired replicas, by direction",
            ["pool", "direction"], registry=r)
        self.leader = Gauge(
            "infermesh_autoscaler_leader", "1 while this replica holds the leader lease and "
            "publishes decisions (always 1 with the lease off), else 0", registry=r)
        self.lease_changes = Counter(
            "infermesh_autoscaler_lease_changes", "Leader lease changes of this replica "
            "(acquired, lost)", ["event"], registry=r)
        self.lease_errors = Counter(
            "infermesh_autoscaler_lease_errors", "Lease steps that got no answer from JetStream",
            registry=r)
        self.messages = Counter(
            "infermesh_autoscaler_bus_messages", "Bus messages read, by kind and outcome "
            "(bad: not a valid message, counted and dropped)", ["kind", "outcome"], registry=r)
