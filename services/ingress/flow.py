"""The ingress's gate: flow control in front of the engines (docs/flow-control.md).

A request passes at once while its pool has room (the saturation detector, over the pods'
heartbeats and the request events every router publishes). When the pool is saturated, or has
no ready engine at all (scaled to zero, restarting: the *activator's* case), the request waits
here, in :class:`FlowQueue` order — priority bands strictly, tenants fairly within a band, arrival
or deadline order within a tenant — instead of in an engine's queue. A dispatcher lets the next
one go each time the pool has room again, one at a time: it waits until the request it let go
has been routed (so the detector sees it) before it looks again.

Answers that are not the engine's: a sheddable request (negative priority) finds the pool
saturated: 429 at once; the queue is full (or a higher-priority request displaced this one):
429 with ``Retry-After``; no room within ``queue_timeout_s`` (``no_pod_wait_s`` while no engine
is ready): 503. While requests wait, the ingress tells the autoscaler how many
(``ScaleDemand.queued`` on ``im.scale.<pool>``), at once and every ``demand_interval_s``, and
once more at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infermesh.libs.flowcontrol import (
    FlowQueue,
    PodLoad,
    QueueFull,
    Thresholds,
    Ticket,
    pod_saturated,
)
from infermesh.libs.flowcontrol import pool_saturated as _pool_saturated
from infermesh.libs.telemetry import get_logger

log = get_logger("ingress.flow")

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
# Distinct tenants named in metrics; later ones share the label "other" (tenants can come
# from a header: a client must not be able to grow the metrics without bound).
MAX_TENANT_LABELS = 64
# The longest the dispatcher waits for a request it let go to be routed before it looks again.
SETTLE_S = 0.5
# How often the dispatcher looks at the pool while requests wait, besides the wake-ups
# (heartbeats, this ingress's requests ending): other routers' requests end too.
POLL_S = 0.02


class Refused(Exception):
    """No room for the request: ``status`` 429 (with ``retry_after_s``) or 503."""

    def __init__(self, status: int, message: str, retry_after_s: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class FlowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queued = Gauge("infermesh_ingress_flow_queued",
                            "Requests waiting in the ingress for room in the pool",
                            ["band", "tenant"], registry=r)
        self.requests = Counter(
            "infermesh_ingress_flow_requests",
            "Requests through flow control by outcome: direct (room at once), admitted (after "
            "waiting), shed (sheddable, pool saturated: 429), full (queue full: 429), "
            "displaced (a higher band took its place: 429), timed_out (503), gone (the client "
            "left while waiting)", ["band", "tenant", "outcome"], registry=r)
        self.wait = Histogram("infermesh_ingress_flow_wait_seconds",
                              "Time an admitted request waited in the ingress",
                              ["band", "tenant"], buckets=WAIT_BUCKETS, registry=r)
        self.saturated = Gauge(
            "infermesh_ingress_flow_saturated",
            "1 while the pool was saturated at the last look (no pod with room)", registry=r)
        self.saturations = Counter(
            "infermesh_ingress_flow_saturations",
            "Looks that found the pool saturated, by reason (no_engine, waiting, kv_usage, "
            "uncached_tokens, requests)", ["reason"], registry=r)
        # The activator's own series (the no-engine case), as before flow control.
        self.held = Gauge("infermesh_ingress_held",
                          "Requests held while the pool has no ready engine", registry=r)
        self.holds = Counter(
            "infermesh_ingress_holds",
            "Requests that found no ready engine, by outcome (released: an engine came; "
            "timed_out: the 503; refused: the queue was full, 429; gone: the client left)",
            ["outcome"], registry=r)
        self.hold_seconds = Histogram(
            "infermesh_ingress_hold_seconds", "Time a released request was held",
            buckets=WAIT_BUCKETS, registry=r)


class _Wait:
    """A ticket's waiting state."""

    __slots__ = ("fut", "no_engine", "settled", "ticket")

    def __init__(self, ticket: Ticket, no_engine: bool) -> None:
        self.ticket = ticket
        self.no_engine = no_engine
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.settled = asyncio.Event()


