"""What the console knows of the fleet, from bus messages only (no I/O here).

:class:`FleetView` takes heartbeats, request events and scale messages as they arrive and
answers :meth:`FleetView.snapshot`, a JSON-ready dict the page renders. Everything it holds is
bounded: pods leave by the shared liveness rule (``libs/liveness``), the decisions and the
history are rings, and each pod remembers a few prefixes.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infermesh.libs import liveness
from infermesh.proto.messages import PodState, RequestEvent, ScaleDecision, ScaleDemand

# Prefixes remembered per pod (the most recently routed), and shown of them.
PREFIXES_KEPT = 8
PREFIXES_SHOWN = 4
# The rates in the totals are over this many last seconds.
RECENT_S = 10


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that puts ``sim-2`` before ``sim-10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def finite(x: float | None) -> float | None:
    """``x``, or None when it is not a finite number (a message may say anything; the page
    and JSON want numbers)."""
    return x if x is not None and math.isfinite(x) else None


def prefix_id(block_key: int) -> str:
    """A short name for the prefix that starts with this block key (the page's chips)."""
    return f"{block_key & 0xFFFFFF:06x}"


@dataclass
class _Prefix:
    requests: int = 0
    cached_blocks: int = 0  # the most the scheduler counted as held, over those requests


@dataclass
class _Pod:
    state: PodState
    seen: float  # on this process's clock
    since: float  # start of its unbroken run of heartbeats (liveness.since)
    routed: int = 0
    prefixes: OrderedDict[str, _Prefix] = field(default_factory=OrderedDict)


@dataclass
class _Second:
    """One second of one pool's history."""

    queries: int = 0  # prefix-cache lookups, in tokens (the engines' counters)
    hits: int = 0
    routed: int = 0
    finished: int = 0
    failed: int = 0


class FleetView:
    """The fleet as the console shows it."""

    def __init__(self, *, pod_timeout_s: float = liveness.DEFAULT_DEAD_S,
                 pod_late_s: float = liveness.DEFAULT_LATE_S, decisions: int = 50,
                 history_s: int = 120, demand_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.pod_timeout_s = pod_timeout_s
        self.pod_late_s = min(pod_late_s, pod_timeout_s)
        self.history_s = history_s
        self.demand_timeout_s = demand_timeout_s
        self.clock = clock
        self.wall = wall
        self.pods: dict[str, _Pod] = {}
        self.decisions: deque[dict[str, Any]] = deque(maxlen=decisions)
        self._by_request: dict[str, dict[str, Any]] = {}  # the latest row of each request kept
        self.history: dict[str, dict[int, _Second]] = {}  # pool → wall second → counters
        self.scale: dict[str, tuple[float, ScaleDecision]] = {}  # pool → (heard, latest)
        self.demand: dict[str, dict[str, tuple[float, ScaleDemand]]] = {}  # pool → replica → …
        self.counts = {"routed": 0, "finished": 0, "failed": 0}
        self.version = 0  # bumped by every change; the pusher sends only when it moved

    # ------------------------------------------------------------------ messages in

    def on_pod_state(self, st: PodState) -> None:
        """One heartbeat."""
        now = self.clock()
        p = self.pods.get(st.pod)
        if p is None or p.state.pool != st.pool:
            self.pods[st.pod] = _Pod(st, now, now)
        else:
            dq = st.prefix_cache_queries - p.state.prefix_cache_queries
            dh = st.prefix_cache_hits - p.state.prefix_cache_hits
            if dq < 0 or dh < 0:  # the engine restarted: its counters started over
                dq, dh = st.prefix_cache_queries, st.prefix_cache_hits
            if dq or dh:
                sec = self._second(st.pool)
                sec.queries += dq
                sec.hits += dh
            p.since = liveness.since(p.seen, p.since, now, self.pod_late_s)
            p.seen, p.state = now, st
        self.version += 1

    def on_request_event(self, ev: RequestEvent) -> None:
        """One step of a request: a new decision row, or the outcome of one."""
        sec = self._second(ev.pool)
        if ev.kind == "routed":
            sec.routed += 1
            self.counts["routed"] += 1
            self._routed(ev)
        elif ev.kind == "first_token":
            row = self._by_request.get(ev.request_id)
            if row is not None and row["pod"] == ev.pod and finite(ev.ttft_s) is not None:
                row["ttft_s"] = ev.ttft_s
        else:
            ok = ev.status == "ok"
            sec.finished += 1
            self.counts["finished"] += 1
            if not ok:
                sec.failed += 1
                self.counts["failed"] += 1
            row = self._by_request.get(ev.request_id)
            if row is not None and row["pod"] == ev.pod:
                row["status"] = ev.status
                row["output_tokens"] = ev.output_tokens
                row["cached_tokens"] = ev.cached_tokens
                if row["ttft_s"] is None and finite(ev.ttft_s) is not None and ok:
                    row["ttft_s"] = ev.ttft_s  # not streamed: the whole answer's time
        self.version += 1

    def _routed(self, ev: RequestEvent) -> None:
        prefix = prefix_id(ev.block_keys[0]) if ev.block_keys else ""
        row = {
            "ts": finite(ev.ts) or 0.0, "request_id": ev.request_id, "pool": ev.pool, "pod": ev.pod,
            "model": ev.model, "replica": ev.replica, "profile": ev.profile,
            "num_tokens": ev.num_tokens, "cached_blocks": ev.cached_blocks,
            "scores": sorted(([pod, float(s)] for pod, s in ev.scores.items()
                              if finite(s) is not None), key=lambda ps: -ps[1]),
            "prefix": prefix, "ttft_s": None, "status": "", "output_tokens": 0,
            "cached_tokens": 0, "held_s": finite(ev.held_s),
        }
        if len(self.decisions) == self.decisions.maxlen:
            old = self.decisions[0]
            if self._by_request.get(old["request_id"]) is old:
                del self._by_request[old["request_id"]]
        self.decisions.append(row)
        self._by_request[ev.request_id] = row
        p = self.pods.get(ev.pod)
        if p is not None:
            p.routed += 1
            if prefix:
                seen = p.prefixes.pop(prefix, None) or _Prefix()
                seen.requests += 1
                seen.cached_blocks = max(seen.cached_blocks, ev.cached_blocks)
                p.prefixes[prefix] = seen  # the most recent last
                while len(p.prefixes) > PREFIXES_KEPT:
                    p.prefixes.popitem(last=False)

    def on_scale_decision(self, d: ScaleDecision) -> None:
        """The autoscaler's decision for a pool (the latest one counts)."""
        self.scale[d.pool] = (self.clock(), d)
        self.version += 1

    def on_scale_demand(self, d: ScaleDemand) -> None:
        """An ingress's demand for a pool (requests it holds for a ready engine)."""
        self.demand.setdefault(d.pool, {})[d.replica] = (self.clock(), d)
        self.version += 1

    def _second(self, pool: str) -> _Second:
        now = int(self.wall())
        h = self.history.get(pool)
        if h is None:
            h = self.history[pool] = {}
        sec = h.get(now)
        if sec is None:
            sec = h[now] = _Second()
            for t in [t for t in h if t <= now - self.history_s]:
                del h[t]
        return sec

    # ------------------------------------------------------------------ time passing

    def prune(self) -> list[str]:
        """Drop the pods that are gone; return their names. A pod goes when silent for
        ``pod_timeout_s`` while another pod of its pool kept speaking (``libs/liveness``), or
        when silent that long after saying it is not ready (drained, stopped)."""
        now = self.clock()
        by_pool: dict[str, dict[str, tuple[float, float]]] = {}
        for name, p in self.pods.items():
            by_pool.setdefault(p.state.pool, {})[name] = (p.seen, p.since)
        gone = [name for heard in by_pool.values()
                for name in liveness.dead(heard, now, self.pod_late_s, self.pod_timeout_s)]
        gone += [name for name, p in self.pods.items() if not p.state.ready
                 and now - p.seen > self.pod_timeout_s and name not in gone]
        for name in gone:
            del self.pods[name]
        for pool, replicas in list(self.demand.items()):
            for r in [r for r, (t, _) in replicas.items() if now - t > self.demand_timeout_s]:
                del replicas[r]
            if not replicas:
                del self.demand[pool]
        # A pool no longer heard of leaves with its history (its autoscaler, if any, says
        # something every interval_s).
        for pool in [k for k, (t, _) in self.scale.items() if now - t > self.history_s]:
            del self.scale[pool]
        oldest = int(self.wall()) - self.history_s
        for pool, h in list(self.history.items()):
            for t in [t for t in h if t <= oldest]:
                del h[t]
            if not h:
                del self.history[pool]
        if gone:
            self.version += 1
        return gone

    # ------------------------------------------------------------------ what the page gets

    def snapshot(self, pool: str | None = None, decisions: int | None = None
                 ) -> dict[str, Any]:
        """Everything the page shows, as plain JSON-ready data; ``pool``: that pool only;
        ``decisions``: the latest that many routing decisions (default: all kept)."""
        now, wall = self.clock(), self.wall()
        pods = sorted((p for p in self.pods.values() if pool in (None, p.state.pool)),
                      key=lambda p: (natural_key(p.state.pool), natural_key(p.state.pod)))
        rows = [r for r in self.decisions if pool in (None, r["pool"])]
        if decisions is not None:
            rows = rows[len(rows) - decisions:] if decisions else []
        pools = sorted({p.state.pool for p in self.pods.values()} | set(self.scale)
                       | set(self.history) | set(self.demand), key=natural_key)
        series = self._series(pool, int(wall))
        recent = series[-RECENT_S:]
        q = sum(s["queries"] for s in recent)
        return {
            "now": wall,
            "version": self.version,
            "pool": pool,
            "pools": pools,
            "pods": [self._pod(p, now) for p in pods],
            "decisions": rows[::-1],  # the latest first
            "series": series,
            "autoscaler": {name: self._pool_scale(name, now) for name in pools
                           if pool in (None, name) and (name in self.scale
                                                        or self.demand.get(name))},
            "totals": {
                "pods": len(pods),
                "ready": sum(1 for p in pods if p.state.ready),
                "running": sum(p.state.running for p in pods),
                "waiting": sum(p.state.waiting for p in pods),
                "routed_per_s": sum(s["routed"] for s in recent) / RECENT_S,
                "hit_rate": sum(s["hits"] for s in recent) / q if q else None,
                **self.counts,
            },
        }

    def _pod(self, p: _Pod, now: float) -> dict[str, Any]:
        st = p.state
        silent = now - p.seen
        kv = min(1.0, max(0.0, finite(st.kv_usage) or 0.0))
        return {
            "pod": st.pod, "pool": st.pool, "model": st.model, "url": st.url, "role": st.role,
            "ready": st.ready, "late": silent > self.pod_late_s, "silent_s": silent,
            "running": st.running, "waiting": st.waiting, "kv_usage": kv,
            "block_size": st.block_size, "num_gpu_blocks": st.num_gpu_blocks,
            "blocks_used": round(kv * st.num_gpu_blocks),
            "num_cpu_blocks": st.num_cpu_blocks,
            "prefix_cache_queries": st.prefix_cache_queries,
            "prefix_cache_hits": st.prefix_cache_hits,
            "hit_rate": (st.prefix_cache_hits / st.prefix_cache_queries
                         if st.prefix_cache_queries else None),
            "lora": list(st.lora.running), "labels": dict(st.labels), "routed": p.routed,
            "prefixes": [{"id": k, "requests": v.requests, "cached_blocks": v.cached_blocks}
                         for k, v in reversed(p.prefixes.items())][:PREFIXES_SHOWN],
        }

    def _series(self, pool: str | None, now: int) -> list[dict[str, Any]]:
        """One point per second of the last ``history_s`` (this one included)."""
        hists = [h for name, h in self.history.items() if pool in (None, name)]
        out: list[dict[str, Any]] = []
        for t in range(now - self.history_s + 1, now + 1):
            secs = [h[t] for h in hists if t in h]
            q = sum(s.queries for s in secs)
            hits = sum(s.hits for s in secs)
            out.append({"t": t, "queries": q, "hits": hits,
                        "hit_rate": hits / q if q else None,
                        "routed": sum(s.routed for s in secs),
                        "finished": sum(s.finished for s in secs),
                        "failed": sum(s.failed for s in secs)})
        return out

    def _pool_scale(self, pool: str, now: float) -> dict[str, Any]:
        d = self.scale[pool][1] if pool in self.scale else None
        held = [dm for _, dm in self.demand.get(pool, {}).values()]
        out: dict[str, Any] = {"held": sum(dm.queued for dm in held),
                               "in_flight": sum(dm.in_flight for dm in held), "decision": None}
        if d is not None:
            out["decision"] = {
                "target_replicas": d.target_replicas, "ready_replicas": d.ready_replicas,
                "recommended": d.recommended, "reason": d.reason, "mode": d.mode,
                "replica": d.replica, "ts": finite(d.ts) or 0.0,
                "inputs": {k: finite(v) for k, v in d.inputs.items()},
            }
        return out
