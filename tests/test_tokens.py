"""Tokens: `expires` and `max_connections`, `auth.tokens_file`, editing that file, and revocation
on SIGHUP (the reload closes a revoked token's live connections with 4001), end to end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from agentspoonsd import tokenfile, tokenkeeper
from agentspoonsd.auth import AuthFailure, Grant, TokenSpec, TokenStore, hash_token
from agentspoonsd.daemon import Daemon
from agentspoonsd.logs import configure_logging
from agentspoonsd.settings import (
    ConfigError,
    Settings,
    TokenSettings,
    load_settings,
    parse_tokens_file,
    read_tokens_file,
    redacted,
)
from agentspoonsd.tokenfile import TokenFileError, append_token, entry_text, remove_token
from daemon_process import DaemonProcess, config_text, new_token, token_block
from helpers import bearer, next_update

DIGEST_A = hashlib.sha256(b"token-a").hexdigest()
DIGEST_B = hashlib.sha256(b"token-b").hexdigest()
DIGEST_C = hashlib.sha256(b"token-c").hexdigest()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AGENTSPOONSD_* variable from the caller's shell, and no ./agentspoonsd.toml around."""
    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def block(name: str, digest: str, table: str = "auth.tokens", extra: str = "") -> str:
    return f'[[{table}]]\nname = "{name}"\nsha256 = "{digest}"\n{extra}\n'


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def config_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# --- expires and max_connections in the settings --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-31T00:00:00Z", datetime(2026, 12, 31, tzinfo=UTC)),  # TOML offset date-time
        ('"2026-12-31T00:00:00Z"', datetime(2026, 12, 31, tzinfo=UTC)),  # a string
        ('"2026-12-31t00:00:00z"', datetime(2026, 12, 31, tzinfo=UTC)),  # RFC 3339 allows t, z
        ('"2026-12-31 02:00:00+02:00"', datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T01:30:00.25+01:30", datetime(2026, 12, 31, 0, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_expires_accepts_rfc3339_with_a_timezone(
    tmp_path: Path, value: str, expected: datetime
) -> None:
    path = write(tmp_path / "c.toml", block("a", DIGEST_A, extra=f"expires = {value}"))
    (token,) = load_settings(path).auth.tokens
    assert token.expires == expected and token.expires.utcoffset() is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2026-12-31T00:00:00", "needs a timezone"),  # TOML local date-time
        ('"2026-12-31T00:00:00"', "needs a timezone"),
        ("2026-12-31", "RFC 3339"),  # a TOML date
        ('"2026-12-31"', "RFC 3339"),
        ('"20261231T000000Z"', "RFC 3339"),  # ISO 8601 basic format: not RFC 3339
        ('"tomorrow"', "RFC 3339"),
        ('"2026-02-30T00:00:00Z"', "not a valid date-time"),
        ("1798675200", "RFC 3339"),  # no epoch numbers
        ("true", "RFC 3339"),
    ],
)
def test_expires_without_timezone_or_not_rfc3339_is_refused(
    tmp_path: Path, value: str, message: str
) -> None:
    path = write(tmp_path / "c.toml", block("a", DIGEST_A, extra=f"expires = {value}"))
    error = config_error(path)
    assert f"{path}: auth.tokens[0].expires: " in error
    assert message in error


def test_expires_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"name": "a", "sha256": DIGEST_A, "expires": "2030-01-01T00:00:00+01:00"}
    monkeypatch.setenv("AGENTSPOONSD_AUTH__TOKENS", json.dumps([entry]))
    (token,) = load_settings(None).auth.tokens
    assert token.expires == datetime(2029, 12, 31, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "greater than or equal to 1"), ("-2", "greater than"), ("true", "not a boolean")],
)
def test_max_connections_bounds(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path / "c.toml", block("a", DIGEST_A, extra=f"max_connections = {value}"))
    error = config_error(path)
    assert f"{path}: auth.tokens[0].max_connections: " in error and message in error


def test_defaults_never_expire_and_have_no_connection_limit() -> None:
    token = TokenSettings(name="a", sha256=DIGEST_A)
    assert token.expires is None and token.max_connections is None
    assert not token.expired(datetime(9999, 1, 1, tzinfo=UTC))


def test_one_token_under_two_names_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", block("a", DIGEST_A) + block("b", DIGEST_A))
    assert "the same sha256" in config_error(path)


