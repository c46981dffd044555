"""Approximate prefix-cache scorer: guesses cache contents from where prompts were routed."""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat

from infermesh.proto.messages import RequestEvent, ScheduleRequest

from ..framework import CycleState, Handle, Parameters, Pod, RequestObserver, Scorer


class _PodHistory:
    """One pod's remembered blocks: key → tick of its last use; the recorded prompts in order."""

    __slots__ = ("last_use", "prompts", "queued")

    def __init__(self) -> None:
        self.last_use: dict[int, int] = {}
        self.prompts: deque[tuple[int, list[int]]] = deque()
        self.queued = 0  # keys held in ``prompts``


class ApproxPrefixCacheScorer(Scorer, RequestObserver):
    """Score = the longest run of the prompt's leading blocks recently routed to the pod, over
    the prompt's blocks (at most ``max_prefix_blocks``).

    It learns from ``routed`` request events (every replica's, so all replicas keep the same
    history) and from this replica's own decisions, before the event comes back. Each pod's
    history is bounded by ``lru_capacity_per_pod`` blocks, least recently routed out first: a
    rough model of the engine's cache, which evicts too.

    Block keys are chained (a key names its whole prefix), and a pod's history is evicted a
    whole prompt at a time, oldest first; so the blocks a pod holds of a prompt are always a
    leading run, and its length is found by binary search.

    Parameters: ``lru_capacity_per_pod`` (blocks, 31250), ``max_prefix_blocks`` (blocks of a
    prompt matched and recorded, 1024).
    """

    type_name = "approx-prefix-cache-scorer"

    # Routed events this replica already recorded (its own decisions), by request id.
    _RECENT = 4096

    def __init__(
        self, name: str, *, lru_capacity_per_pod: int = 31250, max_prefix_blocks: int = 1024
    ) -> None:
        super().__init__(name)
        self.capacity = lru_capacity_per_pod
        self.max_blocks = max_prefix_blocks
        self._pods: dict[str, _PodHistory] = {}
        self._recorded: OrderedDict[str, str] = OrderedDict()
        self._tick = 0

    @classmethod
    def create(cls, name: str, params: Parameters, handle: Handle) -> ApproxPrefixCacheScorer:
        """Factory for the registry."""
        cap = params.integer("lru_capacity_per_pod", 31250, min=1)
        max_blocks = params.integer("max_prefix_blocks", 1024, min=1)
        params.done()
        return cls(name, lru_capacity_per_pod=cap, max_prefix_blocks=max_blocks)

    # ------------------------------------------------------------------ history

    def record(self, pod: str, keys: list[int]) -> None:
        """Remember that ``pod`` was sent a prompt starting with ``keys``.

        This runs for every request of the pool, so the per-key work is one bulk dict update
        in C; the LRU order is kept per prompt, since a prompt's keys are used together.
        """
        keys = keys[: self.max_blocks]
        if not keys:
            return
        h = self._pods.get(pod)
        if h is None:
            h = self._pods[pod] = _PodHistory()
        self._tick += 1
        tick = self._tick
        last_use = h.last_use
        last_use.update(zip(keys, repeat(tick)))
        h.prompts.append((tick, keys))
        h.queued += len(keys)
        # Evict whole prompts, oldest first; a key used again since stays (its tick is newer).
        # The queue is bounded too, or a prompt sent over and over would grow it forever.
        cap = self.capacity
        while len(h.prompts) > 1 and (len(last_use) > cap or h.queued > 2 * cap):
            old_tick, old_keys = h.prompts.popleft()
            h.queued -= len(old_keys)
            for k in old_keys:
                if last_use.get(k) == old_tick:
                    del last_use[k]

    def on_request_event(self, event: RequestEvent) -> None:
        """Record routed prompts; a request recorded once (same pod) is not recorded again."""
        if event.kind != "routed" or not event.block_keys or not event.pod:
            return
        if self._recorded.get(event.request_id) == event.pod:
            return
        self._recorded[event.request_id] = event.pod
        self._recorded.move_to_end(event.request_id)
        if len(self._recorded) > self._RECENT:
            self._recorded.popitem(last=False)
        self.record(event.pod, event.block_keys)

    def on_pod_removed(self, pod: str) -> None:
        """Forget a pod's history: an engine that comes back starts cold."""
        self._pods.pop(pod, None)

    def blocks_of(self, pod: str) -> int:
        """Blocks remembered for ``pod``."""
        h = self._pods.get(pod)
        return len(h.last_use) if h else 0

    # ------------------------------------------------------------------ scoring

    async def score(
        self, request: ScheduleRequest, cycle: CycleState, pods: list[Pod]
    ) -> dict[str, float]:
        """Matched leading blocks / prompt blocks (capped at ``max_prefix_blocks``), per pod."""
        keys = request.block_keys[: self.max_blocks]
        n = len(keys)
        if not n:
            return {}
        first = keys[0]
        out: dict[str, float] = {}
        for p in pods:
            h = self._pods.get(p.name)
            if h is None:
                continue
            held = h.last_use
            if first not in held:
                continue
            # The held blocks are a leading run: find its end (keys[lo] held, keys[hi] not).
            lo, hi = 0, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if keys[mid] in held:
                    lo = mid
                else:
                    hi = mid
            out[p.name] = hi / n
        return out
