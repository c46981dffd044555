"""Per-request benchmark results, their summaries, the text table and the plots.

Conventions
-----------
*Raw measurements.* A :class:`RequestResult` holds what the client measured on
the wall clock: seconds since the run's start, TTFT, end-to-end latency and
inter-token gaps, and ``offered_rate_qps``, the rate of the load stage the
request arrived in, as actually offered (requests per wall-clock second).

*Time scale.* A simulator run at ``time_scale = s`` lets modelled time pass
``1/s`` times faster than the wall clock (``s = 0.1``: ten times faster, one
modelled second lasts 0.1 s). :func:`summarize` and :func:`by_offered_rate`
report **modelled** units: every duration is ``measured / s`` and every rate or
throughput is ``measured * s``. With ``s = 1`` (a real engine) nothing changes.

*Percentiles.* :func:`percentile` interpolates linearly between the closest
ranks, numpy's default (``method="linear"``, Hyndman and Fan type 7): for sorted
``x[0..n-1]`` and ``q`` in [0, 100], position ``h = (n - 1) q / 100`` and the
value ``x[floor h] + (h - floor h) (x[floor h + 1] - x[floor h])``.

*Errors.* Requests with ``ok=False`` count in ``requests`` and ``errors`` (and
in the load spread, as they were routed) but in no latency, token or cache
statistic. A statistic with no data is ``None`` (``null`` in JSON).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RequestResult",
    "by_offered_rate",
    "by_stage",
    "format_table",
    "mean",
    "percentile",
    "summarize",
    "write_plots",
]


@dataclass
class RequestResult:
    """What one benchmark request measured (wall-clock seconds; see module docstring).

    ``start_s`` is when it was sent, relative to the run's start; ``ttft_s`` the
    time from sending to the first streamed chunk carrying tokens; ``e2e_s`` to
    the end of the stream; ``itl_s`` the gaps between consecutive token-carrying
    chunks. ``cached_tokens`` is the engine's reported prefix-cache hit
    (``usage.prompt_tokens_details.cached_tokens``), ``endpoint`` the engine that
    served it (when known) and ``offered_rate_qps`` its load stage's offered rate.
    """

    id: int
    ok: bool
    status: int | None = None
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    endpoint: str | None = None
    profile: str = ""
    offered_rate_qps: float | None = None
    tag: str = ""  # the request's class (BenchRequest.tag)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestResult:
        """The inverse of :meth:`to_dict`; unknown keys are ignored."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- statistics


