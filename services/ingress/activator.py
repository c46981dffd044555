"""The activator: requests that find no ready engine in the ingress's pool are held here, in
arrival order, while the pool's first engine starts — a pool scaled to zero, or one whose engines
are all restarting — and released together, oldest first, by the first ready heartbeat.

While anything is held, the ingress's demand (how many it holds) goes to the autoscaler on
``im.scale.<pool>`` at once and every ``demand_interval_s``, then once more at zero when the
hold is over. The queue is bounded: past ``max_held`` a request is refused at once with 429 and a
``Retry-After``; a held request that no engine came for within ``timeout_s`` gets the 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infermesh.libs.telemetry import get_logger

log = get_logger("ingress.activator")

HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class HoldRefused(Exception):
    """The queue is full (429, with the seconds to wait before a retry)."""

    def __init__(self, held: int, retry_after_s: int) -> None:
        super().__init__(f"{held} requests are already waiting for an engine of this pool")
        self.retry_after_s = retry_after_s


class ActivatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge("infermesh_ingress_held",
                          "Requests held while the pool has no ready engine", registry=registry)
        self.outcomes = Counter(
            "infermesh_ingress_holds",
            "Requests that found no ready engine, by outcome (released: an engine came; "
            "timed_out: the 503; refused: the queue was full, 429; gone: the client left)",
            ["outcome"], registry=registry)
        self.hold_seconds = Histogram(
            "infermesh_ingress_hold_seconds", "Time a released request was held",
            buckets=HOLD_BUCKETS, registry=registry)


class Activator:
    """One pool's hold queue. :meth:`hold` waits for :meth:`release` (a ready heartbeat)."""

    def __init__(self, *, max_held: int, timeout_s: float, demand_interval_s: float,
                 publish_demand: Callable[[int], Awaitable[None]],
                 metrics: ActivatorMetrics) -> None:
        self.max_held = max_held
        self.timeout_s = timeout_s
        self.demand_interval_s = demand_interval_s
        self._publish = publish_demand
        self.metrics = metrics
        self._held: deque[asyncio.Future[None]] = deque()
        self._demand_task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    async def hold(self) -> bool:
        """Wait for a ready engine; True when released, False after ``timeout_s``.

        Raises :class:`HoldRefused` when ``max_held`` requests wait already.
        """
        if self.timeout_s <= 0:
            return False
        if len(self._held) >= self.max_held:
            self.metrics.outcomes.labels("refused").inc()
            raise HoldRefused(len(self._held), max(1, math.ceil(min(self.timeout_s, 5.0))))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(fut)
        self.metrics.held.set(len(self._held))
        self._demand_soon()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            self.metrics.outcomes.labels("timed_out").inc()
            log.warning("no_engine_after_hold", held_s=self.timeout_s)
            return False
        except asyncio.CancelledError:
            self.metrics.outcomes.labels("gone").inc()
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._held.remove(fut)
            self.metrics.held.set(len(self._held))
        self.metrics.outcomes.labels("released").inc()
        self.metrics.hold_seconds.observe(time.monotonic() - t0)
        return True

    def release(self) -> int:
        """Release every held request, oldest first; return how many."""
        n = 0
        for fut in self._held:
            if not fut.done():
                fut.set_result(None)  # resumed in this order (FIFO callbacks)
                n += 1
        if n:
            log.info("held_requests_released", released=n)
        return n

    def _demand_soon(self) -> None:
        if self._demand_task is None or self._demand_task.done():
            self._demand_task = asyncio.get_running_loop().create_task(
                self._demand_loop(), name="ingress-demand")

    async def _demand_loop(self) -> None:
        """Tell the autoscaler what is held, at once and every ``demand_interval_s`` while
        anything is; once more at zero when the hold is over."""
        try:
            while self._held:
                await self._send(len(self._held))
                await asyncio.sleep(self.demand_interval_s)
            await self._send(0)
        except asyncio.CancelledError:
            raise

    async def _send(self, n: int) -> None:
        try:
            await self._publish(n)
        except Exception as e:  # noqa: BLE001 - demand is advice; the hold goes on
            log.debug("demand_publish_failed", error=repr(e))

    async def close(self) -> None:
        """Stop telling demand; held requests stay held until their timeout."""
        if self._demand_task is not None:
            self._demand_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._demand_task
            self._demand_task = None
