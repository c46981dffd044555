"""`SystemSpec`: what one infermesh system on one machine is made of.

Engines (simulated or real vLLM), replicas of each service, the bus, the port layout and where
state goes. `infermesh up` takes its flags from these fields (libs/config derives them, with
their defaults in ``--help``); ``infermesh bench`` and the test fixtures build one in code; Tilt
reads the plan made from it (``infermesh tilt-plan``). A default that belongs to a service is
read from that service's config class, never restated here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

from infermesh.libs.bus import DEFAULT_NATS_URL, BusAddress
from infermesh.libs.config import ConfigError, default_of, knob
from infermesh.services.agent.config import AgentConfig
from infermesh.services.console.config import ConsoleConfig
from infermesh.services.ingress.config import IngressConfig
from infermesh.services.sim.config import SimConfig

# Services with replicas, in start order; each reads INFERMESH_<NAME>_* and answers on the bus.
REPLICATED = ("tokenizer", "indexer", "scheduler", "ingress")
# Everything `--set NAME.FIELD=VALUE` may configure.
CONFIGURABLE = ("sim", "agent", *REPLICATED, "autoscaler", "console")


@dataclass
class SystemSpec:
    """Every knob of `infermesh up` (env ``INFERMESH_UP_*``, or a YAML file with ``--config``)."""

    # ------------------------------------------------------------------ engines
    engine: Literal["sim", "vllm"] = knob(
        "sim", "Engines: simulated (infermesh sim), or real vLLM on the CPU launched by the "
        "agents (needs `make vllm-env`)")
    engines: int = knob(4, "Engines, one agent each (with autoscale: the engines started "
                        "first; up to the autoscaler's max_replicas are laid out)")
    prefill: int = knob(
        0, "Prefill/decode disaggregation (docs/disaggregation.md): this many prefill engines "
        "and `decode` decode engines, in place of `engines` (both at least 1)")
    decode: int = knob(0, "Decode engines, with `prefill` (role decode)")
    pool: str = knob(default_of(AgentConfig, "pool"), "Pool (model deployment) of the engines")
    model: str = knob("", "Model folder the engines serve (empty: the repo's tiny model)")
    served_model_name: str = knob(
        "", "Name the model is served under (empty: the tiny model's name, or the model "
        "folder's path, as vLLM does)")
    block_size: int = knob(
        0, "Tokens per KV block (0: the engine's default: the simulator's, or 32 for vLLM on "
        "the CPU, whose attention backend needs a multiple of 32)")
    num_gpu_blocks: int = knob(
        0, "KV blocks per engine (0: the engine's default: the simulator's, or 512 for vLLM)")
    time_scale: float = knob(default_of(SimConfig, "time_scale"),
                             "Simulated engines: multiply every modelled delay")
    sim_processes: Literal["auto", "one", "each"] = knob(
        "auto", "Simulated engines in one process, or one process each (a big request on one "
        "engine then cannot stall the others); auto: each when the machine has 2+ CPUs")
    engine_args: str = knob(
        "", "Extra arguments of every engine, as one shell-quoted string: simulator flags "
        "(e.g. '--prefill-tokens-per-s 12000'), or `vllm serve` flags")
    vllm_command: str = knob("", "The vllm executable (empty: .venv-vllm/bin/vllm here)")
    storage_dir: str = knob(
        "", "Shared-storage KV tier: a directory every engine writes the blocks it computes "
        "to and loads any engine's from (simulators: --storage-dir; vLLM: the agent's "
        "--vllm-storage-dir); the indexer credits the pool with them (docs/storage-tier.md). "
        "Empty: no storage tier")
    storage_capacity_bytes: int = knob(
        default_of(SimConfig, "storage_capacity_bytes"),
        "Bytes of block files the storage tier keeps; past it the least recently used files "
        "are removed and announced (0: unbounded)")
    loras: list[str] = knob(
        None, "LoRA adapters every engine loads at start (comma-separated): NAME, made by the "
        "repo's own code for the model (deterministic weights per name, in STATE_DIR/loras/"
        "NAME), or NAME=PATH. Engines also load and unload adapters at runtime "
        "(/v1/load_lora_adapter, /v1/unload_lora_adapter) and load any adapter in "
        "STATE_DIR/loras a request names; the ingress asks for the `lora` scheduler profile "
        "(unless --set ingress.profile=... says otherwise)", factory=list)
    max_loras: int = knob(
        0, "With loras: adapter slots per engine, adapters that run at once (0: the engine's "
        "default, 4)")
    # ------------------------------------------------------------------ replicas
    tokenizers: int = knob(1, "Tokenizer replicas")
    indexers: int = knob(1, "Indexer replicas (each follows every pod's KV stream)")
    schedulers: int = knob(1, "Scheduler replicas (active-active)")
    ingresses: int = knob(1, "Ingress replicas (replica j serves the API on ingress_port + j)")
    autoscale: bool = knob(
        False, "Start the autoscaler (desired replicas on im.scale.<pool>) and act on it here: "
        "engine slots up to its max_replicas, started and drained on its decisions "
        "(docs/autoscaler.md; its knobs with --set autoscaler.FIELD=VALUE)")
    autoscalers: int = knob(
        1, "Autoscaler replicas with autoscale: the one holding the leader lease (NATS "
        "JetStream) publishes decisions, the others follow and take over when it is gone")
    console: bool = knob(
        True, "Start the fleet console: a live web page of the pods, routing decisions, "
        "prefix-cache hit rate and autoscaler (docs/console.md; its knobs with --set "
        "console.FIELD=VALUE)")
    # ------------------------------------------------------------------ the bus
    nats_url: str = knob(
        "", "Use this NATS (comma-separated URLs) instead of starting nats-server; empty: "
        "start one (or a cluster)")
    nats_cluster: int = knob(
        1, "nats-server nodes: 1 runs one; N > 1 a routed cluster on client ports "
        "nats_port + i, and every service gets every node's URL")
    nats_auth: bool | None = knob(
        None, "One NATS user per service, allowed only its subjects (docs/security.md); "
        "unset: on for the nats-server started here, off for --nats-url")
    nats_tls_cert: str = knob("", "PEM certificate: NATS clients must use TLS")
    nats_tls_key: str = knob("", "PEM key of nats_tls_cert")
    nats_tls_ca: str = knob("", "CA the services verify the NATS certificate with "
                            "(default: the system CAs)")
    nats_max_payload: int = knob(
        8 * 1024 * 1024, "Largest bus message nats-server accepts (bytes; its default is 1 MiB)")
    subject_prefix: str = knob(default_of(BusAddress, "subject_prefix"),
                               "Prefix of every bus subject")
    # ------------------------------------------------------------------ ports (0: free ones)
    host: str = knob("127.0.0.1", "Address every process listens on")
    free_ports: bool = knob(False, "Pick every port free at start, ignoring the bases below")
    nats_port: int = knob(urlparse(DEFAULT_NATS_URL).port or 0,
                          "NATS client port (node i of a cluster: +i; 0: free)")
    nats_monitor_port: int = knob(8222, "NATS HTTP monitor port (node i: +i; 0: free)")
    nats_route_port: int = knob(0, "NATS cluster route port (node i: +i; 0: free)")
    engine_port: int = knob(8100, "HTTP port of engine 0; engine i: +i (0: free)")
    kv_port: int = knob(5557, "ZMQ KV-event port of engine 0; engine i: +2i, replay +2i+1 "
                        "(0: free)")
    ingress_port: int = knob(default_of(IngressConfig, "http_port"),
                             "Port of the OpenAI API (ingress replica j: +j; 0: free)")
    console_port: int = knob(default_of(ConsoleConfig, "http_port"),
                             "Port of the fleet console (0: free)")
    ops_port: int = knob(
        8300, "First /health and /metrics port of the agents, tokenizer, indexer and scheduler "
        "(one each, in the order the summary lists them; 0: free; -1: none)")
    # ------------------------------------------------------------------ the OpenAI front
    api_keys_file: str = knob("", "Named API keys with rate limits for the OpenAI API "
                              "(docs/ingress.md); INFERMESH_INGRESS_API_KEY also works")
    ingress_tls_cert: str = knob("", "PEM certificate: serve the OpenAI API on HTTPS")
    ingress_tls_key: str = knob("", "PEM key of ingress_tls_cert")
    # ------------------------------------------------------------------ the rest
    state_dir: str = knob("", "Credentials, logs and run.json go here (empty: "
                          "$INFERMESH_STATE_DIR, else $XDG_STATE_HOME/infermesh, else "
                          "~/.local/state/infermesh)")
    settings: dict[str, dict[str, Any]] = knob(
        None, "Per-service settings, service → field → value (`--set SERVICE.FIELD=VALUE` on "
        "the command line; services: " + ", ".join(CONFIGURABLE) + ")", factory=dict,
        flag=False)

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 0:
            raise ValueError("prefill and decode must be >= 0")
        if self.prefill or self.decode:
            if not (self.prefill and self.decode):
                raise ValueError("prefill and decode go together: give both (at least 1 each)")
            if self.autoscale:
                raise ValueError("prefill/decode pools do not go with autoscale yet")
            self.engines = self.prefill + self.decode
        if self.engines < (0 if self.autoscale else 1):
            raise ValueError("engines must be at least 1 (0 only with autoscale: a pool that "
                             "starts at zero)")
        for name in ("tokenizers", "indexers", "schedulers", "ingresses", "autoscalers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.nats_cluster < 1:
            raise ValueError("nats_cluster must be at least 1")
        if self.nats_url and self.nats_cluster != 1:
            raise ValueError("nats_cluster starts nats-server nodes; it cannot go with nats_url")
        if self.storage_capacity_bytes < 0:
            raise ValueError("storage_capacity_bytes must be >= 0 (0: unbounded)")
        if self.storage_capacity_bytes and not self.storage_dir:
            raise ValueError("storage_capacity_bytes needs storage_dir")
        if self.block_size < 0 or self.num_gpu_blocks < 0:
            raise ValueError("block_size and num_gpu_blocks must be >= 0 (0: the default)")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("nats_tls_cert and nats_tls_key go together")
        if bool(self.ingress_tls_cert) != bool(self.ingress_tls_key):
            raise ValueError("ingress_tls_cert and ingress_tls_key go together")
        try:
            shlex.split(self.engine_args)
        except ValueError as e:
            raise ValueError(f"engine_args: {e}") from None
        for spec in self.loras:
            name, eq, path = spec.partition("=")
            if not name or "/" in name or name.startswith(".") or (eq and not path):
                raise ValueError(f"loras: {spec!r} is not NAME or NAME=PATH")
        if self.max_loras < 0:
            raise ValueError("max_loras must be >= 0 (0: the engine's default)")
        unknown = sorted(set(self.settings) - set(CONFIGURABLE))
        if unknown:
            raise ValueError(f"settings: no service {', '.join(unknown)} "
                             f"(services: {', '.join(CONFIGURABLE)})")

    @property
    def bus_auth(self) -> bool:
        """Whether the services get NATS identities."""
        return self.nats_auth if self.nats_auth is not None else not self.nats_url


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``SERVICE.FIELD=VALUE`` items (``--set``) as a settings mapping (values stay strings;
    the service's config class converts and checks them)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        service, dot, field = key.strip().partition(".")
        if not sep or not dot or not service or not field:
            raise ConfigError(f"--set {item!r}: expected SERVICE.FIELD=VALUE, e.g. "
                              "ingress.schedule_timeout_s=2")
        out.setdefault(service, {})[field.replace("-", "_")] = value
    return out
