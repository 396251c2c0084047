"""settings: defaults, TOML loading, env overrides, every error names its key and its source."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentspoonsd import configpaths
from agentspoonsd import settings as settings_module
from agentspoonsd.market import annual, models
from agentspoonsd.settings import (
    CONFIG_ENV_VAR,
    EXIT_CONFIG,
    ConfigError,
    GeneratorSettings,
    Settings,
    TokenSettings,
    find_config_path,
    load_settings,
    redacted,
)

DIGEST_A = hashlib.sha256(b"token-a").hexdigest()
DIGEST_B = hashlib.sha256(b"token-b").hexdigest()
REPO_CONFIG = Path(__file__).resolve().parent.parent / "agentspoonsd.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AGENTSPOONSD_* variable from the caller's shell, and no ./agentspoonsd.toml around."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("AGENTSPOONSD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "conf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# --- defaults and loading -------------------------------------------------------------------------


def test_defaults_match_design() -> None:
    s = load_settings(None)
    assert (s.server.host, s.server.port) == ("0.0.0.0", 8765)
    assert s.server.max_connections == 20000
    assert s.server.shutdown_timeout == 5.0
    assert s.server.tls_cert is None and s.server.tls_key is None
    assert s.auth.enabled is True and s.auth.tokens == []
    assert s.generator.interval == 2.0
    assert s.generator.symbols == ["BTC/USD"]
    assert s.generator.model == "garch"
    assert s.generator.seed is None
    assert s.history.size == 1000 and s.history.persist is False
    assert s.history.dir == Path("/var/lib/agentspoonsd")
    assert s.broker.kind == "memory"
    assert (s.health.host, s.health.port) == ("127.0.0.1", 8766)
    assert (s.log.level, s.log.format) == ("info", "auto")


def test_repository_config_is_valid_and_equals_defaults() -> None:
    """./agentspoonsd.toml documents every key with its built-in default, but for its symbols:
    it lists BTC/USD and ETH/USD, each with a plausible price and volatility of its own."""
    shipped, defaults = load_settings(REPO_CONFIG), load_settings(None)
    generator = shipped.generator
    assert generator.symbols == ["BTC/USD", "ETH/USD"]
    assert set(generator.overrides) == set(generator.symbols)
    assert (
        shipped.model_copy(
            update={
                "generator": generator.model_copy(update={"symbols": ["BTC/USD"], "overrides": {}})
            }
        )
        == defaults
    )
    for symbol, price, volatility in [("BTC/USD", 60_000.0, 0.55), ("ETH/USD", 3_000.0, 0.70)]:
        assert generator.initial_price_for(symbol) == price
        per_bar = generator.params_for(symbol)
        annual_variance = per_bar.unconditional_variance * generator.bar_time.periods_per_year
        assert math.sqrt(annual_variance) == pytest.approx(volatility, rel=1e-12)


def test_toml_file_is_loaded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[server]
host = "127.0.0.1"
port = 9100
shutdown_timeout = 1.5

[auth]
enabled = true
[[auth.tokens]]
name = "dashboard"
sha256 = "{DIGEST_A.upper()}"
[[auth.tokens]]
name = "eth-only"
sha256 = "{DIGEST_B}"
symbols = ["ETH/USD"]

[generator]
interval = 0.5
symbols = ["BTC/USD", "ETH/USD"]
seed = 42

[history]
size = 10

[health]
port = 0

[log]
level = "debug"
format = "console"
""",
    )
    s = load_settings(path)
    assert (s.server.host, s.server.port, s.server.shutdown_timeout) == ("127.0.0.1", 9100, 1.5)
    assert s.server.max_connections == 20000  # untouched keys keep their default
    assert [t.name for t in s.auth.tokens] == ["dashboard", "eth-only"]
    assert s.auth.tokens[0].sha256 == DIGEST_A  # normalised to lower case
    assert s.auth.tokens[0].symbols == ["*"]
    assert s.auth.tokens[1].symbols == ["ETH/USD"]
    assert s.generator.interval == 0.5 and s.generator.seed == 42
    assert s.generator.symbols == ["BTC/USD", "ETH/USD"]
    assert s.history.size == 10 and s.health.port == 0
    assert (s.log.level, s.log.format) == ("debug", "console")


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == load_settings(None)


