"""Stopping what a service started, in one order, each step shielded from the others' failures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from nats.aio.client import Client


class _Stoppable(Protocol):
    async def stop(self) -> Any: ...


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait for each to end (its exception, if any, is dropped)."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t


async def release(
    *,
    service: _Stoppable | None = None,
    subs: Iterable[Any] = (),
    ops: _Stoppable | None = None,
    nc: Client | None = None,
) -> None:
    """Stop answering (``service``), stop listening (``subs``), close the ops HTTP server, then
    drain ``nc`` — pass it only when the service owns the connection. A failing step does not
    keep the later ones from running.
    """
    if service is not None:
        with contextlib.suppress(Exception):
            await service.stop()
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if ops is not None:
        with contextlib.suppress(Exception):
            await ops.stop()
    if nc is not None:
        with contextlib.suppress(Exception):
            await nc.drain()
