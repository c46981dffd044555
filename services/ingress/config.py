"""Configuration of the ingress (CLI, env ``INFERMESH_INGRESS_*``, YAML file)."""

from __future__ import annotations

from dataclasses import dataclass

from infermesh.libs import liveness
from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob
from infermesh.libs.flowcontrol import FAIRNESS, ORDERING, Thresholds
from infermesh.libs.scheduling.config import SchedulingKnobs
from infermesh.libs.tokenization.knobs import TokenizingKnobs
from infermesh.proto.subjects import check_token


@dataclass
class IngressConfig(BusKnobs, TokenizingKnobs, SchedulingKnobs):
    """Every knob of `infermesh ingress` (``models`` and the cache knobs: the prompts it
    tokenizes itself, see ``tokenize_here``; ``profiles_file`` and the local index knobs: the
    decisions it makes itself, see ``schedule_here``)."""

    http_host: str = knob("127.0.0.1", "Address the OpenAI API (and /health, /metrics) listens on")
    http_port: int = knob(8000, "Port of the OpenAI API (0: a free port)")
    pool: str = knob("default", "Pool whose engines serve the requests")
    profile: str = knob("", "Scheduler profile to ask for (empty: the scheduler's default)")
    tokenize_timeout_s: float = knob(2.0, "How long to wait for the tokenizer service")
    schedule_timeout_s: float = knob(1.0, "How long to wait for the scheduler")
    connect_timeout_s: float = knob(5.0, "Timeout to connect to an engine")
    tokenize_here: bool = knob(
        True, "Tokenize the prompts of the models in `models` in this process, then ask a "
        "scheduler (one bus trip); other models, or off: the tokenizer service tokenizes"
    )
    schedule_here: bool = knob(
        True, "Decide in this process, with a scheduler replica of its own (the scheduler's "
        "profiles, state from the same bus subjects, its own replica of the KV index): no bus "
        "trip on the request path; off, or when it knows no engine yet: the scheduler service"
    )
    chained_routing: bool = knob(
        True, "Tokenize and schedule in one bus trip (im.route: the tokenizer passes the "
        "request on to a scheduler, which answers here); off: ask each in turn"
    )
    max_attempts: int = knob(3, "Engines tried per request when one fails before answering")
    max_body_bytes: int = knob(32 * 1024 * 1024, "Largest request body accepted (413 above)")
    max_prompt_tokens: int = knob(
        0, "Longest prompt accepted (0: the engines' max_model_len, as their heartbeats say)"
    )
    pod_timeout_s: float = knob(
        10.0, "A pod silent for this long is dropped, unless every pod is silent (then the "
        "ingress or the bus is behind, not the pods); a ready=False heartbeat drops it at once"
    )
    pod_late_s: float = knob(
        1.0, "A pod silent for this long is late: still used on its last known state, counted "
        "in infermesh_ingress_pods_late"
    )
    no_pod_wait_s: float = knob(
        3.0, "A request that finds no ready engine is held this long for one (a ready "
        "heartbeat: a pool scaled to zero, or restarting) before the 503; raise it to the "
        "engines' start time where the autoscaler scales to zero (docs/autoscaler.md)"
    )
    hold_max_requests: int = knob(
        256, "Requests waiting at most in this ingress (no engine ready, or the pool saturated: "
        "flow control); past it a 429 with Retry-After, unless the newcomer displaces one of a "
        "lower priority or of the tenant with the most waiting"
    )
    # Flow control (services/ingress/flow.py, docs/flow-control.md).
    flow_control: bool = knob(
        True, "Hold requests in the ingress while every engine of the pool is saturated "
        "(thresholds below), in priority bands, fairly between tenants; off: only the wait for "
        "a ready engine"
    )
    queue_timeout_s: float = knob(
        30.0, "Longest wait in the ingress for room in a saturated pool before the 503"
    )
    flow_fairness: str = knob(
        "tokens", "Fairness between tenants within a priority band: tokens (deficit round "
        "robin on prompt tokens), requests (round robin), off (one queue)"
    )
    flow_ordering: str = knob(
        "fcfs", "Order of a tenant's waiting requests: fcfs, or edf (earliest "
        "x-infermesh-deadline-ms first)"
    )
    flow_quantum_tokens: int = knob(
        2048, "Prompt tokens a tenant may send per turn of deficit round robin"
    )
    saturation_waiting: int = knob(
        5, "An engine queueing this many requests itself is saturated (0: signal off)"
    )
    saturation_kv_usage: float = knob(
        0.8, "An engine with this fraction of its KV cache in use is saturated (0: off)"
    )
    saturation_uncached_tokens: int = knob(
        0, "An engine with this many prompt tokens routed and not yet prefilled is saturated "
        "(0: off, the default: with long prompts it ends cache affinity, docs/flow-control.md)"
    )
    saturation_requests: int = knob(
        0, "An engine with this many requests in flight is saturated (0: off)"
    )
    demand_interval_s: float = knob(
        1.0, "While requests are held, how often the ingress tells the autoscaler (ScaleDemand "
        "on im.scale.<pool>; also at once and when the hold is over)"
    )
    refused_backoff_s: float = knob(
        2.0, "An engine that refused a connection is asked only when no other engine is left, "
        "for this long"
    )
    session_header: str = knob(
        "x-session-id", "Request header naming the conversation a request belongs to, for the "
        "session-affinity scorer (empty: none)"
    )
    session_cookie: str = knob(
        "infermesh-session", "Cookie naming the conversation, when the header is absent "
        "(empty: none)"
    )
    instance: str = knob("", "Name of this ingress in request events (empty: host-pid)")
    # API keys, rate limits and TLS (services/ingress/auth.py, docs/ingress.md).
    api_key: str = knob("", "One API key that clients must send as `Authorization: Bearer KEY` "
                        "(named `default`; prefer the environment variable; empty: none)")
    api_keys_file: str = knob("", "YAML or JSON file of named API keys (or their sha256) with "
                              "optional per-key rate limits (empty: none)")
    rate_limit_rps: float = knob(0.0, "Requests per second allowed per API key whose entry sets "
                                 "no rate (0: no limit)")
    rate_limit_burst: int = knob(0, "Requests a key may send at once, for keys whose entry sets "
                                 "no burst (0: the rate rounded up)")
    tls_cert_file: str = knob("", "PEM certificate (chain): serve HTTPS instead of HTTP")
    tls_key_file: str = knob("", "PEM private key of the TLS certificate")
    tls_ca_file: str = knob("", "PEM CA bundle: require client certificates it signed (mTLS)")

    def __post_init__(self) -> None:
        check_token(self.pool, "pool")
        self.check_tokenizing()
        self.check_scheduling()
        liveness.check_times(self.pod_late_s, self.pod_timeout_s)
        if self.no_pod_wait_s < 0 or self.refused_backoff_s < 0:
            raise ValueError("no_pod_wait_s and refused_backoff_s must be >= 0")
        if self.hold_max_requests < 1 or self.demand_interval_s <= 0:
            raise ValueError("hold_max_requests and demand_interval_s must be positive")
        if self.queue_timeout_s <= 0 or self.flow_quantum_tokens < 1:
            raise ValueError("queue_timeout_s and flow_quantum_tokens must be positive")
        if self.flow_fairness not in FAIRNESS:
            raise ValueError(f"flow_fairness must be one of {', '.join(FAIRNESS)}")
        if self.flow_ordering not in ORDERING:
            raise ValueError(f"flow_ordering must be one of {', '.join(ORDERING)}")
        self.thresholds()  # checks them
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.rate_limit_rps < 0 or self.rate_limit_burst < 0:
            raise ValueError("rate_limit_rps and rate_limit_burst must be >= 0")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_ca_file and not self.tls_cert_file:
            raise ValueError("tls_ca_file (client certificates) needs tls_cert_file and "
                             "tls_key_file")

    def thresholds(self) -> Thresholds:
        """The saturation detector's thresholds."""
        return Thresholds(waiting=self.saturation_waiting, kv_usage=self.saturation_kv_usage,
                          uncached_tokens=self.saturation_uncached_tokens,
                          requests=self.saturation_requests)