def test_settings_are_frozen() -> None:
    s = load_settings(None)
    with pytest.raises(ValueError):
        s.server.port = 1  # type: ignore[misc]


# --- environment overrides ------------------------------------------------------------------------


def test_env_beats_file_and_keeps_the_rest_of_the_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[server]\nhost = "127.0.0.1"\nport = 1234\n')
    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "9000")
    s = load_settings(path)
    assert s.server.port == 9000
    assert s.server.host == "127.0.0.1"


def test_env_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_LOG__LEVEL", "warning")
    monkeypatch.setenv("agentspoonsd_generator__interval", "0.25")  # names are case-insensitive
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__SYMBOLS", '["A/B", "C/D"]')
    s = load_settings(None)
    assert s.log.level == "warning"
    assert s.generator.interval == 0.25
    assert s.generator.symbols == ["A/B", "C/D"]


@pytest.mark.parametrize(
    ("name", "value", "key", "expected"),
    [
        ("AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED", "false", "garch_fit.enabled", False),
        (
            "AGENTSPOONSD_GENERATOR__HESTON__INITIAL_VOLATILITY",
            "0.8",
            "heston.initial_volatility",
            0.8,
        ),
        ("agentspoonsd_generator__replay__speed", "60", "replay.speed", 60.0),
        ("AGENTSPOONSD_GENERATOR__GARCH_FIT", '{"enabled": false}', "garch_fit.enabled", False),
    ],
)
def test_env_sets_a_nested_key_and_keeps_the_file_s_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str, expected: Any
) -> None:
    path = write(
        tmp_path,
        "[generator.garch_fit]\nwindow = 200\n[generator.heston]\nhalf_life = 900.0\n"
        "[generator.replay]\nloop = false\n",
    )
    monkeypatch.setenv(name, value)
    generator = load_settings(path).generator
    table, field = key.split(".")
    assert getattr(getattr(generator, table), field) == expected
    assert generator.garch_fit.window == 200
    assert generator.heston.half_life == 900.0
    assert generator.replay.loop is False


def test_bad_nested_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__GARCH_FIT__WINDOW", "5")
    text = config_error(None)
    assert text == (
        "environment variable AGENTSPOONSD_GENERATOR__GARCH_FIT__WINDOW:"
        ' generator.garch_fit.window: Input should be greater than or equal to 100, got "5"'
    )


def test_a_nested_table_from_the_environment_must_be_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__GARCH_FIT", "enabled=false")
    assert config_error(None) == (
        "environment variable AGENTSPOONSD_GENERATOR__GARCH_FIT: generator.garch_fit:"
        " must be a JSON object (a table)"
    )


@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("AGENTSPOONSD_SERVER__MAX_CONECTIONS", "AGENTSPOONSD_SERVER__MAX_CONNECTIONS"),
        ("AGENTSPOONSD_SERVR__PORT", "AGENTSPOONSD_SERVER__PORT"),
        (
            "AGENTSPOONSD_GENERATOR__GARCH_FTI__ENABLED",
            "AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED",
        ),
        ("AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLD", "AGENTSPOONSD_GENERATOR__GARCH_FIT__ENABLED"),
        ("agentspoonsd_log__levle", "AGENTSPOONSD_LOG__LEVEL"),
    ],
)
def test_unknown_env_var_suggests_the_real_one(
    monkeypatch: pytest.MonkeyPatch, name: str, meant: str
) -> None:
    monkeypatch.setenv(name, "1")
    text = config_error(None)
    assert text.startswith(f"environment variable {name}: ")
    assert text.endswith(f"; did you mean {meant}?")


@pytest.mark.parametrize(
    "name",
    ["AGENTSPOONSD_XYZZY__PORT", "AGENTSPOONSD_SERVER__PORT__X", "AGENTSPOONSD_SERVER__ZZZZZZ"],
)
def test_unknown_env_var_without_a_near_key_suggests_nothing(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "1")
    assert "did you mean" not in config_error(None)


def test_env_fixes_a_bad_file_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 99999\n")
    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "9001")
    assert load_settings(path).server.port == 9001


