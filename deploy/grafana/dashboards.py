"""The Grafana dashboards of deploy/grafana/, built with grafanalib.

``python deploy/grafana/dashboards.py`` writes one JSON file per dashboard next to this file
(import them in Grafana, or mount them for its dashboard provisioning); the committed files are
what this writes (tests/unit/test_dashboards.py checks it, and checks every metric and label a
query names against the services' /metrics on a running system).

Every query reads a Prometheus data source chosen by the ``datasource`` variable; labels that
Prometheus adds when it scrapes (``instance``, ``job``, ``pod``, ``namespace``) split series per
process.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    Dashboard,
    GridPos,
    Target,
    Template,
    Templating,
    TimeSeries,
)

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class P:
    """One panel: a title, its queries (PromQL, legend) and the unit of its axis."""

    title: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    description: str = ""


def _q(metric: str, by: str, q: float = 0.9, window: str = "1m") -> str:
    """The ``q`` quantile of a histogram over ``window``, per ``by``."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{window}])))"


def dashboard(uid: str, title: str, description: str, panels: list[P]) -> Dashboard:
    items = []
    for i, p in enumerate(panels):
        items.append(TimeSeries(
            title=p.title, description=p.description or None, dataSource=DS, unit=p.unit,
            targets=[Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + j),
                            datasource=DS) for j, (expr, legend) in enumerate(p.queries)],
            gridPos=GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2)),
        ))
    return Dashboard(
        title=title, uid=uid, description=description, tags=["infermesh"],
        timezone="browser", refresh="10s", panels=items,
        templating=Templating(list=[Template(name="datasource", type="datasource",
                                             query="prometheus", label="Prometheus")]),
    ).auto_panel_ids()


