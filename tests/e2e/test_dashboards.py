"""Every metric a Grafana dashboard (deploy/grafana/) queries exists on some process's /metrics
of a running system — the ingress, tokenizer, indexer, scheduler, autoscaler, agents and the
(vLLM-compatible) engines — and every label it groups or names a legend by is one of that
metric's labels (or one Prometheus adds when it scrapes). A dashboard cannot drift from the
code silently."""

from __future__ import annotations

import json
import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ..unit.test_dashboards import load_dashboards

MODEL = "infermesh/tiny-llama"
SCRAPE_LABELS = {"instance", "job", "pod", "namespace", "le"}
_METRIC = re.compile(r"(?<![\w:])((?:infermesh_|vllm:)[a-z0-9_:]+)")
_BY = re.compile(r"\bby \(([^)]*)\)")
_LEGEND = re.compile(r"\{\{(\w+)\}\}")


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _scrape(urls: list[str]) -> dict[str, set[str]]:
    """metric family → label names seen on it, over every endpoint."""
    out: dict[str, set[str]] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            labels = out.setdefault(_family(fam.name), set())
            for s in fam.samples:
                labels.update(s.labels)
    return out


def _declared() -> dict[str, set[str]]:
    """metric → label names as the services declare them (a labelled counter nothing has
    counted yet shows no sample on /metrics, so no labels to read there)."""
    from prometheus_client.metrics import MetricWrapperBase

    from infermesh.libs.scheduling.metrics import SchedulerMetrics
    from infermesh.libs.tokenization.metrics import TokenizerMetrics
    from infermesh.services.agent.metrics import AgentMetrics
    from infermesh.services.autoscaler.metrics import AutoscalerMetrics
    from infermesh.services.ingress.metrics import IngressMetrics

    out: dict[str, set[str]] = {}
    for m in (SchedulerMetrics(), TokenizerMetrics(), AgentMetrics(), AutoscalerMetrics(),
              IngressMetrics()):
        for v in vars(m).values():
            for w in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(w, MetricWrapperBase):
                    out[_family(w._name)] = set(w._labelnames)  # noqa: SLF001
    return out


def test_every_queried_metric_and_label_exists(stack_factory) -> None:
    stack = stack_factory(engines=1, time_scale=0.02, autoscale=True,
                          settings={"autoscaler": {"max_replicas": 1, "interval_s": 0.2,
                                                   "warmup_s": 0.2}})
    # A few requests, so that the labelled series have samples.
    for i in range(3):
        req = urllib.request.Request(
            stack.ingress_url + "/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": MODEL, "prompt": f"dash {i}", "max_tokens": 3}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
    plan = stack.system.plan
    urls = [url for p in plan.processes if not p.parked
            for url in p.links.values() if url.endswith("/metrics")]
    urls += [url + "/metrics" for p in plan.processes if p.kind == "sim" and not p.parked
             for url in p.links.values()]
    seen = _scrape(urls)
    for name, labels in _declared().items():
        if name in seen:  # (declared and exposed: its labels count even without samples)
            seen[name] |= labels
    assert any(f.startswith("vllm:") for f in seen) and "infermesh_autoscaler_desired_replicas" \
        in seen
    problems = []
    mod = load_dashboards()
    for dash, exprs in mod.queries().items():
        legends = {t.legendFormat for panel in mod.DASHBOARDS[dash].panels
                   for t in panel.targets}
        used_labels = {m for legend in legends for m in _LEGEND.findall(legend)}
        for expr in exprs:
            names = {_family(n) for n in _METRIC.findall(expr)}
            assert names, expr
            missing = sorted(n for n in names if n not in seen)
            if missing:
                problems.append(f"{dash}: {expr}: no such metric {missing}")
                continue
            have = set().union(*(seen[n] for n in names)) | SCRAPE_LABELS
            by = {x.strip() for g in _BY.findall(expr) for x in g.split(",") if x.strip()}
            if by - have:
                problems.append(f"{dash}: {expr}: labels {sorted(by - have)} not on {names}")
        all_labels = set().union(*seen.values()) | SCRAPE_LABELS
        if used_labels - all_labels:
            problems.append(f"{dash}: legends name {sorted(used_labels - all_labels)}")
    assert not problems, "\n".join(problems)
