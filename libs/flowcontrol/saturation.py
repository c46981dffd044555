"""The saturation detector: is there room in a pool for one more request?

A pod is *saturated* when any of its signals is over its threshold:

- ``waiting``: requests the engine itself queues (its heartbeat's ``vllm:num_requests_waiting``,
  plus the requests sent to it since that heartbeat while it was queueing already);
- ``kv_usage``: the fraction of its KV cache in use by running requests (heartbeat);
- ``uncached_tokens``: prompt tokens routed to it whose prefill has not ended (request events,
  every router's, as they happen): the prefill a new request would queue behind;
- ``requests``: requests in flight on it (request events).

A threshold of 0 turns its signal off. A pool is saturated when every ready pod that could
serve the request is; a pool with no ready pod is saturated too (the activator's case: the
wait for an engine to start). Heartbeats come up to a scrape period late, which is why the
fast signals (in-flight tokens and requests, counted from request events) are there: they see
a burst the moment it is routed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a pod counts as saturated (0: that signal is off)."""

    waiting: int = 5
    kv_usage: float = 0.8
    uncached_tokens: int = 0
    requests: int = 0

    def __post_init__(self) -> None:
        if self.waiting < 0 or self.uncached_tokens < 0 or self.requests < 0:
            raise ValueError("saturation thresholds must be >= 0")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError("the KV usage threshold is a fraction in [0, 1] (0: off)")


@dataclass(slots=True)
class PodLoad:
    """What the router knows of one pod's load."""

    pod: str
    waiting: int = 0
    kv_usage: float = 0.0
    uncached_tokens: int = 0
    requests: int = 0


def pod_saturated(load: PodLoad, t: Thresholds) -> str | None:
    """The first signal over its threshold (``waiting``, ``kv_usage``, ``uncached_tokens``,
    ``requests``), or None when the pod has room."""
    if t.waiting and load.waiting >= t.waiting:
        return "waiting"
    if t.kv_usage and load.kv_usage >= t.kv_usage:
        return "kv_usage"
    if t.uncached_tokens and load.uncached_tokens >= t.uncached_tokens:
        return "uncached_tokens"
    if t.requests and load.requests >= t.requests:
        return "requests"
    return None


def pool_saturated(loads: list[PodLoad], t: Thresholds) -> str | None:
    """Why the pool has no room — ``no_engine``, or the signal that saturates most of its
    pods — or None when a pod has room."""
    if not loads:
        return "no_engine"
    reasons: dict[str, int] = {}
    for load in loads:
        why = pod_saturated(load, t)
        if why is None:
            return None
        reasons[why] = reasons.get(why, 0) + 1
    return max(reasons, key=lambda r: reasons[r])