FLEET = dashboard("infermesh-fleet", "infermesh / fleet",
                  "Requests, latency from the ingress's view, errors, engines' load", [
    P("Requests per second, by status", (
        ("sum by (status) (rate(infermesh_ingress_requests_total[1m]))", "{{status}}"),), "reqps"),
    P("TTFT at the ingress (p50, p90, p99)", tuple(
        (_q("infermesh_ingress_ttft_seconds", "", q), f"p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)), "s"),
    P("Inter-token latency at the engines (p50, p90)", tuple(
        (_q("vllm:inter_token_latency_seconds", "", q), f"p{int(q * 100)}")
        for q in (0.5, 0.9)), "s"),
    P("Requests refused, retried, routed by fallback", (
        ("sum by (reason) (rate(infermesh_ingress_rejected_total[1m]))", "rejected {{reason}}"),
        ("sum(rate(infermesh_ingress_retries_total[1m]))", "retries"),
        ("sum by (reason) (rate(infermesh_ingress_fallbacks_total[1m]))",
         "fallback {{reason}}"),
    ), "reqps"),
    P("Engines: running and waiting", (
        ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
        ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
    )),
    P("Engines: KV cache usage", (
        ("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),), "percentunit"),
    P("Requests in flight and held (no ready engine)", (
        ("sum(infermesh_ingress_in_flight)", "in flight"),
        ("sum(infermesh_ingress_held)", "held"),
    )),
    P("Routing time at the ingress (p50, p99)", tuple(
        (_q("infermesh_ingress_routing_seconds", "", q), f"p{int(q * 100)}")
        for q in (0.5, 0.99)), "s"),
])

CACHE = dashboard("infermesh-cache", "infermesh / cache",
                  "Prefix-cache hits per engine, the index and its event stream", [
    P("Prefix cache hit rate per engine", ((
        "sum by (instance) (rate(vllm:prefix_cache_hits_total[5m])) / "
        "sum by (instance) (rate(vllm:prefix_cache_queries_total[5m]))", "{{instance}}"),),
        "percentunit"),
    P("Prompt tokens computed and cached", (
        ("sum(rate(vllm:prompt_tokens_total[1m]))", "prompt"),
        ("sum(rate(vllm:prompt_tokens_cached_total[1m]))", "cached"),
    ), "short"),
    P("Index size", (
        ("max by (instance) (infermesh_indexer_keys)", "keys {{instance}}"),
        ("max by (instance) (infermesh_indexer_entries)", "entries {{instance}}"),
    )),
    P("KV events applied per second", (
        ("sum by (instance) (rate(infermesh_indexer_events_total[1m]))", "{{instance}}"),)),
    P("Event stream faults: gaps, snapshots, stale batches", (
        ("sum(rate(infermesh_indexer_gaps_total[5m]))", "gaps"),
        ("sum(rate(infermesh_indexer_snapshots_requested_total[5m]))", "snapshots requested"),
        ("sum(rate(infermesh_indexer_stale_batches_total[5m]))", "stale batches"),
        ("sum(rate(infermesh_agent_seq_gaps_total[5m]))", "agent seq gaps"),
    )),
    P("Index lookups: latency (p50, p99)", tuple(
        (_q("infermesh_indexer_lookup_seconds", "", q), f"p{int(q * 100)}")
        for q in (0.5, 0.99)), "s"),
    P("Pods followed, syncing", (
        ("max(infermesh_indexer_pods)", "pods"),
        ("max(infermesh_indexer_pods_syncing)", "syncing"),
    )),
    P("Agents: blocks held", (
        ("sum by (instance) (infermesh_agent_blocks)", "{{instance}}"),)),
])

SCHEDULER = dashboard("infermesh-scheduler", "infermesh / scheduler",
                      "Decisions, their latency per plugin, where requests go and why not", [
    P("Decisions per second, by profile", (
        ("sum by (profile) (rate(infermesh_scheduler_decisions_total[1m]))", "{{profile}}"),),
        "reqps"),
    P("Decisions per pod", (
        ("sum by (pod) (rate(infermesh_scheduler_decisions_total[1m]))", "{{pod}}"),), "reqps"),
    P("Decision latency p99, by profile", (
        (_q("infermesh_scheduler_decision_seconds", "profile", 0.99), "{{profile}}"),), "s"),
    P("Plugin latency p99", (
        (_q("infermesh_scheduler_plugin_seconds", "plugin, type", 0.99),
         "{{type}} {{plugin}}"),), "s"),
    P("Rejections and ingress fallbacks", (
        ("sum by (reason) (rate(infermesh_scheduler_rejections_total[1m]))",
         "rejected {{reason}}"),
        ("sum by (reason) (rate(infermesh_ingress_fallbacks_total[1m]))",
         "fallback {{reason}}"),
    ), "reqps"),
    P("Index lookups by outcome", (
        ("sum by (outcome) (rate(infermesh_scheduler_index_lookups_total[1m]))",
         "{{outcome}}"),), "reqps"),
    P("Pods known, late; requests in flight", (
        ("max(infermesh_scheduler_pods)", "pods"),
        ("max(infermesh_scheduler_pods_late)", "late"),
        ("max(infermesh_scheduler_inflight)", "in flight"),
    )),
    P("Bus request handling p99, by endpoint", (
        (_q("infermesh_bus_handler_seconds", "service, endpoint", 0.99),
         "{{service}} {{endpoint}}"),), "s"),
])

AUTOSCALER = dashboard("infermesh-autoscaler", "infermesh / autoscaler",
                       "Desired vs ready replicas, what the analyzers saw, held requests", [
    P("Desired, recommended and ready replicas", (
        ("max by (pool) (infermesh_autoscaler_desired_replicas)", "desired {{pool}}"),
        ("max by (pool) (infermesh_autoscaler_recommended_replicas)", "recommended {{pool}}"),
        ("max by (pool) (infermesh_autoscaler_ready_replicas)", "ready {{pool}}"),
    ), description="every replica shows the leader's decision (followers adopt it)"),
    P("Spare KV and spare queue (unsaturated replicas)", (
        ("max by (pool) (infermesh_autoscaler_spare_kv)", "spare KV {{pool}}"),
        ("max by (pool) (infermesh_autoscaler_spare_queue)", "spare queue {{pool}}"),
    )),
    P("Requests held at the ingresses", (
        ("max by (pool) (infermesh_autoscaler_held)", "autoscaler's view {{pool}}"),
        ("sum(infermesh_ingress_held)", "ingresses"),
    )),
    P("Hold time at the ingress (p50, p99)", tuple(
        (_q("infermesh_ingress_hold_seconds", "", q), f"p{int(q * 100)}")
        for q in (0.5, 0.99)), "s"),
    P("SLO window: TTFT and ITL p90", (
        ("max by (pool) (infermesh_autoscaler_ttft_p90_seconds)", "TTFT {{pool}}"),
        ("max by (pool) (infermesh_autoscaler_itl_p90_seconds)", "ITL {{pool}}"),
    ), "s"),
    P("Scale changes and leader", (
        ("sum by (pool, direction) (increase(infermesh_autoscaler_changes_total[5m]))",
         "{{direction}} {{pool}}"),
        ("sum(infermesh_autoscaler_leader)", "leaders"),
        ("sum(rate(infermesh_autoscaler_lease_errors_total[5m]))", "lease errors/s"),
    )),
])

DASHBOARDS = {"fleet": FLEET, "cache": CACHE, "scheduler": SCHEDULER, "autoscaler": AUTOSCALER}


def render(d: Dashboard) -> str:
    """A dashboard's JSON, as committed."""
    return json.dumps(d.to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


def queries() -> dict[str, list[str]]:
    """Every PromQL expression of every dashboard, by dashboard."""
    return {name: [t.expr for panel in d.panels for t in panel.targets]
            for name, d in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE
    for name, d in DASHBOARDS.items():
        (out / f"infermesh-{name}.json").write_text(render(d))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
