"""Prefix-affinity filter: keeps a request on the pods holding most of its prompt, until they are
saturated ("sticky until saturated")."""

from __future__ import annotations

from infermesh.proto.messages import ScheduleRequest

from ..framework import CycleState, Filter, Handle, Parameters, Pod


class PrefixAffinityFilter(Filter):
    """Keeps only the pods with the longest cached prefix of the prompt, when that prefix is at
    least ``affinity_threshold`` of the prompt's blocks, and as long as such a pod's uncached
    in-flight tokens exceed the least loaded candidate's by at most ``margin_tokens``. A warm pod
    further ahead than that is released; when every warm pod is, all candidates stay (the scorers
    choose among them, a token-load scorer sending the request to the coldest).

    The blocks per pod come from the precise prefix scorer of the same profile, which looks up
    before the filters run because this filter asks for it (``needs_prepared``; the config
    refuses a profile with this filter and no precise prefix scorer). No lookup answer (no block
    keys, the indexer failed): every candidate stays. Counted in
    ``infermesh_scheduler_prefix_affinity{plugin,outcome}`` (sticky, released, none).

    The load compared is what the pods owe for requests already routed, not this request's
    own prefill: the question is whether the warm pod is saturated, not where this prompt is
    cheapest (the scorers weigh that).

    Parameters: ``affinity_threshold`` (fraction of the prompt's blocks, in (0, 1], 0.5),
    ``margin_tokens`` (uncached tokens, ≥ 0, 8192). Neither is measured yet.
    """

    type_name = "prefix-affinity-filter"
    needs_prepared = True

    def __init__(self, name: str, handle: Handle, *, affinity_threshold: float = 0.5,
                 margin_tokens: int = 8192) -> None:
        super().__init__(name)
        self.affinity_threshold = affinity_threshold
        self.margin_tokens = margin_tokens
        self._outcome = {o: handle.metrics.affinity.labels(name, o)
                         for o in ("sticky", "released", "none")}

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> PrefixAffinityFilter:
        """Factory for the registry."""
        threshold = params.number("affinity_threshold", 0.5, min=0.0, min_exclusive=True,
                                  max=1.0)
        margin = params.integer("margin_tokens", 8192, min=0)
        params.done()
        return cls(name, handle, affinity_threshold=threshold, margin_tokens=margin)

    def filter(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> list[Pod]:
        """The warm pods that are not saturated; every pod when none qualifies."""
        cached = cycle.cached_blocks
        total = len(request.block_keys)
        if not cached or not total or len(pods) < 2:
            self._outcome["none"].inc()
            return pods
        best = max(cached.get(p.name, 0) for p in pods)
        if best <= 0 or best < self.affinity_threshold * total:
            self._outcome["none"].inc()
            return pods
        coldest = min(p.uncached_inflight for p in pods)
        limit = coldest + self.margin_tokens
        warm = [p for p in pods
                if cached.get(p.name, 0) == best and p.uncached_inflight <= limit]
        if not warm:
            self._outcome["released"].inc()
            return pods
        self._outcome["sticky"].inc()
        return warm
