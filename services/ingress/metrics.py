"""The ingress's own Prometheus metrics (the API keys' counters live with them, in auth.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class IngressMetrics:
    """The ingress's own Prometheus metrics."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("infermesh_ingress_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("infermesh_ingress_rejected", "Client errors by reason",
                                ["reason"], registry=r)
        self.routing = Histogram(
            "infermesh_ingress_routing_seconds",
            "Request received to its first byte leaving for the engine",
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0), registry=r)
        self.tokenize = Histogram("infermesh_ingress_tokenize_seconds", "Tokenizer round trip",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.25, 1.0), registry=r)
        self.schedule = Histogram("infermesh_ingress_schedule_seconds", "Scheduler round trip",
                                  buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                                           0.25, 1.0), registry=r)
        self.ttft = Histogram("infermesh_ingress_ttft_seconds", "Time to first byte of the answer",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                                       30.0, 60.0), registry=r)
        self.route = Histogram("infermesh_ingress_route_seconds",
                               "Tokenize-and-schedule round trip (im.route)",
                               buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05,
                                        0.1, 0.25, 1.0), registry=r)
        self.route_trips = Counter("infermesh_ingress_route_trips",
                                   "im.route trips by outcome (ok, or the fallback to two trips)",
                                   ["outcome"], registry=r)
        self.retries = Counter("infermesh_ingress_retries", "Requests retried on another pod",
                               registry=r)
        self.pd = Counter(
            "infermesh_ingress_pd_requests",
            "Disaggregated requests by outcome: disaggregated (decoded with the prefill's KV), "
            "prefill_retried (a prefill engine failed, another prefilled), prefill_failed "
            "(no prefill engine answered: decoded whole), no_kv_params (the prefill answered "
            "without kv_transfer_params: decoded whole), decode_retried_whole (the decode "
            "engine failed before the first byte: the next one prefilled the prompt itself)",
            ["outcome"], registry=r)
        self.prefill = Histogram("infermesh_ingress_prefill_seconds",
                                 "Prefill leg of a disaggregated request (the prefill engine's "
                                 "answer)", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                                     5.0, 10.0, 30.0), registry=r)
        self.fallbacks = Counter("infermesh_ingress_fallbacks",
                                 "Requests served without a control-plane answer", ["reason"],
                                 registry=r)
        self.pods_late = Gauge("infermesh_ingress_pods_late",
                               "Ready pods whose heartbeat is late (still used)", registry=r)
        self.pods_dropped = Counter("infermesh_ingress_pods_dropped",
                                    "Pods dropped by reason (not_ready, silent)", ["reason"],
                                    registry=r)
        self.no_pod_waits = Counter(
            "infermesh_ingress_no_pod_waits",
            "Requests that found no ready engine and waited for one, by outcome", ["outcome"],
            registry=r)
        self.in_flight = Gauge("infermesh_ingress_in_flight", "Requests being served", registry=r)
