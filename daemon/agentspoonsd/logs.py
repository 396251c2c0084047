"""Structured logging: the one place structlog is configured.

`[log] format` chooses the renderer (`resolve_format`): ``json``, one JSON object per line with
``timestamp`` (ISO-8601 UTC), ``level``, ``event``, ``logger`` and the event's fields, for
journald, pipes and files; ``console``, structlog's human renderer (coloured on a terminal unless
``NO_COLOR`` is set), with the fields meant to be copied (`COPYABLE_FIELDS`: URLs, a command)
each on a line of its own; ``auto`` (the default), console when stdout is a terminal, else json.
Events are nouns with fields (``client_connected peer=… token=dashboard``), never prose.

Secrets never reach the output, in any format: `redact_secrets` runs on every event, whatever
the caller passed, after tracebacks became text. The one way past it is `Disclosed`: a value the
daemon shows on purpose (the ephemeral token's URL at start), exempt from the in-text pattern but
never from the secret keys.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, BinaryIO, Literal

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

FORMATS = ("auto", "json", "console")
# Fields a person copies from a console (URLs, a command): each on a line of its own, below the
# event's line, so a double- or triple-click selects the value and nothing else.
COPYABLE_FIELDS = ("config", "websocket_url", "dashboard_url", "watch")


class Disclosed(str):
    """A string logged on purpose although it holds a credential: the ephemeral token's URLs.

    `redact_secrets` leaves the text of such a value whole (it is logged as a plain string), but
    a secret key (`SECRET_KEYS`) is redacted whatever its value. Only the ephemeral token, made
    at start and shown once so a fresh daemon can be used, is ever wrapped in this; a configured
    token is never known in plain text to the daemon.
    """

    __slots__ = ()


def resolve_format(fmt: str, *, tty: bool) -> Literal["json", "console"]:
    """The renderer for `[log] format`: `auto` is console on a terminal (`tty`), else json.

    Raises ValueError for anything but the values of `FORMATS`."""
    if fmt == "auto":
        return "console" if tty else "json"
    if fmt == "json":
        return "json"
    if fmt == "console":
        return "console"
    raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")


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


def _redact_field(key: object, value: object) -> object:
    if isinstance(key, str) and key.lower() in SECRET_KEYS:
        return REDACTED
    if isinstance(value, Disclosed):
        return str(value)  # a plain str from here on: nothing downstream needs to know
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


class ConsoleLines:
    """structlog's ConsoleRenderer, with each field of `COPYABLE_FIELDS` present on a line of its
    own below the event's line: ``    name  value``, names aligned."""

    def __init__(self, *, colors: bool) -> None:
        self._renderer = structlog.dev.ConsoleRenderer(colors=colors)

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> str:
        below = [(key, event.pop(key)) for key in COPYABLE_FIELDS if key in event]
        line = self._renderer(logger, method, event)
        if not below:
            return line
        width = max(len(key) for key, _ in below)
        return line + "".join(f"\n    {key.ljust(width)}  {value}" for key, value in below)


def _encode(logger: WrappedLogger, method: str, line: str) -> bytes:
    # Both renderers write bytes to the same stream: what reaches it is decided in one place.
    return line.encode("utf-8", "replace")


def _is_tty(stream: BinaryIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def configure_logging(
    level: str,
    fmt: str,
    stream: BinaryIO | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
) -> LevelGate:
    """Configure structlog for the whole process; returns the gate that sets the level later.

    `stream` (default: stdout) receives one event per write, flushed. `fmt` is resolved by
    `resolve_format` against whether `stream` is a terminal; the console renderer colours its
    output only on a terminal and when `environ` has no ``NO_COLOR``. Raises ValueError for an
    unknown `fmt`."""
    out = stream if stream is not None else sys.stdout.buffer
    tty = _is_tty(out)
    gate = LevelGate(level)
    # Any: structlog types a processor as taking the event dict, and _encode takes the line
    # the renderer before it made.
    shared: list[Any] = [
        gate,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text first, so a credential in an exception message is redacted.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    if resolve_format(fmt, tty=tty) == "console":
        colors = tty and "NO_COLOR" not in environ
        processors = [*shared, ConsoleLines(colors=colors), _encode]
    else:
        processors = [
            *shared,
            order_keys,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.BytesLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    return gate


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger whose events carry ``logger=name``."""
    # configure_logging's wrapper class (structlog types get_logger's result as Any).
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger()
    return logger.bind(logger=name)
