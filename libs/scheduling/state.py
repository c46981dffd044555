"""What a scheduler replica knows of the pool, from the bus only: live pods and in-flight load.

Every replica subscribes to every pod's heartbeat and to every request event, so replicas that
share no memory still see the same pods, the same in-flight counts and the same routing history.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from infermesh.libs import liveness
from infermesh.proto.messages import PodState

from .framework import Pod


@dataclass(slots=True)
class PodEntry:
    """A pod's last heartbeat and when this replica received it (its own clock)."""

    state: PodState
    seen: float
    since: float  # start of its unbroken run of heartbeats (liveness.since)


class PodTable:
    """Live pods per pool, from ``im.pod.<pool>.<pod>`` heartbeats.

    A pod is dropped when a heartbeat says ``ready=False``, or by :func:`liveness.dead`: silent
    for ``timeout_s`` while another pod of its pool kept speaking. A late pod
    stays a candidate on its last known state. Arrival time is measured on this replica's
    clock, so engine clock skew does not matter.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 late_s: float = liveness.DEFAULT_LATE_S) -> None:
        self.timeout_s = timeout_s
        self.late_s = min(late_s, timeout_s)
        self.clock = clock
        self._pools: dict[str, dict[str, PodEntry]] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self._pools.values())

    def update(self, state: PodState) -> bool:
        """Apply one heartbeat; return True when it removed the pod (not ready)."""
        pool = self._pools.setdefault(state.pool, {})
        if not state.ready:
            return pool.pop(state.pod, None) is not None
        entry = pool.get(state.pod)
        now = self.clock()
        if entry is None:
            pool[state.pod] = PodEntry(state, now, now)
        else:
            entry.state = state
            entry.since = liveness.since(entry.seen, entry.since, now, self.late_s)
            entry.seen = now
        return False

    def prune(self) -> list[str]:
        """Drop the pods whose heartbeat stopped for good; return their names."""
        now = self.clock()
        gone: list[str] = []
        for pool in self._pools.values():
            stale = liveness.dead({n: (e.seen, e.since) for n, e in pool.items()}, now,
                                  self.late_s, self.timeout_s)
            for name in stale:
                del pool[name]
            gone.extend(stale)
        return gone

    def late(self) -> int:
        """Pods whose last heartbeat is older than ``late_s`` (still candidates)."""
        now = self.clock()
        return sum(liveness.late((e.seen for e in pool.values()), now, self.late_s)
                   for pool in self._pools.values())

    def get(self, pool: str, pod: str) -> PodState | None:
        """A live pod's last heartbeat."""
        entry = self._pools.get(pool, {}).get(pod)
        return entry.state if entry is not None else None

    def pods(self, pool: str) -> list[PodState]:
        """Every live pod of ``pool`` (late ones included)."""
        return [e.state for e in self._pools.get(pool, {}).values()]

    def candidates(
        self,
        pool: str,
        model: str,
        exclude: Iterable[str] = (),
        labels: dict[str, str] | None = None,
        inflight: Callable[[str], int] | None = None,
    ) -> tuple[list[Pod], int]:
        """The live pods of ``pool`` serving ``model`` (any model when empty), not excluded and
        carrying every ``labels`` pair; and how many pods of the pool serve the model at all."""
        skip = set(exclude)
        wanted = tuple(labels.items()) if labels else ()
        out: list[Pod] = []
        serving = 0
        for name, e in self._pools.get(pool, {}).items():
            st = e.state
            if model and st.model != model:
                continue
            serving += 1
            if name in skip or (wanted and any(st.labels.get(k) != v for k, v in wanted)):
                continue
            out.append(Pod(name, st, inflight(name) if inflight else 0))
        return out, serving


class InFlight:
    """Requests routed and not yet finished, per pod, keyed by request id.

    A replica counts its own decision at once (so a burst spreads before the ingress's
    ``routed`` event comes back); that event, for the same request id, does not count it again,
    and names the pod if the ingress retried elsewhere. ``finished`` removes the request; one
    never finished (a lost event, a crashed ingress) is forgotten after ``timeout_s``.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        # request id → (pod, deadline), in deadline order (every deadline is now + timeout_s).
        self._requests: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._per_pod: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def count(self, pod: str) -> int:
        """Requests in flight on ``pod``."""
        return self._per_pod.get(pod, 0)

    def counts(self) -> dict[str, int]:
        """In-flight requests per pod (pods with none left out)."""
        return {p: n for p, n in self._per_pod.items() if n}

    def pod_of(self, request_id: str) -> str | None:
        """The pod a request in flight was routed to."""
        entry = self._requests.get(request_id)
        return entry[0] if entry else None

    def _dec(self, pod: str) -> None:
        n = self._per_pod.get(pod, 0) - 1
        if n > 0:
            self._per_pod[pod] = n
        else:
            self._per_pod.pop(pod, None)

    def routed(self, request_id: str, pod: str) -> bool:
        """Count ``request_id`` on ``pod`` (moving it if it was counted elsewhere); return
        True when it was not in flight before."""
        deadline = self.clock() + self.timeout_s
        old = self._requests.pop(request_id, None)
        if old is not None and old[0] != pod:
            self._dec(old[0])
        if old is None or old[0] != pod:
            self._per_pod[pod] = self._per_pod.get(pod, 0) + 1
        self._requests[request_id] = (pod, deadline)
        return old is None

    def touch(self, request_id: str) -> None:
        """A sign of life (first token): push the request's expiry back."""
        entry = self._requests.pop(request_id, None)
        if entry is not None:
            self._requests[request_id] = (entry[0], self.clock() + self.timeout_s)

    def finished(self, request_id: str) -> bool:
        """The request is over; return True when it was in flight."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        self._dec(entry[0])
        return True

    def expire(self) -> int:
        """Forget requests past their deadline; return how many."""
        now = self.clock()
        n = 0
        reqs = self._requests
        while reqs:
            rid, (pod, deadline) = next(iter(reqs.items()))
            if deadline > now:
                break
            del reqs[rid]
            self._dec(pod)
            n += 1
        return n
