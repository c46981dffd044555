"""Services built on nats-py's micro framework, with our decoding, errors and metrics around them.

A handler receives a decoded request and returns a reply Struct. Malformed requests are answered
with a 400 error (and counted), failures inside the handler with a 500, so a caller always gets a
structured answer and the service keeps running. ``$SRV.PING/INFO/STATS`` come from nats-py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import EndpointConfig, Service, ServiceConfig
from opentelemetry import context as otel_context
from prometheus_client import CollectorRegistry, Counter, Histogram

from infermesh.proto import codec

from ..telemetry import extract_context, get_logger, tracer
from .client import settle

log = get_logger("bus.service")

Handler = Callable[[Any], Awaitable[msgspec.Struct]]


def reply_error(code: int, description: str) -> ServiceError:
    """An error a handler raises to answer the caller with ``code`` (HTTP-like) and a message."""
    return ServiceError(str(code), description)


@dataclass(frozen=True, slots=True)
class Forward:
    """What a handler returns to pass the request on instead of answering it: ``message`` is
    published on ``subject`` with the caller's reply subject, so the next service answers the
    caller directly (one bus trip less than the caller asking each service in turn)."""

    subject: str
    message: Any


class BusService:
    """One NATS micro service with typed endpoints and Prometheus metrics per endpoint."""

    def __init__(
        self,
        nc: Client,
        name: str,
        version: str = "0.1.0",
        description: str = "",
        registry: CollectorRegistry | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self._config = ServiceConfig(
            name=name, version=version, description=description, metadata=metadata or {}
        )
        self._service: Service | None = None
        self._pending: list[EndpointConfig] = []
        # A registry per service unless told otherwise: several services may share a process.
        self.registry = registry if registry is not None else CollectorRegistry()
        kw: dict[str, Any] = {"registry": self.registry}
        self.requests = Counter(
            "infermesh_bus_requests", "Requests handled per endpoint and outcome",
            ["service", "endpoint", "outcome"], **kw,
        )
        self.latency = Histogram(
            "infermesh_bus_handler_seconds", "Handler time per endpoint",
            ["service", "endpoint"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            **kw,
        )

    def endpoint(
        self,
        name: str,
        subject: str,
        request_type: Any,
        handler: Handler,
        queue_group: str | None = None,
    ) -> None:
        """Register ``handler`` for ``subject``; it gets a ``request_type`` and returns a reply."""
        counter = self.requests
        hist = self.latency.labels(self.name, name)
        svc = self.name

        async def wrapped(req: Request) -> None:
            t0 = time.perf_counter()
            token = otel_context.attach(extract_context(req.headers))
            try:
                try:
                    msg = codec.decode(req.data, request_type)
                except codec.DecodeError as e:
                    counter.labels(svc, name, "bad_request").inc()
                    await req.respond_error("400", str(e))
                    return
                try:
                    with tracer().start_as_current_span(f"{svc}.{name}"):
                        reply = await handler(msg)
                except ServiceError as e:
                    counter.labels(svc, name, "error").inc()
                    await req.respond_error(e.code, e.description)
                    return
                except Exception as e:  # keep serving; the caller gets a structured 500
                    counter.labels(svc, name, "error").inc()
                    log.exception("handler_failed", endpoint=name)
                    await req.respond_error("500", f"{type(e).__name__}: {e}")
                    return
                if isinstance(reply, Forward):
                    await self.nc.publish(reply.subject, codec.encode(reply.message),
                                          reply=req._msg.reply, headers=req.headers)
                    counter.labels(svc, name, "forwarded").inc()
                    return
                await req.respond(codec.encode(reply))
                counter.labels(svc, name, "ok").inc()
            finally:
                otel_context.detach(token)
                hist.observe(time.perf_counter() - t0)

        cfg = EndpointConfig(name=name, subject=subject, handler=wrapped, queue_group=queue_group)
        self._pending.append(cfg)

    def raw_endpoint(
        self,
        name: str,
        subject: str,
        handler: Callable[[Request], Awaitable[None]],
        queue_group: str | None = None,
    ) -> None:
        """Register a handler that answers the request itself (e.g. with several messages)."""
        self._pending.append(
            EndpointConfig(name=name, subject=subject, handler=handler, queue_group=queue_group)
        )

    async def start(self) -> Service:
        """Start the service and every registered endpoint."""
        self._service = await add_service(self.nc, self._config)
        for cfg in self._pending:
            await self._service.add_endpoint(cfg)
        await settle(self.nc)  # every endpoint is subscribed at the server on return
        return self._service

    async def stop(self) -> None:
        """Stop answering (idempotent)."""
        if self._service is not None:
            await self._service.stop()
            self._service = None
