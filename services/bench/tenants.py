"""The ``tenants`` preset: flow control under a flood (docs/bench.md, docs/flow-control.md).

Two tenants share a pool. The *heavy* one floods at 3x what the engines compute; the *light*
one sends a steady trickle. A tenth of the heavy tenant's requests are interactive (priority
1, header ``x-infermesh-priority``) and a tenth are batch work it marks sheddable (priority
-1). Every prompt is unique (no cache to route on): what the rows differ in is only where the
excess waits and in which order it is served.

Rows (fleets of the same engines): the light tenant alone (its unloaded TTFT); no flow control
(today's behaviour: everything goes to the engines, which queue it); flow control without
fairness and without priorities (the queue moves to the router, first come first served);
with fairness between tenants; with fairness and priorities (the rows before drop the
priority header, so the same requests arrive in each).

Per row: TTFT p50/p90 of each class of request (light, heavy, heavy-high, heavy-shed; modelled
seconds, answered requests), the light tenant's p90 against its unloaded p90, the answers
flow control gave (from the ingress's ``infermesh_ingress_flow_requests_total``) and the
throughput.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from . import metrics as M
from . import workload as W

PRIORITY = "x-infermesh-priority"
TENANT = "x-infermesh-tenant"

# Modelled requests per second of each class: the engines compute ~32/s (4 engines, one
# 1,000-token prefill at a time at 8,000 tokens/s); the heavy tenant sends 3x that.
RATES = {"light": 2.0, "heavy": 77.0, "heavy-high": 9.5, "heavy-shed": 9.5}
HEADERS = {
    "light": ((TENANT, "light"),),
    "heavy": ((TENANT, "heavy"),),
    "heavy-high": ((TENANT, "heavy"), (PRIORITY, "1")),
    "heavy-shed": ((TENANT, "heavy"), (PRIORITY, "-1")),
}
PROMPT_LEN = 1000
OUTPUT_LEN = 16
ALONE = "light alone"


def workload(tok: W.TextTokenizer, seed: int) -> list[W.BenchRequest]:
    """Unique 1,000-token prompts, tagged by class, enough of each for its rate over the run
    (cycled when short); their arrivals come from :func:`arrivals`."""
    per_class = {"light": 60, "heavy": 1300, "heavy-high": 200, "heavy-shed": 200}
    base = W.low_sharing(tok, num_prompts=sum(per_class.values()), prompt_len=PROMPT_LEN,
                         output_len=OUTPUT_LEN, seed=seed)
    out: list[W.BenchRequest] = []
    i = 0
    for tag, n in per_class.items():
        for r in base[i:i + n]:
            out.append(dataclasses.replace(r, tag=tag, headers=HEADERS[tag]))
        i += n
    return [dataclasses.replace(r, id=k) for k, r in enumerate(out)]


def arrivals(requests: Sequence[W.BenchRequest], wall_stages: Sequence[W.Stage],
             seed: int) -> list[W.BenchRequest]:
    """Each class its own Poisson process, at ``RATES`` scaled by the stages' rate (the
    stages give the run's shape: a rate of 1.0 is the classes' nominal rates), merged in
    time order and renumbered."""
    out: list[W.BenchRequest] = []
    for k, (tag, rate) in enumerate(RATES.items()):
        mine = [r for r in requests if r.tag == tag]
        stages = [W.Stage(s.rate_qps * rate, s.duration_s) for s in wall_stages]
        times = W.poisson_arrivals(stages, seed * 31 + k)
        out += W.assign_arrivals(W.cycle_to(mine, len(times)), times)
    out.sort(key=lambda r: r.arrival_s)
    return [dataclasses.replace(r, id=k) for k, r in enumerate(out)]


def requests_for(requests: Sequence[W.BenchRequest], tags: Sequence[str],
                 drop_headers: Sequence[str]) -> list[W.BenchRequest]:
    """A row's requests: only the ``tags`` classes (all when empty), without the headers
    named in ``drop_headers``."""
    out = [r for r in requests if not tags or r.tag in tags]
    if drop_headers:
        drop = {h.lower() for h in drop_headers}
        out = [dataclasses.replace(r, headers=tuple((k, v) for k, v in r.headers
                                                   if k.lower() not in drop)) for r in out]
    return out


def tag_stats(results: Sequence[M.RequestResult], time_scale: float) -> dict[str, Any]:
    """Per class of request: ``<tag>_ttft_p50_s``, ``<tag>_ttft_p90_s`` (answered requests,
    modelled s), ``<tag>_ok`` and ``<tag>_refused`` (429 and 503 answers)."""
    out: dict[str, Any] = {}
    for tag in sorted({r.tag for r in results if r.tag}):
        mine = [r for r in results if r.tag == tag]
        ttft = [r.ttft_s / time_scale for r in mine if r.ok and r.ttft_s is not None]
        out[f"{tag}_ttft_p50_s"] = M.percentile(ttft, 50)
        out[f"{tag}_ttft_p90_s"] = M.percentile(ttft, 90)
        out[f"{tag}_ok"] = sum(r.ok for r in mine)
        out[f"{tag}_refused"] = sum(r.status in (429, 503) for r in mine)
    return out


_FLOW_RE = re.compile(r'^infermesh_ingress_flow_requests_total\{([^}]*)\} ([0-9.e+-]+)$', re.M)
_OUTCOME_RE = re.compile(r'outcome="([a-z_]+)"')


_WAIT_RE = re.compile(r'^infermesh_ingress_flow_wait_seconds_(sum|count)\{([^}]*)\} '
                      r'([0-9.e+-]+)$', re.M)
_TENANT_RE = re.compile(r'tenant="([^"]*)"')


def parse_flow(text: str) -> dict[str, float]:
    """``flow_<outcome>``: the ingress's flow-control answers, summed over bands and tenants;
    ``flow_wait_<tenant>_s``: the mean wait of a tenant's admitted requests (wall seconds)."""
    out: dict[str, float] = {}
    for labels, value in _FLOW_RE.findall(text):
        m = _OUTCOME_RE.search(labels)
        if m:
            key = f"flow_{m.group(1)}"
            out[key] = out.get(key, 0.0) + float(value)
    waits: dict[str, list[float]] = {}
    for kind, labels, value in _WAIT_RE.findall(text):
        m = _TENANT_RE.search(labels)
        if m:
            acc = waits.setdefault(m.group(1), [0.0, 0.0])
            acc[0 if kind == "sum" else 1] += float(value)
    for tenant, (total, n) in waits.items():
        if n:
            out[f"flow_wait_{tenant}_s"] = total / n
    return out


