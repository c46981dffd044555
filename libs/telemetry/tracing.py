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
    elif os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        except ImportError:  # exporter package is optional
            pass
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


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
