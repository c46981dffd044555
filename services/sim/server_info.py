"""What an engine tells about itself: vLLM 0.32's ``/server_info`` and ``/kv_event_sources``,
and the SGLang-named info endpoints peer routers probe.

- ``GET /server_info[?config_format=text|json]`` (``entrypoints/serve/dev/server_info/
  api_router.py``; vLLM serves it only with ``VLLM_SERVER_DEV_MODE=1``, as infermesh runs
  vLLM, else 404): ``{"vllm_config", "vllm_env", "system_env"}``. ``vllm_config`` is
  ``str(VllmConfig)`` for ``text`` (the default) and the config as JSON for ``json``; a
  bad ``config_format`` is FastAPI's 400 (``query.config_format``). Here ``vllm_config``
  carries the sections the simulator models (model, cache, parallel, scheduler, device,
  LoRA, KV events, instance id) with vLLM's field names and values; ``vllm_env`` the
  process's ``VLLM_*`` variables (strings, ``*KEY*`` left out); ``system_env`` a few
  ``collect_env`` fields.
- ``GET /kv_event_sources`` (``entrypoints/serve/instrumentator/basic.py``, always served):
  the KV-event publisher of each data-parallel rank, ``{"0": KVEventsConfig}``, or ``{}``
  without a publisher.
- ``GET /get_server_info``, ``/model_info``, ``/get_model_info``: SGLang's names, which
  vLLM 0.32 does not serve (404). sglang-router 0.3.2 reads ``/model_info`` (else
  ``/get_model_info``) for ``model_path``/``model_type``/``architectures`` labels, and its
  ``/server_info`` fallback ``/get_server_info`` for ``served_model_name``/``dp_size``;
  vllm-router 0.1.17's KV-aware discovery reads ``/get_server_info`` for ``model_id`` and
  ``kv_block_size``. The simulator answers them (``--sglang-info``, on by default) so a
  peer router gets what it needs from a simulated worker.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import schema_error
from .responses import VLLM_VERSION

__all__ = [
    "ConfigFormat",
    "EngineFacts",
    "ModelFacts",
    "config_format",
    "kv_event_sources",
    "server_info",
    "sglang_model_info",
    "sglang_server_info",
]

ConfigFormat = Literal["text", "json"]

#: KVEventsConfig's defaults for what the simulator's publisher does not set.
_KV_MAX_QUEUE_SIZE = 100_000


@dataclass(frozen=True)
class ModelFacts:
    """What ``config.json`` says about the served model."""

    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    dtype: str = "bfloat16"

    @classmethod
    def from_folder(cls, model_dir: Path) -> ModelFacts:
        """Read ``config.json`` (missing or odd: the defaults)."""
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError):
            return cls()
        if not isinstance(config, dict):
            return cls()
        archs = config.get("architectures")
        dtype = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return cls(model_type=config.get("model_type"),
                   architectures=list(archs) if isinstance(archs, list) else [],
                   dtype=str(dtype))


@dataclass(frozen=True)
class KvEventsFacts:
    """One engine's KV-event publisher, as vLLM's ``KVEventsConfig`` names it."""

    endpoint: str
    replay_endpoint: str | None
    buffer_steps: int
    hwm: int
    topic: str

    def as_config(self) -> dict[str, Any]:
        """``KVEventsConfig`` dumped, in its field order."""
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.buffer_steps,
            "hwm": self.hwm,
            "max_queue_size": _KV_MAX_QUEUE_SIZE,
            "topic": self.topic,
        }


@dataclass(frozen=True)
class EngineFacts:
    """Everything the info endpoints report about one simulated engine."""

    model_dir: str
    served_model_name: str
    max_model_len: int
    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    hash_algo: str
    max_num_seqs: int
    seed: int
    max_loras: int
    lora_names: tuple[str, ...]
    instance_id: str
    model: ModelFacts
    kv_events: KvEventsFacts | None

    @property
    def kv_cache_size_tokens(self) -> int:
        """Tokens the GPU KV cache holds."""
        return self.num_gpu_blocks * self.block_size


def config_format(query: str | None) -> ConfigFormat:
    """``config_format`` of ``/server_info``; anything but text/json is FastAPI's 400."""
    if query is None or query == "text":
        return "text"
    if query == "json":
        return "json"
    raise schema_error([{
        "type": "literal_error", "loc": ("query", "config_format"),
        "msg": "Input should be 'text' or 'json'", "input": query,
        "ctx": {"expected": "'text' or 'json'"},
    }])


# -- /server_info ---------------------------------------------------------------------


