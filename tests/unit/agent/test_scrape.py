"""The heartbeat's load figures from a vLLM /metrics page: only the wanted lines are parsed, and
the figures equal a parse of the whole page."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from infermesh.services.agent.scrape import EngineLoad, parse_metrics, wanted_lines

LABELS = ["model_name", "engine"]


def _page() -> str:
    r = CollectorRegistry()
    Gauge("vllm:num_requests_running", "", LABELS, registry=r).labels("m", "0").set(3)
    waiting = Gauge("vllm:num_requests_waiting", "", LABELS, registry=r)
    waiting.labels("m", "0").set(2)
    waiting.labels("m", "1").set(4)
    waiting.labels("other", "0").set(100)  # another model's: not counted
    Gauge("vllm:kv_cache_usage_perc", "", LABELS, registry=r).labels("m", "0").set(0.25)
    Counter("vllm:prefix_cache_queries", "", LABELS, registry=r).labels("m", "0").inc(50)
    Counter("vllm:prefix_cache_hits", "", LABELS, registry=r).labels("m", "0").inc(20)
    Gauge("vllm:cache_config_info", "", ["block_size", "num_gpu_blocks", "num_cpu_blocks"],
          registry=r).labels("16", "9630", "None").set(1)
    lora = Gauge("vllm:lora_requests_info", "",
                 ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=r)
    lora.labels("a,b", "", "4").set(10.0)
    lora.labels("a", "c", "4").set(20.0)  # the newest state change wins
    h = Histogram("vllm:time_to_first_token_seconds", "", LABELS, registry=r,
                  buckets=[0.001 * 2 ** i for i in range(30)])
    for i in range(40):
        h.labels("m", "0").observe(0.01 * i)
    return generate_latest(r).decode()


def test_only_wanted_lines_are_parsed_and_the_load_is_read() -> None:
    page = _page()
    kept = wanted_lines(page)
    assert "time_to_first_token" not in kept and "#" not in kept
    assert len(kept.splitlines()) < len(page.splitlines()) / 3
    ld = parse_metrics(page, "m")
    assert ld == EngineLoad(ready=True, running=3, waiting=6, kv_usage=0.25, block_size=16,
                            num_gpu_blocks=9630, num_cpu_blocks=0, lora_running=["a"],
                            lora_waiting=["c"], max_lora=4, prefix_queries=50, prefix_hits=20)
    assert parse_metrics(page).waiting == 106  # no model given: every model's samples
