"""structlog set up once per process: JSON lines on stderr, one event per line."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, **context) -> None:
    """JSON lines with a timestamp and level; `context` (job, run_id, tick…) on every line."""
    level_name = (level or os.environ.get("TESSERA_LOG_LEVEL") or "INFO").upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v is not None})
