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
        uncached: Callable[[str, int], int] | None = None,
    ) -> tuple[list[Pod], int]:
        """The live pods of ``pool`` serving ``model`` (any model when empty), not excluded and
        carrying every ``labels`` pair; and how many pods of the pool serve the model at all.
        ``inflight(pod)`` and ``uncached(pod, block_size)`` fill in each pod's load."""
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
            out.append(Pod(name, st, inflight(name) if inflight else 0,
                           uncached(name, st.block_size) if uncached else 0))
        return out, serving


# A request's end (first token or finished) is remembered this long at most, so that its
# ``routed`` event arriving later (another replica's publish, a slower path) does not bring it
# back: the view then depends on which events arrived, not on their order.
_ENDED_S = 60.0


@dataclass(slots=True)
class _Flight:
    """One request in flight: where, until when, and the prefill it still owes its pod."""

    pod: str
    deadline: float
    tokens: int  # prompt tokens the pod must prefill (0 once its first token came)
    cached_blocks: int  # blocks of the prompt the pod held when it was routed


class InFlight:
    """Requests routed and not yet finished, per pod, keyed by request id; and the prompt tokens
    each pod still has to prefill for them (its *uncached in-flight tokens*).

    A replica counts its own decision at once (so a burst spreads before the ingress's
    ``routed`` event comes back); that event, for the same request id, does not count it again,
    and names the pod if the ingress retried elsewhere. ``finished`` removes the request; one
    never finished (a lost event, a crashed ingress) is forgotten after ``timeout_s``.

    **Uncached tokens.** A ``routed`` request owes its pod ``num_tokens − cached_blocks ×
    block_size`` tokens of prefill (the blocks the precise prefix scorer found there); its
    ``first_token`` ends the prefill (the request stays in flight, decoding) and ``finished``
    ends it too. Every replica sees the same events on ``im.req.<pool>``, and the view is a
    function of the set of events, not of their order: a routed event repeats the values
    (it does not add), and the end of a request on a pod is remembered for ``min(timeout_s,
    60 s)``, so a ``routed`` arriving after its ``first_token`` or ``finished`` owes nothing.
    Ends are keyed by (request id, pod): a retry on another pod is a new prefill.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        # request id → its flight, in deadline order (every deadline is now + timeout_s).
        self._requests: OrderedDict[str, _Flight] = OrderedDict()
        self._per_pod: dict[str, int] = {}
        # pod → [prompt tokens, cached blocks] of its requests still prefilling.
        self._prefill: dict[str, list[int]] = {}
        # (request id, pod) → (forget after, finished: True / first token only: False).
        self._ended: OrderedDict[tuple[str, str], tuple[float, bool]] = OrderedDict()
        self.ended_s = min(timeout_s, _ENDED_S)

    def __len__(self) -> int:
        return len(self._requests)

    def count(self, pod: str) -> int:
        """Requests in flight on ``pod``."""
        return self._per_pod.get(pod, 0)

    def counts(self) -> dict[str, int]:
        """In-flight requests per pod (pods with none left out)."""
        return {p: n for p, n in self._per_pod.items() if n}

    def uncached_tokens(self, pod: str, block_size: int) -> int:
        """Prompt tokens routed to ``pod`` whose prefill has not ended (no first token yet),
        less the blocks of ``block_size`` tokens it held of them when they were routed."""
        acc = self._prefill.get(pod)
        if not acc:
            return 0
        return max(0, acc[0] - acc[1] * max(block_size, 0))

    def prefill_view(self) -> dict[str, tuple[int, int]]:
        """(prompt tokens, cached blocks) still to prefill, per pod (pods with none left out)."""
        return {p: (a[0], a[1]) for p, a in self._prefill.items() if a[0] or a[1]}

    def pod_of(self, request_id: str) -> str | None:
        """The pod a request in flight was routed to."""
        entry = self._requests.get(request_id)
        return entry.pod if entry else None

    def _dec(self, pod: str) -> None:
        n = self._per_pod.get(pod, 0) - 1
        if n > 0:
            self._per_pod[pod] = n
        else:
            self._per_pod.pop(pod, None)

    def _add_prefill(self, f: _Flight, sign: int) -> None:
        if not f.tokens and not f.cached_blocks:
            return
        acc = self._prefill.setdefault(f.pod, [0, 0])
        acc[0] += sign * f.tokens
        acc[1] += sign * f.cached_blocks
        if acc[0] <= 0 and acc[1] <= 0:
            del self._prefill[f.pod]

    def _forget(self, f: _Flight) -> None:
        self._dec(f.pod)
        self._add_prefill(f, -1)

    def _end(self, request_id: str, pod: str, finished: bool) -> None:
        key = (request_id, pod)
        old = self._ended.pop(key, None)
        self._ended[key] = (self.clock() + self.ended_s, finished or bool(old and old[1]))

    def routed(self, request_id: str, pod: str, *, num_tokens: int = 0,
               cached_blocks: int = 0) -> bool:
        """Count ``request_id`` on ``pod`` (moving it if it was counted elsewhere) with the
        prefill it owes; return True when it was not in flight before. A request that already
        finished on ``pod`` is not counted again."""
        ended = self._ended.get((request_id, pod))
        if ended is not None and ended[1]:
            return False
        if ended is not None:  # its first token came first: nothing left to prefill
            num_tokens = cached_blocks = 0
        deadline = self.clock() + self.timeout_s
        old = self._requests.pop(request_id, None)
        if old is not None:
            if old.pod != pod:
                self._forget(old)
            else:
                self._add_prefill(old, -1)
                if not old.tokens and not old.cached_blocks:  # prefill already over
                    num_tokens = cached_blocks = 0
        if old is None or old.pod != pod:
            self._per_pod[pod] = self._per_pod.get(pod, 0) + 1
        f = _Flight(pod, deadline, max(0, num_tokens), max(0, cached_blocks))
        self._add_prefill(f, 1)
        self._requests[request_id] = f
        return old is None

    def touch(self, request_id: str, pod: str = "") -> None:
        """The first token: the prefill is over, and the request's expiry is pushed back."""
        if pod:
            self._end(request_id, pod, finished=False)
        f = self._requests.pop(request_id, None)
        if f is None:
            return
        f.deadline = self.clock() + self.timeout_s
        self._requests[request_id] = f
        if not pod or f.pod == pod:
            self._add_prefill(f, -1)
            f.tokens = f.cached_blocks = 0

    def finished(self, request_id: str, pod: str = "") -> bool:
        """The request is over (on ``pod``, when named: a finished attempt on another pod than
        the one it was moved to leaves it counted); return True when it was in flight."""
        if pod:
            self._end(request_id, pod, finished=True)
        f = self._requests.get(request_id)
        if f is None or (pod and f.pod != pod):
            return False
        del self._requests[request_id]
        self._forget(f)
        return True

    def expire(self) -> int:
        """Forget requests past their deadline; return how many."""
        now = self.clock()
        ended = self._ended
        while ended:
            key, (until, _) = next(iter(ended.items()))
            if until > now:
                break
            del ended[key]
        n = 0
        reqs = self._requests
        while reqs:
            rid, f = next(iter(reqs.items()))
            if f.deadline > now:
                break
            del reqs[rid]
            self._forget(f)
            n += 1
        return n
