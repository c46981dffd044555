"""OpenTelemetry tracing, with trace context carried across the bus in NATS headers (W3C)."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

_provider: TracerProvider | None = None


def setup_tracing(service: str, exporter: Any = None) -> TracerProvider:
    """Install a tracer provider for ``service``; spans go to ``exporter`` when one is given.

    With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set and no exporter given, spans go to that collector.
    """
    global _provider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif tracing_configured():
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def tracing_configured(env: dict[str, str] | None = None) -> bool:
    """Whether the standard OTEL_* variables ask for traces: an OTLP endpoint (general or for
    traces), not disabled (``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER=none``)."""
    e = os.environ if env is None else env
    if e.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if e.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(e.get("OTEL_EXPORTER_OTLP_ENDPOINT") or
                e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_from_env(service: str) -> TracerProvider | None:
    """The processes' set-up: an OTLP exporter when :func:`tracing_configured`, else nothing
    (the no-op tracer costs nothing on the request path)."""
    if not tracing_configured():
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME") or service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global _provider
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Export what is left (a process about to exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer(name: str = "infermesh") -> trace.Tracer:
    """The tracer for ``name`` (a no-op tracer until :func:`setup_tracing` ran)."""
    return trace.get_tracer(name)


def inject_context(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers with the current trace context added (``traceparent``, ``tracestate``)."""
    headers = {} if headers is None else headers
    inject(headers)
    return headers


def extract_context(headers: dict[str, str] | None) -> otel_context.Context:
    """The trace context carried by a message's headers (an empty context when none)."""
    return extract(headers or {})
