"""Structured logging: the one place structlog is configured.

Every line on stdout is one JSON object with ``timestamp`` (ISO-8601 UTC), ``level``, ``event``,
``logger`` and the event's fields; ``format = "console"`` renders the same events for a terminal.
Events are nouns with fields (``client_connected peer=… token=dashboard``), never prose.

Secrets never reach the output: `redact_secrets` runs on every event, whatever the caller passed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import IO, Any

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Keys whose values are credentials. `token` is deliberately absent: it carries a token's *name*.
SECRET_KEYS = frozenset({"access_token", "authorization", "bearer", "password", "secret"})
REDACTED = "[redacted]"
_SECRET_IN_TEXT = re.compile(r"(access_token=|Bearer\s+)[^&\s\"']+", re.IGNORECASE)


class LevelGate:
    """The minimum level, changeable at run time (SIGHUP) for loggers already bound."""

    def __init__(self, level: str) -> None:
        self.set(level)

    def set(self, level: str) -> None:
        self.threshold = LEVELS[level]

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        if LEVELS.get(method, logging.ERROR) < self.threshold:
            raise structlog.DropEvent
        return event


def redact_secrets(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Replace credential-bearing values, and credentials embedded in any string value."""
    _redact(event)
    return event


def _redact(mapping: MutableMapping[str, Any]) -> None:
    # In place on the event dict (structlog's own copy); nested values are copied, never mutated:
    # they belong to the caller.
    for key, value in mapping.items():
        mapping[key] = _redact_field(key, value)


def _redact_field(key: Any, value: Any) -> Any:
    if isinstance(key, str) and key.lower() in SECRET_KEYS:
        return REDACTED
    if isinstance(value, str):
        lowered = value.lower()  # the pattern is case-insensitive, so must this cheap test be
        if "access_token" in lowered or "bearer" in lowered:
            return _SECRET_IN_TEXT.sub(lambda m: m.group(1) + REDACTED, value)
    elif isinstance(value, dict):
        return {k: _redact_field(k, v) for k, v in value.items()}
    elif isinstance(value, list | tuple):
        return [_redact_field(None, item) for item in value]
    return value


def order_keys(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """timestamp, level, logger, event first: what a reader scans for; then the fields."""
    head = {k: event.pop(k) for k in ("timestamp", "level", "logger", "event") if k in event}
    head.update(event)
    return head


def _orjson_dumps(event: EventDict, **_: Any) -> bytes:
    return orjson.dumps(event, default=str)


def configure_logging(level: str, fmt: str, stream: IO[bytes] | None = None) -> LevelGate:
    """Configure structlog for the whole process; returns the gate that sets the level later."""
    gate = LevelGate(level)
    shared: list[Any] = [
        gate,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        processors = [
            *shared,
            redact_secrets,
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
        ]
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors = [
            *shared,
            # Tracebacks become text first, so a credential in an exception message is redacted.
            structlog.processors.format_exc_info,
            redact_secrets,
            order_keys,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        factory = structlog.BytesLoggerFactory(stream or sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return gate


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry ``logger=name``."""
    return structlog.get_logger().bind(logger=name)