def percentile(values: Iterable[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None when empty."""
    data = sorted(values)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    h = (len(data) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (h - lo) * (data[hi] - data[lo])


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean; None when empty."""
    data = list(values)
    return math.fsum(data) / len(data) if data else None


def _div(value: float | None, by: float) -> float | None:
    return None if value is None else value / by


def _load_spread(
    results: Sequence[RequestResult], endpoints: Sequence[str] | None
) -> dict[str, Any]:
    counts: Counter[str] = Counter(r.endpoint for r in results if r.endpoint is not None)
    per_endpoint = {ep: 0 for ep in endpoints or ()}
    per_endpoint.update(counts)
    values = list(per_endpoint.values())
    cv: float | None = None
    if values and sum(values) > 0:
        avg = sum(values) / len(values)
        var = sum((v - avg) ** 2 for v in values) / len(values)
        cv = math.sqrt(var) / avg
    return {"per_endpoint": dict(sorted(per_endpoint.items())), "cv": cv}


def _prefill_spread(
    ok: Sequence[RequestResult], endpoints: Sequence[str] | None
) -> dict[str, Any]:
    """Prompt tokens each engine computed (prompt − cached, successful requests): the prefill
    work routing put on it, which request counts hide when prompts hit and miss unevenly."""
    per_endpoint = {ep: 0 for ep in endpoints or ()}
    for r in ok:
        if r.endpoint is not None:
            per_endpoint[r.endpoint] = (per_endpoint.get(r.endpoint, 0)
                                        + max(0, r.prompt_tokens - r.cached_tokens))
    values = list(per_endpoint.values())
    cv = max_over_mean = None
    if values and sum(values) > 0:
        avg = sum(values) / len(values)
        cv = math.sqrt(sum((v - avg) ** 2 for v in values) / len(values)) / avg
        max_over_mean = max(values) / avg
    return {"per_endpoint": dict(sorted(per_endpoint.items())), "cv": cv,
            "max_over_mean": max_over_mean}


def _latency_stats(
    ok: Sequence[RequestResult], time_scale: float
) -> dict[str, float | None]:
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    out: dict[str, float | None] = {}
    for name, data in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _div(percentile(data, q), time_scale)
        out[f"{name}_mean_s"] = _div(mean(data), time_scale)
    return out


def _cache_hit_rate(ok: Sequence[RequestResult]) -> float | None:
    prompt = sum(r.prompt_tokens for r in ok)
    return sum(r.cached_tokens for r in ok) / prompt if prompt > 0 else None


def summarize(
    results: Sequence[RequestResult],
    *,
    duration_s: float,
    time_scale: float = 1.0,
    endpoints: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Summary statistics of one run, in modelled units (see the module docstring).

    ``duration_s`` is the run's measured wall-clock length, the denominator of the
    throughputs. ``endpoints`` lists every engine so that one that received no
    request counts as 0 in the load spread.

    Keys: ``requests``, ``ok``, ``errors``; ``ttft|itl|e2e`` x
    ``_p50_s|_p90_s|_p99_s|_mean_s`` (ITL pools the gaps of all requests);
    ``output_tok_s``, ``input_tok_s`` and ``requests_s`` (successful requests);
    ``prompt_tokens``, ``cached_tokens``, ``output_tokens`` (sums over successful
    requests); ``cache_hit_rate`` = cached / prompt tokens; ``load_spread``
    ``{"per_endpoint": {endpoint: requests}, "cv": std/mean}`` (population
    standard deviation); ``prefill_spread`` ``{"per_endpoint": {endpoint: prompt
    tokens computed}, "cv", "max_over_mean"}`` over successful requests whose engine is
    known (``prefill_max_over_mean`` repeats the last, a number the repeats' medians
    take); ``duration_s`` (modelled) and ``time_scale``.
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be finite and > 0, got {time_scale}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s}")
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    per_s = time_scale / duration_s  # converts a count to a per-modelled-second rate
    prefill = _prefill_spread(ok, endpoints)
    summary: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
    }
    summary.update(_latency_stats(ok, time_scale))
    summary.update(
        {
            "output_tok_s": output * per_s,
            "input_tok_s": prompt * per_s,
            "requests_s": len(ok) * per_s,
            "prompt_tokens": prompt,
            "cached_tokens": sum(r.cached_tokens for r in ok),
            "output_tokens": output,
            "cache_hit_rate": _cache_hit_rate(ok),
            "load_spread": _load_spread(results, endpoints),
            "prefill_spread": prefill,
            "prefill_max_over_mean": prefill["max_over_mean"],
            "duration_s": duration_s / time_scale,
            "time_scale": time_scale,
        }
    )
    return summary


def by_offered_rate(
    results: Sequence[RequestResult], time_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Statistics per offered rate, ascending, for "TTFT against offered rate" plots.

    Results are grouped by their (measured) ``offered_rate_qps``; results without
    one are left out. Each entry: ``rate_qps`` (modelled: measured x time_scale,
    rounded to 1e-6), ``count``, ``errors``, ``ttft_p50_s``, ``ttft_p90_s``,
    ``ttft_mean_s`` (modelled) and ``cache_hit_rate``, over the rate's
    successful requests.
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be finite and > 0, got {time_scale}")
    groups: dict[float, list[RequestResult]] = {}
    for r in results:
        if r.offered_rate_qps is not None:
            groups.setdefault(r.offered_rate_qps, []).append(r)
    out = []
    for rate in sorted(groups):
        members = groups[rate]
        ok = [r for r in members if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        out.append(
            {
                "rate_qps": round(rate * time_scale, 6),
                "count": len(members),
                "errors": len(members) - len(ok),
                "ttft_p50_s": _div(percentile(ttft, 50), time_scale),
                "ttft_p90_s": _div(percentile(ttft, 90), time_scale),
                "ttft_mean_s": _div(mean(ttft), time_scale),
                "cache_hit_rate": _cache_hit_rate(ok),
            }
        )
    return out


def by_stage(
    results: Sequence[RequestResult],
    stages: Sequence[tuple[float, float]],
    time_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Statistics per load stage, ``stages`` being ``(rate, duration)`` pairs in wall units
    (the schedule the requests were sent on; rates per wall second).

    Stage ``i`` is the window ``[start_i, start_i + duration_i)`` of the run's clock. Each
    entry: ``stage`` (its index), ``rate_qps`` (modelled), ``count`` and ``errors`` (requests
    sent in the window), ``ttft_p50_s``, ``ttft_p90_s`` (modelled, over those that
    succeeded), ``cache_hit_rate``, and the throughputs served in the window, per modelled
    second: ``input_tok_s`` (prompt tokens of requests whose first token came in it: prefill
    done) and ``output_tok_s`` (output tokens of requests that ended in it). A stage above
    what the fleet serves sends more than it serves: its throughputs stay at the fleet's
    capacity while its TTFTs grow.
    """
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be finite and > 0, got {time_scale}")
    out = []
    t0 = 0.0
    for i, (rate, duration) in enumerate(stages):
        t1 = t0 + duration
        sent = [r for r in results if t0 <= r.start_s < t1]
        ok = [r for r in sent if r.ok]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        prefilled = sum(r.prompt_tokens for r in results if r.ok and r.ttft_s is not None
                        and t0 <= r.start_s + r.ttft_s < t1)
        ended = sum(r.output_tokens for r in results if r.ok and r.e2e_s is not None
                    and t0 <= r.start_s + r.e2e_s < t1)
        per_s = time_scale / duration if duration > 0 else 0.0
        out.append(
            {
                "stage": i,
                "rate_qps": round(rate * time_scale, 6),
                "count": len(sent),
                "errors": len(sent) - len(ok),
                "ttft_p50_s": _div(percentile(ttft, 50), time_scale),
                "ttft_p90_s": _div(percentile(ttft, 90), time_scale),
                "cache_hit_rate": _cache_hit_rate(ok),
                "input_tok_s": prefilled * per_s,
                "output_tok_s": ended * per_s,
            }
        )
        t0 = t1
    return out


# --------------------------------------------------------------------------- table


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale if scale != 1.0 else value, spec)


_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    # header, summary key, format, multiplier
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0),
    ("TTFT mean s", "ttft_mean_s", ".3f", 1.0),
    ("ITL mean ms", "itl_mean_s", ".1f", 1000.0),
    ("out tok/s", "output_tok_s", ".1f", 1.0),
    ("req/s", "requests_s", ".2f", 1.0),
    ("hit %", "cache_hit_rate", ".1f", 100.0),
    ("spread CV", "load_spread", ".3f", 1.0),
    ("errors", "errors", "d", 1.0),
)


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """An aligned text table, one row per profile (in the mapping's order).

    Columns: TTFT p50/p90/mean (s), ITL mean (ms), output tok/s, requests/s,
    cache-hit rate (%), load spread (coefficient of variation of requests per
    endpoint) and errors; ``-`` marks a statistic with no data.
    """
    header = ["profile", *(c[0] for c in _COLUMNS)]
    rows = []
    for name, summary in summaries.items():
        row = [name]
        for _, key, spec, mult in _COLUMNS:
            value = summary.get(key)
            if key == "load_spread":
                value = value.get("cv") if isinstance(value, Mapping) else value
            row.append(_fmt(value, spec, mult))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# --------------------------------------------------------------------------- plots


def write_plots(
    summaries: Mapping[str, Mapping[str, Any]],
    per_rate: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
) -> list[Path]:
    """Write ``ttft_vs_rate.png`` and ``cache_hit_rate.png`` into ``out_dir``.

    ``per_rate`` maps a profile to its :func:`by_offered_rate` entries.
    ``ttft_vs_rate.png``: TTFT p90 (solid) and p50 (dashed) against offered rate,
    one colour per profile, log y. ``cache_hit_rate.png``: the overall hit rate
    per profile (bars) and the hit rate against offered rate. Uses matplotlib's
    Agg canvas directly (no pyplot, no display). Returns the two paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys([*summaries, *per_rate]))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = False
    for name in names:
        points = per_rate.get(name, ())
        for key, style, label in (("ttft_p90_s", "-", "p90"), ("ttft_p50_s", "--", "p50")):
            xy = [(p["rate_qps"], p[key]) for p in points if p.get(key) is not None and p[key] > 0]
            if xy:
                xs, ys = zip(*xy, strict=True)
                ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[name],
                        label=f"{name} {label}")
                plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "no TTFT data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("TTFT (s, log scale)")
    ax.set_title("TTFT against offered rate")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    ttft_path = out / "ttft_vs_rate.png"
    fig.savefig(ttft_path)

    fig = Figure(figsize=(11, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    bars, lines = fig.subplots(1, 2)
    hit = [summaries[n].get("cache_hit_rate") if n in summaries else None for n in names]
    heights = [100.0 * h if h is not None else 0.0 for h in hit]
    rects = bars.bar(range(len(names)), heights, color=[colors[n] for n in names])
    for rect, h in zip(rects, hit, strict=True):
        label = "-" if h is None else f"{100.0 * h:.1f}%"
        bars.annotate(label, (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                      ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    bars.set_ylim(0, 105)
    bars.set_ylabel("prefix-cache hit rate (%)")
    bars.set_title("Cache hit rate per profile")
    for name in names:
        xy = [(p["rate_qps"], 100.0 * p["cache_hit_rate"]) for p in per_rate.get(name, ())
              if p.get("cache_hit_rate") is not None]
        if xy:
            xs, ys = zip(*xy, strict=True)
            lines.plot(xs, ys, marker="o", markersize=3, color=colors[name], label=name)
    lines.set_ylim(0, 105)
    lines.set_xlabel("offered rate (requests/s)")
    lines.set_ylabel("prefix-cache hit rate (%)")
    lines.set_title("Cache hit rate against offered rate")
    lines.grid(True, alpha=0.3)
    if lines.get_legend_handles_labels()[0]:
        lines.legend(fontsize=8)
    fig.tight_layout()
    hit_path = out / "cache_hit_rate.png"
    fig.savefig(hit_path)
    return [ttft_path, hit_path]