class FlowGate:
    """One pool's flow control in one ingress. :meth:`admit` waits for room; :meth:`settled`
    says the admitted request has been routed; :meth:`poke` says the pool may have room."""

    def __init__(self, *, enabled: bool, thresholds: Thresholds, queue: FlowQueue,
                 queue_timeout_s: float, no_pod_wait_s: float, demand_interval_s: float,
                 loads: Callable[[], list[PodLoad]],
                 publish_demand: Callable[[int], Awaitable[None]],
                 registry: CollectorRegistry) -> None:
        self.enabled = enabled
        self.thresholds = thresholds
        self.queue = queue
        self.queue_timeout_s = queue_timeout_s
        self.no_pod_wait_s = no_pod_wait_s
        self.demand_interval_s = demand_interval_s
        self._loads = loads
        self._publish = publish_demand
        self.metrics = FlowMetrics(registry)
        self._waits: dict[Ticket, _Wait] = {}
        self._held = 0  # waiting for an engine (no_engine)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._demand_task: asyncio.Task[None] | None = None
        self._tenants: set[str] = set()

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def held(self) -> int:
        """Requests waiting for a ready engine (the activator's hold)."""
        return self._held

    # ------------------------------------------------------------------ the detector

    def saturated(self) -> str | None:
        """Why the pool has no room now, or None. Without flow control only the absence of
        a ready engine counts."""
        loads = self._loads()
        if not self.enabled:
            return None if loads else "no_engine"
        why = _pool_saturated(loads, self.thresholds)
        self.metrics.saturated.set(1 if why else 0)
        if why:
            self.metrics.saturations.labels(why).inc()
        return why

    def saturated_pods(self) -> list[str]:
        """The pods with no room now (for the decision of a request let go for room)."""
        return [x.pod for x in self._loads() if pod_saturated(x, self.thresholds) is not None]

    def busy(self) -> bool:
        """Whether a request arriving now would wait (others wait, or no room)."""
        return bool(self.queue) or self.saturated() is not None

    # ------------------------------------------------------------------ requests

    def _tenant_label(self, tenant: str) -> str:
        if tenant in self._tenants:
            return tenant
        if len(self._tenants) < MAX_TENANT_LABELS:
            self._tenants.add(tenant)
            return tenant
        return "other"

    def _count(self, t: Ticket, outcome: str) -> None:
        self.metrics.requests.labels(str(t.band), self._tenant_label(t.tenant), outcome).inc()

    def precheck(self, ticket: Ticket) -> None:
        """Refuse now what :meth:`admit` would refuse at once if the pool stays as it is (a
        sheddable request in a saturated pool, a full queue), before the request costs any
        tokenizing: under a flood most requests end here."""
        if not self.enabled or (not self.queue and ticket.band >= 0):
            return
        why = self.saturated()
        if why is None or why == "no_engine":
            return
        if ticket.band < 0:
            self._count(ticket, "shed")
            raise Refused(429, f"The pool is saturated ({why}) and the request is sheddable "
                          f"(priority {ticket.band}); retry later", self._retry_after())
        if self.queue.would_refuse(ticket):
            self._count(ticket, "full")
            raise Refused(429, f"{len(self.queue)} requests are already waiting for room in "
                          "this pool", self._retry_after())

    def passed(self, ticket: Ticket) -> None:
        """Count a request that found room without asking :meth:`admit`."""
        if self.enabled and not ticket.admitted:
            self._count(ticket, "direct")
        ticket.admitted = True

    async def admit(self, ticket: Ticket, *, no_engine_only: bool = False) -> Ticket | None:
        """Wait until the pool has room for ``ticket``; return it (pass it to
        :meth:`settled` once routed) or None when it went through without waiting.

        ``no_engine_only``: wait only if no engine is ready (the activator's hold), not for a
        saturated pool. Raises :class:`Refused` (429, 503).
        """
        # A request let go by the dispatcher (for an engine that came) that asks again is no
        # longer in transit: the dispatcher need not wait for it.
        self.settled(ticket)
        why = self.saturated()
        if no_engine_only and why != "no_engine":
            return None
        if why is None and (not self.queue or ticket.admitted):
            if self.enabled and not ticket.admitted:
                self._count(ticket, "direct")
            ticket.admitted = True
            return None
        no_engine = why == "no_engine"
        if no_engine and self.no_pod_wait_s <= 0:
            raise Refused(503, "No engine is available for this pool right now")
        if not no_engine and why is not None and ticket.band < 0:
            self._count(ticket, "shed")
            raise Refused(429, f"The pool is saturated ({why}) and the request is sheddable "
                          f"(priority {ticket.band}); retry later", self._retry_after())
        try:
            displaced = self.queue.push(ticket)
        except QueueFull:
            self._count(ticket, "full")
            if no_engine:
                self.metrics.holds.labels("refused").inc()
            what = "an engine of this pool" if no_engine else "room in this pool"
            raise Refused(429, f"{len(self.queue)} requests are already waiting for {what}",
                          self._retry_after()) from None
        w = self._waits[ticket] = _Wait(ticket, no_engine)
        if displaced is not None:
            self._displace(displaced)
        ticket.enqueued = time.monotonic()
        if no_engine:
            self._held += 1
            self.metrics.held.set(self._held)
        self._gauge(ticket, +1)
        self._start()
        self._wake.set()
        timeout = self.no_pod_wait_s if no_engine else self.queue_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(w.fut), timeout)
        except TimeoutError:
            self._abandon(w)
            self._count(ticket, "timed_out")
            if no_engine:
                self.metrics.holds.labels("timed_out").inc()
                log.warning("no_engine_after_hold", held_s=timeout)
                raise Refused(503, "No engine is available for this pool right now (waited "
                              f"{timeout:g} s for one)") from None
            log.warning("no_room_after_wait", waited_s=timeout, band=ticket.band,
                        tenant=ticket.tenant)
            raise Refused(503, f"The pool is saturated: no room for the request within "
                          f"{timeout:g} s") from None
        except asyncio.CancelledError:
            self._abandon(w)
            self._count(ticket, "gone")
            if no_engine:
                self.metrics.holds.labels("gone").inc()
            raise
        except Refused:  # displaced
            self._abandon(w)
            raise
        self._unhold(w)
        ticket.admitted = True
        waited = time.monotonic() - ticket.enqueued
        self._count(ticket, "admitted")
        self.metrics.wait.labels(str(ticket.band), self._tenant_label(ticket.tenant)).observe(
            waited)
        if no_engine:
            self.metrics.holds.labels("released").inc()
            self.metrics.hold_seconds.observe(waited)
        return ticket

    def _unhold(self, w: _Wait) -> None:
        if w.no_engine:
            w.ticket.held_s += time.monotonic() - w.ticket.enqueued
            w.no_engine = False
            self._held -= 1
            self.metrics.held.set(self._held)

    def _abandon(self, w: _Wait) -> None:
        """The ticket leaves without being routed (timed out, its client gone, displaced),
        whether or not the dispatcher let it go meanwhile."""
        t = w.ticket
        if self.queue.remove(t):
            self._gauge(t, -1)
        if not w.fut.done():
            w.fut.cancel()
        self._unhold(w)
        self._waits.pop(t, None)
        w.settled.set()

    def _displace(self, t: Ticket) -> None:
        w = self._waits.get(t)
        self._gauge(t, -1)
        self._count(t, "displaced")
        if w is not None and not w.fut.done():
            w.fut.set_exception(Refused(
                429, f"A request of a higher priority took this one's place (priority "
                     f"{t.band}); retry later", self._retry_after()))
            w.fut.exception()  # retrieved: the waiter raises it

    def settled(self, ticket: Ticket | None) -> None:
        """The admitted request has been routed (or failed): the dispatcher looks again."""
        if ticket is None:
            return
        w = self._waits.pop(ticket, None)
        if w is not None:
            w.settled.set()

    def poke(self) -> None:
        """The pool may have room (a heartbeat, a request ended)."""
        if self.queue:
            self._wake.set()

    def _gauge(self, t: Ticket, d: int) -> None:
        self.metrics.queued.labels(str(t.band), self._tenant_label(t.tenant)).inc(d)

    def _retry_after(self) -> int:
        return max(1, math.ceil(min(self.queue_timeout_s, 5.0)))

    # ------------------------------------------------------------------ the dispatcher

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._dispatch(), name="ingress-flow")
        if self._demand_task is None or self._demand_task.done():
            self._demand_task = loop.create_task(self._demand_loop(), name="ingress-demand")

    async def _dispatch(self) -> None:
        """Let waiting requests go, one at a time, while the pool has room."""
        while self.queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            self._wake.clear()
            while self.queue and self.saturated() is None:
                t = self.queue.pop()
                if t is None:
                    break
                self._gauge(t, -1)
                w = self._waits.get(t)
                if w is None or w.fut.done():
                    continue
                w.fut.set_result(None)
                # Until it is routed the detector cannot see it: look again after that.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.settled.wait(), SETTLE_S)

    async def _demand_loop(self) -> None:
        """Tell the autoscaler what waits, at once and every ``demand_interval_s`` while
        anything does; once more at zero when nothing waits."""
        while self.queue:
            await self._send(len(self.queue))
            await asyncio.sleep(self.demand_interval_s)
        await self._send(0)

    async def _send(self, n: int) -> None:
        try:
            await self._publish(n)
        except Exception as e:  # noqa: BLE001 - demand is advice; the wait goes on
            log.debug("demand_publish_failed", error=repr(e))

    async def close(self) -> None:
        """Stop the dispatcher and the demand; waiting requests get their timeout."""
        for task in (self._task, self._demand_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._demand_task = None