async def flow_counts(url: str) -> dict[str, float]:
    """The ingress at ``url``'s flow-control counters (empty when it cannot be read)."""
    try:
        async with aiohttp.ClientSession() as http, http.get(
                url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return parse_flow(await r.text())
    except (aiohttp.ClientError, TimeoutError, OSError):
        return {}


def compare(summaries: Mapping[str, dict[str, Any]]) -> None:
    """``light_p90_vs_alone``: each row's light-tenant TTFT p90 over the row ``light alone``'s
    (the same repeat)."""
    alone = summaries.get(ALONE, {}).get("light_ttft_p90_s")
    for s in summaries.values():
        p90 = s.get("light_ttft_p90_s")
        s["light_p90_vs_alone"] = p90 / alone if p90 is not None and alone else None
        s["flow_refused_full"] = s.get("flow_full", 0.0) + s.get("flow_displaced", 0.0)


TABLE_COLUMNS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("light p50 s", "light_ttft_p50_s", ".3f", 1.0, True),
    ("light p90 s", "light_ttft_p90_s", ".3f", 1.0, True),
    ("light p90 vs alone", "light_p90_vs_alone", ".2f", 1.0, False),
    ("light refused", "light_refused", "d", 1.0, False),
    ("heavy p90 s", "heavy_ttft_p90_s", ".3f", 1.0, True),
    ("high-prio p90 s", "heavy-high_ttft_p90_s", ".3f", 1.0, True),
    ("in tok/s", "input_tok_s", ".0f", 1.0, False),
    ("queued", "flow_admitted", ".0f", 1.0, False),
    ("shed", "flow_shed", ".0f", 1.0, False),
    ("429 full", "flow_refused_full", ".0f", 1.0, False),
    ("503", "flow_timed_out", ".0f", 1.0, False),
    ("failed", "errors", "d", 1.0, False),
)
