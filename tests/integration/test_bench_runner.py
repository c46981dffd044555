"""`infermesh bench` end to end on a small preset: cold systems per profile, the same requests,
results.json with the documented fields, plots, and prefix routing visible in the numbers."""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.services.bench import runner
from infermesh.services.bench import workload as W
from infermesh.services.system.spec import SystemSpec


def test_small_preset_runs_each_profile_on_a_cold_system(tmp_path: Path) -> None:
    preset = runner.Preset(
        name="tiny",
        description="test",
        workload=lambda tok, seed: W.shared_prefix(
            tok, num_groups=3, prompts_per_group=8, system_prompt_len=400, question_len=40,
            output_len=8, seed=seed),
        # 24 requests over 6 engines: random scatters each group over ~4 engines (a miss on
        # each), precise prefix keeps it on one, so chance cannot make them equal.
        stages=[W.Stage(6, 4)],
        system=SystemSpec(engines=6, num_gpu_blocks=2000, time_scale=0.5),
        profiles=["random", "precise-prefix"],
    )
    doc = runner.run(preset, tmp_path, seed=1)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(doc, default=str))
    for name in ("random", "precise-prefix"):
        s = data["profiles"][name]
        for key in ("ttft_p50_s", "ttft_p90_s", "ttft_mean_s", "output_tok_s", "requests_s",
                    "cache_hit_rate", "errors"):
            assert key in s, key
        assert s["errors"] == 0 and s["requests"] == data["requests"] > 0
    # Precise prefix routing keeps each group on one engine: more of each prompt is cached.
    assert (data["profiles"]["precise-prefix"]["cache_hit_rate"]
            > data["profiles"]["random"]["cache_hit_rate"])
    for png in ("ttft_vs_rate.png", "cache_hit_rate.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