# --- TokenStore: expiry and the grant -------------------------------------------------------------

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def store_of(*tokens: TokenSettings, enabled: bool = True) -> TokenStore:
    return TokenStore(tokens, enabled=enabled)


def test_grant_carries_max_connections_and_expires() -> None:
    token = TokenSettings(
        name="a", sha256=hash_token("A"), symbols=["X"], expires=T0, max_connections=3
    )
    grant = store_of(token).authenticate("A", now=T0 - timedelta(days=1))
    assert grant == Grant("a", frozenset({"X"}), max_connections=3, expires=T0)
    assert isinstance(grant, Grant) and grant.max_connections == 3 and grant.expires == T0


def test_expiry_boundary() -> None:
    store = store_of(TokenSettings(name="a", sha256=hash_token("A"), expires=T0))
    assert isinstance(store.authenticate("A", now=T0 - timedelta(microseconds=1)), Grant)
    assert store.authenticate("A", now=T0) is AuthFailure.EXPIRED  # the instant itself: refused
    assert store.authenticate("A", now=T0 + timedelta(seconds=1)) is AuthFailure.EXPIRED
    # Other offsets name the same instant.
    paris = timezone(timedelta(hours=2))
    assert store.authenticate("A", now=T0.astimezone(paris)) is AuthFailure.EXPIRED
    # A wrong token is invalid whatever the configured ones' expiry: nothing leaks.
    assert store.authenticate("B", now=T0) is AuthFailure.INVALID
    assert store.authenticate(None, now=T0) is AuthFailure.MISSING


def test_expired_has_its_own_label() -> None:
    assert AuthFailure.EXPIRED.value == "expired"
    assert len({f.value for f in AuthFailure}) == len(AuthFailure)


def test_default_clock_is_the_wall_clock() -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    future = datetime.now(UTC) + timedelta(hours=1)
    store = store_of(
        TokenSettings(name="old", sha256=hash_token("OLD"), expires=past),
        TokenSettings(name="new", sha256=hash_token("NEW"), expires=future),
    )
    assert store.authenticate("OLD") is AuthFailure.EXPIRED
    assert isinstance(store.authenticate("NEW"), Grant)


def test_injected_clock() -> None:
    now = [T0 - timedelta(seconds=1)]
    store = TokenStore(
        [TokenSettings(name="a", sha256=hash_token("A"), expires=T0)], clock=lambda: now[0]
    )
    assert isinstance(store.authenticate("A"), Grant)
    now[0] = T0
    assert store.authenticate("A") is AuthFailure.EXPIRED


def test_disabled_auth_ignores_expiry() -> None:
    store = store_of(TokenSettings(name="a", sha256=hash_token("A"), expires=T0), enabled=False)
    assert store.authenticate("A", now=T0).name == "anonymous"  # type: ignore[union-attr]


def test_expired_map_and_grant_lookup() -> None:
    store = store_of(
        TokenSettings(name="a", sha256=DIGEST_A, expires=T0),
        TokenSettings(name="b", sha256=DIGEST_B, expires=T0 + timedelta(hours=1)),
        TokenSettings(name="c", sha256=DIGEST_C),
    )
    assert store.expired(T0 - timedelta(seconds=1)) == {}
    assert store.expired(T0) == {"a": T0}
    assert set(store.expired(T0 + timedelta(days=1))) == {"a", "b"}
    assert store.grant("c") == Grant("c", frozenset({"*"}))
    assert store.grant("nope") is None


def test_revoked_since() -> None:
    old = store_of(
        TokenSettings(name="kept", sha256=DIGEST_A),
        TokenSettings(name="gone", sha256=DIGEST_B),
        TokenSettings(name="rotated", sha256=DIGEST_C),
        TokenSettings(name="expiring", sha256=hash_token("E"), expires=T0),
        TokenSettings(name="rescoped", sha256=hash_token("R"), symbols=["X"]),
    )
    new = store_of(
        TokenSettings(name="kept", sha256=DIGEST_A),
        TokenSettings(name="rotated", sha256=hash_token("other")),
        TokenSettings(name="expiring", sha256=hash_token("E"), expires=T0),
        TokenSettings(name="rescoped", sha256=hash_token("R"), symbols=["Y"]),
        TokenSettings(name="added", sha256=hash_token("N")),
    )
    assert new.revoked_since(old, T0 - timedelta(seconds=1)) == {
        "gone": "removed",
        "rotated": "replaced",
    }
    assert new.revoked_since(old, T0) == {
        "gone": "removed",
        "rotated": "replaced",
        "expiring": "expired",
    }
    # Auth switched off: every client is welcome, nothing is closed. Switched on: the anonymous
    # connections the old store let in are.
    assert store_of(enabled=False).revoked_since(old, T0) == {}
    assert new.revoked_since(
        store_of(TokenSettings(name="x", sha256=DIGEST_A), enabled=False), T0
    ) == {"anonymous": "auth_enabled"}


