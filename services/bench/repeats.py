"""Several repeats of a benchmark row: their median, their spread, and the table.

A *row* is one of our scheduler profiles (``precise-prefix``) or one peer router policy
(``sglang-router:cache_aware``); ``--repeat N`` runs every row N times, each on fresh systems.
:func:`median_summary` folds the N summaries of a row (:func:`metrics.summarize` dicts) into one:
every number is the median over the repeats (repeats where it is ``None`` left out; ``None`` when
all are). :func:`spread` gives, for the headline statistics, the median, minimum, maximum and
every value. :func:`format_table` prints a row per name: with one repeat the values, with more
``median [min–max]`` for the headline statistics and the median for the rest.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["SPREAD_KEYS", "format_table", "median_per_rate", "median_summary", "spread"]

# The statistics whose spread over repeats is reported (table and results.json).
SPREAD_KEYS = ("ttft_p50_s", "ttft_p90_s", "output_tok_s", "cache_hit_rate", "errors",
               "control_plane_cpu_s_per_1k", "engines_cpu_s_per_1k")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _numbers(values: Sequence[Any]) -> list[float]:
    return [v for v in values if _is_number(v)]


def _median(values: Sequence[Any]) -> Any:
    nums = _numbers(values)
    if not nums:
        return None
    m = statistics.median(nums)
    # Counts stay integers when the median is one (an odd number of repeats, or equal values).
    if all(isinstance(v, int) for v in nums) and float(m).is_integer():
        return int(m)
    return m


def median_summary(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from a row's repeats: numbers are medians; the load spread's per-endpoint
    counts and CV are medians too; anything else is the first repeat's."""
    if not summaries:
        raise ValueError("no summaries")
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in summaries for k in s):
        values = [s.get(key) for s in summaries]
        if all(v is None or _is_number(v) for v in values):
            out[key] = _median(values)
        elif key == "load_spread" and all(isinstance(v, Mapping) for v in values):
            maps: list[Mapping[str, Any]] = [v for v in values if isinstance(v, Mapping)]
            per = [m.get("per_endpoint") or {} for m in maps]
            endpoints = dict.fromkeys(e for d in per for e in d)
            out[key] = {
                "per_endpoint": {e: _median([d.get(e, 0) for d in per]) for e in endpoints},
                "cv": _median([m.get("cv") for m in maps]),
            }
        else:
            out[key] = next((v for v in values if v is not None), None)
    out["repeats"] = len(summaries)
    return out


def spread(summaries: Sequence[Mapping[str, Any]],
           keys: Sequence[str] = SPREAD_KEYS) -> dict[str, dict[str, Any]]:
    """For each of ``keys``: ``median``, ``min``, ``max`` over the repeats that have it, and
    ``values`` (every repeat's, ``None`` where it had none)."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [s.get(key) for s in summaries]
        nums = _numbers(values)
        out[key] = {"median": _median(values), "min": min(nums) if nums else None,
                    "max": max(nums) if nums else None, "values": values}
    return out


def median_per_rate(runs: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """:func:`metrics.by_offered_rate` entries of several repeats, merged by rate (medians)."""
    by_rate: dict[float, list[Mapping[str, Any]]] = {}
    for entries in runs:
        for e in entries:
            by_rate.setdefault(e["rate_qps"], []).append(e)
    out = []
    for rate in sorted(by_rate):
        entries = by_rate[rate]
        merged: dict[str, Any] = {"rate_qps": rate}
        for key in dict.fromkeys(k for e in entries for k in e):
            if key != "rate_qps":
                merged[key] = _median([e.get(key) for e in entries])
        out.append(merged)
    return out


# --------------------------------------------------------------------------- table

# header, summary key, format, multiplier, whether the spread is shown
_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("TTFT p50 s", "ttft_p50_s", ".3f", 1.0, True),
    ("TTFT p90 s", "ttft_p90_s", ".3f", 1.0, True),
    ("TTFT mean s", "ttft_mean_s", ".3f", 1.0, False),
    ("ITL mean ms", "itl_mean_s", ".1f", 1000.0, False),
    ("out tok/s", "output_tok_s", ".0f", 1.0, True),
    ("hit %", "cache_hit_rate", ".1f", 100.0, True),
    ("spread CV", "load_spread", ".3f", 1.0, False),
    ("failed", "errors", "d", 1.0, True),
    ("CP CPU s/1k", "control_plane_cpu_s_per_1k", ".1f", 1.0, True),
    ("engine CPU s/1k", "engines_cpu_s_per_1k", ".1f", 1.0, True),
)


def _fmt(value: Any, spec: str, mult: float) -> str:
    if value is None:
        return "-"
    if spec == "d":
        return f"{value:d}" if isinstance(value, int) else f"{value:.1f}"
    return format(value * mult, spec)


def _cell(summaries: Sequence[Mapping[str, Any]], key: str, spec: str, mult: float,
          show_spread: bool) -> str:
    if spec == "s":  # text (a sparkline): the first repeat's
        return next((str(s[key]) for s in summaries if s.get(key) is not None), "-")
    if key == "load_spread":
        values = [s.get(key, {}).get("cv") if isinstance(s.get(key), Mapping) else None
                  for s in summaries]
    else:
        values = [s.get(key) for s in summaries]
    med = _median(values)
    text = _fmt(med, spec, mult)
    nums = _numbers(values)
    if show_spread and len(summaries) > 1 and nums:
        text += f" [{_fmt(min(nums), spec, mult)}–{_fmt(max(nums), spec, mult)}]"
    return text


Column = tuple[str, str, str, float, bool]


def format_table(rows: Mapping[str, Sequence[Mapping[str, Any]]],
                 columns: Sequence[Column] = _COLUMNS) -> str:
    """An aligned table, one line per row name (in the mapping's order) from its repeats'
    summaries. One repeat: the values. Several: the median, and ``[min–max]`` after TTFT p50
    and p90, output tok/s, hit rate, failed requests and the CPU columns. ``-``: no data.

    Columns: TTFT p50/p90/mean (modelled s), ITL mean (modelled ms), output tokens per modelled
    second, prefix-cache hit rate (%), load spread (CV of requests per engine), failed requests,
    CPU seconds per 1,000 requests of the control plane (CP: our services and nats-server, or
    the peer router) and of the engines. Other ``columns``: (header, summary key, format — ``s``
    for text —, multiplier, whether the spread is shown).
    """
    header = ["row", *(c[0] for c in columns)]
    lines = [[name, *(_cell(reps, key, spec, mult, show)
                      for _, key, spec, mult, show in columns)]
             for name, reps in rows.items()]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    n = max((len(r) for r in rows.values()), default=1)
    title = [] if n <= 1 else [f"median [min–max] over {n} repeats"]
    return "\n".join([*title, line(header), rule, *(line(r) for r in lines)])
