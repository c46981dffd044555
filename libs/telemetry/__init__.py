"""Logging (structlog), tracing (OpenTelemetry) and metrics helpers shared by every service."""

from .logging import configure_logging, get_logger
from .tracing import (
    extract_context,
    inject_context,
    setup_from_env,
    shutdown_tracing,
    tracer,
    tracing_configured,
)

__all__ = ["configure_logging", "get_logger", "extract_context", "inject_context",
           "setup_from_env", "shutdown_tracing", "tracer", "tracing_configured"]
