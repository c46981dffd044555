"""The fleet rows of `infermesh bench` (the autoscale preset): the rows and their systems, and
the accounting from slot histories and replica samples (engine-seconds, replicas over time,
requests that arrived at zero)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from infermesh.services.bench import fleets as F
from infermesh.services.bench import runner
from infermesh.services.bench.metrics import RequestResult
from infermesh.services.system.plan import plan
from infermesh.services.system.spec import SystemSpec

S = F.Sample


def test_the_autoscale_preset_rows() -> None:
    preset = runner.PRESETS["autoscale"]
    assert [f.name for f in preset.fleets] == ["fixed-max", "fixed-min", "autoscale-saturation",
                                               "autoscale-slo"]
    assert preset.baseline is not None and preset.baseline.name == "fixed-max"
    by = {f.name: f for f in preset.fleets}
    assert by["fixed-max"].engines == by["autoscale-slo"].max_engines == 4
    assert by["fixed-min"].engines == 1
    for name in ("autoscale-saturation", "autoscale-slo"):
        knobs = by[name].autoscaler
        assert by[name].engines == 0 and knobs is not None and knobs["min_replicas"] == 0
    assert by["autoscale-slo"].autoscaler["mode"] == "slo"  # type: ignore[index]
    assert preset.startup_delay_s == 25.0
    # The day begins and ends idle; the load starts at zero replicas.
    assert preset.stages[0].rate_qps == 0 and preset.stages[-1].rate_qps == 0
    assert preset.profiles == ["default"]


def test_a_fixed_fleet_spec() -> None:
    base = SystemSpec(engines=4, settings={"agent": {"scrape_interval_s": 0.2}})
    spec = F.fleet_spec(base, F.Fleet("fixed-min", 1), 0.1, 25.0)
    assert spec.engines == 1 and not spec.autoscale and spec.time_scale == 0.1
    assert spec.settings["sim"] == {"startup_delay_s": 25.0}
    assert spec.settings["agent"] == {"scrape_interval_s": 0.2}
    assert "sim" not in base.settings  # the preset's spec is not changed


def test_an_autoscaled_fleet_spec_scales_durations_and_holds_requests_past_a_start() -> None:
    fleet = F.Fleet("as", 0, {"mode": "slo", "min_replicas": 0, "max_replicas": 3,
                              "scale_up_cooldown_s": 10.0, "ttft_p90_target_s": 1.0,
                              "kv_spare_trigger": 0.35})
    spec = F.fleet_spec(SystemSpec(engines=3), fleet, 0.1, 25.0)
    assert spec.autoscale and spec.engines == 0
    a = spec.settings["autoscaler"]
    assert a["scale_up_cooldown_s"] == pytest.approx(1.0)
    assert a["ttft_p90_target_s"] == pytest.approx(0.1)
    assert a["kv_spare_trigger"] == 0.35 and a["max_replicas"] == 3  # not durations
    # Held for two starts and 30 s more (modelled), on the wall clock.
    assert spec.settings["ingress"]["no_pod_wait_s"] == pytest.approx((2 * 25 + 30) * 0.1)
    p = plan(spec)  # the plan takes it: slots up to max_replicas, all parked
    assert len(p.pods) == 3 and p.active_pods == ()
    assert all(x.parked for x in p.processes if x.kind in ("sim", "agent"))


def test_running_intervals_from_slot_histories() -> None:
    h = [(1.0, "started"), (4.0, "draining"), (5.0, "stopped"), (7.0, "started"),
         (9.0, "draining"), (12.0, "stopped after the drain timeout"), (20.0, "started")]
    assert F.running_intervals(h) == [(1.0, 5.0), (7.0, 12.0), (20.0, math.inf)]
    assert F.running_intervals([]) == []


def test_engine_seconds_clip_to_the_window() -> None:
    slots = [[(1.0, 5.0), (7.0, 12.0)], [(0.0, math.inf)], []]
    # Window [2, 10]: 3 + 3 from the first slot, 8 from the second.
    assert F.engine_seconds(slots, 2.0, 10.0) == pytest.approx(14.0)
    assert F.engine_seconds(slots, 20.0, 30.0) == pytest.approx(10.0)
    # A fixed fleet: every engine for the whole window.
    assert F.engine_seconds([[(0.0, math.inf)]] * 4, 0.0, 45.0) == pytest.approx(4 * 45.0)


def test_value_at_and_time_mean() -> None:
    samples = [S(0.0, 0, 0), S(1.0, 0, 1), S(3.0, 1, 1), S(4.0, 2, 2)]
    assert F.value_at(samples, -0.1) is None
    assert F.value_at(samples, 0.0) == samples[0]
    assert F.value_at(samples, 3.5) == samples[2]
    assert F.value_at(samples, 99) == samples[3]
    # ready: 0 for [0, 3), 1 for [3, 4), 2 for [4, 6] → (0 + 1 + 4) / 6
    assert F.time_mean(samples, 6.0, "ready") == pytest.approx(5 / 6)
    assert F.time_mean(samples, 6.0, "started") == pytest.approx((0 + 2 + 1 + 4) / 6)
    assert F.time_mean([], 6.0) is None


def _req(i: int, start: float, ttft: float | None, ok: bool = True) -> RequestResult:
    return RequestResult(id=i, ok=ok, start_s=start, ttft_s=ttft)


def test_requests_at_zero_and_the_latency_they_added() -> None:
    samples = [S(0.0, 0, 0), S(1.0, 0, 1), S(3.0, 1, 1), S(5.0, 0, 0)]
    results = [_req(0, 0.5, 2.6), _req(1, 2.9, 0.3), _req(2, 3.0, 0.1), _req(3, 4.0, 0.2),
               _req(4, 4.5, 0.3), _req(5, 5.5, None, ok=False)]
    zero, rest = F.at_zero(results, samples)
    assert [r.id for r in zero] == [0, 1, 5] and [r.id for r in rest] == [2, 3, 4]
    z = F.zero_stats(results, samples, time_scale=0.1)
    assert z["zero_arrivals"] == 3 and z["zero_failed"] == 1
    assert z["zero_ttft_s"] == pytest.approx([3.0, 26.0])  # modelled
    assert z["zero_ttft_p50_s"] == pytest.approx(14.5)
    assert z["zero_ttft_max_s"] == pytest.approx(26.0)
    assert z["zero_added_s"] == pytest.approx(14.5 - 2.0)  # minus the others' median
    assert F.zero_stats(results[2:5], samples[2:3], 1.0)["zero_arrivals"] == 0


def test_sparkline() -> None:
    samples = [S(0.0, 0, 0), S(2.0, 1, 1), S(4.0, 4, 4), S(6.0, 2, 4)]
    assert F.sparkline(samples, 8.0, top=4, width=4) == "·▂█▄"
    # A short peak inside a slice still shows.
    assert F.sparkline([S(0, 0, 0), S(1.0, 4, 4), S(1.2, 0, 0)], 8.0, top=4, width=4) == "█···"
    assert F.sparkline([], 8.0, top=4) == ""


def test_compare_fleets_relative_to_the_baseline() -> None:
    def run(p90: float, cost: float) -> runner.RowRun:
        return runner.RowRun(summary={"ttft_p90_s": p90, "engine_seconds": cost}, per_rate=[],
                             results=[], wall_s=1.0)

    rep = {"fixed-max": run(0.2, 1000.0), "as": run(0.22, 550.0)}
    runner.compare_fleets(rep, "fixed-max")
    assert rep["as"].summary["ttft_p90_vs_baseline"] == pytest.approx(1.1)
    assert rep["as"].summary["engine_seconds_vs_baseline"] == pytest.approx(0.55)
    assert rep["fixed-max"].summary["engine_seconds_vs_baseline"] == 1.0


def test_csv_and_svg(tmp_path: Path) -> None:
    rows = {"fixed-max": F.series([S(0.0, 4, 4), S(1.0, 4, 4)], 0.1),
            "autoscale-slo": F.series([S(0.0, 0, 0), S(0.5, 0, 1), S(1.0, 1, 1)], 0.1)}
    text = F.write_csv(rows, tmp_path / "r.csv").read_text().splitlines()
    assert text[0] == "row,t_s,ready,started" and len(text) == 6
    assert text[-1] == "autoscale-slo,10.0,1,1"
    svg = F.write_svg(rows, [(0.0, 5.0), (2.0, 5.0)], tmp_path / "r.svg", top=4)
    root = ET.parse(svg).getroot()
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 4  # ready and started, per row


def test_table_has_the_fleet_columns() -> None:
    from infermesh.services.bench import repeats as R

    s = {"ttft_p50_s": 0.1, "ttft_p90_s": 0.2, "errors": 0, "engine_seconds": 800.0,
         "engine_seconds_vs_baseline": 0.5, "ttft_p90_vs_baseline": 1.1, "ready_mean": 1.5,
         "zero_arrivals": 3, "zero_added_s": 27.0, "replicas": "··▂█▄·"}
    table = R.format_table({"autoscale-slo": [s]}, columns=F.TABLE_COLUMNS)
    line = table.splitlines()[-1]
    for cell in ("0.100", "0.200", "1.10", "800", "0.50", "1.50", "27.0", "··▂█▄·"):
        assert cell in line


@pytest.mark.parametrize("argv", [["--profiles", "default"], ["--peers", "sglang-router"],
                                  ["--url", "http://127.0.0.1:1"]])
def test_autoscale_takes_no_profiles_peers_or_url(capsys: pytest.CaptureFixture[str],
                                                  argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        runner.parse_args(["--preset", "autoscale", *argv])
    assert "compares fleets" in capsys.readouterr().err


def test_startup_delay_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.parse_args(["--preset", "autoscale"]).startup_delay_s is None
    assert runner.parse_args(["--preset", "autoscale",
                              "--startup-delay-s", "0"]).startup_delay_s == 0.0
    with pytest.raises(SystemExit):
        runner.parse_args(["--preset", "autoscale", "--startup-delay-s", "-1"])
    with pytest.raises(SystemExit):
        runner.parse_args(["--preset", "quick", "--startup-delay-s", "5"])
    assert "fleet presets" in capsys.readouterr().err
