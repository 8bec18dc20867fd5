"""structlog set up once per process: JSON lines on stderr, one event per line, with the
job's context (job, run_id, tick) on every line.

The configuration itself (and the masking of secret values in every line) is
`actors/logs.py`, shared with the Ray workers, which configure themselves with it.
"""

from __future__ import annotations

import structlog

from actors.logs import MASK, configure_json, mask_secrets, mask_values, secret_env_values

__all__ = ["MASK", "configure_logging", "mask_secrets", "mask_values", "secret_env_values"]


def configure_logging(level: str | None = None, **context) -> None:
    """JSON lines with a timestamp and level; `context` (job, run_id, tick…) on every line."""
    configure_json(level)
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v is not None})
