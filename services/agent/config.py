"""Configuration of the vLLM worker agent (CLI, env ``INFERMESH_AGENT_*``, file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from infermesh.libs.bus import BusKnobs
from infermesh.libs.config import knob
from infermesh.proto.subjects import check_token


@dataclass
class AgentConfig(BusKnobs):
    """Every knob of `infermesh agent`; one agent serves one engine."""

    pool: str = knob("default", "Pool (model deployment) this engine belongs to")
    pod: str = knob("", "Pod name on the bus; empty: derived from the engine URL")
    engine_url: str = knob("http://127.0.0.1:8000", "The engine's HTTP base URL")
    kv_endpoint: str = knob("tcp://127.0.0.1:5557", "The engine's ZMQ PUB endpoint to connect to")
    replay_endpoint: str = knob("", "The engine's ZMQ replay (ROUTER) endpoint; empty: none")
    kv_topic: str = knob("", "Topic prefix to subscribe to (empty: every topic)")
    model: str = knob("", "Served model name; empty: read from the engine's /v1/models")
    role: Literal["both", "prefill", "decode"] = knob("both", "Role in P/D disaggregation")
    labels: dict[str, str] = knob(None, "Labels for filters, k=v,k2=v2", factory=dict)
    heartbeat_s: float = knob(0.2, "PodState period (the heartbeat); at most 0.25")
    scrape_interval_s: float = knob(
        0.5, "Period of the engine's /metrics scrape (its load: running, waiting, KV usage). "
        "Each scrape costs the engine CPU; the schedulers count in-flight requests themselves "
        "from request events, so this can be slower than the heartbeat"
    )
    scrape_timeout_s: float = knob(1.0, "Timeout of one /metrics scrape")
    engine_lost_s: float = knob(
        0.5, "The engine's port refusing connections this long means it died: its blocks "
        "are cleared on the bus (AllBlocksCleared) until it comes back"
    )
    engine_unresponsive_s: float = knob(
        5.0, "A /metrics scrape that times out (a busy engine, e.g. tokenizing a huge prompt) "
        "keeps the last known load and ready=True until the engine has not answered for this "
        "long; then the heartbeat says ready=False. A refused connection is engine_lost_s's"
    )
    replay_timeout_s: float = knob(2.0, "Timeout of one replay request")
    idle_check_s: float = knob(
        1.0, "With no events for this long, ask the replay socket whether any were missed"
    )
    max_batch_events: int = knob(2048, "Engine events coalesced into one bus message at most")
    snapshot_part_blocks: int = knob(2048, "Blocks per snapshot part (bus messages are capped)")
    http_host: str = knob("127.0.0.1", "Address of the agent's own /health and /metrics")
    http_port: int = knob(0, "Port of the agent's own HTTP server (0: a free port, -1: none)")
    launch_vllm: str = knob(
        "", "Model folder: the agent starts `vllm serve` on it, supervises it, and takes the "
        "engine URL and KV endpoints from what it launched"
    )
    vllm_command: str = knob("vllm", "The vllm executable (e.g. .venv-vllm/bin/vllm)")
    vllm_port: int = knob(0, "HTTP port of the launched engine (0: a free port)")
    vllm_kv_port: int = knob(0, "ZMQ PUB port of the launched engine (0: a free port)")
    vllm_replay_port: int = knob(0, "ZMQ replay port of the launched engine (0: a free port)")
    vllm_args: list[str] = knob(
        None, "Extra `vllm serve` arguments (on the command line: after `--`)", factory=list
    )
    vllm_log: str = knob("", "File for the launched engine's output (empty: discarded)")
    vllm_nixl_port: int = knob(
        0, "With role prefill or decode: the launched engine's NIXL side-channel port "
        "(VLLM_NIXL_SIDE_CHANNEL_PORT; the KV-transfer handshake listens there, and a prefill "
        "engine tells decode engines to come there; 0: a free port)"
    )
    vllm_nixl_host: str = knob(
        "", "With role prefill or decode: the address the NIXL side channel binds and "
        "advertises (VLLM_NIXL_SIDE_CHANNEL_HOST); it must be one the other engines reach "
        "(a pod IP across machines; empty: the engine's own host, 127.0.0.1)"
    )
    vllm_nixl_progress_thread: bool = knob(
        False, "With role prefill or decode: keep NIXL's UCX progress thread in the launched "
        "engine. Off, vLLM progresses KV transfers from its engine loop; on the CPU the thread "
        "busy-polls a whole core (only .venv-vllm's hook turns it off: deploy/local/vllm-env.sh)"
    )
    vllm_kv_lease_s: int = knob(
        0, "With role prefill: seconds the engine keeps a finished prefill's KV blocks for the "
        "decode engine to pull (kv_connector_extra_config.kv_lease_duration; 0: vLLM's "
        "default, 30)"
    )
    vllm_storage_dir: str = knob(
        "", "The shared-storage KV tier of the launched engine: a directory every engine of the "
        "pool mounts (vLLM offloads KV blocks there through a CPU tier and loads blocks any "
        "engine wrote; docs/storage-tier.md). Empty: off. Not with role prefill or decode"
    )
    vllm_storage_capacity_bytes: int = knob(
        0, "Bytes the storage tier's blocks may take in the directory before the engine evicts "
        "the least recently used ones (announcing their removal); 0: unbounded"
    )
    vllm_storage_locality: Literal["REMOTE", "LOCAL"] = knob(
        "REMOTE", "What the storage tier's KV events say: REMOTE for a directory the whole pool "
        "shares (the index credits every pod with its blocks), LOCAL for a disk of this engine "
        "alone"
    )
    vllm_offload_cpu_bytes: int = knob(
        512 << 20, "With a storage dir: the CPU tier's size in bytes (vLLM's cpu_bytes_to_use), "
        "a /dev/shm region every block passes through on its way to and from storage"
    )
    lora_dir: str = knob(
        "", "The engine's LoRA directory: DIR/NAME holds adapter NAME, which the engine loads "
        "when a request names it (vLLM's filesystem resolver, VLLM_LORA_RESOLVER_CACHE_DIR). "
        "The heartbeat lists these adapters among the pod's, so requests for them are routed "
        "here; with launch_vllm the engine gets it (and LoRA and runtime updating turn on). "
        "Empty: none"
    )
    vllm_loras: list[str] = knob(
        None, "LoRA adapters the launched engine loads at start, NAME=PATH (vLLM's "
        "--lora-modules); any turns LoRA on", factory=list
    )
    vllm_enable_lora: bool = knob(
        False, "LoRA on in the launched engine even with no adapter at start (adapters come "
        "later, by /v1/load_lora_adapter or from lora_dir; vLLM's --enable-lora)"
    )
    vllm_max_loras: int = knob(
        4, "With LoRA: adapters the launched engine runs in one batch (vLLM's --max-loras)"
    )
    vllm_max_lora_rank: int = knob(
        16, "With LoRA: the largest adapter rank the launched engine accepts (vLLM's "
        "--max-lora-rank: 8, 16, 32, 64, ...)"
    )
    vllm_lora_runtime_updating: bool = knob(
        True, "With LoRA: let the launched engine load and unload adapters while it runs "
        "(VLLM_ALLOW_RUNTIME_LORA_UPDATING: /v1/load_lora_adapter, /v1/unload_lora_adapter, "
        "and loading from lora_dir on demand)"
    )
    vllm_hash_seed: str = knob(
        "0", "PYTHONHASHSEED of the launched engine: vLLM derives its block hashes from it, so "
        "engines sharing a storage dir (and the simulator's --hash-seed) must agree; empty: "
        "the agent's own PYTHONHASHSEED (0 where unset)"
    )

    def __post_init__(self) -> None:
        check_token(self.pool, "pool")
        if self.pod:
            check_token(self.pod, "pod")
        if not 0 < self.heartbeat_s <= 0.25:
            raise ValueError("heartbeat_s must be within (0, 0.25]")
        if self.scrape_interval_s <= 0:
            raise ValueError("scrape_interval_s must be positive")
        if self.engine_unresponsive_s < 0:
            raise ValueError("engine_unresponsive_s must not be negative")
        if self.max_batch_events < 1 or self.snapshot_part_blocks < 1:
            raise ValueError("max_batch_events and snapshot_part_blocks must be positive")
        if not 0 <= self.vllm_nixl_port < 65536:
            raise ValueError("vllm_nixl_port must be within [0, 65535]")
        if self.vllm_kv_lease_s < 0:
            raise ValueError("vllm_kv_lease_s must not be negative")
        if self.vllm_storage_capacity_bytes < 0:
            raise ValueError("vllm_storage_capacity_bytes must not be negative (0: unbounded)")
        if self.vllm_storage_dir:
            if self.role != "both":
                raise ValueError(
                    f"vllm_storage_dir cannot be combined with role {self.role}: the storage tier "
                    "is vLLM's OffloadingConnector and a prefill or decode engine already uses "
                    "the NixlConnector (vLLM has one --kv-transfer-config per engine)")
            if any(a == "--kv-transfer-config" or a.startswith(("--kv-transfer-config=",
                                                                  "--kv-transfer-config."))
                   for a in self.vllm_args):
                raise ValueError("vllm_storage_dir sets the engine's --kv-transfer-config: "
                                 "drop the one in the extra vLLM arguments")
            if self.vllm_offload_cpu_bytes <= 0:
                raise ValueError("vllm_offload_cpu_bytes must be positive with a storage dir")
        for spec in self.vllm_loras:
            name, eq, path = spec.partition("=")
            if not (name and eq and path):
                raise ValueError(f"vllm_loras: {spec!r} is not NAME=PATH")
        if self.vllm_max_loras < 1 or self.vllm_max_lora_rank < 1:
            raise ValueError("vllm_max_loras and vllm_max_lora_rank must be positive")

    def vllm_lora(self) -> bool:
        """Whether the launched engine serves LoRA adapters (--enable-lora)."""
        return self.vllm_enable_lora or bool(self.vllm_loras) or bool(self.lora_dir)

    def pod_name(self) -> str:
        """The configured pod name, or one derived from the engine URL's host and port."""
        if self.pod:
            return self.pod
        from urllib.parse import urlparse

        u = urlparse(self.engine_url)
        host = (u.hostname or "engine").replace(".", "-").replace(":", "-")
        return check_token(f"{host}-{u.port or 80}", "pod")
