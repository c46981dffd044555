"""Benchmark metrics on synthetic traces: percentiles, summaries, table and plots."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from infermesh.services.bench.metrics import (
    RequestResult,
    by_offered_rate,
    by_stage,
    format_table,
    mean,
    percentile,
    summarize,
    write_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentile_linear_interpolation() -> None:
    data = [float(x) for x in range(10, 0, -1)]  # 10..1, unsorted on purpose
    assert percentile(data, 0) == 1.0
    assert percentile(data, 50) == pytest.approx(5.5)
    assert percentile(data, 90) == pytest.approx(9.1)
    assert percentile(data, 99) == pytest.approx(9.91)
    assert percentile(data, 100) == 10.0
    assert percentile([4.0], 90) == 4.0
    assert percentile([1.0, 2.0], 25) == pytest.approx(1.25)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)
    assert mean([1.0, 2.0, 6.0]) == 3.0
    assert mean([]) is None


def test_percentile_matches_numpy_default() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(0)
    data = [rng.expovariate(1.0) for _ in range(501)]
    for q in (1, 10, 50, 90, 99, 99.9):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12)


def trace() -> list[RequestResult]:
    """Ten successes (TTFT 0.1..1.0 s) and two failures, on three endpoints."""
    results = []
    for i in range(10):
        results.append(
            RequestResult(
                id=i, ok=True, status=200, start_s=i * 0.5, ttft_s=0.1 * (i + 1),
                e2e_s=1.0 + 0.1 * (i + 1), itl_s=[0.01, 0.03], prompt_tokens=100,
                output_tokens=20, cached_tokens=60 if i < 5 else 0,
                endpoint="a" if i < 6 else ("b" if i < 9 else "c"), profile="p",
                offered_rate_qps=2.0 if i < 4 else 8.0,
            )
        )
    results.append(RequestResult(id=10, ok=False, status=503, error="busy", start_s=1.0,
                                 ttft_s=99.0, e2e_s=99.0, prompt_tokens=100, output_tokens=0,
                                 endpoint="c", profile="p", offered_rate_qps=8.0))
    results.append(RequestResult(id=11, ok=False, status=None, error="connect",
                                 profile="p", offered_rate_qps=8.0))
    return results


def test_summarize_known_trace() -> None:
    s = summarize(trace(), duration_s=10.0, endpoints=["a", "b", "c", "d"])
    assert s["requests"] == 12 and s["ok"] == 10 and s["errors"] == 2
    # Failures (TTFT 99 s) are excluded from latency statistics.
    assert s["ttft_p50_s"] == pytest.approx(0.55)
    assert s["ttft_p90_s"] == pytest.approx(0.91)
    assert s["ttft_p99_s"] == pytest.approx(0.991)
    assert s["ttft_mean_s"] == pytest.approx(0.55)
    assert s["itl_p50_s"] == pytest.approx(0.02)
    assert s["itl_mean_s"] == pytest.approx(0.02)
    assert s["e2e_p50_s"] == pytest.approx(1.55)
    assert s["output_tok_s"] == pytest.approx(200 / 10.0)
    assert s["input_tok_s"] == pytest.approx(1000 / 10.0)
    assert s["requests_s"] == pytest.approx(1.0)
    assert s["cache_hit_rate"] == pytest.approx(300 / 1000)
    spread = s["load_spread"]
    assert spread["per_endpoint"] == {"a": 6, "b": 3, "c": 2, "d": 0}
    counts = [6, 3, 2, 0]
    avg = sum(counts) / 4
    cv = math.sqrt(sum((c - avg) ** 2 for c in counts) / 4) / avg
    assert spread["cv"] == pytest.approx(cv)
    assert s["duration_s"] == 10.0 and s["time_scale"] == 1.0
    json.dumps(s)  # JSON-ready for results.json


def test_summarize_time_scale_converts_to_modelled_units() -> None:
    base = summarize(trace(), duration_s=10.0)
    # time_scale 0.1: the sim ran 10x faster than modelled; 1 measured s = 10 modelled s.
    fast = summarize(trace(), duration_s=10.0, time_scale=0.1)
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_mean_s", "itl_p50_s", "e2e_p50_s"):
        assert fast[key] == pytest.approx(base[key] * 10)
    for key in ("output_tok_s", "requests_s", "input_tok_s"):
        assert fast[key] == pytest.approx(base[key] / 10)
    assert fast["duration_s"] == pytest.approx(100.0)
    assert fast["cache_hit_rate"] == base["cache_hit_rate"]
    assert fast["errors"] == base["errors"] and fast["load_spread"] == base["load_spread"]
    with pytest.raises(ValueError):
        summarize(trace(), duration_s=10.0, time_scale=0)
    with pytest.raises(ValueError):
        summarize(trace(), duration_s=0)


def test_summarize_without_successes() -> None:
    failed = [r for r in trace() if not r.ok]
    s = summarize(failed, duration_s=5.0)
    assert s["requests"] == 2 and s["errors"] == 2 and s["ok"] == 0
    assert s["ttft_p90_s"] is None and s["itl_mean_s"] is None
    assert s["cache_hit_rate"] is None
    assert s["output_tok_s"] == 0.0
    assert s["load_spread"] == {"per_endpoint": {"c": 1}, "cv": 0.0}
    empty = summarize([], duration_s=5.0)
    assert empty["requests"] == 0 and empty["load_spread"] == {"per_endpoint": {}, "cv": None}


def test_by_offered_rate() -> None:
    rows = by_offered_rate(trace())
    assert [r["rate_qps"] for r in rows] == [2.0, 8.0]
    low, high = rows
    assert low["count"] == 4 and low["errors"] == 0
    assert low["ttft_p50_s"] == pytest.approx(0.25)
    assert low["ttft_p90_s"] == pytest.approx(0.37)
    assert low["cache_hit_rate"] == pytest.approx(1.0 * 60 * 4 / 400)
    assert high["count"] == 8 and high["errors"] == 2
    assert high["ttft_mean_s"] == pytest.approx(0.75)
    assert high["cache_hit_rate"] == pytest.approx(60 / 600)
    # Measured rates of a 0.1 time-scaled run are 10x the modelled ones.
    scaled = [RequestResult(id=r.id, ok=r.ok, ttft_s=r.ttft_s,
                            offered_rate_qps=None if r.offered_rate_qps is None
                            else r.offered_rate_qps / 0.1) for r in trace()]
    fast = by_offered_rate(scaled, time_scale=0.1)
    assert [r["rate_qps"] for r in fast] == [2.0, 8.0]
    assert fast[0]["ttft_p50_s"] == pytest.approx(2.5)
    assert by_offered_rate([RequestResult(id=0, ok=True)]) == []


def test_prefill_spread_counts_computed_tokens_per_engine() -> None:
    results = [RequestResult(id=0, ok=True, prompt_tokens=1000, cached_tokens=900, endpoint="a"),
               RequestResult(id=1, ok=True, prompt_tokens=1000, cached_tokens=0, endpoint="b"),
               RequestResult(id=2, ok=True, prompt_tokens=1000, cached_tokens=900, endpoint="b"),
               RequestResult(id=3, ok=False, prompt_tokens=1000, endpoint="c")]
    s = summarize(results, duration_s=1.0, endpoints=["a", "b", "c", "d"])
    spread = s["prefill_spread"]
    # Requests per engine are 1, 2, 1, 0; the work is 100, 1,100, 0, 0 tokens.
    assert spread["per_endpoint"] == {"a": 100, "b": 1100, "c": 0, "d": 0}
    assert spread["max_over_mean"] == pytest.approx(1100 / 300)
    assert s["prefill_max_over_mean"] == spread["max_over_mean"]
    assert summarize([], duration_s=1.0)["prefill_max_over_mean"] is None


def test_by_stage_windows_and_throughputs() -> None:
    # Two wall stages: 2 req/s for 2 s, then 4 req/s for 1 s; time scale 0.5 (modelled = 2x).
    results = [
        RequestResult(id=0, ok=True, start_s=0.1, ttft_s=0.2, e2e_s=0.5, prompt_tokens=100,
                      cached_tokens=50, output_tokens=10),
        RequestResult(id=1, ok=True, start_s=1.5, ttft_s=1.0, e2e_s=1.2, prompt_tokens=200,
                      output_tokens=20),  # sent in stage 0, prefilled and ended in stage 1
        RequestResult(id=2, ok=True, start_s=2.2, ttft_s=0.4, e2e_s=0.6, prompt_tokens=300,
                      output_tokens=30),
        RequestResult(id=3, ok=False, start_s=2.5, prompt_tokens=300),
        RequestResult(id=4, ok=True, start_s=2.9, ttft_s=0.5, e2e_s=0.8, prompt_tokens=400,
                      output_tokens=40),  # prefilled after the last stage: in none
    ]
    first, second = by_stage(results, [(2.0, 2.0), (4.0, 1.0)], time_scale=0.5)
    assert first["stage"] == 0 and first["rate_qps"] == 1.0
    assert first["count"] == 2 and first["errors"] == 0
    assert first["ttft_p50_s"] == pytest.approx((0.2 + 1.0) / 2 / 0.5)
    assert first["cache_hit_rate"] == pytest.approx(50 / 300)
    assert first["input_tok_s"] == pytest.approx(100 / 2.0 * 0.5)
    assert first["output_tok_s"] == pytest.approx(10 / 2.0 * 0.5)
    assert second["rate_qps"] == 2.0
    assert second["count"] == 3 and second["errors"] == 1
    assert second["ttft_p90_s"] == pytest.approx((0.4 + 0.9 * 0.1) / 0.5)
    assert second["input_tok_s"] == pytest.approx((200 + 300) / 1.0 * 0.5)
    assert second["output_tok_s"] == pytest.approx((20 + 30) / 1.0 * 0.5)
    assert by_stage([], [(1.0, 1.0)])[0]["ttft_p90_s"] is None


def test_request_result_round_trip() -> None:
    r = trace()[3]
    assert RequestResult.from_dict({**r.to_dict(), "extra": 1}) == r
    assert json.loads(json.dumps(r.to_dict()))["itl_s"] == [0.01, 0.03]


def summaries() -> dict[str, dict[str, object]]:
    t = trace()
    return {
        "random": summarize(t, duration_s=10.0),
        "precise-prefix": summarize([r for r in t if r.ok], duration_s=5.0),
        "empty": summarize([], duration_s=1.0),
    }


def test_format_table() -> None:
    table = format_table(summaries())
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert len({len(line) for line in lines}) == 1  # aligned columns
    for header in ("profile", "TTFT p50 s", "TTFT p90 s", "TTFT mean s", "ITL mean ms",
                   "out tok/s", "req/s", "hit %", "spread CV", "errors"):
        assert header in lines[0]
    random_row = lines[2].split()
    assert random_row[0] == "random"
    assert random_row[1:5] == ["0.550", "0.910", "0.550", "20.0"]
    cv = summarize(trace(), duration_s=10.0)["load_spread"]["cv"]
    assert random_row[5:] == ["20.0", "1.00", "30.0", f"{cv:.3f}", "2"]
    assert lines[3].split()[-1] == "0"
    empty_row = lines[4].split()
    assert empty_row[0] == "empty" and empty_row[1:5] == ["-", "-", "-", "-"]


def test_write_plots(tmp_path: Path) -> None:
    per_rate = {name: by_offered_rate(trace()) for name in ("random", "precise-prefix")}
    per_rate["empty"] = []
    paths = write_plots(summaries(), per_rate, tmp_path / "plots")
    assert [p.name for p in paths] == ["ttft_vs_rate.png", "cache_hit_rate.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert path.stat().st_size > 5000
    # No data at all still gives readable (empty) plots.
    paths = write_plots({}, {}, tmp_path / "none")
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
