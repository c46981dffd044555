"""Configuration of the vLLM engine simulator (CLI, env ``INFERMESH_SIM_*``, YAML file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from infermesh.libs.config import knob


@dataclass
class SimConfig:
    """Every knob of `infermesh sim`. Latency defaults model an 8B model on one H100-class GPU."""

    model: str = knob("", "Model folder (tokenizer + chat template); empty: the repo's tiny model")
    served_model_name: str = knob("", "Name in the OpenAI API; empty: the tiny model's name")
    engines: int = knob(1, "Simulated engines in this process, each with its own ports")
    http_host: str = knob("127.0.0.1", "Address the engines' HTTP servers (OpenAI API) listen on")
    http_port: int = knob(0, "HTTP port of engine 0 (engine i uses http_port+i); 0: free ports")
    kv_port: int = knob(0, "ZMQ PUB port of engine 0 (engine i: kv_port+2i, replay +1); 0: free")
    kv_replay_port: int = knob(
        0, "Replay port of engine 0 when it is not kv_port+1 (one engine only); 0: the default"
    )
    kv_events: bool = knob(True, "Publish KV cache events on ZMQ")
    event_form: Literal["map", "array"] = knob(
        "map", "KV event form: 'map' (vLLM 0.32, 'type' key) or 'array' (older, positional)"
    )
    int_block_hashes: bool = knob(
        True, "Block hashes as uint64 on the wire (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)"
    )
    kv_topic: str = knob("", "Topic frame of KV events; empty: kv@HOST:PORT@MODEL")
    replay_buffer_steps: int = knob(10_000, "Batches kept for the replay socket")
    block_size: int = knob(16, "Tokens per KV block")
    num_gpu_blocks: int = knob(29_000, "GPU KV capacity in blocks")
    num_cpu_blocks: int = knob(0, "CPU tier capacity in blocks (0: no CPU tier)")
    hash_algo: Literal["sha256", "sha256_cbor"] = knob("sha256", "Prefix-cache hash algorithm")
    hash_seed: str = knob(
        "", "PYTHONHASHSEED for the first block's parent; empty: from the environment"
    )
    max_num_seqs: int = knob(256, "Running sequences at most; the rest wait")
    max_model_len: int = knob(131_072, "Longest prompt + output accepted")
    chat_default_max_tokens: int = knob(
        128, "Chat max_tokens when the request gives none (vLLM would fill the context)"
    )
    request_overhead_s: float = knob(0.015, "Fixed cost per request before prefill (s)")
    prefill_tokens_per_s: float = knob(30_000.0, "Prefill throughput of uncached tokens")
    cached_token_cost_s: float = knob(
        3e-6, "Prefill cost per cached prefix token (attention over the prefix)"
    )
    cpu_load_bytes_per_s: float = knob(50e9, "CPU tier to GPU bandwidth for loading blocks")
    kv_bytes_per_token: int = knob(131_072, "KV bytes per token (8B model, bf16)")
    itl_s: float = knob(0.007, "Inter-token latency with one running sequence (s)")
    itl_per_seq_s: float = knob(5e-5, "Extra inter-token latency per running sequence (s)")
    prefill_itl_penalty: float = knob(
        1.0, "Decode steps slow by this fraction while a prefill is in progress"
    )
    time_scale: float = knob(1.0, "Multiply every modelled delay (0: as fast as possible)")
    startup_delay_s: float = knob(
        0.0, "Modelled seconds from the process's start until the engines listen (HTTP and "
        "ZMQ), as a real vLLM loads its weights and warms up first (≈ 25 s on the CPU "
        "machines); × time_scale"
    )
    failure_rate: float = knob(0.0, "Fraction of requests answered with an injected error")
    failure_codes: list[int] = knob(None, "Status codes injected errors use", factory=lambda: [500])
    loras: list[str] = knob(
        None, "LoRA adapters served from the start (NAME or NAME=PATH; vLLM's --lora-modules)",
        factory=list)
    max_loras: int = knob(
        4, "LoRA adapter slots: adapters resident at once (a request for another swaps out the "
        "least recently used one no running request uses, or waits; vLLM's --max-loras)")
    enable_lora: bool = knob(
        False, "LoRA on even with no adapter at start (vLLM's --enable-lora; implied by loras "
        "and lora_dir)")
    lora_dir: str = knob(
        "", "Adapters a request may name without their being loaded: DIR/NAME/adapter_config"
        ".json is loaded on demand (vLLM's filesystem resolver, VLLM_LORA_RESOLVER_CACHE_DIR; "
        "needs runtime_lora_updating)")
    runtime_lora_updating: bool = knob(
        False, "Serve /v1/load_lora_adapter and /v1/unload_lora_adapter and resolve adapters "
        "from lora_dir (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING, which also turns it on)")
    lora_load_s: float = knob(
        0.02, "Modelled seconds to load an adapter into a slot (× time_scale)")
    seed: int = knob(0, "Seed of the generated tokens")
    enable_prompt_tokens_details: bool = knob(
        True, "Report usage.prompt_tokens_details.cached_tokens (vLLM's flag of that name)"
    )
    max_body_bytes: int = knob(64 * 1024 * 1024, "Largest HTTP request body accepted")
    enable_scale_out: bool = knob(
        True, "Serve /v1/completions/render and /v1/chat/completions/render, as vLLM's "
        "--enable-scale-out (off: 403, as a stock vLLM server)"
    )
    kv_connector: bool = knob(
        False, "Act as vLLM with the NIXL connector (--kv-transfer-config, kv_role kv_both): "
        "honour kv_transfer_params for prefill/decode disaggregation (off: ignored, as vLLM "
        "without a connector)"
    )
    kv_transfer_bytes_per_s: float = knob(
        23.75e9, "Modelled KV transfer bandwidth between engines (one 400 Gb/s RDMA NIC "
        "per GPU: Mooncake's 190 GB/s over 8x400 Gb/s RoCE, per NIC)"
    )
    kv_lease_s: float = knob(
        30.0, "Wall-clock seconds a prefill engine holds a finished request's blocks for "
        "the decode engine (vLLM's kv_lease_duration; heartbeats extend it; not scaled)"
    )
    kv_transfer_host: str = knob(
        "", "Host the decode engine reaches this engine's KV at (remote_host); empty: "
        "http_host, or this machine's address when http_host is a wildcard"
    )
    kv_transfer_timeout_s: float = knob(
        5.0, "Wall-clock limit of one KV pull from the prefill engine before it counts as "
        "a failed transfer"
    )
    storage_dir: str = knob(
        "", "Shared directory of the storage KV tier, mounted by every engine of the pool "
        "(empty: no storage tier). Computed blocks are written there and any engine loads "
        "a prefix from it that its GPU and CPU tiers miss (vLLM's tiering offload, fs tier)"
    )
    storage_capacity_bytes: int = knob(
        0, "Bytes of block files the storage tier keeps; past it the least recently used "
        "files are removed (BlockRemoved, medium STORAGE) (0: unbounded)"
    )
    storage_read_bytes_per_s: float = knob(
        5.0e9, "Modelled read bandwidth of the storage tier per engine (DeepSeek's 3FS: 40+ "
        "GiB/s peak KVCache reads per client node, shared by its 8 GPUs)"
    )
    storage_write_bytes_per_s: float = knob(
        1.5e9, "Modelled write bandwidth of the storage tier per engine (CephFS sustains "
        "~1.5 GB/s: vLLM's back-pressure defaults for a REMOTE tier)"
    )
    storage_max_write_backlog_s: float = knob(
        2.0, "Modelled seconds of writes an engine queues for the storage tier; a store "
        "that would queue more is dropped (vLLM's back-pressure)"
    )
    storage_file_bytes: int = knob(
        4096, "Real payload bytes per block file (the modelled size is block_size × "
        "kv_bytes_per_token; the file only proves which block it holds)"
    )
    storage_self_describing_events: bool = knob(
        False, "Storage BlockStored events carry the block's tokens, parent and size "
        "(vLLM's self_describing_kv_events); off: placeholders (the hash alone), vLLM's default"
    )
    storage_locality: Literal["REMOTE", "LOCAL", ""] = knob(
        "REMOTE", "locality of storage events: REMOTE (a shared filesystem, every engine of "
        "the pool can load it), LOCAL (this node's disk) or empty (unspecified)"
    )
    sglang_info: bool = knob(
        True, "Also serve SGLang's /get_server_info, /model_info and /get_model_info, which "
        "peer routers probe (off: 404, as vLLM)"
    )

    def __post_init__(self) -> None:
        if self.engines < 1:
            raise ValueError("engines must be at least 1")
        if self.kv_replay_port and self.engines != 1:
            raise ValueError("kv_replay_port needs engines = 1")
        if self.block_size < 1 or self.num_gpu_blocks < 1:
            raise ValueError("block_size and num_gpu_blocks must be positive")
        if self.num_cpu_blocks < 0:
            raise ValueError("num_cpu_blocks must be >= 0")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("failure_rate must be within [0, 1]")
        if self.time_scale < 0:
            raise ValueError("time_scale must be >= 0")
        if self.startup_delay_s < 0:
            raise ValueError("startup_delay_s must be >= 0")
        if self.kv_transfer_bytes_per_s <= 0:
            raise ValueError("kv_transfer_bytes_per_s must be positive")
        if self.kv_lease_s <= 0 or self.kv_transfer_timeout_s <= 0:
            raise ValueError("kv_lease_s and kv_transfer_timeout_s must be positive")
        if self.storage_capacity_bytes < 0:
            raise ValueError("storage_capacity_bytes must be >= 0")
        if min(self.storage_read_bytes_per_s, self.storage_write_bytes_per_s) <= 0:
            raise ValueError("storage_read_bytes_per_s and storage_write_bytes_per_s must be "
                             "positive")
        if self.storage_file_bytes < 1 or self.storage_max_write_backlog_s < 0:
            raise ValueError("storage_file_bytes must be positive, "
                             "storage_max_write_backlog_s >= 0")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        for code in self.failure_codes:
            if not 400 <= code <= 599:
                raise ValueError(f"failure code {code} is not an HTTP error status")
        if self.max_loras < 1 or self.lora_load_s < 0:
            raise ValueError("max_loras must be at least 1, lora_load_s >= 0")
        if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"):
            self.runtime_lora_updating = True  # vLLM's switch works on the simulator too

    def lora_enabled(self) -> bool:
        """Whether the engines serve LoRA adapters at all (vLLM's --enable-lora)."""
        return self.enable_lora or bool(self.loras) or bool(self.lora_dir)

    def lora_paths(self) -> dict[str, str]:
        """LoRA name → path (a name alone gets a path under /loras/)."""
        out = {}
        for spec in self.loras:
            name, _, path = spec.partition("=")
            out[name] = path or f"/loras/{name}"
        return out