def test_config_env_var_is_not_an_unknown_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV_VAR, str(write(tmp_path, "")))
    assert load_settings(None).server.port == 8765


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("AGENTSPOONSD_SERVR__PORT", "no config section 'servr'"),
        ("AGENTSPOONSD_SERVER__PROT", "no key 'server.prot'"),
        ("AGENTSPOONSD_SERVER", "no key 'server'"),
        ("AGENTSPOONSD_SERVER__PORT__X", "no key 'server.port.x'"),
    ],
)
def test_unknown_env_var(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    monkeypatch.setenv(name, "1")
    text = config_error(None)
    assert name in text
    assert message in text


def test_bad_env_value_names_the_variable_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    monkeypatch.setenv("AGENTSPOONSD_SERVER__PORT", "not-a-number")
    text = config_error(path)
    assert "environment variable AGENTSPOONSD_SERVER__PORT" in text
    assert "server.port" in text
    assert str(path) not in text  # the file's value is fine; the variable is the culprit


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("AGENTSPOONSD_GENERATOR__SYMBOLS", "BTC/USD", "generator.symbols"),
        ("AGENTSPOONSD_AUTH__TOKENS", "dashboard", "auth.tokens"),
    ],
)
def test_env_list_that_is_not_json_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, key: str
) -> None:
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("AGENTSPOONSD_SERVER__HOST", "127.0.0.1")  # a fine non-JSON neighbour
    text = config_error(None)
    assert f"environment variable {name}: {key}:" in text
    assert "JSON" in text
    assert "SERVER__HOST" not in text


def test_env_list_with_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__SYMBOLS", '["A", "A"]')
    text = config_error(None)
    assert "environment variable AGENTSPOONSD_GENERATOR__SYMBOLS" in text
    assert "generator.symbols" in text and "unique" in text


# --- errors in the file ---------------------------------------------------------------------------


def token_block(name: str = "a", sha256: str = DIGEST_A, extra: str = "") -> str:
    return f'[[auth.tokens]]\nname = "{name}"\nsha256 = "{sha256}"\n{extra}\n'


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # unknown keys, in every section and at the top level
        ("bogus = 1", "bogus", "unknown key"),
        *[
            (f"[{section}]\nbogus = 1", f"{section}.bogus", "unknown key")
            for section in Settings.model_fields
        ],
        (token_block(extra="bogus = 1"), "auth.tokens[0].bogus", "unknown key"),
        # bad types
        ('[server]\nport = "abc"', "server.port", "integer"),
        ("[server]\nport = true", "server.port", "boolean"),  # lax pydantic would read 1
        ("[generator]\ninterval = false", "generator.interval", "boolean"),
        ("[generator]\nseed = true", "generator.seed", "boolean"),
        ("[server]\nport = 80.5", "server.port", "integer"),
        ('[server]\nshutdown_timeout = "soon"', "server.shutdown_timeout", "number"),
        ('[generator]\nsymbols = "BTC/USD"', "generator.symbols", "list"),
        ("[generator]\nsymbols = [1]", "generator.symbols[0]", "string"),
        ("[auth]\nenabled = 3", "auth.enabled", "boolean"),
        ("server = 5", "server", "dictionary"),
        ('[log]\nlevel = "verbose"', "log.level", "'debug'"),
        ('[log]\nformat = "xml"', "log.format", "'auto', 'json' or 'console'"),
        ('[generator]\nmodel = "arima"', "generator.model", "'heston'"),
        ('[broker]\nkind = "kafka"', "broker.kind", "'memory'"),
        ('[broker]\nurl = "http://x"', "broker.url", "pattern"),
        # out of range
        ("[server]\nport = 65536", "server.port", "65535"),
        ("[server]\nport = -1", "server.port", "0"),
        ("[server]\nmax_connections = 0", "server.max_connections", "1"),
        ("[server]\nshutdown_timeout = 0", "server.shutdown_timeout", "greater than 0"),
        ("[server]\nmax_backlog_bytes = 10", "server.max_backlog_bytes", "1024"),
        ("[generator]\ninterval = 0", "generator.interval", "greater than 0"),
        ("[generator]\ninterval = 3601", "generator.interval", "3600"),
        ("[generator]\nsymbols = []", "generator.symbols", "at least 1"),
        ('[generator]\nsymbols = [""]', "generator.symbols[0]", "at least 1"),
        ("[history]\nsize = 0", "history.size", "1"),
        ("[health]\nport = 70000", "health.port", "65535"),
        # tokens
        (token_block(sha256="xyz"), "auth.tokens[0].sha256", "64 hexadecimal"),
        (token_block(sha256="g" * 64), "auth.tokens[0].sha256", "64 hexadecimal"),
        (token_block(sha256=DIGEST_A[:-1]), "auth.tokens[0].sha256", "64 hexadecimal"),
        (token_block() + token_block("b", "0" * 63), "auth.tokens[1].sha256", "64 hexadecimal"),
        ('[[auth.tokens]]\nname = "a"', "auth.tokens[0].sha256", "Field required"),
        (token_block(name="has space"), "auth.tokens[0].name", "pattern"),
        (token_block(name=""), "auth.tokens[0].name", "at least 1"),
        (token_block("dup") + token_block("dup", DIGEST_B), "auth.tokens", "duplicate token"),
        # symbols
        ('[generator]\nsymbols = ["A", "B", "A"]', "generator.symbols", "unique"),
        ('[generator]\nsymbols = ["*"]', "generator.symbols", '"*"'),
    ],
)
def test_bad_file_names_key_and_file(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}: {key}: " in message, message
    assert reason in message, message


