"""The saturation preset: skewed popularity of long shared prefixes, stages around the fleet's
knee, the five profiles it compares, and the knee stage's figures in its table."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from infermesh.libs.scheduling.config import DEFAULT_PIPELINE_YAML
from infermesh.libs.tokenization import ModelTokenizer
from infermesh.services.bench import repeats as R
from infermesh.services.bench import runner
from infermesh.services.bench import workload as W


def test_the_saturation_preset_shape() -> None:
    preset = runner.PRESETS["saturation"]
    assert preset.profiles == ["random", "precise-prefix", "llm-d", "llm-d-sticky", "default"]
    assert not preset.fleets
    # Below, at and above the knee, in rising order, the knee stage named.
    rates = [s.rate_qps for s in preset.stages]
    assert rates == sorted(rates) and len(rates) == 3
    assert preset.knee_stage == 1
    spec = preset.system
    assert spec.engines == 8 and spec.time_scale >= 2
    # Sized for a 2-core machine: the top stage at 15 wall requests a second at most, and the
    # stages of 5 profiles x 3 repeats, ~10 s of start and stop each, in 12 minutes (random's
    # backlog drains for a minute more a repeat: ~15 minutes measured, docs/bench.md).
    assert max(rates) / spec.time_scale <= 15
    assert (W.total_duration(preset.stages) * spec.time_scale + 10) * 5 * 3 <= 12 * 60
    keys = [c[1] for c in preset.table or ()]
    assert {"ttft_p50_s", "ttft_p90_s", "knee_ttft_p90_s", "knee_input_tok_s",
            "knee_output_tok_s", "cache_hit_rate", "load_spread",
            "prefill_max_over_mean"} <= set(keys)


def test_the_profiles_it_compares_are_shipped() -> None:
    for name in runner.PRESETS["saturation"].profiles:
        assert f"  - name: {name}\n" in DEFAULT_PIPELINE_YAML


def test_the_saturation_workload(model_dir: Path) -> None:
    preset = runner.PRESETS["saturation"]
    tok = ModelTokenizer.from_folder(model_dir)
    reqs = preset.workload(tok, 0)
    assert preset.workload(tok, 0) == reqs  # seeded
    # Enough prompts that none is sent twice.
    assert len(reqs) >= W.expected_count(preset.stages) * 1.2
    assert {r.prompt_tokens for r in reqs} == {1 + 3000 + 500}
    counts = Counter(r.group for r in reqs)
    assert set(counts) == set(range(runner.SATURATION_GROUPS))
    share = counts[0] / len(reqs)
    # The hottest prefix takes about a third: more than two engines' fair share of eight.
    assert share == pytest.approx(W.zipf_weights(16, 1.1)[0], abs=0.05)
    assert share > 2 / preset.system.engines
    # The working set (every prefix) fits the fleet's KV, not one engine's.
    blocks = runner.SATURATION_GROUPS * 3000 // 16
    spec = preset.system
    assert spec.num_gpu_blocks < blocks < spec.engines * spec.num_gpu_blocks


def test_knee_figures_in_the_summary_and_the_table() -> None:
    from infermesh.services.bench.metrics import RequestResult

    work = runner.Workload(requests=[], wall_stages=[W.Stage(1, 2), W.Stage(2, 2)],
                           time_scale=1.0, model="m", knee_stage=1)
    results = [RequestResult(id=0, ok=True, start_s=2.5, ttft_s=0.5, e2e_s=1.0,
                             prompt_tokens=100, output_tokens=8, endpoint="e0")]
    s = runner._summarize(results, 4.0, work, {}, ["e0", "e1"])
    assert s["knee_ttft_p90_s"] == pytest.approx(0.5)
    assert s["knee_input_tok_s"] == pytest.approx(100 / 2)
    assert [e["stage"] for e in s["per_stage"]] == [0, 1]
    assert s["prefill_max_over_mean"] == pytest.approx(2.0)
    table = R.format_table({"default": [s, s]}, columns=runner.SATURATION_TABLE_COLUMNS)
    assert "knee p90 s" in table and "prefill max/mean" in table
