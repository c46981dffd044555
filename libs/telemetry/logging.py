"""structlog set-up: JSON lines when stderr is not a terminal, readable key=value when it is."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def _stderr_logger(*_: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure_logging(service: str, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging once per process.

    ``level`` defaults to ``$INFERMESH_LOG_LEVEL`` or ``info``; ``json`` defaults to "stderr is not
    a TTY", so logs collected by Kubernetes or a test harness are machine-readable.
    """
    global _configured
    level_name = (level or os.environ.get("INFERMESH_LOG_LEVEL", "info")).upper()
    lvl = getattr(logging, level_name, logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # sys.stderr as it is when a line is written (not when this ran): a test harness or a
        # daemonizer may replace it, and a closed stream must not break a log call.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)
    _configured = True


def get_logger(name: str | None = None) -> Any:
    """A lazy structlog logger (``component=name`` when given).

    It is resolved at first use, so module-level loggers follow :func:`configure_logging` even
    though they are created at import time.
    """
    return structlog.get_logger(component=name) if name else structlog.get_logger()