def test_every_problem_is_reported_one_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 70000\nbogus = 1\n[log]\nlevel = 1\n")
    lines = config_error(path).splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"server.port", "server.bogus", "log.level"}


@pytest.mark.parametrize(
    "text",
    [
        "[server\nport = 1",
        "[server]\nport = ",
        "[server]\nport = 1\nport = 2",
        "[server]\nhost = 'unterminated",
        "not toml at all",
    ],
)
def test_invalid_toml_names_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "(at " in message  # the position (line and column, or end of document)


def test_errors_point_at_the_key_show_the_value_and_suggest_the_real_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n"
        "[server]\n"
        "port = 70000\n"
        "  max_conections = 5\n"
        'level = "debug"\n'
        "[generator]\n"
        'symbols = ["A", "", "C"]\n'
        "garch_fit.window = 5\n"
        '[generator.overrides."A"]\n'
        'model = "arima"\n',
    )
    assert set(config_error(path).splitlines()) == {
        f"{path}: server.port: Input should be less than or equal to 65535, got 70000"
        " (at line 3, column 1)",
        f"{path}: server.max_conections: unknown key; did you mean `max_connections`?"
        " (at line 4, column 3)",
        f"{path}: server.level: unknown key; did you mean `log.level`? (at line 5, column 1)",
        f'{path}: generator.symbols[1]: String should have at least 1 character, got ""'
        " (at line 7, column 17)",
        f"{path}: generator.garch_fit.window: Input should be greater than or equal to 100,"
        " got 5 (at line 8, column 11)",
        f"{path}: generator.overrides.A.model: Input should be 'gbm', 'garch',"
        " 'gjr_garch' or 'heston', got \"arima\" (at line 10, column 1)",
    }


def test_a_missing_key_is_placed_at_its_table(tmp_path: Path) -> None:
    path = write(tmp_path, '\n[[auth.tokens]]\nname = "a"\n')
    assert config_error(path) == (
        f"{path}: auth.tokens[0].sha256: Field required (at line 2, column 1)"
    )


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('[[auth.tokens]]\nname = "a"\nsha256 = "the-token-itself"\n', "the-token-itself"),
        ('[health]\nmetrics_token_sha256 = "the-token-itself"\n', "the-token-itself"),
        ('[broker]\nurl = "http://user:hunter2@redis:6379"\n', "hunter2"),
        ('[auth]\ntokens = ["hunter2"]\n', "hunter2"),
    ],
)
def test_a_value_that_may_be_a_secret_is_never_shown(
    tmp_path: Path, text: str, secret: str
) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert secret not in message
    assert "(at line " in message


