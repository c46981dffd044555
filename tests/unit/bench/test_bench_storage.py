"""The tiered preset's readings: hits per tier and storage bandwidth from vLLM-named metrics,
and the disk's own rate from dd."""

from __future__ import annotations

import pytest

from infermesh.services.bench.storage import dd_rates, summarize_tiers, tier_stats_of

PAGE = """# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="device"} 300.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="host"} 100.0
vllm:prompt_tokens_cached_by_source_total{engine="0",model_name="m",source="disk"} 200.0
vllm:kv_offload_tiering_read_bytes_total{tier="1:infermesh"} 4.0e6
vllm:kv_offload_tiering_read_time_total{tier="1:infermesh"} 0.002
vllm:kv_offload_tiering_write_bytes_total{tier="1:infermesh"} 8.0e6
vllm:kv_offload_tiering_write_time_total{tier="1:infermesh"} 0.008
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 400.0
"""


def test_hits_per_tier_and_bandwidth_over_engines() -> None:
    st = tier_stats_of([PAGE, PAGE, ""])  # two engines and one that did not answer
    assert st["prompt_tokens"] == 2000
    assert st["cached_by_source"]["disk"] == 400
    s = summarize_tiers(st)
    assert s["hit_gpu"] == pytest.approx(0.3)
    assert s["hit_cpu"] == pytest.approx(0.1)
    assert s["hit_storage"] == pytest.approx(0.2)
    assert s["hit_total"] == pytest.approx(0.6)
    assert s["storage_read_MBps"] == pytest.approx(2000.0)
    assert s["storage_write_MBps"] == pytest.approx(1000.0)
    assert summarize_tiers(tier_stats_of([]))["hit_total"] is None


def test_dd_rates(tmp_path) -> None:
    r = dd_rates(tmp_path, size_mb=4)
    assert r["dd_write_MBps"] > 0 and r["dd_read_MBps"] > 0
    assert not (tmp_path / ".dd-probe").exists()


def test_tiered_preset_rounds_and_fleets() -> None:
    from infermesh.libs.tinymodel import DEFAULT_MODEL_NAME, ensure_model_folder
    from infermesh.libs.tokenization import ModelTokenizer
    from infermesh.services.bench import fleets as F
    from infermesh.services.bench import runner

    preset = runner.PRESETS["tiered"]
    tok = ModelTokenizer.from_folder(ensure_model_folder(DEFAULT_MODEL_NAME))
    reqs = preset.workload(tok, 0)
    assert [r.id for r in reqs] == list(range(500))
    # Rounds: each group once in every 100 requests, so it returns after all the others.
    for k in range(5):
        assert sorted(r.group for r in reqs[k * 100 : (k + 1) * 100]) == list(range(100))
    # The working set is several times the fleet's GPU KV.
    blocks = len({(r.group) for r in reqs}) * (2000 // 16)
    spec = preset.system
    assert blocks > 3 * spec.engines * spec.num_gpu_blocks
    rows = {f.name: F.fleet_spec(spec, f, 1.0, 0.0, "/s") for f in preset.fleets}
    assert "--storage-dir" not in rows["gpu+cpu"].engine_args
    assert rows["gpu+cpu"].engine_args.endswith("--num-cpu-blocks 1500")
    assert rows["gpu+cpu+storage"].engine_args.endswith("--storage-dir /s")
    assert rows["gpu-only"].engine_args == spec.engine_args