# --- auth.tokens_file -----------------------------------------------------------------------------


def test_tokens_file_is_merged_after_the_config_tokens(tmp_path: Path) -> None:
    tokens = write(
        tmp_path / "tokens.toml",
        block("b", DIGEST_B, "tokens", 'symbols = ["ETH/USD"]\nmax_connections = 2')
        + block("c", DIGEST_C, "tokens", "expires = 2030-01-01T00:00:00Z"),
    )
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n' + block("a", DIGEST_A))
    auth = load_settings(path).auth
    assert [t.name for t in auth.tokens] == ["a"]
    assert [t.name for t in auth.file_tokens] == ["b", "c"]
    assert [t.name for t in auth.all_tokens] == ["a", "b", "c"]
    assert auth.file_tokens[0].max_connections == 2
    assert auth.file_tokens[1].expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert auth.tokens_file == tokens and auth.tokens_file_mode == 0o600


def test_tokens_file_errors_point_at_the_key(tmp_path: Path) -> None:
    tokens = write(
        tmp_path / "tokens.toml",
        block("b", DIGEST_B, "tokens") + block("c", "not-a-digest", "tokens", "expirs = 1"),
    )
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{tokens}: tokens[1].sha256: ")
    assert "not-a-digest" not in lines[0]  # a token pasted as its digest stays unprinted
    assert re.search(r"\(at line \d+, column 1\)$", lines[0])
    assert lines[1].startswith(f"{tokens}: tokens[1].expirs: unknown key; did you mean `expires`?")


def test_relative_tokens_file_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "tokens.toml", block("b", DIGEST_B, "tokens"))
    path = write(tmp_path / "etc" / "c.toml", '[auth]\ntokens_file = "tokens.toml"\n')
    os.chdir(tmp_path)  # not the config's directory
    auth = load_settings(Path("etc/c.toml")).auth
    assert auth.tokens_file == tmp_path / "etc" / "tokens.toml"
    assert auth.tokens_file.is_absolute()
    assert [t.name for t in auth.file_tokens] == ["b"]
    assert path.exists()


def test_tokens_file_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "t.toml", block("b", DIGEST_B, "tokens"))
    monkeypatch.setenv("AGENTSPOONSD_AUTH__TOKENS_FILE", "t.toml")  # relative to the cwd
    assert [t.name for t in load_settings(None).auth.all_tokens] == ["b"]
    monkeypatch.setenv("AGENTSPOONSD_AUTH__TOKENS_FILE", "missing.toml")
    error = config_error(None)
    assert "environment variable AGENTSPOONSD_AUTH__TOKENS_FILE: auth.tokens_file: " in error
    assert "missing.toml: file not found" in error


def test_missing_tokens_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[auth]\ntokens_file = "/nonexistent/tokens.toml"\n')
    error = config_error(path)
    assert error.startswith(f"{path}: auth.tokens_file: /nonexistent/tokens.toml: file not found")
    # The CLI reads the config without it (token new creates it).
    assert load_settings(path, read_tokens_file=False).auth.tokens_file == Path(
        "/nonexistent/tokens.toml"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[tokens]]\nname = 'a'\n", "tokens[0].sha256: Field required"),
        (block("a", DIGEST_A, "tokens") + block("b", "xyz", "tokens"), "tokens[1].sha256: "),
        (block("a", DIGEST_A, "tokens", "expires = 2030-01-01T00:00:00"), "needs a timezone"),
        (block("a", DIGEST_A, "tokens", "colour = 'red'"), "tokens[0].colour: unknown key"),
        ("[auth]\nenabled = false\n", "auth: unknown key"),
        (block("a", DIGEST_A, "tokens") + block("a", DIGEST_B, "tokens"), "duplicate token name"),
        ("[[tokens]\n", "invalid TOML"),
    ],
)
def test_bad_tokens_file_names_the_file_and_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    tokens = write(tmp_path / "tokens.toml", text)
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    error = config_error(path)
    assert error.startswith(f"{tokens}: ") and expected in error, error