def test_a_bom_does_not_shift_columns(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[server]\nport = -1\n")
    assert config_error(path).endswith("got -1 (at line 2, column 1)")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "dir.toml"
    path.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        settings_module.read_toml(path)


def test_bad_tokens_validate_alone() -> None:
    assert TokenSettings(name="x", sha256=" " + DIGEST_A.upper() + "\n").sha256 == DIGEST_A
    with pytest.raises(ValueError):
        TokenSettings(name="x", sha256="z" * 64)


# --- search order ---------------------------------------------------------------------------------


@pytest.fixture
def search_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Path, Path]:
    """The default locations, with /etc/… moved under tmp_path so the host's /etc is not read."""
    local = Path("agentspoonsd.toml")
    system = tmp_path / "etc" / "agentspoonsd.toml"
    monkeypatch.setattr(configpaths, "DEFAULT_SEARCH_PATHS", (local, system))
    return local, system


def test_search_order(tmp_path: Path, search_paths: tuple[Path, Path]) -> None:
    local, system = search_paths
    explicit = write(tmp_path, "", "explicit.toml")
    from_env = write(tmp_path, "", "env.toml")
    env = {CONFIG_ENV_VAR: str(from_env)}

    assert find_config_path(None, {}) is None  # nothing anywhere: built-in defaults
    system.parent.mkdir()
    system.write_text("")
    assert find_config_path(None, {}) == system
    (tmp_path / local).write_text("")  # ./agentspoonsd.toml (the cwd is tmp_path)
    assert find_config_path(None, {}) == local
    assert find_config_path(None, env) == from_env
    assert find_config_path(explicit, env) == explicit
    assert find_config_path(str(explicit), {}) == explicit


def test_empty_config_env_var_is_ignored(search_paths: tuple[Path, Path]) -> None:
    assert find_config_path(None, {CONFIG_ENV_VAR: ""}) is None


def test_cwd_file_is_found_and_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search_paths: tuple[Path, Path]
) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    write(other, "[server]\nport = 4242\n", "agentspoonsd.toml")
    monkeypatch.chdir(other)
    path = find_config_path(None, {})
    assert path is not None and path.resolve() == other / "agentspoonsd.toml"
    assert load_settings(path).server.port == 4242


def test_missing_explicit_file_is_an_error(tmp_path: Path, search_paths: tuple[Path, Path]) -> None:
    (tmp_path / "agentspoonsd.toml").write_text("")  # a fallback exists, but is not used
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        find_config_path(missing, {})
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        find_config_path(None, {CONFIG_ENV_VAR: str(missing)})
    with pytest.raises(ConfigError, match=r"not a regular file \(a directory\)"):
        find_config_path(tmp_path, {})  # a directory is not a config file


# --- redaction ------------------------------------------------------------------------------------


def test_redacted_never_contains_a_full_digest(tmp_path: Path) -> None:
    metrics = hashlib.sha256(b"metrics").hexdigest()
    s = load_settings(
        write(
            tmp_path,
            token_block("a", DIGEST_A)
            + token_block("b", DIGEST_B)
            + f'[health]\nmetrics_token_sha256 = "{metrics}"\n',
        )
    )
    data = redacted(s)
    text = json.dumps(data, ensure_ascii=False)
    assert data["health"]["metrics_token_sha256"] == metrics[:8] + "…(redacted)"
    for digest in (DIGEST_A, DIGEST_B, metrics):
        assert digest not in text
        assert digest[:12] not in text
    assert [t["name"] for t in data["auth"]["tokens"]] == ["a", "b"]
    assert data["auth"]["tokens"][0]["sha256"].startswith(DIGEST_A[:8])
    assert "redacted" in data["auth"]["tokens"][0]["sha256"]
    # everything else is the effective config, as plain JSON-able data
    assert data["server"]["port"] == 8765
    assert data["history"]["dir"] == "/var/lib/agentspoonsd"
    assert s.auth.tokens[0].sha256 == DIGEST_A  # the settings themselves are untouched


