"""Folding repeats of a benchmark row: medians, spread (min–max), per-rate medians, the table."""

from __future__ import annotations

from typing import Any

import pytest

from infermesh.services.bench import repeats as R


def _summary(p50: float, p90: float, tok: float, hit: float | None, errors: int,
             cp: float | None = 2.0, eng: float | None = 9.0,
             cv: float | None = 0.1) -> dict[str, Any]:
    return {"requests": 100, "ok": 100 - errors, "errors": errors, "ttft_p50_s": p50,
            "ttft_p90_s": p90, "ttft_mean_s": p50, "itl_mean_s": 0.01, "output_tok_s": tok,
            "cache_hit_rate": hit, "control_plane_cpu_s_per_1k": cp,
            "engines_cpu_s_per_1k": eng, "time_scale": 2.0,
            "load_spread": {"per_endpoint": {"sim-0": 60, "sim-1": 40}, "cv": cv}}


REPS = [_summary(0.30, 1.0, 900.0, 0.50, 0, cp=2.0),
        _summary(0.10, 3.0, 1000.0, 0.70, 4, cp=4.0, cv=0.3),
        _summary(0.20, 2.0, 800.0, None, 1, cp=None, cv=0.2)]


def test_median_summary_takes_the_median_of_every_number() -> None:
    m = R.median_summary(REPS)
    assert m["ttft_p50_s"] == pytest.approx(0.20)
    assert m["ttft_p90_s"] == pytest.approx(2.0)
    assert m["output_tok_s"] == pytest.approx(900.0)
    assert m["errors"] == 1 and isinstance(m["errors"], int)
    assert m["requests"] == 100
    # None (no data in a repeat) is left out of the median.
    assert m["cache_hit_rate"] == pytest.approx(0.60)
    assert m["control_plane_cpu_s_per_1k"] == pytest.approx(3.0)
    assert m["load_spread"] == {"per_endpoint": {"sim-0": 60, "sim-1": 40},
                                "cv": pytest.approx(0.2)}
    assert m["repeats"] == 3
    assert m["time_scale"] == 2.0


def test_one_repeat_is_its_own_median() -> None:
    m = R.median_summary(REPS[:1])
    assert {k: v for k, v in m.items() if k != "repeats"} == REPS[0]


def test_spread_gives_median_min_max_and_every_value() -> None:
    s = R.spread(REPS)
    assert set(s) == set(R.SPREAD_KEYS)
    assert s["ttft_p90_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "values": [1.0, 3.0, 2.0]}
    assert s["errors"]["min"] == 0 and s["errors"]["max"] == 4 and s["errors"]["median"] == 1
    assert s["cache_hit_rate"]["values"] == [0.5, 0.7, None]
    assert s["cache_hit_rate"]["min"] == 0.5 and s["cache_hit_rate"]["max"] == 0.7
    no_data = R.spread([_summary(0.1, 0.2, 1.0, None, 0)])["cache_hit_rate"]
    assert no_data == {"median": None, "min": None, "max": None, "values": [None]}


def test_even_number_of_repeats_interpolates() -> None:
    m = R.median_summary(REPS[:2])
    assert m["ttft_p50_s"] == pytest.approx(0.20)
    assert m["errors"] == 2  # (0 + 4) / 2
    assert R.median_summary([_summary(0.1, 1, 1, 0.5, 1), _summary(0.1, 1, 1, 0.5, 2)])[
        "errors"] == pytest.approx(1.5)


def test_per_rate_entries_merge_by_rate() -> None:
    a = [{"rate_qps": 4.0, "count": 10, "errors": 0, "ttft_p50_s": 0.1, "ttft_p90_s": 0.2,
          "ttft_mean_s": 0.1, "cache_hit_rate": 0.5},
         {"rate_qps": 8.0, "count": 20, "errors": 1, "ttft_p50_s": 0.3, "ttft_p90_s": 0.6,
          "ttft_mean_s": 0.3, "cache_hit_rate": None}]
    b = [{**a[0], "ttft_p50_s": 0.3}, {**a[1], "cache_hit_rate": 0.4}]
    c = [{**a[0], "ttft_p50_s": 0.2}]  # a repeat that offered no 8 QPS request
    merged = R.median_per_rate([a, b, c])
    assert [e["rate_qps"] for e in merged] == [4.0, 8.0]
    assert merged[0]["ttft_p50_s"] == pytest.approx(0.2)
    assert merged[1]["cache_hit_rate"] == pytest.approx(0.4)
    assert merged[1]["count"] == 20


def test_table_shows_median_and_range_with_repeats() -> None:
    table = R.format_table({"precise-prefix": REPS, "sglang-router:cache_aware": REPS[:1]})
    lines = table.splitlines()
    assert lines[0] == "median [min–max] over 3 repeats"
    header = lines[1]
    for col in ("TTFT p50 s", "TTFT p90 s", "out tok/s", "hit %", "failed", "CP CPU s/1k",
                "engine CPU s/1k"):
        assert col in header
    row = next(line for line in lines if line.startswith("precise-prefix"))
    assert "0.200 [0.100–0.300]" in row
    assert "2.000 [1.000–3.000]" in row
    assert "900 [800–1000]" in row
    assert "60.0 [50.0–70.0]" in row
    assert "1 [0–4]" in row
    assert "3.0 [2.0–4.0]" in row
    single = next(line for line in lines if line.startswith("sglang-router:cache_aware"))
    assert "0.300" in single and "[" not in single


def test_table_with_one_repeat_has_no_ranges_and_dashes_for_no_data() -> None:
    table = R.format_table({"random": [_summary(0.1, 0.2, 10.0, None, 0, cp=None, eng=None,
                                                cv=None)]})
    assert "repeats" not in table and "[" not in table
    row = table.splitlines()[-1]
    assert row.split()[0] == "random" and row.count("-") >= 4
