"""logs: one JSON object per line, a run-time level gate, and no secret ever in the output."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import structlog

from agentspoonsd.logs import (
    REDACTED,
    Disclosed,
    LevelGate,
    configure_logging,
    get_logger,
    resolve_format,
)

SECRET = "s3cr3t-T0KEN_value"


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def stream() -> io.BytesIO:
    return io.BytesIO()


@pytest.fixture
def lines(stream: io.BytesIO) -> Callable[[], list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        raw = stream.getvalue()
        assert raw == b"" or raw.endswith(b"\n")
        return [orjson.loads(line) for line in raw.splitlines()]

    return read


@pytest.fixture
def gate(stream: io.BytesIO) -> LevelGate:
    return configure_logging("info", "json", stream)


def test_each_line_is_a_json_object_with_the_head_first(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    log = get_logger("agentspoonsd.test")
    before = datetime.now(UTC)
    log.info("client_connected", peer="127.0.0.1:5000", token="dashboard", duration_s=1.5)
    log.warning("second", n=2)
    entries = lines()
    assert len(entries) == 2
    assert stream.getvalue().count(b"\n") == 2
    first = entries[0]
    assert list(first)[:4] == ["timestamp", "level", "logger", "event"]
    assert first["level"] == "info"
    assert first["logger"] == "agentspoonsd.test"
    assert first["event"] == "client_connected"
    assert first["peer"] == "127.0.0.1:5000"
    assert first["token"] == "dashboard"
    assert first["duration_s"] == 1.5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", first["timestamp"])
    stamp = datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(UTC) + timedelta(seconds=1)
    assert entries[1]["level"] == "warning" and entries[1]["n"] == 2


def test_non_json_values_are_rendered_as_text(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    get_logger("t").info("odd", thing=Thing(), when=datetime(2024, 1, 1, tzinfo=UTC))
    entry = lines()[0]
    assert entry["thing"] == "a thing"
    assert entry["when"].startswith("2024-01-01T00:00:00")


def test_context_variables_are_merged(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    structlog.contextvars.bind_contextvars(request_id="r1")
    get_logger("t").info("with_context")
    assert lines()[0]["request_id"] == "r1"


def test_level_gate_drops_below_threshold(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    log = get_logger("t")
    log.debug("dropped")
    log.info("kept_info")
    log.warning("kept_warning")
    log.error("kept_error")
    log.critical("kept_critical")
    assert [e["event"] for e in lines()] == [
        "kept_info",
        "kept_warning",
        "kept_error",
        "kept_critical",
    ]


def test_set_changes_the_level_of_already_bound_loggers(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    bound = get_logger("t").bind(peer="p")
    bound.debug("before")
    gate.set("debug")
    bound.debug("after_debug")
    gate.set("error")
    bound.warning("hidden_warning")
    bound.error("shown_error")
    gate.set("warning")
    bound.info("hidden_info")
    bound.warning("shown_warning")
    assert [e["event"] for e in lines()] == ["after_debug", "shown_error", "shown_warning"]
    assert all(e["peer"] == "p" for e in lines())


def test_initial_level_is_respected(
    stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    configure_logging("warning", "json", stream)
    log = get_logger("t")
    log.info("no")
    log.warning("yes")
    assert [e["event"] for e in lines()] == ["yes"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(KeyError):
        LevelGate("verbose")


# --- redaction ------------------------------------------------------------------------------------


def test_secret_keys_are_redacted(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    get_logger("t").info(
        "auth_attempt",
        access_token=SECRET,
        authorization=f"Bearer {SECRET}",
        Authorization=SECRET,
        password=SECRET,
        secret=SECRET,
        token="dashboard",
    )
    entry = lines()[0]
    for key in ("access_token", "authorization", "Authorization", "password", "secret"):
        assert entry[key] == REDACTED, key
    assert entry["token"] == "dashboard"  # a token NAME is not a secret
    assert SECRET.encode() not in stream.getvalue()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"Bearer {SECRET}", f"Bearer {REDACTED}"),
        (f"bearer {SECRET}", f"bearer {REDACTED}"),
        (f"BEARER {SECRET}", f"BEARER {REDACTED}"),
        (f"header was 'Bearer  {SECRET}' ok", f"header was 'Bearer  {REDACTED}' ok"),
        (f"/?access_token={SECRET}", f"/?access_token={REDACTED}"),
        (f"/s?a=1&access_token={SECRET}&b=2", f"/s?a=1&access_token={REDACTED}&b=2"),
        (f"GET /?ACCESS_TOKEN={SECRET} HTTP/1.1", f"GET /?ACCESS_TOKEN={REDACTED} HTTP/1.1"),
    ],
)
def test_secrets_inside_string_values_are_redacted(
    gate: LevelGate,
    stream: io.BytesIO,
    lines: Callable[[], list[dict[str, Any]]],
    value: str,
    expected: str,
) -> None:
    get_logger("t").info("request", target=value)
    assert lines()[0]["target"] == expected
    assert SECRET.encode() not in stream.getvalue()


def test_secret_in_the_event_name_is_redacted(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    get_logger("t").info(f"GET /?access_token={SECRET}")
    assert SECRET.encode() not in stream.getvalue()
    assert lines()[0]["event"] == f"GET /?access_token={REDACTED}"


def test_nested_values_are_redacted_without_touching_the_callers_objects(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    headers = {"authorization": f"Bearer {SECRET}", "host": "example"}
    request = {"headers": headers, "target": f"/?access_token={SECRET}", "tokens": ["dashboard"]}
    pairs = [("authorization", f"Bearer {SECRET}"), ("x", f"?access_token={SECRET}")]
    get_logger("t").info("upgrade", request=request, pairs=pairs)
    entry = lines()[0]
    assert SECRET.encode() not in stream.getvalue()
    assert entry["request"]["headers"] == {"authorization": REDACTED, "host": "example"}
    assert entry["request"]["target"] == f"/?access_token={REDACTED}"
    assert entry["request"]["tokens"] == ["dashboard"]
    assert entry["pairs"][0] == ["authorization", f"Bearer {REDACTED}"]
    # the caller's objects are its own: logging must not change them
    assert headers["authorization"] == f"Bearer {SECRET}"
    assert request["target"] == f"/?access_token={SECRET}"
    assert pairs[0] == ("authorization", f"Bearer {SECRET}")


def test_bound_context_is_redacted(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    log = get_logger("t").bind(authorization=SECRET, target=f"/?access_token={SECRET}")
    log.info("one")
    log.info("two")
    assert SECRET.encode() not in stream.getvalue()
    assert [e["authorization"] for e in lines()] == [REDACTED, REDACTED]


def test_ordinary_values_are_untouched(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    get_logger("t").info(
        "plain",
        token="dashboard",
        reason="invalid_token",
        note="access granted",
        n=3,
        items=["a", 1, None],
        target="/stream?symbol=BTC",
    )
    entry = lines()[0]
    assert entry["token"] == "dashboard"
    assert entry["reason"] == "invalid_token"
    assert entry["note"] == "access granted"
    assert entry["n"] == 3
    assert entry["items"] == ["a", 1, None]
    assert entry["target"] == "/stream?symbol=BTC"


# --- exceptions -----------------------------------------------------------------------------------


def test_exception_carries_its_traceback(
    gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    def failing() -> None:
        raise ValueError("boom happened")

    try:
        failing()
    except ValueError:
        get_logger("agentspoonsd.supervisor").exception("service_crashed", service="hub")
    entry = lines()[0]
    assert list(entry)[:4] == ["timestamp", "level", "logger", "event"]
    assert entry["level"] == "error"
    assert entry["event"] == "service_crashed"
    assert entry["service"] == "hub"
    traceback = entry["exception"]
    assert traceback.startswith("Traceback (most recent call last):")
    assert "in failing" in traceback
    assert "ValueError: boom happened" in traceback
    assert "exc_info" not in entry


def test_exc_info_true_on_error(gate: LevelGate, lines: Callable[[], list[dict[str, Any]]]) -> None:
    try:
        {}["missing"]
    except KeyError:
        get_logger("t").error("lookup_failed", exc_info=True)
    assert "KeyError: 'missing'" in lines()[0]["exception"]


def test_secret_inside_a_traceback_is_redacted(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    try:
        raise RuntimeError(f"upgrade failed for GET /?access_token={SECRET} (Bearer {SECRET})")
    except RuntimeError:
        get_logger("t").exception("crash")
    assert SECRET.encode() not in stream.getvalue()
    assert "RuntimeError: upgrade failed" in lines()[0]["exception"]


def test_console_format_renders_and_redacts(stream: io.BytesIO) -> None:
    configure_logging("info", "console", stream)
    get_logger("t").info("hello_console", token="dashboard", authorization=f"Bearer {SECRET}")
    out = stream.getvalue().decode()
    assert "hello_console" in out and "dashboard" in out
    assert SECRET not in out


# --- formats: auto, json, console -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "tty", "expected"),
    [
        ("auto", True, "console"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("json", False, "json"),
        ("console", True, "console"),
        ("console", False, "console"),
    ],
)
def test_the_format_follows_the_setting_and_the_terminal(
    fmt: str, tty: bool, expected: str
) -> None:
    assert resolve_format(fmt, tty=tty) == expected


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        resolve_format("xml", tty=True)


class FakeTerminal(io.BytesIO):
    """A byte stream that says it is a terminal: what `auto` looks at."""

    def isatty(self) -> bool:
        return True


def test_auto_writes_json_to_a_stream_that_is_not_a_terminal(
    stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    configure_logging("info", "auto", stream)
    get_logger("t").info("plain_event", n=1)
    assert lines()[0]["event"] == "plain_event"


def test_auto_writes_console_lines_to_a_terminal_with_colours_unless_no_color() -> None:
    terminal = FakeTerminal()
    configure_logging("info", "auto", terminal, environ={})
    get_logger("agentspoonsd.t").info("hello_console", peer="127.0.0.1:5000")
    text = terminal.getvalue().decode()
    assert text.endswith("\n") and not text.lstrip().startswith("{")
    assert "hello_console" in text and "127.0.0.1:5000" in text
    assert "\x1b[" in text  # ANSI colours on a terminal

    plain = FakeTerminal()
    configure_logging("info", "auto", plain, environ={"NO_COLOR": "1"})
    get_logger("t").info("hello_console")
    assert b"hello_console" in plain.getvalue() and b"\x1b[" not in plain.getvalue()


def test_console_forced_on_a_pipe_has_no_colours(stream: io.BytesIO) -> None:
    configure_logging("info", "console", stream, environ={})
    get_logger("t").warning("forced_console", n=2)
    text = stream.getvalue().decode()
    assert "forced_console" in text and "n=2" in text and "\x1b[" not in text


def test_console_level_gate_applies(stream: io.BytesIO) -> None:
    gate = configure_logging("warning", "console", stream)
    get_logger("t").info("hidden_info")
    gate.set("info")
    get_logger("t").info("shown_info")
    text = stream.getvalue().decode()
    assert "hidden_info" not in text and "shown_info" in text


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_every_format_redacts_keys_text_and_tracebacks(fmt: str) -> None:
    out = FakeTerminal()  # a terminal: the console renderer at its richest (colours)
    configure_logging("info", fmt, out, environ={})
    log = get_logger("t")
    log.info("keys", authorization=f"Bearer {SECRET}", access_token=SECRET, password=SECRET)
    log.info("text", target=f"/?access_token={SECRET}", nested={"h": [f"Bearer {SECRET}"]})
    log.info(f"GET /?access_token={SECRET}")
    try:
        raise RuntimeError(f"upgrade failed for /?access_token={SECRET} (Bearer {SECRET})")
    except RuntimeError:
        log.exception("crash")
    text = out.getvalue().decode()
    assert "RuntimeError: upgrade failed" in text and "crash" in text
    assert SECRET not in text


# --- values logged on purpose, and the fields meant to be copied ---------------------------------


def test_a_disclosed_value_keeps_its_token_but_a_secret_key_is_still_redacted(
    gate: LevelGate, stream: io.BytesIO, lines: Callable[[], list[dict[str, Any]]]
) -> None:
    url = f"http://127.0.0.1:8766/#access_token={SECRET}"
    get_logger("t").info(
        "daemon_started", dashboard_url=Disclosed(url), access_token=Disclosed(SECRET)
    )
    entry = lines()[0]
    assert entry["dashboard_url"] == url
    assert entry["access_token"] == REDACTED
    assert stream.getvalue().count(SECRET.encode()) == 1
    # The same text, not marked: redacted as ever.
    get_logger("t").info("daemon_started", dashboard_url=url)
    assert lines()[1]["dashboard_url"] == f"http://127.0.0.1:8766/#access_token={REDACTED}"


def test_console_puts_each_copyable_field_on_a_line_of_its_own(stream: io.BytesIO) -> None:
    configure_logging("info", "console", stream, environ={})
    get_logger("agentspoonsd.daemon").info(
        "daemon_started",
        version="1.0",
        config="/etc/agentspoonsd/agentspoonsd.toml",
        websocket_url="ws://127.0.0.1:8765/",
        dashboard_url="http://127.0.0.1:8766/",
        watch="agentspoonsd watch ws://127.0.0.1:8765/",
    )
    text = stream.getvalue().decode()
    first, *rest = text.rstrip("\n").split("\n")
    assert "daemon_started" in first and "version=1.0" in first
    assert "ws://" not in first and "/etc/agentspoonsd" not in first
    # Each value whole and alone after its name, so a double- or triple-click copies just it.
    assert [line.split() for line in rest] == [
        ["config", "/etc/agentspoonsd/agentspoonsd.toml"],
        ["websocket_url", "ws://127.0.0.1:8765/"],
        ["dashboard_url", "http://127.0.0.1:8766/"],
        ["watch", "agentspoonsd", "watch", "ws://127.0.0.1:8765/"],
    ]
    assert all(line.startswith("    ") for line in rest)