def _vllm_config(e: EngineFacts) -> dict[str, Any]:
    """The modelled sections of ``VllmConfig``, in vLLM's key order."""
    size = e.kv_cache_size_tokens
    lora = None if not e.lora_names else {"max_lora_rank": 16, "max_loras": e.max_loras}
    return {
        "model_config": {
            "model": e.model_dir,
            "tokenizer": e.model_dir,
            "tokenizer_mode": "auto",
            "trust_remote_code": False,
            "dtype": f"torch.{e.model.dtype}",
            "seed": e.seed,
            "max_model_len": e.max_model_len,
            "skip_tokenizer_init": False,
            "enable_prompt_embeds": False,
            "served_model_name": e.served_model_name,
            "generation_config": "auto",
        },
        "cache_config": {
            "block_size": e.block_size,
            "cache_dtype": "auto",
            "enable_prefix_caching": True,
            "prefix_caching_hash_algo": e.hash_algo,
            "num_gpu_blocks": e.num_gpu_blocks,
            "num_cpu_blocks": e.num_cpu_blocks or None,
            "effective_attention_block_size": e.block_size,
            "kv_cache_size_tokens": size,
            "kv_cache_max_concurrency": size / e.max_model_len,
        },
        "parallel_config": {
            "pipeline_parallel_size": 1,
            "tensor_parallel_size": 1,
            "data_parallel_size": 1,
            "data_parallel_size_local": 1,
            "data_parallel_rank": 0,
            "data_parallel_rank_local": 0,
        },
        "scheduler_config": {
            "runner_type": "generate",
            "max_num_seqs": e.max_num_seqs,
            "enable_chunked_prefill": True,
            "policy": "fcfs",
        },
        "device_config": {"device": "cuda"},
        "lora_config": lora,
        "kv_events_config": None if e.kv_events is None else e.kv_events.as_config(),
        "instance_id": e.instance_id,
    }


def _vllm_config_text(e: EngineFacts) -> str:
    """``str(VllmConfig)`` without the nested configs' reprs the simulator does not model
    (aux outputs, structured outputs, observability, compilation, kernels)."""
    return (
        f"model={e.model_dir!r}, speculative_config=None, tokenizer={e.model_dir!r}, "
        "skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, "
        "tokenizer_revision=None, trust_remote_code=False, "
        f"dtype=torch.{e.model.dtype}, max_seq_len={e.max_model_len}, download_dir=None, "
        "load_format=auto, tensor_parallel_size=1, pipeline_parallel_size=1, "
        "data_parallel_size=1, decode_context_parallel_size=1, dcp_comm_backend=ag_rs, "
        "disable_custom_all_reduce=False, quantization=None, quantization_config=None, "
        "enforce_eager=False, kv_cache_dtype=auto, device_config=cuda, "
        f"seed={e.seed}, served_model_name={e.served_model_name}, enable_prefix_caching=True, "
        "enable_chunked_prefill=True, pooler_config=None"
    )


def _vllm_env() -> dict[str, str]:
    """``VLLM_*`` variables of this process, without secrets (vLLM drops ``*KEY*``)."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("VLLM_") and "KEY" not in k}


@functools.lru_cache(maxsize=1)
def _system_env() -> dict[str, Any]:
    """A few of ``collect_env``'s fields, for this host."""
    try:
        name = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        name = platform.system()
    bits = sys.maxsize.bit_length() + 1
    return {
        "os": f"{name} ({platform.machine()})",
        "python_version": f"{sys.version.replace(chr(10), ' ')} ({bits}-bit runtime)",
        "python_platform": platform.platform(),
        "vllm_version": VLLM_VERSION,
    }


def server_info(e: EngineFacts, fmt: ConfigFormat) -> dict[str, Any]:
    """The ``GET /server_info`` body."""
    return {
        "vllm_config": _vllm_config_text(e) if fmt == "text" else _vllm_config(e),
        "vllm_env": _vllm_env(),
        "system_env": _system_env(),
    }


def kv_event_sources(e: EngineFacts) -> dict[str, Any]:
    """The ``GET /kv_event_sources`` body: rank 0's publisher, or nothing."""
    return {} if e.kv_events is None else {"0": e.kv_events.as_config()}


# -- SGLang's names -------------------------------------------------------------------


def sglang_server_info(e: EngineFacts) -> dict[str, Any]:
    """``GET /get_server_info``: SGLang's server-args names plus what vllm-router reads.

    One of each alias pair only (``model_id`` not ``model``, ``kv_block_size`` not
    ``block_size``): the routers' serde structs refuse a duplicated field.
    """
    return {
        "model_path": e.model_dir,
        "tokenizer_path": e.model_dir,
        "served_model_name": e.served_model_name,
        "model_id": e.served_model_name,
        "instance_id": e.instance_id,
        "context_length": e.max_model_len,
        "page_size": e.block_size,
        "kv_block_size": e.block_size,
        "tp_size": 1,
        "dp_size": 1,
        "max_running_requests": e.max_num_seqs,
        "max_total_num_tokens": e.kv_cache_size_tokens,
        "version": VLLM_VERSION,
    }


def sglang_model_info(e: EngineFacts) -> dict[str, Any]:
    """``GET /model_info`` and ``/get_model_info``, with SGLang's keys."""
    return {
        "model_path": e.model_dir,
        "tokenizer_path": e.model_dir,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "model_type": e.model.model_type,
        "architectures": e.model.architectures or None,
    }