def test_a_name_in_both_places_names_both(tmp_path: Path) -> None:
    tokens = write(
        tmp_path / "tokens.toml", block("z", DIGEST_C, "tokens") + block("a", DIGEST_B, "tokens")
    )
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n' + block("a", DIGEST_A))
    error = config_error(path)
    assert f'{tokens}: tokens[1].name: token "a" is also defined in {path}: auth.tokens[0]' in error


def test_one_token_in_both_places_under_two_names_is_refused(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_A, "tokens"))
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n' + block("a", DIGEST_A))
    assert f"{tokens}: tokens[0].sha256: " in config_error(path)


def test_empty_tokens_file_is_valid(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", tokenfile.HEADER)
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    assert load_settings(path).auth.all_tokens == ()


def test_tokens_file_that_is_a_directory(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tmp_path}"\n')
    assert "not a regular file (a directory)" in config_error(path)


def test_unreadable_tokens_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode 000 file")
    tokens = write(tmp_path / "tokens.toml", "", mode=0o000)
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    assert "cannot read: Permission denied" in config_error(path)


def test_read_tokens_file_reports_the_mode(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_B, "tokens"), mode=0o644)
    entries, mode = read_tokens_file(tokens)
    assert [t.name for t in entries] == ["b"] and mode == 0o644


def test_file_tokens_survive_the_reload_copy(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_B, "tokens"))
    settings = load_settings(write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n'))
    copied = settings.model_copy(update={"log": Settings().log})
    assert [t.name for t in copied.auth.all_tokens] == ["b"]


def test_redacted_lists_both_sources_without_full_digests(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_B, "tokens"))
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n' + block("a", DIGEST_A))
    data = redacted(load_settings(path))
    text = json.dumps(data)
    assert DIGEST_A not in text and DIGEST_B not in text
    assert [(t["name"], t["source"]) for t in data["auth"]["tokens"]] == [
        ("a", "config"),
        ("b", "tokens_file"),
    ]
    assert data["auth"]["tokens_file"] == str(tokens)


# --- the daemon: warnings, revocation on reload, expiry -------------------------------------------


class FakeServer:
    """What a reload uses of WebSocketServer: auth, limits, tls, close_token_connections."""

    def __init__(self, open_by_token: dict[str, int]) -> None:
        self.auth: Any = None
        self.limits: Any = None
        self.tls: Any = None  # plain ws:// (the daemon's reload looks at it)
        self.open = dict(open_by_token)
        self.closed: list[tuple[set[str], int, str]] = []

    def close_token_connections(
        self, names: set[str], code: int = 4001, reason: str = ""
    ) -> dict[str, int]:
        self.closed.append((set(names), code, reason))
        return {n: self.open.pop(n) for n in names if n in self.open}


def test_an_expiry_is_due_once_and_again_when_a_reload_moves_it() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    later = at + timedelta(hours=1)
    expired = {"a": at, "b": at}
    assert tokenkeeper.due_expiries(expired, set()) == expired
    assert tokenkeeper.due_expiries(expired, {("a", at)}) == {"b": at}
    assert tokenkeeper.due_expiries({"a": later}, {("a", at)}) == {"a": later}
    assert tokenkeeper.due_expiries({}, {("a", at)}) == {}


