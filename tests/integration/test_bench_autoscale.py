"""The fleet comparison of `infermesh bench` (the autoscale preset's machinery) end to end on a
tiny day: a fixed fleet and the autoscaler from zero, on simulated engines that take a while to
start. Every row runs; the autoscaler starts an engine for the first requests, which are held
meanwhile (not failed), and costs fewer engine-seconds than the fixed fleet."""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.services.bench import fleets as F
from infermesh.services.bench import runner
from infermesh.services.bench import workload as W
from infermesh.services.system.spec import SystemSpec

# Modelled: 3 s of wall clock at time scale 0.2, longer than a process takes to start here, so
# a request held through it shows the simulator's delay.
STARTUP_S = 15.0
FAST = {"min_replicas": 0, "max_replicas": 2, "interval_s": 1.0, "warmup_s": 1.0,
        "scale_up_cooldown_s": 5.0, "scale_down_cooldown_s": 8.0,
        "scale_down_stabilization_s": 3.0, "scale_to_zero_after_s": 3.0}


def test_a_tiny_day_on_a_fixed_fleet_and_on_the_autoscaler(tmp_path: Path) -> None:
    preset = runner.Preset(
        name="tiny-autoscale",
        description="test",
        workload=lambda tok, seed: W.low_sharing(tok, num_prompts=60, prompt_len=50,
                                                 output_len=8, seed=seed),
        # Idle, 30 s of load, idle (modelled; 12 s of wall clock in all).
        stages=[W.Stage(0, 5), W.Stage(2, 30), W.Stage(0, 25)],
        system=SystemSpec(engines=2, time_scale=0.2),
        profiles=["default"],
        fleets=[F.Fleet("fixed-max", 2),
                F.Fleet("autoscale-saturation", 0, {**FAST, "mode": "saturation"})],
        startup_delay_s=STARTUP_S,
    )
    doc = runner.run(preset, tmp_path, seed=3)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == ["fixed-max", "autoscale-saturation"]
    assert set(data["kinds"].values()) == {"fleet"}
    fixed, auto = data["profiles"]["fixed-max"], data["profiles"]["autoscale-saturation"]
    n = doc["requests"]
    assert n > 20
    for s in (fixed, auto):
        assert s["requests"] == n and s["errors"] == 0
    # The run lasts through the idle end: at least the day (60 modelled s).
    assert fixed["duration_s"] >= 60 - 0.01 and auto["duration_s"] >= 60 - 0.01
    assert fixed["engine_seconds"] >= 2 * 60 - 0.01
    assert 0 < auto["engine_seconds"] < fixed["engine_seconds"]
    assert auto["engine_seconds_vs_baseline"] < 1.0
    # From zero: the first requests found no ready replica and were held through a start.
    assert auto["zero_arrivals"] >= 1 and fixed["zero_arrivals"] == 0
    assert max(auto["zero_ttft_s"]) >= STARTUP_S  # the first one, through a whole start
    assert auto["zero_added_s"] > 0
    # Replicas over time: the autoscaled pool starts at zero, comes up, goes back to zero.
    series = data["repeats"][0]["replicas"]["autoscale-saturation"]
    ready = [p["ready"] for p in series]
    assert ready[0] == 0 and max(ready) >= 1 and ready[-1] == 0
    assert set(p["ready"] for p in data["repeats"][0]["replicas"]["fixed-max"]) == {2}
    csv = (tmp_path / "replicas.csv").read_text().splitlines()
    assert csv[0] == "row,t_s,ready,started" and len(csv) > len(series)
    assert (tmp_path / "replicas.svg").read_text().startswith("<svg")
