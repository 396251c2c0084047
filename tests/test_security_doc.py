"""docs/SECURITY.md stays true: every limit it lists by its setting shows that setting's default,
and every limit setting of `[server]`, `[auth]` and `[health]` is listed.

The document is the operator's one list of what a peer can make the daemon do (issue 15's
closing condition); a default changed in the settings models without it would make the list lie.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agentspoonsd import admission, connection, protocol, routing, ws
from agentspoonsd.settings import load_settings

SECURITY = Path(__file__).resolve().parents[1] / "docs" / "SECURITY.md"
KIB = 1024
# Defaults that are not a figure: what the document says instead.
IN_WORDS = {("server", "allowed_origins"): "the dashboard's own origins"}

# A row's setting cell naming nothing but settings: `server.x`, `[health] x`, comma-separated.
SETTING = re.compile(r"`(?:\[(server|auth|health)\] |(server|auth|health)\.)(\w+)`")
ONLY_SETTINGS = re.compile(rf"^{SETTING.pattern}(?:, {SETTING.pattern})*$")
CONSTANT = re.compile(
    r"^`(admission|connection|protocol|routing|ws)\.([A-Z_]+)`(?: \(constant\))?$"
)

# Settings the list must name (limits, deadlines and the address rules); the rest of the models
# (host, port, TLS files, shutdown_timeout, listen_backlog, public_url...) are no peer's limit.
LIMIT_SETTINGS = {
    "server": (
        "max_connections",
        "handshake_timeout",
        "max_backlog_bytes",
        "send_buffer_bytes",
        "max_message_size",
        "ping_interval",
        "idle_timeout",
        "max_client_messages_per_second",
        "max_client_errors",
        "max_client_frames_per_second",
        "max_client_bytes_per_second",
        "allowed_origins",
        "max_connections_per_ip",
        "max_handshakes_per_ip",
        "trusted_proxies",
        "forwarded_header",
    ),
    "auth": ("max_failures_per_minute", "tokens_file"),
    "health": (
        "max_connections",
        "max_connections_per_ip",
        "request_timeout",
        "idle_timeout",
        "allowed_hosts",
        "metrics_token_sha256",
    ),
}


@pytest.fixture(autouse=True)
def defaults_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in defaults: no AGENTSPOONSD_* variable of the test's environment counts."""
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)


def table_rows() -> list[list[str]]:
    """The body rows of every table in SECURITY.md, as stripped cells."""
    rows = []
    for line in SECURITY.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def renderings(value: object) -> list[str]:
    """How the document may write `value`: 20,000; 64 KiB; 4 MiB; 10 s; unset."""
    if value is None:
        return ["unset"]
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        shown = [f"{value:,}"]
        if value % (KIB * KIB) == 0:
            shown.append(f"{value // (KIB * KIB)} MiB")
        elif value % KIB == 0:
            shown.append(f"{value // KIB} KiB")
        return shown
    if isinstance(value, float):
        return [f"{value:g} s"]
    return []


def shows(cell: str, value: object) -> bool:
    """`cell` writes `value` as a whole figure (20 is not shown by 20,000 or 120)."""
    return any(
        re.search(rf"(?<![\d,.]){re.escape(text)}(?![\d,]|\.\d)", cell)
        for text in renderings(value)
    )


def default(section: str, key: str) -> object:
    return getattr(getattr(load_settings(None), section), key)


def setting_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    """(default cell, [(section, key)]) of each row whose setting cell names settings only."""
    found = []
    for row in table_rows():
        if len(row) == 4 and ONLY_SETTINGS.match(row[2]):
            keys = [(m[0] or m[1], m[2]) for m in SETTING.findall(row[2])]
            found.append((row[1], keys))
    return found


def test_the_document_has_its_tables() -> None:
    assert len(setting_rows()) >= 20  # the parse found the tables, so the checks below check


@pytest.mark.parametrize(
    ("cell", "keys"),
    setting_rows(),
    ids=[",".join(f"{s}.{k}" for s, k in keys) for _, keys in setting_rows()],
)
def test_each_listed_setting_shows_its_default(cell: str, keys: list[tuple[str, str]]) -> None:
    if len(keys) == 1 and keys[0] in IN_WORDS:
        assert default(*keys[0]) is None  # computed from the ports at start
        assert cell == IN_WORDS[keys[0]]
        return
    values = [default(section, key) for section, key in keys]
    if all(not renderings(value) for value in values):
        pytest.skip(f"{keys}: a default the document describes in words ({cell!r})")
    for (section, key), value in zip(keys, values, strict=True):
        if renderings(value):
            assert shows(cell, value), (
                f"{section}.{key} defaults to {value!r}; the row says {cell!r}"
            )


def test_each_listed_constant_shows_its_value() -> None:
    modules = {
        "admission": admission,
        "connection": connection,
        "protocol": protocol,
        "routing": routing,
        "ws": ws,
    }
    checked = 0
    for row in table_rows():
        match = CONSTANT.match(row[2]) if len(row) == 4 else None
        if match:
            value = getattr(modules[match[1]], match[2])
            assert shows(row[1], value), (
                f"{match[1]}.{match[2]} is {value!r}; the row says {row[1]!r}"
            )
            checked += 1
    assert checked >= 2


def test_every_limit_setting_is_listed() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    named = {(m[0] or m[1], m[2]) for m in SETTING.findall(text)}
    missing = [
        f"{section}.{key}"
        for section, keys in LIMIT_SETTINGS.items()
        for key in keys
        if (section, key) not in named
    ]
    assert not missing, f"SECURITY.md lists no row for {missing}"
    for section, keys in LIMIT_SETTINGS.items():  # and each still exists in its model
        model = type(getattr(load_settings(None), section))
        assert set(keys) <= set(model.model_fields), section