def test_token_store_warns_about_a_readable_tokens_file(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_B, "tokens"), mode=0o640)
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    settings = load_settings(path)
    daemon = Daemon(settings, path, configure_logging("debug", "json", stream := io.BytesIO()))
    store = daemon.tokens.store(settings)
    assert len(store) == 1 and store.grant("b") is not None
    (event,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert event["event"] == "tokens_file_permissions" and event["level"] == "warning"
    assert event["mode"] == "0640" and event["path"] == str(tokens)

    tokens.chmod(0o600)
    stream.truncate(0)
    stream.seek(0)
    daemon.tokens.store(load_settings(path))
    assert stream.getvalue() == b""  # 0600: nothing to say


def test_token_store_with_only_file_tokens_makes_no_ephemeral_token(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", block("b", DIGEST_B, "tokens"))
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    stream = io.BytesIO()
    daemon = Daemon(load_settings(path), path, configure_logging("debug", "json", stream))
    daemon.tokens.store(daemon.settings)
    assert b"auth_ephemeral_token" not in stream.getvalue()


def test_an_empty_tokens_file_means_no_one_not_an_ephemeral_token(tmp_path: Path) -> None:
    tokens = write(tmp_path / "tokens.toml", tokenfile.HEADER)
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    stream = io.BytesIO()
    daemon = Daemon(load_settings(path), path, configure_logging("debug", "json", stream))
    store = daemon.tokens.store(daemon.settings)
    assert len(store) == 0 and store.authenticate("anything") is AuthFailure.INVALID
    (event,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert event["event"] == "auth_no_tokens" and event["tokens_file"] == str(tokens)


def reload_setup(tmp_path: Path) -> tuple[Daemon, FakeServer, Path, io.BytesIO]:
    tokens = write(
        tmp_path / "tokens.toml",
        block("gone", DIGEST_A, "tokens")
        + block("rotated", DIGEST_B, "tokens")
        + block("kept", DIGEST_C, "tokens"),
    )
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    stream = io.BytesIO()
    daemon = Daemon(load_settings(path), path, configure_logging("debug", "json", stream))
    server = FakeServer({"gone": 2, "rotated": 1, "kept": 5})
    server.auth = daemon.tokens.store(daemon.settings)
    return daemon, server, tokens, stream


async def test_reload_closes_the_connections_of_revoked_tokens(tmp_path: Path) -> None:
    daemon, server, tokens, stream = reload_setup(tmp_path)
    new_digest = hash_token("rotated-2")
    write(
        tokens,
        block("rotated", new_digest, "tokens")
        + block("kept", DIGEST_C, "tokens")
        + block("added", hash_token("x"), "tokens"),
    )
    await daemon.reloader.reload(server)  # type: ignore[arg-type]
    assert server.auth.grant("added") is not None and server.auth.grant("gone") is None
    assert server.closed == [({"gone", "rotated"}, 4001, "token revoked")]  # one pass
    assert server.open == {"kept": 5}
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    revoked = {e["name"]: e for e in events if e["event"] == "token_revoked"}
    assert revoked["gone"]["connections"] == 2 and revoked["gone"]["cause"] == "removed"
    assert revoked["rotated"]["connections"] == 1 and revoked["rotated"]["cause"] == "replaced"
    assert any(e["event"] == "config_reloaded" and e["tokens"] == 3 for e in events)
    text = stream.getvalue().decode()
    for digest in (DIGEST_A, DIGEST_B, DIGEST_C, new_digest):
        assert digest not in text and digest[:16] not in text


async def test_reload_revokes_a_token_that_is_now_expired(tmp_path: Path) -> None:
    daemon, server, tokens, stream = reload_setup(tmp_path)
    past = "2020-01-01T00:00:00Z"
    write(
        tokens,
        block("gone", DIGEST_A, "tokens")
        + block("rotated", DIGEST_B, "tokens")
        + block("kept", DIGEST_C, "tokens", f"expires = {past}"),
    )
    await daemon.reloader.reload(server)  # type: ignore[arg-type]
    assert server.closed == [({"kept"}, 4001, "token revoked")]
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert {"event": "tokens_expired", "names": ["kept"]}.items() <= next(
        e for e in events if e["event"] == "tokens_expired"
    ).items()
    (revoked,) = [e for e in events if e["event"] == "token_revoked"]
    assert revoked["cause"] == "expired" and revoked["connections"] == 5


async def test_rejected_reload_revokes_nothing(tmp_path: Path) -> None:
    daemon, server, tokens, stream = reload_setup(tmp_path)
    before = server.auth
    tokens.unlink()  # a missing tokens file is an error: the running tokens stay
    await daemon.reloader.reload(server)  # type: ignore[arg-type]
    assert server.auth is before and server.closed == []
    assert b"config_reload_rejected" in stream.getvalue()


async def test_live_connections_are_closed_when_their_token_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenkeeper, "TOKEN_EXPIRY_CHECK_INTERVAL", 0.02)
    soon = datetime.now(UTC) + timedelta(seconds=0.3)
    tokens = write(
        tmp_path / "tokens.toml",
        block("short", DIGEST_A, "tokens", f'expires = "{soon.isoformat()}"')
        + block("long", DIGEST_B, "tokens", "expires = 2999-01-01T00:00:00Z")
        + block("old", DIGEST_C, "tokens", "expires = 2000-01-01T00:00:00Z"),
    )
    path = write(tmp_path / "c.toml", f'[auth]\ntokens_file = "{tokens}"\n')
    stream = io.BytesIO()
    daemon = Daemon(load_settings(path), path, configure_logging("debug", "json", stream))
    server = FakeServer({"short": 3, "long": 1, "old": 0})
    server.auth = daemon.tokens.store(daemon.settings)
    with trio.move_on_after(0.15):
        await daemon.tokens.expire_loop(server)  # type: ignore[arg-type]
    assert server.closed == []  # "old" was expired at start: nothing of it to close
    with trio.move_on_after(0.6):
        await daemon.tokens.expire_loop(server)  # type: ignore[arg-type]
    assert server.closed == [({"short"}, 4001, "token expired")]  # once, not at every check
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    (expired,) = [e for e in events if e["event"] == "token_expired"]
    assert expired["name"] == "short" and expired["connections"] == 3


# --- tokenfile: append, remove ------------------------------------------------------------------


def entry(name: str, secret: str | None = None, **extra: Any) -> TokenSpec:
    return TokenSettings(name=name, sha256=hash_token(secret or name), **extra).spec()


def test_append_creates_0600_with_a_header_then_only_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.umask(0o022)  # the usual umask would give 0644
    path = tmp_path / "tokens.toml"
    first_entry = entry("a", symbols=["ETH/USD"], max_connections=2)
    assert append_token(path, first_entry, parse=parse_tokens_file) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert first.startswith(b"# agentspoonsd tokens")
    second_entry = entry("b", expires=datetime(2030, 1, 1, tzinfo=UTC))
    assert append_token(path, second_entry, parse=parse_tokens_file) is False
    second = path.read_bytes()
    assert second.startswith(first)  # not one byte of what was there is rewritten
    assert (
        second[len(first) :]
        == b"\n" + entry_text(entry("b", expires=datetime(2030, 1, 1, tzinfo=UTC))).encode()
    )
    data = tomllib.loads(second.decode())
    assert [t["name"] for t in data["tokens"]] == ["a", "b"]
    assert data["tokens"][1]["expires"] == datetime(2030, 1, 1, tzinfo=UTC)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_append_after_a_hand_edit_without_final_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", "# mine\n" + block("a", DIGEST_A, "tokens").rstrip())
    append_token(path, entry("b"), parse=parse_tokens_file)
    assert [t.name for t in read_tokens_file(path)[0]] == ["a", "b"]
    assert path.read_text().startswith("# mine\n" + block("a", DIGEST_A, "tokens").rstrip())


def test_append_refuses_a_duplicate_and_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    append_token(path, entry("a"), parse=parse_tokens_file)
    before = path.read_bytes()
    with pytest.raises(TokenFileError, match='"a" already exists'):
        append_token(path, entry("a", "other secret"), parse=parse_tokens_file)
    with pytest.raises(TokenFileError, match='"x" already exists'):
        append_token(path, entry("x"), taken={"x"}, parse=parse_tokens_file)
    assert path.read_bytes() == before
    broken = write(tmp_path / "broken.toml", "[[tokens]\n")
    with pytest.raises(TokenFileError, match="invalid TOML"):
        append_token(broken, entry("a"), parse=parse_tokens_file)
    assert broken.read_text() == "[[tokens]\n"


def test_a_refused_first_entry_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    with pytest.raises(TokenFileError):
        append_token(path, entry("x"), taken={"x"}, parse=parse_tokens_file)
    assert not path.exists()


def test_concurrent_appends_all_land(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            append_token(path, entry(f"t{i}"), parse=parse_tokens_file)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(t.name for t in read_tokens_file(path)[0]) == sorted(f"t{i}" for i in range(16))


HAND_EDITED = f"""\
# Tokens of the trading floor. Ask ops before adding one.

# the dashboard on the wall
[[tokens]]
name = "dashboard"   # inline comment
sha256 = "{DIGEST_A}"

# risk desk: ETH only
# (rotated 2026-01-12)
[[tokens]]
name = "risk"
sha256 = "{DIGEST_B}"
symbols = ["ETH/USD"]

[[tokens]]
name = "last"
sha256 = "{DIGEST_C}"
"""


def test_remove_keeps_every_other_line_mode_and_owner(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", HAND_EDITED, mode=0o640)
    removed = remove_token(path, "risk", parse=parse_tokens_file)
    assert removed.name == "risk" and removed.symbols == ("ETH/USD",)
    assert path.read_text() == HAND_EDITED.replace(
        f'# risk desk: ETH only\n# (rotated 2026-01-12)\n[[tokens]]\nname = "risk"\n'
        f'sha256 = "{DIGEST_B}"\nsymbols = ["ETH/USD"]\n\n',
        "",
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # kept, whatever it was
    assert [p.name for p in tmp_path.iterdir()] == ["tokens.toml"]  # no temporary file left
    remove_token(path, "dashboard", parse=parse_tokens_file)
    remove_token(path, "last", parse=parse_tokens_file)
    assert path.read_text().startswith("# Tokens of the trading floor.")
    assert read_tokens_file(path)[0] == ()


def test_remove_unknown_name_or_inline_table_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "tokens.toml", HAND_EDITED)
    with pytest.raises(TokenFileError, match='no token named "nobody"'):
        remove_token(path, "nobody", parse=parse_tokens_file)
    inline = write(tmp_path / "inline.toml", f'tokens = [{{name = "a", sha256 = "{DIGEST_A}"}}]\n')
    with pytest.raises(TokenFileError, match="edit the file by hand"):
        remove_token(inline, "a", parse=parse_tokens_file)
    assert path.read_text() == HAND_EDITED
    with pytest.raises(TokenFileError, match="file not found"):
        remove_token(tmp_path / "none.toml", "a", parse=parse_tokens_file)


def test_remove_through_a_symlink_edits_the_target(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    target = write(tmp_path / "secrets" / "tokens.toml", HAND_EDITED)
    link = tmp_path / "tokens.toml"
    link.symlink_to(target)
    remove_token(link, "last", parse=parse_tokens_file)
    assert link.is_symlink()
    assert [t.name for t in read_tokens_file(link)[0]] == ["dashboard", "risk"]


# --- end to end: the real daemon, the real CLI ----------------------------------------------------


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AGENTSPOONSD_")}
    return subprocess.run(
        [sys.executable, "-m", "agentspoonsd", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def printed_token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[0].removeprefix("token: ")


async def closed_with(ws: Any, within: float) -> tuple[int, str]:
    with trio.fail_after(within), pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    return closed.value.reason.code, closed.value.reason.reason


# daemon_factory: conftest.py


async def test_revoke_and_sighup_close_that_tokens_connections_only(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    config = tmp_path / "agentspoonsd.toml"
    kept = new_token()
    # [auth] is the last table config_text writes: tokens_file goes there, before any token.
    config.write_text(config_text() + 'tokens_file = "tokens.toml"\n' + token_block("kept", kept))
    # `token new` finds the tokens file through the config, and creates it.
    revoked = printed_token(cli("token", "new", "revoked", "--config", str(config), cwd=tmp_path))
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    tokens_file.chmod(0o640)  # the daemon must say so

    daemon = daemon_factory(config)
    ws_port, _ = await daemon.ports()
    warning = await daemon.wait_for("tokens_file_permissions")
    assert warning["mode"] == "0640" and warning["path"] == str(tokens_file)
    url = f"ws://127.0.0.1:{ws_port}/"

    async with (
        open_websocket_url(url, extra_headers=bearer(revoked)) as ws_revoked,
        open_websocket_url(f"{url}?access_token={kept}") as ws_kept,
    ):
        for ws, name in ((ws_revoked, "revoked"), (ws_kept, "kept")):
            assert json.loads(await ws.get_message())["token"] == name
        await next_update(ws_revoked)

        # One reload: `revoked` goes, `short` (expiring in a few seconds) comes.
        result = cli("token", "revoke", "revoked", "--config", str(config), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "systemctl reload agentspoonsd" in result.stdout
        # Long enough for `token new`, the reload and a connection on a loaded machine; the
        # checks of the revocation below run while it counts down.
        expires = datetime.now(UTC) + timedelta(seconds=4)
        short = printed_token(
            cli("token", "new", "short", "--expires", expires.isoformat(), cwd=tmp_path)
        )  # found through the search order: ./agentspoonsd.toml
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for("config_reloaded", tokens=2)

        async with open_websocket_url(url, extra_headers=bearer(short)) as ws_short:
            assert json.loads(await ws_short.get_message())["token"] == "short"

            assert await closed_with(ws_revoked, 5) == (4001, "token revoked")
            event = await daemon.wait_for("token_revoked", name="revoked")
            assert event["connections"] == 1 and event["cause"] == "removed"
            assert (await next_update(ws_kept))["type"] == "volatility_update"  # untouched
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url, extra_headers=bearer(revoked)):
                    pass
            assert rejected.value.status_code == 401
            listed = cli("token", "list", "--config", str(config), cwd=tmp_path)
            assert listed.returncode == 0, listed.stderr
            names = [line.split()[0] for line in listed.stdout.splitlines()]
            assert names == ["NAME", "kept", "short"]

            # `short` expires while connected: closed at expiry (4001), then refused as invalid.
            assert await closed_with(ws_short, 10) == (4001, "token expired")
        assert datetime.now(UTC) >= expires
        event = await daemon.wait_for("token_expired", name="short")
        assert event["connections"] == 1
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(url, extra_headers=bearer(short)):
                pass
        assert rejected.value.status_code == 401
        assert b'error="invalid_token"' in dict(rejected.value.headers)[b"www-authenticate"]
        await daemon.wait_for("auth_failed", reason="expired")
        assert (await next_update(ws_kept))["type"] == "volatility_update"

    for secret in (kept, revoked, short):
        assert secret not in daemon.log_text
        assert hash_token(secret) not in daemon.log_text


async def test_a_reload_that_switches_auth_on_closes_the_anonymous_connections(
    tmp_path: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    config = tmp_path / "agentspoonsd.toml"
    config.write_text(config_text(auth_enabled=False))
    daemon = daemon_factory(config)
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/"
    token = new_token()

    async with open_websocket_url(url) as anonymous:
        assert json.loads(await anonymous.get_message())["token"] == "anonymous"
        await next_update(anonymous)
        config.write_text(config_text(tokens={"dashboard": token}))
        daemon.signal(signal.SIGHUP)

        assert await closed_with(anonymous, 5) == (4001, "token required")
        event = await daemon.wait_for("token_revoked", name="anonymous")
        assert event["cause"] == "auth_enabled" and event["connections"] == 1
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(url):
                pass
        assert rejected.value.status_code == 401
        async with open_websocket_url(url, extra_headers=bearer(token)) as authenticated:
            assert json.loads(await authenticated.get_message())["token"] == "dashboard"
            await next_update(authenticated)
    assert token not in daemon.log_text


def test_scope_warnings_name_each_unpublished_symbol_and_a_token_scoped_to_nothing() -> None:
    published = ["BTC/USD", "ETH/USD"]
    assert tokenfile.scope_warnings(["*"], published, "c.toml") == []
    assert tokenfile.scope_warnings(["ETH/USD", "BTC/USD"], published, "c.toml") == []
    one = tokenfile.scope_warnings(["ETH/USD", "eth/usd"], published, "c.toml")
    assert one == [
        'symbol "eth/usd" is not published by c.toml (generator.symbols: BTC/USD, ETH/USD);'
        ' did you mean "ETH/USD"?'
    ]
    none = tokenfile.scope_warnings(["SOL/USD"], published, "c.toml")
    assert len(none) == 2 and "did you mean" not in none[0]
    assert "allows none of the published symbols" in none[1]
    # Quoted as TOML strings: a control character cannot forge a second line.
    (line, _) = tokenfile.scope_warnings(["x\ny"], published, "c.toml")
    assert '"x\\ny"' in line and "\n" not in line


async def test_a_daemon_tells_a_token_scoped_to_nothing_so_and_still_streams_to_the_others(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    """The real daemon on its config: `no_symbols` right after `connected` for a token whose
    symbols are all unpublished (not a silent empty stream); another token still gets updates."""
    nothing, everything = new_token(), new_token()
    text = config_text(tokens={"all": everything}) + token_block("doge", nothing, ["DOGE/USD"])
    daemon = daemon_factory(text)
    ws_port, _ = await daemon.ports()
    url = f"ws://127.0.0.1:{ws_port}/"
    with trio.fail_after(10):
        async with open_websocket_url(url, extra_headers=bearer(nothing)) as ws:
            hello = json.loads(await ws.get_message())
            assert hello["type"] == "connected" and hello["token"] == "doge"
            assert hello["symbols"] == hello["available"] == []
            error = json.loads(await ws.get_message())
            assert error["type"] == "error" and error["code"] == "no_symbols"
            assert "doge" in error["message"] and "BTC/USD" in error["message"]
        async with open_websocket_url(url, extra_headers=bearer(everything)) as ws:
            assert json.loads(await ws.get_message())["type"] == "connected"
            assert (await next_update(ws))["type"] == "volatility_update"
