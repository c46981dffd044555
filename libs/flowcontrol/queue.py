"""The flow-control queue: requests waiting in the router for room in a saturated pool.

Three levels decide which waiting request goes next:

1. **Priority bands**, served strictly: nothing of a lower band goes while a higher one waits.
2. **Tenants within a band**, by deficit round robin: each tenant in turn earns ``quantum`` of
   credit and sends what its credit covers, a request costing its prompt tokens (``fairness
   = "tokens"``) or 1 (``"requests"``: plain round robin). A tenant flooding the queue waits
   behind its own requests, not in front of everyone else's. ``"off"``: one queue per band.
3. **Within a tenant**, first come first served (``"fcfs"``) or earliest deadline first
   (``"edf"``: requests without a deadline after those with one, in arrival order).

The queue is bounded: a request that finds it full displaces the newest request of the tenant
with the most waiting in the lowest band below its own, or failing that in its own band (when
that tenant has at least two more waiting than the newcomer's); the displaced one gets the 429.
Failing both, the newcomer is refused itself. Nothing here waits or
sleeps: :class:`FlowQueue` is a data structure; the ingress's gate does the waiting.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

Fairness = Literal["tokens", "requests", "off"]
Ordering = Literal["fcfs", "edf"]
FAIRNESS: tuple[Fairness, ...] = ("tokens", "requests", "off")
ORDERING: tuple[Ordering, ...] = ("fcfs", "edf")

_seq = itertools.count()


@dataclass(eq=False, slots=True)
class Ticket:
    """One waiting request. ``deadline``: its EDF key (monotonic seconds; ``inf``: none)."""

    band: int
    tenant: str
    cost: int = 1
    deadline: float = math.inf
    enqueued: float = 0.0
    seq: int = field(default_factory=lambda: next(_seq))
    queued: bool = False  # in a FlowQueue now
    held_s: float = 0.0  # seconds it waited for an engine to start (not for room)
    admitted: bool = False  # it had its turn once (a later look lets it by without a queue)


class QueueFull(Exception):
    """No room, and nothing of a lower band to displace."""


@dataclass(slots=True)
class _TenantQueue:
    heap: list[tuple[float, int, Ticket]] = field(default_factory=list)
    deficit: int = 0
    visited: bool = False  # has its credit for the current turn


class _Band:
    __slots__ = ("count", "tenants")

    def __init__(self) -> None:
        self.tenants: OrderedDict[str, _TenantQueue] = OrderedDict()  # ring, head = current
        self.count = 0


class FlowQueue:
    """Bands of tenants' queues; :meth:`push`, :meth:`pop`, :meth:`remove`."""

    def __init__(self, *, max_queued: int, fairness: Fairness = "tokens",
                 ordering: Ordering = "fcfs", quantum: int = 2048) -> None:
        if max_queued < 1 or quantum < 1:
            raise ValueError("max_queued and quantum must be at least 1")
        if fairness not in FAIRNESS or ordering not in ORDERING:
            raise ValueError(f"fairness must be one of {FAIRNESS}, ordering one of {ORDERING}")
        self.max_queued = max_queued
        self.fairness = fairness
        self.ordering = ordering
        self.quantum = quantum if fairness == "tokens" else 1
        self._bands: dict[int, _Band] = {}
        self._order: list[int] = []  # band priorities, highest first
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def band_sizes(self) -> dict[int, int]:
        """Waiting requests per band."""
        return {b: self._bands[b].count for b in self._order}

    def tenant_sizes(self) -> dict[tuple[int, str], int]:
        """Waiting requests per (band, tenant)."""
        return {(b, t): len(q.heap) for b in self._order
                for t, q in self._bands[b].tenants.items()}

    # ------------------------------------------------------------------ in

    def push(self, ticket: Ticket) -> Ticket | None:
        """Queue ``ticket``; return the ticket it displaced (now out of the queue), if any.

        Raises :class:`QueueFull` when the queue is full of requests of its band or higher.
        """
        displaced = None
        if self._len >= self.max_queued:
            displaced = self._victim(ticket)
            if displaced is None:
                raise QueueFull
            self.remove(displaced)
        band = self._bands.get(ticket.band)
        if band is None:
            band = self._bands[ticket.band] = _Band()
            self._order.append(ticket.band)
            self._order.sort(reverse=True)
        tenant = ticket.tenant if self.fairness != "off" else ""
        q = band.tenants.get(tenant)
        if q is None:
            # A tenant with nothing waiting goes first, ahead of those with a backlog (as
            # FQ-CoDel serves new flows first): a trickle waits for one turn, not for a round
            # of the flooders; it spends its credit like any other and goes to the back.
            q = band.tenants[tenant] = _TenantQueue()
            band.tenants.move_to_end(tenant, last=False)
        key = ticket.deadline if self.ordering == "edf" else 0.0
        heapq.heappush(q.heap, (key, ticket.seq, ticket))
        band.count += 1
        self._len += 1
        ticket.queued = True
        return displaced

    def would_refuse(self, ticket: Ticket) -> bool:
        """Whether :meth:`push` would raise :class:`QueueFull` for ``ticket`` now."""
        return self._len >= self.max_queued and self._victim(ticket) is None

    def _victim(self, ticket: Ticket) -> Ticket | None:
        """What a newcomer to a full queue displaces: from the lowest band below its own, or
        else from its own band when that tenant has at least two more waiting than the
        newcomer's, the newest request of the tenant with the most waiting (ties: the newest
        of theirs); else nothing."""
        lowest = self._order[-1]
        if lowest < ticket.band:
            return self._heaviest_newest(self._bands[lowest])
        band = self._bands.get(ticket.band)
        if band is None or self.fairness == "off":
            return None
        victim = self._heaviest_newest(band)
        own = band.tenants.get(ticket.tenant)
        most = len(band.tenants[victim.tenant].heap)
        if victim.tenant == ticket.tenant or most < (len(own.heap) if own else 0) + 2:
            return None
        return victim

    @staticmethod
    def _heaviest_newest(band: _Band) -> Ticket:
        most = max(len(q.heap) for q in band.tenants.values())
        return max((e[2] for q in band.tenants.values() if len(q.heap) == most for e in q.heap),
                   key=lambda t: t.seq)

    # ------------------------------------------------------------------ out

    def pop(self) -> Ticket | None:
        """The next request to admit (highest band; the band's tenants by deficit round
        robin; the tenant's own by arrival or deadline), or None when empty."""
        if not self._order:
            return None
        prio = self._order[0]
        band = self._bands[prio]
        ring = band.tenants
        while True:
            for _ in range(len(ring)):
                name, q = next(iter(ring.items()))
                if not q.visited:
                    q.deficit += self.quantum
                    q.visited = True
                head = q.heap[0][2]
                cost = self._cost(head)
                if cost <= q.deficit:
                    q.deficit -= cost
                    self._take(prio, band, name, q)
                    return head
                q.visited = False  # its turn is over: to the back of the ring
                ring.move_to_end(name)
            # A whole turn of the ring and nobody's credit covered its head: give every tenant
            # the turns the closest one still needs at once (the same order as turning the
            # ring that many times, without the loop).
            need = min(math.ceil((self._cost(q.heap[0][2]) - q.deficit) / self.quantum)
                       for q in ring.values())
            if need > 1:
                for q in ring.values():
                    q.deficit += (need - 1) * self.quantum

    def _cost(self, t: Ticket) -> int:
        """What a request costs its tenant's credit: its prompt tokens, or 1 (round robin)."""
        return max(1, t.cost) if self.fairness == "tokens" else 1

    def _take(self, prio: int, band: _Band, name: str, q: _TenantQueue) -> None:
        heapq.heappop(q.heap)[2].queued = False
        band.count -= 1
        self._len -= 1
        if not q.heap:
            del band.tenants[name]  # an idle tenant keeps no credit (DRR)
        if not band.count:
            del self._bands[prio]
            self._order.remove(prio)

    def remove(self, ticket: Ticket) -> bool:
        """Take ``ticket`` out (it timed out, its client left, it was displaced)."""
        if not ticket.queued:
            return False
        band = self._bands[ticket.band]
        name = ticket.tenant if self.fairness != "off" else ""
        q = band.tenants[name]
        for i, e in enumerate(q.heap):
            if e[2] is ticket:
                q.heap[i] = q.heap[-1]
                q.heap.pop()
                heapq.heapify(q.heap)
                break
        ticket.queued = False
        band.count -= 1
        self._len -= 1
        if not q.heap:
            del band.tenants[name]
        if not band.count:
            del self._bands[ticket.band]
            self._order.remove(ticket.band)
        return True
