"""One scheduling cycle: the profile handler chooses profiles, each runs, one result answers."""

from __future__ import annotations

import heapq
import time
from typing import Any

from opentelemetry import trace

from infermesh.proto.messages import ROUTED_SCORES_MAX, ScheduleDecision, ScheduleRequest

from .config import TOTAL_SCORES
from .framework import CycleState, NoCandidates, Pipeline, Plugin, Pod, ProfileResult
from .metrics import SchedulerMetrics


def total_scores(decision: ScheduleDecision, most: int = ROUTED_SCORES_MAX) -> dict[str, float]:
    """The weighted total per candidate pod of a decision, the ``most`` best only (what a
    ``routed`` request event carries for people watching)."""
    totals = decision.scores.get(TOTAL_SCORES)
    if not totals:
        return {}
    if len(totals) <= most:
        return dict(totals)
    return dict(heapq.nlargest(most, totals.items(), key=lambda kv: kv[1]))


class UnknownProfile(KeyError):
    """A request named a profile the pipeline does not have."""


class Scheduler:
    """Runs a :class:`Pipeline` for one request and its candidate pods; times every plugin."""

    def __init__(self, pipeline: Pipeline, metrics: SchedulerMetrics) -> None:
        self.pipeline = pipeline
        self.metrics = metrics
        self._plugin_hist: dict[int, Any] = {}
        self._decision_hist: dict[str, Any] = {}

    def profile_name(self, request: ScheduleRequest) -> str:
        """The profile a request asks for (the default when it names none)."""
        name = request.profile or self.pipeline.default_profile
        if name not in self.pipeline.profiles:
            raise UnknownProfile(name)
        return name

    def _time(self, plugin: Plugin, seconds: float) -> None:
        h = self._plugin_hist.get(id(plugin))
        if h is None:
            h = self._plugin_hist[id(plugin)] = self.metrics.plugin_seconds.labels(
                plugin.name, plugin.type_name
            )
        h.observe(seconds)

    async def schedule(self, request: ScheduleRequest, pods: list[Pod]) -> ScheduleDecision:
        """Choose a pod among ``pods`` (not empty); raises ``NoCandidates`` or
        :class:`UnknownProfile`."""
        t0 = time.perf_counter()
        name = self.profile_name(request)
        p = self.pipeline
        cycle = CycleState()
        results: dict[str, ProfileResult] = {}
        # A handler may run profiles in rounds (prefill, then decode); bound the rounds so a
        # handler that never stops cannot hang the request.
        for _ in range(len(p.profiles) + 1):
            todo = p.handler.pick_profiles(request, p.profiles, p.default_profile, results,
                                           cycle)
            if not todo:
                break
            for prof in todo:
                try:
                    results[prof.name] = await prof.run(request, cycle, pods, self._time)
                except NoCandidates:
                    if not results or not p.handler.optional(prof.name):
                        raise
                    cycle.data.setdefault("skipped_profiles", []).append(prof.name)
        result = p.handler.primary(request, results)
        prefill = p.handler.prefill(request, results)
        verdict = cycle.data.get("pd")
        if verdict is not None:
            if verdict == "disaggregated" and prefill is None:
                verdict = "no_prefill_engine"
            self.metrics.pd_decisions.labels(verdict).inc()
        pod = result.pod
        scores = dict(result.scores)
        if scores:
            scores[TOTAL_SCORES] = result.totals
        cached = cycle.cached_blocks.get(pod.name, 0) if cycle.cached_blocks else 0
        h = self._decision_hist.get(name)
        if h is None:
            h = self._decision_hist[name] = self.metrics.decision_seconds.labels(name)
        h.observe(time.perf_counter() - t0)
        span = trace.get_current_span()
        if span.is_recording():  # (the bus handler's span, when tracing is on)
            span.set_attributes({"infermesh.profile": result.profile,
                                 "infermesh.pod": pod.name,
                                 "infermesh.cached_blocks": cached,
                                 "infermesh.num_tokens": request.num_tokens,
                                 "infermesh.candidates": len(pods),
                                 "infermesh.prefill_pod": prefill.pod.name if prefill else ""})
        return ScheduleDecision(
            request_id=request.request_id,
            pod=pod.name,
            url=pod.url,
            profile=result.profile,
            scores=scores,
            cached_blocks=cached,
            num_tokens=request.num_tokens,
            tokens_partial=request.tokens_partial,
            prefill_pod=prefill.pod.name if prefill is not None else "",
            prefill_url=prefill.pod.url if prefill is not None else "",
            prefill_profile=prefill.profile if prefill is not None else "",
        )
