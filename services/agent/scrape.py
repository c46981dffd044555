"""Reading an engine's load from its Prometheus /metrics (vLLM's metric names)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import msgspec
from prometheus_client.parser import text_string_to_metric_families


class EngineLoad(msgspec.Struct, kw_only=True):
    """What the heartbeat reports of one engine."""

    ready: bool = False
    model: str = ""
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    block_size: int = 0
    num_gpu_blocks: int = 0
    num_cpu_blocks: int = 0
    lora_running: list[str] = []
    lora_waiting: list[str] = []
    max_lora: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    max_model_len: int = 0
    adapters: list[str] = []


def _int(v: str | None) -> int:
    try:
        return int(float(v)) if v not in (None, "", "None") else 0
    except ValueError:
        return 0


#: The metrics the heartbeat reads. A vLLM /metrics page is mostly histogram buckets (hundreds
#: of lines); only these lines go to the Prometheus parser, which costs ~25 µs a line in Python.
WANTED = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:cache_config_info",
    "vllm:lora_requests_info",
)


def wanted_lines(text: str) -> str:
    """The sample lines of the metrics the heartbeat reads (no comments, no other metric)."""
    return "\n".join(ln for ln in text.splitlines() if ln.startswith(WANTED))


def parse_metrics(text: str, model: str = "") -> EngineLoad:
    """Pick the load figures out of a vLLM /metrics page.

    Values are summed over engines (``engine`` label) of the same server; when ``model`` is
    given, only samples whose ``model_name`` label matches count.
    """
    ld = EngineLoad(ready=True)
    latest_lora_ts = -1.0
    for fam in text_string_to_metric_families(wanted_lines(text)):
        name = fam.name
        if not name.startswith("vllm:"):
            continue
        for s in fam.samples:
            labels = s.labels
            if model and labels.get("model_name", model) != model:
                continue
            sname = s.name
            if sname == "vllm:num_requests_running":
                ld.running += int(s.value)
            elif sname == "vllm:num_requests_waiting":
                ld.waiting += int(s.value)
            elif sname in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                ld.kv_usage = max(ld.kv_usage, float(s.value))
            elif sname == "vllm:prefix_cache_queries_total":
                ld.prefix_queries += int(s.value)
            elif sname == "vllm:prefix_cache_hits_total":
                ld.prefix_hits += int(s.value)
            elif sname == "vllm:cache_config_info":
                ld.block_size = _int(labels.get("block_size")) or ld.block_size
                ld.num_gpu_blocks = _int(labels.get("num_gpu_blocks")) or ld.num_gpu_blocks
                ld.num_cpu_blocks = _int(labels.get("num_cpu_blocks")) or ld.num_cpu_blocks
            elif sname == "vllm:lora_requests_info":
                # One sample per state change, valued with its timestamp; the newest wins.
                if float(s.value) >= latest_lora_ts:
                    latest_lora_ts = float(s.value)
                    ld.lora_running = _split(labels.get("running_lora_adapters"))
                    ld.lora_waiting = _split(labels.get("waiting_lora_adapters"))
                    ld.max_lora = _int(labels.get("max_lora"))
    return ld


def _split(v: str | None) -> list[str]:
    return [x for x in (v or "").split(",") if x]


async def read_models(
    session: aiohttp.ClientSession, base_url: str
) -> tuple[str, int, list[str]]:
    """(base model name, its max_model_len, LoRA adapters) from the engine's ``/v1/models``."""
    async with session.get(f"{base_url}/v1/models") as r:
        r.raise_for_status()
        data = await r.json()
    cards = data["data"]
    base = [c for c in cards if not c.get("parent")] or cards
    adapters = [str(c["id"]) for c in cards if c.get("parent")]
    return str(base[0]["id"]), int(base[0].get("max_model_len") or 0), adapters


def adapters_in(lora_dir: str) -> list[str]:
    """The LoRA adapters in a LoRA directory (vLLM's filesystem resolver's layout: a folder per
    adapter, named as requests name it, with a PEFT ``adapter_config.json`` of type LORA)."""
    if not lora_dir:
        return []
    out = []
    try:
        folders = sorted(Path(lora_dir).iterdir())
    except OSError:
        return []
    for folder in folders:
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and cfg.get("peft_type") == "LORA":
            out.append(folder.name)
    return out


async def scrape_engine(
    session: aiohttp.ClientSession, base_url: str, model: str, known: EngineLoad | None = None,
    *, lora: bool = False,
) -> EngineLoad:
    """Scrape ``/metrics``; read ``/v1/models`` too until the served models are known, and on
    every scrape of an engine that serves LoRA (``lora``, or its metrics or models say so:
    adapters come and go while it runs: loaded, unloaded, resolved on a request's demand)."""
    max_model_len = known.max_model_len if known else 0
    adapters = known.adapters if known else []
    lora = lora or (known is not None and (known.max_lora > 0 or bool(known.adapters)))
    if not model or not max_model_len or lora:
        found, max_model_len, adapters = await read_models(session, base_url)
        model = model or found
    async with session.get(f"{base_url}/metrics") as r:
        r.raise_for_status()
        text = await r.text()
    ld = parse_metrics(text, model)
    ld.model = model
    ld.max_model_len = max_model_len
    ld.adapters = adapters
    return ld
