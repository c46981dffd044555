"""Configuration of the ingress (CLI, env ``INFERMESH_INGRESS_*``, YAML file)."""

from __future__ import annotations

from dataclasses import dataclass

from infermesh.libs.config import knob
from infermesh.proto.subjects import DEFAULT_PREFIX, check_token


@dataclass
class IngressConfig:
    """Every knob of `infermesh ingress`."""

    nats_url: str = knob("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
    subject_prefix: str = knob(DEFAULT_PREFIX, "Prefix of every bus subject")
    host: str = knob("127.0.0.1", "Address the OpenAI API listens on")
    port: int = knob(8000, "Port of the OpenAI API (0: a free port)")
    pool: str = knob("default", "Pool whose engines serve the requests")
    profile: str = knob("", "Scheduler profile to ask for (empty: the scheduler's default)")
    tokenize_timeout_s: float = knob(2.0, "How long to wait for the tokenizer service")
    schedule_timeout_s: float = knob(1.0, "How long to wait for the scheduler")
    connect_timeout_s: float = knob(5.0, "Timeout to connect to an engine")
    max_attempts: int = knob(3, "Engines tried per request when one fails before answering")
    max_body_bytes: int = knob(32 * 1024 * 1024, "Largest request body accepted (413 above)")
    max_prompt_tokens: int = knob(
        0, "Longest prompt accepted (0: the engines' max_model_len, as their heartbeats say)"
    )
    pod_timeout_s: float = knob(1.0, "A pod without heartbeat for this long is not used")
    instance: str = knob("", "Name of this ingress in request events (empty: host-pid)")

    def __post_init__(self) -> None:
        check_token(self.pool, "pool")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
