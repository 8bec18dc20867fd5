"""structlog JSON lines, one event per line, in every process of a job: the driver
(jobs/logs.py adds the job's context) and the Ray workers of the CPU and model stages, which
nothing else configures. It lives here, the lowest layer with behaviour, so that both
stages can use it (imports flow jobs -> pipeline -> actors -> schemas).

Secret values never reach a log line: every string in an event is scanned for the values of
credential-like environment variables (and of variables forwarded to a cluster with
`--forward-env`) and each occurrence is replaced by `***`.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import structlog
import structlog.tracebacks

MASK = "***"
# Name parts that mark an environment variable as a credential (AWS_SECRET_ACCESS_KEY, HF_TOKEN…).
_SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|KEY)(_|$)", re.IGNORECASE)
# Shorter values are too likely to occur by chance in ordinary text to be masked usefully.
_MIN_SECRET_LEN = 6
_secrets: set[str] = set()


def mask_values(values) -> None:
    """Mask these values in every later log line of this process."""
    _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LEN)


def secret_env_values(environ=os.environ) -> list[str]:
    return [value for name, value in environ.items() if _SECRET_NAME.search(name)]


def _mask(value):
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value


def mask_secrets(_logger, _method, event_dict):
    """structlog processor: replace every known secret value by `***`."""
    return _mask(event_dict) if _secrets else event_dict


def configure_json(level: str | None = None) -> None:
    """JSON lines on stderr with a timestamp and level (TESSERA_LOG_LEVEL, default INFO)."""
    level_name = (level or os.environ.get("TESSERA_LOG_LEVEL") or "INFO").upper()
    mask_values(secret_env_values())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks as data, without each frame's local variables (large, and they may hold secrets).
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            mask_secrets,
            structlog.processors.JSONRenderer(default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def ensure_configured() -> None:
    """JSON logging in this process, once: a Ray worker starts with structlog unconfigured
    (its default is coloured console text). A process configured already (the driver, a
    test capturing logs) keeps its configuration."""
    if not structlog.is_configured():
        configure_json()


def log_item_error(run_id: str | None, job: str | None, row_id: str, stage: str, code: str, message: str | None) -> None:
    """One `item_error` line for a row that failed in `stage`. `message` is the row's
    error_message, which names no credential (callers build it from display uris)."""
    ensure_configured()
    structlog.get_logger("tessera").warning(
        "item_error", run_id=run_id, job=job, id=row_id, stage=stage, error_code=code, error_message=message
    )
