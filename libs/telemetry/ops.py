"""What every service process has: a /health and /metrics HTTP endpoint, and a signal-driven run."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

HealthFn = Callable[[], tuple[bool, dict[str, Any]]]
ActionFn = Callable[[], Awaitable[dict[str, Any]]]


class OpsServer:
    """``GET /health`` (200 or 503 with a JSON body) and ``GET /metrics`` (Prometheus text);
    ``POST /<name>`` for each of ``actions`` (e.g. an agent's ``/drain``), answering its JSON;
    and any further ``routes`` of the service's own (the fleet console's pages)."""

    def __init__(self, registries: list[CollectorRegistry], health: HealthFn,
                 actions: dict[str, ActionFn] | None = None,
                 routes: Iterable[web.RouteDef] = ()) -> None:
        self._registries = registries
        self._health = health
        self._actions = actions or {}
        self._routes = list(routes)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); return the port."""
        app = web.Application()
        app.router.add_get("/health", self._on_health)
        app.router.add_get("/metrics", self._on_metrics)
        for name, fn in self._actions.items():
            app.router.add_post(f"/{name}", self._action(fn))
        app.router.add_routes(self._routes)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def _on_health(self, _: web.Request) -> web.Response:
        ok, body = self._health()
        return web.json_response({"status": "ok" if ok else "unhealthy", **body},
                                 status=200 if ok else 503)

    @staticmethod
    def _action(fn: ActionFn) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            return web.json_response(await fn())

        return handler

    async def _on_metrics(self, _: web.Request) -> web.Response:
        body = b"".join(generate_latest(r) for r in self._registries)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


async def run_until_stopped(start: Callable[[], Awaitable[Any]],
                            stop: Callable[[], Awaitable[Any]]) -> None:
    """``await start()``, wait for SIGINT or SIGTERM, then ``await stop()``."""
    await start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await stop()
