"""Precise prefix-cache scorer: asks the indexer which pods hold the prompt's leading blocks."""

from __future__ import annotations

from infermesh.libs.bus import BusTimeout, NoResponders, RemoteError
from infermesh.libs.telemetry import get_logger
from infermesh.proto.codec import DecodeError
from infermesh.proto.messages import (
    TIER_CPU,
    TIER_GPU,
    TIER_SHARED,
    LookupRequest,
    ScheduleRequest,
)

from ..framework import CycleState, Handle, Parameters, Pod, Scorer

log = get_logger("scheduler.precise_prefix")

DEFAULT_TIER_WEIGHTS = {TIER_GPU: 1.0, TIER_CPU: 0.8, TIER_SHARED: 0.5}


class PrecisePrefixCacheScorer(Scorer):
    """Score = the pod's consecutive matched blocks from the prompt start, each weighted by the
    tier it lives in, over the prompt's blocks.

    The indexer follows every engine's KV events, so this is what the engines hold now, not a
    guess from routing history. An indexer that does not answer (timeout, no responders, an
    error) scores every pod 0 and is counted: routing falls back to the other scorers rather
    than failing the request. The blocks matched per pod are left in the cycle state
    (``cached_blocks``) for the decision.

    Parameters: ``tier_weights`` (tier → weight in [0, 1]; GPU 1.0, CPU 0.8, SHARED_STORAGE 0.5),
    ``timeout_s`` (indexer timeout, 0.05).
    """

    type_name = "precise-prefix-cache-scorer"

    def __init__(
        self,
        name: str,
        handle: Handle,
        *,
        tier_weights: dict[str, float] | None = None,
        timeout_s: float = 0.05,
    ) -> None:
        super().__init__(name)
        self.handle = handle
        self.tier_weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        self.timeout_s = timeout_s
        # Best tier first: the usual match is all GPU, counted in one pass.
        order = {t: i for i, t in enumerate((TIER_GPU, TIER_CPU, TIER_SHARED))}
        self._weights = sorted(
            ((t, w) for t, w in self.tier_weights.items() if w),
            key=lambda tw: order.get(tw[0], len(order)),
        )
        self._gpu = self.tier_weights.get(TIER_GPU, 1.0)
        self.failures = 0
        outcomes = ("ok", "retried", "timeout", "no_responders", "error")
        self._outcome = {o: handle.metrics.index_lookups.labels(name, o) for o in outcomes}

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> PrecisePrefixCacheScorer:
        """Factory for the registry."""
        weights = params.number_map("tier_weights", DEFAULT_TIER_WEIGHTS)
        for tier, w in weights.items():
            if w > 1.0:
                raise params.error("tier_weights", f"has {w} for {tier!r}; weights are <= 1")
        timeout_s = params.number("timeout_s", 0.05, min=0.0, min_exclusive=True, max=10.0)
        params.done()
        return cls(name, handle, tier_weights=weights, timeout_s=timeout_s)

    def _failed(self, outcome: str, error: Exception) -> dict[str, float]:
        self.failures += 1
        self._outcome[outcome].inc()
        log.debug("index_lookup_failed", plugin=self.name, outcome=outcome, error=str(error))
        return {}

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Weighted matched blocks / prompt blocks, per pod."""
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
        cycle.cached_blocks = cached
        return out
