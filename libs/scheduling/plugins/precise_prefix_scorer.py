"""Precise prefix-cache scorer: asks the indexer which pods hold the prompt's leading blocks."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from infermesh.libs.bus import BusTimeout, NoResponders, RemoteError
from infermesh.libs.telemetry import get_logger
from infermesh.proto.codec import DecodeError
from infermesh.proto.messages import (
    TIER_CPU,
    TIER_GPU,
    TIER_LOCAL_STORAGE,
    TIER_SHARED,
    LookupRequest,
    RequestEvent,
    ScheduleRequest,
)

from ..framework import CycleState, Handle, Parameters, Pod, Preparer, RequestObserver, Scorer

log = get_logger("scheduler.precise_prefix")

# A block's worth by where it must be loaded from: GPU blocks cost nothing, CPU blocks a copy
# over PCIe (~50 GB/s), storage a read from disk or the network (~1-10 GB/s): still far cheaper
# than recomputing (an 8B model prefills ~30k tokens/s ≈ 4 GB/s of KV at 128 KiB/token, on one
# GPU, while it does nothing else). Shared storage is credited to every pod of the pool alike,
# so its weight only trades it against another pod's GPU or CPU blocks.
DEFAULT_TIER_WEIGHTS = {TIER_GPU: 1.0, TIER_CPU: 0.8, TIER_LOCAL_STORAGE: 0.6, TIER_SHARED: 0.5}


# Recently routed prompts kept for speculative matches, at most.
_MAX_RECENT = 4096


def _shared_blocks(a: Sequence[int], b: Sequence[int]) -> int:
    """Leading blocks two prompts' keys share. Keys chain over the whole prefix, so once they
    differ they differ for good: bisection finds where."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class PrecisePrefixCacheScorer(Scorer, Preparer, RequestObserver):
    """Score = the pod's consecutive matched blocks from the prompt start, each weighted by the
    tier it lives in, over the prompt's blocks.

    The indexer follows every engine's KV events, so this is what the engines hold now, not a
    guess from routing history. An indexer that does not answer (timeout, no responders, an
    error) scores every pod 0 and is counted: routing falls back to the other scorers rather
    than failing the request. The blocks matched per pod are left in the cycle state
    (``cached_blocks``) for the decision.

    **Speculative matches.** An engine's KV events reach the index some milliseconds after the
    request that stored the blocks was routed, so a second request with the same new prefix,
    arriving in between, would find no pod holding it and go elsewhere. For
    ``speculative_s`` after a ``routed`` event (from any replica), the pod it names is credited
    with the blocks that prompt shares with the request (as GPU blocks), when the index knows
    fewer; a routed request that failed is taken back. Counted in
    ``infermesh_scheduler_speculative_matches_total``.

    A pool's shared storage (``SHARED_STORAGE``) counts for every pod of the pool, past the
    pod's own blocks (the indexer answers so): a prefix only storage holds does not pin requests
    to the pod that wrote it.

    Parameters: ``tier_weights`` (tier → weight in [0, 1]; GPU 1.0, CPU 0.8, LOCAL_STORAGE 0.6,
    SHARED_STORAGE 0.5),
    ``timeout_s`` (indexer timeout, 0.05), ``speculative_s`` (2.0; 0: off).

    In a profile with a prefix-affinity filter, the lookup runs before the filters
    (:meth:`prepare`, over every candidate) and :meth:`score` reuses it.
    """

    type_name = "precise-prefix-cache-scorer"

    def __init__(
        self,
        name: str,
        handle: Handle,
        *,
        tier_weights: dict[str, float] | None = None,
        timeout_s: float = 0.05,
        speculative_s: float = 2.0,
    ) -> None:
        super().__init__(name)
        self.speculative_s = speculative_s
        # (when, request id, pod, keys) of recently routed prompts, oldest first.
        self._recent: deque[tuple[float, str, str, Sequence[int]]] = deque()
        self.handle = handle
        self.tier_weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        self.timeout_s = timeout_s
        # Best tier first: the usual match is all GPU, counted in one pass.
        order = {t: i for i, t in enumerate((TIER_GPU, TIER_CPU, TIER_SHARED, TIER_LOCAL_STORAGE))}
        self._weights = sorted(
            ((t, w) for t, w in self.tier_weights.items() if w),
            key=lambda tw: order.get(tw[0], len(order)),
        )
        self._gpu = self.tier_weights.get(TIER_GPU, 1.0)
        self.failures = 0
        outcomes = ("ok", "retried", "timeout", "no_responders", "error")
        self._outcome = {o: handle.metrics.index_lookups.labels(name, o) for o in outcomes}
        self._speculative = handle.metrics.speculative.labels(name)
        self._prepared_key = f"{name}:prepared"

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> PrecisePrefixCacheScorer:
        """Factory for the registry."""
        weights = params.number_map("tier_weights", DEFAULT_TIER_WEIGHTS)
        for tier, w in weights.items():
            if w > 1.0:
                raise params.error("tier_weights", f"has {w} for {tier!r}; weights are <= 1")
        timeout_s = params.number("timeout_s", 0.05, min=0.0, min_exclusive=True, max=10.0)
        speculative_s = params.number("speculative_s", 2.0, min=0.0, max=60.0)
        params.done()
        return cls(name, handle, tier_weights=weights, timeout_s=timeout_s,
                   speculative_s=speculative_s)

    # ------------------------------------------------------------------ speculative matches

    def on_request_event(self, event: RequestEvent) -> None:
        """Keep routed prompts for ``speculative_s``; drop a request's when it failed."""
        if not self.speculative_s:
            return
        recent = self._recent
        if event.kind == "routed":
            if event.block_keys and event.pod:
                recent.append((time.monotonic(), event.request_id, event.pod,
                               event.block_keys))
                if len(recent) > _MAX_RECENT:
                    recent.popleft()
        elif event.kind == "finished" and event.status != "ok" and recent:
            kept = [r for r in recent if not (r[1] == event.request_id and r[2] == event.pod)]
            if len(kept) != len(recent):
                self._recent = deque(kept)

    def on_pod_removed(self, pod: str) -> None:
        """A pod that left holds nothing."""
        if self._recent:
            self._recent = deque(r for r in self._recent if r[2] != pod)

    def _speculate(self, keys: Sequence[int], pods: list[Pod], cached: dict[str, int],
                   out: dict[str, float]) -> None:
        """Credit pods with the blocks recently routed prompts share with ``keys``."""
        recent = self._recent
        cutoff = time.monotonic() - self.speculative_s
        while recent and recent[0][0] < cutoff:
            recent.popleft()
        if not recent:
            return
        names = {p.name for p in pods}
        best: dict[str, int] = {}
        first = keys[0]
        for _, _, pod, other in recent:
            if pod in names and other and other[0] == first:
                n = _shared_blocks(keys, other)
                if n > best.get(pod, 0):
                    best[pod] = n
        total = len(keys)
        for pod, n in best.items():
            if n > cached.get(pod, 0):
                cached[pod] = n
                out[pod] = max(out.get(pod, 0.0), n * self._gpu / total)
                self._speculative.inc()

    def _failed(self, outcome: str, error: Exception) -> dict[str, float]:
        self.failures += 1
        self._outcome[outcome].inc()
        log.debug("index_lookup_failed", plugin=self.name, outcome=outcome, error=str(error))
        return {}

    async def prepare(self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]) -> None:
        """Look up before the filters: ``cycle.cached_blocks`` for every candidate, and the
        scores kept for :meth:`score`."""
        out = await self._match(request, cycle, pods)
        cycle.data[self._prepared_key] = ({p.name for p in pods}, out)

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Weighted matched blocks / prompt blocks, per pod."""
        prepared = cycle.data.pop(self._prepared_key, None)
        if prepared is not None and all(p.name in prepared[0] for p in pods):
            return prepared[1]
        return await self._match(request, cycle, pods)

    async def _match(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Ask the index; leave the blocks per pod in ``cycle.cached_blocks``; the scores."""
        keys = request.block_keys
        if not keys:
            cycle.cached_blocks = {}
            return {}
        lookup = self.handle.index_lookup
        if lookup is None:
            return self._failed("error", RuntimeError("no indexer client"))
        msg = LookupRequest(model=request.model, block_keys=keys, pods=[p.name for p in pods])
        try:
            try:
                reply = await lookup(msg, self.timeout_s)
            except BusTimeout:
                # The indexer replica that took it may have died: the queue group hands the
                # second try to another replica.
                self._outcome["retried"].inc()
                reply = await lookup(msg, self.timeout_s)
        except BusTimeout as e:
            return self._failed("timeout", e)
        except NoResponders as e:
            return self._failed("no_responders", e)
        except (RemoteError, DecodeError, OSError) as e:
            return self._failed("error", e)
        except Exception as e:  # noqa: BLE001 - a broken indexer must not fail the request
            return self._failed("error", e)
        self._outcome["ok"].inc()
        total = len(keys)
        weights = self._weights
        gpu = self._gpu
        cached: dict[str, int] = {}
        out: dict[str, float] = {}
        for m in reply.matches:
            blocks = min(m.blocks, total)
            if blocks <= 0:
                continue
            tiers = m.tiers
            if len(tiers) > blocks:
                tiers = tiers[:blocks]
            # Blocks without a tier are taken as GPU-resident (the indexer's default tier);
            # a tier this scorer has no weight for counts 0. list.count runs in C, and most
            # matches are all GPU: stop counting once every block is accounted for.
            weighted = (blocks - len(tiers)) * gpu
            left = len(tiers)
            for tier, w in weights:
                if not left:
                    break
                n = tiers.count(tier)
                weighted += n * w
                left -= n
            cached[m.pod] = blocks
            out[m.pod] = weighted / total
        if self.speculative_s:
            self._speculate(keys, pods, cached, out)
        cycle.cached_blocks = cached
        return out