def test_redis_broker_keys_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "agentspoonsd.toml"
    path.write_text('[broker]\nkind = "redis"\nurl = "redis://10.0.0.5:6380/2"\n')
    broker = load_settings(path).broker
    assert (broker.kind, broker.url, broker.lease, broker.prefix) == (
        "redis",
        "redis://10.0.0.5:6380/2",
        2.0,
        "agentspoonsd",
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[broker]\nkind = "valkey"\n', "broker.kind"),
        ('[broker]\nkind = "redis"\nurl = "http://h:6379"\n', "broker.url"),
        ('[broker]\nkind = "redis"\nlease = 0\n', "broker.lease"),
        ('[broker]\nkind = "redis"\nprefix = "a b"\n', "broker.prefix"),
        ('[history]\npersist = true\n[broker]\nkind = "redis"\n', "history.persist"),
    ],
)
def test_bad_broker_settings_are_refused(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "agentspoonsd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert f"{path}: {key}:" in str(error.value)


# --- [generator] model tables ---------------------------------------------------------------------


def test_volume_table_defaults_are_the_models_defaults() -> None:
    """The TOML table and the dataclass document the same defaults: they cannot drift."""
    dataclass_defaults = {f.name: f.default for f in dataclasses.fields(models.VolumeParams)}
    assert settings_module.VolumeSettings().model_dump() == dataclass_defaults
    assert load_settings(None).generator.volume_for("BTC/USD") == models.VolumeParams()


@pytest.mark.parametrize("kind", models.MODEL_KINDS)
@pytest.mark.parametrize(
    ("interval", "bar_seconds", "trading_days"),
    [(2.0, None, 365.0), (2.0, 60.0, 365.0), (1.0, 300.0, 252.0)],
)
def test_a_model_table_is_yearly_and_scaled_to_the_configured_bar(
    kind: models.ModelKind, interval: float, bar_seconds: float | None, trading_days: float
) -> None:
    """params_for scales the yearly table to the bar (bar_seconds, else interval) and the year
    (trading_days of 24 h here), through the one conversion function."""
    fields: dict[str, Any] = {"model": kind, "interval": interval, "trading_days": trading_days}
    if bar_seconds is not None:
        fields["bar_seconds"] = bar_seconds
    generator = GeneratorSettings(**fields)
    assert generator.bar_seconds == (interval if bar_seconds is None else bar_seconds)
    bar = annual.BarTime(generator.bar_seconds, trading_days * 86400.0)
    table = getattr(generator, kind).model_dump()
    assert generator.params_for("BTC/USD") == annual.per_bar_params(kind, table, bar)
    assert "annual_volatility" in table


def test_bar_seconds_defaults_to_the_interval_real_time(tmp_path: Path) -> None:
    assert load_settings(None).generator.bar_seconds == 2.0
    generator = load_settings(write(tmp_path, "[generator]\ninterval = 0.5\n")).generator
    assert generator.bar_seconds == 0.5 and "bar_seconds" not in generator.model_fields_set
    text = "[generator]\ninterval = 0.5\nbar_seconds = 60.0\n"
    generator = load_settings(write(tmp_path, text)).generator
    assert generator.bar_seconds == 60.0 and "bar_seconds" in generator.model_fields_set
    # An invalid interval is one error, not a second one about the key that follows it.
    message = config_error(write(tmp_path, "[generator]\ninterval = -1\n"))
    assert "generator.interval" in message and "generator.bar_seconds" not in message


@pytest.mark.parametrize(
    ("text", "key", "new"),
    [
        ("[generator.gbm]\nsigma = 0.0009", "generator.gbm.sigma", "annual_volatility"),
        ("[generator.gbm]\nmu = 0.0", "generator.gbm.mu", "annual_drift"),
        ("[generator.garch]\nomega = 1.62e-8", "generator.garch.omega", "annual_volatility"),
        ("[generator.garch]\nalpha = 0.07", "generator.garch.alpha", "reaction"),
        ("[generator.garch]\nbeta = 0.91", "generator.garch.beta", "half_life"),
        ("[generator.gjr_garch]\ngamma = 0.05", "generator.gjr_garch.gamma", "leverage"),
        ("[generator.heston]\nkappa = 0.02", "generator.heston.kappa", "half_life"),
        ("[generator.heston]\ntheta = 8.1e-7", "generator.heston.theta", "annual_volatility"),
        ("[generator.heston]\nxi = 1.5e-4", "generator.heston.xi", "vol_of_vol"),
        ("[generator.heston]\nv0 = 8.1e-7", "generator.heston.v0", "initial_volatility"),
        (
            '[generator.overrides."BTC/USD".garch]\nalpha = 0.1',
            'generator.overrides."BTC/USD".garch.alpha',
            "reaction",
        ),
    ],
)
def test_a_per_bar_parameter_of_earlier_versions_names_its_yearly_key(
    tmp_path: Path, text: str, key: str, new: str
) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert message.startswith(f"{path}: {key}: unknown key; model parameters are given per year")
    assert message.endswith(f": use `{new}` (at line 2, column 1)"), message


def test_a_per_bar_parameter_from_the_environment_names_its_yearly_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENTSPOONSD_GENERATOR__GARCH__BETA", "0.91")
    assert config_error(None).endswith(
        "(model parameters are given per year now and scaled to bar_seconds);"
        " did you mean AGENTSPOONSD_GENERATOR__GARCH__HALF_LIFE?"
    )


def test_a_per_bar_parameter_exits_78_naming_the_new_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[generator.heston]\nkappa = 0.02\n")
    result = subprocess.run(
        [sys.executable, "-m", "agentspoonsd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_CONFIG
    assert "generator.heston.kappa: unknown key" in result.stderr
    assert "use `half_life`" in result.stderr


def test_a_symbol_sets_its_own_annual_volatility_whatever_its_model(tmp_path: Path) -> None:
    text = (
        '[generator]\nsymbols = ["BTC/USD", "ETH/USD"]\nbar_seconds = 60.0\n'
        '[generator.overrides."BTC/USD"]\ninitial_price = 60000.0\nannual_volatility = 0.55\n'
        '[generator.overrides."ETH/USD"]\nmodel = "heston"\nannual_volatility = 0.7\n'
    )
    generator = load_settings(write(tmp_path, text)).generator
    bar = annual.BarTime(60.0, 365 * 86400.0)
    btc = generator.garch.model_dump() | {"annual_volatility": 0.55}
    eth = generator.heston.model_dump() | {"annual_volatility": 0.7}
    assert generator.params_for("BTC/USD") == annual.per_bar_params("garch", btc, bar)
    assert generator.params_for("ETH/USD") == annual.per_bar_params("heston", eth, bar)
    both = (
        '[generator.overrides."BTC/USD"]\nannual_volatility = 0.55\n'
        "garch = { annual_volatility = 0.5 }\n"
    )
    message = config_error(write(tmp_path, both))
    assert 'generator.overrides."BTC/USD"' in message and "not both" in message


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[generator.garch]\nreaction = 1.5", "generator.garch.reaction", "less than or equal"),
        ("[generator.garch]\nnu = 2", "generator.garch.nu", "greater than 2"),
        ("[generator.garch]\nhalf_life = 0", "generator.garch.half_life", "greater than 0"),
        ("[generator.gjr_garch]\nleverage = 3.0", "generator.gjr_garch", "<= 1"),
        ("[generator.gjr_garch]\nreaction = 0.01\nleverage = -0.5", "generator.gjr_garch", ">= 0"),
        ("[generator.heston]\nrho = 2", "generator.heston.rho", "less than or equal to 1"),
        (
            '[generator]\nmodel = "heston"\nbar_seconds = 600.0\n'
            "[generator.heston]\nhalf_life = 300",
            "generator",
            "heston.half_life: must be at least ln 2 × bar_seconds",
        ),
        (
            '[generator]\nbar_seconds = 3600.0\nsymbols = ["A"]\n'
            '[generator.overrides.A]\nmodel = "heston"\nheston = { half_life = 60.0 }',
            "generator",
            'overrides."A".heston.half_life: must be at least',
        ),
        ("[generator.gbm]\nannual_volatility = 0", "generator.gbm.annual_volatility", "than 0"),
        ("[generator.gbm]\nannual_drift = nan", "generator.gbm.annual_drift", "finite"),
        ("[generator.volume]\nscale = inf", "generator.volume.scale", "finite"),
        ("[generator]\ninitial_price = inf", "generator.initial_price", "finite"),
        ("[generator]\nbar_seconds = inf", "generator.bar_seconds", "finite"),
        ("[generator.replay]\nspeed = inf", "generator.replay.speed", "finite"),
        ("[generator.garch_fit]\nwindow = 99", "generator.garch_fit.window", "100"),
        (
            '[generator.overrides."BTC/USD".garch]\nreaction = 2',
            'generator.overrides."BTC/USD".garch.reaction',
            "less than or equal to 1",
        ),
        (
            '[generator.overrides."BTC/USD"]\nannual_volatility = -0.5',
            'generator.overrides."BTC/USD".annual_volatility',
            "greater than 0",
        ),
        (
            '[generator.overrides."BTC/USD"]\ninitial_price = inf',
            'generator.overrides."BTC/USD".initial_price',
            "finite",
        ),
        (
            '[generator.overrides."BTC/USD"]\nmodel = "arima"',
            'generator.overrides."BTC/USD".model',
            "heston",
        ),
    ],
)
def test_an_invalid_model_table_names_its_key(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    message = config_error(path)
    assert f"{path}: {key}: " in message, message
    assert reason in message, message


@pytest.mark.parametrize("source", ["file", "replay"])
def test_an_external_source_needs_its_path(tmp_path: Path, source: str) -> None:
    message = config_error(write(tmp_path, f'[generator]\nsource = "{source}"\n'))
    assert f"generator.{source}.path" in message
    assert message.startswith(f"{tmp_path / 'conf.toml'}: generator: ")
    ok = write(tmp_path, f'[generator]\nsource = "{source}"\n[generator.{source}]\npath = "x"\n')
    assert getattr(load_settings(ok).generator, source).path == Path("x")


def test_overrides_for_an_unknown_symbol_are_an_error(tmp_path: Path) -> None:
    text = (
        '[generator]\nsymbols = ["BTC/USD"]\n'
        '[generator.overrides."ETH/USD"]\nmodel = "gbm"\n'
        '[generator.overrides."DOGE/USD"]\ninitial_price = 0.1\n'
    )
    message = config_error(write(tmp_path, text))
    assert "generator: " in message
    assert "overrides for symbols not in generator.symbols: DOGE/USD, ETH/USD" in message


def test_overrides_apply_to_their_symbol_only(tmp_path: Path) -> None:
    text = (
        '[generator]\nsymbols = ["BTC/USD", "ETH/USD"]\nmodel = "garch"\n'
        "[generator.heston]\nrho = -0.7\n"
        '[generator.overrides."ETH/USD"]\nmodel = "heston"\ninitial_price = 3000.0\n'
        '[generator.overrides."ETH/USD".volume]\nscale = 4.0\n'
    )
    generator = load_settings(write(tmp_path, text)).generator
    assert generator.model_for("BTC/USD") == "garch"
    bar = generator.bar_time
    garch = annual.per_bar_params("garch", settings_module.GarchModelSettings().model_dump(), bar)
    assert generator.params_for("BTC/USD") == garch
    assert generator.initial_price_for("BTC/USD") == 50000.0
    assert generator.volume_for("BTC/USD") == models.VolumeParams()
    assert generator.model_for("ETH/USD") == "heston"
    shared = settings_module.HestonSettings(rho=-0.7).model_dump()  # the shared table
    assert generator.params_for("ETH/USD") == annual.per_bar_params("heston", shared, bar)
    assert generator.initial_price_for("ETH/USD") == 3000.0
    assert generator.volume_for("ETH/USD") == models.VolumeParams(scale=4.0)


@pytest.mark.parametrize("value", ["0", "true", '"many"', "-2", "1.5"])
def test_a_bad_worker_count_is_a_config_error_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[server]\nworkers = {value}\n")
    (line,) = config_error(path).splitlines()
    assert line.startswith(f"{path}: server.workers: ") and "(at line 2, column 1)" in line


@pytest.mark.parametrize("value", ["1", '"auto"'])
def test_a_worker_count_or_auto_is_accepted(tmp_path: Path, value: str) -> None:
    assert load_settings(write(tmp_path, f"[server]\nworkers = {value}\n")).server.workers in (
        1,
        "auto",
    )


def test_a_worker_count_from_the_environment_is_read_as_a_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTSPOONSD_SERVER__WORKERS", "2")
    assert load_settings(write(tmp_path, "")).server.workers == 2
    monkeypatch.setenv("AGENTSPOONSD_SERVER__WORKERS", "0")
    assert "server.workers" in config_error(write(tmp_path, ""))
